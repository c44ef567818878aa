"""docs/cli.md, the command-line reference, made from the commands themselves (a test keeps the two identical).

Regenerate with `python -m lora_hub_cli.reference > docs/cli.md`.
"""

from __future__ import annotations

import click

from .main import cli

_INTRO = """# The lora-hub command line

Generated from the commands by `python -m lora_hub_cli.reference > docs/cli.md`; a test keeps this page identical
to what the commands say.

Every command prints one line for a library error, `label [CODE]: 'path': what failed and what to do`, and exits
with 1; usage errors exit with 2. `LORA_HUB_DEBUG=1` shows a traceback (and third-party warnings and progress bars).
Text that comes from files or servers (descriptions, names, messages) is printed with control characters escaped.
The codes are listed in [spec/CODES.md](../spec/CODES.md).
"""


def reference_markdown() -> str:
    parts = [_INTRO]
    context = click.Context(cli, info_name="lora-hub")
    for name in sorted(cli.commands):
        command = cli.commands[name]
        sub = click.Context(command, info_name=name, parent=context)
        usage = " ".join(command.collect_usage_pieces(sub))
        parts.append(f"## `lora-hub {name}`\n\n```\nlora-hub {name} {usage}\n```\n\n{_text(command.help)}\n")
        rows = []
        for param in command.params:
            if isinstance(param, click.Option):
                flags = ", ".join(f"`{flag}`" for flag in (*param.opts, *param.secondary_opts))
                default = "" if _unset(param.default) or param.is_flag else f" (default: {param.default})"
                rows.append(f"| {flags} | {_type(param)} | {_cell(param.help or '')}{default} |")
        if rows:
            parts.append("| option | value | meaning |\n|---|---|---|\n" + "\n".join(rows) + "\n")
    return "\n".join(parts)


def _unset(value: object) -> bool:
    return value is None or value is False or type(value).__name__ == "Sentinel"  # click's UNSET


def _text(help_text: str | None) -> str:
    paragraphs = [" ".join(p.split()) for p in (help_text or "").split("\n\n") if p.strip()]
    return "\n\n".join(paragraphs)


def _type(param: click.Option) -> str:
    if param.is_flag:
        return "flag"
    if isinstance(param.type, click.Choice):
        return " \\| ".join(f"`{c}`" for c in param.type.choices)
    if isinstance(param.type, click.IntRange):
        low, high = param.type.min, param.type.max
        return "integer" + (f" >= {low}" if low is not None else "") + (f" <= {high}" if high is not None else "")
    return param.metavar or param.type.name


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


if __name__ == "__main__":
    print(reference_markdown(), end="")
