"""llama.cpp's LoRA adapters (GGUF), both ways, through the gguf package.

What llama.cpp's loader (src/llama-adapter.cpp) expects, and what this writes:
- metadata `general.type = adapter`, `general.architecture` equal to the base GGUF's, `adapter.type = lora`,
  `adapter.lora.alpha`;
- per adapted layer `<base tensor>.lora_a` and `.lora_b`, the base tensor named as the gguf package's name map
  names it (`blk.0.attn_q.weight`); A and B as PEFT stores them, which GGUF's reversed dimension order turns into
  the `a.ne[0] == W.ne[0]`, `b.ne[1] == W.ne[1]` that the loader checks; the embedding's A transposed (llama.cpp
  gathers its rows);
- for architectures whose converter permutes q and k rows for its RoPE layout, the same permutation of lora_B's rows;
- llama.cpp scales each layer by alpha / rank with one alpha for the file: a module whose own scale differs (rsLoRA,
  rank and alpha patterns) has the ratio folded into its lora_B.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import constants as C
from ..adapter import Adapter, AdapterConfig, BaseModelRef, ModuleSpec
from ..errors import BaseModelMismatchError, ExportError, GgufError, ParameterRequiredError
from .runtimes import (
    GGUF_ARCHS,
    common_value,
    export_base,
    fold_factor,
    gguf_arch,
    gguf_names,
    llama_cpp_problems,
    permuted_rows,
    plain_number,
    refuse_problems,
)

if TYPE_CHECKING:
    import torch

    from ..basemodel import BaseSource

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
"""The tensor types `to_gguf` writes (llama.cpp's convert_lora_to_gguf.py --outtype)."""
_MAX_KV = 65_536


def to_gguf(adapter: Adapter, path: str | os.PathLike[str], *, base: BaseSource | None = None,
            outtype: str = "f32") -> Path:
    """Writes `adapter` as a llama.cpp LoRA adapter, so that llama.cpp (llama-cli --lora, llama-server, Ollama's
    ADAPTER, llama-cpp-python's lora_path) gives PeftModel's result on the base model converted by llama.cpp's
    convert_hf_to_gguf.py. The file is written all or nothing.

    Args:
        base: The base model (see `describe_base`); by default the one the adapter declares, when it can be
            described. It gives the architecture, the tensor names and the head counts of q and k.
        outtype: The tensor type: f32 (exact), f16, bf16, or q8_0 (tensors whose rows are not a multiple of 32
            values fall back to f16, as in llama.cpp's converters).

    Raises:
        ExportError: What llama.cpp cannot run as PeftModel does, named with its code (LLAMA_CPP_DORA,
            LLAMA_CPP_TIED, ...; spec/PROFILES.md). BaseModelError: No base model could be described.
    """
    import gguf
    import numpy as np

    from ..atomicfile import atomic_file
    from ..basemodel import same_base_weight
    from ..format import verify_checksum
    from .peft_export import expand_enable_lora

    if outtype not in OUTTYPES:
        raise ValueError(f"outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    info = export_base(adapter, base, "llama.cpp")
    plain = expand_enable_lora(adapter)
    refuse_problems(llama_cpp_problems(plain.config, info,
                                       lambda m: same_base_weight(plain, m, base or info.name, info)), "llama.cpp")
    verify_checksum(plain)
    arch, names = gguf_arch(info.model_type), gguf_names(info)
    natives = {m: s.scaling * s.r for m, s in plain.modules.items()}
    alpha = common_value(natives.values())
    qtype = getattr(gguf.GGMLQuantizationType, outtype.upper())
    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch.name)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        ref = plain.config.base_model or BaseModelRef()
        if adapter.config.name:
            writer.add_name(adapter.config.name)
        if ref.name or info.name:
            writer.add_base_model_count(1)
            writer.add_base_model_name(0, ref.name or info.name)
        for module, spec in plain.modules.items():
            a, b = plain.lora_A(module).double(), plain.lora_B(module).double()
            factor = fold_factor(natives[module], alpha)
            if factor is not None:
                b = b * factor
            if (heads := permuted_rows(module, info)) is not None:
                b = _permute(b, heads)
            if spec.kind == "embedding":
                a = a.T  # llama.cpp gathers the token's row of A (llm_build_inp_embd)
            for suffix, tensor in ((".lora_a", a), (".lora_b", b)):
                data = np.ascontiguousarray(tensor.float().numpy())
                try:
                    packed, kind = gguf.quants.quantize(data, qtype), qtype
                except gguf.QuantError:  # rows not a multiple of the block size, as llama.cpp's converters do
                    packed, kind = gguf.quants.quantize(data, gguf.GGMLQuantizationType.F16), \
                        gguf.GGMLQuantizationType.F16
                writer.add_tensor(f"{names[module]}.weight{suffix}", packed, raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return Path(path)


def _permute(b: torch.Tensor, heads: int) -> torch.Tensor:
    """The rows of lora_B in llama.cpp's RoPE layout (LlamaModel.permute of its converter)."""
    return b.reshape(heads, 2, b.shape[0] // heads // 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)


def _unpermute(b: torch.Tensor, heads: int) -> torch.Tensor:
    return b.reshape(heads, b.shape[0] // heads // 2, 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)


# --- reading ---------------------------------------------------------------------------------------------------------


def from_gguf(path: str | os.PathLike[str], *, base: BaseSource | None = None) -> Adapter:
    """Reads a llama.cpp LoRA adapter into an Adapter with llama.cpp's meaning: each layer scaled by
    alpha / rank (its own rank), q and k rows back in transformers' order, names as the base model has them.

    Args:
        base: The base model (see `describe_base`): GGUF names tensors by llama.cpp's layout, which only the base
            model maps back to module paths. By default the base model the file declares
            (general.base_model.0.name), when it can be described.

    Raises:
        GgufError: Not a GGUF LoRA adapter llama.cpp would load (unreadable, a model, an unpaired or misshapen
            tensor). BaseModelMismatchError: Another architecture, or tensors that fit no layer of the base.
        ParameterRequiredError: No base model given or declared. UnsupportedFeatureError: an aLoRA adapter.
    """

    from ..basemodel import describe_base, fit_to_base
    from ..errors import UnsupportedFeatureError
    from .features import REFUSALS

    path = Path(path)
    reader = _open(path)
    meta = {field.name: _value(field) for field in reader.fields.values() if not field.name.startswith("GGUF.")}
    if meta.get("general.type") != "adapter" or meta.get("adapter.type") != "lora":
        raise GgufError(f"general.type is {meta.get('general.type')!r} and adapter.type {meta.get('adapter.type')!r}: "
                        "a GGUF model or another adapter, not a LoRA adapter", path=path)
    if "adapter.alora.invocation_tokens" in meta:
        refusal = REFUSALS["alora"]
        raise UnsupportedFeatureError(f"an {refusal.feature} adapter: lora-hub does not carry it, because "
                                      f"{refusal.why}. {refusal.fix}", code=refusal.code, path=path)
    written = meta.get("general.architecture")
    if written not in {arch.name for arch in GGUF_ARCHS.values()}:
        raise ExportError(f"llama.cpp architecture {written!r} is not one lora-hub maps back to transformers "
                          f"({', '.join(sorted({a.name for a in GGUF_ARCHS.values()}))}): its converter lays out "
                          "weights per architecture", code="LLAMA_CPP_ARCH", path=path)
    declared = meta.get("general.base_model.0.name")
    source = base if base is not None else declared
    if source is None:
        raise ParameterRequiredError("a GGUF adapter names its tensors by llama.cpp's layout: give the base model "
                                     "(base=, CLI --base) to map them back", path=path)
    info = describe_base(source, task_type="CAUSAL_LM")
    arch = gguf_arch(info.model_type)
    if arch is None or arch.name != written:
        raise BaseModelMismatchError(f"the adapter is for llama.cpp architecture {written!r}, the base model's "
                                     f"model_type {info.model_type!r} is "
                                     f"{repr(arch.name) if arch else 'not one lora-hub maps to llama.cpp'}",
                                     path=path)
    alpha = meta.get("adapter.lora.alpha", 0.0)
    if not isinstance(alpha, float) or not abs(alpha) < float("inf"):
        raise GgufError(f"adapter.lora.alpha is {alpha!r}, not a finite number", path=path)
    modules_by_name = {name + ".weight": module for module, name in gguf_names(info).items()}
    pairs = _pairs(reader, path)
    specs: dict[str, ModuleSpec] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, (a, b) in pairs.items():
        module = modules_by_name.get(name)
        if module is None:
            raise BaseModelMismatchError(f"tensor '{name}' is no linear or embedding layer of the base model "
                                         f"{info.name or ''} that lora-hub maps to llama.cpp", path=path, tensor=name)
        layer = info.layers[module]
        a_t, b_t = _tensor(a), _tensor(b)
        if layer.kind == "embedding":
            a_t = a_t.T
        rank = b_t.shape[1]
        if a_t.shape != (rank, layer.in_features) or b_t.shape != (layer.out_features, rank):
            raise GgufError(f"'{name}': lora_a {tuple(a.shape)} and lora_b {tuple(b.shape)} do not fit the base "
                            f"layer '{module}' ({layer.out_features} x {layer.in_features}), as llama.cpp checks",
                            path=path, tensor=name)
        if (heads := permuted_rows(module, info)) is not None:
            b_t = _unpermute(b_t, heads)
        module_alpha = alpha if alpha else float(rank)  # llama.cpp: alpha 0 means a scale of 1
        if module_alpha < 0:  # a negative scale is the same update with lora_B negated
            b_t, module_alpha = -b_t, -module_alpha
        spec = ModuleSpec(r=rank, alpha=plain_number(module_alpha), in_features=layer.in_features,
                          out_features=layer.out_features, kind=layer.module_kind)
        specs[module] = spec
        names = spec.tensor_names(module)
        tensors[names.lora_A], tensors[names.lora_B] = a_t.contiguous(), b_t.contiguous()
    if not specs:
        raise GgufError("the adapter holds no lora_a/lora_b pair", path=path)
    config = AdapterConfig(modules=specs, task_type="CAUSAL_LM", name=meta.get("general.name"),
                           base_model=BaseModelRef(name=declared), provenance={"converted_from": "gguf"})
    config = fit_to_base(config, info)
    return Adapter(config, tensors, source=os.fspath(path))


def _open(path: Path):
    """The gguf package's reader over the file, after the counts in its fixed header are checked against the
    format's limits (the reader allocates by them)."""
    import gguf

    with open(path, "rb") as f:
        head = f.read(24)
        size = os.fstat(f.fileno()).st_size
    if len(head) < 24 or head[:4] != b"GGUF":
        raise GgufError("not a GGUF file (no GGUF magic)", path=path)
    version, tensors, kv = struct.unpack("<IQQ", head[4:24])
    if version not in (2, 3):
        raise GgufError(f"GGUF version {version}; llama.cpp reads versions 2 and 3", path=path)
    if tensors > C.MAX_TENSORS or kv > _MAX_KV or tensors * 24 + kv * 12 > size:
        raise GgufError(f"the header declares {tensors:,} tensors and {kv:,} metadata keys, over the limits "
                        f"({C.MAX_TENSORS:,}, {_MAX_KV:,}) or more than the {size:,}-byte file holds", path=path)
    try:
        return gguf.GGUFReader(path)
    except (ValueError, KeyError, IndexError, struct.error, OverflowError, TypeError) as e:
        raise GgufError(f"the gguf package cannot read it: {type(e).__name__}: {e}", path=path) from e


def _value(field: Any) -> Any:
    try:
        return field.contents()
    except (ValueError, IndexError, UnicodeDecodeError):
        return None


def _pairs(reader: Any, path: Path) -> dict[str, tuple[Any, Any]]:
    """Base tensor name -> (lora_a, lora_b) reader tensors; norm vectors, which llama.cpp skips, are skipped."""
    found: dict[str, dict[str, Any]] = {}
    for tensor in reader.tensors:
        name = tensor.name
        if name.endswith((".lora_a", ".lora_b")):
            found.setdefault(name[:-7], {})[name[-1]] = tensor
        elif not name.endswith("_norm.weight"):
            raise GgufError(f"tensor '{name}' is neither .lora_a nor .lora_b (llama.cpp refuses it)", path=path,
                            tensor=name)
    out = {}
    for name, parts in sorted(found.items()):
        if set(parts) != {"a", "b"}:
            raise GgufError(f"'{name}' has lora_{''.join(parts)} without its pair (llama.cpp refuses it)", path=path,
                            tensor=name)
        out[name] = (parts["a"], parts["b"])
    return out


def _tensor(tensor: Any) -> torch.Tensor:
    """A reader tensor as a torch tensor of its numpy shape (GGUF's dimensions reversed); F32, F16 and BF16 keep
    their type, quantized types are dequantized to F32."""
    import gguf
    import numpy as np
    import torch

    kind = tensor.tensor_type
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    if kind == gguf.GGMLQuantizationType.F32:
        return torch.from_numpy(np.array(tensor.data, dtype=np.float32).reshape(shape))
    if kind == gguf.GGMLQuantizationType.F16:
        return torch.from_numpy(np.array(tensor.data, dtype=np.float16).reshape(shape))
    if kind == gguf.GGMLQuantizationType.BF16:
        raw = np.array(tensor.data).view(np.int16).reshape(shape)
        return torch.from_numpy(raw).view(torch.bfloat16)
    return torch.from_numpy(np.array(gguf.quants.dequantize(tensor.data, kind), dtype=np.float32).reshape(shape))
