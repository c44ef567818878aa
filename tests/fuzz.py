"""Property-based fuzzing of the reader and the validator (hypothesis).

Valid files are mutated (bit flips, truncation, header token edits, spliced bytes, forged length prefixes, config
values replaced by JSON values of any type) and PEFT
configs are given wrong types and values, and regular expressions built to backtrack (nested quantifiers,
alternations of overlapping strings, backreferences, lookarounds) in target_modules, rank_pattern and alpha_pattern.
The properties: validation never raises, never reports INTERNAL_ERROR and finishes in seconds, and whatever the
header tier accepts can be loaded and read in full.

CI runs a bounded budget (tests/test_fuzz.py). For a longer run, from the repository root:

    python -m tests.fuzz --examples 20000
"""

from __future__ import annotations

import argparse
import json
import re
import struct
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lora_hub

from .factories import random_adapter

VECTORS = Path(__file__).resolve().parents[1] / "spec" / "vectors" / "valid"
_TOKEN = re.compile(rb'-?\d+|"[^"\\]*"')
_NUMBERS = [0, 1, -1, 2, 7, 8, 255, 2**31, 2**53 - 1, 2**53, 2**63, 2**64, 10**30]
_STRINGS = ["F32", "BF16", "F16", "I8", "F4", "", "lora_A", "base_model.model.x.lora_A.weight", "2", "\u00e9", "{"]


def _seeds() -> list[bytes]:
    seeds = [p.read_bytes() for p in sorted(VECTORS.glob("*.safetensors"))]
    with tempfile.TemporaryDirectory() as tmp:
        for seed, dtype in ((0, torch.float32), (1, torch.bfloat16)):
            path = lora_hub.save_adapter(random_adapter(seed, dtype=dtype), Path(tmp) / f"{seed}.safetensors")
            seeds.append(path.read_bytes())
    return seeds


SEEDS = _seeds()


def _with_header(data: bytes, header: bytes) -> bytes:
    (size,) = struct.unpack("<Q", data[:8])
    return struct.pack("<Q", len(header)) + header + data[8 + size:]


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 2**64) | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6)


