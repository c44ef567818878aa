"""PEFT LoRA adapters, both ways: reading adapter_config.json with adapter_model.safetensors (or, on opt-in, the
legacy adapter_model.bin), early-PEFT MergedLinear checkpoints included; and writing an Adapter as a PEFT folder.

Reading follows PEFT's own rules: rank_pattern and alpha_pattern keys match a module when
`re.match(rf"(.*\\.)?({key})$", module)` does, first key first; use_rslora scales by alpha / sqrt(r); non-LoRA
tensors (modules_to_save, a task head) replace the base model's. Writing is lossless: every tensor keeps its name,
dtype and bytes, and enable_lora modules become the exactly equivalent plain module of rank r*k.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, NamedTuple

from .. import constants as C
from ..adapter import Adapter, AdapterConfig, BaseModelRef, ModuleSpec
from ..errors import (
    ConfigError,
    ConversionError,
    LoraHubError,
    MissingTensorError,
    ModuleConflictError,
    ParameterRequiredError,
    PeftConfigError,
    PeftKeyIgnoredWarning,
    RankMismatchError,
    UnsupportedFeatureError,
    UntargetedModulesWarning,
)
from ..patterns import KeyPatterns, PatternBudget, fullmatch
from ..tensors import RenamedTensors
from .features import REFUSALS, inspect_config
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


def read_peft(detected: Detected, *, base: BaseSource | None, allow_pickle: bool,
              reference: BaseSource | None = None, initial: str | os.PathLike[str] | None = None) -> Adapter:
    """Reads a detected PEFT adapter (see `from_peft`). `reference`: a base model to read what the adapter needs of
    it (the order of expert parameters, the initial factors of a base-modifying init) when `base` is not given;
    `initial`: the initial adapter of a base-modifying init (see `convert_adapter`)."""
    from ..basemodel import describe_base, fit_to_base

    config = detected.peft_config
    tensors = load_weights(detected.weights, detected.kind, allow_pickle=allow_pickle, header=detected.header)
    known = base if base is not None else reference
    info = describe_base(base, task_type=config.get("task_type")) if base is not None else None
    if info is None and reference is not None and config.get("target_parameters"):
        info = describe_base(reference, task_type=config.get("task_type"))
    try:
        adapter = peft_state_to_adapter(config, tensors,
                                        parameter_order=list(info.parameters) if info is not None else None)
        if adapter.peft_init is not None:
            from .inits import undo_init, weight_reader

            first = _factors_as_saved(initial, allow_pickle) if initial is not None else None
            adapter = undo_init(adapter, adapter.peft_init, initial=first,
                                weight=weight_reader(known) if known is not None else None)
    except LoraHubError as e:
        e.locate(detected.weights)
        raise
    if base is not None:
        adapter = adapter.derived(fit_to_base(adapter.config, info), adapter.tensors)
    adapter.source = os.fspath(detected.weights)
    return adapter


def _factors_as_saved(source: str | os.PathLike[str], allow_pickle: bool) -> Adapter:
    """A PEFT adapter's factors as they are in its file, not converted (the initial adapter of a base-modifying
    init)."""
    detected = detect_layout(source)
    if detected.peft_config is None:
        raise ConversionError(f"the initial adapter must be a PEFT adapter, not {detected.description}", path=source)
    tensors = load_weights(detected.weights, detected.kind, allow_pickle=allow_pickle, header=detected.header)
    return peft_state_to_adapter(detected.peft_config, tensors)


def peft_state_to_adapter(config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], *,
                          parameter_order: Sequence[str] | None = None) -> Adapter:
    """Builds an Adapter from a PEFT LoRA config dict and its state dict (keys `base_model.model.*`), every feature
    read for what it is (see convert/features.py). Tensors still in their file are not read: PEFT's names are the
    format's, so the file's tensors become the adapter's (expert tensors, which PEFT names by nesting depth, under
    their parameter's path).

    Args:
        parameter_order: The base model's parameter paths in the order it registers them (BaseModelInfo.parameters):
            needed to name expert parameters when PEFT nested several on one module.

    Raises:
        UnsupportedFeatureError: A feature lora-hub does not carry, with its own code; or a base-modifying init
            (PiSSA, OLoRA, ...), which `read_peft` converts given the base model or the initial adapter.
        PeftConfigError, MissingTensorError, ModuleConflictError: The config and the tensors disagree.
    """
    inspection = inspect_config(config)
    if inspection.refusal is not None:
        refusal, detail = inspection.refusal
        raise UnsupportedFeatureError(f"{refusal.feature} ({detail}): lora-hub does not carry it, because "
                                      f"{refusal.why}. {refusal.fix}", code=refusal.code)
    if inspection.ignored:
        warnings.warn(PeftKeyIgnoredWarning(
            f"adapter_config.json sets {', '.join(inspection.ignored[:5])}, which lora-hub does not know; ignored, as "
            "PeftModel ignores keys its LoraConfig does not have"), stacklevel=3)
    r0, alpha0 = config.get("r", 8), config.get("lora_alpha", 8)
    if not isinstance(r0, int) or isinstance(r0, bool) or not isinstance(alpha0, (int, float)):
        raise PeftConfigError(f"r must be an integer and lora_alpha a number, got r={r0!r}, lora_alpha={alpha0!r}")
    shapes = _shapes(tensors)
    parts = _split_tensors(shapes, config)
    budget = PatternBudget()
    ranks = KeyPatterns(config.get("rank_pattern") or {}, what="rank_pattern", budget=budget)
    alphas = KeyPatterns(config.get("alpha_pattern") or {}, what="alpha_pattern", budget=budget)
    experts = _expert_parameters(parts.modules, config, shapes, ranks, r0, parameter_order)
    renamed: dict[str, str] = {}
    rewritten: dict[str, torch.Tensor] = {}
    specs: dict[str, ModuleSpec] = {}
    untargeted = []
    for module, found in sorted(parts.modules.items()):
        path = experts.get(module, (module, None))[0]
        spec, names = _module(path, found, config, shapes, tensors, ranks.value(path, r0),
                              alphas.value(path, alpha0), experts.get(module, (None, None))[1], rewritten)
        specs[path] = spec
        for role, name in names.items():
            renamed[getattr(spec.tensor_names(path), role)] = name
        if module not in experts and not _targeted(config.get("target_modules"), module, budget):
            untargeted.append(module)
    if untargeted:
        warnings.warn(UntargetedModulesWarning(
            f"target_modules in adapter_config.json does not match {len(untargeted)} module(s) that have LoRA tensors "
            f"(first: '{untargeted[0]}'); PEFT would ignore them, lora-hub keeps them"), stacklevel=3)
    listed = set(config.get("modules_to_save") or ()) | set(TASK_MODULES_TO_SAVE.get(config.get("task_type"), ()))
    to_save = {_owner(path, listed): None for path in parts.others}
    for owner in to_save:
        clash = next((m for m in specs if m == owner or m.startswith(owner + ".") or owner.startswith(m + ".")), None)
        if clash:
            raise ModuleConflictError(f"'{owner}' has both LoRA tensors and saved weights ({clash})", module=owner)
    renamed.update({C.TENSOR_PREFIX + path: name for path, name in parts.others.items()})
    tokens = _trainable_tokens(parts.tokens, config, shapes)
    renamed.update({f"{C.TENSOR_PREFIX}{module}.token_adapter.trainable_tokens_delta": name
                    for module, name in parts.tokens.items()})
    base = BaseModelRef(name=config.get("base_model_name_or_path") or None, revision=config.get("revision") or None)
    try:
        adapter_config = AdapterConfig(modules=specs, modules_to_save=tuple(to_save), base_model=base,
                                       task_type=config.get("task_type") or None, trainable_tokens=tokens)
    except ConfigError as e:
        raise PeftConfigError(f"adapter_config.json describes an adapter outside the format's rules: {e.message}",
                              module=e.module, tensor=e.tensor) from e
    if rewritten:
        tensors = {new: rewritten.get(old, tensors[old]) for new, old in renamed.items()}
    elif any(new != old for new, old in renamed.items()):
        tensors = RenamedTensors(tensors, renamed)
    adapter = Adapter(adapter_config, tensors)
    if inspection.init is not None:
        adapter.peft_init = inspection.init
    return adapter


def _module(path: str, found: Mapping[str, str], config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]],
            tensors: Mapping[str, torch.Tensor], r: Any, alpha: Any, experts: int | None,
            rewritten: dict[str, torch.Tensor]) -> tuple[ModuleSpec, dict[str, str]]:
    """One module's spec, and its tensors by role (ModuleTensors field -> name in the file)."""
    embedding = "EA" in found or "EB" in found
    a_key, b_key = ("EA", "EB") if embedding else ("A", "B")
    if a_key not in found or b_key not in found or (embedding and ("A" in found or "B" in found)):
        have = ", ".join(sorted(_ROLE_NAMES[k] for k in found))
        raise MissingTensorError(f"module '{path}' has {have} but not both lora_A and lora_B (or both "
                                 "lora_embedding_A and lora_embedding_B)", module=path)
    a_shape, b_shape = shapes[found[a_key]], shapes[found[b_key]]
    enable_lora = config.get("enable_lora")
    if len(b_shape) == 3 and enable_lora is not None:
        b = _merged_linear_b(path, tensors[found[b_key]], enable_lora)
        rewritten[found[b_key]], b_shape = b, tuple(b.shape)
    if len(a_shape) != 2 or len(b_shape) != 2:
        refusal = REFUSALS["conv"]
        raise UnsupportedFeatureError(f"module '{path}' has lora_A {list(a_shape)} and lora_B {list(b_shape)}: "
                                      f"{refusal.feature}; lora-hub does not carry it, because {refusal.why}. "
                                      f"{refusal.fix}", code=refusal.code, module=path)
    dora = "M" in found
    if dora and embedding:
        refusal = REFUSALS["dora_non_linear"]
        raise UnsupportedFeatureError(f"module '{path}' is an embedding with a DoRA magnitude: {refusal.feature}; "
                                      f"lora-hub does not carry it, because {refusal.why}. {refusal.fix}",
                                      code=refusal.code, module=path)
    rslora = bool(config.get("use_rslora", False))
    try:
        if experts is not None:
            spec = _expert_spec(path, a_shape, b_shape, r, alpha, experts, rslora)
        else:
            spec = module_spec(path, a_shape, b_shape, r=r, alpha=alpha, enable_lora=enable_lora, out_features=None,
                               fan_in_fan_out=bool(config.get("fan_in_fan_out", False)) and not embedding,
                               rslora=rslora)
    except RankMismatchError as e:
        raise PeftConfigError(f"adapter_config.json contradicts the tensors: {e.message}", module=path) from e
    spec = replace(spec, kind="embedding" if embedding else spec.kind, bias="bias" in found, dora=dora,
                   replaces_base="base" in found)
    roles = {"lora_A": found[a_key], "lora_B": found[b_key]}
    roles.update({role: found[key] for key, role in (("bias", "bias"), ("M", "magnitude"), ("base", "base"))
                  if key in found})
    return spec, roles


