"""Writing an Adapter as a PEFT folder (adapter_model.safetensors and adapter_config.json) that PeftModel loads with
the same result: enable_lora modules become their exactly equivalent plain form of rank r*k, ranks and alphas that
differ from the most common pair go to rank_pattern and alpha_pattern, features become PEFT's settings (use_dora,
lora_bias, trainable_token_indices, target_parameters), and expert tensors are renamed as PEFT nests them. Every other
tensor keeps its name, dtype and bytes.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..adapter import Adapter, AdapterConfig, BaseModelRef, ModuleSpec


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
