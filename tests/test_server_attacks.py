"""What an attack run found against the Hub-compatible server, each now refused: reading another repository's private
object through a forged LFS pointer (and learning whether objects exist), unbounded work for anonymous callers,
connections held open without a request, tokens echoed from URLs, file names clients cannot store, and malformed
bodies that gave 500s or dropped the connection. The real huggingface_hub client where it can make the request,
raw HTTP where it refuses to."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import threading
import time
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import CommitOperationAdd, HfApi

from lora_hub.server import Store, running


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("attacked")
    store = Store(root)
    tokens = {"alice": store.add_token("alice"), "bob": store.add_token("bob")}
    with running(root, multipart_chunk_size=1024 * 1024, head_timeout=1.0) as handle:
        yield handle, tokens


def _auth(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def _commit(url: str, repo: str, token: str, lines: list[dict]) -> httpx2.Response:
    body = "\n".join(json.dumps(line) for line in lines)
    return httpx2.post(f"{url}/api/models/{repo}/commit/main", content=body,
                       headers={**_auth(token), "content-type": "application/x-ndjson"})


def _file(path: str, content: bytes = b"x") -> dict:
    return {"key": "file", "value": {"path": path, "content": base64.b64encode(content).decode(),
                                     "encoding": "base64"}}


HEADER = {"key": "header", "value": {"summary": "test"}}


def test_a_forged_lfs_pointer_cannot_read_another_repositorys_private_object(server) -> None:
    handle, tokens = server
    alice, bob = HfApi(endpoint=handle.url, token=tokens["alice"]), HfApi(endpoint=handle.url, token=tokens["bob"])
    secret = b"\0private weights " + os.urandom(4096)
    oid, size = hashlib.sha256(secret).hexdigest(), len(secret)
    alice.create_repo("alice/private", private=True)
    alice.upload_file(path_or_fileobj=secret, path_in_repo="w.bin", repo_id="alice/private")
    bob.create_repo("bob/steal")

    forged = _commit(handle.url, "bob/steal", tokens["bob"], [
        HEADER, {"key": "lfsFile", "value": {"path": "stolen.bin", "oid": oid, "size": size, "algo": "sha256"}}])
    assert forged.status_code == 400 and "does not exist" in forged.json()["error"]
    assert bob.list_repo_files("bob/steal") == []
    download = httpx2.get(f"{handle.url}/bob/steal/resolve/main/stolen.bin", headers=_auth(tokens["bob"]))
    assert download.status_code == 404 and secret not in download.content

    # The batch API does not say the object exists elsewhere: it asks bob to upload it.
    batch = httpx2.post(f"{handle.url}/bob/steal.git/info/lfs/objects/batch", headers=_auth(tokens["bob"]),
                        json={"operation": "upload", "objects": [{"oid": oid, "size": size}]}).json()
    actions = batch["objects"][0]["actions"]
    assert "upload" in actions
    # Verification answers only for repositories the caller may write, and only for what they uploaded.
    assert httpx2.post(actions["verify"]["href"], headers=_auth(tokens["bob"]),
                       json={"oid": oid, "size": size}).status_code == 404
    alice_repo = Store(handle.root).repo("model", "alice", "private").id
    other = f"{handle.url}/api/lfs/{alice_repo}/{oid}/{size}/verify"
    assert httpx2.post(other, headers=_auth(tokens["bob"]), json={"oid": oid, "size": size}).status_code == 403
    assert httpx2.post(other, headers=_auth(tokens["alice"]), json={"oid": oid, "size": size}).status_code == 200
    # A signed URL of one repository does not record uploads for another.
    assert httpx2.put(actions["upload"]["href"].replace(f"/lfs/{actions['upload']['href'].split('/')[5]}/",
                                                        f"/lfs/{alice_repo}/"), content=secret).status_code == 403

    # Who has the bytes may commit them: uploading them makes them bob's too (stored once).
    bob.upload_file(path_or_fileobj=secret, path_in_repo="mine.bin", repo_id="bob/steal")
    assert bob.list_repo_files("bob/steal") == ["mine.bin"]


@pytest.mark.slow
def test_anonymous_work_is_bounded_and_never_stalls_the_server(server) -> None:
    handle, tokens = server
    started = time.perf_counter()
    card = "---\n" + "key: value\n" * (14 * 1024 * 1024 // 11) + "---\n"
    response = httpx2.post(f"{handle.url}/api/validate-yaml", json={"content": card}, timeout=60)
    assert response.status_code == 413 and time.perf_counter() - started < 10
    paths = "&".join(f"paths=p{i}" for i in range(1_860_000))
    HfApi(endpoint=handle.url, token=tokens["alice"]).create_repo("alice/public-info")
    started = time.perf_counter()
    response = httpx2.post(f"{handle.url}/api/models/alice/public-info/paths-info/main", content=paths,
                           headers={"content-type": "application/x-www-form-urlencoded"}, timeout=60)
    assert response.status_code in (400, 413) and time.perf_counter() - started < 10
    many = "&".join(f"paths=p{i}" for i in range(10_001))
    response = httpx2.post(f"{handle.url}/api/models/alice/public-info/paths-info/main", content=many,
                           headers={"content-type": "application/x-www-form-urlencoded"})
    assert response.status_code == 400 and "at most" in response.json()["error"]

    # A valid card with a big front matter is checked off the event loop: other requests go on meanwhile.
    front = "---\n" + "".join(f"k{i}: [{', '.join(['v'] * 20)}]\n" for i in range(12_000)) + "---\n"
    latencies: list[float] = []

    def whoami() -> None:
        for _ in range(20):
            start = time.perf_counter()
            httpx2.get(f"{handle.url}/api/whoami-v2", headers=_auth(tokens["alice"]))
            latencies.append(time.perf_counter() - start)

    thread = threading.Thread(target=whoami)
    thread.start()
    assert httpx2.post(f"{handle.url}/api/validate-yaml", json={"content": front}, timeout=60).status_code == 200
    thread.join()
    assert max(latencies) < 2.0, latencies


@pytest.mark.slow
def test_connections_without_a_request_are_closed(server) -> None:
    handle, tokens = server
    host, port = handle.url.removeprefix("http://").split(":")
    idle = [socket.create_connection((host, int(port))) for _ in range(200)]
    trickle = socket.create_connection((host, int(port)))
    started = time.perf_counter()
    with pytest.raises(OSError):  # a request head sent a byte at a time is cut off at the deadline
        for byte in b"GET /api/whoami-v2 HTTP/1.1\r\n" + b"X-Slow: " + b"x" * 1000:
            trickle.sendall(bytes([byte]))
            time.sleep(0.05)
    assert time.perf_counter() - started < 5
    assert httpx2.get(f"{handle.url}/api/whoami-v2", headers=_auth(tokens["alice"])).status_code == 200
    time.sleep(0.5)
    for sock in idle:
        sock.settimeout(5)
        try:
            assert sock.recv(1) == b""  # closed by the server
        except ConnectionResetError:
            pass
        sock.close()
    trickle.close()
    with httpx2.Client() as client:  # a kept-alive connection still serves several requests
        for _ in range(3):
            assert client.get(f"{handle.url}/api/whoami-v2", headers=_auth(tokens["alice"])).status_code == 200


def test_a_token_in_the_url_is_not_echoed(server) -> None:
    handle, _ = server
    secret = "hf_secretvalue1234567890"
    for url in (f"{handle.url}/api/models/alice/missing?token={secret}",
                f"{handle.url}/alice/missing/resolve/main/x.bin?access_token={secret}",
                f"{handle.url}/nowhere?token={secret}"):
        response = httpx2.get(url)
        assert 400 <= response.status_code < 500
        assert secret not in response.text and secret not in str(response.headers)


@pytest.mark.parametrize("paths", [["new\nline.txt"], ["C:evil"], ["dir/D:x"], ["tab\there"], ["del\x7f"],
                                   ["coll", "coll/x"], ["a/b", "a"], ["x" * 256]])
def test_names_clients_cannot_store_are_refused_and_nothing_is_committed(server, paths: list[str]) -> None:
    handle, tokens = server
    api = HfApi(endpoint=handle.url, token=tokens["alice"])
    api.create_repo("alice/names", exist_ok=True)
    before = api.model_info("alice/names").sha
    response = _commit(handle.url, "alice/names", tokens["alice"], [HEADER, _file("fine.txt")] +
                       [_file(p) for p in paths])
    assert response.status_code == 400 and "invalid file path" in response.json()["error"], response.text
    assert api.model_info("alice/names").sha == before


def test_a_file_beside_an_existing_folder_is_refused(server) -> None:
    handle, tokens = server
    api = HfApi(endpoint=handle.url, token=tokens["alice"])
    api.create_repo("alice/clash", exist_ok=True)
    api.create_commit("alice/clash", [CommitOperationAdd("coll/x", b"x")], commit_message="folder")
    response = _commit(handle.url, "alice/clash", tokens["alice"], [HEADER, _file("coll")])
    assert response.status_code == 400 and "also the folder" in response.json()["error"]


def _malformed(url: str, alice: str, repo_id: int) -> list[tuple[str, str, bytes, str | None]]:
    """(method, url, body, token) of requests with malformed bodies."""
    deep = b"[" * 100_000 + b"]" * 100_000
    api = f"{url}/api/models/alice/bodies"
    lfs = f"{url}/api/lfs/{repo_id}/{'ab' * 32}/10"
    cases = [
        ("POST", f"{url}/api/repos/create", b'["a"]', alice),
        ("POST", f"{url}/api/repos/create", b'{"name": ["x"]}', alice),
        ("POST", f"{url}/api/repos/create", b'{"name": "x", "organization": 5}', alice),
        ("POST", f"{url}/api/repos/create", deep, alice),
        ("DELETE", f"{url}/api/repos/delete", b'{"name": {"a": 1}}', alice),
        ("POST", f"{url}/api/validate-yaml", b'{"content": 5}', None),
        ("POST", f"{url}/api/validate-yaml", b'{"content": ["---"]}', None),
        ("POST", f"{url}/api/validate-yaml", deep, None),
        ("POST", f"{api}/preupload/main", b'{"files": ["a"]}', alice),
        ("POST", f"{api}/preupload/main", b'{"files": [{"path": 5, "size": 1}]}', alice),
        ("POST", f"{api}/preupload/main", b'{"files": [{"path": "a", "size": "1"}]}', alice),
        ("POST", f"{api}/preupload/main", b'{"files": [{"path": "a", "size": 1, "sample": 7}]}', alice),
        ("POST", f"{api}/commit/main", b'["x"]', alice),
        ("POST", f"{api}/commit/main", b'{"key": "file", "value": "x"}', alice),
        ("POST", f"{api}/commit/main", b'{"key": "header", "value": {"summary": 5}}', alice),
        ("POST", f"{api}/commit/main", b'{"key": "lfsFile", "value": {"path": "a", "oid": 5, "size": 1}}', alice),
        ("POST", f"{api}/commit/main", b'{"key": ["header"], "value": {}}', alice),
        ("POST", f"{url}/alice/bodies.git/info/lfs/objects/batch", b'{"operation": "upload", "objects": ["x"]}',
         alice),
        ("POST", f"{url}/alice/bodies.git/info/lfs/objects/batch", b'{"operation": 5}', alice),
        ("POST", f"{lfs}?expires=1&sig=0", b'{"parts": ["x"]}', None),
        ("POST", f"{api}/tag/main", b'{"tag": 5}', alice),
        ("POST", f"{api}/branch/dev", b'{"startingPoint": 5}', alice),
        ("POST", f"{api}/paths-info/main", b'[1, 2]', None),
        ("PUT", f"{api}/settings", b'{"private": "yes"}', alice),
        ("GET", f"{url}/api/models/alice/x%00y", b"", None),
        ("GET", f"{url}/alice/bodies/resolve/main/a%00b", b"", None),
        ("GET", f"{url}/alice/bodies/resolve/main/a%0Ab", b"", alice),
    ]
    return cases


def test_malformed_bodies_get_4xx_in_the_hubs_shape(server) -> None:
    handle, tokens = server
    HfApi(endpoint=handle.url, token=tokens["alice"]).create_repo("alice/bodies", exist_ok=True)
    repo_id = Store(handle.root).repo("model", "alice", "bodies").id
    for method, url, body, token in _malformed(handle.url, tokens["alice"], repo_id):
        headers = {"content-type": "application/json", **(_auth(token) if token else {})}
        response = httpx2.request(method, url, content=body, headers=headers, timeout=30)
        assert 400 <= response.status_code < 500, (method, url, body[:60], response.status_code, response.text)
        assert "error" in response.json() or "errors" in response.json(), (url, response.text)
        assert "x-error-message" in response.headers or response.status_code == 400
    assert HfApi(endpoint=handle.url, token=tokens["alice"]).model_info("alice/bodies").id == "alice/bodies"


def test_the_store_upgrades_an_old_database_and_keeps_old_objects_usable(tmp_path: Path) -> None:
    import sqlite3

    root = tmp_path / "old"
    store = Store(root)
    token = store.add_token("carol")
    data = b"\0old" * 1000
    with running(root) as handle:
        api = HfApi(endpoint=handle.url, token=token)
        api.create_repo("carol/old")
        api.upload_file(path_or_fileobj=data, path_in_repo="w.bin", repo_id="carol/old")
    with sqlite3.connect(root / "hub.db") as db:  # as a schema-1 store left it
        db.execute("DROP TABLE repo_objects")
        db.execute("PRAGMA user_version = 0")
    with running(root) as handle:
        api = HfApi(endpoint=handle.url, token=token)
        # the old object is the repository's: re-committing it needs no upload
        digest = hashlib.sha256(data).hexdigest()
        response = _commit(handle.url, "carol/old", token, [HEADER, {"key": "lfsFile", "value": {
            "path": "again.bin", "oid": digest, "size": len(data), "algo": "sha256"}}])
        assert response.status_code == 200, response.text
        assert sorted(api.list_repo_files("carol/old")) == ["again.bin", "w.bin"]
