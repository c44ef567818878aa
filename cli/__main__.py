"""`python -m lora_hub_cli`: the `lora-hub` command."""

from .main import main

main()
