"""The Hub HTTP API that huggingface_hub uses (../shared/HUB_PROTOCOL.md), as a Starlette application over a Store.

Requests are matched on the raw (still percent-encoded) path, because the client sends revisions such as
`refs/pr/1` as `refs%2Fpr%2F1`: decoding first would make them ambiguous. Every error carries the Hub's
`X-Error-Code` where the client maps one to an exception (RepoNotFound, RevisionNotFound, EntryNotFound).
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import hashlib
import hmac
import json
import math
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .store import REPO_TYPES, Commit, FileEntry, Repo, Store, StoreError, User, check_name, check_path, lfs_entry

LFS_THRESHOLD = 10 * 1024 * 1024  # files this large (or binary) go through LFS, as on the Hub
MAX_OBJECT_BYTES = 1 << 40
MAX_JSON_BYTES = 16 * 1024 * 1024
MAX_COMMIT_LINE_BYTES = 64 * 1024 * 1024
MAX_OPERATIONS = 10_000
READ_CHUNK = 1024 * 1024
SIGNATURE_SECONDS = 3600
LFS_JSON = "application/vnd.git-lfs+json"

_TYPE_OF_PREFIX = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_SEG = r"[^/]+"
_API = rf"/api/(?P<types>models|datasets|spaces)/(?P<ns>{_SEG})/(?P<name>{_SEG})"
_GIT = rf"/(?:(?P<prefix>datasets|spaces)/)?(?P<ns>{_SEG})/(?P<name>{_SEG})"

Handler = Callable[["Call"], Awaitable[Response]]


@dataclass
class Call:
    """One request: the Starlette request, the decoded path parameters, and the caller (None when anonymous)."""

    request: Request
    params: dict[str, str]
    user: User | None

    @property
    def base_url(self) -> str:
        return f"{self.request.url.scheme}://{self.request.url.netloc}"


class HubApp:
    """The application. `multipart_chunk_size`: LFS objects larger than this are uploaded in parts of this size."""

    def __init__(self, store: Store, *, multipart_chunk_size: int = 64 * 1024 * 1024) -> None:
        self.store = store
        self.chunk_size = multipart_chunk_size
        secret_file = store.root / "secret"
        if not secret_file.exists():
            secret_file.touch(mode=0o600)
            secret_file.write_bytes(secrets.token_bytes(32))
        self.secret = secret_file.read_bytes()
        self.routes: list[tuple[str, re.Pattern[str], Handler]] = [
            (method, re.compile(pattern + r"/?$"), handler) for method, pattern, handler in [
                ("GET", r"/api/agent-harnesses", self.harnesses),
                ("GET", r"/api/whoami-v2", self.whoami),
                ("POST", r"/api/repos/create", self.create_repo),
                ("DELETE", r"/api/repos/delete", self.delete_repo),
                ("POST", r"/api/validate-yaml", self.validate_yaml),
                ("GET", _API + r"(?:/revision/(?P<rev>[^/]+))?", self.repo_info),
                ("GET", _API + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?", self.tree),
                ("POST", _API + r"/paths-info/(?P<rev>[^/]+)", self.paths_info),
                ("GET", _API + r"/refs", self.refs),
                ("GET", _API + r"/commits/(?P<rev>[^/]+)", self.commits),
                ("POST", _API + r"/preupload/(?P<rev>[^/]+)", self.preupload),
                ("POST", _API + r"/commit/(?P<rev>[^/]+)", self.commit),
                ("POST", _API + r"/branch/(?P<ref>[^/]+)", self.create_branch),
                ("DELETE", _API + r"/branch/(?P<ref>[^/]+)", self.delete_branch),
                ("POST", _API + r"/tag/(?P<rev>[^/]+)", self.create_tag),
                ("DELETE", _API + r"/tag/(?P<ref>[^/]+)", self.delete_tag),
                ("PUT", _API + r"/settings", self.settings),
                ("POST", _GIT + r"\.git/info/lfs/objects/batch", self.lfs_batch),
                ("PUT", r"/api/lfs/(?P<oid>[0-9a-f]{64})/(?P<size>\d+)(?:/(?P<part>\d+))?", self.lfs_put),
                ("POST", r"/api/lfs/(?P<oid>[0-9a-f]{64})/(?P<size>\d+)", self.lfs_complete),
                ("POST", r"/api/lfs/(?P<oid>[0-9a-f]{64})/(?P<size>\d+)/verify", self.lfs_verify),
                ("GET", _GIT + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)", self.resolve),
                ("HEAD", _GIT + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)", self.resolve),
            ]
        ]
        self.asgi = Starlette(routes=[Route("/{rest:path}", self.dispatch,
                                            methods=["GET", "HEAD", "POST", "PUT", "DELETE"])])

    async def __call__(self, scope, receive, send) -> None:
        await self.asgi(scope, receive, send)

    async def dispatch(self, request: Request) -> Response:
        raw = request.scope.get("raw_path", request.url.path.encode()).decode("latin-1").split("?", 1)[0]
        allowed = False
        for method, pattern, handler in self.routes:
            match = pattern.match(raw)
            if not match:
                continue
            allowed = True
            if method != request.method:
                continue
            try:
                params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                return await handler(Call(request, params, self._caller(request)))
            except StoreError as e:
                return error(e.status, e.message, e.code)
        if allowed:
            return error(405, f"{request.method} is not allowed on {request.url.path}")
        return error(404, f"no such endpoint: {request.method} {request.url.path}")

    def _caller(self, request: Request) -> User | None:
        header = request.headers.get("authorization", "")
        if not header:
            return None
        token = header[7:] if header.lower().startswith("bearer ") else ""
        user = self.store.user(token)
        if user is None:
            raise StoreError(401, "Invalid credentials in Authorization header", "RepoNotFound")
        return user

    # --- repositories and access ------------------------------------------------------------------------------------

    def _repo(self, call: Call, *, write: bool = False) -> Repo:
        params = call.params
        repo_type = _TYPE_OF_PREFIX[params["types"]] if "types" in params else \
            _TYPE_OF_PREFIX.get(params.get("prefix", "models"), "model")
        repo = self.store.repo(repo_type, params["ns"], params["name"])
        user = call.user
        if repo is None or (repo.private and (user is None or user.name != repo.namespace)):
            status = 401 if user is None else 404
            raise StoreError(status, f"Repository Not Found for url: {call.request.url}. Please make sure you "
                                     "specified the correct repo id and repo type, and are authenticated if it is "
                                     "private.", "RepoNotFound")
        if write:
            self._check_write(user, repo.namespace)
        return repo

    @staticmethod
    def _check_write(user: User | None, namespace: str) -> User:
        if user is None:
            raise StoreError(401, "You must be authenticated to write: pass a token with write access",
                             "RepoNotFound")
        if not user.write or user.name != namespace:
            raise StoreError(403, f"You don't have the rights to write to '{namespace}': use a write token of "
                                  f"that namespace (this one is {'write' if user.write else 'read'}-only for "
                                  f"'{user.name}')")
        return user

    def _repo_url(self, call: Call, repo: Repo) -> str:
        return f"{call.base_url}/{_URL_PREFIX[repo.type]}{repo.repo_id}"

    async def harnesses(self, call: Call) -> Response:
        return JSONResponse({"standardEnvVars": [], "harnesses": {}})

    async def whoami(self, call: Call) -> Response:
        if call.user is None:
            return error(401, "Invalid user token: pass a token (token= or HF_TOKEN)")
        role = "write" if call.user.write else "read"
        return JSONResponse({"type": "user", "name": call.user.name, "fullname": call.user.name, "orgs": [],
                             "auth": {"type": "access_token", "accessToken": {"displayName": "lora-hub",
                                                                              "role": role}}})

    async def create_repo(self, call: Call) -> Response:
        body = await read_json(call.request)
        repo_type = body.get("type") or "model"
        if repo_type not in REPO_TYPES:
            raise StoreError(400, f"unknown repository type {repo_type!r}: use one of {', '.join(REPO_TYPES)}")
        if call.user is None:
            raise StoreError(401, "You must be authenticated to create a repository", "RepoNotFound")
        namespace = body.get("organization") or call.user.name
        self._check_write(call.user, namespace)
        name = body.get("name")
        if not isinstance(name, str):
            raise StoreError(400, "'name' is required")
        private = body.get("visibility") == "private" or body.get("private") is True
        repo, created = self.store.create_repo(repo_type, namespace, check_name(name, "repository name"),
                                               private=private)
        url = self._repo_url(call, repo)
        if not created:
            return JSONResponse({"error": "You already created this model repo", "url": url}, status_code=409)
        return JSONResponse({"url": url, "name": repo.repo_id})

    async def delete_repo(self, call: Call) -> Response:
        body = await read_json(call.request)
        if call.user is None:
            raise StoreError(401, "You must be authenticated to delete a repository", "RepoNotFound")
        namespace = body.get("organization") or call.user.name
        repo_type = body.get("type") or "model"
        prefix = {v: k for k, v in _TYPE_OF_PREFIX.items()}.get(repo_type, "models")
        call.params.update(types=prefix, ns=namespace, name=str(body.get("name")))
        self.store.delete_repo(self._repo(call, write=True))
        return JSONResponse({})

    async def settings(self, call: Call) -> Response:
        repo = self._repo(call, write=True)
        body = await read_json(call.request)
        if "private" in body or "visibility" in body:
            self.store.set_private(repo, body.get("visibility") == "private" or body.get("private") is True)
        return JSONResponse({})

    async def validate_yaml(self, call: Call) -> Response:
        import yaml

        body = await read_json(call.request)
        content = body.get("content") or ""
        match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.S)
        try:
            front = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as e:
            return JSONResponse({"errors": [{"message": f"invalid YAML front matter: {e}"}]}, status_code=400)
        if front is not None and not isinstance(front, dict):
            return JSONResponse({"errors": [{"message": "the YAML front matter must be a mapping"}]},
                                status_code=400)
        return JSONResponse({"errors": [], "warnings": []})

    # --- reading --------------------------------------------------------------------------------------------------

    async def repo_info(self, call: Call) -> Response:
        repo = self._repo(call)
        commit = self.store.resolve(repo, call.params.get("rev", "main"))
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
            "lastModified": _iso(commit.date), "createdAt": _iso(repo.created), "tags": [], "downloads": 0,
            "likes": 0, "siblings": siblings,
        })

    async def tree(self, call: Call) -> Response:
        repo = self._repo(call)
        commit = self.store.resolve(repo, call.params["rev"])
        recursive = call.request.query_params.get("recursive", "false").lower() in ("1", "true")
        return JSONResponse(_listing(commit, call.params.get("path", "").strip("/"), recursive))

    async def paths_info(self, call: Call) -> Response:
        repo = self._repo(call)
        commit = self.store.resolve(repo, call.params["rev"])
        body = await read_body(call.request)
        if call.request.headers.get("content-type", "").startswith("application/json"):
            try:
                paths = json.loads(body or b"{}").get("paths", [])
            except (ValueError, AttributeError) as e:
                raise StoreError(400, "the body must be a JSON object with a 'paths' list") from e
        else:  # the client sends an urlencoded form
            paths = parse_qs(body.decode("utf-8", "replace")).get("paths", [])
        out = []
        for path in paths if isinstance(paths, list) else [paths]:
            path = str(path).strip("/")
            if path in commit.files:
                out.append(_file_item(path, commit.files[path]))
            elif any(p.startswith(path + "/") for p in commit.files):
                out.append(_dir_item(path))
        return JSONResponse(out)

    async def refs(self, call: Call) -> Response:
        repo = self._repo(call)
        out: dict[str, Any] = {"branches": [], "converts": [], "tags": []}
        prs = []
        for name, kind, oid in self.store.refs(repo):
            if kind == "branch":
                out["branches"].append({"name": name, "ref": f"refs/heads/{name}", "targetCommit": oid})
            elif kind == "tag":
                out["tags"].append({"name": name, "ref": f"refs/tags/{name}", "targetCommit": oid})
            else:
                prs.append({"name": name.rsplit("/", 1)[1], "ref": name, "targetCommit": oid})
        if call.request.query_params.get("include_prs"):
            out["pullRequests"] = prs
        return JSONResponse(out)

    async def commits(self, call: Call) -> Response:
        repo = self._repo(call)
        return JSONResponse([
            {"id": c.oid, "title": c.title, "message": c.message, "date": _iso(c.date),
             "authors": [{"user": c.author}]}
            for c in self.store.history(repo, call.params["rev"])
        ])

    async def resolve(self, call: Call) -> Response:
        repo = self._repo(call)
        commit = self.store.resolve(repo, call.params["rev"])
        path = call.params["path"]
        entry = commit.files.get(path)
        if entry is None:
            return error(404, f"Entry not found: {path} is not in {repo.repo_id} at {commit.oid}",
                         "EntryNotFound")
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
            span = _byte_range(wanted, entry.size)
            if span is None:
                return Response(status_code=416, headers={"Content-Range": f"bytes */{entry.size}"})
            if span != (0, entry.size) or wanted.strip() != "bytes=0-":
                start, end = span
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{entry.size}"
        headers["Content-Length"] = str(end - start)
        if call.request.method == "HEAD":
            return Response(status_code=status, headers=headers)
        return StreamingResponse(_read_range(self.store.object_path(entry.sha256), start, end),
                                 status_code=status, headers=headers)

    # --- writing --------------------------------------------------------------------------------------------------

    async def preupload(self, call: Call) -> Response:
        repo = self._repo(call, write=True)
        commit = self.store.resolve(repo, call.params["rev"])
        body = await read_json(call.request)
        files = body.get("files")
        if not isinstance(files, list) or len(files) > MAX_OPERATIONS:
            raise StoreError(400, f"'files' must be a list of at most {MAX_OPERATIONS} entries")
        lfs_patterns = _lfs_patterns(self.store, commit)
        out = []
        for item in files:
            path = check_path(str(item.get("path", "")))
            size = item.get("size")
            if not isinstance(size, int) or size < 0:
                raise StoreError(400, f"invalid size for {path!r}")
            try:
                sample = base64.b64decode(item.get("sample") or "", validate=True)
            except binascii.Error as e:
                raise StoreError(400, f"invalid base64 sample for {path!r}") from e
            lfs = size >= LFS_THRESHOLD or b"\0" in sample or any(
                fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path.rsplit("/", 1)[-1], p) for p in lfs_patterns)
            current = commit.files.get(path)
            oid = None if current is None else (current.sha256 if current.lfs else current.git_oid)
            out.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        return JSONResponse({"files": out, "commitOid": commit.oid})

    async def commit(self, call: Call) -> Response:
        repo = self._repo(call, write=True)
        create_pr = call.request.query_params.get("create_pr") in ("1", "true")
        header: dict[str, Any] | None = None
        operations: list[tuple[str, str, FileEntry | None]] = []
        async for line in _lines(call.request, MAX_COMMIT_LINE_BYTES):
            try:
                item = json.loads(line)
                key, value = item["key"], item["value"]
            except (ValueError, KeyError, TypeError) as e:
                raise StoreError(400, f"malformed commit line: {e}") from e
            if len(operations) >= MAX_OPERATIONS:
                raise StoreError(400, f"a commit holds at most {MAX_OPERATIONS} operations")
            if key == "header":
                header = value
            elif key == "file":
                path = check_path(str(value.get("path", "")))
                if value.get("encoding", "base64") != "base64":
                    raise StoreError(400, f"unsupported encoding for {path!r}: use base64")
                try:
                    data = base64.b64decode(value.get("content", ""), validate=True)
                except binascii.Error as e:
                    raise StoreError(400, f"invalid base64 content for {path!r}") from e
                operations.append(("add", path, self.store.put_bytes(data)))
            elif key == "lfsFile":
                path = check_path(str(value.get("path", "")))
                oid, size = str(value.get("oid", "")), value.get("size")
                if value.get("algo", "sha256") != "sha256" or not isinstance(size, int) or \
                        not self.store.has_object(oid, size) or not re.fullmatch(r"[0-9a-f]{64}", oid):
                    raise StoreError(400, f"Your push was rejected because an LFS pointer pointed to a file that "
                                          f"does not exist: {path} (sha256 {oid}); upload it first")
                operations.append(("add", path, lfs_entry(oid, size)))
            elif key in ("deletedFile", "deletedFolder"):
                path = check_path(str(value.get("path", "")).rstrip("/"))
                operations.append(("delete" if key == "deletedFile" else "delete_folder", path, None))
            else:
                raise StoreError(400, f"unknown commit operation {key!r}")
        if not isinstance(header, dict):
            raise StoreError(400, "the commit has no header line")
        author = call.user.name if call.user else repo.namespace
        oid, pr = self.store.commit(repo, call.params["rev"], title=str(header.get("summary") or "update"),
                                    message=str(header.get("description") or ""), author=author,
                                    parent=header.get("parentCommit"), operations=operations, create_pr=create_pr)
        url = self._repo_url(call, repo)
        out = {"commitOid": oid, "commitUrl": f"{url}/commit/{oid}", "success": True}
        if pr:
            out["pullRequestUrl"] = f"{url}/discussions/{pr.rsplit('/', 1)[1]}"
        return JSONResponse(out)

    async def create_branch(self, call: Call) -> Response:
        repo = self._repo(call, write=True)
        body = await read_json(call.request, allow_empty=True)
        name = call.params["ref"]
        check_name(name, "branch name")
        self.store.create_ref(repo, name, "branch", body.get("startingPoint") or "main")
        return JSONResponse({})

    async def delete_branch(self, call: Call) -> Response:
        self.store.delete_ref(self._repo(call, write=True), call.params["ref"], "branch")
        return JSONResponse({})

    async def create_tag(self, call: Call) -> Response:
        repo = self._repo(call, write=True)
        body = await read_json(call.request)
        tag = check_name(str(body.get("tag", "")), "tag name")
        self.store.create_ref(repo, tag, "tag", call.params["rev"])
        return JSONResponse({})

    async def delete_tag(self, call: Call) -> Response:
        self.store.delete_ref(self._repo(call, write=True), call.params["ref"], "tag")
        return JSONResponse({})

    # --- LFS ------------------------------------------------------------------------------------------------------

    async def lfs_batch(self, call: Call) -> Response:
        self._repo(call, write=True)
        body = await read_json(call.request)
        if body.get("operation") != "upload":
            raise StoreError(400, "only the upload operation is served: download files through /resolve/")
        objects = body.get("objects")
        if not isinstance(objects, list) or len(objects) > MAX_OPERATIONS:
            raise StoreError(400, f"'objects' must be a list of at most {MAX_OPERATIONS} entries")
        out = []
        for item in objects:
            oid, size = item.get("oid"), item.get("size")
            if not isinstance(oid, str) or not re.fullmatch(r"[0-9a-f]{64}", oid) or \
                    not isinstance(size, int) or not 0 <= size <= MAX_OBJECT_BYTES:
                out.append({"oid": str(oid), "size": size,
                            "error": {"code": 422, "message": f"invalid object: oid must be a sha256 in hex and "
                                                              f"size between 0 and {MAX_OBJECT_BYTES}"}})
                continue
            if self.store.has_object(oid, size):
                out.append({"oid": oid, "size": size})
                continue
            href = self._signed(call, f"/api/lfs/{oid}/{size}")
            upload: dict[str, Any] = {"href": href}
            if size > self.chunk_size:
                parts = math.ceil(size / self.chunk_size)
                upload["header"] = {"chunk_size": str(self.chunk_size), **{
                    str(n): self._signed(call, f"/api/lfs/{oid}/{size}/{n}") for n in range(1, parts + 1)}}
            verify = {"href": f"{call.base_url}/api/lfs/{oid}/{size}/verify"}
            out.append({"oid": oid, "size": size, "authenticated": True,
                        "actions": {"upload": upload, "verify": verify}})
        return JSONResponse({"transfer": "basic", "objects": out}, media_type=LFS_JSON)

    def _signed(self, call: Call, path: str) -> str:
        expires = int(time.time()) + SIGNATURE_SECONDS
        return f"{call.base_url}{path}?expires={expires}&sig={self._signature(path, expires)}"

    def _signature(self, path: str, expires: int) -> str:
        return hmac.new(self.secret, f"{path}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def _check_signature(self, call: Call, path: str) -> None:
        query = call.request.query_params
        try:
            expires = int(query.get("expires", ""))
        except ValueError:
            expires = 0
        if expires < time.time() or not hmac.compare_digest(self._signature(path, expires), query.get("sig", "")):
            raise StoreError(403, "the upload URL is not signed or has expired: ask the LFS batch API for a new one")

    async def lfs_put(self, call: Call) -> Response:
        oid, size = call.params["oid"], int(call.params["size"])
        part = call.params.get("part")
        path = f"/api/lfs/{oid}/{size}" + (f"/{part}" if part else "")
        self._check_signature(call, path)
        if part is None:
            with self.store.new_object() as writer:
                await _receive(call.request, writer.write, size)
                writer.finish(expect_sha256=oid, expect_size=size)
            return Response(status_code=200)
        number, parts = int(part), math.ceil(size / self.chunk_size)
        expected = min(self.chunk_size, size - (number - 1) * self.chunk_size)
        if not 1 <= number <= parts:
            raise StoreError(400, f"part {number} out of range 1..{parts}")
        folder = self._parts_folder(oid, size)
        folder.mkdir(exist_ok=True)
        with self.store.new_object() as writer:
            await _receive(call.request, writer.write, expected)
            if writer.size != expected:
                raise StoreError(400, f"part {number} holds {writer.size} bytes, expected {expected}")
            writer.file.close()
            writer.path.replace(folder / str(number))
        return Response(status_code=200, headers={"ETag": f'"{writer.sha256.hexdigest()}"'})

    async def lfs_complete(self, call: Call) -> Response:
        oid, size = call.params["oid"], int(call.params["size"])
        self._check_signature(call, f"/api/lfs/{oid}/{size}")
        body = await read_json(call.request)
        parts = math.ceil(size / self.chunk_size)
        listed = sorted((int(p["partNumber"]), str(p["etag"]).strip('"')) for p in body.get("parts", []))
        if [n for n, _ in listed] != list(range(1, parts + 1)):
            raise StoreError(400, f"the completion must list parts 1..{parts} once each")
        folder = self._parts_folder(oid, size)
        with self.store.new_object() as writer:
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
            writer.finish(expect_sha256=oid, expect_size=size)
        for part_path in folder.iterdir():
            part_path.unlink(missing_ok=True)
        folder.rmdir()
        return JSONResponse({})

    async def lfs_verify(self, call: Call) -> Response:
        if call.user is None:
            raise StoreError(401, "verification needs a token", "RepoNotFound")
        oid, size = call.params["oid"], int(call.params["size"])
        if not self.store.has_object(oid, size):
            raise StoreError(404, f"object {oid} ({size} bytes) is not stored")
        return JSONResponse({})

    def _parts_folder(self, oid: str, size: int) -> Path:
        return self.store.tmp / f"parts-{oid}-{size}"


def error(status: int, message: str, code: str | None = None) -> Response:
    headers = {"X-Error-Message": message.encode("latin-1", "replace").decode("latin-1")[:1000]}
    if code:
        headers["X-Error-Code"] = code
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def read_body(request: Request) -> bytes:
    """The whole body of a small request, refused past MAX_JSON_BYTES."""
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_JSON_BYTES:
            raise StoreError(413, f"request body over {MAX_JSON_BYTES} bytes")
    return bytes(data)


async def read_json(request: Request, *, allow_empty: bool = False) -> dict[str, Any]:
    data = await read_body(request)
    if not data and allow_empty:
        return {}
    try:
        body = json.loads(data)
    except ValueError as e:
        raise StoreError(400, f"the request body is not JSON: {e}") from e
    if not isinstance(body, dict):
        raise StoreError(400, "the request body must be a JSON object")
    return body


async def _lines(request: Request, limit: int) -> AsyncIterator[bytes]:
    pending = b""
    async for chunk in request.stream():
        pending += chunk
        *lines, pending = pending.split(b"\n")
        if len(pending) > limit:
            raise StoreError(413, f"a commit line is over {limit} bytes: upload large files through LFS")
        for line in lines:
            if line.strip():
                yield line
    if pending.strip():
        yield pending


async def _receive(request: Request, write: Callable[[bytes], Any], limit: int) -> None:
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise StoreError(400, f"the body is larger than the declared {limit} bytes")
        write(chunk)


def _read_range(path: Path, start: int, end: int) -> Iterator[bytes]:
    with path.open("rb") as f:
        f.seek(start)
        left = end - start
        while left > 0:
            chunk = f.read(min(READ_CHUNK, left))
            if not chunk:
                break
            left -= len(chunk)
            yield chunk


def _byte_range(header: str, size: int) -> tuple[int, int] | None:
    match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header)
    if not match or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    if first == "":
        start, end = max(0, size - int(last)), size
    else:
        start = int(first)
        end = min(size, int(last) + 1) if last else size
    if start >= size and size > 0 or start > end:
        return None
    return start, end


def _lfs_info(entry: FileEntry) -> dict[str, Any]:
    return {"size": entry.size, "sha256": entry.sha256, "pointerSize": len(entry.pointer)}


def _file_item(path: str, entry: FileEntry) -> dict[str, Any]:
    item: dict[str, Any] = {"type": "file", "oid": entry.tree_oid, "size": entry.size, "path": path}
    if entry.lfs:
        item["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": len(entry.pointer)}
    return item


def _dir_item(path: str) -> dict[str, Any]:
    return {"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0, "path": path}


def _listing(commit: Commit, folder: str, recursive: bool) -> list[dict[str, Any]]:
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


def _lfs_patterns(store: Store, commit: Commit) -> list[str]:
    entry = commit.files.get(".gitattributes")
    if entry is None or entry.size > MAX_JSON_BYTES:
        return []
    text = store.object_path(entry.sha256).read_text("utf-8", "replace")
    return [line.split()[0] for line in text.splitlines()
            if line.strip() and not line.startswith("#") and "filter=lfs" in line.split()[1:]]


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