def _expert_spec(path: str, a_shape: tuple[int, ...], b_shape: tuple[int, ...], r: Any, alpha: Any, experts: int,
                 rslora: bool) -> ModuleSpec:
    if a_shape[0] != r * experts or b_shape[1] != r * experts:
        raise RankMismatchError(f"module '{path}': lora_A {list(a_shape)} and lora_B {list(b_shape)} are not rank "
                                f"r={r} times {experts} experts")
    return ModuleSpec(r=r, alpha=alpha, in_features=a_shape[1], out_features=b_shape[0], rslora=rslora,
                      kind="experts", experts=experts)


def _shapes(tensors: Mapping[str, torch.Tensor]) -> Mapping[str, tuple[int, ...]]:
    shapes = getattr(tensors, "shapes", None)
    return shapes if shapes is not None else {name: tuple(t.shape) for name, t in tensors.items()}


_ROLE_NAMES = {"A": "lora_A", "B": "lora_B", "EA": "lora_embedding_A", "EB": "lora_embedding_B", "bias": "lora_B.bias",
               "M": "lora_magnitude_vector", "base": "base_layer.weight"}
_SUFFIXES = ((C.LORA_A_SUFFIX, "A"), (C.LORA_B_SUFFIX, "B"), (".lora_B.bias", "bias"),
             (".lora_embedding_A", "EA"), (".lora_embedding_B", "EB"), (".lora_magnitude_vector", "M"),
             (".lora_magnitude_vector.weight", "M"))
