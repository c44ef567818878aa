"""The offline tour behind `lora-hub demo`: a Hub-compatible server started in-process, a tiny base model built from
a config, two PEFT task adapters, conversion to lora-hub files, header-only inspection, export back to PEFT with the
proof that PEFT sees the same adapter (bit-identical tensors, identical logits), push to the server and pull back
(validated on arrival, recorded in a registry), then both pulled adapters on the 8-bit base: switch, stack, route a
mixed batch, merge and unmerge exactly. Nothing reaches the network; every step is timed.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DemoStep:
    title: str
    seconds: float
    detail: str


class DemoFailure(AssertionError):
    """The demo's own check failed: lora-hub and PEFT disagree."""


def run_demo(workdir: str | os.PathLike[str] | None = None, *,
             report: Callable[[DemoStep], None] = lambda step: None) -> list[DemoStep]:
    """Runs the tour in `workdir` (a temporary folder by default), calling `report` after each step.

    Returns:
        The steps, in order.

    Raises:
        DemoFailure: An adapter did not survive the round trip exactly.
    """
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="lora-hub-demo-") as tmp:
            return _tour(Path(tmp), report)
    return _tour(Path(workdir), report)


def _tour(work: Path, report: Callable[[DemoStep], None]) -> list[DemoStep]:
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    from . import convert_adapter, load_adapter, read_header, save_adapter, to_peft
    from .testing import random_peft_adapter, save_tiny_model, tiny_model

    steps: list[DemoStep] = []

    @contextmanager
    def step(title: str) -> Iterator[list[str]]:
        detail: list[str] = []
        start = time.perf_counter()
        yield detail
        steps.append(DemoStep(title, time.perf_counter() - start, "; ".join(detail)))
        report(steps[-1])

    with step("build a tiny Llama base model from its config") as d:
        base_dir = save_tiny_model("llama", work / "base")
        base = tiny_model("llama")
        d.append(f"{sum(p.numel() for p in base.parameters()):,} parameters, saved to {base_dir}")
    with step("make two PEFT adapters with random weights") as d:
        sql = random_peft_adapter(base, work / "peft-sql", seed=1, r=8, lora_alpha=16)
        chat = random_peft_adapter(base, work / "peft-chat", seed=2, r=4, lora_alpha=8, use_rslora=True,
                                   rank_pattern={"q_proj": 8})
        d.append(f"{sql.name} (r=8), {chat.name} (r=4, rslora, q_proj r=8)")
    files = {}
    for name, source in (("sql", sql), ("chat", chat)):
        with step(f"convert {source.name} to a lora-hub file, checked against the base") as d:
            files[name] = save_adapter(convert_adapter(source, base=base_dir), work / f"{name}.safetensors")
            d.append(f"{files[name].name}, {files[name].stat().st_size:,} bytes")
    with step("read the header of chat.safetensors (no tensor data read)") as d:
        header = read_header(files["chat"])
        ranks = sorted({spec.r for spec in header.config.modules.values()})
        d.append(f"{len(header.config.modules)} modules, ranks {ranks}, base {header.config.base_model.model_type}, "
                 f"fingerprint {header.config.base_model.fingerprint[:19]}...")
    with step("load chat.safetensors lazily and compute one delta weight") as d:
        adapter = load_adapter(files["chat"])
        delta = adapter.delta_weight("model.layers.0.self_attn.q_proj")
        d.append(f"delta {tuple(delta.shape)}, |delta| max {delta.abs().max().item():.4f}")
    tokens = torch.randint(0, base.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    for name, source in (("sql", sql), ("chat", chat)):
        with step(f"export {name} back to PEFT and compare with the original in PeftModel") as d:
            exported = to_peft(load_adapter(files[name]), work / f"peft-{name}-roundtrip")
            before = load_file(source / "adapter_model.safetensors")
            after = load_file(exported / "adapter_model.safetensors")
            if before.keys() != after.keys() or not all(torch.equal(before[k], after[k]) for k in before):
                raise DemoFailure(f"{name}: the exported tensors differ from the original ones")
            with torch.no_grad():
                expected = PeftModel.from_pretrained(tiny_model("llama"), source).eval()(tokens).logits
                actual = PeftModel.from_pretrained(tiny_model("llama"), exported).eval()(tokens).logits
                plain = base(tokens).logits
            if not torch.equal(expected, actual):
                raise DemoFailure(f"{name}: PeftModel gives different logits for the exported adapter")
            d.append(f"{len(before)} tensors bit-identical; logits identical (the adapter moves them by up to "
                     f"{(expected - plain).abs().max().item():.3f})")
    pulled = _hub_round_trip(step, work, files)
    _run_time(step, base_dir, pulled, tokens)
    return steps


def _hub_round_trip(step, work: Path, files: dict[str, Path]) -> dict[str, Path]:
    """Push both adapters to an embedded server, pull them into a private cache and registry, validated."""
    import hashlib

    from .hub import pull, push
    from .registry import Registry
    from .server import Store, running

    registry = Registry(work / "registry")
    with running(work / "hub-server") as server:
        token = Store(server.root).add_token("demo")
        pulled = {}
        for name, path in files.items():
            with step(f"push {name} to the embedded Hub at {server.url}") as d:
                result = push(path, f"demo/{name}-lora", token=token, endpoint=server.url)
                d.append(f"demo/{name}-lora @ {result.commit[:12]}: adapter_model.safetensors, adapter_config.json, "
                         "README.md")
        for name, path in files.items():
            with step(f"pull demo/{name}-lora: download, validate, record in the registry") as d:
                pulled[name] = pull(f"demo/{name}-lora", token=token, endpoint=server.url,
                                    cache_dir=work / "hf-cache", registry=registry)
                entry = registry.get(f"demo/{name}-lora")
                if entry.sha256 != hashlib.sha256(path.read_bytes()).hexdigest() or not entry.valid:
                    raise DemoFailure(f"{name}: the pulled file differs from the pushed one")
                d.append(f"valid, sha256 {entry.sha256[:12]}... equal to the pushed file, commit "
                         f"{entry.commit_sha[:12]}, ranks {entry.ranks}")
    return pulled


def _run_time(step, base_dir: Path, files: dict[str, Path], tokens) -> None:
    """Both adapters on the 8-bit base: switch, stack, route a mixed batch, merge, and unmerge exactly."""
    import torch

    from .runtime import attach
    from .runtime.apply import load_base

    with step("load the base model in 8-bit (bitsandbytes LLM.int8())") as d:
        model = load_base(str(base_dir), load_in_8bit=True)
        d.append(f"{sum(type(m).__name__ == 'Linear8bitLt' for m in model.modules())} int8 layers")
    with step("attach lora-hub and load both pulled adapters") as d:
        adapters = attach(model)
        for name, path in files.items():
            adapters.load(name, path)
        d.append(f"{len(adapters.layers)} layers wrapped, adapters {adapters.adapters}")
    with torch.no_grad():
        outputs = {}
        for name in files:
            with step(f"switch to {name}, then a forward pass") as d:
                adapters.use(name)
                outputs[name] = model(tokens).logits
                d.append(f"in use: {adapters.active}")
        with step("stack sql 0.5 + chat 0.5") as d:
            adapters.use({"sql": 0.5, "chat": 0.5})
            stacked = model(tokens).logits
            d.append(f"logits differ from sql alone by up to {(stacked - outputs['sql']).abs().max().item():.3f}")
        with step("route one batch: row 0 uses sql, row 1 chat, in one forward pass") as d:
            with adapters.route(["sql", "chat"]):
                routed = model(tokens).logits
            error = max((routed[0] - outputs["sql"][0]).abs().max().item(),
                        (routed[1] - outputs["chat"][1]).abs().max().item())
            scale = outputs["sql"].abs().max().item()
            if error > 1e-2 * scale:  # int8 layers round their inputs, so float-level differences can move a step
                raise DemoFailure(f"routed rows differ from the adapters run alone by {error}")
            d.append(f"each row matches its adapter run alone to {error / scale:.0e} of the logit scale")
        codes = {name: layer.base_layer.state.CB.clone() for name, layer in adapters.layers.items()}
        with step("merge sql into the int8 weights (dequantize, add, requantize)") as d:
            adapters.merge("sql")
            merged = model(tokens).logits
            d.append(f"merged logits within {(merged - outputs['sql']).abs().max().item():.3f} of the unmerged ones")
        with step("unmerge: the int8 codes are restored bit for bit") as d:
            adapters.unmerge()
            if not all(torch.equal(codes[n], layer.base_layer.state.CB) for n, layer in adapters.layers.items()):
                raise DemoFailure("unmerge did not restore the int8 codes exactly")
            d.append(f"{len(codes)} layers restored exactly; in use again: {adapters.active}")
