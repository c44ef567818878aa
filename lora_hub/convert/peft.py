"""PEFT LoRA adapters, both ways: reading adapter_config.json with adapter_model.safetensors (or, on opt-in, the
legacy adapter_model.bin), early-PEFT MergedLinear checkpoints included; and writing an Adapter as a PEFT folder.

Reading follows PEFT's own rules: rank_pattern and alpha_pattern keys match a module when
`re.match(rf"(.*\\.)?({key})$", module)` does, first key first; use_rslora scales by alpha / sqrt(r); non-LoRA
tensors (modules_to_save, a task head) replace the base model's. Writing is lossless: every tensor keeps its name,
dtype and bytes, and enable_lora modules become the exactly equivalent plain module of rank r*k.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import constants as C
from ..adapter import Adapter, AdapterConfig, BaseModelRef, ModuleSpec
from ..errors import (
    ConfigError,
    ConversionError,
    LoraHubError,
    MissingTensorError,
    ModuleConflictError,
    PeftConfigError,
    RankMismatchError,
    UnsupportedFeatureError,
    UntargetedModulesWarning,
)
from ..patterns import KeyPatterns, PatternBudget, fullmatch
from .layouts import Detected, detect_layout
from .loralib import module_spec
from .weights import load_weights

if TYPE_CHECKING:
    import torch

    from ..basemodel import BaseSource

TASK_MODULES_TO_SAVE = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
                        "QUESTION_ANS": ("qa_outputs",)}
"""The heads PEFT saves for these task types even when modules_to_save is empty."""
_WRAPPER_SEGMENTS = (".base_layer.", ".modules_to_save.", ".original_module.")


def from_peft(source: str | os.PathLike[str], *, base: BaseSource | None = None,
              allow_pickle: bool = False) -> Adapter:
    """Reads a PEFT LoRA adapter folder (or its weights file) into an Adapter.

    Args:
        source: The folder holding adapter_config.json, or the weights file beside it.
        base: The base model (see `describe_base`): checks every module, takes fan_in_fan_out from the layers, and
            records the base model's type and fingerprint.
        allow_pickle: Allow the legacy adapter_model.bin (loaded with weights_only=True on the CPU).

    Raises:
        PickleRefusedError: Only adapter_model.bin is present and `allow_pickle` is False.
        PeftConfigError: adapter_config.json is unreadable or contradicts the tensors.
        UnsupportedFeatureError: DoRA, embedding or convolution LoRA, trained biases, or not LoRA at all.
        ModuleConflictError: The file holds PEFT wrapper internals (a module both adapted and saved).
        BaseModelMismatchError: A module does not fit `base`.
    """
    detected = detect_layout(source)
    if detected.peft_config is None:
        raise ConversionError(f"not a PEFT adapter but {detected.description}; use lora_hub.convert_adapter",
                              path=source)
    return read_peft(detected, base=base, allow_pickle=allow_pickle)


def read_peft(detected: Detected, *, base: BaseSource | None, allow_pickle: bool) -> Adapter:
    """Reads a detected PEFT adapter (see `from_peft`)."""
    from ..basemodel import describe_base, fit_to_base

    config = detected.peft_config
    tensors = load_weights(detected.weights, detected.kind, allow_pickle=allow_pickle, header=detected.header)
    try:
        adapter = peft_state_to_adapter(config, tensors)
    except LoraHubError as e:
        e.locate(detected.weights)
        raise
    if base is not None:
        info = describe_base(base, task_type=config.get("task_type"))
        adapter = Adapter(fit_to_base(adapter.config, info), adapter.tensors, _checked=True)
    adapter.source = os.fspath(detected.weights)
    return adapter


def peft_state_to_adapter(config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> Adapter:
    """Builds an Adapter from a PEFT LoRA config dict and its state dict (keys `base_model.model.*`). Tensors still
    in their file are not read: PEFT's names are the format's, so the file's tensors become the adapter's."""
    r0, alpha0 = config.get("r", 8), config.get("lora_alpha", 8)
    if not isinstance(r0, int) or isinstance(r0, bool) or not isinstance(alpha0, (int, float)):
        raise PeftConfigError(f"r must be an integer and lora_alpha a number, got r={r0!r}, lora_alpha={alpha0!r}")
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    enable_lora = config.get("enable_lora")
    shapes = _shapes(tensors)
    pairs, others = _split_tensors(shapes, config)
    specs: dict[str, ModuleSpec] = {}
    rewritten: dict[str, torch.Tensor] = {}
    untargeted = []
    budget = PatternBudget()
    ranks = KeyPatterns(rank_pattern, what="rank_pattern", budget=budget)
    alphas = KeyPatterns(alpha_pattern, what="alpha_pattern", budget=budget)
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise MissingTensorError(f"module '{module}' has lora_{''.join(pair)} but not both lora_A and lora_B",
                                     module=module)
        a_shape, b_shape = shapes[pair["A"]], shapes[pair["B"]]
        if len(b_shape) == 3 and enable_lora is not None:
            b = _merged_linear_b(module, tensors[pair["B"]], enable_lora)
            rewritten[pair["B"]], b_shape = b, tuple(b.shape)
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise UnsupportedFeatureError(f"module '{module}' has lora_A {list(a_shape)} and lora_B {list(b_shape)}: "
                                          "convolution LoRA is not part of lora-hub format v1", module=module)
        try:
            specs[module] = module_spec(
                module, a_shape, b_shape,
                r=ranks.value(module, r0),
                alpha=alphas.value(module, alpha0),
                enable_lora=enable_lora, out_features=None,
                fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
                rslora=bool(config.get("use_rslora", False)),
            )
        except RankMismatchError as e:
            raise PeftConfigError(f"adapter_config.json contradicts the tensors: {e.message}", module=module) from e
        if not _targeted(config.get("target_modules"), module, budget):
            untargeted.append(module)
    if untargeted:
        warnings.warn(UntargetedModulesWarning(
            f"target_modules in adapter_config.json does not match {len(untargeted)} module(s) that have LoRA tensors "
            f"(first: '{untargeted[0]}'); PEFT would ignore them, lora-hub keeps them"), stacklevel=3)
    listed = set(config.get("modules_to_save") or ()) | set(TASK_MODULES_TO_SAVE.get(config.get("task_type"), ()))
    to_save = {_owner(path, listed): None for path in others}
    for owner in to_save:
        clash = next((m for m in specs if m == owner or m.startswith(owner + ".") or owner.startswith(m + ".")), None)
        if clash:
            raise ModuleConflictError(f"'{owner}' has both LoRA tensors and saved weights ({clash})", module=owner)
    base = BaseModelRef(name=config.get("base_model_name_or_path") or None, revision=config.get("revision") or None)
    try:
        adapter_config = AdapterConfig(modules=specs, modules_to_save=tuple(to_save), base_model=base,
                                       task_type=config.get("task_type") or None)
    except ConfigError as e:
        raise PeftConfigError(f"adapter_config.json describes an adapter outside the format's rules: {e.message}",
                              module=e.module, tensor=e.tensor) from e
    if rewritten:
        tensors = {**{name: tensors[name] for name in tensors if name not in rewritten}, **rewritten}
    return Adapter(adapter_config, tensors)


def _shapes(tensors: Mapping[str, torch.Tensor]) -> Mapping[str, tuple[int, ...]]:
    shapes = getattr(tensors, "shapes", None)
    return shapes if shapes is not None else {name: tuple(t.shape) for name, t in tensors.items()}


def to_peft(adapter: Adapter, directory: str | os.PathLike[str]) -> Path:
    """Writes `adapter` as a PEFT folder: adapter_model.safetensors (a lora-hub file, which PEFT reads as its own)
    and adapter_config.json. enable_lora modules are written in their exactly equivalent plain form. The folder is
    written all or nothing: an existing one keeps its old pair (and its other files) until the new pair replaces it
    in one step, so weights and config never come from different writes.

    Returns:
        The folder.
    """
    from ..atomicfile import atomic_folder
    from ..format import save_adapter

    directory = Path(directory)
    plain = expand_enable_lora(adapter)
    text = json.dumps(peft_config(plain.config), indent=2, sort_keys=True) + "\n"
    with atomic_folder(directory) as staging:
        save_adapter(plain, staging / "adapter_model.safetensors")
        (staging / "adapter_config.json").write_text(text, encoding="utf-8")
    return directory


def expand_enable_lora(adapter: Adapter) -> Adapter:
    """The adapter with every enable_lora module rewritten as a plain module of rank r*k: lora_A unchanged, lora_B
    block-diagonal over the enabled slices, alpha scaled so that the scaling is unchanged. The delta is the same."""
    merged = {m: s for m, s in adapter.modules.items() if s.enable_lora is not None}
    if not merged:
        return adapter
    from ..format import verify_checksum

    verify_checksum(adapter)  # the rewritten tensors no longer tell their file: check the bytes now
    modules, tensors = dict(adapter.modules), dict(adapter.tensors)
    for module, spec in merged.items():
        b = adapter.lora_B(module)
        k, n, r = spec.groups, spec.slice_features, spec.r
        wide = b.new_zeros(len(spec.enable_lora), n, k, r)
        enabled = [i for i, flag in enumerate(spec.enable_lora) if flag]
        for g, s in enumerate(enabled):
            wide[s, :, g, :] = b[g * n:(g + 1) * n]
        tensors[adapter.config.lora_tensor_names(module)[1]] = wide.reshape(spec.out_features, k * r)
        alpha = spec.alpha * (math.sqrt(k) if spec.rslora else k)
        modules[module] = ModuleSpec(r=r * k, alpha=alpha, in_features=spec.in_features,
                                     out_features=spec.out_features, rslora=spec.rslora,
                                     fan_in_fan_out=spec.fan_in_fan_out)
    return adapter.derived(replace(adapter.config, modules=modules), tensors)


def peft_config(config: AdapterConfig) -> dict[str, Any]:
    """PEFT's adapter_config.json for a config without enable_lora modules: the most common (r, alpha) as defaults,
    the rest as rank_pattern / alpha_pattern keyed by module paths that match exactly one module."""
    specs = config.modules
    if any(s.enable_lora is not None for s in specs.values()):
        raise ValueError("expand enable_lora modules first (expand_enable_lora)")
    use_rslora = 2 * sum(s.rslora for s in specs.values()) > len(specs)
    alphas = {m: _alpha_under(s, use_rslora) for m, s in specs.items()}
    counts = Counter((s.r, alphas[m]) for m, s in specs.items())
    r0, alpha0 = min(counts, key=lambda pair: (-counts[pair], pair))
    keys, collide = _exact_keys(specs)
    targets: list[str] | str = sorted(specs)
    if collide:
        targets = "(" + "|".join(re.escape(m) for m in sorted(specs)) + ")"
    base = config.base_model or BaseModelRef()
    return {
        "peft_type": "LORA",
        "task_type": config.task_type,
        "base_model_name_or_path": base.name,
        "revision": base.revision,
        "r": r0,
        "lora_alpha": alpha0,
        "rank_pattern": {keys[m]: s.r for m, s in specs.items() if s.r != r0},
        "alpha_pattern": {keys[m]: alphas[m] for m in specs if alphas[m] != alpha0},
        "target_modules": targets,
        "modules_to_save": list(config.modules_to_save) or None,
        "fan_in_fan_out": any(s.fan_in_fan_out for s in specs.values()),
        "use_rslora": use_rslora,
        "use_dora": False,
        "bias": "none",
        "lora_dropout": 0.0,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def _split_tensors(shapes: Mapping[str, tuple[int, ...]], config: Mapping[str, Any]):
    """Tensor names by module: module -> {"A": name, "B": name} for LoRA pairs, and module path -> name for the
    tensors of saved modules."""
    pairs: dict[str, dict[str, str]] = {}
    others: dict[str, str] = {}
    for name in shapes:
        if not name.startswith(C.TENSOR_PREFIX):
            raise PeftConfigError(f"tensor {name} does not start with '{C.TENSOR_PREFIX}': not a PEFT state dict",
                                  tensor=name)
        path = name[len(C.TENSOR_PREFIX):]
        if path.endswith(C.LORA_A_SUFFIX):
            pairs.setdefault(path[:-len(C.LORA_A_SUFFIX)], {})["A"] = name
        elif path.endswith(C.LORA_B_SUFFIX):
            pairs.setdefault(path[:-len(C.LORA_B_SUFFIX)], {})["B"] = name
        elif "lora_magnitude_vector" in path:
            raise UnsupportedFeatureError(f"{name} is a DoRA magnitude vector: DoRA is not part of lora-hub format v1",
                                          tensor=name)
        elif "lora_embedding_" in path:
            raise UnsupportedFeatureError(f"{name}: LoRA on embedding layers is not part of lora-hub format v1",
                                          tensor=name)
        elif any(segment in f".{path}." for segment in _WRAPPER_SEGMENTS):
            raise ModuleConflictError(
                f"{name} is PEFT wrapper state: the adapter was saved from a model where one module is both a LoRA "
                "target and a module to save, which PEFT itself cannot load back; retrain without listing that "
                "module in both target_modules and modules_to_save", tensor=name)
        elif ".lora_" in f".{path}":
            raise UnsupportedFeatureError(f"{name} is a LoRA tensor lora-hub does not know", tensor=name)
        elif path.endswith(".bias") and config.get("bias", "none") != "none":
            raise UnsupportedFeatureError(f"{name}: trained biases (bias='{config.get('bias')}') are not part of "
                                          "lora-hub format v1", tensor=name)
        else:
            others[path] = name
    return pairs, others


def _merged_linear_b(module: str, b: torch.Tensor, enable_lora: list[bool] | None) -> torch.Tensor:
    """Early PEFT stored MergedLinear's lora_B as a Conv1d weight (out', r, 1) with groups=2 hard-coded, which is
    the grouped product of the spec only when exactly two slices are enabled."""
    if b.ndim != 3 or enable_lora is None:
        return b
    if b.shape[2] != 1:
        raise UnsupportedFeatureError(f"module '{module}': lora_B {list(b.shape)} is not a kernel-size-1 Conv1d")
    if sum(bool(f) for f in enable_lora) != 2:
        raise UnsupportedFeatureError(
            f"module '{module}': early PEFT computed MergedLinear with groups=2, which matches the spec only when two "
            f"slices are enabled, not {sum(bool(f) for f in enable_lora)} (enable_lora={enable_lora})")
    return b[:, :, 0]


def _targeted(targets: str | list[str] | None, module: str, budget: PatternBudget) -> bool:
    """PEFT's target_modules test (a string is a full-match regex; list entries match whole trailing segments)."""
    if targets is None:
        return True
    if isinstance(targets, str):
        budget.spend(1, "target_modules")
        return fullmatch(targets, module, what="target_modules")
    budget.spend(len(targets), "target_modules")
    return module in targets or any(module.endswith("." + t) for t in targets)


