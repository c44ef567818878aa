"""Run time, side by side with PEFT on the same model and the same adapter files: file -> adapter active, a second
adapter, switching, replacing from disk, forward overhead unmerged and merged, mixed batches, merge and unmerge,
int8 drift after 100 cycles, the memory one adapter adds, and a scenario with 8 resident adapters.

The full run uses a 168M-parameter Llama (hidden 1024, 8 layers, 16 heads, intermediate 2816, vocab 32000; r=16 on
q, k, v, o, gate, up, down) in fp32 and 8-bit, and a GPT-2-small shape (Conv1D layers, fan_in_fan_out; r=16 on
c_attn, c_proj, c_fc) in fp32, on the CPU; --quick uses the tiny models.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from .harness import Row, interleaved_timings, peak_memory_added, timed

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA_168M = dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=16,
                  intermediate_size=2816, vocab_size=32000, max_position_embeddings=512)
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
GPT2_SMALL = dict(n_embd=768, n_layer=12, n_head=12, n_inner=3072, vocab_size=50257, n_positions=1024)


def adapters(kind: str, workdir: Path, names: str, *, quick: bool) -> tuple[Path, dict[str, Path], dict[str, Path]]:
    """The base model folder and, for each name, a random r=16 PEFT adapter and its lora-hub file."""
    import lora_hub
    from lora_hub.testing import random_peft_adapter, save_tiny_model, tiny_model

    overrides = {} if quick else (LLAMA_168M if kind == "llama" else GPT2_SMALL)
    targets = TARGETS if kind == "llama" else GPT2_TARGETS
    base_dir = workdir / f"base-{kind}"
    if not base_dir.exists():
        save_tiny_model(kind, base_dir, **overrides)
    model = tiny_model(kind, **overrides)
    peft_dirs, files = {}, {}
    for name in names:
        peft_dirs[name] = workdir / f"peft-{kind}-{name}"
        files[name] = workdir / f"{kind}-{name}.safetensors"
        if not files[name].exists():
            random_peft_adapter(model, peft_dirs[name], seed=ord(name), r=16, lora_alpha=32, target_modules=targets,
                                fan_in_fan_out=kind == "gpt2")
            lora_hub.save_adapter(lora_hub.convert_adapter(peft_dirs[name], base=base_dir), files[name])
    return base_dir, peft_dirs, files


def quiet() -> None:
    warnings.filterwarnings("ignore")
    torch.set_grad_enabled(False)
    # Random adapters push activations into denormal floats, which x86 CPUs compute slowly; the weights of a merged
    # random adapter then time 10-20% slower than the base for numeric, not structural, reasons. Flushing denormals
    # (as CPU inference deployments do) measures the compute itself, for lora-hub and PEFT alike.
    torch.set_flush_denormal(True)


def run(workdir: Path, *, quick: bool) -> list[Row]:
    quiet()
    repeats = 3 if quick else 5
    rows = []
    for kind, precisions in (("llama", ("fp32", "int8")), ("gpt2", ("fp32",))):
        base_dir, peft_dirs, files = adapters(kind, workdir, "abcd", quick=quick)
        for precision in precisions:
            def load_model(precision=precision, base_dir=base_dir):
                return _load(base_dir, precision)

            label = f"{kind}, {precision}"
            rows += _loading(load_model, peft_dirs, files, label, repeats)
            rows += _forward(load_model, peft_dirs, files, label, repeats, quick)
            rows += _merging(load_model, peft_dirs, files, label, precision, repeats, quick)
        if kind == "llama":
            rows += _memory(base_dir, peft_dirs, files)
    base_dir, peft_dirs, files = adapters("llama", workdir, "abcdefgh", quick=quick)
    rows += _eight(lambda: _load(base_dir, "fp32"), peft_dirs, files, repeats)
    return rows


def _load(base_dir: Path, precision: str):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    options = {"quantization_config": BitsAndBytesConfig(load_in_8bit=True)} if precision == "int8" else {}
    return AutoModelForCausalLM.from_pretrained(base_dir, device_map="cpu", **options).eval()


def _loading(load_model, peft_dirs, files, label: str, repeats: int) -> list[Row]:
    from peft import PeftModel
    from peft.utils.hotswap import hotswap_adapter

    import lora_hub

    ours_model, peft_model = load_model(), load_model()

    def ours_first() -> float:
        holder = {}

        def activate():
            runtime = holder["r"] = lora_hub.attach(ours_model)
            runtime.load("a", files["a"])
            runtime.use("a")

        seconds = timed(activate)  # attach included: PeftModel.from_pretrained wraps the model too
        holder["r"].detach()
        return seconds

    def peft_first() -> float:
        holder = {}
        seconds = timed(lambda: holder.setdefault("m", PeftModel.from_pretrained(peft_model, peft_dirs["a"])))
        holder["m"].unload()
        return seconds

    first = interleaved_timings([ours_first, peft_first], repeats=repeats)
    runtime = lora_hub.attach(ours_model)
    runtime.load("a", files["a"])
    runtime.use("a")
    wrapped = PeftModel.from_pretrained(peft_model, peft_dirs["a"], adapter_name="a")
    # Replacing runs with one adapter resident, as a hot swap does: PEFT's hotswap_adapter is slower with a second
    # adapter loaded, which once made this row's ratio (6.1-6.8x) disagree with one measured alone (3.5-4.1x).
    swap = {"ours": "a", "peft": "a"}

    def ours_replace() -> float:
        swap["ours"] = "c" if swap["ours"] == "a" else "a"
        return timed(lambda: runtime.load("a", files[swap["ours"]]))

    def peft_replace() -> float:
        swap["peft"] = "c" if swap["peft"] == "a" else "a"
        return timed(lambda: hotswap_adapter(wrapped, str(peft_dirs[swap["peft"]]), adapter_name="a"))

    replace = interleaved_timings([ours_replace, peft_replace], repeats=repeats)

    def ours_second() -> float:
        seconds = timed(lambda: runtime.load("b", files["b"]))
        runtime.unload("b")
        return seconds

    def peft_second() -> float:
        seconds = timed(lambda: wrapped.load_adapter(peft_dirs["b"], adapter_name="b"))
        wrapped.delete_adapter("b")
        return seconds

    second = interleaved_timings([ours_second, peft_second], repeats=repeats)
    runtime.load("b", files["b"])
    wrapped.load_adapter(peft_dirs["b"], adapter_name="b")
    flip = {"ours": "a", "peft": "a"}

    def ours_switch() -> float:
        flip["ours"] = "b" if flip["ours"] == "a" else "a"
        return timed(lambda: runtime.use(flip["ours"]))

    def peft_switch() -> float:
        flip["peft"] = "b" if flip["peft"] == "a" else "a"
        return timed(lambda: wrapped.set_adapter(flip["peft"]))

    switch = interleaved_timings([ours_switch, peft_switch], repeats=repeats * 4)
    runtime.use("a")
    wrapped.set_adapter("a")
    label = f"({label})"
    return [
        Row("runtime", f"file -> adapter active {label}", first[0] * 1000, "ms", first[1] * 1000,
            "PeftModel.from_pretrained"),
        Row("runtime", f"second adapter resident {label}", second[0] * 1000, "ms", second[1] * 1000,
            "load_adapter"),
        Row("runtime", f"switch between two resident {label}", switch[0] * 1000, "ms", switch[1] * 1000,
            "set_adapter"),
        Row("runtime", f"replace an adapter from disk {label}", replace[0] * 1000, "ms", replace[1] * 1000,
            "hotswap_adapter"),
    ]


def _forward(load_model, peft_dirs, files, label: str, repeats: int, quick: bool) -> list[Row]:
    from peft import PeftModel

    import lora_hub

    base, ours_model, peft_model = load_model(), load_model(), load_model()
    runtime = lora_hub.attach(ours_model)
    wrapped = PeftModel.from_pretrained(peft_model, peft_dirs["a"], adapter_name="a")
    for name in "abcd":
        runtime.load(name, files[name])
        if name != "a":
            wrapped.load_adapter(peft_dirs[name], adapter_name=name)
    runtime.use("a")
    wrapped.set_adapter("a")
    vocab = base.config.vocab_size
    rows = []
    for batch in (1, 8):
        tokens = torch.randint(0, vocab, (batch, 128), generator=torch.Generator().manual_seed(batch))
        times = interleaved_timings([lambda t=tokens: timed(lambda: base(t)), lambda t=tokens: timed(
            lambda: ours_model(t)), lambda t=tokens: timed(lambda: wrapped(t))], repeats=repeats)
        rows.append(Row("runtime", f"forward overhead over base, {batch}x128 ({label})", times[1] / times[0],
                        "x base", times[2] / times[0], "PeftModel"))
    tokens = torch.randint(0, vocab, (4, 128), generator=torch.Generator().manual_seed(4))
    plan = list("abcd")

    def ours_mixed() -> float:
        with runtime.route(plan):
            return timed(lambda: ours_model(tokens))

    mixed = interleaved_timings([ours_mixed, lambda: timed(lambda: wrapped(tokens, adapter_names=plan))],
                                repeats=repeats)
    rows.append(Row("runtime", f"mixed batch, 4 adapters x 128 ({label})", mixed[0] * 1000, "ms",
                    mixed[1] * 1000, "adapter_names="))
    tokens = torch.randint(0, vocab, (1, 128), generator=torch.Generator().manual_seed(1))
    runtime.merge("a")
    merged = interleaved_timings([lambda: timed(lambda: base(tokens)), lambda: timed(lambda: ours_model(tokens))],
                                 repeats=repeats)
    runtime.unmerge()
    rows.append(Row("runtime", f"merged forward over base, 1x128 ({label})", merged[1] / merged[0], "x base"))
    return rows


def _merging(load_model, peft_dirs, files, label: str, precision: str, repeats: int, quick: bool) -> list[Row]:
    from peft import PeftModel

    import lora_hub

    ours_model, peft_model = load_model(), load_model()
    runtime = lora_hub.attach(ours_model)
    runtime.load("a", files["a"])
    runtime.use("a")
    wrapped = PeftModel.from_pretrained(peft_model, peft_dirs["a"], adapter_name="a")

    def ours_merge() -> float:
        seconds = timed(lambda: runtime.merge("a"))
        runtime.unmerge()
        return seconds

    def peft_merge() -> float:
        seconds = timed(lambda: wrapped.merge_adapter(["a"]))
        wrapped.unmerge_adapter()
        return seconds

    def ours_unmerge() -> float:
        runtime.merge("a")
        return timed(runtime.unmerge)

    def peft_unmerge() -> float:
        wrapped.merge_adapter(["a"])
        return timed(wrapped.unmerge_adapter)

    merge = interleaved_timings([ours_merge, peft_merge], repeats=repeats)
    unmerge = interleaved_timings([ours_unmerge, peft_unmerge], repeats=repeats)
    rows = [Row("runtime", f"merge ({label})", merge[0] * 1000, "ms", merge[1] * 1000, "merge_adapter"),
            Row("runtime", f"unmerge ({label})", unmerge[0] * 1000, "ms", unmerge[1] * 1000, "unmerge_adapter")]
    if precision == "int8":
        cycles = 10 if quick else 100
        ours_before, peft_before = _dense(ours_model), _dense(peft_model)
        for _ in range(cycles):
            runtime.merge("a")
            runtime.unmerge()
            wrapped.merge_adapter(["a"])
            wrapped.unmerge_adapter()
        rows.append(Row("runtime", f"int8 drift after {cycles} merge/unmerge cycles", _drift(ours_before, ours_model),
                        "max |dW|", _drift(peft_before, peft_model), "merge/unmerge_adapter"))
    return rows


def _dense(model) -> dict[str, torch.Tensor]:
    """The dequantized weight of every 8-bit layer, by name (PEFT's wrappers name theirs base_layer)."""
    import bitsandbytes.functional as bnbf

    out = {}
    for name, module in model.named_modules():
        if type(module).__module__.startswith("bitsandbytes") and type(module).__name__ == "Linear8bitLt":
            state = module.state
            codes = state.CB if state.CB is not None else module.weight.data
            scales = state.SCB if state.SCB is not None else module.weight.SCB
            out[name.replace(".base_layer", "")] = bnbf.int8_vectorwise_dequant(codes, scales).float()
    return out


def _drift(before: dict[str, torch.Tensor], model) -> float:
    after = _dense(model)
    return max(float((after[name] - weight).abs().max()) for name, weight in before.items())


def _memory(base_dir: Path, peft_dirs, files) -> list[Row]:
    size = files["a"].stat().st_size
    setup = ("import torch, warnings\nwarnings.filterwarnings('ignore')\ntorch.set_grad_enabled(False)\n"
             "from transformers import AutoModelForCausalLM\n"
             f"model = AutoModelForCausalLM.from_pretrained({str(base_dir)!r}).eval()\n"
             "import lora_hub, peft\n")
    ours = peak_memory_added(f"r = lora_hub.attach(model); r.load('a', {str(files['a'])!r}); r.use('a')",
                             setup=setup)
    theirs = peak_memory_added(f"m = peft.PeftModel.from_pretrained(model, {str(peft_dirs['a'])!r})", setup=setup)
    return [Row("runtime", f"peak memory added by one adapter ({size / 2**20:.1f} MB file)", ours / size,
                "x file", theirs / size, "PeftModel.from_pretrained")]


def _eight(load_model, peft_dirs, files, repeats: int) -> list[Row]:
    """Eight adapters resident on one model: loading them all, switching among them, one batch of 8 rows each with
    its own adapter."""
    from peft import PeftModel

    import lora_hub

    names = sorted(files)
    ours_model, peft_model = load_model(), load_model()

    def ours_load() -> float:
        holder = {}

        def load_all():
            runtime = holder["r"] = lora_hub.attach(ours_model)
            for name in names:
                runtime.load(name, files[name])

        seconds = timed(load_all)
        holder["r"].detach()
        return seconds

    def peft_load() -> float:
        holder = {}

        def load_all():
            model = holder["m"] = PeftModel.from_pretrained(peft_model, peft_dirs[names[0]], adapter_name=names[0])
            for name in names[1:]:
                model.load_adapter(peft_dirs[name], adapter_name=name)

        seconds = timed(load_all)
        holder["m"].unload()
        return seconds

    load = interleaved_timings([ours_load, peft_load], repeats=repeats)
    runtime = lora_hub.attach(ours_model)
    wrapped = PeftModel.from_pretrained(peft_model, peft_dirs[names[0]], adapter_name=names[0])
    for name in names:
        runtime.load(name, files[name])
        if name != names[0]:
            wrapped.load_adapter(peft_dirs[name], adapter_name=name)
    turn = {"ours": 0, "peft": 0}

    def ours_switch() -> float:
        turn["ours"] += 1
        return timed(lambda: runtime.use(names[turn["ours"] % 8]))

    def peft_switch() -> float:
        turn["peft"] += 1
        return timed(lambda: wrapped.set_adapter(names[turn["peft"] % 8]))

    switch = interleaved_timings([ours_switch, peft_switch], repeats=repeats * 4)
    tokens = torch.randint(0, ours_model.config.vocab_size, (8, 128), generator=torch.Generator().manual_seed(8))

    def ours_mixed() -> float:
        with runtime.route(names):
            return timed(lambda: ours_model(tokens))

    mixed = interleaved_timings([ours_mixed, lambda: timed(lambda: wrapped(tokens, adapter_names=names))],
                                repeats=repeats)
    return [
        Row("runtime", "8 adapters: load all (llama, fp32)", load[0] * 1000, "ms", load[1] * 1000,
            "from_pretrained + load_adapter"),
        Row("runtime", "8 adapters: switch (llama, fp32)", switch[0] * 1000, "ms", switch[1] * 1000, "set_adapter"),
        Row("runtime", "8 adapters: mixed batch 8x128 (llama, fp32)", mixed[0] * 1000, "ms", mixed[1] * 1000,
            "adapter_names="),
    ]
