"""Large files (Git LFS, as huggingface_hub uploads them): the batch API, uploads to signed URLs (whole, or in parts
for multipart), and verification.

Objects are stored once by sha256, but what a repository may use is tracked per repository: the batch API answers
"already stored" only for objects this repository holds, every upload URL is signed for one repository, and an
upload records the object for that repository only. So a token for one repository can neither learn whether an
object exists elsewhere nor commit a pointer to another repository's private bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from .protocol import READ_CHUNK, field, objects, read_json, receive
from .store import Repo, StoreError

if TYPE_CHECKING:
    from .app import Call, HubApp

MAX_OBJECT_BYTES = 1 << 40
MAX_OBJECTS = 10_000
SIGNATURE_SECONDS = 3600
LFS_JSON = "application/vnd.git-lfs+json"


async def batch(hub: HubApp, call: Call) -> Response:
    repo = hub.repo(call, write=True)
    body = await read_json(call.request)
    if field(body, "operation", str) != "upload":
        raise StoreError(400, "only the upload operation is served: download files through /resolve/")
    out = []
    for item in objects(body, "objects", limit=MAX_OBJECTS):
        oid, size = item.get("oid"), item.get("size")
        if not isinstance(oid, str) or len(oid) != 64 or any(c not in "0123456789abcdef" for c in oid) or \
                not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_OBJECT_BYTES:
            out.append({"oid": str(oid)[:64], "size": size if isinstance(size, int) else None,
                        "error": {"code": 422, "message": f"invalid object: oid must be a sha256 in hex and size "
                                                          f"between 0 and {MAX_OBJECT_BYTES}"}})
            continue
        if hub.store.holds(repo, oid, size):
            out.append({"oid": oid, "size": size})
            continue
        path = _object_path(repo, oid, size)
        upload: dict[str, Any] = {"href": _signed(hub, call, path)}
        if size > hub.chunk_size:
            parts = math.ceil(size / hub.chunk_size)
            upload["header"] = {"chunk_size": str(hub.chunk_size), **{
                str(n): _signed(hub, call, f"{path}/{n}") for n in range(1, parts + 1)}}
        verify = {"href": f"{call.base_url}{path}/verify"}
        out.append({"oid": oid, "size": size, "authenticated": True, "actions": {"upload": upload, "verify": verify}})
    return JSONResponse({"transfer": "basic", "objects": out}, media_type=LFS_JSON)


async def put(hub: HubApp, call: Call) -> Response:
    repo, oid, size = _target(hub, call)
    part = call.params.get("part")
    path = _object_path(repo, oid, size) + (f"/{part}" if part else "")
    _check_signature(hub, call, path)
    if part is None:
        with hub.store.new_object() as writer:
            await receive(call.request, writer.write, size)
            await run_in_threadpool(lambda: writer.finish(expect_sha256=oid, expect_size=size, repo=repo))
        return Response(status_code=200)
    number, parts = int(part), math.ceil(size / hub.chunk_size)
    if not 1 <= number <= parts:
        raise StoreError(400, f"part {number} out of range 1..{parts}")
    expected = min(hub.chunk_size, size - (number - 1) * hub.chunk_size)
    folder = _parts_folder(hub, repo, oid, size)
    folder.mkdir(exist_ok=True)
    with hub.store.new_object() as writer:
        await receive(call.request, writer.write, expected)
        if writer.size != expected:
            raise StoreError(400, f"part {number} holds {writer.size} bytes, expected {expected}")
        writer.file.close()
        writer.path.replace(folder / str(number))
    return Response(status_code=200, headers={"ETag": f'"{writer.sha256.hexdigest()}"'})


async def complete(hub: HubApp, call: Call) -> Response:
    repo, oid, size = _target(hub, call)
    _check_signature(hub, call, _object_path(repo, oid, size))
    body = await read_json(call.request)
    parts = math.ceil(size / hub.chunk_size)
    listed = []
    for item in objects(body, "parts", limit=max(parts, 1)):
        number = field(item, "partNumber", int, required=True, what="a completed part")
        etag = field(item, "etag", str, required=True, what=f"part {number}")
        listed.append((number, etag.strip('"')))
    listed.sort()
    if [n for n, _ in listed] != list(range(1, parts + 1)):
        raise StoreError(400, f"the completion must list parts 1..{parts} once each")
    await run_in_threadpool(_assemble, hub, repo, oid, size, listed)
    return JSONResponse({})


def _assemble(hub: HubApp, repo: Repo, oid: str, size: int, listed: list[tuple[int, str]]) -> None:
    folder = _parts_folder(hub, repo, oid, size)
    with hub.store.new_object() as writer:
        for number, etag in listed:
            part_path = folder / str(number)
            if not part_path.is_file():
                raise StoreError(400, f"part {number} was never uploaded")
            digest = hashlib.sha256()
            with part_path.open("rb") as f:
                while chunk := f.read(READ_CHUNK):
                    writer.write(chunk)
                    digest.update(chunk)
            if digest.hexdigest() != etag:
                raise StoreError(400, f"part {number} does not match its ETag")
        writer.finish(expect_sha256=oid, expect_size=size, repo=repo)
    for part_path in folder.iterdir():
        part_path.unlink(missing_ok=True)
    folder.rmdir()


async def verify(hub: HubApp, call: Call) -> Response:
    """2xx when the repository holds the object: the caller must be able to write that repository, so the answer
    says nothing about other repositories."""
    repo, oid, size = _target(hub, call)
    hub.check_write(call.user, repo.namespace)
    if not hub.store.holds(repo, oid, size):
        raise StoreError(404, f"object {oid} ({size} bytes) was not uploaded to {repo.repo_id}")
    return JSONResponse({})


def _target(hub: HubApp, call: Call) -> tuple[Repo, str, int]:
    """The repository (by id, as signed into the URL), object id and size of an LFS URL. Uploads carry no token
    (the signature is their authority); verification checks the caller's token itself."""
    repo = hub.store.repo_by_id(int(call.params["repo"]))
    if repo is None:
        raise StoreError(404, "the repository of this upload URL no longer exists", "RepoNotFound")
    return repo, call.params["oid"], int(call.params["size"])


def _object_path(repo: Repo, oid: str, size: int) -> str:
    return f"/api/lfs/{repo.id}/{oid}/{size}"


def _signed(hub: HubApp, call: Call, path: str) -> str:
    expires = int(time.time()) + SIGNATURE_SECONDS
    return f"{call.base_url}{path}?expires={expires}&sig={_signature(hub, path, expires)}"


def _signature(hub: HubApp, path: str, expires: int) -> str:
    return hmac.new(hub.secret, f"{path}\n{expires}".encode(), hashlib.sha256).hexdigest()


def _check_signature(hub: HubApp, call: Call, path: str) -> None:
    query = call.request.query_params
    text = query.get("expires", "")
    expires = int(text) if text.isdigit() and len(text) < 16 else 0
    if expires < time.time() or not hmac.compare_digest(_signature(hub, path, expires), query.get("sig", "")):
        raise StoreError(403, "the upload URL is not signed or has expired: ask the LFS batch API for a new one")


def _parts_folder(hub: HubApp, repo: Repo, oid: str, size: int) -> Path:
    return hub.store.tmp / f"parts-{repo.id}-{oid}-{size}"
