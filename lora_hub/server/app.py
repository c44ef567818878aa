"""The Hub HTTP API that huggingface_hub uses (docs/HUB_PROTOCOL.md), as a Starlette application over a Store: the
route table, the caller's identity, and access to repositories. The handlers live by concept: reading.py
(information, listings, downloads), writing.py (repositories, commits, refs), lfs.py (large-file uploads).

Requests are matched on the raw (still percent-encoded) path, because the client sends revisions such as
`refs/pr/1` as `refs%2Fpr%2F1`: decoding first would make them ambiguous. Every error carries the Hub's
`X-Error-Code` where the client maps one to an exception (RepoNotFound, RevisionNotFound, EntryNotFound), and an
unexpected failure is still a response in the Hub's shape, never a dropped connection.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import unquote

from starlette.requests import Request
from starlette.responses import Response

from . import lfs, reading, writing
from .protocol import error, url_without_query
from .store import Repo, Store, StoreError, User

Handler = Callable[["HubApp", "Call"], Awaitable[Response]]

_TYPE_OF_PREFIX = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_SEG = r"[^/]+"
_API = rf"/api/(?P<types>models|datasets|spaces)/(?P<ns>{_SEG})/(?P<name>{_SEG})"
_GIT = rf"/(?:(?P<prefix>datasets|spaces)/)?(?P<ns>{_SEG})/(?P<name>{_SEG})"
_LFS = r"/api/lfs/(?P<repo>\d{1,18})/(?P<oid>[0-9a-f]{64})/(?P<size>\d{1,15})"

ROUTES: list[tuple[str, str, Handler]] = [
    ("GET", r"/api/agent-harnesses", reading.harnesses),
    ("GET", r"/api/whoami-v2", reading.whoami),
    ("POST", r"/api/repos/create", writing.create_repo),
    ("DELETE", r"/api/repos/delete", writing.delete_repo),
    ("POST", r"/api/validate-yaml", writing.validate_yaml),
    ("GET", _API + r"(?:/revision/(?P<rev>[^/]+))?", reading.repo_info),
    ("GET", _API + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?", reading.tree),
    ("POST", _API + r"/paths-info/(?P<rev>[^/]+)", reading.paths_info),
    ("GET", _API + r"/refs", reading.refs),
    ("GET", _API + r"/commits/(?P<rev>[^/]+)", reading.commits),
    ("POST", _API + r"/preupload/(?P<rev>[^/]+)", writing.preupload),
    ("POST", _API + r"/commit/(?P<rev>[^/]+)", writing.commit),
    ("POST", _API + r"/branch/(?P<ref>[^/]+)", writing.create_branch),
    ("DELETE", _API + r"/branch/(?P<ref>[^/]+)", writing.delete_branch),
    ("POST", _API + r"/tag/(?P<rev>[^/]+)", writing.create_tag),
    ("DELETE", _API + r"/tag/(?P<ref>[^/]+)", writing.delete_tag),
    ("PUT", _API + r"/settings", writing.settings),
    ("POST", _GIT + r"\.git/info/lfs/objects/batch", lfs.batch),
    ("PUT", _LFS + r"(?:/(?P<part>\d{1,9}))?", lfs.put),
    ("POST", _LFS, lfs.complete),
    ("POST", _LFS + r"/verify", lfs.verify),
    ("GET", _GIT + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)", reading.resolve),
    ("HEAD", _GIT + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)", reading.resolve),
]

_log = logging.getLogger("lora_hub.server")


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
        self.routes = [(method, re.compile(pattern + r"/?$"), handler) for method, pattern, handler in ROUTES]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        response = await self.dispatch(Request(scope, receive))
        await response(scope, receive, send)

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
                return await handler(self, Call(request, params, self._caller(request)))
            except StoreError as e:
                return error(e.status, e.message, e.code)
            except Exception:  # a bug: say so in the Hub's shape rather than drop the connection
                _log.exception("%s %s failed", request.method, request.url.path)
                return error(500, "internal server error")
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

    def repo(self, call: Call, *, write: bool = False) -> Repo:
        """The repository the call names, if the caller may read it (and write it, with `write`).

        Raises:
            StoreError: 401/404 RepoNotFound (a private repository looks absent to others), 403 for writes.
        """
        params = call.params
        repo_type = _TYPE_OF_PREFIX[params["types"]] if "types" in params else \
            _TYPE_OF_PREFIX.get(params.get("prefix", "models"), "model")
        repo = self.store.repo(repo_type, params["ns"], params["name"])
        return self.access(call, repo, write=write)

    def access(self, call: Call, repo: Repo | None, *, write: bool = False) -> Repo:
        user = call.user
        if repo is None or (repo.private and (user is None or user.name != repo.namespace)):
            status = 401 if user is None else 404
            raise StoreError(status, f"Repository Not Found for url: {url_without_query(call.request)}. Please make "
                                     "sure you specified the correct repo id and repo type, and are authenticated "
                                     "if it is private.", "RepoNotFound")
        if write:
            self.check_write(user, repo.namespace)
        return repo

    @staticmethod
    def check_write(user: User | None, namespace: str) -> User:
        if user is None:
            raise StoreError(401, "You must be authenticated to write: pass a token with write access",
                             "RepoNotFound")
        if not user.write or user.name != namespace:
            raise StoreError(403, f"You don't have the rights to write to '{namespace}': use a write token of "
                                  f"that namespace (this one is {'write' if user.write else 'read'}-only for "
                                  f"'{user.name}')")
        return user

    def repo_url(self, call: Call, repo: Repo) -> str:
        return f"{call.base_url}/{URL_PREFIX[repo.type]}{repo.repo_id}"
