"""Writes the lora-hub format conformance vectors (versions 1 and 2) and manifest.json, deterministically.

This script implements the spec (spec/FORMAT.md) on its own, with struct, json and zipfile only: it does not use
lora-hub, so the vectors test lora-hub instead of mirroring it. Run it from anywhere:

    python spec/vectors/make_vectors.py [OUTPUT_DIR]           # default: the folder of this script
    python spec/vectors/make_vectors.py --large OUTPUT_DIR     # also the vectors too large to commit

Tensor values are multiples of 1/128, so every delta in the manifest is exact in float32 and float64.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import struct
import sys
import zipfile
from pathlib import Path

PREFIX = "base_model.model."
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U8": 1}


def canonical(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def values(count: int, seed: int) -> list[float]:
    """Deterministic values in [-125/128, 125/128], exactly representable in F16 and BF16."""
    return [(((i + 1) * 7919 + seed * 104729) % 251 - 125) / 128 for i in range(count)]


def encode(dtype: str, data: list[float]) -> bytes:
    if dtype == "F32":
        return struct.pack(f"<{len(data)}f", *data)
    if dtype == "F64":
        return struct.pack(f"<{len(data)}d", *data)
    if dtype == "F16":
        return struct.pack(f"<{len(data)}e", *data)
    if dtype == "BF16":
        return b"".join(struct.pack("<f", v)[2:] for v in data)
    if dtype in ("I64", "I32"):
        return struct.pack(f"<{len(data)}{'q' if dtype == 'I64' else 'i'}", *(int(v * 128) for v in data))
    raise ValueError(dtype)


class Tensor:
    def __init__(self, dtype: str, shape: list[int], data: list[float]) -> None:
        self.dtype, self.shape, self.data = dtype, shape, data
        self.raw = encode(dtype, data)


def tensor(dtype: str, shape: list[int], seed: int) -> Tensor:
    return Tensor(dtype, shape, values(math.prod(shape), seed))


def module(r, alpha, i, o, *, rslora=False, fan_in_fan_out=False, enable_lora=None, **features) -> dict:
    """A module entry: the seven keys of version 1, and the feature keys (kind, experts, bias, dora, replaces_base)
    only when given, as the canonical writer writes them."""
    return {"r": r, "alpha": alpha, "in_features": i, "out_features": o, "rslora": rslora,
            "fan_in_fan_out": fan_in_fan_out, "enable_lora": enable_lora, **features}


def features_of(conf: dict) -> list[str]:
    """Section 4: the features a config uses."""
    found = set()
    for spec in conf["modules"].values():
        if spec.get("kind", "linear") != "linear":
            found.add(spec["kind"])
        for key, name in (("bias", "lora_bias"), ("dora", "dora"), ("replaces_base", "base_weights")):
            if spec.get(key):
                found.add(name)
    if conf.get("trainable_tokens"):
        found.add("trainable_tokens")
    return sorted(found)


def config(modules: dict, **extra) -> dict:
    doc = {"base_model": None, "description": None, "license": None, "modules": modules, "modules_to_save": [],
           "name": None, "tags": [], "task": None, "task_type": None, "tensors_sha256": None}
    doc.update(extra)
    return doc


def build(tensors: dict[str, Tensor], conf: dict | str | None, *, version: str | None = "1",
          metadata: dict | None = None, sort: bool = True) -> bytes:
    """A file per the canonical writer rules (section 16), unless told otherwise."""
    names = sorted(tensors, key=lambda n: (-ITEMSIZE[tensors[n].dtype], n)) if sort else list(tensors)
    entries, offset, buffer = {}, 0, b""
    for name in names:
        t = tensors[name]
        entries[name] = {"data_offsets": [offset, offset + len(t.raw)], "dtype": t.dtype, "shape": t.shape}
        offset += len(t.raw)
        buffer += t.raw
    meta = {"format": "pt"}
    if version is not None:
        meta["lora_hub.format_version"] = version
    if isinstance(conf, dict):
        if conf.get("tensors_sha256", 0) is None:
            conf = dict(conf, tensors_sha256=hashlib.sha256(buffer).hexdigest())
        meta["lora_hub.config"] = canonical(conf)
        if features_of(conf) and version == "1":  # section 4: a file that uses features is version 2
            meta["lora_hub.format_version"] = "2"
            meta["lora_hub.features"] = ",".join(features_of(conf))
    elif isinstance(conf, str):
        meta["lora_hub.config"] = conf
    if metadata is not None:
        meta = metadata
    entries["__metadata__"] = meta
    header = canonical(entries).encode("ascii")
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + buffer


def raw_file(header: bytes, buffer: bytes = b"", *, length: int | None = None) -> bytes:
    return struct.pack("<Q", len(header) if length is None else length) + header + buffer


def delta(spec: dict, a: Tensor, b: Tensor) -> list:
    """Section 8 in plain Python: the update in the base weight's stored orientation."""
    r, i_f, o_f = spec["r"], spec["in_features"], spec["out_features"]
    if spec.get("kind") == "experts":
        e_count, scale = spec["experts"], spec["alpha"] / (math.sqrt(r) if spec["rslora"] else r)
        # expert e: lora_A rows e*r .. e*r+r-1, lora_B columns k*E + e for k = 0 .. r-1
        return [[[scale * sum(b.data[row * r * e_count + k * e_count + e] * a.data[(e * r + k) * i_f + col]
                              for k in range(r)) for col in range(i_f)] for row in range(o_f)]
                for e in range(e_count)]
    scale = spec["alpha"] / (math.sqrt(r) if spec["rslora"] else r)
    flags = spec["enable_lora"] or [True]
    n = o_f // len(flags)
    out = [[0.0] * i_f for _ in range(o_f)]
    enabled = [s for s, f in enumerate(flags) if f]
    for g, s in enumerate(enabled):
        for row in range(n):
            for col in range(i_f):
                acc = sum(b.data[(g * n + row) * r + j] * a.data[(g * r + j) * i_f + col] for j in range(r))
                out[s * n + row][col] = acc * scale
    if spec["fan_in_fan_out"] or spec.get("kind") == "embedding":
        out = [list(col) for col in zip(*out, strict=True)]
    return out


