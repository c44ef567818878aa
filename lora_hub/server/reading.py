"""Reading a repository: who am I, repository information, tree listings, paths-info, refs, commit history, and
downloads (`resolve`, with ranges). Anonymous callers reach these, so each one's work is bounded by the request.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response, StreamingResponse

from .protocol import byte_range, error, iso, parse_json_object, read_body, read_range
from .store import Commit, FileEntry, StoreError

if TYPE_CHECKING:
    from .app import Call, HubApp

MAX_PATHS = 10_000
"""The most paths one paths-info request may ask about."""


async def harnesses(hub: HubApp, call: Call) -> Response:
    return JSONResponse({"standardEnvVars": [], "harnesses": {}})


async def whoami(hub: HubApp, call: Call) -> Response:
    if call.user is None:
        return error(401, "Invalid user token: pass a token (token= or HF_TOKEN)")
    role = "write" if call.user.write else "read"
    return JSONResponse({"type": "user", "name": call.user.name, "fullname": call.user.name, "orgs": [],
                         "auth": {"type": "access_token", "accessToken": {"displayName": "lora-hub",
                                                                          "role": role}}})


async def repo_info(hub: HubApp, call: Call) -> Response:
    repo = hub.repo(call)
    commit = hub.store.resolve(repo, call.params.get("rev", "main"))
    blobs = call.request.query_params.get("blobs") == "true"
    siblings = []
    for path, entry in sorted(commit.files.items()):
        sibling: dict[str, Any] = {"rfilename": path}
        if blobs:
            sibling.update(size=entry.size, blobId=entry.tree_oid)
            if entry.lfs:
                sibling["lfs"] = _lfs_info(entry)
        siblings.append(sibling)
    return JSONResponse({
        "id": repo.repo_id, "_id": f"{repo.id:024x}", "modelId": repo.repo_id, "author": repo.namespace,
        "sha": commit.oid, "private": repo.private, "gated": False, "disabled": False,
        "lastModified": iso(commit.date), "createdAt": iso(repo.created), "tags": [], "downloads": 0,
        "likes": 0, "siblings": siblings,
    })


async def tree(hub: HubApp, call: Call) -> Response:
    repo = hub.repo(call)
    commit = hub.store.resolve(repo, call.params["rev"])
    recursive = call.request.query_params.get("recursive", "false").lower() in ("1", "true")
    return JSONResponse(listing(commit, call.params.get("path", "").strip("/"), recursive))


async def paths_info(hub: HubApp, call: Call) -> Response:
    repo = hub.repo(call)
    commit = hub.store.resolve(repo, call.params["rev"])
    body = await read_body(call.request)
    if call.request.headers.get("content-type", "").startswith("application/json"):
        paths = (await parse_json_object(body or b"{}")).get("paths", [])
    else:  # the client sends an urlencoded form
        paths = parse_qs(body.decode("utf-8", "replace"), max_num_fields=MAX_PATHS + 10).get("paths", [])
    if not isinstance(paths, list):
        paths = [paths]
    if len(paths) > MAX_PATHS:
        raise StoreError(400, f"paths-info takes at most {MAX_PATHS:,} paths per request, got {len(paths):,}")
    return JSONResponse(await run_in_threadpool(_paths_info, commit, paths))


def _paths_info(commit: Commit, paths: list[Any]) -> list[dict[str, Any]]:
    folders = {path.rsplit("/", depth)[0] for path in commit.files for depth in range(1, path.count("/") + 1)}
    out = []
    for path in paths:
        path = str(path).strip("/")
        if path in commit.files:
            out.append(_file_item(path, commit.files[path]))
        elif path in folders:
            out.append(_dir_item(path))
    return out


async def refs(hub: HubApp, call: Call) -> Response:
    repo = hub.repo(call)
    out: dict[str, Any] = {"branches": [], "converts": [], "tags": []}
    prs = []
    for name, kind, oid in hub.store.refs(repo):
        if kind == "branch":
            out["branches"].append({"name": name, "ref": f"refs/heads/{name}", "targetCommit": oid})
        elif kind == "tag":
            out["tags"].append({"name": name, "ref": f"refs/tags/{name}", "targetCommit": oid})
        else:
            prs.append({"name": name.rsplit("/", 1)[1], "ref": name, "targetCommit": oid})
    if call.request.query_params.get("include_prs"):
        out["pullRequests"] = prs
    return JSONResponse(out)


async def commits(hub: HubApp, call: Call) -> Response:
    repo = hub.repo(call)
    return JSONResponse([
        {"id": c.oid, "title": c.title, "message": c.message, "date": iso(c.date),
         "authors": [{"user": c.author}]}
        for c in hub.store.history(repo, call.params["rev"])
    ])


async def resolve(hub: HubApp, call: Call) -> Response:
    repo = hub.repo(call)
    commit = hub.store.resolve(repo, call.params["rev"])
    path = call.params["path"]
    entry = commit.files.get(path)
    if entry is None:
        return error(404, f"Entry not found: {path} is not in {repo.repo_id} at {commit.oid}", "EntryNotFound")
    headers = {"X-Repo-Commit": commit.oid, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
    if entry.lfs:
        headers.update({"ETag": f'"{entry.tree_oid}"', "X-Linked-Etag": f'"{entry.sha256}"',
                        "X-Linked-Size": str(entry.size)})
    else:
        headers["ETag"] = f'"{entry.git_oid}"'
    start, end = 0, entry.size
    status = 200
    wanted = call.request.headers.get("range")
    if wanted:
        span = byte_range(wanted, entry.size)
        if span is None:
            return Response(status_code=416, headers={"Content-Range": f"bytes */{entry.size}"})
        if span != (0, entry.size) or wanted.strip() != "bytes=0-":
            start, end = span
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{entry.size}"
    headers["Content-Length"] = str(end - start)
    if call.request.method == "HEAD":
        return Response(status_code=status, headers=headers)
    return StreamingResponse(read_range(hub.store.object_path(entry.sha256), start, end), status_code=status,
                             headers=headers)


def listing(commit: Commit, folder: str, recursive: bool) -> list[dict[str, Any]]:
    prefix = folder + "/" if folder else ""
    if folder and folder not in commit.files and not any(p.startswith(prefix) for p in commit.files):
        raise StoreError(404, f"Entry not found: {folder}", "EntryNotFound")
    items: dict[str, dict[str, Any]] = {}
    for path, entry in sorted(commit.files.items()):
        if not path.startswith(prefix):
            continue
        parts = path[len(prefix):].split("/")
        for depth in range(1, len(parts)):
            directory = prefix + "/".join(parts[:depth])
            items.setdefault(directory, _dir_item(directory))
            if not recursive:
                break
        if recursive or len(parts) == 1:
            items[path] = _file_item(path, entry)
    return list(items.values())


def _lfs_info(entry: FileEntry) -> dict[str, Any]:
    return {"size": entry.size, "sha256": entry.sha256, "pointerSize": len(entry.pointer)}


def _file_item(path: str, entry: FileEntry) -> dict[str, Any]:
    item: dict[str, Any] = {"type": "file", "oid": entry.tree_oid, "size": entry.size, "path": path}
    if entry.lfs:
        item["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": len(entry.pointer)}
    return item


def _dir_item(path: str) -> dict[str, Any]:
    return {"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0, "path": path}
