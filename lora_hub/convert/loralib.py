"""loralib checkpoints (`loralib.lora_state_dict`: keys `<module>.lora_A` and `<module>.lora_B`, no `.weight`, no
config), and the MergedLinear (enable_lora) geometry that early-PEFT checkpoints share.

loralib records neither alpha nor which slices of a fused projection are adapted, so the caller gives alpha, and
enable_lora is inferred only where the shapes leave one answer.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .. import constants as C
from ..adapter import Adapter, AdapterConfig, ModuleSpec
from ..errors import (
    ConfigMissingError,
    MissingTensorError,
    ParameterRequiredError,
    RankMismatchError,
    UnknownLayoutError,
)
from ..format import SafetensorsHeader
from .layouts import FileKind, classify_names, sniff
from .weights import load_weights

if TYPE_CHECKING:
    import torch

    from ..basemodel import BaseSource



def from_loralib(
    source: str | os.PathLike[str] | Mapping[str, torch.Tensor] | SafetensorsHeader,
    *,
    alpha: float | Mapping[str, float] | None,
    r: int | None = None,
    enable_lora: Sequence[bool] | Mapping[str, Sequence[bool]] | None = None,
    fan_in_fan_out: bool | None = None,
    base: BaseSource | None = None,
    allow_pickle: bool = False,
) -> Adapter:
    """Reads a loralib `lora_state_dict` (a dict, or a .safetensors/.bin/.pt file of one) into an Adapter.

    Args:
        source: The state dict or its file.
        alpha: loralib's lora_alpha (its default is 1): one number, or one per module path.
        r: The rank, checked against the tensors when given.
        enable_lora: For MergedLinear modules: one list for every merged module, or one per module path. Inferred
            when every slice is adapted (lora_A rows / r equals out_features / lora_B rows * k).
        fan_in_fan_out: True for GPT-2-style Conv1D bases; taken from `base` when given, else False.
        base: The base model (see `describe_base`): gives out_features (to infer enable_lora) and layer kinds,
            checks every module, and records the base model's type and fingerprint.
        allow_pickle: Allow .bin/.pt pickle files (loaded with weights_only=True on the CPU).

    Raises:
        ParameterRequiredError: alpha missing, or enable_lora ambiguous.
        RankMismatchError: lora_A and lora_B do not fit together.
        UnknownLayoutError: No `.lora_A`/`.lora_B` pairs in the state dict.
    """
    from ..basemodel import describe_base, fit_to_base

    info = describe_base(base) if base is not None else None
    path = None
    if isinstance(source, SafetensorsHeader):
        path = Path(source.path)
        source = load_weights(path, FileKind.SAFETENSORS, allow_pickle=allow_pickle, header=source)
    elif not isinstance(source, Mapping):
        path = Path(source)
        source = load_weights(path, sniff(path), allow_pickle=allow_pickle)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    others: dict[str, torch.Tensor] = {}
    for name, tensor in source.items():
        stem, _, kind = name.rpartition(".")
        if kind in ("lora_A", "lora_B") and stem:
            pairs.setdefault(stem, {})[kind] = tensor
        else:
            others[name] = tensor
    if not pairs:
        if classify_names(source) == "peft":
            raise ConfigMissingError("PEFT-style tensors without the adapter_config.json that gives their alpha and "
                                     "other settings: convert the folder that holds both", path=path)
        raise UnknownLayoutError("no '<module>.lora_A' / '<module>.lora_B' pairs: not a loralib state dict", path=path)
    if alpha is None:
        raise ParameterRequiredError(
            "loralib checkpoints do not record lora_alpha: pass alpha= (CLI: --alpha), the value used in training "
            "(loralib's default is 1)", path=path)
    specs, tensors = {}, {}
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            raise MissingTensorError(f"module '{module}' has {', '.join(pair)} but not both lora_A and lora_B",
                                     path=path)
        a, b = pair["lora_A"], pair["lora_B"]
        layer = info.layers.get(module) if info is not None else None
        specs[module] = module_spec(
            module, a.shape, b.shape,
            r=r,
            alpha=_for_module(alpha, module),
            enable_lora=_for_module(enable_lora, module),
            out_features=layer.out_features if layer else None,
            fan_in_fan_out=layer.fan_in_fan_out if layer else bool(fan_in_fan_out),
        )
        tensors[f"{C.TENSOR_PREFIX}{module}{C.LORA_A_SUFFIX}"] = a
        tensors[f"{C.TENSOR_PREFIX}{module}{C.LORA_B_SUFFIX}"] = b
    to_save = sorted({name.rpartition(".")[0] for name in others if "." in name})
    tensors.update({C.TENSOR_PREFIX + name: t for name, t in others.items()})
    config = AdapterConfig(modules=specs, modules_to_save=tuple(to_save))
    if info is not None:
        config = fit_to_base(config, info)
    return Adapter(config, tensors, source=os.fspath(path) if path else None)


def module_spec(
    module: str,
    a_shape: Sequence[int],
    b_shape: Sequence[int],
    *,
    r: int | None,
    alpha: float,
    enable_lora: Sequence[bool] | None,
    out_features: int | None,
    fan_in_fan_out: bool,
    rslora: bool = False,
) -> ModuleSpec:
    """The ModuleSpec of one module from its tensor shapes, plain or MergedLinear.

    MergedLinear (loralib, early PEFT): lora_A is (r*k, in) and lora_B (out/len(enable_lora)*k, r) for k enabled
    slices, so k = lora_A rows / lora_B columns.

    Raises:
        RankMismatchError: The shapes fit no rank, or contradict `r` or `enable_lora`.
        ParameterRequiredError: A MergedLinear module whose enable_lora cannot be inferred.
    """
    (a_rows, in_features), (b_rows, rank) = a_shape, b_shape
    if r is not None and r != rank:
        raise RankMismatchError(f"module '{module}': r={r} was given but lora_B has rank {rank}")
    if rank == 0 or a_rows % rank:
        raise RankMismatchError(f"module '{module}': lora_A has {a_rows} rows, not a multiple of lora_B's rank {rank}")
    groups = a_rows // rank
    if enable_lora is None and groups == 1:
        return ModuleSpec(r=rank, alpha=alpha, in_features=in_features, out_features=b_rows, rslora=rslora,
                          fan_in_fan_out=fan_in_fan_out)
    if enable_lora is None:
        slices = out_features * groups // b_rows if out_features else None
        if slices != groups or out_features * groups % b_rows:
            raise ParameterRequiredError(
                f"module '{module}' is a MergedLinear ({groups} adapted slices of rank {rank}) but which slices are "
                "adapted is not recorded: pass enable_lora (for example [True, False, True] for q and v of a fused "
                "qkv)")
        enable_lora = [True] * groups
    flags = tuple(bool(f) for f in enable_lora)
    if sum(flags) != groups:
        raise RankMismatchError(f"module '{module}': enable_lora {list(flags)} enables {sum(flags)} slices but "
                                f"lora_A has {groups} groups of rank {rank}")
    return ModuleSpec(r=rank, alpha=alpha, in_features=in_features, out_features=b_rows // groups * len(flags),
                      rslora=rslora, fan_in_fan_out=fan_in_fan_out, enable_lora=flags)


def _for_module(value, module: str):
    """A per-module value from one shared value or a mapping of module path -> value."""
    if isinstance(value, Mapping):
        if module not in value:
            raise ParameterRequiredError(f"no value given for module '{module}' (the mapping has "
                                         f"{', '.join(list(value)[:3])}...)")
        return value[module]
    return value
