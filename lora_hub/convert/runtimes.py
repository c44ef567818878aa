"""What llama.cpp and mlx-lm run of an adapter with the same result as PeftModel: one check that the writers
(`to_gguf`, `to_mlx`) and the validation profiles (llama.cpp, mlx) share, so a profile never passes what a writer
refuses, nor the reverse.

Each runtime gets what it holds exactly: per-module scales are folded into lora_B, mixed ranks zero-padded for
mlx-lm, q and k rows permuted as llama.cpp's converter permutes the base weights. What it cannot hold is a `Problem`
with a code of its own, naming the module (spec/PROFILES.md has the table).

Architectures are listed only where the mapping was checked against the runtime itself (tests/test_runtimes.py
compares logits with PeftModel's): llama.cpp's base converter transforms weights per architecture, and mlx-lm
names modules per architecture.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..adapter import AdapterConfig

if TYPE_CHECKING:
    from ..adapter import Adapter
    from ..basemodel import BaseModelInfo, BaseSource


@dataclass(frozen=True)
class Problem:
    """Why a runtime would not give PeftModel's result for an adapter: a code (spec/CODES.md), what, and where."""

    code: str
    message: str
    module: str | None = None


@dataclass(frozen=True)
class GgufArch:
    """How llama.cpp's convert_hf_to_gguf.py writes a base model of one transformers model_type."""

    name: str
    """general.architecture (and the gguf package's name map)."""
    permute_qk: bool
    """The converter permutes the rows of q_proj and k_proj for its RoPE layout (LlamaModel.undo_permute)."""


GGUF_ARCHS: dict[str, GgufArch] = {
    "llama": GgufArch("llama", True),
    "mistral": GgufArch("llama", True),
    "qwen2": GgufArch("qwen2", False),
    "qwen3": GgufArch("qwen3", False),
}
"""transformers model_type -> what llama.cpp's converter does with it (conversion/llama.py, conversion/qwen.py of
llama.cpp as vendored by llama-cpp-python 0.3.36)."""

MLX_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
"""Model types whose mlx-lm modules have transformers' paths and layer kinds (mlx_lm.models.<type>)."""

BLOCKS = "model.layers."
"""Where the transformer blocks of these architectures are, in transformers and mlx-lm alike."""


def gguf_arch(model_type: str | None) -> GgufArch | None:
    return GGUF_ARCHS.get(model_type or "")


def _name_map(arch: GgufArch, info: BaseModelInfo):
    return _cached_name_map(arch.name, int(info.hparams.get("num_hidden_layers", 0)))


@functools.lru_cache(maxsize=16)
def _cached_name_map(arch: str, blocks: int):
    import gguf

    by_name = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}
    return gguf.get_tensor_name_map(by_name[arch], blocks)


def gguf_names(info: BaseModelInfo) -> dict[str, str]:
    """Module path -> llama.cpp's base tensor name (without '.weight') for every linear and embedding layer that the
    gguf package's name map knows; empty for an architecture not in GGUF_ARCHS."""
    arch = gguf_arch(info.model_type)
    if arch is None:
        return {}
    names = _name_map(arch, info)
    out = {}
    for module, layer in info.layers.items():
        if layer.kind in ("linear", "embedding") and (name := names.get_name(module)) is not None:
            out[module] = name
    return out


def permuted_rows(module: str, info: BaseModelInfo) -> int | None:
    """The head count by which llama.cpp's converter permutes this module's rows (q: the attention heads, k: the
    key/value heads), or None when it does not permute them."""
    import gguf

    arch = gguf_arch(info.model_type)
    heads = info.hparams.get("num_attention_heads")
    if arch is None or not arch.permute_qk or heads is None:
        return None
    found = _name_map(arch, info).get_type_and_name(module)
    if found is None:
        return None
    if found[0] == gguf.MODEL_TENSOR.ATTN_Q:
        return heads
    if found[0] == gguf.MODEL_TENSOR.ATTN_K:
        return info.hparams.get("num_key_value_heads") or heads
    return None


SameAsBase = Callable[[str], "bool | None"]
"""module -> whether the base weight an adapter brings equals the base model's (None: cannot tell)."""


