"""Many adapters on one model, side by side with PEFT: mixed batches (64 rows, 1, 8 and 64 distinct adapters)
against PEFT's adapter_names= path and against the FLOP limit (the base model's forward plus the LoRA FLOPs, at the
base's own speed), and a resident budget of 64 adapters among 1,000 registered ones: a load on demand from disk and
from the host tier, a switch, and the memory one resident adapter takes.

Shapes: the issue's small Llama (hidden 512, 4 layers, r=16 on the 7 projections, 64 rows x 32 tokens) and the
168M-parameter benchmark Llama (64 rows x 128 tokens); --quick uses the tiny Llama.
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from pathlib import Path

import torch

from .harness import Row, interleaved_timings, timed
from .runtime import LLAMA_168M, TARGETS, quiet

SMALL = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=8, vocab_size=1024, max_position_embeddings=256)


def run(workdir: Path, *, quick: bool) -> list[Row]:
    quiet()
    rows = []
    shapes = [("tiny", {}, 8)] if quick else [("small", SMALL, 32), ("168M", LLAMA_168M, 128)]
    for label, overrides, tokens in shapes:
        rows += _mixed(workdir, label, overrides, tokens, repeats=3 if quick or label == "168M" else 5)
    rows += _budget(workdir, {} if quick else LLAMA_168M, "tiny" if quick else "168M", quick)
    return rows


def _mixed(workdir: Path, label: str, overrides: dict, length: int, repeats: int) -> list[Row]:
    from peft import PeftModel

    import lora_hub
    from lora_hub.testing import random_peft_adapter, tiny_model

    base = tiny_model("llama", **overrides)
    folders = [random_peft_adapter(base, workdir / f"mixed-{label}-{i}", seed=i, r=16, lora_alpha=32,
                                   target_modules=TARGETS) for i in range(64)]
    ours_model = copy.deepcopy(base)
    runtime = lora_hub.attach(ours_model)
    for i, folder in enumerate(folders):
        runtime.load(f"a{i}", folder)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), folders[0], adapter_name="a0")
    for i, folder in enumerate(folders[1:], 1):
        peft_model.load_adapter(folder, adapter_name=f"a{i}")
    tokens = torch.randint(0, base.config.vocab_size, (64, length), generator=torch.Generator().manual_seed(0))
    linear = [m for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)]
    lora = [m for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in TARGETS]
    flops_share = sum(16 * (m.in_features + m.out_features) for m in lora) / sum(
        m.in_features * m.out_features for m in linear)
    out = []
    for distinct in (1, 8, 64):
        plan = [f"a{i % distinct}" for i in range(64)]

        def ours(plan=plan) -> float:
            with runtime.route(plan):
                return timed(lambda: ours_model(tokens))

        def theirs(plan=plan) -> float:
            return timed(lambda: peft_model(tokens, adapter_names=plan))

        def bare() -> float:
            return timed(lambda: base(tokens))

        ours_s, theirs_s, base_s = interleaved_timings([ours, theirs, bare], repeats=repeats)
        limit = base_s * (1 + flops_share)
        name = f"mixed batch 64x{length}, {distinct} adapter{'s' if distinct > 1 else ''} ({label} llama)"
        out.append(Row("many", name, ours_s * 1000, "ms", theirs_s * 1000, "adapter_names="))
        out.append(Row("many", f"  its time over the FLOP limit ({limit * 1000:.0f} ms)", ours_s / limit, "x",
                       theirs_s / limit, "adapter_names= over the limit"))
    return out


def _budget(workdir: Path, overrides: dict, label: str, quick: bool) -> list[Row]:
    """1,000 registered names over 16 distinct files, 64 resident: loads on demand evict the least recently used."""
    import lora_hub
    from lora_hub.registry import Registry, RegistryEntry
    from lora_hub.testing import random_peft_adapter, tiny_model

    base = tiny_model("llama", **overrides)
    files = []
    for i in range(16):
        folder = random_peft_adapter(base, workdir / f"budget-{label}-{i}", seed=100 + i, r=16, lora_alpha=32,
                                     target_modules=TARGETS)
        files.append((folder, lora_hub.save_adapter(lora_hub.convert_adapter(folder, base=base),
                                                    workdir / f"budget-{label}-{i}.safetensors")))
    registry = Registry(workdir / f"registry-{label}")
    names = [f"team/adapter-{i:04d}" for i in range(1000)]
    for i, name in enumerate(names):
        registry.record(RegistryEntry(name=name, path=str(files[i % 16][1])))
    previous = os.environ.get("LORA_HUB_HOME")
    os.environ["LORA_HUB_HOME"] = str(registry.home)  # where use() finds the names
    try:
        return _budget_rows(base, files, names, label, quick)
    finally:
        if previous is None:
            os.environ.pop("LORA_HUB_HOME", None)
        else:
            os.environ["LORA_HUB_HOME"] = previous


def _budget_rows(base, files, names: list[str], label: str, quick: bool) -> list[Row]:
    from peft import PeftModel

    import lora_hub

    resident = 8 if quick else 64
    one = files[0][1].stat().st_size
    disk_model, host_model = copy.deepcopy(base), copy.deepcopy(base)
    disk = lora_hub.attach(disk_model, max_resident=resident)
    host = lora_hub.attach(host_model, max_resident=resident, host_cache_bytes=(resident + 16) * one)
    for name in names[:resident]:
        disk.use(name)
        host.use(name)
    cursor = {"disk": resident, "host": 0}

    def from_disk() -> float:  # a name never loaded: read from its file, the least recently used evicted
        name = names[cursor["disk"]]
        cursor["disk"] += 1
        return timed(lambda: disk.use(name))

    def from_host() -> float:  # an evicted name, loaded again from host memory
        host.use(names[resident + cursor["host"] % 16])  # evicts one of the first names
        name = names[cursor["host"] % resident]
        cursor["host"] += 1
        return timed(lambda: host.use(name))

    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), files[0][0], adapter_name="p0")
    turn = {"peft": 0}

    def peft_disk() -> float:  # PEFT's way: load the adapter, drop the oldest, set it
        turn["peft"] += 1
        name = f"p{turn['peft']}"

        def step():
            peft_model.load_adapter(files[turn["peft"] % 16][0], adapter_name=name)
            peft_model.set_adapter(name)
            peft_model.delete_adapter(f"p{turn['peft'] - 1}")
        return timed(step)

    repeats = 5 if quick else 15
    disk_s, peft_s = interleaved_timings([from_disk, peft_disk], repeats=repeats)
    host_s = statistics.median(from_host() for _ in range(repeats))
    switches = []
    for i in range(4 * repeats):
        name = disk.adapters[i % resident]
        start = time.perf_counter()
        disk.use(name)
        switches.append(time.perf_counter() - start)
    layers = disk.layers.values()
    per_adapter = sum(layer.lora_A.nbytes + layer.lora_B.nbytes for layer in layers) / resident
    return [
        Row("many", f"load on demand from disk, {resident} resident of 1,000 ({label} llama)", disk_s * 1000, "ms",
            peft_s * 1000, "load_adapter + set_adapter + delete_adapter"),
        Row("many", f"load on demand from the host tier ({label} llama)", host_s * 1000, "ms"),
        Row("many", f"switch among {resident} resident ({label} llama)", statistics.median(switches) * 1e6, "us"),
        Row("many", f"memory per resident adapter ({label} llama, r=16, fp32)", per_adapter / 2**20, "MiB"),
    ]
