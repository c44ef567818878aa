"""The HTTP side of the Hub protocol that every handler shares: error responses in the Hub's shape, bounded request
bodies, typed fields of JSON bodies (a malformed body is a 400 that names the field, never a 500), byte ranges,
and timestamps.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..jsontext import strict_loads
from .store import StoreError

MAX_JSON_BYTES = 4 * 1024 * 1024
"""Largest JSON request body (the client's largest, a preupload of 256 files, is a few KB)."""
READ_CHUNK = 1024 * 1024
_INLINE_JSON_BYTES = 64 * 1024
"""Bodies larger than this are parsed in a worker thread, off the event loop."""
_UNSAFE_HEADER_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\uffff]")


def error(status: int, message: str, code: str | None = None) -> Response:
    """A Hub error: JSON `{"error": message}` and the X-Error-Message (and X-Error-Code) headers the client reads.
    The header holds printable ASCII only: a NUL or a newline from a request path must not break the response."""
    headers = {"X-Error-Message": _UNSAFE_HEADER_CHARACTERS.sub("?", message[:1000])}
    if code:
        headers["X-Error-Code"] = code
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def url_without_query(request: Request) -> str:
    """The request URL for messages: without its query string, which may carry a token or a signature."""
    return str(request.url.replace(query=""))


async def read_body(request: Request, limit: int = MAX_JSON_BYTES) -> bytes:
    """The whole body of a small request, refused past `limit`."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise StoreError(413, f"request body over {limit} bytes")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise StoreError(413, f"request body over {limit} bytes")
    return bytes(data)


async def read_json(request: Request, *, allow_empty: bool = False) -> dict[str, Any]:
    """The body as one JSON object (strict: duplicate keys, NaN and deep nesting refused)."""
    data = await read_body(request)
    if not data and allow_empty:
        return {}
    return await parse_json_object(data)


async def parse_json_object(data: bytes) -> dict[str, Any]:
    try:
        body = strict_loads(data) if len(data) <= _INLINE_JSON_BYTES else await run_in_threadpool(strict_loads, data)
    except (ValueError, UnicodeDecodeError) as e:
        raise StoreError(400, f"the request body is not valid JSON: {str(e)[:200]}") from e
    if not isinstance(body, dict):
        raise StoreError(400, "the request body must be a JSON object")
    return body


def field(body: dict[str, Any], key: str, kind: type | tuple[type, ...], *, required: bool = False,
          default: Any = None, what: str = "the request body") -> Any:
    """body[key] if it has the JSON type `kind` (bool is not an int), else a 400 that names the field; `default`
    when absent or null (unless `required`)."""
    value = body.get(key)
    if value is None:
        if required:
            raise StoreError(400, f"{what}: '{key}' is required")
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(_JSON_NAMES.get(k, k.__name__) for k in kinds)
        raise StoreError(400, f"{what}: '{key}' must be {names}")
    return value


def objects(body: dict[str, Any], key: str, *, limit: int, what: str = "the request body") -> list[dict[str, Any]]:
    """body[key] as a list of at most `limit` JSON objects."""
    items = field(body, key, list, required=True, what=what)
    if len(items) > limit:
        raise StoreError(400, f"{what}: '{key}' holds {len(items):,} entries, more than the {limit:,} allowed")
    if not all(isinstance(item, dict) for item in items):
        raise StoreError(400, f"{what}: every entry of '{key}' must be an object")
    return items


_JSON_NAMES = {str: "a string", int: "an integer", bool: "true or false", list: "a list", dict: "an object",
               float: "a number"}


async def lines(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The non-empty lines of an NDJSON body, each at most `limit` bytes."""
    pending = b""
    async for chunk in request.stream():
        pending += chunk
        *complete, pending = pending.split(b"\n")
        if len(pending) > limit:
            raise StoreError(413, f"a commit line is over {limit} bytes: upload large files through LFS")
        for line in complete:
            if line.strip():
                yield line
    if pending.strip():
        yield pending


async def receive(request: Request, write: Callable[[bytes], Any], limit: int) -> None:
    """Streams the body into `write`, refusing more than `limit` bytes."""
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise StoreError(400, f"the body is larger than the declared {limit} bytes")
        write(chunk)


def read_range(path: Path, start: int, end: int) -> Iterator[bytes]:
    with path.open("rb") as f:
        f.seek(start)
        left = end - start
        while left > 0:
            chunk = f.read(min(READ_CHUNK, left))
            if not chunk:
                break
            left -= len(chunk)
            yield chunk


def byte_range(header: str, size: int) -> tuple[int, int] | None:
    """[start, end) of a `Range: bytes=a-b` header for a body of `size` bytes; None when unsatisfiable."""
    match = re.fullmatch(r"\s*bytes=(\d{0,19})-(\d{0,19})\s*", header)
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


def iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
