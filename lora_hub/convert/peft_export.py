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
from typing import TYPE_CHECKING, Any

from ..adapter import Adapter, AdapterConfig, BaseModelRef, ModuleSpec

if TYPE_CHECKING:
    from ..basemodel import BaseSource


def to_peft(adapter: Adapter, directory: str | os.PathLike[str], *, base: BaseSource | None = None) -> Path:
    """Writes `adapter` as a PEFT folder: adapter_model.safetensors (a lora-hub file, which PEFT reads as its own)
    and adapter_config.json, so that PeftModel gives the same result. enable_lora modules are written in their
    exactly equivalent plain form. The folder is written all or nothing: an existing one keeps its old pair (and its
    other files) until the new pair replaces it in one step, so weights and config never come from different writes.

    Expert modules (PEFT's target_parameters) are named as PEFT nests them, which depends on the order the base
    model registers the parameters of one module: the file is then PEFT's own safetensors file, not a lora-hub file.

    Args:
        base: The base model (see `describe_base`), needed only to name expert parameters that share a module; by
            default the base model the adapter declares, if it can be described.

    Returns:
        The folder.

    Raises:
        ConversionError: A combination PEFT's config cannot express (DoRA on some modules only, DoRA or lora_bias
            with embeddings), or expert parameters whose order is unknown.
    """
    from ..atomicfile import atomic_folder
    from ..format import save_adapter

    directory = Path(directory)
    plain = expand_enable_lora(_with_zero_biases(adapter))
    config = peft_config(plain.config)
    experts = {m: s for m, s in plain.modules.items() if s.kind == "experts"}
    names = _expert_names(experts, plain.config, base) if experts else {}
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    with atomic_folder(directory) as staging:
        if names:
            _save_renamed(plain, names, staging / "adapter_model.safetensors")
        else:
            save_adapter(plain, staging / "adapter_model.safetensors")
        (staging / "adapter_config.json").write_text(text, encoding="utf-8")
    return directory


def _with_zero_biases(adapter: Adapter) -> Adapter:
    """lora_bias is one setting for the whole adapter in PEFT: modules without a bias get a zero one (which adds
    nothing), when some modules have one."""
    specs = adapter.modules
    if not any(s.bias for s in specs.values()) or all(s.bias for s in specs.values() if s.kind == "linear"):
        return adapter
    import torch

    modules, tensors = dict(specs), dict(adapter.tensors)
    for module, spec in specs.items():
        if spec.kind == "linear" and not spec.bias:
            modules[module] = replace(spec, bias=True)
            b = adapter.lora_B(module)
            tensors[modules[module].tensor_names(module).bias] = torch.zeros(spec.out_features, dtype=b.dtype)
    from ..format import verify_checksum

    verify_checksum(adapter)
    return adapter.derived(replace(adapter.config, modules=modules), tensors)


def _expert_names(experts: Mapping[str, ModuleSpec], config: AdapterConfig,
                  base: BaseSource | None) -> dict[str, str]:
    """Parameter-path tensor names -> PEFT's nested names. The parameter a module registers last is wrapped
    outermost (`<module>.lora_A.weight`), the one before it one level deeper (`<module>.base_layer.lora_A.weight`)."""
    from ..errors import BaseModelError, ConversionError

    by_module: dict[str, list[str]] = {}
    for path in experts:
        module, _, name = path.rpartition(".")
        by_module.setdefault(module, []).append(name)
    order: list[str] | None = None
    if any(len(names) > 1 for names in by_module.values()):
        from ..basemodel import describe_base

        source = base if base is not None else (config.base_model.name if config.base_model else None)
        try:
            order = list(describe_base(source, task_type=config.task_type).parameters) if source else None
        except BaseModelError:
            order = None
        if order is None:
            raise ConversionError("the adapter adapts several expert parameters of one module, which PEFT names by "
                                  "the order the model registers them: give the base model (base=, CLI --base)")
    out = {}
    for module, names in by_module.items():
        if order is not None and len(names) > 1:
            names = sorted(names, key=lambda n: order.index(f"{module}.{n}") if f"{module}.{n}" in order else -1)
        for depth, name in enumerate(reversed(names)):
            stem = "base_model.model." + module + ".base_layer" * depth
            spec_names = config.modules[f"{module}.{name}"].tensor_names(f"{module}.{name}")
            out[spec_names.lora_A] = f"{stem}.lora_A.weight"
            out[spec_names.lora_B] = f"{stem}.lora_B.weight"
    return out