_TOKENS_SUFFIX = ".token_adapter.trainable_tokens_delta"
_MHA_OUT_PROJ = ".base_layer.out_proj"


class _Parts(NamedTuple):
    modules: dict[str, dict[str, str]]
    """PEFT module path -> role ("A", "B", "EA", "EB", "bias", "M", "base") -> tensor name."""
    others: dict[str, str]
    """Path -> tensor name, for the tensors of saved modules."""
    tokens: dict[str, str]
    """Embedding module path -> the tensor name of its trainable-token rows."""


def _split_tensors(shapes: Mapping[str, tuple[int, ...]], config: Mapping[str, Any]) -> _Parts:
    """Sorts a PEFT state dict's tensors by what they are (see `_Parts`)."""
    modules: dict[str, dict[str, str]] = {}
    others: dict[str, str] = {}
    tokens: dict[str, str] = {}
    base_weights: dict[str, str] = {}
    for name in shapes:
        if not name.startswith(C.TENSOR_PREFIX):
            raise PeftConfigError(f"tensor {name} does not start with '{C.TENSOR_PREFIX}': not a PEFT state dict",
                                  tensor=name)
        path = name[len(C.TENSOR_PREFIX):]
        role = next(((path[:-len(suffix)], key) for suffix, key in _SUFFIXES if path.endswith(suffix)), None)
        if role is not None:
            module, key = role
            if key in modules.setdefault(module, {}):
                raise PeftConfigError(f"module '{module}' has two {_ROLE_NAMES[key]} tensors", tensor=name)
            modules[module][key] = name
        elif path.endswith(_TOKENS_SUFFIX):
            tokens[path[:-len(_TOKENS_SUFFIX)]] = name
        elif path.endswith(".base_layer.weight") and ".lora_" not in path:
            base_weights[path[:-len(".base_layer.weight")]] = name
        elif any(segment in f".{path}." for segment in _WRAPPER_SEGMENTS):
            raise ModuleConflictError(
                f"{name} is PEFT wrapper state: the adapter was saved from a model where one module is both a LoRA "
                "target and a module to save, which PEFT itself cannot load back; retrain without listing that "
                "module in both target_modules and modules_to_save", tensor=name)
        elif ".lora_" in f".{path}":
            refusal = REFUSALS["unknown"]
            raise UnsupportedFeatureError(f"{name} is a LoRA tensor of a kind lora-hub does not know ({refusal.why})"
                                          f". {refusal.fix}", code=refusal.code, tensor=name)
        else:
            others[path] = name
    for module in modules:
        if module.endswith(_MHA_OUT_PROJ):  # PEFT's MultiheadAttention wrapper keeps out_proj's LoRA inside it
            refusal, owner = REFUSALS["mha"], module[:-len(_MHA_OUT_PROJ)]
            raise UnsupportedFeatureError(f"module '{owner}' is {refusal.feature} (its out_proj's LoRA is saved as "
                                          f"'{module}'): lora-hub does not carry it, because {refusal.why}. "
                                          f"{refusal.fix}", code=refusal.code, module=owner)
    for module, name in base_weights.items():
        if module not in modules:  # a base_layer weight beside no LoRA module: wrapper state, not an embedding
            raise ModuleConflictError(f"{name} is PEFT wrapper state of a module without LoRA tensors; retrain "
                                      "without listing that module in both target_modules and modules_to_save",
                                      tensor=name)
        modules[module]["base"] = name
    return _Parts(modules, others, tokens)