def llama_cpp_problems(config: AdapterConfig, info: BaseModelInfo | None, same_as_base: SameAsBase) -> list[Problem]:
    """What keeps llama.cpp from giving PeftModel's result with this adapter (enable_lora modules expanded first)."""
    found = _common_problems("LLAMA_CPP", "llama.cpp", config, same_as_base)
    if info is None:
        return found + [Problem("LLAMA_CPP_BASE_UNKNOWN", "without the base model, its architecture, tied "
                                "embeddings and tensor names cannot be checked")]
    arch = gguf_arch(info.model_type)
    if arch is None:
        return found + [Problem("LLAMA_CPP_ARCH", f"model_type '{info.model_type}' is not among those lora-hub maps "
                                f"to llama.cpp ({', '.join(sorted(GGUF_ARCHS))})")]
    if arch.permute_qk and "num_attention_heads" not in info.hparams:
        found.append(Problem("LLAMA_CPP_BASE_UNKNOWN", "the base model's config has no num_attention_heads, by which "
                             "llama.cpp's converter permutes q and k"))
    names = gguf_names(info)
    owners = set(info.tied.values())
    for module, spec in config.modules.items():
        if spec.kind == "experts":
            found.append(Problem("LLAMA_CPP_MODULE", f"'{module}' is an expert parameter: llama.cpp adapts 2-D "
                                 "weights only", module))
        elif module in info.tied:
            found.append(Problem("LLAMA_CPP_TIED", f"'{module}' shares its weight with '{info.tied[module]}': the "
                                 "base GGUF has no tensor of its own for it", module))
        elif spec.kind == "embedding" and module in owners:
            found.append(Problem("LLAMA_CPP_TIED", f"'{module}' is tied to the output projection: llama.cpp applies "
                                 "its adapter to the output projection too, where the shapes do not fit (it aborts)",
                                 module))
        elif module not in names:
            found.append(Problem("LLAMA_CPP_MODULE", f"'{module}' has no tensor in llama.cpp's '{arch.name}' layout",
                                 module))
        elif (heads := permuted_rows(module, info)) is not None and spec.out_features % (2 * heads):
            found.append(Problem("LLAMA_CPP_MODULE", f"'{module}' has {spec.out_features} rows, which llama.cpp's "
                                 f"RoPE permutation over {heads} heads cannot split", module))
    return found


def mlx_problems(config: AdapterConfig, info: BaseModelInfo | None, same_as_base: SameAsBase) -> list[Problem]:
    """What keeps mlx-lm from giving PeftModel's result with this adapter (enable_lora modules expanded first)."""
    found = _common_problems("MLX", "mlx-lm", config, same_as_base)
    dora = [m for m, s in config.modules.items() if s.dora]
    if dora and len(dora) != len(config.modules):
        plain = next(m for m, s in config.modules.items() if not s.dora)
        found.append(Problem("MLX_DORA", f"DoRA on {len(dora)} of {len(config.modules)} modules ('{plain}' is plain "
                             "LoRA): mlx-lm's fine_tune_type makes every module DoRA or none", plain))
    model_type = info.model_type if info is not None else (config.base_model.model_type if config.base_model
                                                           else None)
    if model_type is None:
        return found + [Problem("MLX_BASE_UNKNOWN", "without the base model, its architecture (which decides "
                                "mlx-lm's module names) cannot be checked")]
    if model_type not in MLX_MODEL_TYPES:
        return found + [Problem("MLX_ARCH", f"model_type '{model_type}' is not among those lora-hub maps to mlx-lm "
                                f"({', '.join(sorted(MLX_MODEL_TYPES))})")]
    outside = []
    for module, spec in config.modules.items():
        if spec.kind == "experts":
            found.append(Problem("MLX_MODULE", f"'{module}' is an expert parameter in PEFT's layout, which mlx-lm's "
                                 "SwitchLinear adapters do not share", module))
        elif info is None:
            if not module.startswith(BLOCKS):
                outside.append(module)
        elif module in info.tied:
            found.append(Problem("MLX_TIED", f"'{module}' shares its weight with '{info.tied[module]}': mlx-lm's "
                                 "model has no module of its own for it", module))
        elif spec.kind == "embedding" and module in set(info.tied.values()):
            found.append(Problem("MLX_TIED", f"'{module}' is tied to the output projection: mlx-lm's LoRAEmbedding "
                                 "adapts the output projection too (as_linear)", module))
        elif module not in info.layers or info.layers[module].kind not in ("linear", "embedding"):
            found.append(Problem("MLX_MODULE", f"'{module}' is not a linear or embedding layer of the base model",
                                 module))
    if outside:
        found.append(Problem("MLX_BASE_UNKNOWN", f"{len(outside)} module(s) outside the blocks (first: "
                             f"'{outside[0]}'): whether the base ties them to another layer needs the base model",
                             outside[0]))
    return found


