"""The in-memory model of one adapter file: `AdapterConfig` (with one `ModuleSpec` per module), `Adapter`, and
`delta_weight`, the one function that turns a module's tensors into the update it makes to its base weight.

Importing this module does not import torch; the functions that touch tensors import it when they run.

    lora_A (r*k, in) ──┐
                       ├─> delta (out, in) = scaling * B @ A   (per enabled slice when enable_lora is set)
    lora_B (out', r) ──┘        └─> transposed to (in, out) when fan_in_fan_out (GPT-2 Conv1D)
"""

from __future__ import annotations

import functools
import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from itertools import chain, repeat
from operator import itemgetter
from typing import TYPE_CHECKING, Any, NamedTuple

from . import constants as C
from .errors import (
    ConfigError,
    MissingTensorError,
    RankMismatchError,
    ShapeMismatchError,
    TensorDtypeError,
    UnexpectedTensorError,
)
from .jsontext import (
    canonical_json,
    is_json_int,
    is_json_number,
    members_in_text,
    quick_dumps,
    quick_read,
    strict_loads,
    walk,
)

if TYPE_CHECKING:
    import torch

_MODULE_PATH = re.compile(r"[A-Za-z0-9_\-]+(?:\.[A-Za-z0-9_\-]+)*")
_PATH_CHARACTERS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"
"""What a module path's segments are made of (as _MODULE_PATH says)."""
KINDS = ("linear", "embedding", "experts")
"""The kinds of module (FORMAT.md section 8)."""
FEATURES: dict[str, str] = {
    "embedding": "LoRA on embedding layers (lora_embedding_A, lora_embedding_B)",
    "experts": "LoRA on the 3-D expert parameters of mixture-of-experts blocks (PEFT's target_parameters)",
    "lora_bias": "a bias on lora_B (PEFT's lora_bias)",
    "dora": "DoRA: weight-decomposed LoRA with a magnitude per output row (PEFT's use_dora)",
    "base_weights": "base-layer weights that the adapter replaces (the embedding matrices PEFT saves)",
    "trainable_tokens": "replacement rows of an embedding for some tokens (PEFT's trainable_token_indices)",
}
"""The format features a file may need (FORMAT.md section 4): a reader refuses a file that lists one it does not
know, by name."""
_SHA256 = re.compile(r"[0-9a-f]{64}")


_RESERVED_SEGMENTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector",
                      "base_layer", "token_adapter")
_RESERVED_PREFIXES = ("lora_", "base_layer", "token_adapter")
"""What every reserved segment starts with: paths without them need no closer look."""
_NEWLINE_TO_DOT = bytes.maketrans(b"\n", b".")


class ModuleTensors(NamedTuple):
    """The tensor names of one module (None for what it does not have)."""

    lora_A: str
    lora_B: str
    bias: str | None
    magnitude: str | None
    base: str | None


def _module_names_valid(names: list[str]) -> bool:
    """Whether `check_module_name` finds nothing wrong with any of `names` (strings), checked on them all at once:
    the joined paths hold only path characters and separators, no empty segment, no reserved segment."""
    if not names:
        return True
    joined = "\n".join(names)
    if not joined.isascii() or max(map(len, names)) > C.MAX_NAME_BYTES or joined.count("\n") != len(names) - 1:
        return False
    segments = joined.encode("ascii").translate(_NEWLINE_TO_DOT)  # the segments of all paths, between dots
    if not segments or segments.translate(None, _PATH_CHARACTERS + b".") or segments.startswith(b".") or \
            segments.endswith(b".") or b".." in segments:  # an empty segment
        return False
    if not any(map(joined.__contains__, _RESERVED_PREFIXES)):
        return True
    dotted = "." + joined.replace(".", "..").replace("\n", ".\n.") + "."  # every segment as .segment.
    return not any(f".{reserved}." in dotted for reserved in _RESERVED_SEGMENTS)


def _distinct(specs: Iterable[object]) -> list:
    """The distinct objects of `specs` by identity, in order (a config's modules share specs)."""
    return list(dict(zip(map(id, specs), specs, strict=True)).values())


def check_module_name(name: object) -> str | None:
    """Returns what is wrong with a module path, or None when it is valid (FORMAT.md, "Module paths")."""
    if not isinstance(name, str) or not name:
        return "a module path must be a non-empty string"
    if len(name) > C.MAX_NAME_BYTES:  # the pattern admits ASCII only, so characters are bytes
        return f"a module path must be at most {C.MAX_NAME_BYTES} bytes"
    if not _MODULE_PATH.fullmatch(name):
        return "each dot-separated segment must be non-empty and use only A-Z, a-z, 0-9, '_' and '-'"
    dotted = f".{name}."
    for reserved in _RESERVED_SEGMENTS:
        if f".{reserved}." in dotted:
            return f"'{reserved}' is reserved for tensor names and cannot be a module path segment"
    return None


