"""The Hub-compatible server on its own: LFS uploads (basic and multipart), ranges, listings, refs, pull requests,
and the requests it must refuse (path traversal, unsigned uploads, stale parents, bad hashes) without leaving
anything half-done. The real huggingface_hub client where it can make the request, raw HTTP where it refuses to."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download
from huggingface_hub import errors as hf_errors

from lora_hub.server import Store, running, token_file

CHUNK = 1024 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("server")
    token = Store(root).add_token("dana")
    with running(root, multipart_chunk_size=CHUNK) as handle:
        yield handle, token


def _api(server) -> HfApi:
    handle, token = server
    return HfApi(endpoint=handle.url, token=token)


def test_multipart_lfs_upload_then_ranged_download(server, tmp_path: Path) -> None:
    handle, token = server
    api = _api(server)
    api.create_repo("dana/multipart")
    data = b"\0" + os.urandom(3 * CHUNK + 12345)  # binary: LFS; over the chunk size: four parts
    api.upload_file(path_or_fileobj=data, path_in_repo="weights/big.bin", repo_id="dana/multipart")
    info = api.model_info("dana/multipart", files_metadata=True)
    big = next(s for s in info.siblings if s.rfilename == "weights/big.bin")
    assert big.size == len(data) and big.lfs.sha256 == hashlib.sha256(data).hexdigest()
    path = hf_hub_download("dana/multipart", "weights/big.bin", endpoint=handle.url, token=token,
                           cache_dir=tmp_path)
    assert Path(path).read_bytes() == data
    assert Path(path).resolve().name == hashlib.sha256(data).hexdigest()  # the cache is keyed by X-Linked-Etag

    url = f"{handle.url}/dana/multipart/resolve/main/weights/big.bin"
    auth = {"authorization": f"Bearer {token}"}
    part = httpx2.get(url, headers={**auth, "range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == data[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(data)}"
    tail = httpx2.get(url, headers={**auth, "range": "bytes=-10"})
    assert tail.status_code == 206 and tail.content == data[-10:]
    assert httpx2.get(url, headers={**auth, "range": f"bytes={len(data)}-"}).status_code == 416
    head = httpx2.head(url, headers=auth)
    assert head.headers["x-linked-size"] == str(len(data)) and "x-xet-hash" not in head.headers
    assert len(head.headers["x-repo-commit"]) == 40


def test_listings_refs_commits_branches_tags_and_pull_requests(server) -> None:
    api = _api(server)
    api.create_repo("dana/listing")
    first = api.create_commit("dana/listing", [CommitOperationAdd("a/b/c.txt", b"c"),
                                               CommitOperationAdd("top.txt", b"t")], commit_message="first")
    assert sorted(api.list_repo_files("dana/listing")) == ["a/b/c.txt", "top.txt"]
    shallow = {item.path for item in api.list_repo_tree("dana/listing")}
    assert {"a", "top.txt"} <= shallow and "a/b/c.txt" not in shallow
    assert {item.path for item in api.list_repo_tree("dana/listing", path_in_repo="a", recursive=True)} == \
        {"a/b", "a/b/c.txt"}
    api.create_branch("dana/listing", branch="dev")
    api.create_tag("dana/listing", tag="v1")
    pr = api.create_commit("dana/listing", [CommitOperationAdd("top.txt", b"changed")], commit_message="proposal",
                           create_pr=True)
    assert pr.pr_num == 1
    refs = api.list_repo_refs("dana/listing", include_pull_requests=True)
    assert {b.name for b in refs.branches} == {"main", "dev"} and [t.name for t in refs.tags] == ["v1"]
    assert [p.ref for p in refs.pull_requests] == ["refs/pr/1"]
    main = hf_hub_download("dana/listing", "top.txt", endpoint=api.endpoint, token=api.token)
    in_pr = hf_hub_download("dana/listing", "top.txt", revision="refs/pr/1", endpoint=api.endpoint, token=api.token)
    assert Path(main).read_bytes() == b"t" and Path(in_pr).read_bytes() == b"changed"
    assert [c.title for c in api.list_repo_commits("dana/listing")][0] == "first"
    assert api.model_info("dana/listing", revision=first.oid).sha == first.oid
    with pytest.raises(hf_errors.RemoteEntryNotFoundError):
        api.delete_file("missing.txt", repo_id="dana/listing")
    with pytest.raises(hf_errors.RevisionNotFoundError):
        api.model_info("dana/listing", revision="nope")


def _commit(handle, token: str, repo: str, lines: list[dict]) -> httpx2.Response:
    body = "\n".join(json.dumps(line) for line in lines)
    return httpx2.post(f"{handle.url}/api/models/{repo}/commit/main", content=body,
                       headers={"authorization": f"Bearer {token}", "content-type": "application/x-ndjson"})


@pytest.mark.parametrize("path", ["../escape.txt", "a/../../escape.txt", "/etc/passwd", "a//b", "a\\..\\b", "./x"])
def test_path_traversal_is_refused_and_nothing_is_committed(server, path: str) -> None:
    handle, token = server
    api = _api(server)
    api.create_repo("dana/traversal", exist_ok=True)
    before = api.model_info("dana/traversal").sha
    header = {"key": "header", "value": {"summary": "evil"}}
    ok = {"key": "file", "value": {"path": "fine.txt", "content": base64.b64encode(b"x").decode(),
                                   "encoding": "base64"}}
    evil = {"key": "file", "value": {"path": path, "content": base64.b64encode(b"x").decode(), "encoding": "base64"}}
    response = _commit(handle, token, "dana/traversal", [header, ok, evil])
    assert response.status_code == 400 and "invalid file path" in response.json()["error"]
    assert api.model_info("dana/traversal").sha == before  # the valid file in the same commit was not committed
    assert not any("escape" in p.name for p in handle.root.rglob("*"))


def test_the_client_refuses_traversal_names_too() -> None:
    with pytest.raises(ValueError):
        CommitOperationAdd("../escape.txt", b"x")


def test_refusals_stale_parent_unknown_lfs_object_unsigned_upload_bad_hash(server) -> None:
    handle, token = server
    api = _api(server)
    api.create_repo("dana/refusals")
    first = api.create_commit("dana/refusals", [CommitOperationAdd("a.txt", b"1")], commit_message="one")
    api.create_commit("dana/refusals", [CommitOperationAdd("a.txt", b"2")], commit_message="two")
    stale = _commit(handle, token, "dana/refusals", [{"key": "header", "value": {"summary": "late",
                                                                                 "parentCommit": first.oid}}])
    assert stale.status_code == 412
    with pytest.raises(hf_errors.HfHubHTTPError):
        api.create_commit("dana/refusals", [CommitOperationAdd("b.txt", b"3")], commit_message="stale",
                          parent_commit=first.oid)

    oid = "ab" * 32
    ghost = _commit(handle, token, "dana/refusals", [{"key": "header", "value": {"summary": "ghost"}},
                                                     {"key": "lfsFile", "value": {"path": "g.bin", "oid": oid,
                                                                                  "size": 10, "algo": "sha256"}}])
    assert ghost.status_code == 400 and "does not exist" in ghost.json()["error"]

    data = b"payload" * 1000
    digest = hashlib.sha256(data).hexdigest()
    batch = httpx2.post(f"{handle.url}/dana/refusals.git/info/lfs/objects/batch",
                        json={"operation": "upload", "transfers": ["basic"],
                              "objects": [{"oid": digest, "size": len(data)}]},
                        headers={"authorization": f"Bearer {token}"}).json()
    href = batch["objects"][0]["actions"]["upload"]["href"]
    assert httpx2.put(href.split("?")[0], content=data).status_code == 403
    assert httpx2.put(href.replace("expires=", "expires=9"), content=data).status_code == 403
    wrong = httpx2.put(href, content=data[:-1] + b"!")
    assert wrong.status_code == 400 and "sha256 mismatch" in wrong.json()["error"]
    assert not Store(handle.root).has_object(digest)
    assert not list((handle.root / "tmp").glob("upload-*"))
    assert httpx2.put(href, content=data).status_code == 200
    assert Store(handle.root).has_object(digest, len(data))


def test_write_access_needs_a_write_token_of_the_namespace(server, tmp_path: Path) -> None:
    handle, _ = server
    store = Store(handle.root)
    reader, other = store.add_token("dana", write=False), store.add_token("eve")
    with pytest.raises(hf_errors.HfHubHTTPError) as caught:
        HfApi(endpoint=handle.url, token=reader).create_repo("dana/readonly")
    assert caught.value.response.status_code == 403
    with pytest.raises(hf_errors.HfHubHTTPError):
        HfApi(endpoint=handle.url, token=other).create_repo("dana/not-yours")
    with pytest.raises(hf_errors.HfHubHTTPError, match="Invalid"):
        HfApi(endpoint=handle.url, token="hf_wrong").whoami()
    assert HfApi(endpoint=handle.url, token=reader).whoami()["auth"]["accessToken"]["role"] == "read"
    path = token_file(tmp_path / "fresh", "frank")
    assert path.stat().st_mode & 0o777 == 0o600
    assert Store(tmp_path / "fresh").user(path.read_text()).name == "frank"


def test_concurrent_clients_commit_to_their_own_repositories(server) -> None:
    api = _api(server)
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            api.create_repo(f"dana/concurrent-{n}")
            for k in range(3):
                api.upload_file(path_or_fileobj=b"\0" + os.urandom(2 * CHUNK + n), path_in_repo=f"f{k}.bin",
                                repo_id=f"dana/concurrent-{n}")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for n in range(4):
        files = api.list_repo_files(f"dana/concurrent-{n}")
        assert {"f0.bin", "f1.bin", "f2.bin"} <= set(files)
        assert len(api.list_repo_commits(f"dana/concurrent-{n}")) == 4


def test_paths_info_visibility_settings_and_repository_deletion(server) -> None:
    handle, token = server
    api = _api(server)
    api.create_repo("dana/settings")
    api.create_commit("dana/settings", [CommitOperationAdd("dir/a.txt", b"a"), CommitOperationAdd("b.bin", b"\0b")],
                      commit_message="files")
    infos = {info.path: info for info in api.get_paths_info("dana/settings", ["dir", "b.bin", "missing"])}
    assert set(infos) == {"dir", "b.bin"} and infos["b.bin"].size == 2
    anonymous = HfApi(endpoint=handle.url, token=False)
    assert anonymous.model_info("dana/settings").private is False
    api.update_repo_settings("dana/settings", private=True)
    with pytest.raises(hf_errors.RepositoryNotFoundError):
        anonymous.model_info("dana/settings")
    assert api.model_info("dana/settings").private is True
    api.delete_repo("dana/settings")
    with pytest.raises(hf_errors.RepositoryNotFoundError):
        api.model_info("dana/settings")
    api.create_repo("dana/settings")  # the name is free again, and the new repository starts empty
    assert api.list_repo_files("dana/settings") == []
