"""The `lora-hub` command: a click group whose commands stay thin (parse, call one public function of lora_hub,
print). Library errors print one line with their code and exit 1; usage errors exit 2; a traceback only with
LORA_HUB_DEBUG=1.
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Any

import click

import lora_hub

from .commands import ALL_COMMANDS, debug_enabled
from .terminal import echo

CLI_ERROR_MAPPINGS: list[tuple[type[BaseException], str]] = [
    (lora_hub.AdapterNotFoundError, "not found"),
    (lora_hub.PickleRefusedError, "refused"),
    (lora_hub.InvalidAdapterError, "invalid adapter"),
    (lora_hub.AdapterRejectedError, "rejected"),
    (lora_hub.HubError, "hub"),
    (lora_hub.RegistryError, "registry"),
    (lora_hub.LoraHubError, "error"),
    (OSError, "error"),
]
"""Library errors -> the label printed before the message, most specific class first."""


def _show_warning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    if issubclass(category, lora_hub.LoraHubWarning) or debug_enabled():
        echo(f"warning: {message}", err=True)


class LoraHubGroup(click.Group):
    """Maps errors to exit codes for every command, under `lora-hub` and under click's test runner alike."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not debug_enabled():
            logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # optional-kernel notices on import
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            warnings.simplefilter("always", lora_hub.LoraHubWarning)
            try:
                result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            except click.ClickException as e:
                e.show()
                sys.exit(e.exit_code)
            except click.Abort:
                echo("Aborted.", err=True)
                sys.exit(1)
            except tuple(cls for cls, _ in CLI_ERROR_MAPPINGS) as e:
                if debug_enabled():
                    raise
                label = next(label for cls, label in CLI_ERROR_MAPPINGS if isinstance(e, cls))
                code = getattr(e, "code", None)
                echo(f"{label}{f' [{code}]' if isinstance(code, str) else ''}: {e}", err=True)
                sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)


@click.group(cls=LoraHubGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(lora_hub.__version__, prog_name="lora-hub")
def cli() -> None:
    """lora-hub: one file format for LoRA adapters, and the tools around it."""


for _command in ALL_COMMANDS:
    cli.add_command(_command)


def main() -> None:
    """The console script `lora-hub`."""
    cli(prog_name="lora-hub")