def _expert_parameters(modules: Mapping[str, Mapping[str, str]], config: Mapping[str, Any],
                       shapes: Mapping[str, tuple[int, ...]], ranks: KeyPatterns, r0: Any,
                       parameter_order: Sequence[str] | None) -> dict[str, tuple[str, int]]:
    """PEFT module path -> (parameter path, number of experts) for the LoRA pairs that adapt parameters
    (target_parameters). PEFT nests one wrapper per parameter of a module, the parameter registered last outermost:
    `<module>.lora_A` is the last of the module's targeted parameters, `<module>.base_layer.lora_A` the one before,
    and so on. The config's list does not keep that order, so with several parameters on one module the base
    model's order is needed.

    Raises:
        ParameterRequiredError: Several parameters of one module, and no `parameter_order`.
    """
    targets = config.get("target_parameters") or []
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise PeftConfigError(f"target_parameters must be a list of parameter names, got {targets!r:.80}")
    out: dict[str, tuple[str, int]] = {}
    if not targets:
        return out
    for module in modules:
        depth = 0
        owner = module
        while owner.endswith(".base_layer"):
            owner, depth = owner[:-len(".base_layer")], depth + 1
        params = list(dict.fromkeys(
            t.rsplit(".", 1)[1] for t in targets
            if "." in t and (owner == t.rsplit(".", 1)[0] or owner.endswith("." + t.rsplit(".", 1)[0]))))
        if len(params) > 1:
            if parameter_order is None:
                raise ParameterRequiredError(
                    f"'{owner}' has {len(params)} adapted parameters ({', '.join(params)}), which PEFT names by the "
                    "order the base model registers them: give the base model (base=, CLI --base)", module=module)
            rank = {path: i for i, path in enumerate(parameter_order)}
            params.sort(key=lambda p: rank.get(f"{owner}.{p}", len(rank)))
        if not params:
            if depth:
                raise PeftConfigError(f"'{module}' nests LoRA wrappers, but target_parameters names no parameter of "
                                      f"'{owner}'", module=module)
            continue
        if depth >= len(params):
            raise PeftConfigError(f"'{module}' is nested {depth} deep, but target_parameters names only "
                                  f"{len(params)} parameter(s) of '{owner}'", module=module)
        path = f"{owner}.{params[len(params) - 1 - depth]}"
        found = modules[module]
        r = ranks.value(path, r0)
        rows = shapes[found["A"]][0] if "A" in found and shapes[found["A"]] else 0
        if not isinstance(r, int) or r < 1 or rows % r:
            raise PeftConfigError(f"'{path}': lora_A has {rows} rows, not a multiple of r={r}", module=path)
        if rows // r == 1:
            refusal = REFUSALS["parameter_2d"]
            raise UnsupportedFeatureError(f"'{path}' is {refusal.feature}: lora-hub does not carry it, because "
                                          f"{refusal.why}. {refusal.fix}", code=refusal.code, module=path)
        out[module] = (path, rows // r)
    return out


def _trainable_tokens(found: Mapping[str, str], config: Mapping[str, Any],
                      shapes: Mapping[str, tuple[int, ...]]) -> dict[str, list[int]]:
    """Embedding module path -> token indices, from trainable_token_indices (a list for the input embedding, or
    {module name: list}) and the modules whose rows the file holds."""
    indices = config.get("trainable_token_indices")
    if not found:
        if indices:
            raise PeftConfigError("trainable_token_indices is set but the file holds no trainable_tokens_delta")
        return {}
    out = {}
    for module, name in found.items():
        if isinstance(indices, list):
            chosen = indices
        elif isinstance(indices, dict):
            keys = [k for k in indices if module == k or module.endswith("." + k)]
            if len(keys) != 1:
                raise PeftConfigError(f"trainable_token_indices does not name '{module}' (keys: "
                                      f"{', '.join(map(str, indices))})", module=module)
            chosen = indices[keys[0]]
        else:
            raise PeftConfigError(f"the file holds {name} but trainable_token_indices is {indices!r:.80}",
                                  tensor=name)
        if not isinstance(chosen, list) or shapes[name][:1] != (len(chosen),):
            raise PeftConfigError(f"{name} has shape {list(shapes[name])}, which does not fit the "
                                  f"{len(chosen) if isinstance(chosen, list) else '?'} token indices of "
                                  "trainable_token_indices", tensor=name)
        out[module] = chosen
    return out


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
