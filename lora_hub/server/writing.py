"""Changing repositories: creating, deleting and configuring them, preupload, commits, branches and tags, and the
model-card YAML check. Every field of a request body is type-checked (a malformed body is a 400 that names the
field), and a commit may only reference objects its repository already holds or that were uploaded for it.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import re
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from .protocol import MAX_JSON_BYTES, field, lines, objects, parse_json_object, read_json
from .store import REPO_TYPES, Commit, FileEntry, Store, StoreError, check_name, check_path, lfs_entry

if TYPE_CHECKING:
    from .app import Call, HubApp

LFS_THRESHOLD = 10 * 1024 * 1024
"""Files this large (or binary) go through LFS, as on the Hub."""
MAX_COMMIT_LINE_BYTES = 64 * 1024 * 1024
MAX_OPERATIONS = 10_000
MAX_CARD_BYTES = 1024 * 1024
"""The largest model card validate-yaml reads (the YAML front matter is parsed in a worker thread)."""
_SHA256 = re.compile(r"[0-9a-f]{64}")
_PREFIX_OF_TYPE = {"model": "models", "dataset": "datasets", "space": "spaces"}


async def create_repo(hub: HubApp, call: Call) -> Response:
    body = await read_json(call.request)
    repo_type = field(body, "type", str, default="model")
    if repo_type not in REPO_TYPES:
        raise StoreError(400, f"unknown repository type {repo_type!r}: use one of {', '.join(REPO_TYPES)}")
    if call.user is None:
        raise StoreError(401, "You must be authenticated to create a repository", "RepoNotFound")
    namespace = field(body, "organization", str) or call.user.name
    hub.check_write(call.user, namespace)
    name = field(body, "name", str, required=True)
    private = field(body, "visibility", str) == "private" or field(body, "private", bool) is True
    repo, created = hub.store.create_repo(repo_type, namespace, check_name(name, "repository name"),
                                          private=private)
    url = hub.repo_url(call, repo)
    if not created:
        return JSONResponse({"error": "You already created this model repo", "url": url}, status_code=409)
    return JSONResponse({"url": url, "name": repo.repo_id})


async def delete_repo(hub: HubApp, call: Call) -> Response:
    body = await read_json(call.request)
    if call.user is None:
        raise StoreError(401, "You must be authenticated to delete a repository", "RepoNotFound")
    namespace = field(body, "organization", str) or call.user.name
    repo_type = field(body, "type", str, default="model")
    name = field(body, "name", str, required=True)
    call.params.update(types=_PREFIX_OF_TYPE.get(repo_type, "models"), ns=namespace, name=name)
    hub.store.delete_repo(hub.repo(call, write=True))
    return JSONResponse({})


async def settings(hub: HubApp, call: Call) -> Response:
    repo = hub.repo(call, write=True)
    body = await read_json(call.request)
    if "private" in body or "visibility" in body:
        private = field(body, "visibility", str) == "private" or field(body, "private", bool) is True
        hub.store.set_private(repo, private)
    return JSONResponse({})


async def validate_yaml(hub: HubApp, call: Call) -> Response:
    body = await read_json(call.request)
    content = field(body, "content", str, default="")
    if len(content) > MAX_CARD_BYTES:
        raise StoreError(413, f"the model card is over {MAX_CARD_BYTES:,} bytes")
    message = await run_in_threadpool(_front_matter_problem, content)
    if message:
        return JSONResponse({"errors": [{"message": message}]}, status_code=400)
    return JSONResponse({"errors": [], "warnings": []})


def _front_matter_problem(content: str) -> str | None:
    import yaml

    if not content.startswith("---"):
        return None
    end = re.search(r"\n---[ \t]*(\n|$)", content)
    first_line = content.find("\n")
    if end is None or first_line < 0 or content[:first_line].strip() != "---":
        return None
    try:
        front = yaml.safe_load(content[first_line + 1:end.start()])
    except yaml.YAMLError as e:
        return f"invalid YAML front matter: {str(e)[:500]}"
    except RecursionError:
        return "invalid YAML front matter: nesting too deep"
    if front is not None and not isinstance(front, dict):
        return "the YAML front matter must be a mapping"
    return None


async def preupload(hub: HubApp, call: Call) -> Response:
    repo = hub.repo(call, write=True)
    commit = hub.store.resolve(repo, call.params["rev"])
    body = await read_json(call.request)
    files = objects(body, "files", limit=MAX_OPERATIONS)
    lfs_patterns = _lfs_patterns(hub.store, commit)
    out = []
    for item in files:
        path = check_path(field(item, "path", str, required=True, what="a preupload file"))
        size = field(item, "size", int, required=True, what=f"preupload file {path!r}")
        if size < 0:
            raise StoreError(400, f"invalid size for {path!r}")
        try:
            sample = base64.b64decode(field(item, "sample", str, default=""), validate=True)
        except binascii.Error as e:
            raise StoreError(400, f"invalid base64 sample for {path!r}") from e
        lfs = size >= LFS_THRESHOLD or b"\0" in sample or any(
            fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path.rsplit("/", 1)[-1], p) for p in lfs_patterns)
        current = commit.files.get(path)
        oid = None if current is None else (current.sha256 if current.lfs else current.git_oid)
        out.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
    return JSONResponse({"files": out, "commitOid": commit.oid})


async def commit(hub: HubApp, call: Call) -> Response:
    repo = hub.repo(call, write=True)
    create_pr = call.request.query_params.get("create_pr") in ("1", "true")
    header: dict[str, Any] | None = None
    operations: list[tuple[str, str, FileEntry | None]] = []
    async for line in lines(call.request, MAX_COMMIT_LINE_BYTES):
        item = await parse_json_object(line)
        key = field(item, "key", str, required=True, what="a commit line")
        value = field(item, "value", dict, required=True, what="a commit line")
        if len(operations) >= MAX_OPERATIONS:
            raise StoreError(400, f"a commit holds at most {MAX_OPERATIONS} operations")
        if key == "header":
            header = value
        elif key == "file":
            path = check_path(field(value, "path", str, required=True, what="a file operation"))
            if field(value, "encoding", str, default="base64") != "base64":
                raise StoreError(400, f"unsupported encoding for {path!r}: use base64")
            try:
                data = base64.b64decode(field(value, "content", str, default="", what=f"file {path!r}"),
                                        validate=True)
            except binascii.Error as e:
                raise StoreError(400, f"invalid base64 content for {path!r}") from e
            operations.append(("add", path, await run_in_threadpool(hub.store.put_bytes, data, repo)))
        elif key == "lfsFile":
            path = check_path(field(value, "path", str, required=True, what="an lfsFile operation"))
            oid = field(value, "oid", str, required=True, what=f"lfsFile {path!r}")
            size = field(value, "size", int, required=True, what=f"lfsFile {path!r}")
            if field(value, "algo", str, default="sha256") != "sha256" or not _SHA256.fullmatch(oid) or \
                    not hub.store.holds(repo, oid, size):
                raise StoreError(400, f"Your push was rejected because an LFS pointer pointed to a file that "
                                      f"does not exist: {path} (sha256 {oid}); upload it first")
            operations.append(("add", path, lfs_entry(oid, size)))
        elif key in ("deletedFile", "deletedFolder"):
            path = check_path(field(value, "path", str, required=True, what=f"a {key} operation").rstrip("/"))
            operations.append(("delete" if key == "deletedFile" else "delete_folder", path, None))
        else:
            raise StoreError(400, f"unknown commit operation {key[:40]!r}")
    if not isinstance(header, dict):
        raise StoreError(400, "the commit has no header line")
    summary = field(header, "summary", str, default="update", what="the commit header")
    description = field(header, "description", str, default="", what="the commit header")
    parent = field(header, "parentCommit", str, what="the commit header")
    author = call.user.name if call.user else repo.namespace
    oid, pr = await run_in_threadpool(
        lambda: hub.store.commit(repo, call.params["rev"], title=summary or "update", message=description,
                                 author=author, parent=parent, operations=operations, create_pr=create_pr))
    url = hub.repo_url(call, repo)
    out = {"commitOid": oid, "commitUrl": f"{url}/commit/{oid}", "success": True}
    if pr:
        out["pullRequestUrl"] = f"{url}/discussions/{pr.rsplit('/', 1)[1]}"
    return JSONResponse(out)


async def create_branch(hub: HubApp, call: Call) -> Response:
    repo = hub.repo(call, write=True)
    body = await read_json(call.request, allow_empty=True)
    name = check_name(call.params["ref"], "branch name")
    hub.store.create_ref(repo, name, "branch", field(body, "startingPoint", str, default="main") or "main")
    return JSONResponse({})


async def delete_branch(hub: HubApp, call: Call) -> Response:
    hub.store.delete_ref(hub.repo(call, write=True), call.params["ref"], "branch")
    return JSONResponse({})


async def create_tag(hub: HubApp, call: Call) -> Response:
    repo = hub.repo(call, write=True)
    body = await read_json(call.request)
    tag = check_name(field(body, "tag", str, required=True), "tag name")
    hub.store.create_ref(repo, tag, "tag", call.params["rev"])
    return JSONResponse({})


async def delete_tag(hub: HubApp, call: Call) -> Response:
    hub.store.delete_ref(hub.repo(call, write=True), call.params["ref"], "tag")
    return JSONResponse({})


def _lfs_patterns(store: Store, commit: Commit) -> list[str]:
    entry = commit.files.get(".gitattributes")
    if entry is None or entry.size > MAX_JSON_BYTES:
        return []
    text = store.object_path(entry.sha256).read_text("utf-8", "replace")
    return [line.split()[0] for line in text.splitlines()
            if line.strip() and not line.startswith("#") and "filter=lfs" in line.split()[1:]]