def pair(name: str, spec: dict, dtype: str, seed: int) -> dict[str, Tensor]:
    """A module's tensors (section 5): lora_A and lora_B, and its bias, magnitude and base weight if it has them."""
    k = sum(spec["enable_lora"]) if spec["enable_lora"] else 1
    slices = len(spec["enable_lora"]) if spec["enable_lora"] else 1
    e = spec.get("experts") or 1
    embedding = spec.get("kind") == "embedding"
    a_name = f"{PREFIX}{name}.lora_embedding_A" if embedding else f"{PREFIX}{name}.lora_A.weight"
    b_name = f"{PREFIX}{name}.lora_embedding_B" if embedding else f"{PREFIX}{name}.lora_B.weight"
    out = {a_name: tensor(dtype, [spec["r"] * k * e, spec["in_features"]], seed),
           b_name: tensor(dtype, [spec["out_features"] // slices * k, spec["r"] * e], seed + 1)}
    if spec.get("bias"):
        out[f"{PREFIX}{name}.lora_B.bias"] = tensor(dtype, [spec["out_features"]], seed + 2)
    if spec.get("dora"):
        out[f"{PREFIX}{name}.lora_magnitude_vector"] = tensor(dtype, [spec["out_features"]], seed + 3)
    if spec.get("replaces_base"):
        transposed = spec["fan_in_fan_out"] or embedding
        shape = [spec["in_features"], spec["out_features"]] if transposed else [spec["out_features"],
                                                                                  spec["in_features"]]
        out[f"{PREFIX}{name}.base_layer.weight"] = tensor(dtype, shape, seed + 4)
    return out


def valid_vectors() -> dict[str, tuple[bytes, dict]]:
    out = {}
    q = "model.layers.0.self_attn.q_proj"
    spec = module(2, 4, 4, 3)
    t = pair(q, spec, "F32", 1)
    facts = {"modules": {q: spec}, "tensor_count": 2, "canonical": True,
             "delta": {q: delta(spec, t[f"{PREFIX}{q}.lora_A.weight"], t[f"{PREFIX}{q}.lora_B.weight"])}}
    out["plain_f32"] = (build(t, config({q: spec})), facts)

    v, o = "model.layers.0.self_attn.v_proj", "model.layers.0.mlp.down_proj"
    specs = {q: module(2, 2.5, 4, 4), v: module(4, 8, 4, 4, rslora=True), o: module(1, 1, 6, 4)}
    t = {**pair(q, specs[q], "F16", 3), **pair(v, specs[v], "BF16", 5), **pair(o, specs[o], "F32", 7)}
    base = {"name": "tiny/llama", "revision": "main", "model_type": "llama", "fingerprint": None}
    conf = config(specs, base_model=base, name="mixed", task="demo", tags=["a", "b"], license="apache-2.0",
                  task_type="CAUSAL_LM", description="mixed dtypes, ranks, rslora")
    facts = {"modules": specs, "tensor_count": 6, "canonical": True,
             "delta": {v: delta(specs[v], t[f"{PREFIX}{v}.lora_A.weight"], t[f"{PREFIX}{v}.lora_B.weight"])}}
    out["mixed_dtypes_rslora"] = (build(t, conf), facts)

    qkv = "transformer.h.0.attn.c_attn"
    spec = module(2, 4, 4, 6, fan_in_fan_out=True, enable_lora=[True, False, True])
    t = pair(qkv, spec, "F32", 9)
    facts = {"modules": {qkv: spec}, "tensor_count": 2, "canonical": True,
             "delta": {qkv: delta(spec, t[f"{PREFIX}{qkv}.lora_A.weight"], t[f"{PREFIX}{qkv}.lora_B.weight"])}}
    out["enable_lora_fan_in_fan_out"] = (build(t, config({qkv: spec})), facts)

    spec = module(2, 2, 4, 4)
    t = {**pair(q, spec, "F16", 11), f"{PREFIX}score.weight": tensor("F32", [3, 4], 13),
         f"{PREFIX}score.position_ids": tensor("I64", [3], 14)}
    facts = {"modules": {q: spec}, "tensor_count": 4, "canonical": True, "modules_to_save": ["score"]}
    out["modules_to_save"] = (build(t, config({q: spec}, modules_to_save=["score"])), facts)

    spec = module(2, 4, 4, 3)
    t = pair(q, spec, "F32", 1)
    minimal = {"modules": {q: {"r": 2, "alpha": 4, "in_features": 4, "out_features": 3}}}
    facts = {"modules": {q: spec}, "tensor_count": 2, "canonical": False}
    out["minimal_config_defaults"] = (build(t, minimal), facts)
    future = {"modules": {q: {**spec, "future_module_key": [1, 2]}}, "future_top_level_key": {"x": 1}}
    out["unknown_keys_ignored"] = (build(t, future), {**facts})
    out.update(feature_vectors())
    return out


def feature_vectors() -> dict[str, tuple[bytes, dict]]:
    """Version-2 files, one per feature (section 4), with the deltas of the new kinds."""
    out = {}
    emb, head, q = "model.embed_tokens", "lm_head", "model.layers.0.self_attn.q_proj"
    specs = {emb: module(2, 4, 6, 3, kind="embedding", replaces_base=True), head: module(2, 2, 3, 6,
                                                                                          replaces_base=True)}
    t = {**pair(emb, specs[emb], "F32", 21), **pair(head, specs[head], "F32", 27)}
    facts = {"modules": specs, "tensor_count": 6, "canonical": True, "features": ["base_weights", "embedding"],
             "delta": {emb: delta(specs[emb], t[f"{PREFIX}{emb}.lora_embedding_A"],
                                  t[f"{PREFIX}{emb}.lora_embedding_B"])}}
    out["embedding_lm_head_base_weights"] = (build(t, config(specs)), facts)

    spec = module(2, 4, 4, 3, bias=True)
    t = pair(q, spec, "F32", 31)
    out["lora_bias"] = (build(t, config({q: spec})), {"modules": {q: spec}, "tensor_count": 3, "canonical": True,
                                                       "features": ["lora_bias"]})
    spec = module(2, 4, 4, 3, dora=True)
    t = pair(q, spec, "F32", 41)
    out["dora"] = (build(t, config({q: spec})), {"modules": {q: spec}, "tensor_count": 3, "canonical": True,
                                                  "features": ["dora"]})
    experts = "model.layers.0.mlp.experts.gate_up_proj"
    spec = module(2, 4, 3, 4, kind="experts", experts=3)
    t = pair(experts, spec, "F32", 51)
    facts = {"modules": {experts: spec}, "tensor_count": 2, "canonical": True, "features": ["experts"],
             "delta": {experts: delta(spec, t[f"{PREFIX}{experts}.lora_A.weight"],
                                      t[f"{PREFIX}{experts}.lora_B.weight"])}}
    out["experts"] = (build(t, config({experts: spec})), facts)

    spec = module(2, 4, 4, 3)
    t = {**pair(q, spec, "F32", 61),
         f"{PREFIX}{emb}.token_adapter.trainable_tokens_delta": tensor("F32", [2, 4], 63)}
    conf = config({q: spec}, trainable_tokens={emb: [5, 1]})
    out["trainable_tokens"] = (build(t, conf), {"modules": {q: spec}, "tensor_count": 3, "canonical": True,
                                                "features": ["trainable_tokens"],
                                                "trainable_tokens": {emb: [5, 1]}})
    return out


def invalid_vectors() -> dict[str, tuple[bytes, str]]:
    q = "model.layers.0.self_attn.q_proj"
    spec = module(2, 4, 4, 3)
    good = pair(q, spec, "F32", 1)
    a_name, b_name = f"{PREFIX}{q}.lora_A.weight", f"{PREFIX}{q}.lora_B.weight"
    entry = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}

    def header(obj: dict) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()

    pickle_zip = io.BytesIO()
    with zipfile.ZipFile(pickle_zip, "w") as archive:
        info = zipfile.ZipInfo("archive/data.pkl", date_time=(2026, 1, 1, 0, 0, 0))
        archive.writestr(info, b"\x80\x02}q\x00.")
    cases: dict[str, tuple[bytes, str]] = {
        "empty_file": (b"", "FILE_TRUNCATED"),
        "short_length_prefix": (b"\x10\x00\x00", "FILE_TRUNCATED"),
        "length_prefix_2pow63": (struct.pack("<Q", 2**63) + b"{}", "HEADER_TOO_LARGE"),
        "length_prefix_1e12": (struct.pack("<Q", 10**12) + b"{}", "HEADER_TOO_LARGE"),
        "length_prefix_past_end": (raw_file(b"{}", length=1000), "FILE_TRUNCATED"),
        "pickle_disguised": (pickle_zip.getvalue(), "HEADER_TOO_LARGE"),
        "nul_in_header": (raw_file(b'{"__metadata__":{"a":"\x00"}}'), "HEADER_ENCODING"),
        "non_utf8_header": (raw_file(b'{"__metadata__":{"a":"\xff\xfe"}}'), "HEADER_ENCODING"),
        "newline_padding": (raw_file(b"{}\n"), "HEADER_ENCODING"),
        "leading_space": (raw_file(b" {}"), "HEADER_JSON"),
        "invalid_json": (raw_file(b'{"a":'), "HEADER_JSON"),
        "header_not_object": (raw_file(b"[]"), "HEADER_JSON"),
        "duplicate_key": (raw_file(b'{"t":' + header(entry) + b',"t":' + header(entry) + b"}", bytes(16)),
                          "HEADER_JSON"),
        "nan_in_header": (raw_file(b'{"t":{"dtype":"F32","shape":[NaN],"data_offsets":[0,0]}}'), "HEADER_JSON"),
        "deeply_nested": (raw_file(b'{"__metadata__":' + b"[" * 100_000 + b"]" * 100_000 + b"}"), "HEADER_JSON"),
        "metadata_not_strings": (raw_file(b'{"__metadata__":{"a":1}}'), "HEADER_SCHEMA"),
        "entry_extra_key": (raw_file(header({"t": {**entry, "extra": 1}}), bytes(16)), "HEADER_SCHEMA"),
        "unknown_dtype": (raw_file(header({"t": {**entry, "dtype": "F4"}}), bytes(16)), "TENSOR_DTYPE"),
        "negative_dimension": (raw_file(header({"t": {**entry, "shape": [-2, 2]}}), bytes(16)), "HEADER_SCHEMA"),
        "too_many_dimensions": (raw_file(header({"t": {**entry, "shape": [1] * 9, "data_offsets": [0, 4]}}),
                                         bytes(4)), "LIMIT_EXCEEDED"),
        "name_too_long": (raw_file(header({"t" * 1025: entry}), bytes(16)), "LIMIT_EXCEEDED"),
        "offset_beyond_2pow53": (raw_file(header({"t": {**entry, "data_offsets": [0, 2**64]}}), bytes(16)),
                                 "HEADER_SCHEMA"),
        "offsets_reversed": (raw_file(header({"t": {**entry, "data_offsets": [16, 0]}}), bytes(16)),
                             "OFFSET_OUT_OF_RANGE"),
        "offsets_past_end": (raw_file(header({"t": {**entry, "data_offsets": [0, 16]}}), bytes(8)),
                             "OFFSET_OUT_OF_RANGE"),
        "size_overflow": (raw_file(header({"t": {**entry, "shape": [2**32, 2**32]}}), bytes(16)), "TENSOR_SIZE"),
        "size_mismatch": (raw_file(header({"t": {**entry, "shape": [2, 3]}}), bytes(16)), "TENSOR_SIZE"),
        "overlapping_tensors": (raw_file(header({"t": entry, "u": {**entry, "data_offsets": [8, 24]}}), bytes(24)),
                                "OFFSET_OVERLAP"),
        "hole_between_tensors": (raw_file(header({"t": entry, "u": {**entry, "data_offsets": [20, 36]}}),
                                          bytes(36)), "BUFFER_HOLE"),
        "trailing_bytes": (raw_file(header({"t": entry}), bytes(20)), "BUFFER_HOLE"),
        "not_lora_hub": (build(good, None, version=None), "NOT_LORA_HUB"),
        "format_version_3": (build(good, config({q: spec}), version="3"), "FORMAT_VERSION"),
        "format_version_leading_zero": (build(good, config({q: spec}), version="01"), "METADATA_INVALID"),
        "config_key_missing": (build(good, None), "METADATA_INVALID"),
        "config_not_json": (build(good, "{modules"), "CONFIG_INVALID"),
        "config_duplicate_key": (build(good, '{"modules":{},"modules":{}}'), "CONFIG_INVALID"),
        "config_no_modules": (build(good, config({})), "CONFIG_INVALID"),
        "config_rank_zero": (build(good, config({q: module(0, 4, 4, 3)})), "CONFIG_INVALID"),
        "config_rank_over_limit": (build(good, config({q: module(16385, 4, 4, 3)})), "CONFIG_INVALID"),
        "config_alpha_not_positive": (build(good, config({q: module(2, 0, 4, 3)})), "CONFIG_INVALID"),
        "config_enable_lora_does_not_divide": (
            build(good, config({q: module(2, 4, 4, 3, enable_lora=[True, False])})), "CONFIG_INVALID"),
        "config_bad_module_path": (build(good, config({"model..q_proj": spec})), "CONFIG_INVALID"),
        "config_modules_to_save_overlaps": (build(good, config({q: spec}, modules_to_save=["model.layers.0"])),
                                            "CONFIG_INVALID"),
        "lora_a_without_lora_b": (build({a_name: good[a_name]}, config({q: spec})), "TENSOR_MISSING"),
        "lora_integer_dtype": (build({a_name: Tensor("I32", [2, 4], values(8, 1)), b_name: good[b_name]},
                                     config({q: spec})), "TENSOR_DTYPE"),
        "lora_three_dimensional": (build({a_name: good[a_name], b_name: tensor("F32", [3, 2, 1], 2)},
                                         config({q: spec})), "SHAPE_MISMATCH"),
        "rank_mismatch": (build({a_name: good[a_name], b_name: tensor("F32", [3, 3], 2)}, config({q: spec})),
                          "RANK_MISMATCH"),
        "config_contradicts_shapes": (build(good, config({q: module(2, 4, 5, 3)})), "SHAPE_MISMATCH"),
        "unexpected_tensor": (build({**good, f"{PREFIX}extra.weight": tensor("F32", [2], 3)}, config({q: spec})),
                              "TENSOR_UNEXPECTED"),
        "modules_to_save_without_tensor": (build(good, config({q: spec}, modules_to_save=["score"])),
                                           "TENSOR_MISSING"),
    }
    cases.update(feature_invalid_vectors())
    return cases


def feature_invalid_vectors() -> dict[str, tuple[bytes, str]]:
    q = "model.layers.0.self_attn.q_proj"
    dora = module(2, 4, 4, 3, dora=True)
    tensors = pair(q, dora, "F32", 71)
    declared = {"format": "pt", "lora_hub.format_version": "2", "lora_hub.config": canonical(config({q: dora}))}
    magnitude = f"{PREFIX}{q}.lora_magnitude_vector"
    plain = module(2, 4, 4, 3)
    bias = module(2, 4, 4, 3, bias=True)
    experts = "model.layers.0.mlp.experts.down_proj"
    expert_spec = module(2, 4, 3, 4, kind="experts", experts=3)
    expert_tensors = pair(experts, expert_spec, "F32", 81)
    emb = "model.embed_tokens"
    return {
        "feature_unknown": (build(tensors, None, metadata={**declared, "lora_hub.features": "dora,telepathy"}),
                            "FEATURE_UNKNOWN"),
        "feature_undeclared": (build(tensors, None, metadata={**declared, "lora_hub.features": "lora_bias"}),
                               "METADATA_INVALID"),
        "features_in_version_1": (build(pair(q, plain, "F32", 1), None, metadata={
            "format": "pt", "lora_hub.format_version": "1", "lora_hub.config": canonical(config({q: plain})),
            "lora_hub.features": "dora"}), "METADATA_INVALID"),
        "dora_magnitude_missing": (build({n: t for n, t in tensors.items() if n != magnitude}, config({q: dora})),
                                   "TENSOR_MISSING"),
        "lora_bias_wrong_shape": (build({**pair(q, bias, "F32", 73),
                                         f"{PREFIX}{q}.lora_B.bias": tensor("F32", [4], 1)}, config({q: bias})),
                                  "SHAPE_MISMATCH"),
        "experts_rank_times_experts": (build({**expert_tensors, f"{PREFIX}{experts}.lora_A.weight":
                                              tensor("F32", [2, 3], 1)}, config({experts: expert_spec})),
                                       "RANK_MISMATCH"),
        "config_dora_on_embedding": (build(tensors, config({q: module(2, 4, 4, 3, kind="embedding", dora=True)})),
                                     "CONFIG_INVALID"),
        "trainable_tokens_rows_mismatch": (build({**pair(q, plain, "F32", 1),
                                                  f"{PREFIX}{emb}.token_adapter.trainable_tokens_delta":
                                                  tensor("F32", [3, 4], 5)},
                                                 config({q: plain}, trainable_tokens={emb: [1, 2]})),
                                           "SHAPE_MISMATCH"),
    }


def large_invalid_vectors() -> dict[str, tuple[bytes, str]]:
    """Vectors of several MB, written only on request (--large) and never committed."""
    names = [f"t{i:06d}" for i in range(262_145)]
    entries = ",".join(f'"{n}":{{"data_offsets":[0,0],"dtype":"U8","shape":[0]}}' for n in names)
    million = ",".join(f'"t{i:07d}":{{"data_offsets":[0,0],"dtype":"U8","shape":[0]}}' for i in range(1_000_000))
    return {"too_many_tensors": (raw_file(("{" + entries + "}").encode()), "TOO_MANY_TENSORS"),
            "million_tiny_tensors": (raw_file(("{" + million + "}").encode()), "TOO_MANY_TENSORS")}


def main(out_dir: Path, *, large: bool = False) -> None:
    manifest = {"format_version": 2, "valid": {}, "invalid": {}}
    for folder in ("valid", "invalid"):
        (out_dir / folder).mkdir(parents=True, exist_ok=True)
    if large:
        (out_dir / "invalid-large").mkdir(exist_ok=True)
        for name, (data, code) in large_invalid_vectors().items():
            (out_dir / "invalid-large" / f"{name}.safetensors").write_bytes(data)
            manifest.setdefault("invalid_large", {})[f"invalid-large/{name}.safetensors"] = code
    for name, (data, facts) in valid_vectors().items():
        (out_dir / "valid" / f"{name}.safetensors").write_bytes(data)
        manifest["valid"][f"valid/{name}.safetensors"] = facts
    for name, (data, code) in invalid_vectors().items():
        (out_dir / "invalid" / f"{name}.safetensors").write_bytes(data)
        manifest["invalid"][f"invalid/{name}.safetensors"] = code
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    arguments = [a for a in sys.argv[1:] if a != "--large"]
    main(Path(arguments[0]) if arguments else Path(__file__).resolve().parent, large="--large" in sys.argv[1:])
