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
from typing import TYPE_CHECKING, Literal

from .adapter import AdapterConfig, BaseModelRef
from .errors import BaseModelError, BaseModelMismatchError, FanInFanOutCorrectedWarning

if TYPE_CHECKING:
    from torch import nn
    from transformers import PretrainedConfig

    BaseSource = str | os.PathLike[str] | PretrainedConfig | nn.Module | "BaseModelInfo"
    """What `describe_base` accepts: a model folder, config.json, cached Hub id, config, model, or a description."""

LayerKind = Literal["linear", "conv1d"]

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


@dataclass(frozen=True)
class LayerInfo:
    """One adaptable layer of a base model.

    Attributes:
        kind: "linear" for nn.Linear and its quantized subclasses; "conv1d" for transformers' Conv1D (GPT-2), whose
            weight is stored (in, out).
        quantization: "int8" or "4bit" for bitsandbytes layers, None otherwise.
    """

    kind: LayerKind
    in_features: int
    out_features: int
    quantization: str | None = None

    @property
    def fan_in_fan_out(self) -> bool:
        return self.kind == "conv1d"

    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.in_features, self.out_features) if self.fan_in_fan_out else (self.out_features, self.in_features)


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
    """Every parameter and buffer by path, with its shape (what replacement tensors must match)."""

    def fingerprint(self, modules: Iterable[str]) -> str:
        """The fingerprint of the given layers of this model (FORMAT.md, "Base model fingerprint").

        Raises:
            KeyError: A module is not an adaptable layer of this model.
        """
        return fingerprint({m: self.layers[m].weight_shape for m in modules})


def fingerprint(weight_shapes: Mapping[str, tuple[int, ...]]) -> str:
    """sha256 over the sorted lines "<module path>:<rows>x<cols>\\n" of the targeted base weights, as stored (three
    dimensions for expert parameters)."""
    text = "".join(f"{name}:{'x'.join(map(str, shape))}\n" for name, shape in sorted(weight_shapes.items()))
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def fit_to_base(config: AdapterConfig, base: BaseModelInfo) -> AdapterConfig:
    """Checks every module of `config` against the base model, and returns the config with fan_in_fan_out taken
    from each base layer's kind (warning when that corrects the source) and the base model's type and fingerprint
    recorded.

    Raises:
        BaseModelMismatchError: A module is not an adaptable layer of the base, or its features differ.
    """
    missing = [m for m in config.modules if m not in base.layers]
    if missing:
        raise BaseModelMismatchError(
            f"{len(missing)} of {len(config.modules)} adapter modules are not linear layers of the base model "
            f"{base.name or ''} (first: '{missing[0]}'); check that this is the adapter's base model and task type")
    modules, corrected = {}, []
    for name, spec in config.modules.items():
        layer = base.layers[name]
        if (spec.in_features, spec.out_features) != (layer.in_features, layer.out_features):
            raise BaseModelMismatchError(
                f"module '{name}': the adapter has in={spec.in_features}, out={spec.out_features} but the base layer "
                f"has in={layer.in_features}, out={layer.out_features}; this adapter was made for another model")
        if spec.fan_in_fan_out != layer.fan_in_fan_out:
            corrected.append(name)
        modules[name] = replace(spec, fan_in_fan_out=layer.fan_in_fan_out)
    if corrected:
        kind = "a Conv1D" if base.layers[corrected[0]].fan_in_fan_out else "an nn.Linear"
        warnings.warn(FanInFanOutCorrectedWarning(
            f"fan_in_fan_out corrected for {len(corrected)} module(s) to match the base layers (first: "
            f"'{corrected[0]}' is {kind}); PEFT makes the same correction when it loads the adapter"), stacklevel=3)
    known = config.base_model or BaseModelRef()
    ref = BaseModelRef(name=known.name or base.name, revision=known.revision or base.revision,
                       model_type=base.model_type, fingerprint=base.fingerprint(modules))
    return replace(config, modules=modules, base_model=ref)


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
    if isinstance(source, nn.Module):
        return _describe_module(source, name=None)
    name = None
    if not isinstance(source, PretrainedConfig):
        name = os.fspath(source)
        source = _load_config(name)
    return _describe_module(_meta_model(source, task_type), name=name)


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
    modules = []
    for path, module in model.named_modules():
        modules.append(path)
        if isinstance(module, nn.Linear):
            layers[path] = LayerInfo("linear", module.in_features, module.out_features, _quantization(module))
        elif isinstance(module, Conv1D):
            rows, cols = module.weight.shape
            layers[path] = LayerInfo("conv1d", int(rows), int(cols))
    config = getattr(model, "config", None)
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return BaseModelInfo(
        name=name or getattr(config, "name_or_path", None) or None,
        model_type=getattr(config, "model_type", None),
        layers=layers,
        modules=frozenset(modules),
        parameters={path: tuple(tensor.shape) for path, tensor in tensors},
    )


def _quantization(module: nn.Module) -> str | None:
    """Recognises bitsandbytes layers by class, without importing bitsandbytes."""
    cls = type(module)
    if not cls.__module__.startswith("bitsandbytes"):
        return None
    return {"Linear8bitLt": "int8", "Linear4bit": "4bit"}.get(cls.__name__)
