"""mlx-lm's adapter folders (adapters.safetensors + adapter_config.json), both ways.

mlx-lm 0.32's load_adapters wraps the modules that `lora_parameters.keys` names (paths relative to a block, for the
last `num_layers` blocks, or full module paths) in LoRALinear / LoRAEmbedding / DoRALinear with one rank and one
scale for the file, then loads `<module>.lora_a` (in, r), `<module>.lora_b` (r, out) and DoRA's `<module>.m` (out),
refusing any other name or shape. Its forward is `W x + scale * (x @ lora_a) @ lora_b` (a row of lora_a for an
embedding), DoRA's rescales each output row to `m / ||W + scale * (lora_a @ lora_b).T||` as PEFT does.

So an adapter is written with the largest rank (smaller ones zero-padded: the update is the same), the most common
scale (other modules have the ratio folded into lora_b), and the narrowest keys that name its modules exactly.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import constants as C
from ..adapter import Adapter, AdapterConfig, BaseModelRef, ModuleSpec
from ..errors import MlxConfigError, ParameterRequiredError, UnsupportedFeatureError
from ..jsontext import is_json_int, is_json_number, read_json_object
from .runtimes import common_value, export_base, fold_factor, mlx_problems, plain_number, refuse_problems

if TYPE_CHECKING:
    import torch

    from ..basemodel import BaseModelInfo, BaseSource

MLX_WEIGHTS = "adapters.safetensors"
MLX_CONFIG = "adapter_config.json"
_BLOCK = re.compile(r"model\.layers\.(0|[1-9][0-9]{0,6})\.(.+)")


def is_mlx_config(config: Mapping[str, Any]) -> bool:
    """Whether an adapter_config.json is mlx-lm's (PEFT's has neither key)."""
    return "lora_parameters" in config or "fine_tune_type" in config


def to_mlx(adapter: Adapter, directory: str | os.PathLike[str], *, base: BaseSource | None = None) -> Path:
    """Writes `adapter` as an mlx-lm adapter folder (adapters.safetensors, adapter_config.json), so that
    mlx_lm.load(model, adapter_path=DIR) gives PeftModel's result. The folder is written all or nothing.

    Args:
        base: The base model (see `describe_base`); by default the one the adapter declares. It says whether
            embeddings are tied to the output and how many blocks there are; without one, an adapter of block
            modules of a known model type is still written (full module paths as keys).

    Raises:
        ExportError: What mlx-lm cannot run as PeftModel does, named with its code (MLX_TIED, MLX_LORA_BIAS, ...;
            spec/PROFILES.md).
    """
    import torch
    from safetensors.torch import save

    from ..atomicfile import atomic_folder, atomic_write
    from ..basemodel import same_base_weight
    from ..errors import BaseModelError
    from ..format import verify_checksum
    from .peft_export import expand_enable_lora

    try:
        info = export_base(adapter, base, "mlx-lm")
    except BaseModelError:
        if base is not None:
            raise
        info = None  # the declared model type may be enough (mlx_problems says when it is not)
    plain = expand_enable_lora(adapter)
    source = base if base is not None else (info.name if info is not None else None)
    refuse_problems(mlx_problems(plain.config, info, lambda m: same_base_weight(plain, m, source, info)
                                 if source is not None else None), "mlx-lm")
    verify_checksum(plain)
    specs = plain.modules
    rank = max(s.r for s in specs.values())
    scale = common_value(s.scaling for s in specs.values())
    tensors: dict[str, torch.Tensor] = {}
    for module, spec in specs.items():
        a, b = plain.lora_A(module), plain.lora_B(module)
        factor = fold_factor(spec.scaling, scale)
        if factor is not None:
            b = (b.double() * factor).to(torch.float32 if b.dtype in (torch.float16, torch.bfloat16) else b.dtype)
        pad = rank - spec.r
        tensors[f"{module}.lora_a"] = torch.nn.functional.pad(a.T, (0, pad)).contiguous()
        tensors[f"{module}.lora_b"] = torch.nn.functional.pad(b.T, (0, 0, 0, pad)).contiguous()
        if spec.dora:
            tensors[f"{module}.m"] = plain.magnitude(module).contiguous()
    blocks = info.hparams.get("num_hidden_layers") if info is not None else None
    num_layers, keys = _keys(list(specs), blocks)
    config = {
        "fine_tune_type": "dora" if all(s.dora for s in specs.values()) else "lora",
        "num_layers": num_layers,
        "lora_parameters": {"rank": rank, "scale": plain_number(scale), "dropout": 0.0, "keys": keys},
    }
    declared = plain.config.base_model.name if plain.config.base_model else None
    if declared or (info is not None and info.name):
        config["model"] = declared or info.name  # where mlx-lm's trainer records the base model
    with atomic_folder(directory) as staging:
        atomic_write(staging / MLX_WEIGHTS, [save(tensors, metadata={"format": "mlx"})])
        (staging / MLX_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return Path(directory)


def _keys(modules: list[str], blocks: int | None) -> tuple[int, list[str]]:
    """num_layers and keys that make mlx-lm wrap exactly `modules`: paths relative to a block when the adapter
    adapts the same layers in each of the last N blocks (what mlx-lm's own trainer writes), full module paths
    otherwise (mlx-lm matches a key against full paths too)."""
    by_block: dict[int, set[str]] = {}
    for module in modules:
        match = _BLOCK.fullmatch(module)
        if match is None:
            break
        by_block.setdefault(int(match[1]), set()).add(match[2])
    else:
        layers = sorted(by_block)
        same = len({frozenset(v) for v in by_block.values()}) == 1
        if blocks is not None and same and layers == list(range(blocks - len(layers), blocks)):
            return len(layers), sorted(next(iter(by_block.values())))
    return -1, sorted(modules)


# --- reading ---------------------------------------------------------------------------------------------------------


def read_mlx_config(path: Path) -> dict[str, Any]:
    """Reads an mlx-lm adapter_config.json and checks what load_adapters needs of it.

    Raises:
        MlxConfigError: Unreadable, or a setting missing or of the wrong type. UnsupportedFeatureError: a full
            fine-tune (fine_tune_type "full"), which is no adapter.
    """
    config = read_json_object(path, limit=C.MAX_PEFT_CONFIG_BYTES, error=MlxConfigError)
    kind = config.get("fine_tune_type", "lora")
    if kind == "full":
        raise UnsupportedFeatureError("an mlx-lm full fine-tune (fine_tune_type 'full'): its weights replace the "
                                      "model's, there is no low-rank update to carry", path=path)
    if kind not in ("lora", "dora"):
        raise MlxConfigError(f"fine_tune_type {kind!r} is none of lora, dora, full", path=path)
    params = config.get("lora_parameters")
    if not isinstance(params, dict):
        raise MlxConfigError("lora_parameters (an object with rank, scale, dropout) is missing", path=path)
    checks = (("rank", lambda v: is_json_int(v) and 1 <= v <= C.MAX_RANK, "an integer from 1 to 16384"),
              ("scale", lambda v: is_json_number(v) and math.isfinite(v) and v != 0, "a finite non-zero number"),
              ("dropout", is_json_number, "a number"))
    for key, valid, expected in checks:
        if key not in params or not valid(params[key]):
            raise MlxConfigError(f"lora_parameters.{key} must be {expected}, got {params.get(key)!r}", path=path)
    keys = params.get("keys")
    if keys is not None and not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        raise MlxConfigError("lora_parameters.keys must be a list of module paths", path=path)
    if not is_json_int(config.get("num_layers")):
        raise MlxConfigError(f"num_layers must be an integer, got {config.get('num_layers')!r}", path=path)
    return config


def from_mlx(folder: str | os.PathLike[str], *, base: BaseSource | None = None) -> Adapter:
    """Reads an mlx-lm adapter folder into an Adapter with mlx-lm's meaning.

    Each module gets the file's scale as its scaling (alpha = scale * r) and its own rank: rank components that are
    zero in both factors (the padding of `to_mlx`) are dropped, which changes nothing. Tensors that mlx-lm's
    settings would not load (a module outside `keys` and the last `num_layers` blocks) are refused as mlx-lm refuses
    them.

    Args:
        base: The base model (see `describe_base`); by default the one the config names ("model"), when it can be
            described. Needed for modules outside the blocks (embedding or linear?) and for `num_layers` other
            than -1 (which blocks are the last N?).

    Raises:
        MlxConfigError, UnsupportedFeatureError (a full fine-tune, SwitchLinear experts), ParameterRequiredError
        (no base model where one is needed), BaseModelMismatchError.
    """

    from ..basemodel import describe_base, fit_to_base
    from ..errors import BaseModelError
    from ..format import read_safetensors_header
    from .features import REFUSALS
    from .layouts import FileKind
    from .weights import load_weights

    folder = Path(folder)
    config = read_mlx_config(folder / MLX_CONFIG)
    weights = folder / MLX_WEIGHTS
    header = read_safetensors_header(weights)
    declared = config.get("model") if isinstance(config.get("model"), str) else None
    info: BaseModelInfo | None = None
    if base is not None:
        info = describe_base(base, task_type="CAUSAL_LM")
    elif declared:
        try:
            info = describe_base(declared, task_type="CAUSAL_LM")
        except BaseModelError:
            info = None
    params = config["lora_parameters"]
    rank, scale = params["rank"], float(params["scale"])
    parts: dict[str, dict[str, str]] = {}
    for name in header.tensors:
        module, _, leaf = name.rpartition(".")
        if leaf not in ("lora_a", "lora_b", "m") or not module:
            raise MlxConfigError(f"tensor '{name}' is not an adapter parameter (lora_a, lora_b, m); mlx-lm refuses "
                                 "it", path=weights, tensor=name)
        parts.setdefault(module, {})[leaf] = name
    dora = config.get("fine_tune_type") == "dora"
    _check_coverage(list(parts), config, info, weights)
    tensors_in = load_weights(weights, FileKind.SAFETENSORS, allow_pickle=False, header=header)
    specs: dict[str, ModuleSpec] = {}
    tensors: dict[str, torch.Tensor] = {}
    for module, found in sorted(parts.items()):
        if "lora_a" not in found or "lora_b" not in found or ("m" in found) != dora:
            raise MlxConfigError(f"'{module}' has {', '.join(sorted(found))}; mlx-lm's "
                                 f"{'DoRA' if dora else 'LoRA'} layers need lora_a, lora_b{', m' if dora else ''}",
                                 path=weights, module=module)
        a, b = tensors_in[found["lora_a"]], tensors_in[found["lora_b"]]
        if a.ndim == 3:
            refusal = REFUSALS["mlx_experts"]
            raise UnsupportedFeatureError(f"'{module}' uses {refusal.feature}: lora-hub does not carry it, because "
                                          f"{refusal.why}. {refusal.fix}", code=refusal.code, path=weights,
                                          module=module)
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != rank or b.shape[0] != rank:
            raise MlxConfigError(f"'{module}': lora_a {tuple(a.shape)} and lora_b {tuple(b.shape)} do not have the "
                                 f"file's rank {rank} as (in, r) and (r, out)", path=weights, module=module)
        used = _used_rank(a, b)
        a, b = a[:, :used].T.contiguous(), b[:used].T.contiguous()
        if scale < 0:
            b = -b
        kind = _kind(module, info, weights)
        spec = ModuleSpec(r=used, alpha=plain_number(abs(scale) * used), in_features=a.shape[1],
                          out_features=b.shape[0], kind=kind, dora=dora)
        problems = spec.problems()
        if problems:
            raise MlxConfigError(f"'{module}': {'; '.join(problems)}", path=weights, module=module)
        names = spec.tensor_names(module)
        specs[module] = spec
        tensors[names.lora_A], tensors[names.lora_B] = a, b
        if dora:
            m = tensors_in[found["m"]]
            if tuple(m.shape) != (spec.out_features,):
                raise MlxConfigError(f"'{module}': m has shape {tuple(m.shape)}, not ({spec.out_features},)",
                                     path=weights, module=module)
            tensors[names.magnitude] = m
    if not specs:
        raise MlxConfigError("adapters.safetensors holds no adapter tensors", path=weights)
    ref = BaseModelRef(name=declared, model_type=info.model_type if info is not None else None)
    adapter_config = AdapterConfig(modules=specs, base_model=ref, task_type="CAUSAL_LM",
                                   provenance={"converted_from": "mlx-lm"})
    if info is not None:
        adapter_config = fit_to_base(adapter_config, info)
    return Adapter(adapter_config, tensors, source=os.fspath(weights))


def _check_coverage(modules: list[str], config: Mapping[str, Any], info: BaseModelInfo | None, weights: Path) -> None:
    """mlx-lm loads a module's tensors only if its settings wrapped that module: a key relative to a block, for the
    last num_layers blocks, or a key equal to the full path."""
    keys = config["lora_parameters"].get("keys")
    num_layers = config["num_layers"]
    blocks = info.hparams.get("num_hidden_layers") if info is not None else None
    for module in modules:
        if keys is not None and module in keys:
            continue
        match = _BLOCK.fullmatch(module)
        if match is None:
            raise MlxConfigError(f"'{module}' is not named in lora_parameters.keys, so mlx-lm does not wrap it and "
                                 "refuses its tensors", path=weights, module=module)
        if keys is not None and match[2] not in keys:
            raise MlxConfigError(f"'{match[2]}' is not in lora_parameters.keys, so mlx-lm does not wrap '{module}' "
                                 "and refuses its tensors", path=weights, module=module)
        if num_layers > 0:
            if blocks is None:
                raise ParameterRequiredError(f"num_layers is {num_layers}: which blocks are the last {num_layers} "
                                             "depends on the base model; give it (base=, CLI --base)", path=weights)
            if int(match[1]) < blocks - num_layers:
                raise MlxConfigError(f"'{module}' is in block {match[1]}, outside the last {num_layers} of {blocks} "
                                     "blocks that num_layers makes mlx-lm wrap; mlx-lm refuses its tensors",
                                     path=weights, module=module)


def _used_rank(a: torch.Tensor, b: torch.Tensor) -> int:
    """The rank without trailing components that are zero in both factors (never below 1)."""
    nonzero = (a != 0).any(dim=0) | (b != 0).any(dim=1)
    used = int(nonzero.nonzero().max()) + 1 if bool(nonzero.any()) else a.shape[1]
    return used


def _kind(module: str, info: BaseModelInfo | None, weights: Path) -> str:
    if info is not None:
        layer = info.layers.get(module)
        if layer is None or layer.kind not in ("linear", "embedding"):
            from ..errors import BaseModelMismatchError

            raise BaseModelMismatchError(f"'{module}' is not a linear or embedding layer of the base model",
                                         path=weights, module=module)
        return layer.kind
    if _BLOCK.fullmatch(module):
        return "linear"  # the blocks of the model types mlx-lm shares paths with hold no embeddings
    raise ParameterRequiredError(f"'{module}' is outside the blocks: whether it is an embedding needs the base model "
                                 "(base=, CLI --base)", path=weights, module=module)
