"""lora_hub.format: bounded torch-free header reading, the canonical atomic writer, and the lazy mapped reader."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lora_hub
from lora_hub.atomicfile import atomic_write
from lora_hub.tensors import FileTensors

from .factories import random_adapter


def test_round_trip_keeps_config_and_tensors(tmp_path: Path) -> None:
    adapter = random_adapter(1)
    loaded = lora_hub.load_adapter(lora_hub.save_adapter(adapter, tmp_path / "a.safetensors"))
    assert loaded.modules == adapter.modules
    assert loaded.config.modules_to_save == ("score",)
    assert loaded.config.base_model == adapter.config.base_model
    assert loaded.tensors.keys() == adapter.tensors.keys()
    for name, tensor in adapter.tensors.items():
        assert loaded.tensors[name].dtype == tensor.dtype
        assert torch.equal(loaded.tensors[name], tensor)
    buffer = (tmp_path / "a.safetensors").read_bytes()[8 + lora_hub.read_header(tmp_path / "a.safetensors")
                                                       .safetensors.header_size:]
    assert loaded.config.tensors_sha256 == hashlib.sha256(buffer).hexdigest()


@settings(max_examples=25, deadline=None)
@given(order=st.permutations(sorted(random_adapter(0).tensors)), module_order=st.permutations(range(3)),
       seed=st.integers(0, 3))
def test_canonical_bytes_do_not_depend_on_insertion_order(tmp_path_factory, order, module_order, seed) -> None:
    adapter = random_adapter(seed)
    shuffled_specs = dict([list(adapter.modules.items())[i] for i in module_order])
    shuffled = lora_hub.Adapter(
        lora_hub.AdapterConfig(modules=shuffled_specs, modules_to_save=adapter.config.modules_to_save,
                               base_model=adapter.config.base_model, name=adapter.config.name),
        {name: adapter.tensors[name] for name in order})
    folder = tmp_path_factory.mktemp("canonical")
    first = lora_hub.save_adapter(adapter, folder / "a.safetensors").read_bytes()
    second = lora_hub.save_adapter(shuffled, folder / "b.safetensors").read_bytes()
    assert first == second
    assert lora_hub.save_adapter(lora_hub.load_adapter(folder / "b.safetensors"),
                                 folder / "c.safetensors").read_bytes() == first


def test_canonical_layout_aligns_every_tensor(tmp_path: Path) -> None:
    path = lora_hub.save_adapter(random_adapter(2, dtype=torch.bfloat16), tmp_path / "a.safetensors")
    header = lora_hub.read_header(path).safetensors
    assert header.header_size % 8 == 0
    itemsize = {"F32": 4, "F16": 2, "BF16": 2}
    for info in header.tensors.values():
        assert (header.data_offset + info.begin) % itemsize[info.dtype] == 0


def test_tensors_are_read_when_asked_for_and_never_write_the_file(tmp_path: Path) -> None:
    source = random_adapter(3)
    path = lora_hub.save_adapter(source, tmp_path / "a.safetensors")
    before = path.read_bytes()
    adapter = lora_hub.load_adapter(path)
    assert isinstance(adapter.tensors, FileTensors) and adapter.nbytes == source.nbytes
    name = next(iter(adapter.tensors))
    tensor = adapter.tensors[name]
    assert torch.equal(tensor, source.tensors[name]) and adapter.tensors[name] is not tensor  # nothing kept
    tensor.zero_()
    assert path.read_bytes() == before and torch.equal(adapter.tensors[name], source.tensors[name])


_TRUNCATE_AFTER_LOAD = """
import os, sys, lora_hub
adapter = lora_hub.load_adapter(sys.argv[1])
os.truncate(sys.argv[1], 64)
for name in adapter.tensors:
    try:
        adapter.tensors[name].sum()
    except lora_hub.FileTruncatedError as e:
        print(e.code)
        break
