"""Validation speed and memory: the header tier (whose cost must not grow with the file) and the full tier (which
streams every tensor) on a small and a large adapter, against the naive check a user would write otherwise:
safetensors.load_file, then torch.isfinite on every tensor."""

from __future__ import annotations

from pathlib import Path

from .harness import Row, interleaved_medians, peak_memory_added

MB = 1024 * 1024


def make_adapter(path: Path, size_bytes: int):
    """A float32 adapter of about `size_bytes`: r=64 on 4096x4096 projections, 2 MiB per module."""
    import torch

    import lora_hub

    spec = lora_hub.ModuleSpec(r=64, alpha=128, in_features=4096, out_features=4096)
    per_module = 2 * 64 * 4096 * 4
    count = max(1, size_bytes // per_module)
    modules = {f"model.layers.{i // 7}.proj{i % 7}": spec for i in range(count)}
    config = lora_hub.AdapterConfig(modules=modules)
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for module in modules:
        a, b = config.lora_tensor_names(module)
        tensors[a] = torch.empty(spec.a_shape).normal_(generator=generator) * 0.01
        tensors[b] = torch.empty(spec.b_shape).normal_(generator=generator) * 0.01
    return lora_hub.save_adapter(lora_hub.Adapter(config, tensors), path)


def run(workdir: Path, *, quick: bool) -> list[Row]:
    import lora_hub

    sizes = [10 * MB, 64 * MB] if quick else [10 * MB, 1024 * MB]
    repeats = 3 if quick else 5
    rows = []
    for size in sizes:
        path = make_adapter(workdir / f"adapter-{size // MB}mb.safetensors", size)
        label = f"{path.stat().st_size / MB:,.0f} MB"
        # Milliseconds each: many calls, so that the median spans the machine's slower and faster phases (on a
        # shared two-core VM, every call of a phase of a second or so can take 1.6x as long).
        (header_s,) = interleaved_medians([lambda p=path: lora_hub.validate(p, level="header")],
                                          repeats=repeats * 40)
        rows.append(Row("validate", f"header tier, {label} file", header_s * 1000, "ms"))
        full_s, naive_s = interleaved_medians(
            [lambda p=path: lora_hub.validate(p, level="full"), lambda p=path: _naive_check(p)], repeats=repeats)
        mb = path.stat().st_size / MB
        rows.append(Row("validate", f"full tier, {label} file", mb / full_s, "MB/s", mb / naive_s,
                        "load_file + isfinite", lower_is_better=False))
        ours = peak_memory_added(f"lora_hub.validate({str(path)!r}, level='full')", setup="import lora_hub, torch")
        naive = peak_memory_added(f"check({str(path)!r})", setup=_NAIVE_SOURCE)
        rows.append(Row("validate", f"full tier peak memory added, {label} file", ours / MB, "MB", naive / MB,
                        "load_file + isfinite"))
    return rows


_NAIVE_SOURCE = """
import torch
from safetensors.torch import load_file

def check(path):
    for tensor in load_file(path).values():
        assert torch.isfinite(tensor).all()
"""
_namespace: dict = {}
exec(_NAIVE_SOURCE, _namespace)
_naive_check = _namespace["check"]
