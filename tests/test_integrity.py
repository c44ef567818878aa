"""Corruption is never laundered: a lora-hub file whose bytes fail its recorded checksum is not converted, exported,
combined or pushed into a file with a fresh, valid checksum. Forced, it is read, and what is written keeps the
mismatching checksum, so the corruption stays detectable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import lora_hub

from .factories import random_adapter


@pytest.fixture()
def corrupt(tmp_path: Path) -> Path:
    path = lora_hub.save_adapter(random_adapter(5, with_head=False), tmp_path / "corrupt.safetensors")
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # one bit of one tensor value
    path.write_bytes(bytes(data))
    assert "CHECKSUM_MISMATCH" in lora_hub.validate(path).codes
    return path


def cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lora_hub_cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_convert_refuses_a_corrupt_file_and_writes_nothing(corrupt: Path, tmp_path: Path) -> None:
    for args in (["-o", tmp_path / "out.safetensors"], ["-o", tmp_path / "peft", "--to", "peft"]):
        result = cli("convert", corrupt, *args)
        assert result.returncode == 1 and "[CHECKSUM_MISMATCH]" in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out.safetensors").exists() and not (tmp_path / "peft").exists()
    with pytest.raises(lora_hub.ChecksumMismatchError):
        lora_hub.convert_adapter(corrupt)


def test_no_writer_gives_corrupt_bytes_a_fresh_checksum(corrupt: Path, tmp_path: Path) -> None:
    opened = lora_hub.load_adapter(corrupt)  # lazily opened: not verified yet
    with pytest.raises(lora_hub.ChecksumMismatchError):
        lora_hub.save_adapter(opened, tmp_path / "a.safetensors")
    with pytest.raises(lora_hub.ChecksumMismatchError):
        lora_hub.save_adapter(opened.with_config(name="renamed"), tmp_path / "b.safetensors")
    with pytest.raises(lora_hub.ChecksumMismatchError):
        lora_hub.to_peft(opened, tmp_path / "peft")
    with pytest.raises(lora_hub.ChecksumMismatchError):
        lora_hub.combine([corrupt, random_adapter(6, with_head=False)], method="cat")
    with pytest.raises(lora_hub.ChecksumMismatchError):
        lora_hub.combine([opened, random_adapter(6, with_head=False)], method="cat")
    assert [p.name for p in tmp_path.iterdir()] == ["corrupt.safetensors"]


def test_push_refuses_a_corrupt_file(hub, corrupt: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "lora_hub_cli", "push", str(corrupt), "alice/corrupt"],
                            capture_output=True, text=True, timeout=300,
                            env={**__import__("os").environ, "HF_TOKEN": hub.alice, "HF_ENDPOINT": hub.endpoint})
    assert result.returncode == 1 and "[CHECKSUM_MISMATCH]" in result.stderr, result.stderr
    with pytest.raises(lora_hub.ChecksumMismatchError):
        lora_hub.push(lora_hub.load_adapter(corrupt), "alice/corrupt", token=hub.alice, endpoint=hub.endpoint)


def test_forced_reading_says_so_and_keeps_the_corruption_detectable(corrupt: Path, tmp_path: Path) -> None:
    result = cli("convert", corrupt, "-o", tmp_path / "forced.safetensors", "--force")
    assert result.returncode == 0 and "CHECKSUM_MISMATCH_FORCED" not in result.stdout, result.stderr
    assert "warning:" in result.stderr and "corrupt" in result.stderr
    report = lora_hub.validate(tmp_path / "forced.safetensors")
    assert "CHECKSUM_MISMATCH" in report.codes and not report.ok
    with pytest.warns(lora_hub.ChecksumMismatchWarning):
        adapter = lora_hub.convert_adapter(corrupt, force=True)
    assert adapter.checksum_mismatch == lora_hub.read_header(corrupt).config.tensors_sha256
    lora_hub.to_peft(adapter.with_config(name="x"), tmp_path / "peft")
    assert not lora_hub.validate(tmp_path / "peft" / "adapter_model.safetensors").ok


def test_intact_files_convert_without_a_second_hash(tmp_path: Path, monkeypatch) -> None:
    from lora_hub import format as fmt

    path = lora_hub.save_adapter(random_adapter(7, with_head=False), tmp_path / "a.safetensors")
    calls = []
    original = fmt._digest
    monkeypatch.setattr(fmt, "_digest", lambda *args: calls.append(1) or original(*args))
    resaved = lora_hub.save_adapter(lora_hub.convert_adapter(path), tmp_path / "b.safetensors")
    assert resaved.read_bytes() == path.read_bytes() and calls == []  # the verified hash of the file is reused
