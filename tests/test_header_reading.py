"""The two readings of a header and a config: the quick one (orjson, checked column by column) and the strict one
(one object at a time), which decides whenever the quick one is not sure. A header the quick reading accepts must
read the same strictly; every duplicate key, at any depth, must still be refused."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lora_hub
from lora_hub import format as F
from lora_hub.adapter import BaseModelRef, _module_names_valid, _quick_config, _strict_config, check_module_name
from lora_hub.errors import LoraHubError

from .factories import random_adapter
from .fuzz import SETTINGS, mutants


class Pairs(list):
    """A JSON object written member by member, so that a key may appear twice."""


def dumps(value) -> str:
    if isinstance(value, Pairs):
        return "{" + ",".join(f"{json.dumps(k)}:{dumps(v)}" for k, v in value) + "}"
    if isinstance(value, dict):
        return dumps(Pairs(value.items()))
    if isinstance(value, list):
        return "[" + ",".join(dumps(v) for v in value) + "]"
    return json.dumps(value)


def header_of(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + size]), data[8 + size:]


def write(path: Path, header_text: str, buffer: bytes) -> Path:
    raw = header_text.encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + buffer)
    return path


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    adapter = random_adapter(0).with_config(
        provenance={"tool": "test", "steps": [{"name": "train", "args": {"lr": 0.001}}]},
        base_model=BaseModelRef(name="org/base", model_type="llama"))
    return lora_hub.save_adapter(adapter, tmp_path / "a.safetensors")


def _with_config(header: dict, config_text: str) -> str:
    metadata = dict(header["__metadata__"], **{"lora_hub.config": config_text})
    return dumps(Pairs([("__metadata__", metadata), *((k, v) for k, v in header.items() if k != "__metadata__")]))


def _duplicates(header: dict) -> dict[str, tuple[str, str]]:
    """Header texts with one key written twice, at each depth, with the code each must get."""
    name = next(k for k in header if k != "__metadata__")
    entry = header[name]
    metadata = header["__metadata__"]
    config = json.loads(metadata["lora_hub.config"])
    module = next(iter(config["modules"]))
    rest = [(k, v) for k, v in header.items() if k not in ("__metadata__", name)]
    cases = {
        "tensor": dumps(Pairs([("__metadata__", metadata), (name, entry), (name, entry), *rest])),
        "entry key": dumps(Pairs([("__metadata__", metadata), (name, Pairs([("dtype", entry["dtype"]),
                                                                             *entry.items()])), *rest])),
        "metadata key": dumps(Pairs([("__metadata__", Pairs([("format", "pt"), *metadata.items()])), (name, entry),
                                     *rest])),
        "__metadata__": dumps(Pairs([("__metadata__", metadata), ("__metadata__", metadata), (name, entry),
                                     *rest])),
    }
    out = {label: (text, "HEADER_JSON") for label, text in cases.items()}
    module_entry = config["modules"][module]
    config_cases = {
        "config key": Pairs([("license", None), *config.items()]),
        "module": Pairs([*config.items(), ("modules", Pairs([(module, module_entry), *config["modules"].items()]))]),
        "module entry key": Pairs([(k, v) for k, v in config.items() if k != "modules"] + [
            ("modules", Pairs([(m, Pairs([("r", e["r"]), *e.items()]) if m == module else e)
                               for m, e in config["modules"].items()]))]),
        "base_model key": Pairs([*config.items(), ("base_model", Pairs([("name", "a"), ("name", "a")]))]),
        "nested provenance": Pairs([*config.items(), ("provenance", {"steps": [Pairs([("x", 1), ("x", 1)])]})]),
    }
    for label, document in config_cases.items():
        out[label] = (_with_config(header, dumps(document)), "CONFIG_INVALID")
    return out


def test_a_key_written_twice_is_refused_at_every_depth(saved: Path, tmp_path: Path) -> None:
    header, buffer = header_of(saved)
    for label, (text, code) in _duplicates(header).items():
        path = write(tmp_path / "dup.safetensors", text, buffer)
        with pytest.raises(LoraHubError) as caught:
            lora_hub.read_header(path)
        assert caught.value.code == code, label
        assert "duplicate key" in str(caught.value), label
        assert lora_hub.validate(path, level="header").codes == [code], label


def test_an_escaped_colon_is_read_and_does_not_hide_a_duplicate(saved: Path, tmp_path: Path) -> None:
    header, buffer = header_of(saved)
    config = json.loads(header["__metadata__"]["lora_hub.config"])
    config["description"] = "ratio 1:2"
    escaped = json.dumps(json.dumps(config, sort_keys=True)).replace(":", "\\u003a")  # in the header's string
    text = dumps(header).replace(json.dumps(header["__metadata__"]["lora_hub.config"]), escaped)
    path = write(tmp_path / "escaped.safetensors", text, buffer)
    assert lora_hub.read_header(path).config.description == "ratio 1:2"
    # A duplicate alongside the escape: the member count cannot be used, and the strict reading refuses it.
    name = next(k for k in header if k != "__metadata__")
    doubled = text[:-1] + f",{json.dumps(name)}:{dumps(header[name])}}}"
    path = write(tmp_path / "escaped-dup.safetensors", doubled, buffer)
    with pytest.raises(LoraHubError, match="duplicate key") as caught:
        lora_hub.read_header(path)
    assert caught.value.code == "HEADER_JSON"


def test_the_quick_reading_covers_what_lora_hub_writes(saved: Path) -> None:
    data = saved.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    raw, buffer_size = data[8:8 + size], len(data) - 8 - size
    quick = F._quick_header(raw, buffer_size)
    assert quick is not None and quick == F._strict_header(raw, buffer_size)
    text = quick[0]["lora_hub.config"]
    assert _quick_config(text.encode()) is not None
    data, specs = _quick_config(text.encode())
    strict_data, strict_specs = _strict_config(text)
    assert data == strict_data and specs == strict_specs


_ENTRY = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}


@pytest.mark.parametrize("entry", [
    5, None, True, "F32", [1, 2, 3], {},
    {**_ENTRY, "dtype": ["F32"]}, {**_ENTRY, "shape": 1}, {**_ENTRY, "shape": {}}, {**_ENTRY, "shape": "1"},
    {**_ENTRY, "shape": [True]}, {**_ENTRY, "shape": [1.0]}, {**_ENTRY, "shape": ["1"]}, {**_ENTRY, "shape": [[1]]},
    {**_ENTRY, "shape": [None]}, {**_ENTRY, "shape": [-1, -1]}, {**_ENTRY, "shape": [2**64 + 1]},
    {**_ENTRY, "data_offsets": [0.0, 4]}, {**_ENTRY, "data_offsets": [False, 4]}, {**_ENTRY, "data_offsets": [0]},
    {**_ENTRY, "data_offsets": [0, 2**64 + 4]}, {**_ENTRY, "data_offsets": 4},
], ids=repr)
def test_a_malformed_entry_gets_the_strict_verdict(entry: object, tmp_path: Path) -> None:
    path = write(tmp_path / "entry.safetensors", json.dumps({"a": entry}), b"\0" * 4)
    with pytest.raises(LoraHubError) as caught:  # a verdict, never a crash of the quick reading
        F.read_safetensors_header(path)
    assert caught.value.code in ("HEADER_SCHEMA", "TENSOR_DTYPE", "TENSOR_SIZE", "OFFSET_OUT_OF_RANGE"), entry
    agree(path.read_bytes())


def test_a_well_formed_entry_reads_quickly_with_integer_shapes(tmp_path: Path) -> None:
    path = write(tmp_path / "entry.safetensors", json.dumps({"a": _ENTRY}), b"\0" * 4)
    raw = path.read_bytes()[8:-4]
    _, tensors = F._quick_header(raw, 4)
    assert dict(tensors) == {"a": F.TensorInfo("F32", (1,), 0, 4)} and type(tensors["a"].shape[0]) is int


def test_dimensions_at_the_limits_read_alike(tmp_path: Path) -> None:
    largest = {"dtype": "F32", "shape": [0, 2**53 - 1], "data_offsets": [0, 0]}  # valid: an empty tensor
    path = write(tmp_path / "largest.safetensors", json.dumps({"a": largest}), b"")
    assert F.read_safetensors_header(path).tensors["a"].shape == (0, 2**53 - 1)
    agree(path.read_bytes())
    for entry, code in (({**largest, "shape": [0, 2**53]}, "HEADER_SCHEMA"),
                        ({**largest, "shape": [1] * 8 + [0]}, "LIMIT_EXCEEDED")):
        path = write(tmp_path / "over.safetensors", json.dumps({"a": entry}), b"")
        with pytest.raises(LoraHubError) as caught:
            F.read_safetensors_header(path)
        assert caught.value.code == code
        agree(path.read_bytes())
    eight = write(tmp_path / "eight.safetensors", json.dumps({"a": {**largest, "shape": [1] * 7 + [0]}}), b"")
    assert F._quick_header(eight.read_bytes()[8:], 0) is not None  # the most dimensions, read quickly


def test_a_tensor_table_is_a_mapping_of_tensor_infos(saved: Path) -> None:
    tensors = lora_hub.read_header(saved).tensors
    infos = dict(tensors)
    assert list(tensors) == list(infos) and len(tensors) == len(infos) and all(n in tensors for n in infos)
    assert tensors == infos and tensors == F.TensorTable.of(infos) and "nope" not in tensors
    reordered = F.TensorTable.of(dict(reversed(infos.items())))
    assert reordered == tensors  # a mapping: equal whatever the order
    name = next(iter(infos))
    changed = F.TensorTable.of({**infos, name: infos[name]._replace(dtype="F16")})
    assert changed != tensors and changed != infos
    assert tensors.index() == {n: (i.dtype, i.shape) for n, i in infos.items()}
    assert tensors.shapes_by_name() == {n: i.shape for n, i in infos.items()}


def agree(data: bytes) -> None:
    """The quick readings (header, config, module names) accept only what the strict ones accept, identically."""
    if len(data) < 8:
        return
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8 or size > 1 << 24:
        return
    raw, buffer_size = data[8:8 + size], len(data) - 8 - size
    quick = F._quick_header(raw, buffer_size)
    try:
        strict = F._strict_header(raw, buffer_size)
    except LoraHubError:
        strict = None
    if quick is not None:
        assert strict == quick
        assert {type(n) for shape in quick[1].shapes for n in shape} <= {int}  # JSON integers, not true or 1.0
        assert {*map(type, quick[1].begins), *map(type, quick[1].ends)} <= {int}
    if strict is None:
        return
    text = strict[0].get("lora_hub.config")
    if text is None:
        return
    quick_config = _quick_config(text.encode("utf-8", "surrogatepass"))
    try:
        strict_config = _strict_config(text)
    except LoraHubError:
        strict_config = None
    if quick_config is not None:
        assert strict_config is not None
        assert quick_config[0] == strict_config[0]
        assert quick_config[1] == strict_config[1]
        for spec, strict_spec in zip(quick_config[1].values(), strict_config[1].values(), strict=True):
            for key in ("r", "alpha", "in_features", "out_features", "rslora", "fan_in_fan_out"):
                assert type(getattr(spec, key)) is type(getattr(strict_spec, key))  # 1, 1.0 and true stay apart
        names = list(strict_config[1])
        assert _module_names_valid(names) == all(check_module_name(n) is None for n in names)


@settings(max_examples=300, **SETTINGS)
@given(data=mutants())
def test_quick_readings_agree_with_strict_ones_on_mutated_files(data: bytes) -> None:
    agree(data)


_NAME_PIECES = ["a", "model", "layers", "0", "q_proj", "lora_A", "base_layer", "-", "_", "", ".", "\n", "é", "A9"]


@settings(max_examples=500, **SETTINGS)
@given(names=st.lists(st.lists(st.sampled_from(_NAME_PIECES), max_size=6).map(".".join), max_size=6))
def test_module_paths_are_judged_alike_in_bulk_and_one_by_one(names: list[str]) -> None:
    assert _module_names_valid(names) == all(check_module_name(n) is None for n in names)
