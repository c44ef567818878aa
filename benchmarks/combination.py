"""Combining two adapters into one, side by side with PEFT's add_weighted_adapter on the same adapters (r=16, the
168M Llama; --quick: the tiny one): cat (exact) and svd to rank 16.

lora-hub reads the two files lazily and combines one module at a time; PEFT combines adapters already resident in
a PeftModel (their loading is not timed), so the comparison favours PEFT by the time it takes to read the files."""

from __future__ import annotations

from pathlib import Path

from .harness import Row, interleaved_timings, timed
from .runtime import adapters, quiet


def run(workdir: Path, *, quick: bool) -> list[Row]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import lora_hub

    quiet()
    base_dir, peft_dirs, files = adapters("llama", workdir, "ab", quick=quick)
    wrapped = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), peft_dirs["a"],
                                        adapter_name="a")
    wrapped.load_adapter(peft_dirs["b"], adapter_name="b")
    rows = []
    for method, rank in (("cat", None), ("svd", 16)):
        def ours(method=method, rank=rank) -> float:
            return timed(lambda: lora_hub.combine([files["a"], files["b"]], [0.7, 0.3], method=method, rank=rank))

        def peft(method=method, rank=rank) -> float:
            seconds = timed(lambda: wrapped.add_weighted_adapter(["a", "b"], [0.7, 0.3], "mix",
                                                                 combination_type=method, svd_rank=rank))
            wrapped.delete_adapter("mix")
            return seconds

        times = interleaved_timings([ours, peft], repeats=3 if quick else 5)
        rows.append(Row("combine", f"{method} of two adapters{f' to rank {rank}' if rank else ''}",
                        times[0] * 1000, "ms", times[1] * 1000, "add_weighted_adapter"))
    return rows