@dataclass(frozen=True)
class ModuleSpec:
    """One adapted module: its rank, alpha and the shape of the base layer it adapts.

    Attributes:
        r: Rank of each LoRA update (per enabled slice when `enable_lora` is set).
        alpha: The LoRA alpha; the update is scaled by alpha / r, or alpha / sqrt(r) with `rslora`.
        in_features: Input features of the base layer.
        out_features: Output features of the base layer (all slices, enabled or not).
        rslora: Rank-stabilised scaling, alpha / sqrt(r).
        fan_in_fan_out: The base layer stores its weight as (in, out), like GPT-2's Conv1D.
        enable_lora: For fused projections (loralib MergedLinear): which of the equal output slices are adapted.
        kind: What the module is (FORMAT.md section 8): "linear" (nn.Linear, Conv1D, quantized linear layers),
            "embedding" (nn.Embedding: in_features is the vocabulary, out_features the embedding width), or
            "experts" (a 3-D parameter of a mixture-of-experts block, one update per expert; the module path is the
            parameter's path).
        experts: For kind "experts": the number of experts.
        bias: lora_B has a bias (PEFT's lora_bias), tensor `<M>.lora_B.bias`.
        dora: A DoRA module: a magnitude per output row, tensor `<M>.lora_magnitude_vector`.
        replaces_base: The adapter brings its own base-layer weight, tensor `<M>.base_layer.weight` (the embedding
            matrices PEFT saves beside embedding and lm_head LoRA, resized vocabularies included).
    """

    r: int
    alpha: float
    in_features: int
    out_features: int
    rslora: bool = False
    fan_in_fan_out: bool = False
    enable_lora: tuple[bool, ...] | None = None
    kind: str = "linear"
    experts: int | None = None
    bias: bool = False
    dora: bool = False
    replaces_base: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    @property
    def groups(self) -> int:
        """Number of adapted output slices: 1 for a plain module."""
        return 1 if self.enable_lora is None else sum(self.enable_lora)

    @property
    def slice_features(self) -> int:
        """Output features of one slice: out_features for a plain module."""
        return self.out_features if self.enable_lora is None else self.out_features // len(self.enable_lora)

    @property
    def a_shape(self) -> tuple[int, int]:
        return (self.r * self.groups * (self.experts or 1), self.in_features)

    @property
    def b_shape(self) -> tuple[int, int]:
        return (self.slice_features * self.groups, self.r * (self.experts or 1))

    @property
    def delta_shape(self) -> tuple[int, ...]:
        """Shape of the delta as it adds to the base weight (its layout as stored): (in, out) when fan_in_fan_out
        and for embeddings, else (out, in); experts have one such matrix per expert in front."""
        transposed = self.fan_in_fan_out or self.kind == "embedding"
        shape = (self.in_features, self.out_features) if transposed else (self.out_features, self.in_features)
        return (self.experts, *shape) if self.kind == "experts" else shape

    @property
    def features(self) -> frozenset[str]:
        """The format features this module needs (FORMAT.md section 4): none for a plain linear module."""
        if self.kind == "linear" and not (self.bias or self.dora or self.replaces_base):
            return frozenset()
        found = {self.kind} if self.kind != "linear" else set()
        for flag, name in ((self.bias, "lora_bias"), (self.dora, "dora"), (self.replaces_base, "base_weights")):
            if flag:
                found.add(name)
        return frozenset(found)

    def tensor_names(self, module: str) -> ModuleTensors:
        """The names of the module's tensors in a file (PEFT's names, FORMAT.md section 5)."""
        stem = C.TENSOR_PREFIX + module
        embedding = self.kind == "embedding"
        return ModuleTensors(
            f"{stem}.lora_embedding_A" if embedding else stem + C.LORA_A_SUFFIX,
            f"{stem}.lora_embedding_B" if embedding else stem + C.LORA_B_SUFFIX,
            f"{stem}.lora_B.bias" if self.bias else None,
            f"{stem}.lora_magnitude_vector" if self.dora else None,
            f"{stem}.base_layer.weight" if self.replaces_base else None,
        )

    @property
    def base_shape(self) -> tuple[int, int]:
        """The shape of the base-layer weight as stored (what `replaces_base` tensors have)."""
        return self.delta_shape

    def problems(self) -> list[str]:
        """What is wrong with this spec, as sentences; empty when it is valid."""
        if (type(self.r) is int and 1 <= self.r <= C.MAX_RANK and type(self.in_features) is int
                and type(self.out_features) is int and self.in_features >= 1 and self.out_features >= 1
                and type(self.alpha) in (int, float) and 0 < self.alpha <= C.MAX_SCALING
                and type(self.rslora) is bool and type(self.fan_in_fan_out) is bool and self.enable_lora is None
                and self.kind == "linear" and self.experts is None and self.bias is False and self.dora is False
                and self.replaces_base is False):
            return []  # the common case, checked in one expression (alpha <= MAX_SCALING bounds the scaling)
        found = []
        for key in ("r", "in_features", "out_features"):
            value = getattr(self, key)
            if not is_json_int(value) or value < 1:
                found.append(f"{key} must be a positive integer, got {value!r}")
        if is_json_int(self.r) and self.r > C.MAX_RANK:
            found.append(f"r={self.r} exceeds the limit of {C.MAX_RANK}")
        if not is_json_number(self.alpha) or not math.isfinite(self.alpha) or self.alpha <= 0:
            found.append(f"alpha must be a finite number greater than 0, got {self.alpha!r}")
        elif is_json_int(self.r) and 1 <= self.r <= C.MAX_RANK and isinstance(self.rslora, bool) and \
                self.scaling > C.MAX_SCALING:
            found.append(f"the scaling alpha/{'sqrt(r)' if self.rslora else 'r'} = {self.scaling:.4g} exceeds the "
                         f"limit of {C.MAX_SCALING:g} (alpha={self.alpha!r}, r={self.r})")
        for key in ("rslora", "fan_in_fan_out"):
            if not isinstance(getattr(self, key), bool):
                found.append(f"{key} must be true or false, got {getattr(self, key)!r}")
        if self.enable_lora is not None:
            flags = self.enable_lora
            if not isinstance(flags, tuple) or not flags or not all(isinstance(f, bool) for f in flags):
                found.append(f"enable_lora must be a non-empty list of booleans or null, got {flags!r}")
            elif not any(flags):
                found.append("enable_lora must enable at least one slice")
            elif is_json_int(self.out_features) and self.out_features % len(flags):
                found.append(f"out_features={self.out_features} is not divisible by len(enable_lora)={len(flags)}")
        found += self._kind_problems()
        return found

    def _kind_problems(self) -> list[str]:
        """The rules of kinds and features (FORMAT.md section 6): which combinations the format defines."""
        found = []
        for key in ("bias", "dora", "replaces_base"):
            if not isinstance(getattr(self, key), bool):
                found.append(f"{key} must be true or false, got {getattr(self, key)!r}")
        if self.kind not in KINDS:
            return found + [f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}"]
        if self.kind == "experts":
            if not is_json_int(self.experts) or not 1 <= self.experts <= C.MAX_EXPERTS:
                found.append(f"experts must be an integer from 1 to {C.MAX_EXPERTS} for kind experts, got "
                             f"{self.experts!r}")
        elif self.experts is not None:
            found.append(f"experts is only for kind experts, not {self.kind}")
        special = [k for k in ("bias", "dora") if getattr(self, k) is True]
        if self.kind != "linear" and special:
            found.append(f"{' and '.join(special)} are defined for linear modules only, not {self.kind}")
        if self.kind == "experts" and self.replaces_base is True:
            found.append("replaces_base is not defined for kind experts")
        if self.kind == "embedding" and self.fan_in_fan_out is True:
            found.append("fan_in_fan_out is not used by embeddings (their weight is (vocabulary, width)): leave it "
                         "false")
        if self.enable_lora is not None and (self.kind != "linear" or special or self.replaces_base is True):
            found.append("enable_lora is defined for plain linear modules only")
        if self.bias is True and self.dora is True:
            found.append("bias and dora together are not defined by the format")
        return found

    def to_dict(self) -> dict[str, Any]:
        """The module entry: the seven keys of version 1 always, the keys of features only when they are used (so a
        plain module's entry, and a version-1 file, keep their bytes)."""
        out = {
            "r": self.r,
            "alpha": _canonical_number(self.alpha),
            "rslora": self.rslora,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "fan_in_fan_out": self.fan_in_fan_out,
            "enable_lora": list(self.enable_lora) if self.enable_lora is not None else None,
        }
        if self.kind != "linear":
            out["kind"] = self.kind
        if self.experts is not None:
            out["experts"] = self.experts
        for key in ("bias", "dora", "replaces_base"):
            if getattr(self, key):
                out[key] = True
        return out

    @classmethod
    def from_dict(cls, data: object, *, module: str) -> ModuleSpec:
        if not isinstance(data, dict):
            raise ConfigError(f"module '{module}': the entry must be a JSON object, got {_json_type(data)}",
                              module=module)
        flags = data.get("enable_lora")
        try:
            return cls(  # checked where it is placed in an AdapterConfig, which names the module
                data["r"], data["alpha"], data["in_features"], data["out_features"], data.get("rslora", False),
                data.get("fan_in_fan_out", False), tuple(flags) if isinstance(flags, list) else flags,
                data.get("kind", "linear"), data.get("experts"), data.get("bias", False), data.get("dora", False),
                data.get("replaces_base", False))
        except KeyError:
            missing = [k for k in ("r", "alpha", "in_features", "out_features") if k not in data]
            raise ConfigError(f"module '{module}': required key(s) {', '.join(missing)} missing",
                              module=module) from None


