"""What an adapter needs to know of a base model: the names, kinds and shapes of its adaptable layers, read from
config.json by building the model on the meta device (no weights are loaded or downloaded), and the fingerprint of
the layers an adapter targets.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .adapter import Adapter, AdapterConfig, BaseModelRef, ModuleSpec
from .errors import BaseModelError, BaseModelMismatchError, FanInFanOutCorrectedWarning

if TYPE_CHECKING:
    from torch import nn
    from transformers import PretrainedConfig

    BaseSource = str | os.PathLike[str] | PretrainedConfig | nn.Module | "BaseModelInfo"
    """What `describe_base` accepts: a model folder, config.json, cached Hub id, config, model, or a description."""

LayerKind = Literal["linear", "conv1d", "embedding", "experts"]

# PEFT task types -> the transformers auto class whose module names PEFT adapters of that task use.
TASK_AUTO_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}
_MAX_CONFIG_JSON_BYTES = 16 * 1024 * 1024
HPARAM_KEYS = ("num_attention_heads", "num_key_value_heads", "num_hidden_layers", "head_dim", "hidden_size")


@dataclass(frozen=True)
class LayerInfo:
    """One adaptable layer of a base model.

    Attributes:
        kind: "linear" for nn.Linear and its quantized subclasses; "conv1d" for transformers' Conv1D (GPT-2), whose
            weight is stored (in, out); "embedding" for nn.Embedding (in: the vocabulary, out: the width);
            "experts" for a 3-D expert parameter (its path is the parameter's).
        quantization: "int8" or "4bit" for bitsandbytes layers, None otherwise.
        experts: The number of experts, for kind "experts".
        transposed: For kind "experts": the parameter is stored (experts, in, out) (the module's is_transposed).
    """

    kind: LayerKind
    in_features: int
    out_features: int
    quantization: str | None = None
    experts: int | None = None
    transposed: bool = False

    @property
    def fan_in_fan_out(self) -> bool:
        """The weight is stored (in, out) (Conv1D, and transposed experts); embeddings have their own layout."""
        return self.kind == "conv1d" or self.transposed

    @property
    def module_kind(self) -> str:
        """The format's kind of module for this layer (ModuleSpec.kind)."""
        return {"conv1d": "linear"}.get(self.kind, self.kind)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        transposed = self.fan_in_fan_out or self.kind == "embedding"
        shape = (self.in_features, self.out_features) if transposed else (self.out_features, self.in_features)
        return (self.experts, *shape) if self.kind == "experts" else shape


_FINGERPRINTS_KEPT = 64


@dataclass(frozen=True)
class BaseModelInfo:
    """A base model as an adapter sees it: identity, and every adaptable layer by module path."""

    name: str | None
    model_type: str | None
    layers: Mapping[str, LayerInfo]
    revision: str | None = None
    modules: frozenset[str] = frozenset()
    """Every module path, adaptable or not."""
    parameters: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    """Every parameter and buffer by path, with its shape (what replacement tensors must match), in the order the
    model registers them."""
    unsupported: Mapping[str, str] = field(default_factory=dict)
    """Modules that PEFT can adapt but the format cannot carry, by path: "conv" or "mha" (convert/features.py)."""
    tied: Mapping[str, str] = field(default_factory=dict)
    """Layers whose weight is another layer's (an output projection tied to the input embedding): path -> the path
    of the layer that owns the weight."""
    hparams: Mapping[str, Any] = field(default_factory=dict)
    """What runtimes outside PyTorch lay out by (HPARAM_KEYS of the text model's config, when it has them): the
    attention head counts that llama.cpp's converter permutes q and k rows by, the block count."""

    _fingerprints: dict[tuple[str, ...], str] = field(default_factory=dict, init=False, repr=False, compare=False)
    """Fingerprints computed, by the layers they cover (a runtime checks every adapter it loads against its base)."""

    def fingerprint(self, modules: Iterable[str]) -> str:
        """The fingerprint of the given layers of this model (FORMAT.md, "Base model fingerprint").

        Raises:
            KeyError: A module is not an adaptable layer of this model.
        """
        key = tuple(modules)
        found = self._fingerprints.get(key)
        if found is None:
            found = fingerprint({m: self.layers[m].weight_shape for m in key})
            if len(self._fingerprints) >= _FINGERPRINTS_KEPT:
                self._fingerprints.clear()
            self._fingerprints[key] = found
        return found


@dataclass(frozen=True)
class LiveBase:
    """A base model that is live in a runtime: its description, and its original modules by path (the runtime wraps
    some of them), for converters that read its weights."""

    info: BaseModelInfo
    modules: Mapping[str, Any]


def fingerprint(weight_shapes: Mapping[str, tuple[int, ...]]) -> str:
    """sha256 over the sorted lines "<module path>:<rows>x<cols>\\n" of the targeted base weights, as stored (three
    dimensions for expert parameters)."""
    names = sorted(weight_shapes)
    shapes = list(map(weight_shapes.__getitem__, names))
    lines = {shape: f":{'x'.join(map(str, shape))}\n" for shape in set(shapes)}  # layers share a few shapes
    text = "".join(map(str.__add__, names, map(lines.__getitem__, shapes)))
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def fit_to_base(config: AdapterConfig, base: BaseModelInfo) -> AdapterConfig:
    """Checks every module of `config` against the base model, and returns the config with fan_in_fan_out taken
    from each base layer's kind (warning when that corrects the source) and the base model's type and fingerprint
    recorded.

    Raises:
        BaseModelMismatchError: A module is not an adaptable layer of the base, or its kind or features differ.
        UnsupportedFeatureError: A module is a layer the format cannot carry (a convolution, MultiheadAttention).
    """
    from .convert.features import REFUSALS
    from .errors import UnsupportedFeatureError

    for name in config.modules:
        if name in base.unsupported:
            refusal = REFUSALS[base.unsupported[name]]
            raise UnsupportedFeatureError(f"module '{name}' is {refusal.feature}: lora-hub does not carry it, because "
                                          f"{refusal.why}. {refusal.fix}", code=refusal.code, module=name)
    missing = [m for m in config.modules if m not in base.layers]
    if missing:
        raise BaseModelMismatchError(
            f"{len(missing)} of {len(config.modules)} adapter modules are not adaptable layers of the base model "
            f"{base.name or ''} (first: '{missing[0]}'); check that this is the adapter's base model and task type")
    modules, corrected = {}, []
    for name, spec in config.modules.items():
        layer = base.layers[name]
        problem = layer_mismatch(spec, layer)
        if problem:
            raise BaseModelMismatchError(f"module '{name}': {problem}; this adapter was made for another model",
                                         module=name)
        flag = layer.fan_in_fan_out if spec.kind != "embedding" else False
        if spec.fan_in_fan_out != flag:
            corrected.append(name)
        modules[name] = replace(spec, fan_in_fan_out=flag)
    for name in config.trainable_tokens:
        problem = tokens_mismatch(name, config.trainable_tokens[name], base)
        if problem:
            raise BaseModelMismatchError(f"trainable tokens of '{name}': {problem}", module=name)
    if corrected:
        kind = "a Conv1D" if base.layers[corrected[0]].fan_in_fan_out else "an nn.Linear"
        warnings.warn(FanInFanOutCorrectedWarning(
            f"fan_in_fan_out corrected for {len(corrected)} module(s) to match the base layers (first: "
            f"'{corrected[0]}' is {kind}); PEFT makes the same correction when it loads the adapter"), stacklevel=3)
    known = config.base_model or BaseModelRef()
    ref = BaseModelRef(name=known.name or base.name, revision=known.revision or base.revision,
                       model_type=base.model_type, fingerprint=base.fingerprint(modules))
    return replace(config, modules=modules, base_model=ref)


def layer_mismatch(spec: ModuleSpec, layer: LayerInfo) -> str | None:
    """What keeps a module from applying to a base layer, or None. An adapter that brings its own base weight
    (replaces_base) may have another vocabulary size: only the other dimension must match."""
    if spec.kind != layer.module_kind:
        return f"the adapter has a module of kind {spec.kind}, the base layer is {layer.kind}"
    if spec.kind == "experts" and spec.experts != layer.experts:
        return f"the adapter has {spec.experts} experts, the base parameter {layer.experts}"
    if (spec.in_features, spec.out_features) == (layer.in_features, layer.out_features):
        return None
    if spec.replaces_base and spec.kind == "embedding" and spec.out_features == layer.out_features:
        return None  # a resized vocabulary, which the adapter brings in its own embedding matrix
    if spec.replaces_base and spec.kind == "linear" and spec.in_features == layer.in_features:
        return None  # an output projection over a resized vocabulary
    return (f"the adapter has in={spec.in_features}, out={spec.out_features}; the base layer has "
            f"in={layer.in_features}, out={layer.out_features}")


def tokens_mismatch(module: str, indices: tuple[int, ...], base: BaseModelInfo) -> str | None:
    """What keeps trainable tokens from applying to a base layer, or None."""
    layer = base.layers.get(module)
    if layer is None or layer.kind != "embedding":
        return "the base model has no embedding layer at that path"
    if max(indices) >= layer.in_features:
        return f"token {max(indices)} is outside the vocabulary of {layer.in_features}"
    return None


def describe_base(source: BaseSource, *, task_type: str | None = None) -> BaseModelInfo:
    """Describes a base model's adaptable layers without loading its weights.

    Args:
        source: A loaded model; a transformers config; a model folder or a config.json path; or a Hub repo id that
            is already in the local Hugging Face cache (nothing is downloaded).
        task_type: The PEFT task type of the adapter (CAUSAL_LM, SEQ_CLS, ...), which decides the model class and
            therefore the module paths; by default the config's `architectures`, then a causal LM.

    Raises:
        BaseModelError: No config could be found, or transformers cannot build the architecture.

    Example:
        >>> info = describe_base("./tiny-llama")
        >>> info.layers["model.layers.0.self_attn.q_proj"]
        LayerInfo(kind='linear', in_features=64, out_features=64, quantization=None)
    """
    from torch import nn
    from transformers import PretrainedConfig

    if isinstance(source, BaseModelInfo):
        return source
    if isinstance(source, LiveBase):
        return source.info
    if isinstance(source, nn.Module):
        return _describe_module(source, name=None)
    name = None
    if not isinstance(source, PretrainedConfig):
        name = os.fspath(source)
        source = _load_config(name)
    return _describe_module(_meta_model(source, task_type), name=name)


def read_weights(source: str | os.PathLike[str], names: Iterable[str]) -> dict[str, Any]:
    """Named tensors of a model's safetensors weights (one file or shards), reading only those: `source` is a model
    folder or a Hub id already in the local cache (nothing is downloaded, no pickle is opened).

    Raises:
        BaseModelError: No safetensors weights, or a name they do not hold.
    """
    from safetensors import safe_open

    folder = _model_folder(source)
    index = folder / "model.safetensors.index.json"
    names = list(names)
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        files = {name: folder / weight_map[name] for name in names if name in weight_map}
    elif (folder / "model.safetensors").is_file():
        files = dict.fromkeys(names, folder / "model.safetensors")
    else:
        raise BaseModelError("the base model has no safetensors weights (model.safetensors or its index); a "
                             "pytorch_model.bin is not unpickled", path=folder)
    out = {}
    for name in names:
        if name not in files:
            raise BaseModelError(f"the base model's weights have no tensor {name}", path=folder)
        with safe_open(files[name], framework="pt") as f:
            if name not in f.keys():
                raise BaseModelError(f"the base model's weights have no tensor {name}", path=files[name])
            out[name] = f.get_tensor(name)
    return out


def same_base_weight(adapter: Adapter, module: str, base: BaseSource, info: BaseModelInfo | None = None
                     ) -> bool | None:
    """Whether the base-layer weight that `adapter` brings for `module` (`replaces_base`) equals the base model's
    weight: its bytes, or its values in the adapter's dtype. None when `base` has no weights to compare with (a
    config, a model on the meta device, a folder without safetensors weights).
    """
    import torch

    owner = info.tied.get(module, module) if info is not None else module
    try:
        if isinstance(base, LiveBase):
            theirs = base.modules[owner].weight
        elif isinstance(base, torch.nn.Module):
            theirs = base.get_submodule(owner).weight
        elif isinstance(base, (str, os.PathLike)):
            theirs = read_weights(base, [f"{owner}.weight"])[f"{owner}.weight"]
        else:
            return None
    except (BaseModelError, AttributeError, KeyError, OSError):
        return None
    ours = adapter.base_weight(module)
    if theirs.is_meta or tuple(theirs.shape) != tuple(ours.shape):
        return None if theirs.is_meta else False
    return torch.equal(ours, theirs.detach().to(device=ours.device, dtype=ours.dtype))


def _model_folder(source: str | os.PathLike[str]) -> Path:
    path = Path(source)
    if path.is_dir():
        return path
    from transformers.utils import cached_file

    try:
        config = cached_file(os.fspath(source), "config.json", local_files_only=True)
    except (OSError, ValueError) as e:
        raise BaseModelError(f"no model folder or cached Hub model: {e}", path=os.fspath(source)) from e
    return Path(config).parent


def _load_config(source: str) -> PretrainedConfig:
    from transformers import AutoConfig

    path = Path(source)
    try:
        if path.is_file():
            if path.stat().st_size > _MAX_CONFIG_JSON_BYTES:
                raise BaseModelError("config.json is over 16 MiB; this is not a model config", path=path)
            data = json.loads(path.read_text(encoding="utf-8-sig"))
            if not isinstance(data, dict) or "model_type" not in data:
                raise BaseModelError("the file has no 'model_type': give a transformers config.json", path=path)
            return AutoConfig.for_model(data.pop("model_type"), **data)
        if path.is_dir() and not (path / "config.json").is_file():
            raise BaseModelError("the folder has no config.json: give a transformers model folder", path=path)
        return AutoConfig.from_pretrained(source, local_files_only=True, trust_remote_code=False)
    except BaseModelError:
        raise
    except (OSError, ValueError, KeyError) as e:
        where = "folder" if path.is_dir() else "Hub id"
        raise BaseModelError(
            f"cannot read a transformers config from this {where}: {e}. Give a model folder, a config.json, or a "
            "Hub id already in the local cache (nothing is downloaded)", path=source) from e


def _meta_model(config: PretrainedConfig, task_type: str | None) -> nn.Module:
    import torch
    import transformers

    candidates = []
    if task_type in TASK_AUTO_CLASSES:
        candidates.append(getattr(transformers, TASK_AUTO_CLASSES[task_type]))
    candidates += [getattr(transformers, a) for a in (config.architectures or []) if hasattr(transformers, a)]
    candidates += [transformers.AutoModelForCausalLM, transformers.AutoModel]
    errors = []
    for cls in candidates:
        try:
            with torch.device("meta"):
                return cls.from_config(config) if cls.__name__.startswith("Auto") else cls(config)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            errors.append(f"{cls.__name__}: {e}")
    raise BaseModelError(f"transformers cannot build model_type '{config.model_type}': {'; '.join(errors)}")


def _describe_module(model: nn.Module, *, name: str | None) -> BaseModelInfo:
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    layers: dict[str, LayerInfo] = {}
    unsupported: dict[str, str] = {}
    modules = []
    owners: dict[int, str] = {}  # weights by identity, to find the layers that share one (lm_head, embed_tokens)
    tied: dict[str, str] = {}
    for path, module in model.named_modules():
        modules.append(path)
        if isinstance(module, nn.Linear):
            layers[path] = LayerInfo("linear", module.in_features, module.out_features, _quantization(module))
        elif isinstance(module, Conv1D):
            rows, cols = module.weight.shape
            layers[path] = LayerInfo("conv1d", int(rows), int(cols))
        elif isinstance(module, nn.Embedding):
            layers[path] = LayerInfo("embedding", module.num_embeddings, module.embedding_dim)
        elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            unsupported[path] = "conv"
        elif isinstance(module, nn.MultiheadAttention):
            unsupported[path] = "mha"
        if path in layers and (weight := getattr(module, "weight", None)) is not None:
            tied_to = owners.setdefault(id(weight), path)
            if tied_to != path:
                tied[path] = tied_to
        for param_name, param in module._parameters.items():  # the module's own, as named_parameters(recurse=False)
            if param is not None and param.ndim == 3:  # expert parameters, which PEFT adapts (target_parameters)
                experts, first, second = (int(d) for d in param.shape)
                transposed = bool(getattr(module, "is_transposed", False))
                in_f, out_f = (first, second) if transposed else (second, first)
                key = f"{path}.{param_name}" if path else param_name
                layers[key] = LayerInfo("experts", in_f, out_f, experts=experts, transposed=transposed)
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hparams = {key: value for key in HPARAM_KEYS if isinstance(value := getattr(text, key, None), int)}
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return BaseModelInfo(
        name=name or getattr(config, "name_or_path", None) or None,
        model_type=getattr(config, "model_type", None),
        layers=layers,
        modules=frozenset(modules),
        parameters={path: tuple(tensor.shape) for path, tensor in tensors},
        unsupported=unsupported,
        tied=tied,
        hparams=hparams,
    )


def _quantization(module: nn.Module) -> str | None:
    """Recognises bitsandbytes layers by class, without importing bitsandbytes."""
    cls = type(module)
    if not cls.__module__.startswith("bitsandbytes"):
        return None
    return {"Linear8bitLt": "int8", "Linear4bit": "4bit"}.get(cls.__name__)
