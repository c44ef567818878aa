"""Text for the terminal: what adapter files and servers say (descriptions, module and tensor names, messages) is
printed with control characters escaped, so a file cannot move the cursor, rewrite earlier lines, change colours or
set the window title (ANSI escape sequences), nor reorder what is shown (Unicode bidirectional controls).
"""

from __future__ import annotations

import unicodedata

import click

_KEPT = frozenset("\n\t")


def safe(text: str) -> str:
    """`text` with every control and format character except newline and tab written as an escape (\\x1b,
    \\u202e)."""
    if text.isprintable() or all(c.isprintable() or c in _KEPT for c in text):
        return text
    return "".join(c if c.isprintable() or c in _KEPT or unicodedata.category(c) not in ("Cc", "Cf") else
                   (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}") for c in text)


def echo(text: str = "", *, err: bool = False) -> None:
    """click.echo of `safe(text)`."""
    click.echo(safe(text), err=err)
