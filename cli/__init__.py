"""The `lora-hub` command line, a thin click front end over the public API of lora_hub."""