@dataclass(frozen=True)
class BaseModelRef:
    """What the adapter says about the base model it was made for. Every field is optional."""

    name: str | None = None
    revision: str | None = None
    model_type: str | None = None
    fingerprint: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        return {"name": self.name, "revision": self.revision, "model_type": self.model_type,
                "fingerprint": self.fingerprint}


@dataclass(frozen=True)
class AdapterConfig:
    """The `lora_hub.config` document: every module with its spec, the modules to save, the base model, and the
    optional descriptive fields. Construction validates it and raises `ConfigError` naming the first problem.
    """

    modules: Mapping[str, ModuleSpec]
    modules_to_save: tuple[str, ...] = ()
    base_model: BaseModelRef | None = None
    task_type: str | None = None
    name: str | None = None
    description: str | None = None
    license: str | None = None
    task: str | None = None
    tags: tuple[str, ...] = ()
    tensors_sha256: str | None = None
    provenance: Mapping[str, Any] | None = None
    trainable_tokens: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    """Embedding module path -> token indices whose rows the adapter replaces (PEFT's trainable_token_indices);
    tensor `<M>.token_adapter.trainable_tokens_delta` holds the rows, in the order of the indices."""

    def __post_init__(self) -> None:
        for key in ("modules_to_save", "tags"):
            values = getattr(self, key)
            if isinstance(values, (str, bytes)) or not all(isinstance(v, str) for v in values):
                shown = values if isinstance(values, (str, bytes)) else list(values)
                raise ConfigError(f"{key} must be a list of strings, got {_shown(shown)}")
        if not all(map(isinstance, self.modules, repeat(str))):
            raise ConfigError("module paths must be strings")
        names = list(self.modules)
        object.__setattr__(self, "modules", dict(self.modules) if names == sorted(names) else
                           dict(sorted(self.modules.items())))  # a copy: the caller's dict may change
        object.__setattr__(self, "modules_to_save", tuple(sorted(set(self.modules_to_save))))
        object.__setattr__(self, "tags", tuple(self.tags))
        if not self.modules:
            raise ConfigError("the adapter has no modules: at least one LoRA module is required")
        if len(self.modules) > C.MAX_MODULES:
            raise ConfigError(f"{len(self.modules):,} modules exceed the limit of {C.MAX_MODULES:,}")
        distinct = self.distinct_specs
        if not _module_names_valid(list(self.modules)) or not all(
                isinstance(spec, ModuleSpec) and not spec.problems() for spec in distinct):
            self._raise_module_problem()
        for name in self.modules_to_save:
            problem = check_module_name(name)
            if problem:
                raise ConfigError(f"modules_to_save entry {name!r}: {problem}", module=name)
            clash = _overlapping_module(name, self.modules)
            if clash:
                raise ConfigError(
                    f"modules_to_save entry '{name}' overlaps the LoRA module '{clash}': a module is either adapted "
                    "or replaced, and neither may contain the other"
                )
        if self.tensors_sha256 is not None and not (
            isinstance(self.tensors_sha256, str) and _SHA256.fullmatch(self.tensors_sha256)
        ):
            raise ConfigError(f"tensors_sha256 must be 64 lowercase hex digits, got {self.tensors_sha256!r}")
        for key in ("task_type", "name", "description", "license", "task"):
            if getattr(self, key) is not None and not isinstance(getattr(self, key), str):
                raise ConfigError(f"{key} must be a string or null, got {getattr(self, key)!r}")
        if self.provenance is not None and not isinstance(self.provenance, Mapping):
            raise ConfigError(f"provenance must be an object, got {_json_type(self.provenance)}")
        self._check_trainable_tokens()

    def _raise_module_problem(self) -> None:
        """Raises the ConfigError of the first module (in order) whose path or spec is invalid."""
        for name, spec in self.modules.items():
            problem = check_module_name(name)
            if problem:
                raise ConfigError(f"module path {name!r}: {problem}", module=name)
            if not isinstance(spec, ModuleSpec):
                raise ConfigError(f"module '{name}': expected a ModuleSpec, got {type(spec).__name__}", module=name)
            problems = spec.problems()
            if problems:
                raise ConfigError(f"module '{name}': {'; '.join(problems)}", module=name)

    def _check_trainable_tokens(self) -> None:
        tokens = self.trainable_tokens
        if not isinstance(tokens, Mapping):
            raise ConfigError(f"trainable_tokens must be an object of module path -> token indices, got "
                              f"{_json_type(tokens)}")
        checked = {}
        for name, indices in sorted(tokens.items()):
            problem = check_module_name(name)
            if problem:
                raise ConfigError(f"trainable_tokens entry {name!r}: {problem}", module=name)
            if isinstance(indices, (str, bytes)) or not isinstance(indices, (list, tuple)) or not indices or \
                    len(indices) > C.MAX_TOKENS or not all(is_json_int(i) and 0 <= i <= C.MAX_JSON_INT
                                                           for i in indices):
                raise ConfigError(f"trainable_tokens entry '{name}' must be a non-empty list of at most "
                                  f"{C.MAX_TOKENS:,} token indices (integers >= 0), got {_shown(indices)}",
                                  module=name)
            if len(set(indices)) != len(indices):
                raise ConfigError(f"trainable_tokens entry '{name}' lists a token twice", module=name)
            clash = _overlapping_module(name, self.modules) or (name if name in self.modules_to_save else None)
            if clash:
                raise ConfigError(f"trainable_tokens entry '{name}' overlaps '{clash}': a module's tokens are "
                                  "replaced, or the module is adapted or saved, not both", module=name)
            checked[name] = tuple(indices)
        object.__setattr__(self, "trainable_tokens", checked)

    @functools.cached_property  # a frozen config: computed once
    def distinct_specs(self) -> tuple[ModuleSpec, ...]:
        """The module specs, each once (by identity: modules of one shape share one ModuleSpec when read)."""
        return tuple(_distinct(self.modules.values()))

    @functools.cached_property  # a frozen config: computed once (loading asks for it per file)
    def features(self) -> tuple[str, ...]:
        """The format features this adapter needs (FORMAT.md section 4), sorted: empty for a version-1 file."""
        found: set[str] = set()
        for spec in self.distinct_specs:
            found |= spec.features
        if self.trainable_tokens:
            found.add("trainable_tokens")
        return tuple(sorted(found))

    def delta_shapes(self) -> dict[str, tuple[int, ...]]:
        """Module path -> the shape of its delta as it adds to the base weight (`ModuleSpec.delta_shape`): the
        weight shapes that `base_model.fingerprint` is computed from."""
        specs = self.modules.values()
        shape_of = {id(spec): spec.delta_shape for spec in self.distinct_specs}
        return dict(zip(self.modules, map(shape_of.__getitem__, map(id, specs)), strict=True))

    def owned_tensor_names(self) -> set[str]:
        """The names of every tensor that modules and trainable tokens own (all but modules_to_save's)."""
        names = {name for module, spec in self.modules.items() for name in spec.tensor_names(module) if name}
        return names | {self.token_tensor_name(module) for module in self.trainable_tokens}

    def token_tensor_name(self, module: str) -> str:
        """The name of the tensor that holds a trainable-tokens module's rows."""
        return f"{C.TENSOR_PREFIX}{module}.token_adapter.trainable_tokens_delta"

    def lora_tensor_names(self, module: str) -> tuple[str, str]:
        """The names of a module's lora_A and lora_B tensors (lora_embedding_A/B for embeddings)."""
        names = self.modules[module].tensor_names(module)
        return names.lora_A, names.lora_B

    def replacement_owner(self, tensor_name: str) -> str | None:
        """The module to save that a non-LoRA tensor belongs to (the longest listed prefix), or None."""
        if not tensor_name.startswith(C.TENSOR_PREFIX):
            return None
        path = tensor_name[len(C.TENSOR_PREFIX):]
        parts = path.split(".")
        for end in range(len(parts) - 1, 0, -1):
            candidate = ".".join(parts[:end])
            if candidate in self.modules_to_save:
                return candidate
        return None

    def to_dict(self) -> dict[str, Any]:
        """The config document; `provenance` and `trainable_tokens` appear only when the adapter has them (FORMAT.md,
        section 6)."""
        out = {
            "base_model": self.base_model.to_dict() if self.base_model else None,
            "modules": {name: spec.to_dict() for name, spec in self.modules.items()},
            "modules_to_save": list(self.modules_to_save),
            "task_type": self.task_type,
            "name": self.name,
            "description": self.description,
            "license": self.license,
            "task": self.task,
            "tags": list(self.tags),
            "tensors_sha256": self.tensors_sha256,
        }
        if self.provenance is not None:
            out["provenance"] = dict(self.provenance)
        if self.trainable_tokens:
            out["trainable_tokens"] = {name: list(indices) for name, indices in self.trainable_tokens.items()}
        return out

    def to_json(self) -> str:
        """The canonical JSON text (FORMAT.md, "Canonical JSON")."""
        return canonical_json(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> AdapterConfig:
        """Parses and validates a `lora_hub.config` document. Unknown keys are ignored.

        Raises:
            ConfigError: The text is not a JSON object, or a value breaks the schema.
        """
        data, specs = _quick_config(text.encode("utf-8", "surrogatepass")) or _strict_config(text)
        base = data.get("base_model")
        if base is not None:
            if not isinstance(base, dict) or not all(
                isinstance(base.get(k), (str, type(None))) for k in ("name", "revision", "model_type", "fingerprint")
            ):
                raise ConfigError("base_model must be null or an object whose name, revision, model_type and "
                                  "fingerprint are strings or null")
            base = BaseModelRef(**{k: base.get(k) for k in ("name", "revision", "model_type", "fingerprint")})
        for key in ("modules_to_save", "tags"):
            if not isinstance(data.get(key, []), list):
                raise ConfigError(f"{key} must be a list, got {_json_type(data.get(key))}")
        return cls(
            modules=specs,
            modules_to_save=tuple(data.get("modules_to_save", [])),
            base_model=base,
            task_type=data.get("task_type"),
            name=data.get("name"),
            description=data.get("description"),
            license=data.get("license"),
            task=data.get("task"),
            tags=tuple(data.get("tags", [])),
            tensors_sha256=data.get("tensors_sha256"),
            provenance=data.get("provenance"),
            trainable_tokens=data.get("trainable_tokens") or {},
        )


CONFIG_KEYS = frozenset(f.name for f in fields(AdapterConfig))
"""The keys of the config document that the format defines (FORMAT.md section 6): one source for the reader, the
writer, the strict profile, the JSON schema and the spec's tables (tests keep the last two equal to it)."""
MODULE_KEYS = frozenset(f.name for f in fields(ModuleSpec))
"""The keys of a module entry (FORMAT.md section 6)."""
BASE_MODEL_KEYS = frozenset(f.name for f in fields(BaseModelRef))
"""The keys of the base_model object (FORMAT.md section 6)."""


def check_tensor_index(config: AdapterConfig, index: Mapping[str, tuple[str, tuple[int, ...]]]) -> None:
    """Checks that tensors (name -> (dtype, shape)) are exactly what the config describes (FORMAT.md, "Tensors").

    Raises:
        MissingTensorError, UnexpectedTensorError, TensorDtypeError, RankMismatchError, ShapeMismatchError.
    """
    if _plain_index_fits(config, index):
        return
    claimed: set[str] = set()
    for module, spec in config.modules.items():
        names = spec.tensor_names(module)
        a_name, b_name = names.lora_A, names.lora_B
        present = [n for n in (a_name, b_name) if n in index]
        if len(present) < 2:
            have = f"only {present[0]} is present" if present else "neither is present"
            raise MissingTensorError(f"module '{module}' needs {a_name} and {b_name}; {have}", module=module,
                                     tensor=b_name if present else a_name)
        claimed.update(present)
        (a_dtype, a_shape), (b_dtype, b_shape) = index[a_name], index[b_name]
        for name, dtype, shape in ((a_name, a_dtype, a_shape), (b_name, b_dtype, b_shape)):
            if dtype not in C.LORA_DTYPES:
                raise TensorDtypeError(f"{name} has dtype {dtype}; LoRA tensors must be one of "
                                       f"{', '.join(sorted(C.LORA_DTYPES))}", module=module, tensor=name)
            if len(shape) != 2:
                raise ShapeMismatchError(f"{name} must be 2-dimensional, got shape {list(shape)}", module=module,
                                         tensor=name)
        groups = spec.groups * (spec.experts or 1)
        if a_shape[0] != b_shape[1] * spec.groups:
            raise RankMismatchError(
                f"module '{module}': lora_A has {a_shape[0]} rows but lora_B has rank {b_shape[1]}"
                + (f" and {spec.groups} enabled slices" if spec.enable_lora else "")
                + f"; expected lora_A rows = {'groups * ' if spec.enable_lora else ''}lora_B columns",
                module=module, tensor=a_name)
        if (tuple(a_shape), tuple(b_shape)) != (spec.a_shape, spec.b_shape):
            raise ShapeMismatchError(
                f"module '{module}': the config (r={spec.r}, in={spec.in_features}, out={spec.out_features}"
                + (f", enable_lora={list(spec.enable_lora)}" if spec.enable_lora else "")
                + (f", experts={spec.experts}" if spec.experts else "")
                + f") requires {a_name.rsplit('.', 2)[-2] if spec.kind != 'embedding' else 'lora_embedding_A'} "
                f"{list(spec.a_shape)} and {list(spec.b_shape)} (rank x {groups} per group), "
                f"but the file has {list(a_shape)} and {list(b_shape)}",
                module=module, tensor=a_name if tuple(a_shape) != spec.a_shape else b_name)
        for role, name, shape in (("bias", names.bias, (spec.out_features,)),
                                  ("magnitude", names.magnitude, (spec.out_features,)),
                                  ("base weight", names.base, spec.base_shape)):
            if name is not None:
                _check_extra(index, module, role, name, shape)
                claimed.add(name)
    for module, indices in config.trainable_tokens.items():
        name = config.token_tensor_name(module)
        if name not in index:
            raise MissingTensorError(f"trainable_tokens lists '{module}' but {name} is absent", module=module,
                                     tensor=name)
        dtype, shape = index[name]
        if dtype not in C.LORA_DTYPES or len(shape) != 2 or shape[0] != len(indices):
            raise ShapeMismatchError(f"{name} must be a float matrix of {len(indices)} rows (one per token index), "
                                     f"got {dtype} {list(shape)}", module=module, tensor=name)
        claimed.add(name)
    owned: Counter[str] = Counter()
    for name in index:
        if name in claimed:
            continue
        owner = config.replacement_owner(name)
        if owner is None:
            raise UnexpectedTensorError(
                f"tensor {name} belongs to no module in the config (neither a tensor of a listed module nor a "
                "tensor of a module in modules_to_save)", tensor=name)
        if index[name][0] not in C.DTYPES:
            raise TensorDtypeError(f"{name} has unknown dtype {index[name][0]}", tensor=name, module=owner)
        owned[owner] += 1
    for module in config.modules_to_save:
        if not owned[module]:
            raise MissingTensorError(f"modules_to_save lists '{module}' but no tensor {C.TENSOR_PREFIX}{module}.* "
                                     "is present", module=module)


def _plain_index_fits(config: AdapterConfig, index: Mapping[str, tuple[str, tuple[int, ...]]]) -> bool:
    """Whether the tensors are exactly what a config of plain linear modules (no bias, magnitude or base weight, no
    trainable tokens or modules to save) describes, checked on all modules at once: True means `check_tensor_index`
    would find nothing wrong; False, that it must look module by module (and raise, or accept what this does not
    cover)."""
    specs = list(config.modules.values())
    distinct = config.distinct_specs
    if config.trainable_tokens or config.modules_to_save or len(index) != 2 * len(specs) or any(
            spec.kind != "linear" or spec.bias or spec.dora or spec.replaces_base for spec in distinct):
        return False
    modules = list(config.modules)
    try:
        a = list(map(index.__getitem__, map("".join, zip(repeat(C.TENSOR_PREFIX), modules, repeat(C.LORA_A_SUFFIX)))))
        b = list(map(index.__getitem__, map("".join, zip(repeat(C.TENSOR_PREFIX), modules, repeat(C.LORA_B_SUFFIX)))))
    except KeyError:
        return False
    if {*map(itemgetter(0), a), *map(itemgetter(0), b)} - C.LORA_DTYPES:
        return False
    a_shapes = {id(spec): spec.a_shape for spec in distinct}
    b_shapes = {id(spec): spec.b_shape for spec in distinct}
    ids = list(map(id, specs))
    return list(map(tuple, map(itemgetter(1), a))) == list(map(a_shapes.__getitem__, ids)) and \
        list(map(tuple, map(itemgetter(1), b))) == list(map(b_shapes.__getitem__, ids))


def _check_extra(index: Mapping[str, tuple[str, tuple[int, ...]]], module: str, role: str, name: str,
                 shape: tuple[int, ...]) -> None:
    """A module's bias, magnitude or base weight: present, a float, of its shape."""
    if name not in index:
        raise MissingTensorError(f"module '{module}' needs its {role} {name}, which is absent", module=module,
                                 tensor=name)
    dtype, found = index[name]
    if dtype not in C.LORA_DTYPES:
        raise TensorDtypeError(f"{name} has dtype {dtype}; a {role} must be one of "
                               f"{', '.join(sorted(C.LORA_DTYPES))}", module=module, tensor=name)
    if tuple(found) != tuple(shape):
        raise ShapeMismatchError(f"module '{module}': its {role} {name} must have shape {list(shape)}, got "
                                 f"{list(found)}", module=module, tensor=name)


def tensor_index(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (safetensors dtype name, shape) of every tensor, from the file's header for tensors still in their
    file (nothing is read)."""
    layout = getattr(tensors, "layout", None)
    if layout is not None:  # a header's TensorInfo records
        return {name: (info.dtype, info.shape) for name, info in layout.items()}
    from .tensors import dtype_name

    return {name: (dtype_name(t.dtype), tuple(t.shape)) for name, t in tensors.items()}


class Adapter:
    """One LoRA adapter: its config and its tensors (name -> tensor, possibly memory-mapped and loaded lazily).

    Args:
        config: The adapter's config.
        tensors: Every tensor the config describes, under its file name (see `AdapterConfig.lora_tensor_names`).
        source: Where the adapter came from, for messages.

    Raises:
        MissingTensorError, UnexpectedTensorError, ShapeMismatchError, ...: the tensors do not fit the config.

    Example:
        >>> adapter = lora_hub.load_adapter("sql.safetensors")
        >>> adapter.delta_weight("model.layers.0.self_attn.q_proj").shape
        torch.Size([64, 64])
    """

    def __init__(self, config: AdapterConfig, tensors: Mapping[str, torch.Tensor], *, source: str | None = None,
                 _checked: bool = False) -> None:
        if not _checked:
            check_tensor_index(config, tensor_index(tensors))
        self.config = config
        self.tensors = tensors
        self.source = source
        self.checksum_mismatch: str | None = None
        """The tensors_sha256 its file records and its bytes failed, when it was read anyway (force=True): whatever
        is written from this adapter keeps that checksum, so the corruption stays detectable."""
        self.peft_init: str | None = None
        """A PEFT base-modifying init (pissa, olora, ...) its factors were trained with, before conversion."""

    @property
    def modules(self) -> Mapping[str, ModuleSpec]:
        return self.config.modules

    def lora_A(self, module: str) -> torch.Tensor:
        self._spec(module)
        return self.tensors[self.config.lora_tensor_names(module)[0]]

    def lora_B(self, module: str) -> torch.Tensor:
        self._spec(module)
        return self.tensors[self.config.lora_tensor_names(module)[1]]

    def lora_bias(self, module: str) -> torch.Tensor | None:
        """lora_B's bias (PEFT's lora_bias), or None."""
        name = self._spec(module).tensor_names(module).bias
        return None if name is None else self.tensors[name]

    def magnitude(self, module: str) -> torch.Tensor | None:
        """A DoRA module's magnitude vector (one value per output row), or None."""
        name = self._spec(module).tensor_names(module).magnitude
        return None if name is None else self.tensors[name]

    def base_weight(self, module: str) -> torch.Tensor | None:
        """The base-layer weight the adapter brings for `module` (ModuleSpec.replaces_base), or None."""
        name = self._spec(module).tensor_names(module).base
        return None if name is None else self.tensors[name]

    def token_rows(self, module: str) -> torch.Tensor:
        """The replacement rows of a trainable-tokens module, in the order of `config.trainable_tokens[module]`."""
        if module not in self.config.trainable_tokens:
            raise KeyError(f"the adapter has no trainable tokens on '{module}'")
        return self.tensors[self.config.token_tensor_name(module)]

    def delta_weight(self, module: str, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The update this adapter adds to `module`'s base weight, shaped like that weight (see `delta_weight`).

        Raises:
            ValueError: A DoRA module, whose update depends on the base weight (see `dora_weight`).
        """
        return delta_weight(self._spec(module), self.lora_A(module), self.lora_B(module), dtype=dtype)

    def replacement_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors of modules_to_save, by file name."""
        owned = self.config.owned_tensor_names()
        return {n: self.tensors[n] for n in self.tensors if n not in owned}  # reads only those

    def with_config(self, **changes: Any) -> Adapter:
        """A copy with some config fields replaced (descriptive fields such as name, task, tags, license)."""
        return self.derived(replace(self.config, **changes), self.tensors)

    def derived(self, config: AdapterConfig, tensors: Mapping[str, torch.Tensor]) -> Adapter:
        """An adapter made from this one (a new config, or tensors rewritten to the same effect): it keeps the source
        and a checksum mismatch the original was read with. The caller vouches that the two fit."""
        adapter = Adapter(config, tensors, source=self.source, _checked=True)
        adapter.checksum_mismatch = self.checksum_mismatch
        return adapter

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape by name, without materialising memory-mapped tensors."""
        shapes = getattr(self.tensors, "shapes", None)
        return dict(shapes) if shapes is not None else {n: tuple(t.shape) for n, t in self.tensors.items()}

    @property
    def nbytes(self) -> int:
        """The bytes of every tensor (from the header, for tensors still in their file)."""
        known = getattr(self.tensors, "nbytes", None)
        return known if known is not None else sum(t.numel() * t.element_size() for t in self.tensors.values())

    def __iter__(self) -> Iterator[str]:
        return iter(self.config.modules)

    def __repr__(self) -> str:
        ranks = sorted({s.r for s in self.modules.values()})
        base = self.config.base_model.name if self.config.base_model and self.config.base_model.name else "?"
        return f"Adapter({len(self.modules)} modules, r={ranks}, base={base!r}, source={self.source!r})"

    def _spec(self, module: str) -> ModuleSpec:
        try:
            return self.config.modules[module]
        except KeyError:
            raise KeyError(f"the adapter has no module '{module}'") from None


def delta_weight(spec: ModuleSpec, lora_A: torch.Tensor, lora_B: torch.Tensor, *,
                 dtype: torch.dtype | None = None) -> torch.Tensor:
    """The spec math (FORMAT.md, "Semantics"): the update a module makes to its base weight.

    Plain: scaling * B @ A, shape (out, in). With enable_lora, the g-th enabled slice s of the output gets
    scaling * B[g*n:(g+1)*n] @ A[g*r:(g+1)*r] in rows [s*n, (s+1)*n) (n = out / len(enable_lora)); other slices
    get zero. With fan_in_fan_out, and for embeddings (whose weight is (vocabulary, width)), the result is transposed
    to (in, out), the layout of the base weight. Experts: one such update per expert e, from lora_A rows
    [e*r, (e+1)*r) and lora_B columns e, E + e, 2E + e, ... (PEFT's layout), shape (E, out, in). A lora_B bias is not
    part of the weight update (it adds to the layer's bias). The product is computed in at least float32 on the
    tensors' device, then cast to `dtype` (by default the promoted dtype of A and B).

    Raises:
        ValueError: A DoRA module: its update depends on the base weight (see `dora_weight`).
    """
    import torch

    if spec.dora:
        raise ValueError("a DoRA module's update depends on the base weight (it rescales each output row of the "
                         "updated weight to its magnitude): use dora_weight(spec, weight, ...)")
    result_dtype = dtype or torch.promote_types(lora_A.dtype, lora_B.dtype)
    compute = torch.promote_types(torch.promote_types(lora_A.dtype, lora_B.dtype), torch.float32)
    a, b = lora_A.to(compute), lora_B.to(compute)
    if spec.kind == "experts":
        experts, r = spec.experts, spec.r
        delta = torch.einsum("ore,eri->eoi", b.reshape(spec.out_features, r, experts),
                             a.reshape(experts, r, spec.in_features)) * spec.scaling
        return (delta.transpose(-2, -1) if spec.fan_in_fan_out else delta).to(result_dtype)
    if spec.enable_lora is None:
        delta = (b @ a) * spec.scaling
    else:
        k, n = spec.groups, spec.slice_features
        per_slice = torch.bmm(b.reshape(k, n, spec.r), a.reshape(k, spec.r, spec.in_features)) * spec.scaling
        delta = a.new_zeros(len(spec.enable_lora), n, spec.in_features)
        delta[torch.tensor(spec.enable_lora, device=a.device)] = per_slice
        delta = delta.reshape(spec.out_features, spec.in_features)
    if spec.fan_in_fan_out or spec.kind == "embedding":
        delta = delta.T
    return delta.to(result_dtype)


def dora_weight(spec: ModuleSpec, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                magnitude: torch.Tensor) -> torch.Tensor:
    """The merged weight of a DoRA module (FORMAT.md section 8): with W' = W + scaling * B @ A in (out, in)
    orientation, each output row o becomes magnitude[o] / ||W'[o]||_2 * W'[o]. `weight` is the base weight as stored
    (transposed when fan_in_fan_out); the result is float32, in the same layout."""
    import torch

    w = weight.float()
    w = w.T if spec.fan_in_fan_out else w
    updated = w + (lora_B.float() @ lora_A.float()) * spec.scaling
    scale = magnitude.float() / torch.linalg.norm(updated, dim=1)
    merged = updated * scale[:, None]
    return merged.T if spec.fan_in_fan_out else merged


_SCALARS = (int, float, str, bool, type(None))


def _strict_config(text: str) -> tuple[dict[str, Any], dict[str, ModuleSpec]]:
    """The config document and its module specs, read one entry at a time: the reading whose verdict and messages
    stand."""
    try:
        data = strict_loads(text)
    except ValueError as e:
        raise ConfigError(f"lora_hub.config is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"lora_hub.config must be a JSON object, got {_json_type(data)}")
    modules = data.get("modules")
    if not isinstance(modules, dict):
        raise ConfigError(f"lora_hub.config needs 'modules', an object of entries, not {_json_type(modules)}")
    shared: dict[tuple, ModuleSpec] = {}  # identical entries (by value and JSON type) give one ModuleSpec
    specs = {}
    for name, entry in modules.items():
        key = _entry_key(entry)
        spec = shared.get(key) if key is not None else None
        if spec is None:
            spec = ModuleSpec.from_dict(entry, module=name)
            if key is not None:
                shared[key] = spec
        specs[name] = spec
    return data, specs


_QUICK_VALUES = {*_SCALARS, list}
_QUICK_ITEMS = set(_SCALARS) - {str}
_SPECS_READ: dict[bytes, ModuleSpec] = {}
"""The ModuleSpec read from each module entry text that `_quick_config` has accepted: a spec is immutable, so the
configs of adapters with the same shapes share theirs (and compare them by identity, as a replacement does)."""
_SPECS_KEPT = 4096


def _quick_config(raw: bytes) -> tuple[dict[str, Any], dict[str, ModuleSpec]] | None:
    """What `_strict_config` returns, for a document whose module entries hold scalars and lists of non-string
    scalars (enable_lora's), with no Python code per module: entries are keyed by their own JSON text (which tells
    1, 1.0 and true apart), and one ModuleSpec is made per distinct text. None for anything else (an object or a
    string in a list, a ':' in an entry's keys or strings, an entry `ModuleSpec.from_dict` refuses, a duplicate
    key, deep nesting), which `_strict_config` then reads and judges."""
    try:
        data, compact = quick_read(raw)
    except ValueError:
        return None
    modules = data.get("modules") if type(data) is dict else None
    if type(modules) is not dict:
        return None
    names, entries = list(modules), list(modules.values())
    if set(map(type, entries)) - {dict}:
        return None
    keys = list(map(quick_dumps, entries))
    specs_of = {}
    for key, entry in dict(zip(keys, entries, strict=True)).items():
        spec = _SPECS_READ.get(key)
        if spec is None:
            values = list(entry.values())
            lists = [value for value in values if type(value) is list]  # enable_lora's flags
            if set(map(type, values)) - _QUICK_VALUES or set(map(type, chain.from_iterable(lists))) - _QUICK_ITEMS \
                    or ":" in "".join(chain(entry, (value for value in values if type(value) is str))):
                return None
            try:
                spec = ModuleSpec.from_dict(entry, module="")
            except ConfigError:
                return None
            if len(_SPECS_READ) >= _SPECS_KEPT:
                _SPECS_READ.clear()
            _SPECS_READ[key] = spec
        specs_of[key] = spec
    strings: list[str] = [*data, *names]  # the entries' keys and strings hold no ':'
    members = len(data) + len(names) + sum(map(len, entries))
    for key, value in data.items():
        if key != "modules":
            found = walk(value, strings)
            if found is None:
                return None
            members += found
    if not compact and members_in_text(raw, strings) != members:
        return None
    return data, dict(zip(names, map(specs_of.__getitem__, keys), strict=True))


def _entry_key(entry: object) -> tuple | None:
    """A module entry as a key that tells apart values that compare equal in Python but not in JSON (1, 1.0 and
    true): None for an entry that is not an object of scalars (enable_lora's list), which is then read on its own."""
    if type(entry) is not dict:
        return None
    key = []
    for name, value in entry.items():
        if type(value) not in _SCALARS:
            return None
        key.append((name, type(value), value))
    return tuple(sorted(key, key=lambda item: item[0]))


def _overlapping_module(name: str, modules: Mapping[str, ModuleSpec]) -> str | None:
    if name in modules:
        return name
    prefix = name + "."
    for module in modules:
        if module.startswith(prefix) or name.startswith(module + "."):
            return module
    return None


def _canonical_number(value: float) -> int | float:
    """Integral numbers are written as JSON integers, so alpha=32 and alpha=32.0 give the same bytes."""
    return int(value) if float(value).is_integer() else float(value)


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _json_type(value: object) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")