def _common_problems(prefix: str, runtime: str, config: AdapterConfig, same_as_base: SameAsBase) -> list[Problem]:
    found = [Problem(f"{prefix}_MODULES_TO_SAVE", f"modules_to_save: {', '.join(config.modules_to_save)}: "
                     f"{runtime} adapters carry LoRA factors only", config.modules_to_save[0])
             ] if config.modules_to_save else []
    for flag, code, what in (("bias", "LORA_BIAS", "lora_bias"), ("dora", "DORA", "DoRA")):
        if prefix == "MLX" and flag == "dora":
            continue  # mlx-lm has DoRA (checked by mlx_problems)
        modules = [m for m, s in config.modules.items() if getattr(s, flag)]
        if modules:
            found.append(Problem(f"{prefix}_{code}", f"{len(modules)} module(s) use {what} (first: '{modules[0]}'), "
                                 f"which {runtime} does not apply", modules[0]))
    for module in config.trainable_tokens:
        found.append(Problem(f"{prefix}_TRAINABLE_TOKENS", f"'{module}' has trainable tokens, which {runtime} does "
                             "not read", module))
    unchecked = []
    for module, spec in config.modules.items():
        if not spec.replaces_base:
            continue
        same = same_as_base(module)
        if same is None:
            unchecked.append(module)
        elif not same:
            found.append(Problem(f"{prefix}_BASE_WEIGHTS_DIFFER", f"'{module}' brings a weight that differs from the "
                                 f"base model's, and {runtime} runs the base model's own", module))
    if unchecked:
        found.append(Problem(f"{prefix}_BASE_WEIGHTS", f"{', '.join(unchecked)}: the adapter brings embedding "
                             f"matrices that {runtime} does not load; they were not compared with the base model's",
                             unchecked[0]))
    return found


def export_base(adapter: Adapter, base: BaseSource | None, runtime: str) -> BaseModelInfo:
    """The base model a runtime export is laid out for: `base`, else the one the adapter declares."""
    from ..basemodel import describe_base
    from ..errors import BaseModelError

    source = base if base is not None else (adapter.config.base_model.name if adapter.config.base_model else None)
    if source is None:
        raise BaseModelError(f"the adapter declares no base model, and {runtime}'s layout depends on it (names, "
                             "architecture, tied embeddings): give the base model (base=, CLI --base)")
    try:
        return describe_base(source, task_type=adapter.config.task_type)
    except BaseModelError as e:
        if base is not None:
            raise
        raise BaseModelError(f"{e.message} (the base model the adapter declares; {runtime}'s layout depends on it: "
                             "give base=, CLI --base)", path=e.path) from e


def refuse_problems(problems: list[Problem], runtime: str) -> None:
    """Raises ExportError for the first of `problems` (saying how many there are), if any."""
    from ..errors import ExportError

    if not problems:
        return
    first = problems[0]
    more = f" ({len(problems) - 1} more problem(s): {', '.join(sorted({p.code for p in problems[1:]}))})" \
        if len(problems) > 1 else ""
    raise ExportError(f"{runtime} cannot run this adapter with PeftModel's result: {first.message}{more}",
                      code=first.code, module=first.module)


def common_value(values: Iterable[float]) -> float:
    """The most common value (the smallest among equally common ones): the one a file-wide setting takes, so that
    the fewest modules need their scale folded into lora_B."""
    counts = Counter(values)
    return min(counts, key=lambda v: (-counts[v], v))


def fold_factor(native: float, common: float) -> float | None:
    """What lora_B is multiplied by so that a runtime's file-wide scale gives a module its own; None when it
    already does."""
    return None if native == common else native / common


def plain_number(value: float) -> int | float:
    """16.0 as 16 (a JSON config and GGUF readers show the value people wrote)."""
    return int(value) if float(value).is_integer() else float(value)
