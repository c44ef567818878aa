"""The local registry: records, lookups, order, removal, and its behaviour under concurrent and killed writers."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_hub.errors import RegistryError
from lora_hub.registry import Registry, RegistryEntry, default_home


def _entry(name: str, path: Path, **fields) -> RegistryEntry:
    return RegistryEntry(name=name, path=str(path), repo_id=name.split("@")[0], commit_sha="c" * 40, ranks=[8],
                         targets=["q_proj"], size=123, **fields)


def test_record_get_list_latest_resolve_remove(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "home")
    with pytest.raises(RegistryError, match="empty"):
        registry.latest()
    first = tmp_path / "a.safetensors"
    first.write_bytes(b"x")
    stored = registry.record(_entry("acme/a", first))
    time.sleep(0.01)
    registry.record(_entry("acme/b", tmp_path / "gone.safetensors"))
    assert [e.name for e in registry.list()] == ["acme/b", "acme/a"]
    assert registry.latest().name == "acme/b"
    assert registry.get("acme/a") == stored and stored.ranks == [8] and stored.valid
    assert registry.resolve("acme/a") == first
    with pytest.raises(RegistryError, match="no longer exists"):
        registry.resolve("acme/b")
    time.sleep(0.01)
    again = registry.record(_entry("acme/a", first, valid=False, findings=["CHECKSUM_MISMATCH"]))
    assert again.created == stored.created and again.updated > stored.updated
    assert registry.latest().findings == ["CHECKSUM_MISMATCH"] and not registry.latest().valid
    assert registry.remove("acme/a").name == "acme/a"
    assert "acme/a" not in registry and "acme/b" in registry
    with pytest.raises(RegistryError, match="no adapter called 'acme/a'") as caught:
        registry.get("acme/a")
    assert caught.value.code == "NOT_IN_REGISTRY"
    registry.check()


def test_the_home_follows_lora_hub_home_else_hf_home(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LORA_HUB_HOME", str(tmp_path / "explicit"))
    assert default_home() == tmp_path / "explicit" and Registry().path == tmp_path / "explicit" / "registry.db"
    monkeypatch.delenv("LORA_HUB_HOME")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert default_home() == tmp_path / "hf" / "lora-hub"


def test_a_newer_schema_is_refused_not_damaged(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    registry.list()
    with sqlite3.connect(registry.path) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(RegistryError, match="newer lora-hub"):
        registry.list()


_WRITER = """
import sys
from lora_hub.registry import Registry, RegistryEntry
registry = Registry(sys.argv[1])
prefix = sys.argv[2]
for i in range(int(sys.argv[3])):
    registry.record(RegistryEntry(name=f"{prefix}/{i}", path="/nowhere", ranks=list(range(i % 7)),
                                  targets=["q_proj"] * 50, size=i))
    if i == 0:
        print("started", flush=True)
"""


def test_concurrent_writers_all_land(tmp_path: Path) -> None:
    writers = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), f"w{n}", "60"]) for n in range(3)]
    assert [w.wait(timeout=120) for w in writers] == [0, 0, 0]
    registry = Registry(tmp_path)
    registry.check()
    assert len(registry.list()) == 180


def test_a_writer_killed_mid_write_leaves_the_database_consistent(tmp_path: Path) -> None:
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), "k", "100000"], stdout=subprocess.PIPE,
                              text=True)
    assert writer.stdout.readline().strip() == "started"
    time.sleep(0.5)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    registry = Registry(tmp_path)
    registry.check()
    entries = registry.list()
    assert 0 < len(entries) < 100000
    numbers = sorted(int(e.name.split("/")[1]) for e in entries)
    assert numbers == list(range(len(numbers)))  # every committed record whole, none half-written
    assert all(e.ranks == list(range(int(e.name.split("/")[1]) % 7)) for e in entries)
    registry.record(_entry("after/kill", tmp_path))
    assert registry.latest().name == "after/kill"
