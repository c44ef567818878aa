"""The local registry: records, lookups, order, removal, and its behaviour under concurrent and killed writers."""

from __future__ import annotations

import os
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


@pytest.mark.slow
def test_concurrent_writers_all_land(tmp_path: Path) -> None:
    writers = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), f"w{n}", "60"]) for n in range(3)]
    assert [w.wait(timeout=120) for w in writers] == [0, 0, 0]
    registry = Registry(tmp_path)
    registry.check()
    assert len(registry.list()) == 180


@pytest.mark.slow
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


def _damage(path: Path, how: str) -> None:
    if how == "directory":
        path.mkdir(parents=True)
        return
    Registry(path.parent).record(_entry("acme/a", path.parent))
    data = bytearray(path.read_bytes())
    if how == "garbage":
        data = bytearray(b"this is not a database at all " * 200)
    elif how == "bit-flipped":
        for offset in range(0, 100):  # the SQLite header: magic string, page size, format numbers
            data[offset] ^= 0x5A
    elif how == "truncated":
        data = data[:1000]
    path.write_bytes(bytes(data))
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["garbage", "bit-flipped", "truncated", "directory"])
def test_a_damaged_registry_gives_one_error_line_in_list_and_rm(how: str, tmp_path: Path) -> None:
    home = tmp_path / "home"
    _damage(home / "registry.db", how)
    for args in (["list"], ["rm", "acme/a"], ["list", "--json"]):
        result = subprocess.run([sys.executable, "-m", "lora_hub_cli", *args], capture_output=True, text=True,
                                env={**_env(), "LORA_HUB_HOME": str(home)}, timeout=120)
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "[REGISTRY_UNUSABLE]" in result.stderr and ("move it aside" in result.stderr), result.stderr
    with pytest.raises(RegistryError) as caught:
        Registry(home).list()
    assert caught.value.code == "REGISTRY_UNUSABLE"


def test_two_processes_opening_a_new_registry_at_once_both_succeed(tmp_path: Path) -> None:
    code = ("import sys; from lora_hub.registry import Registry, RegistryEntry; "
            "Registry(sys.argv[1]).record(RegistryEntry(name=sys.argv[2], path='/nowhere'))")
    for attempt in range(5):
        home = tmp_path / f"home{attempt}"
        processes = [subprocess.Popen([sys.executable, "-c", code, str(home), f"p/{n}"], stderr=subprocess.PIPE,
                                      text=True) for n in range(4)]
        errors = [p.communicate(timeout=120)[1] for p in processes]
        assert [p.returncode for p in processes] == [0, 0, 0, 0], errors
        assert len(Registry(home).list()) == 4


def test_reading_a_missing_registry_creates_nothing(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "nowhere" / "home")
    assert registry.list() == [] and "acme/a" not in registry
    assert not (tmp_path / "nowhere").exists()


def test_a_read_only_registry_lists_and_refuses_changes_with_one_line(tmp_path: Path) -> None:
    home = tmp_path / "home"
    Registry(home).record(_entry("acme/a", tmp_path))
    script = (f"{sys.executable} -m lora_hub_cli list; echo rc=$?; "
              f"{sys.executable} -m lora_hub_cli rm acme/a; echo rc=$?")
    if os.geteuid() == 0:  # root writes anywhere: make the folder read-only with a bind mount of its own
        command = ["unshare", "-m", "sh", "-c", f"mount --bind -o ro {home} {home} && {{ {script}; }}"]
        probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind -o ro {home} {home}"],
                               capture_output=True)
        if probe.returncode != 0:
            pytest.skip("root without mount namespaces: a read-only folder cannot be made here")
    else:
        home.chmod(0o555)
        (home / "registry.db").chmod(0o444)
        command = ["sh", "-c", script]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=120,
                                env={**_env(), "LORA_HUB_HOME": str(home)})
    finally:
        home.chmod(0o755)
    assert "acme/a" in result.stdout and "rc=0" in result.stdout.splitlines()[-2], result
    assert result.stdout.splitlines()[-1] == "rc=1", result
    assert "Traceback" not in result.stderr and "[REGISTRY_UNUSABLE]" in result.stderr, result.stderr
    assert "read-only" in result.stderr
    assert [e.name for e in Registry(home).list()] == ["acme/a"]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "LORA_HUB_DEBUG"}
