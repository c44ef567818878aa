"""push / pull with the real huggingface_hub client, PEFT and transformers against `lora-hub serve` (a subprocess on
127.0.0.1): round trips bit for bit, old revisions, private repositories, plain PEFT repositories, validation on
arrival, offline use, a server killed mid-download, and two processes pulling at once."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, constants, hf_hub_download
from huggingface_hub import errors as hf_errors
from peft import PeftModel

import lora_hub
from lora_hub.registry import Registry
from lora_hub.testing import random_peft_adapter, tiny_model

from .conftest import Hub, _free_port, start_server

INPUT = torch.tensor([[1, 5, 9, 2, 7, 3]])


def _adapter(tmp_path: Path, base_dir: Path, seed: int, **options) -> lora_hub.Adapter:
    peft_dir = random_peft_adapter(tiny_model("llama"), tmp_path / f"peft-{seed}", seed=seed, **options)
    return lora_hub.convert_adapter(peft_dir, base=str(base_dir))


def _logits_lora_hub(source) -> torch.Tensor:
    runtime = lora_hub.attach(tiny_model("llama"))
    runtime.load("a", source)
    runtime.use("a")
    with torch.no_grad():
        return runtime.model(INPUT).logits


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_push_then_pull_is_bit_exact_and_peft_and_transformers_load_the_repo(hub: Hub, base_dirs, tmp_path,
                                                                            monkeypatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)  # push must turn Xet off for a non-Hub endpoint
    adapter = _adapter(tmp_path, base_dirs["llama"], seed=1)
    result = lora_hub.push(adapter, "alice/roundtrip", token=hub.alice)
    assert result.url == f"{hub.endpoint}/alice/roundtrip" and len(result.commit) == 40

    files = sorted(HfApi(token=hub.alice).list_repo_files("alice/roundtrip"))
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    card = Path(hf_hub_download("alice/roundtrip", "README.md")).read_text()
    assert "library_name: peft" in card and '- "lora-hub"' in card
    assert f'base_model: "{base_dirs["llama"]}"' in card

    path = lora_hub.pull("alice/roundtrip")
    pulled = lora_hub.load_adapter(path)
    assert pulled.config.modules == adapter.config.modules
    assert set(pulled.tensors) == set(adapter.tensors)
    assert all(torch.equal(pulled.tensors[k], adapter.tensors[k]) for k in adapter.tensors)
    saved = lora_hub.save_adapter(adapter, tmp_path / "local.safetensors")
    assert _sha256(path) == _sha256(saved)

    entry = Registry().get("alice/roundtrip")
    assert (entry.repo_id, entry.commit_sha, entry.sha256, entry.valid) == \
        ("alice/roundtrip", result.commit, _sha256(path), True)
    assert entry.ranks == [4] and "q_proj" in entry.targets and entry.base_model == str(base_dirs["llama"])
    assert entry.size == path.stat().st_size and entry.source == hub.endpoint

    ours = _logits_lora_hub("alice/roundtrip")
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(tiny_model("llama"), "alice/roundtrip").eval()(INPUT).logits
        model = tiny_model("llama")
        model.load_adapter("alice/roundtrip")
        transformers_logits = model(INPUT).logits
        base = tiny_model("llama")(INPUT).logits
    assert torch.equal(ours, peft_logits) and torch.equal(ours, transformers_logits)
    assert not torch.allclose(ours, base)


def test_old_revisions_stay_resolvable(hub: Hub, base_dirs, tmp_path) -> None:
    first = lora_hub.push(_adapter(tmp_path, base_dirs["llama"], seed=2), "alice/history", token=hub.alice)
    second = lora_hub.push(_adapter(tmp_path, base_dirs["llama"], seed=3), "alice/history", token=hub.alice,
                           commit_message="second version")
    HfApi(token=hub.alice).create_tag("alice/history", tag="v1", revision=first.commit)
    latest = lora_hub.pull("alice/history")
    old = lora_hub.pull("alice/history", revision=first.commit)
    tagged = lora_hub.pull("alice/history", revision="v1")
    assert Registry().get("alice/history").commit_sha == second.commit
    assert Registry().get(f"alice/history@{first.commit}").commit_sha == first.commit
    assert _sha256(old) == _sha256(tagged) != _sha256(latest)
    assert torch.equal(_logits_lora_hub(old), _logits_lora_hub(tagged))
    titles = [c.title for c in HfApi().list_repo_commits("alice/history")]
    assert titles[:2] == ["second version", "Upload adapter with lora-hub"]
    with pytest.raises(lora_hub.RevisionNotFoundError):
        lora_hub.pull("alice/history", revision="no-such-branch")


def test_push_to_a_branch_leaves_main_alone(hub: Hub, base_dirs, tmp_path) -> None:
    on_main = lora_hub.push(_adapter(tmp_path, base_dirs["llama"], seed=14), "alice/branches", token=hub.alice)
    on_dev = lora_hub.push(_adapter(tmp_path, base_dirs["llama"], seed=15), "alice/branches", token=hub.alice,
                           branch="dev")
    assert on_dev.revision == "dev" and on_dev.commit != on_main.commit
    assert Registry().list() == []
    main, dev = lora_hub.pull("alice/branches"), lora_hub.pull("alice/branches", revision="dev")
    assert Registry().get("alice/branches").commit_sha == on_main.commit
    assert Registry().get("alice/branches@dev").commit_sha == on_dev.commit
    assert _sha256(main) != _sha256(dev)


def test_private_repositories_need_a_token_of_their_owner(hub: Hub, base_dirs, tmp_path) -> None:
    lora_hub.push(_adapter(tmp_path, base_dirs["llama"], seed=4), "alice/secret", private=True, token=hub.alice)
    with pytest.raises(hf_errors.RepositoryNotFoundError):
        hf_hub_download("alice/secret", "adapter_config.json", token=False, cache_dir=tmp_path / "c1")
    with pytest.raises(lora_hub.RepoNotFoundError, match="pass a token if it is private"):
        lora_hub.pull("alice/secret", cache_dir=tmp_path / "c2")
    with pytest.raises(lora_hub.RepoNotFoundError):
        lora_hub.pull("alice/secret", token=hub.bob, cache_dir=tmp_path / "c3")
    assert lora_hub.pull("alice/secret", token=hub.alice_read, cache_dir=tmp_path / "c4").is_file()
    assert lora_hub.pull("alice/secret", api=HfApi(token=hub.alice), cache_dir=tmp_path / "c5").is_file()
    with pytest.raises(lora_hub.HubAccessError):
        lora_hub.push(_adapter(tmp_path, base_dirs["llama"], seed=5), "alice/secret", token=hub.alice_read)
    with pytest.raises(lora_hub.HubAccessError):
        lora_hub.push(_adapter(tmp_path, base_dirs["llama"], seed=5), "alice/other", token=hub.bob)


def test_a_plain_peft_repository_pulls_as_a_folder_and_loads(hub: Hub, tmp_path) -> None:
    peft_dir = random_peft_adapter(tiny_model("llama"), tmp_path / "peft", seed=6)
    api = HfApi(token=hub.bob)
    api.create_repo("bob/plain-peft")
    api.upload_folder(folder_path=peft_dir, repo_id="bob/plain-peft")
    path = lora_hub.pull("bob/plain-peft")
    assert path.is_dir() and sorted(p.name for p in path.iterdir()) == ["adapter_config.json",
                                                                        "adapter_model.safetensors"]
    with torch.no_grad():
        expected = PeftModel.from_pretrained(tiny_model("llama"), peft_dir).eval()(INPUT).logits
    assert torch.equal(_logits_lora_hub("bob/plain-peft"), expected)
    assert Registry().get("bob/plain-peft").ranks == [4]


def test_a_legacy_pickle_repository_is_refused_unless_forced(hub: Hub, tmp_path) -> None:
    peft_dir = random_peft_adapter(tiny_model("llama"), tmp_path / "legacy", seed=7, safe_serialization=False)
    api = HfApi(token=hub.bob)
    api.create_repo("bob/legacy")
    api.upload_folder(folder_path=peft_dir, repo_id="bob/legacy")
    with pytest.raises(lora_hub.AdapterRejectedError, match="PICKLE_REFUSED"):
        lora_hub.pull("bob/legacy")
    assert "bob/legacy" not in Registry()
    path = lora_hub.pull("bob/legacy", force=True)
    entry = Registry().get("bob/legacy")
    assert (entry.valid, entry.findings, Path(entry.path)) == (False, ["PICKLE_REFUSED"], path)
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.bin"]


def test_an_invalid_file_is_refused_and_not_registered(hub: Hub, base_dirs, tmp_path) -> None:
    saved = lora_hub.save_adapter(_adapter(tmp_path, base_dirs["llama"], seed=8), tmp_path / "a.safetensors")
    data = bytearray(saved.read_bytes())
    data[-1] ^= 0xFF  # a flipped bit in the last tensor: the checksum catches it
    api = HfApi(token=hub.bob)
    api.create_repo("bob/corrupt")
    api.upload_file(path_or_fileobj=bytes(data), path_in_repo="adapter_model.safetensors", repo_id="bob/corrupt")
    with pytest.raises(lora_hub.AdapterRejectedError, match="CHECKSUM_MISMATCH") as caught:
        lora_hub.pull("bob/corrupt")
    assert caught.value.code == "ADAPTER_REJECTED" and "bob/corrupt" not in Registry()
    lora_hub.pull("bob/corrupt", force=True)
    assert Registry().get("bob/corrupt").findings == ["CHECKSUM_MISMATCH"]


def test_a_repository_without_an_adapter_and_bad_repo_ids(hub: Hub, tmp_path) -> None:
    api = HfApi(token=hub.bob)
    api.create_repo("bob/not-an-adapter")
    api.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id="bob/not-an-adapter")
    with pytest.raises(lora_hub.NotAnAdapterRepoError):
        lora_hub.pull("bob/not-an-adapter")
    for bad in ("../../etc", "alice", "alice/../x", "a/b/c", "/abs/x", "alice/sql\n"):
        with pytest.raises(lora_hub.RepoIdError):
            lora_hub.pull(bad)
    with pytest.raises(lora_hub.RepoNotFoundError):
        lora_hub.pull("alice/never-created")


def test_pull_works_offline_from_the_cache(hub: Hub, base_dirs, tmp_path, monkeypatch) -> None:
    lora_hub.push(_adapter(tmp_path, base_dirs["llama"], seed=9), "alice/offline", token=hub.alice)
    online = lora_hub.pull("alice/offline", cache_dir=tmp_path / "cache")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert lora_hub.pull("alice/offline", cache_dir=tmp_path / "cache") == online
    with pytest.raises(lora_hub.NotCachedError, match="HF_HUB_OFFLINE"):
        lora_hub.pull("alice/offline", cache_dir=tmp_path / "empty-cache")


def test_load_and_apply_resolve_registry_names(hub: Hub, base_dirs, tmp_path) -> None:
    adapter = _adapter(tmp_path, base_dirs["llama"], seed=10)
    lora_hub.push(adapter, "alice/by-name", token=hub.alice)
    lora_hub.pull("alice/by-name", revision="main")
    assert torch.equal(_logits_lora_hub("alice/by-name@main"), _logits_lora_hub(adapter))
    for missing in ("not a name", "adapters/sql.safetensors"):  # a mistyped path is not looked up on the Hub
        with pytest.raises(lora_hub.AdapterNotFoundError, match="registry name"):
            _logits_lora_hub(missing)


@pytest.mark.slow
def test_the_server_killed_mid_download_leaves_no_corrupt_cache_entry(hub: Hub, base_dirs, tmp_path) -> None:
    root = tmp_path / "server"
    from lora_hub.server import Store

    token = Store(root).add_token("carol")
    port = _free_port()
    server = start_server(root, port)
    endpoint = f"http://127.0.0.1:{port}"
    adapter = _adapter(tmp_path, base_dirs["llama"], seed=11, r=64)
    lora_hub.push(adapter, "carol/big", token=token, endpoint=endpoint)
    proxy = _CuttingProxy(endpoint, cut_after=20_000, on_cut=server.kill)
    cache = tmp_path / "cache"
    try:
        with pytest.raises(lora_hub.HubUnreachableError):
            lora_hub.pull("carol/big", endpoint=proxy.url, cache_dir=cache)
    finally:
        proxy.close()
        server.wait()
    blobs = cache / "models--carol--big" / "blobs"
    complete = [p for p in blobs.iterdir() if not p.name.endswith((".incomplete", ".partial"))]
    for blob in complete:  # each finished blob is named by its hash (LFS: sha256; regular: git blob sha1)
        data = blob.read_bytes()
        assert blob.name in (hashlib.sha256(data).hexdigest(),
                             hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest())
    saved = lora_hub.save_adapter(adapter, tmp_path / "expected.safetensors")
    partial = blobs / f"{_sha256(saved)}.partial"  # what arrived is kept under one name, to be continued
    assert 0 < partial.stat().st_size < saved.stat().st_size
    assert saved.read_bytes().startswith(partial.read_bytes())
    assert not list((cache / "models--carol--big" / "snapshots").glob("*/adapter_model.safetensors"))
    assert "carol/big" not in Registry()

    server = start_server(root, port)
    try:
        path = lora_hub.pull("carol/big", endpoint=endpoint, cache_dir=cache)
    finally:
        server.terminate()
        server.wait()
    assert _sha256(path) == _sha256(saved)
    assert not [p for p in blobs.iterdir() if p.name.endswith((".incomplete", ".partial"))]


_PULL = "import lora_hub, sys; lora_hub.pull(sys.argv[1], endpoint=sys.argv[2], cache_dir=sys.argv[3])"


@pytest.mark.slow
def test_a_killed_pull_is_resumed_with_a_range_request_and_verified(hub: Hub, base_dirs, tmp_path) -> None:
    import signal
    import time

    adapter = _adapter(tmp_path, base_dirs["llama"], seed=14, r=64)
    lora_hub.push(adapter, "alice/resume", token=hub.alice)
    expected = lora_hub.save_adapter(adapter, tmp_path / "expected.safetensors")
    size, digest = expected.stat().st_size, _sha256(expected)
    cache = tmp_path / "cache"
    partial = cache / "models--alice--resume" / "blobs" / f"{digest}.partial"
    stale = cache / "models--alice--resume" / "blobs" / "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391.1a2b3c4d.incomplete"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"left by a killed client download")
    proxy = _SlowProxy(hub.endpoint, bytes_per_second=200_000)
    try:
        process = subprocess.Popen([sys.executable, "-c", _PULL, "alice/resume", proxy.url, str(cache)],
                                   env={**os.environ, "HF_TOKEN": hub.alice})
        deadline = time.monotonic() + 60
        while not (partial.exists() and partial.stat().st_size > size // 4) and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
        kept = partial.stat().st_size
        assert 0 < kept < size
        proxy.requests.clear()
        sent_before = proxy.sent
        path = lora_hub.pull("alice/resume", endpoint=proxy.url, cache_dir=cache, token=hub.alice)
        assert any(f"range: bytes={kept}-" in head.lower() for head in proxy.requests), proxy.requests
        assert proxy.sent - sent_before < size - kept + 100_000  # the rest, not the whole file again
    finally:
        proxy.close()
    assert _sha256(path) == digest and not partial.exists()
    assert not list(partial.parent.glob("*.incomplete"))
    # a partial file that does not hash right is discarded, never moved into place
    lora_hub.Registry().remove("alice/resume")
    other = tmp_path / "cache2"
    bad = other / "models--alice--resume" / "blobs" / f"{digest}.partial"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"\0" * 1000)  # not the file's first bytes
    with pytest.raises(lora_hub.HubUnreachableError, match="discarded"):
        lora_hub.pull("alice/resume", cache_dir=other, token=hub.alice)
    assert not bad.exists()
    assert _sha256(lora_hub.pull("alice/resume", cache_dir=other, token=hub.alice)) == digest


@pytest.mark.slow
def test_two_processes_pulling_the_same_repo_both_succeed(hub: Hub, base_dirs, tmp_path) -> None:
    lora_hub.push(_adapter(tmp_path, base_dirs["llama"], seed=12, r=32), "alice/race", token=hub.alice)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "cache")}
    code = "import lora_hub, sys; print(lora_hub.pull('alice/race'))"
    processes = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    paths = {out.strip().splitlines()[-1] for out, _ in outputs}
    assert len(paths) == 1
    registry = Registry()
    registry.check()
    assert [e.name for e in registry.list()] == ["alice/race"]
    assert registry.get("alice/race").sha256 == _sha256(Path(paths.pop()))


def test_push_refuses_an_adapter_that_fails_validation(hub: Hub, tmp_path) -> None:
    with pytest.raises(lora_hub.AdapterNotFoundError):
        lora_hub.push(tmp_path / "missing.safetensors", "alice/x", token=hub.alice)
    with pytest.raises(lora_hub.RepoIdError):
        lora_hub.push(tmp_path / "missing.safetensors", "alice/../x", token=hub.alice)


class _CuttingProxy:
    """A TCP relay to the server that, once `cut_after` bytes of responses have passed on one connection, calls
    `on_cut` (which kills the server) and drops the connection: the server dying in the middle of a download."""

    def __init__(self, endpoint: str, *, cut_after: int, on_cut) -> None:
        import socket

        host, port = endpoint.rsplit("//", 1)[1].split(":")
        self.upstream = (host, int(port))
        self.cut_after, self.on_cut = cut_after, on_cut
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket

        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._pipe, args=(client, server, None), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, self.cut_after), daemon=True).start()

    def _pipe(self, source, target, limit) -> None:
        sent = 0
        try:
            while data := source.recv(65536):
                if limit is not None and sent + len(data) > limit:
                    target.sendall(data[:max(0, limit - sent)])
                    self.on_cut()
                    break
                target.sendall(data)
                sent += len(data)
        except OSError:
            pass
        import socket

        for sock in (source, target):
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the other direction's thread, and tells the client
            except OSError:
                pass
            sock.close()

    def close(self) -> None:
        self.closed = True
        self.listener.close()


class _SlowProxy(_CuttingProxy):
    """A TCP relay that passes responses at `bytes_per_second`, records the request heads it relays, and counts the
    response bytes it sent."""

    def __init__(self, endpoint: str, *, bytes_per_second: int) -> None:
        self.rate, self.requests, self.sent = bytes_per_second, [], 0
        super().__init__(endpoint, cut_after=None, on_cut=lambda: None)

    def _pipe(self, source, target, limit) -> None:
        import socket
        import time

        upstream = limit is None and source.getpeername()[1] == self.upstream[1]
        try:
            while data := source.recv(16384):
                if upstream:
                    time.sleep(len(data) / self.rate)
                    self.sent += len(data)
                else:
                    self.requests.append(data.decode("latin-1"))
                target.sendall(data)
        except OSError:
            pass
        for sock in (source, target):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


def test_model_card_front_matter_is_valid_yaml(base_dirs, tmp_path) -> None:
    import yaml

    from lora_hub.hub import model_card

    adapter = _adapter(tmp_path, base_dirs["llama"], seed=13)
    card = model_card(adapter, "alice/card")
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "peft" and {"lora", "lora-hub"} <= set(front["tags"])
    assert front["base_model"] == str(base_dirs["llama"])
    assert 'PeftModel.from_pretrained(base_model, "alice/card")' in card
    assert json.loads(json.dumps(front)) == front


def test_one_repository_serves_peft_llama_cpp_and_mlx_users(hub: Hub, base_dirs, tmp_path) -> None:
    """push --with gguf,mlx writes the three forms in one commit; pull --form fetches the one asked for, from the
    same commit, and each reads back as the adapter pushed."""
    adapter = _adapter(tmp_path, base_dirs["llama"], seed=21, use_rslora=True)
    lora_hub.push(adapter, "alice/everywhere", token=hub.alice, with_forms=["gguf", "mlx"])
    files = sorted(HfApi(token=hub.alice).list_repo_files("alice/everywhere"))
    assert files == ["README.md", "adapter.gguf", "adapter_config.json", "adapter_model.safetensors",
                     "mlx/adapter_config.json", "mlx/adapters.safetensors"]
    card = Path(hf_hub_download("alice/everywhere", "README.md")).read_text()
    assert "--form gguf" in card and "--form mlx" in card
    gguf_path = lora_hub.pull("alice/everywhere", form="gguf")
    mlx_path = lora_hub.pull("alice/everywhere", form="mlx")
    assert gguf_path.name == "adapter.gguf" and (mlx_path / "adapters.safetensors").is_file()
    assert Registry().get("alice/everywhere").valid  # registered from its PEFT form
    for path in (gguf_path, mlx_path):
        back = lora_hub.convert_adapter(path, base=base_dirs["llama"])
        for module in adapter.modules:
            assert torch.allclose(back.delta_weight(module), adapter.delta_weight(module), atol=1e-6)
    lora_hub.push(_adapter(tmp_path, base_dirs["llama"], seed=22), "alice/peft-only", token=hub.alice)
    with pytest.raises(lora_hub.FormMissingError, match="--with gguf"):
        lora_hub.pull("alice/peft-only", form="gguf")
    tied = tmp_path / "tied"
    tiny_model("llama", tie_word_embeddings=True).save_pretrained(tied)
    embedding = lora_hub.convert_adapter(random_peft_adapter(
        tiny_model("llama", tie_word_embeddings=True), tmp_path / "emb", target_modules=["q_proj", "embed_tokens"]),
        base=tied)
    with pytest.raises(lora_hub.ExportError) as refused:
        lora_hub.push(embedding, "alice/refused", token=hub.alice, with_forms=["gguf"], base=tied)
    assert refused.value.code == "LLAMA_CPP_TIED"
    with pytest.raises(hf_errors.RepositoryNotFoundError):  # nothing was pushed
        HfApi(token=hub.alice).list_repo_files("alice/refused")