def _save_renamed(adapter: Adapter, names: Mapping[str, str], path: Path) -> None:
    """PEFT's own safetensors file (no lora-hub metadata): the adapter's tensors, experts under PEFT's names."""
    from safetensors.torch import save

    from ..atomicfile import atomic_write
    from ..format import verify_checksum

    verify_checksum(adapter)
    tensors = {names.get(n, n): t.contiguous() for n, t in adapter.tensors.items()}
    atomic_write(path, [save(tensors, metadata={"format": "pt"})])


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
        modules[module] = plain_spec(spec)
    return adapter.derived(replace(adapter.config, modules=modules), tensors)


def plain_spec(spec: ModuleSpec) -> ModuleSpec:
    """The spec of an enable_lora module's exactly equivalent plain form (see `expand_enable_lora`): rank r*k, alpha
    scaled so that the scaling is unchanged. A plain spec is returned as it is."""
    if spec.enable_lora is None:
        return spec
    k = spec.groups
    return ModuleSpec(r=spec.r * k, alpha=spec.alpha * (math.sqrt(k) if spec.rslora else k),
                      in_features=spec.in_features, out_features=spec.out_features, rslora=spec.rslora,
                      fan_in_fan_out=spec.fan_in_fan_out)


def peft_config(config: AdapterConfig) -> dict[str, Any]:
    """PEFT's adapter_config.json for a config without enable_lora modules: the most common (r, alpha) as defaults,
    the rest as rank_pattern / alpha_pattern keyed by module paths that match exactly one module; features as PEFT's
    settings (use_dora, lora_bias, trainable_token_indices, target_parameters).

    Raises:
        ConversionError: A combination PEFT's config cannot express.
    """
    from ..errors import ConversionError

    specs = config.modules
    if any(s.enable_lora is not None for s in specs.values()):
        raise ValueError("expand enable_lora modules first (expand_enable_lora)")
    linear = [s for s in specs.values() if s.kind == "linear"]
    dora = [s.dora for s in specs.values()]
    if any(dora) and not all(s.dora for s in linear):
        raise ConversionError("DoRA on some modules only: PEFT's use_dora applies to every adapted layer, so PEFT "
                              "cannot load this adapter as it is (use lora-hub to apply it)")
    if any(dora) and any(s.kind != "linear" for s in specs.values()):
        raise ConversionError("DoRA with embedding or expert modules: PEFT's use_dora would apply DoRA to those too "
                              "(use lora-hub to apply it)")
    if any(s.bias for s in specs.values()) and any(s.kind != "linear" for s in specs.values()):
        raise ConversionError("lora_bias with embedding or expert modules: PEFT's lora_bias does not apply to them "
                              "(use lora-hub to apply it)")
    use_rslora = 2 * sum(s.rslora for s in specs.values()) > len(specs)
    alphas = {m: _alpha_under(s, use_rslora) for m, s in specs.items()}
    counts = Counter((s.r, alphas[m]) for m, s in specs.items())
    r0, alpha0 = min(counts, key=lambda pair: (-counts[pair], pair))
    keys, collide = _exact_keys(specs)
    modules = sorted(m for m, s in specs.items() if s.kind != "experts")
    parameters = sorted(m for m, s in specs.items() if s.kind == "experts")
    targets: list[str] | str = modules
    if collide:
        targets = "(" + "|".join(re.escape(m) for m in modules) + ")"
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
        "target_parameters": parameters or None,
        "modules_to_save": list(config.modules_to_save) or None,
        "trainable_token_indices": {m: list(i) for m, i in config.trainable_tokens.items()} or None,
        "fan_in_fan_out": any(s.fan_in_fan_out for s in specs.values() if s.kind == "linear"),
        "use_rslora": use_rslora,
        "use_dora": any(dora),
        "lora_bias": any(s.bias for s in specs.values()),
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