def _slots(value, found: list) -> list:
    """Every (container, key) of a JSON document, depth first."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, inner in items:
        found.append((value, key))
        _slots(inner, found)
    return found


def _config_mutant(draw, data: bytearray, size: int) -> bytes:
    """One value of the lora_hub.config document replaced by any JSON value (wrong types, nesting, huge numbers)."""
    header = json.loads(bytes(data[8:8 + size]))
    text = header.get("__metadata__", {}).get("lora_hub.config")
    if text is None:
        return bytes(data)
    config = json.loads(text)
    container, key = draw(st.sampled_from(_slots(config, [])))
    container[key] = draw(_JSON_VALUES)
    header["__metadata__"]["lora_hub.config"] = json.dumps(config)
    return _with_header(bytes(data), json.dumps(header).encode())


@st.composite
def mutants(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    (size,) = struct.unpack("<Q", data[:8])
    kind = draw(st.sampled_from(["flip", "flip_header", "truncate", "token", "splice", "length", "config"]))
    if kind == "config":
        return _config_mutant(draw, data, size)
    if kind in ("flip", "flip_header"):
        limit = 8 + size if kind == "flip_header" else len(data)
        for position in draw(st.lists(st.integers(0, limit - 1), min_size=1, max_size=8)):
            data[position] ^= 1 << draw(st.integers(0, 7))
    elif kind == "truncate":
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif kind == "token":
        header = bytes(data[8:8 + size])
        tokens = list(_TOKEN.finditer(header))
        token = tokens[draw(st.integers(0, len(tokens) - 1))]
        value = (str(draw(st.sampled_from(_NUMBERS))) if token.group().lstrip(b"-").isdigit()
                 else json.dumps(draw(st.sampled_from(_STRINGS))))
        header = header[:token.start()] + value.encode() + header[token.end():]
        data = bytearray(_with_header(bytes(data), header))
    elif kind == "splice":
        position = draw(st.integers(0, len(data)))
        data[position:position] = draw(st.binary(min_size=1, max_size=16))
    else:
        data[:8] = struct.pack("<Q", draw(st.sampled_from([0, 1, size - 1, size + 1, len(data), 2**32, 2**63])))
    return bytes(data)


_REGEX_ATOMS = ["a", "a+", "a*", "(a+)+", "(a|aa)+", "(a|a)*", "(.*a){8}", ".*", "\\.", "q_proj", "[a-z]+",
                "(", ")", "|", "$", "^", "?", "{2,}", "\\1", "(?=a)", "(?<!b)", "(?i)", "b"]


@st.composite
def regexes(draw) -> str:
    """Patterns made to backtrack, to be invalid, or to need what RE2 lacks."""
    return "".join(draw(st.lists(st.sampled_from(_REGEX_ATOMS), min_size=1, max_size=10)))


@st.composite
def peft_configs(draw) -> dict:
    anything = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**6), st.floats(allow_nan=True),
                         st.text(max_size=8), st.lists(st.booleans(), max_size=4),
                         st.lists(st.text("qkv_proj.*()[", max_size=6), max_size=3),
                         st.dictionaries(st.text("q_proj.*(", max_size=6), st.integers(-1, 64), max_size=3),
                         regexes(), st.dictionaries(regexes(), st.integers(1, 64), max_size=3))
    keys = ["r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "enable_lora", "fan_in_fan_out",
            "use_rslora", "modules_to_save", "task_type", "bias", "base_model_name_or_path", "peft_type", "use_dora"]
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    for key in draw(st.lists(st.sampled_from(keys), min_size=1, max_size=4, unique=True)):
        config[key] = draw(anything)
    return config


def check_file(data: bytes, folder: Path) -> None:
    path = folder / "mutant.safetensors"
    path.write_bytes(data)
    try:
        lora_hub.summarize(path)  # inspect: a typed error or a summary, nothing else
    except lora_hub.LoraHubError:
        pass
    for level in ("header", "full"):
        report = lora_hub.validate(path, level=level)
        assert "INTERNAL_ERROR" not in report.codes, report.findings
        if level == "header" and report.ok:
            adapter = lora_hub.load_adapter(path)
            for tensor in adapter.tensors.values():
                tensor.double().sum()
            for module, spec in adapter.modules.items():
                if spec.dora:  # its update depends on the base weight
                    weight = torch.ones(spec.delta_shape)
                    lora_hub.dora_weight(spec, weight, adapter.lora_A(module), adapter.lora_B(module),
                                         adapter.magnitude(module))
                else:
                    adapter.delta_weight(module)


PEFT_WEIGHTS: dict[str, torch.Tensor] = {
    f"base_model.model.{module}.{f}.weight": torch.ones(shape)
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "a" * 40 + "b")
    for f, shape in (("lora_A", (4, 8)), ("lora_B", (8, 4)))}
"""Two ordinary modules, and one whose name makes backtracking patterns explode."""
SECONDS_PER_CONFIG = 10.0


def check_peft(config: dict, folder: Path) -> None:
    import time

    from safetensors.torch import save_file

    save_file(PEFT_WEIGHTS, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps(config))
    start = time.perf_counter()
    report = lora_hub.validate(folder, profile="peft")
    assert "INTERNAL_ERROR" not in report.codes, (config, report.findings)
    assert time.perf_counter() - start < SECONDS_PER_CONFIG, config


SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=20_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        given(data=mutants())(settings(max_examples=args.examples, **SETTINGS)(
            lambda data: check_file(data, folder)))()
        given(config=peft_configs())(settings(max_examples=args.examples // 4, **SETTINGS)(
            lambda config: check_peft(config, folder)))()
    print(f"fuzzing passed: {args.examples} mutated files, {args.examples // 4} PEFT configs")


if __name__ == "__main__":
    main()
