"""The JSON dialect of the format (FORMAT.md, "JSON"): strict reading and canonical writing.

Strict reading refuses what Python's json module would quietly accept: duplicate keys (the last one would win and
hide the first), NaN and Infinity, and nesting deeper than the interpreter can follow. Canonical writing gives one
byte sequence per value: keys sorted by code point, no insignificant whitespace, ASCII only.

The large documents (a header and config of thousands of modules) are first read by `quick_read` (orjson, with no
Python call per object) and checked in bulk by their readers. A text that is exactly orjson's own compact writing of
what it read has no duplicate key; for other texts the readers count members against `members_in_text`. Anything
that is not plainly well-formed is read again by `strict_loads`, whose verdict and message stand. The quick reading
is an optimisation only: it accepts nothing that strict reading refuses.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import orjson

_DIGITS = bytes(ord("0") if chr(i).isdigit() and i < 128 else ord(" ") for i in range(256))
_LONG_DIGITS = b"0" * 19
_ESCAPED_COLON = re.compile(rb"\\u003[aA]")
MAX_QUICK_DEPTH = 64
"""How deep `walk` follows a value read by `quick_read` (FORMAT.md section 15 lets a reader refuse more than 64
levels; deeper values go to `strict_loads`, which decides)."""


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


class QuickReading(NamedTuple):
    """What `quick_read` read: the value, and whether the text is compact."""

    value: Any
    compact: bool
    """The text is exactly orjson's compact writing of `value`: no key is written twice in it (orjson writes each key
    once, and a text with a key written twice reads as fewer members than it spells out), and every number reads as
    written (orjson writes a float with a '.' or an exponent). What lora-hub and safetensors write is compact."""


def quick_read(data: bytes, *, numbers_checked: bool = False) -> QuickReading:
    """orjson's reading of JSON `data`, where it reads the same values as `strict_loads`, and whether `data` is
    compact (see QuickReading). orjson refuses NaN and Infinity and bounds its nesting without recursing, like strict
    reading, and also refuses what strict reading accepts (lone surrogates, 1e400). Where the two differ:

    - orjson keeps the last of duplicate keys: for a text that is not compact, a caller compares `members_in_text`
      with the members it counts.
    - orjson reads integers outside [-2**63, 2**64) as floats: a text that is not compact and has a run of 19 digits
      or more is refused here.

    Args:
        numbers_checked: The caller checks every number it reads with `natural_rows`, which refuses such floats:
            the digit-run scan is skipped.

    Raises:
        ValueError: Where orjson refuses `data`, or may read a number otherwise (the caller then reads it with
            `strict_loads`).
    """
    value = orjson.loads(data)
    try:
        compact = orjson.dumps(value) == data
    except orjson.JSONEncodeError:  # nested deeper than orjson writes
        compact = False
    if not compact and not numbers_checked and _LONG_DIGITS in data.translate(_DIGITS):
        raise ValueError("a number of 19 digits or more")
    return QuickReading(value, compact)


def natural_rows(rows: list[Any], *, width: int | None = None, max_width: int | None = None,
                 max_digits: int | None = None) -> bool:
    """Whether every row of `rows` (a list of values read by `quick_read`) is a list of integers >= 0: of exactly
    `width` integers, or of at most `max_width`, each of at most `max_digits` digits, where given. Written back as
    JSON, the rows then hold only digits and commas between their brackets. (A boolean is written as true or false,
    a float always with a '.' or an exponent, and orjson reads an integer it cannot hold exactly as a float.)"""
    text = orjson.dumps(rows)
    if max_digits is not None and b"0" * (max_digits + 1) in text.translate(_DIGITS):
        return False
    brackets = text.translate(None, b"0123456789")  # [[,],[,]] for rows of two integers
    if width is not None:
        return brackets == b"[" + b",".join([b"[" + b"," * (width - 1) + b"]"] * len(rows)) + b"]"
    if max_width is not None and b"," * max_width in brackets:  # commas in a run lie within one row
        return False
    return brackets.replace(b",", b"") == b"[" + b"[]" * len(rows) + b"]"


quick_dumps = orjson.dumps
"""orjson's compact JSON text of a value read by `quick_read` (keys in their order): e.g. a key that tells apart
values Python compares equal (1, 1.0 and true). (orjson's own function: mapped over thousands of entries.)"""


def members_in_text(data: bytes, strings: Iterable[str]) -> int | None:
    """The number of object members written in the JSON text `data`, given every decoded key and string value in
    it that may hold a ':' (the others may be left out).

    Every member has one ':' outside strings, so this is the count of ':' bytes less those inside strings. A parsed
    dict keeps duplicate keys once, so the text has duplicates exactly when this exceeds the members of the parsed
    value. None when `data` holds an escaped ':' ('\\u003a'), which decodes to a ':' that the text does not hold.
    """
    if _ESCAPED_COLON.search(data):
        return None
    return data.count(b":") - "".join(strings).count(":")


def walk(value: Any, strings: list[str], depth: int = 0) -> int | None:
    """The members of the objects in `value` (a value read by `quick_read`), appending its keys and string values
    to `strings` (for `members_in_text`); None when it nests deeper than MAX_QUICK_DEPTH. For the small parts of a
    document: the large, regular parts are counted in bulk by their readers."""
    if depth > MAX_QUICK_DEPTH:
        return None
    if type(value) is str:
        strings.append(value)
        return 0
    if type(value) is dict:
        strings.extend(value)
        members = len(value)
        children = value.values()
    elif type(value) is list:
        members, children = 0, value
    else:
        return 0
    for child in children:
        found = walk(child, strings, depth + 1)
        if found is None:
            return None
        members += found
    return members


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
