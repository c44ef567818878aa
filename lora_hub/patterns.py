"""Regular expressions that come from adapter files (PEFT's target_modules, the keys of rank_pattern and
alpha_pattern, layers_pattern), matched at a bounded cost whatever their shape.

Python's `re` backtracks: `(a+)+$` against forty `a`s and a `b` takes longer than the age of the universe. Patterns
from files therefore run on RE2 (the google-re2 package), whose matching time is linear in the text, with the
semantics of `re` for everything the two share; PEFT's own tests (`re.fullmatch`, `re.match` of
`(.*\\.)?(key)$`) ask only whether a pattern matches, where the two engines agree. What RE2 cannot run in linear
time (backreferences, lookaround) is refused by name, as are patterns over MAX_PATTERN_BYTES, and a config whose
patterns would need more than MAX_PATTERN_TESTS tests.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

from .errors import PatternTooComplexError, PatternUnsupportedError, PeftConfigError

MAX_PATTERN_BYTES = 64 * 1024
"""The longest pattern accepted (UTF-8 bytes): far above what PEFT configs hold, including lora-hub's own export,
which writes one alternative per module when module paths collide."""
MAX_PATTERN_TESTS = 4_000_000
"""The most regular-expression tests one reading of a config may run (modules x patterns): each costs about a
microsecond. Keys that are plain module names (PEFT's usual rank_pattern keys, and lora-hub's own export) are
looked up, not matched, and do not count."""
MAX_COMPILED_PATTERNS = 16_384
"""The most distinct regular expressions one reading of a config may compile (each costs tens of microseconds)."""

_LITERAL = re.compile(r"\^?(?:[A-Za-z0-9_-]|\\[.-])+")
"""A key that is a plain (escaped) module path, optionally anchored with ^: matched by string comparison."""


class PatternBudget:
    """Counts the regular-expression work of one reading of a config, and refuses to run more than
    MAX_PATTERN_TESTS tests or compile more than MAX_COMPILED_PATTERNS patterns."""

    def __init__(self, tests: int = MAX_PATTERN_TESTS, compiles: int = MAX_COMPILED_PATTERNS) -> None:
        self.tests, self.compiles = tests, compiles
        self._limits = (tests, compiles)

    def spend(self, tests: int, what: str, *, compiles: int = 0) -> None:
        self.tests -= tests
        self.compiles -= compiles
        if self.tests < 0 or self.compiles < 0:
            raise PatternTooComplexError(
                f"{what}: matching every module against the config's patterns needs more than "
                f"{self._limits[0]:,} pattern tests or {self._limits[1]:,} distinct patterns; use fewer patterns "
                "(or list module names)")


def fullmatch(pattern: str, text: str, *, what: str) -> bool:
    """`re.fullmatch(pattern, text) is not None`, in linear time.

    Args:
        what: Where the pattern comes from, for messages ("target_modules").

    Raises:
        PeftConfigError: Not a valid regular expression.
        PatternUnsupportedError, PatternTooComplexError: See the module docs.
    """
    return _compiled(pattern, what).fullmatch(text) is not None


def matches_key(key: str, module: str, *, what: str) -> bool:
    """PEFT's get_pattern_key test for one key: `re.match(rf"(.*\\.)?({key})$", module)`, in linear time."""
    _compiled(key, what)  # the key alone first, so that errors name it rather than PEFT's wrapping
    return _compiled(rf"(.*\.)?({key})$", what).match(module) is not None


class KeyPatterns:
    """A PEFT rank_pattern or alpha_pattern: the value of the first key (in the config's order) that matches the
    end of a module path at a dot boundary. Plain-name keys are found by looking up the module path's dot-suffixes;
    only the regular-expression keys before the first such hit are matched.

    Raises:
        PeftConfigError, PatternUnsupportedError, PatternTooComplexError: On construction, for a key that is not a
            valid or safe pattern, or too many of them.
    """

    def __init__(self, patterns: Mapping[str, Any], *, what: str, budget: PatternBudget) -> None:
        self.what, self.budget = what, budget
        self.exact: dict[str, int] = {}  # "^name": matches only the whole path
        self.suffix: dict[str, int] = {}  # "name": the whole path or a dot-suffix of it
        self.regex: list[tuple[int, Any]] = []
        self.values = list(patterns.values())
        for index, key in enumerate(patterns):
            if _LITERAL.fullmatch(key):
                plain = key.replace("\\", "")
                table = self.exact if plain.startswith("^") else self.suffix
                table.setdefault(plain.lstrip("^"), index)
            else:
                self.regex.append((index, None))
        budget.spend(0, what, compiles=2 * len(self.regex))
        keys = list(patterns)
        self.regex = [(index, self._wrapped(keys[index])) for index, _ in self.regex]

    def _wrapped(self, key: str) -> Any:
        _compiled(key, f"{self.what} key")
        return _compiled(rf"(.*\.)?({key})$", f"{self.what} key")

    def value(self, module: str, default: Any) -> Any:
        hits = [self.exact.get(module, len(self.values))]
        if self.suffix:
            parts = module.split(".")
            hits += [self.suffix.get(".".join(parts[i:]), len(self.values)) for i in range(len(parts))]
        first = min(hits)
        for index, pattern in self.regex:
            if index >= first:
                break
            self.budget.spend(1, self.what)
            if pattern.match(module) is not None:
                return self.values[index]
        return self.values[first] if first < len(self.values) else default


@functools.lru_cache(maxsize=4096)
def _compiled(pattern: str, what: str) -> Any:
    import re2

    if len(pattern.encode("utf-8", "surrogatepass")) > MAX_PATTERN_BYTES:
        raise PatternTooComplexError(f"{what}: the pattern is {len(pattern):,} characters long, over the limit of "
                                     f"{MAX_PATTERN_BYTES:,} bytes")
    try:
        re.compile(pattern)  # compiling is cheap and safe; only matching can backtrack
    except (re.error, RecursionError, OverflowError) as e:
        raise PeftConfigError(f"{what}: {_shown(pattern)} is not a valid regular expression: {e}") from e
    options = re2.Options()
    options.log_errors = False
    try:
        return re2.compile(pattern, options)
    except re2.error as e:
        detail = e.args[0].decode("utf-8", "replace") if e.args and isinstance(e.args[0], bytes) else str(e)
        if "pattern too large" in detail:
            raise PatternTooComplexError(f"{what}: {_shown(pattern)} compiles to more states than a bounded-cost "
                                         f"match allows ({detail})") from e
        raise PatternUnsupportedError(
            f"{what}: {_shown(pattern)} uses a construct that has no linear-time match ({detail}), such as a "
            "backreference or a lookaround; lora-hub does not run such patterns from files") from e


def _shown(pattern: str) -> str:
    return repr(pattern) if len(pattern) <= 80 else repr(pattern[:77] + "...")