"""


@pytest.mark.slow
def test_a_file_cut_short_after_load_is_a_typed_error_not_a_crash(tmp_path: Path) -> None:
    path = lora_hub.save_adapter(random_adapter(3), tmp_path / "a.safetensors")
    result = subprocess.run([sys.executable, "-c", _TRUNCATE_AFTER_LOAD, str(path)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "FILE_TRUNCATED", (result.returncode, result.stderr)


def test_a_file_replaced_after_its_header_was_read_is_refused(tmp_path: Path) -> None:
    path = lora_hub.save_adapter(random_adapter(3), tmp_path / "a.safetensors")
    other = lora_hub.save_adapter(random_adapter(4), tmp_path / "b.safetensors")  # same layout, other values
    header = lora_hub.read_header(path)
    os.replace(other, path)
    with pytest.raises(lora_hub.FileChangedError) as caught:
        lora_hub.load_adapter(header)
    assert caught.value.code == "FILE_CHANGED"
    opened = lora_hub.load_adapter(lora_hub.read_header(path))
    expected = {n: t.clone() for n, t in opened.tensors.items()}
    lora_hub.save_adapter(random_adapter(5), tmp_path / "c.safetensors")
    os.replace(tmp_path / "c.safetensors", path)  # renamed over after opening: the opened file is still read
    assert all(torch.equal(opened.tensors[n], t) for n, t in expected.items())


def test_planned_reads_fill_the_given_tensors_from_any_file_of_the_same_layout(tmp_path: Path) -> None:
    first = lora_hub.load_adapter(lora_hub.save_adapter(random_adapter(1, with_head=False),
                                                        tmp_path / "1.safetensors"))
    second = lora_hub.load_adapter(lora_hub.save_adapter(random_adapter(2, with_head=False),
                                                         tmp_path / "2.safetensors"))
    names = list(first.tensors)
    into = {name: torch.empty(first.tensors.shapes[name]) for name in names}
    plan = first.tensors.plan(names, into)
    assert all(plan.targets[n] is into[n] for n in names)  # straight into the given tensors, no staging
    for adapter in (first, second, first):
        for tensor in into.values():
            tensor.fill_(float("nan"))
        adapter.tensors.read_planned(plan)
        assert all(torch.equal(into[n], adapter.tensors[n]) for n in names)
    other = lora_hub.load_adapter(lora_hub.save_adapter(random_adapter(1), tmp_path / "o.safetensors"))  # + a head
    with pytest.raises(ValueError, match="another tensor layout"):
        other.tensors.read_planned(plan)


def test_background_reads_fill_the_targets_and_their_errors_reach_the_caller(tmp_path: Path) -> None:
    path = lora_hub.save_adapter(random_adapter(4, with_head=False), tmp_path / "a.safetensors")
    adapter = lora_hub.load_adapter(path)
    names = list(adapter.tensors)
    into = {name: torch.zeros(adapter.tensors.shapes[name]) for name in names}
    plan = adapter.tensors.plan(names, into)
    wait = adapter.tensors.start_reading(plan)
    wait()
    assert all(torch.equal(into[n], adapter.tensors[n]) for n in names)
    os.truncate(path, path.stat().st_size - 4)  # the last tensor meets the end of the file, in the thread
    wait = adapter.tensors.start_reading(plan)
    with pytest.raises(lora_hub.FileTruncatedError, match="changed after its header was read"):
        wait()
    with pytest.raises(lora_hub.FileTruncatedError):
        adapter.tensors.read_planned(plan)


def test_misaligned_third_party_layout_still_loads(tmp_path: Path) -> None:
    spec = lora_hub.ModuleSpec(r=1, alpha=1, in_features=2, out_features=2)
    config = lora_hub.AdapterConfig(modules={"m": spec}, modules_to_save=("head",))
    tensors = {"base_model.model.head.flag": (torch.tensor([1], dtype=torch.uint8), "U8"),
               "base_model.model.m.lora_A.weight": (torch.tensor([[1.5, -2.0]]), "F32"),
               "base_model.model.m.lora_B.weight": (torch.tensor([[0.25], [4.0]]), "F32")}
    entries, buffer = {}, b""
    for name, (tensor, dtype) in tensors.items():  # U8 first: the F32 tensors start at odd offsets
        raw = tensor.numpy().tobytes()
        entries[name] = {"dtype": dtype, "shape": list(tensor.shape), "data_offsets": [len(buffer), len(buffer) +
                                                                                        len(raw)]}
        buffer += raw
    entries["__metadata__"] = {"lora_hub.format_version": "1", "lora_hub.config": config.to_json()}
    header = json.dumps(entries).encode()
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + buffer)
    adapter = lora_hub.load_adapter(path)
    assert torch.equal(adapter.delta_weight("m"), torch.tensor([[0.375, -0.5], [6.0, -8.0]]))


def test_read_header_reads_only_the_header(tmp_path: Path) -> None:
    """A 1 GiB file (sparse on disk) costs a header read: the bytes read do not grow with the file."""
    spec = lora_hub.ModuleSpec(r=1, alpha=1, in_features=2**27, out_features=1)
    config = lora_hub.AdapterConfig(modules={"m": spec})
    size = 4 * 2**27
    entries = {"base_model.model.m.lora_A.weight": {"dtype": "F32", "shape": [1, 2**27], "data_offsets": [0, size]},
               "base_model.model.m.lora_B.weight": {"dtype": "F32", "shape": [1, 1],
                                                    "data_offsets": [size, size + 4]},
               "__metadata__": {"lora_hub.format_version": "1", "lora_hub.config": config.to_json()}}
    header = json.dumps(entries).encode()
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + size + 4)
    io_stats = Path(f"/proc/{os.getpid()}/io")
    if not io_stats.exists():
        pytest.skip("no /proc/<pid>/io on this platform")

    def bytes_read() -> int:
        return int(next(line for line in io_stats.read_text().splitlines() if line.startswith("rchar")).split()[1])

    start = bytes_read()
    header_info = lora_hub.read_header(path)
    adapter = lora_hub.load_adapter(path)
    assert bytes_read() - start < 64 * 1024
    assert header_info.tensors["base_model.model.m.lora_A.weight"].nbytes == size
    assert adapter.lora_B("m").shape == (1, 1)


def test_read_header_and_summarize_do_not_import_torch(tmp_path: Path) -> None:
    path = lora_hub.save_adapter(random_adapter(4), tmp_path / "a.safetensors")
    script = textwrap.dedent(f"""
        import sys, lora_hub
        assert "huggingface_hub" not in sys.modules and "starlette" not in sys.modules, "import lora_hub is heavy"
        header = lora_hub.read_header({str(path)!r})
        summary = lora_hub.summarize({str(path)!r})
        assert summary.module_count == 3, summary
        assert "torch" not in sys.modules, "torch was imported"
    """)
    subprocess.run([sys.executable, "-c", script], check=True)


def test_library_never_imports_click() -> None:
    script = textwrap.dedent("""
        import importlib, pkgutil, sys, lora_hub
        for module in pkgutil.walk_packages(lora_hub.__path__, "lora_hub."):
            importlib.import_module(module.name)
        assert "click" not in sys.modules, "lora_hub imported click"
    """)
    subprocess.run([sys.executable, "-c", script], check=True)


def test_atomic_write_writes_every_chunk_in_order_in_batches(tmp_path: Path, monkeypatch) -> None:
    from array import array

    from lora_hub import atomicfile

    monkeypatch.setattr(atomicfile, "WRITE_BATCH_BYTES", 1000)  # batches by size as well as by count
    chunks = [b"", b"abc", memoryview(array("f", [1.0, 2.0])), bytes(range(256)) * 10,
              *(bytes([i % 256]) for i in range(3 * atomicfile.IOV_MAX)), b"end"]
    expected = b"".join(bytes(memoryview(c).cast("B")) for c in chunks)
    assert atomic_write(tmp_path / "x.bin", iter(chunks)).read_bytes() == expected
    views = [memoryview(b"abc"), memoryview(b"de"), memoryview(b"f")]
    assert [bytes(v) for v in atomicfile.after(views, 4)] == [b"e", b"f"]  # where a short write continues
    assert [bytes(v) for v in atomicfile.after(views, 3)] == [b"de", b"f"] and atomicfile.after(views, 6) == []


def test_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "a.safetensors"
    target.write_bytes(b"old content")

    def chunks():
        yield b"new "
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, chunks())
    assert target.read_bytes() == b"old content"
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


@pytest.mark.slow
def test_killed_save_never_leaves_a_partial_file(tmp_path: Path) -> None:
    """A process killed at any moment while saving leaves either nothing or a complete, valid file."""
    target = tmp_path / "big.safetensors"
    script = textwrap.dedent(f"""
        import torch, lora_hub
        spec = lora_hub.ModuleSpec(r=64, alpha=64, in_features=2**17, out_features=8)
        config = lora_hub.AdapterConfig(modules={{"m": spec}})
        adapter = lora_hub.Adapter(config, {{"base_model.model.m.lora_A.weight": torch.randn(64, 2**17),
                                             "base_model.model.m.lora_B.weight": torch.randn(8, 64)}})
        print("ready", flush=True)
        while True:
            lora_hub.save_adapter(adapter, {str(target)!r})
    """)
    for delay in (0.05, 0.2, 0.45):
        child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
        assert child.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait()
        if target.exists():
            header = lora_hub.read_header(target)
            buffer = target.read_bytes()[header.safetensors.data_offset:]
            assert hashlib.sha256(buffer).hexdigest() == header.config.tensors_sha256


def test_save_refuses_tensors_that_do_not_fit_the_config(tmp_path: Path) -> None:
    adapter = random_adapter(5, with_head=False)
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    tensors = {**adapter.tensors, name: torch.zeros(16, 3)}
    with pytest.raises(lora_hub.RankMismatchError):
        lora_hub.save_adapter(lora_hub.Adapter(adapter.config, tensors, _checked=True), tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_save_refuses_meta_tensors(tmp_path: Path) -> None:
    adapter = random_adapter(6, with_head=False)
    on_meta = {n: t.to("meta") for n, t in adapter.tensors.items()}
    with pytest.raises(ValueError, match="meta"):
        lora_hub.save_adapter(lora_hub.Adapter(adapter.config, on_meta), tmp_path / "x.safetensors")


def test_errors_name_the_file_and_inherit_builtins(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as missing:
        lora_hub.read_header(tmp_path / "nope.safetensors")
    assert missing.value.code == "NOT_FOUND"
    with pytest.raises(lora_hub.AdapterNotFoundError, match="directory"):
        lora_hub.read_header(tmp_path)
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(ValueError) as short:
        lora_hub.read_header(tmp_path / "short.safetensors")
    assert short.value.code == "FILE_TRUNCATED"
    assert str(tmp_path / "short.safetensors") in str(short.value)


def test_format_version_error_names_both_versions(tmp_path: Path) -> None:
    with pytest.raises(lora_hub.FormatVersionError, match="version 3.*version 2"):
        lora_hub.read_header(Path(__file__).parents[1] / "spec/vectors/invalid/format_version_3.safetensors")


def test_a_file_without_features_keeps_its_version_1_bytes_and_one_with_them_is_version_2(tmp_path: Path) -> None:
    vectors = Path(__file__).parents[1] / "spec/vectors/valid"
    plain = lora_hub.read_header(vectors / "plain_f32.safetensors")
    assert plain.format_version == 1 and "lora_hub.features" not in plain.safetensors.metadata
    dora = lora_hub.read_header(vectors / "dora.safetensors")
    assert dora.format_version == 2 and dora.safetensors.metadata["lora_hub.features"] == "dora"
    assert dora.config.features == ("dora",)
    with pytest.raises(lora_hub.FeatureUnknownError, match="'telepathy'") as caught:
        lora_hub.read_header(vectors.parent / "invalid/feature_unknown.safetensors")
    assert isinstance(caught.value, lora_hub.FormatVersionError)  # older callers catch it as a newer format


def test_peft_file_is_not_a_lora_hub_file_and_says_how_to_convert(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"base_model.model.m.lora_A.weight": torch.zeros(1, 2),
               "base_model.model.m.lora_B.weight": torch.zeros(2, 1)}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(lora_hub.NotLoraHubFileError, match="lora-hub convert"):
        lora_hub.read_header(tmp_path / "adapter_model.safetensors")