def _owner(path: str, listed: set[str]) -> str:
    """The module a saved non-LoRA tensor belongs to: the longest prefix PEFT's modules_to_save names (it matches by
    suffix), else the tensor's parent module."""
    parts = path.split(".")
    for end in range(len(parts) - 1, 0, -1):
        candidate = ".".join(parts[:end])
        if any(candidate == m or candidate.endswith("." + m) for m in listed):
            return candidate
    if len(parts) < 2:
        raise PeftConfigError(f"tensor {C.TENSOR_PREFIX}{path} belongs to no module")
    return ".".join(parts[:-1])


def _alpha_under(spec: ModuleSpec, use_rslora: bool) -> int | float:
    """The alpha that gives this module its scaling under PEFT's global use_rslora."""
    if spec.rslora == use_rslora:
        alpha = spec.alpha
    else:
        alpha = spec.alpha * math.sqrt(spec.r) if spec.rslora else spec.alpha / math.sqrt(spec.r)
    return int(alpha) if float(alpha).is_integer() else float(alpha)


def _exact_keys(modules: Mapping[str, ModuleSpec]) -> tuple[dict[str, str], bool]:
    """Pattern keys that match exactly one module each under PEFT's `(.*\\.)?(key)$`: the escaped path, anchored
    with ^ only when the path is also a dot-suffix of another module's path. Also says whether any path was."""
    suffixes = {name[i + 1:] for name in modules for i, ch in enumerate(name) if ch == "."}
    keys = {m: ("^" if m in suffixes else "") + re.escape(m) for m in modules}
    return keys, bool(suffixes & set(modules))
