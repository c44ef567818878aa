"""lora_hub.runtime with PEFT and loralib as oracles: attach, load, switch, stack, route, merge and unmerge on tiny
Llama, GPT-2, BLOOM and OPT models in fp32, bf16, 8-bit and 4-bit."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import loralib
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BitsAndBytesConfig

import lora_hub
from lora_hub.runtime import LoraLayer
from lora_hub.testing import random_peft_adapter, tiny_config, tiny_model

from .factories import QKV, counting_compile, with_loralib_qkv

KINDS = ["llama", "gpt2", "bloom", "opt"]
TOKENS = torch.randint(0, 128, (3, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Two PEFT adapters per architecture: a (r=4, alpha=8) and b (r=8, alpha=4, rslora), different targets."""
    root = tmp_path_factory.mktemp("runtime-adapters")
    out = {}
    for kind in KINDS:
        model = tiny_model(kind)
        conv = {"fan_in_fan_out": kind == "gpt2"}
        out[kind] = {
            "a": random_peft_adapter(model, root / f"{kind}-a", seed=1, r=4, lora_alpha=8, **conv),
            "b": random_peft_adapter(model, root / f"{kind}-b", seed=2, r=8, lora_alpha=4, use_rslora=True, **conv,
                                     target_modules=None if kind != "llama" else ["q_proj", "v_proj", "down_proj"]),
        }
    return out


def _with_both(kind: str, adapters, model=None):
    """A tiny model of `kind` with a runtime holding adapters a and b."""
    model = model if model is not None else tiny_model(kind)
    runtime = lora_hub.attach(model)
    runtime.load("a", adapters[kind]["a"])
    runtime.load("b", adapters[kind]["b"])
    return model, runtime


def _logits(model, tokens=TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def _peft(kind: str, source: Path, base=None) -> torch.Tensor:
    return _logits(PeftModel.from_pretrained(base if base is not None else tiny_model(kind), source).eval())


@pytest.mark.parametrize("kind", KINDS)
def test_each_adapter_gives_peft_logits_and_off_gives_the_base(kind: str, adapters) -> None:
    base = _logits(tiny_model(kind))
    model, runtime = _with_both(kind, adapters)
    for name in ("a", "b"):
        runtime.use(name)
        assert torch.equal(_logits(model), _peft(kind, adapters[kind][name])), name
    runtime.use(None)
    assert torch.equal(_logits(model), base)
    with runtime.using("a"):
        assert torch.equal(_logits(model), _peft(kind, adapters[kind]["a"]))
    assert runtime.active is None


@pytest.mark.parametrize("kind", KINDS)
def test_stacking_adds_the_weighted_deltas(kind: str, adapters) -> None:
    model, runtime = _with_both(kind, adapters)
    runtime.use({"a": 0.7, "b": -0.4})
    stacked = _logits(model)
    a = lora_hub.convert_adapter(adapters[kind]["a"])
    b = lora_hub.convert_adapter(adapters[kind]["b"])
    reference = tiny_model(kind)
    with torch.no_grad():
        for path in set(a.modules) | set(b.modules):
            delta = sum(w * x.delta_weight(path) for w, x in ((0.7, a), (-0.4, b)) if path in x.modules)
            reference.get_submodule(path).weight += delta
    torch.testing.assert_close(stacked, _logits(reference), rtol=1e-5, atol=1e-5)
    runtime.merge()
    torch.testing.assert_close(_logits(model), stacked, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_routed_rows_equal_running_each_row_alone(kind: str, adapters) -> None:
    model, runtime = _with_both(kind, adapters)
    plan = ["b", None, "a"]
    with runtime.route(plan):
        routed = _logits(model)
    assert runtime.active is None
    for row, name in enumerate(plan):
        runtime.use(name)
        torch.testing.assert_close(routed[row], _logits(model)[row], rtol=1e-5, atol=1e-5)
    with runtime.route(["a", "b"]), pytest.raises(ValueError, match="rows but route\\(\\) was given 2"):
        _logits(model)


def test_bf16_matches_peft_exactly_with_float32_paths_and_closely_without(adapters) -> None:
    source = adapters["llama"]["a"]
    expected = _peft("llama", source, tiny_model("llama", dtype=torch.bfloat16))
    for dtype, exact in ((torch.float32, True), (None, False)):
        model = tiny_model("llama", dtype=torch.bfloat16)
        runtime = lora_hub.attach(model, dtype=dtype)
        runtime.load("a", source)
        runtime.use("a")
        got = _logits(model)
        if exact:
            assert torch.equal(got, expected)
        else:
            assert runtime.layers["model.layers.0.self_attn.q_proj"].lora_A.dtype == torch.bfloat16
            torch.testing.assert_close(got.float(), expected.float(), rtol=0, atol=0.05)


def _quantized(base_dir: Path, bits: int):
    config = (BitsAndBytesConfig(load_in_8bit=True) if bits == 8 else
              BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32))
    return AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=config, device_map="cpu").eval()


