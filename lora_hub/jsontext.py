"""The JSON dialect of the format (FORMAT.md, "JSON"): strict reading and canonical writing.

Strict reading refuses what Python's json module would quietly accept: duplicate keys (the last one would win and
hide the first), NaN and Infinity, and nesting deeper than the interpreter can follow. Canonical writing gives one
byte sequence per value: keys sorted by code point, no insignificant whitespace, ASCII only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {duplicate!r}")
    return result


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not allowed: JSON numbers must be finite")


def is_json_int(value: object) -> bool:
    """An integer as JSON means it: not a boolean (which Python counts as an int)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_json_number(value: object) -> bool:
    """An integer or a float, not a boolean."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def strict_loads(text: str | bytes) -> Any:
    """Parses JSON, refusing duplicate keys, NaN/Infinity and excessive nesting.

    Raises:
        ValueError: With a message that says which rule was broken (json.JSONDecodeError for syntax errors).
    """
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except RecursionError as e:
        raise ValueError("nesting is too deep") from e


def canonical_json(value: Any) -> str:
    """The canonical JSON text of `value`: sorted keys, no whitespace, ASCII, finite numbers only."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def read_json_object(path: str | os.PathLike[str], *, limit: int, error: type[Exception]) -> dict[str, Any]:
    """A config file holding one JSON object (a UTF-8 BOM tolerated), at most `limit` bytes, read strictly.

    Raises:
        error: Over the limit, not valid JSON, or not an object (with `path=` for lora-hub's errors).
    """
    path = Path(path)
    if path.stat().st_size > limit:
        raise error(f"over the {limit:,}-byte limit for {path.name}", path=path)
    try:
        config = strict_loads(path.read_bytes().decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError) as e:
        raise error(f"not valid JSON: {e}", path=path) from e
    if not isinstance(config, dict):
        raise error(f"{path.name} must hold one JSON object", path=path)
    return config
