"""Side-by-side measurements of lora-hub (run with `python -m benchmarks`; `--quick` for a smoke run)."""