@pytest.mark.parametrize("kind", ["llama", "opt", "bloom"])
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_bases_match_peft(kind: str, bits: int, adapters, base_dirs) -> None:
    source = adapters[kind]["a"]
    expected = _peft(kind, source, _quantized(base_dirs[kind], bits))
    model = _quantized(base_dirs[kind], bits)
    runtime = lora_hub.attach(model)
    runtime.load("a", source)
    runtime.use("a")
    assert torch.equal(_logits(model), expected)
    assert {layer.kind for layer in runtime.layers.values()} == {"int8" if bits == 8 else "4bit"}


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight tensor and quantization statistic, without state_dict() (which changes bitsandbytes 4-bit
    layers' outputs by itself)."""
    out = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            out[f"{name}.weight"] = weight.data.clone()
            for holder, label in ((getattr(module, "state", None), "state"), (weight, "param")):
                for attribute in ("CB", "SCB"):
                    value = getattr(holder, attribute, None)
                    if isinstance(value, torch.Tensor):
                        out[f"{name}.{label}.{attribute}"] = value.clone()
            quant_state = getattr(weight, "quant_state", None)
            if quant_state is not None:
                out[f"{name}.absmax"] = quant_state.absmax.clone()
    return out


@pytest.mark.parametrize("precision", ["float32", "float16", "bfloat16", "int8", "4bit"])
def test_a_hundred_merge_cycles_restore_the_weights_bit_for_bit(precision: str, adapters, base_dirs) -> None:
    if precision in ("int8", "4bit"):
        model = _quantized(base_dirs["llama"], 8 if precision == "int8" else 4)
    else:
        model = tiny_model("llama", dtype=getattr(torch, precision))
    model, runtime = _with_both("llama", adapters, model)
    runtime.use("a")
    unmerged = _logits(model)
    before = _weights(model)
    for cycle in range(100):
        runtime.merge("a" if cycle % 2 else {"a": 0.5, "b": 0.5})
        runtime.unmerge()
    after = _weights(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(_logits(model), unmerged)
    runtime.merge()
    merged = _logits(model)
    tolerance = {"float32": 1e-5, "float16": 5e-2, "bfloat16": 1e-1, "int8": 1e-1, "4bit": 1.0}[precision]
    torch.testing.assert_close(merged.float(), unmerged.float(), rtol=0, atol=tolerance)
    assert runtime.merged == {"a": 1.0}


def test_enable_lora_forward_and_merge_match_loralib(tmp_path: Path) -> None:
    oracle = with_loralib_qkv("gpt2", seed=5)
    adapter = lora_hub.from_loralib(loralib.lora_state_dict(oracle), alpha=4, enable_lora=[True, False, True],
                                    base=tiny_model("gpt2"))
    model = tiny_model("gpt2")
    runtime = lora_hub.attach(model)
    runtime.load("qkv", adapter)
    runtime.use("qkv")
    torch.testing.assert_close(_logits(model), _logits(oracle), rtol=1e-5, atol=1e-5)
    runtime.merge()
    for layer in range(2):
        qkv = oracle.get_submodule(QKV["gpt2"].format(layer))
        before = qkv.weight.data.clone()
        qkv.merge_weights = True
        qkv.train(False)  # loralib merges on eval
        ours = runtime.layers[QKV["gpt2"].format(layer)].base_layer.weight
        torch.testing.assert_close(ours, qkv.weight.data, rtol=1e-6, atol=1e-6)
        assert not torch.equal(before, qkv.weight.data)


def test_switching_and_replacing_in_place_never_reallocate_or_recompile(adapters, tmp_path: Path) -> None:
    model = tiny_model("llama")
    runtime = lora_hub.attach(model, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"], max_adapters=2, max_rank=8)
    runtime.load("a", adapters["llama"]["a"])
    runtime.load("b", adapters["llama"]["b"])
    modules = {name: module for name, module in model.named_modules()}
    pointers = {n: (x.lora_A.data_ptr(), x.lora_B.data_ptr()) for n, x in runtime.layers.items()}
    compiled, compiles = counting_compile(model)
    outputs = {}
    for name in ("a", "b", "a"):
        runtime.use(name)
        outputs[name] = _logits(compiled)
    assert len(compiles) == 1, f"{len(compiles)} compilations for two resident adapters"
    assert torch.equal(outputs["a"], _peft("llama", adapters["llama"]["a"]))
    runtime.load("a", adapters["llama"]["b"])  # replace from disk, in place, while active
    assert torch.equal(_logits(compiled), outputs["b"]) and len(compiles) == 1
    assert {name: module for name, module in model.named_modules()} == modules
    assert pointers == {n: (x.lora_A.data_ptr(), x.lora_B.data_ptr()) for n, x in runtime.layers.items()}


def test_a_replacement_notices_buffers_replaced_behind_its_back(tmp_path: Path) -> None:
    files = {name: lora_hub.save_adapter(lora_hub.convert_adapter(random_peft_adapter(
        tiny_model("llama"), tmp_path / name, seed=seed, r=4, lora_alpha=8)), tmp_path / f"{name}.safetensors")
        for name, seed in (("one", 1), ("two", 2))}  # one layout: a replacement reads as the last file was read
    expected = lora_hub.attach(tiny_model("llama"))
    expected.load("two", files["two"])
    expected.use("two")
    model = tiny_model("llama")
    runtime = lora_hub.attach(model)
    runtime.load("x", files["one"])
    runtime.use("x")
    layer = runtime.layers["model.layers.1.mlp.down_proj"]
    layer.lora_A, layer.lora_B = layer.lora_A.clone(), layer.lora_B.clone()  # not through model.to: unannounced
    runtime.load("x", files["two"])
    assert torch.equal(_logits(model), _logits(expected.model))
    model.to(torch.float64)  # announced: every buffer replaced by a float64 copy
    runtime.load("x", files["one"])
    runtime.load("x", files["two"])
    assert torch.equal(_logits(model), _logits(expected.model.to(torch.float64)))


def test_a_replacement_is_checked_against_the_model_unless_it_fits_alike(tmp_path: Path) -> None:
    one = lora_hub.convert_adapter(random_peft_adapter(tiny_model("llama"), tmp_path / "one", seed=1, r=4,
                                                       lora_alpha=8))
    declared = one.with_config(base_model=lora_hub.BaseModelRef(model_type="gpt2"))
    files = {"plain": lora_hub.save_adapter(one, tmp_path / "plain.safetensors"),
             "declared": lora_hub.save_adapter(declared, tmp_path / "declared.safetensors")}
    runtime = lora_hub.attach(tiny_model("llama"))
    runtime.load("x", files["plain"])
    with pytest.warns(lora_hub.LoraHubWarning, match="BASE_TYPE_DIFFERS"):  # the same layout, another declaration
        runtime.load("x", files["declared"])
    with pytest.warns(lora_hub.LoraHubWarning, match="BASE_TYPE_DIFFERS"):  # alike: what was found still stands
        runtime.load("x", files["declared"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runtime.load("x", files["plain"])


def test_a_mismatching_adapter_leaves_the_model_unchanged(adapters) -> None:
    model = tiny_model("llama")
    runtime = lora_hub.attach(model)
    before = {name: type(module) for name, module in model.named_modules()}
    with pytest.raises(lora_hub.AdapterMismatchError, match="NO_MODULE_MATCHES") as raised:
        runtime.load("opt", adapters["opt"]["a"])
    assert raised.value.findings[0].code == "NO_MODULE_MATCHES"
    assert {name: type(module) for name, module in model.named_modules()} == before
    assert runtime.adapters == [] and runtime.layers == {}
    wide = lora_hub.attach(tiny_model("llama", hidden_size=128, intermediate_size=256))
    with pytest.raises(lora_hub.AdapterMismatchError, match="FEATURES_MISMATCH"):
        wide.load("a", adapters["llama"]["a"])


def test_state_errors_are_clear(adapters) -> None:
    model = tiny_model("llama")
    runtime = lora_hub.attach(model)
    with pytest.raises(lora_hub.RuntimeStateError, match="no adapter 'x' is loaded"):
        runtime.use("x")
    runtime.load("a", adapters["llama"]["a"])
    with pytest.raises(ValueError, match="finite"):
        runtime.use({"a": float("nan")})
    with pytest.raises(lora_hub.RuntimeStateError, match="nothing to merge"):
        runtime.merge()
    runtime.merge("a")
    with pytest.raises(lora_hub.RuntimeStateError, match="unmerge"):
        runtime.use("a")
    with pytest.raises(lora_hub.RuntimeStateError, match="already has lora-hub layers"):
        lora_hub.attach(model)
    runtime.detach()
    with pytest.raises(lora_hub.RuntimeStateError, match="detached"):
        runtime.use(None)


def test_detach_restores_the_original_modules(adapters) -> None:
    model = tiny_model("gpt2")
    originals = dict(model.named_modules())
    base = _logits(model)
    runtime = lora_hub.attach(model)
    runtime.load("a", adapters["gpt2"]["a"])
    runtime.use("a")
    runtime.merge()
    assert runtime.detach() is model
    assert dict(model.named_modules()) == originals
    assert torch.equal(_logits(model), base)


def test_unload_frees_the_slot_memory(adapters) -> None:
    _, runtime = _with_both("llama", adapters)
    runtime.use({"a": 1.0, "b": 1.0})
    layer = runtime.layers["model.layers.0.self_attn.q_proj"]
    assert layer.lora_A.shape[0] == 2
    runtime.unload("a")
    assert layer.lora_A.shape[0] == 1 and runtime.adapters == ["b"] and runtime.active == {"b": 1.0}
    fixed = lora_hub.attach(tiny_model("llama"), max_adapters=2)
    fixed.load("a", adapters["llama"]["a"])
    fixed.unload("a")
    assert fixed.layers["model.layers.0.self_attn.q_proj"].lora_A.shape[0] == 2
    assert not fixed.layers["model.layers.0.self_attn.q_proj"].lora_A.any()


def test_replaced_heads_switch_route_and_merge(tmp_path: Path) -> None:
    def classifier(seed: int):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return AutoModelForSequenceClassification.from_config(
                tiny_config("gpt2", num_labels=3, pad_token_id=0)).eval()

    source = random_peft_adapter(classifier(0), tmp_path / "peft", task_type="SEQ_CLS", fan_in_fan_out=True)
    assert json.loads((source / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    tokens = TOKENS[:, 1:] % 127 + 1
    expected = _logits(PeftModel.from_pretrained(classifier(7), source).eval(), tokens)
    model = classifier(7)
    base = _logits(model, tokens)
    runtime = lora_hub.attach(model)
    runtime.load("cls", source)
    runtime.use("cls")
    assert torch.equal(_logits(model, tokens), expected)
    with runtime.route(["cls", None, "cls"]):
        routed = _logits(model, tokens)
    torch.testing.assert_close(routed[[0, 2]], expected[[0, 2]], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(routed[1], base[1], rtol=1e-5, atol=1e-6)
    runtime.merge()
    torch.testing.assert_close(_logits(model, tokens), expected, rtol=1e-5, atol=1e-5)
    runtime.save_merged(tmp_path / "merged")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(_logits(reloaded, tokens), expected, rtol=1e-5, atol=1e-5)


def test_save_merged_writes_a_transformers_model_and_keeps_the_state(adapters, tmp_path: Path) -> None:
    model = tiny_model("opt")
    runtime = lora_hub.attach(model)
    runtime.load("a", adapters["opt"]["a"])
    runtime.use("a")
    active = _logits(model)
    runtime.save_merged(tmp_path / "merged")
    assert runtime.merged is None and runtime.active == {"a": 1.0}
    assert torch.equal(_logits(model), active)
    assert all(isinstance(m, LoraLayer) for n, m in model.named_modules() if n.endswith("q_proj"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(_logits(reloaded), active, rtol=1e-5, atol=1e-5)
    assert not any("lora" in key or "base_layer" in key for key in reloaded.state_dict())


def test_a_load_over_max_rank_changes_nothing(adapters) -> None:
    model = tiny_model("llama")
    runtime = lora_hub.attach(model, max_rank=4)
    before = {name: type(module) for name, module in model.named_modules()}
    with pytest.raises(lora_hub.RuntimeStateError, match="over max_rank=4; nothing was changed"):
        runtime.load("b", adapters["llama"]["b"])  # rank 8
    assert {name: type(module) for name, module in model.named_modules()} == before and runtime.adapters == []


def test_unloading_while_another_adapter_is_merged(adapters) -> None:
    model, runtime = _with_both("llama", adapters)
    runtime.use({"a": 1.0, "b": 1.0})
    runtime.merge("a")
    runtime.unload("b")
    assert runtime.adapters == ["a"] and runtime.merged == {"a": 1.0}
    runtime.unmerge()
    assert runtime.active == {"a": 1.0}
    assert torch.equal(_logits(model), _peft("llama", adapters["llama"]["a"]))


def test_lora_hub_files_are_read_in_place_and_a_file_cut_short_leaves_no_half_adapter(adapters, tmp_path) -> None:
    model, runtime = _with_both("llama", adapters)
    path = lora_hub.save_adapter(lora_hub.convert_adapter(adapters["llama"]["a"]), tmp_path / "a.safetensors")
    runtime.load("a", path)  # replaced in place from the file: the factors are read straight into the slot
    runtime.use("a")
    torch.testing.assert_close(_logits(model), _peft("llama", adapters["llama"]["a"]), rtol=0, atol=0)
    opened = lora_hub.load_adapter(path)  # header read and checked; then the file loses its tail
    os.truncate(path, path.stat().st_size - 64)
    with pytest.raises(lora_hub.FileTruncatedError, match="changed after its header was read"):
        runtime.load("a", opened)
    assert runtime.adapters == ["b"] and runtime.active is None
    torch.testing.assert_close(_logits(model), _logits(tiny_model("llama")), rtol=0, atol=0)
    runtime.use("b")
    torch.testing.assert_close(_logits(model), _peft("llama", adapters["llama"]["b"]), rtol=0, atol=0)


def test_a_file_of_the_same_layout_is_read_as_the_last_one_was_and_stays_right_when_buffers_move(
        adapters, tmp_path: Path, monkeypatch) -> None:
    from lora_hub.tensors import FileTensors

    model = tiny_model("llama")
    base = _logits(model)
    again = random_peft_adapter(model, tmp_path / "again", seed=9, r=4, lora_alpha=8)  # a's layout, other values
    files = {name: lora_hub.save_adapter(lora_hub.convert_adapter(source), tmp_path / f"{name}.safetensors")
             for name, source in (("a", adapters["llama"]["a"]), ("again", again), ("b", adapters["llama"]["b"]))}
    expected = {"a": _peft("llama", adapters["llama"]["a"]), "again": _peft("llama", again),
                "b": _peft("llama", adapters["llama"]["b"])}
    plans = []
    original_plan = FileTensors.plan
    monkeypatch.setattr(FileTensors, "plan", lambda self, *args: plans.append(1) or original_plan(self, *args))
    runtime = lora_hub.attach(model)
    runtime.load("x", files["a"])
    runtime.use("x")
    for name in ("again", "a", "again"):  # replacements of one layout: the reads are worked out once
        runtime.load("x", files[name])
        assert torch.equal(_logits(model), expected[name]), name
    assert len(plans) == 1
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(files["again"].read_bytes())
    opened = lora_hub.load_adapter(cut)
    os.truncate(cut, cut.stat().st_size - 64)
    with pytest.raises(lora_hub.FileTruncatedError):
        runtime.load("x", opened)  # by the kept reads, and cut short: no half adapter is left
    assert len(plans) == 1 and runtime.adapters == [] and torch.equal(_logits(model), base)
    runtime.load("x", files["a"])
    runtime.load("y", files["b"])  # a second slot, and larger ranks on shared layers: every buffer is reallocated
    runtime.load("x", files["again"])
    runtime.use("x")
    assert torch.equal(_logits(model), expected["again"])
    runtime.unload("y")  # compaction moves the buffers again
    runtime.load("x", files["a"])
    runtime.load("x", files["again"])
    assert torch.equal(_logits(model), expected["again"])
    runtime.load("y", files["b"])
    for name, adapter in (("y", "b"), ("x", "again")):
        runtime.use(name)
        assert torch.equal(_logits(model), expected[adapter]), name
    model = tiny_model("llama")
    runtime = lora_hub.attach(model)
    runtime.load("x", files["a"])
    runtime.use("x")
    planned = len(plans)
    model.double()  # every buffer replaced behind the runtime's back: the kept reads must not be used
    runtime.load("x", files["again"])
    assert len(plans) == planned + 1
    torch.testing.assert_close(_logits(model).float(), expected["again"], rtol=1e-4, atol=1e-4)


def test_a_first_load_cut_short_while_the_layers_are_wrapped_leaves_the_base_model(adapters, tmp_path) -> None:
    model = tiny_model("llama")
    base = _logits(model)
    path = lora_hub.save_adapter(lora_hub.convert_adapter(adapters["llama"]["a"]), tmp_path / "a.safetensors")
    opened = lora_hub.load_adapter(path)
    os.truncate(path, path.stat().st_size - 64)
    runtime = lora_hub.attach(model)
    with pytest.raises(lora_hub.FileTruncatedError):
        runtime.load("a", opened)  # read in the background while the layers are wrapped; the error still surfaces
    assert runtime.adapters == [] and torch.equal(_logits(model), base)
    runtime.load("a", adapters["llama"]["a"])
    runtime.use("a")
    assert torch.equal(_logits(model), _peft("llama", adapters["llama"]["a"]))


def test_a_model_moved_or_converted_after_attach_keeps_working_and_frees_the_old_buffers(adapters, tmp_path) -> None:
    import copy
    import gc
    import weakref

    model = tiny_model("llama")
    path = lora_hub.save_adapter(lora_hub.convert_adapter(adapters["llama"]["a"]), tmp_path / "a.safetensors")
    runtime = lora_hub.attach(model)
    runtime.load("a", path)
    runtime.load("a", path)  # a replacement: the runtime keeps how the slot was read
    runtime.use("a")
    old = weakref.ref(next(iter(runtime.layers.values())).lora_A)
    model.double()
    gc.collect()
    assert old() is None  # nothing the runtime kept holds the float32 buffers
    expected = _peft("llama", adapters["llama"]["a"])
    torch.testing.assert_close(_logits(model).float(), expected, rtol=1e-4, atol=1e-4)
    copied = copy.deepcopy(model)  # a copy belongs to no runtime, and runs as the original
    assert torch.equal(_logits(copied), _logits(model))
    runtime.load("a", path)
    torch.testing.assert_close(_logits(model).float(), expected, rtol=1e-4, atol=1e-4)
    model.to("meta")  # another device: the selection follows the layers there
    assert model(TOKENS.to("meta")).logits.device.type == "meta"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("plan", [
    ["a", "a", "b", "b"],            # contiguous groups, consecutive slots: views, the update added in the matmul
    ["b", "b", "a", "a"],            # contiguous, slots out of order: one gather per group
    ["a", "b", "a", "b"],            # apart: rows gathered by group
    ["a", None, "b", "a", "a"],      # apart, uneven groups (padded), a row with no adapter
    ["b", "b", "b", "b"],            # one group
])
def test_grouped_mixed_batches_equal_each_row_alone(kind: str, plan: list, adapters) -> None:
    model, runtime = _with_both(kind, adapters)
    batch = torch.tensor([[1, 5, 9, 2, 7]] * len(plan)) + torch.arange(len(plan))[:, None]
    with torch.no_grad():
        with runtime.route(plan):
            assert runtime.selection.grouped(next(iter(runtime.layers.values())).lora_A.device) is not None
            routed = model(batch).logits
        for row, name in enumerate(plan):
            runtime.use(name)
            torch.testing.assert_close(routed[row], model(batch[row:row + 1]).logits[0], rtol=1e-5, atol=1e-5)
