"""Every LoRA feature PEFT writes, with PeftModel as the oracle: adapters made by PEFT itself (random, non-zero
factors, moved away from their initial values as training would) for tiny models built from configs go PEFT ->
lora-hub -> PEFT bit for bit, and on the run time give PeftModel's logits unmerged, merged and routed, with the base
weights restored bit for bit on unmerge. 8-bit bases where the layer kind allows."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import lora_hub
from lora_hub.testing import LORA_TARGETS, tiny_model
from tests.peft_cases import BUILDERS, peft_adapter

TOKENS = torch.randint(0, 120, (3, 6), generator=torch.Generator().manual_seed(1))


CASES = {  # name: (the base lora-hub runs on, the base PEFT trains and runs on, LoraConfig settings)
    "embedding": ("llama", "llama", dict(target_modules=["embed_tokens", "q_proj", "v_proj"])),
    "lm_head": ("llama", "llama", dict(target_modules=["lm_head", "q_proj"])),
    "lm_head_tied": ("tied", "tied", dict(target_modules=["lm_head", "embed_tokens", "q_proj"])),
    "resized_vocabulary": ("llama", "resized", dict(target_modules=["embed_tokens", "lm_head", "q_proj"])),
    "lora_bias": ("llama", "llama", dict(target_modules=["q_proj", "v_proj", "down_proj"], lora_bias=True)),
    "dora": ("llama", "llama", dict(target_modules=LORA_TARGETS["llama"], use_dora=True)),
    "dora_conv1d": ("gpt2", "gpt2", dict(target_modules=LORA_TARGETS["gpt2"], use_dora=True, fan_in_fan_out=True)),
    "trainable_tokens": ("llama", "llama", dict(target_modules=["q_proj"], trainable_token_indices=[1, 5, 7])),
    "trainable_tokens_tied": ("tied", "tied", dict(target_modules=["q_proj"], trainable_token_indices=[1, 5, 7])),
    "experts_mixtral": ("mixtral", "mixtral", dict(target_modules=["q_proj"], target_parameters=[
        "mlp.experts.gate_up_proj", "mlp.experts.down_proj"])),
    "experts_qwen3_moe": ("qwen3_moe", "qwen3_moe", dict(target_modules=["q_proj"], target_parameters=[
        "mlp.experts.gate_up_proj", "mlp.experts.down_proj"])),
    "layer_and_rank_patterns": ("llama", "llama", dict(
        target_modules=LORA_TARGETS["llama"], layers_to_transform=[1], layers_pattern="layers",
        rank_pattern={r"layers\.1\.self_attn\.(q|k)_proj": 8}, alpha_pattern={"down_proj": 3}, use_rslora=True)),
}
FEATURES = {"embedding": ("base_weights", "embedding"), "lm_head": ("base_weights",),
            "lm_head_tied": ("base_weights", "embedding"), "resized_vocabulary": ("base_weights", "embedding"),
            "lora_bias": ("lora_bias",), "dora": ("dora",), "dora_conv1d": ("dora",),
            "trainable_tokens": ("trainable_tokens",), "trainable_tokens_tied": ("trainable_tokens",),
            "experts_mixtral": ("experts",), "experts_qwen3_moe": ("experts",), "layer_and_rank_patterns": ()}


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Per case: the PEFT adapter folder and the base model folder PEFT trained on."""
    root = tmp_path_factory.mktemp("features")
    out = {}
    for name, (_, peft_base, settings) in CASES.items():
        base = root / f"base-{name}"
        BUILDERS[peft_base]().save_pretrained(base)
        out[name] = peft_adapter(root / name, BUILDERS[peft_base](), **settings), base
    return out


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


@pytest.mark.parametrize("name", list(CASES))
def test_peft_round_trip_is_bit_exact(name: str, made, tmp_path: Path) -> None:
    source, base = made[name]
    adapter = lora_hub.convert_adapter(source, base=base)
    assert adapter.config.features == FEATURES[name]
    saved = lora_hub.save_adapter(adapter, tmp_path / "adapter.safetensors")
    assert lora_hub.validate(saved, base=base, profile="lora-hub").ok
    assert lora_hub.validate(saved, base=base, profile="peft").ok  # and PeftModel loads the export, below
    exported = lora_hub.to_peft(lora_hub.load_adapter(saved), tmp_path / "exported", base=base)
    before, after = load_file(source / "adapter_model.safetensors"), load_file(exported / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    peft_base = CASES[name][1]
    expected = _logits(PeftModel.from_pretrained(BUILDERS[peft_base](), source).eval())
    assert torch.equal(_logits(PeftModel.from_pretrained(BUILDERS[peft_base](), exported).eval()), expected)


@pytest.mark.parametrize("name", list(CASES))
def test_the_run_time_gives_peft_logits_unmerged_merged_and_routed(name: str, made, tmp_path: Path) -> None:
    source, base = made[name]
    ours_base, peft_base, _ = CASES[name]
    expected = _logits(PeftModel.from_pretrained(BUILDERS[peft_base](), source).eval())
    model = BUILDERS[ours_base]()
    plain = _logits(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    file = lora_hub.save_adapter(lora_hub.convert_adapter(source, base=base), tmp_path / "a.safetensors")
    runtime = lora_hub.attach(model)
    runtime.load("x", file)
    runtime.use("x")
    if expected.shape == plain.shape:  # the adapter changes the output (a resized vocabulary, its shape too)
        assert not torch.allclose(expected, plain)
    torch.testing.assert_close(_logits(model), expected, rtol=0, atol=1e-5)
    runtime.merge("x")
    torch.testing.assert_close(_logits(model), expected, rtol=0, atol=2e-5)
    runtime.unmerge()
    torch.testing.assert_close(_logits(model), expected, rtol=0, atol=1e-5)
    if name != "resized_vocabulary":  # its rows have another width than the base model's
        with runtime.route(["x", None, "x"]):
            routed = _logits(model)
        torch.testing.assert_close(routed[[0, 2]], expected[[0, 2]], rtol=0, atol=1e-5)
        torch.testing.assert_close(routed[1], plain[1], rtol=0, atol=1e-5)
    runtime.use(None)
    assert torch.equal(_logits(model), plain)
    runtime.detach()
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_resized_vocabulary_cannot_be_routed_with_the_base(made, tmp_path: Path) -> None:
    source, base = made["resized_vocabulary"]
    model = BUILDERS["llama"]()
    runtime = lora_hub.attach(model)
    runtime.load("x", lora_hub.convert_adapter(source, base=base))
    with runtime.route(["x", None, "x"]), pytest.raises(ValueError, match="resized vocabulary"):
        _logits(model)
    with pytest.raises(lora_hub.RuntimeStateError, match="different vocabularies"):
        runtime.load("y", made["embedding"][0])


@pytest.mark.parametrize(("before", "after"), [("trainable_tokens", "embedding"), ("dora", "lora_bias"),
                                               ("lora_bias", "dora"), ("embedding", "trainable_tokens"),
                                               ("lm_head", "lora_bias")])
def test_replacing_an_adapter_in_place_leaves_nothing_of_the_old_one(before: str, after: str, made) -> None:
    fresh = lora_hub.attach(BUILDERS["llama"]())
    fresh.load("x", made[after][0])
    fresh.use("x")
    replaced = lora_hub.attach(BUILDERS["llama"]())
    replaced.load("x", made[before][0])
    replaced.use("x")
    replaced.load("x", made[after][0])  # the same slot, rewritten
    tokens = torch.tensor([[1, 5, 7, 9, 2]])  # among them the trainable tokens
    with torch.no_grad():
        assert torch.equal(replaced.model(tokens).logits, fresh.model(tokens).logits)


def test_dora_applies_alone_and_with_weight_one(made) -> None:
    runtime = lora_hub.attach(BUILDERS["llama"]())
    runtime.load("dora", made["dora"][0])
    runtime.load("plain", made["lora_bias"][0])
    for choice in ({"dora": 0.5}, {"dora": 1.0, "plain": 1.0}):
        with pytest.raises(ValueError, match="DoRA adapter"):
            runtime.use(choice)
        with pytest.raises(ValueError, match="DoRA adapter"):
            runtime.merge(choice)
    runtime.use({"plain": 0.5})
    with runtime.route(["dora", "plain", None]):
        _logits(runtime.model)


def _eight_bit(folder: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                                                device_map="cpu").eval()


@pytest.mark.parametrize("name", ["dora", "lora_bias", "embedding", "trainable_tokens"])
def test_eight_bit_bases_match_peft(name: str, made, tmp_path: Path) -> None:
    source, base = made[name]
    expected = _logits(PeftModel.from_pretrained(_eight_bit(base), source).eval())
    model = _eight_bit(base)
    codes = {n: b.clone() for n, b in model.state_dict().items() if b.dtype == torch.int8}
    runtime = lora_hub.attach(model)
    runtime.load("x", lora_hub.save_adapter(lora_hub.convert_adapter(source, base=base), tmp_path / "a.safetensors"))
    runtime.use("x")
    torch.testing.assert_close(_logits(model), expected, rtol=0, atol=1e-4)
    runtime.merge("x")
    runtime.unmerge()
    assert all(torch.equal(b, codes[n]) for n, b in model.state_dict().items() if n in codes)
    torch.testing.assert_close(_logits(model), expected, rtol=0, atol=1e-4)


def _trained_from(init: str, folder: Path, model: torch.nn.Module, **settings) -> tuple[Path, Path]:
    """A PEFT adapter initialised with `init` (which changes the base weight inside PEFT): its initial state saved as
    PEFT recommends, then its factors moved as training would, then saved."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, init_lora_weights=init,
                                                                     target_modules=LORA_TARGETS["llama"], **settings))
        peft_model.save_pretrained(folder / "initial")
        with torch.no_grad():
            for name, parameter in peft_model.named_parameters():
                if "lora_" in name:
                    parameter.add_(torch.randn_like(parameter) * 0.05)
    peft_model.save_pretrained(folder / "trained")
    return folder / "trained", folder / "initial"


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_base_modifying_inits_convert_to_the_equivalent_plain_adapter(init: str, tmp_path: Path, base_dirs) -> None:
    trained, initial = _trained_from(init, tmp_path, tiny_model("llama"))
    expected = _logits(PeftModel.from_pretrained(tiny_model("llama"), trained).eval())  # PEFT recomputes W_res
    plain = lora_hub.attach(tiny_model("llama"))  # read as plain LoRA, it would be far off (as the issue found)
    with pytest.raises(lora_hub.UnsupportedFeatureError):
        plain.load("naive", trained, reference_base=None)
    report = lora_hub.validate(trained)
    assert not report.ok and report.codes[:1] == ["FEATURE_INIT_NEEDS_BASE"], report.findings
    for options in ({"base": base_dirs["llama"]}, {"initial": initial}):
        adapter = lora_hub.convert_adapter(trained, **options)
        assert {s.r for s in adapter.modules.values()} == {8}  # rank 2r: [A; A0], [B, -B0]
        model = tiny_model("llama")
        runtime = lora_hub.attach(model)
        runtime.load("x", adapter)
        runtime.use("x")
        torch.testing.assert_close(_logits(model), expected, rtol=0, atol=1e-5)
        exported = lora_hub.to_peft(adapter, tmp_path / f"plain-{len(options)}-{next(iter(options))}")
        torch.testing.assert_close(_logits(PeftModel.from_pretrained(tiny_model("llama"), exported).eval()), expected,
                                   rtol=0, atol=1e-5)
    model = tiny_model("llama")  # the run time computes the initial factors from the live model itself
    runtime = lora_hub.attach(model)
    runtime.load("x", trained)
    runtime.use("x")
    torch.testing.assert_close(_logits(model), expected, rtol=0, atol=1e-5)
    assert lora_hub.validate(trained, base=base_dirs["llama"]).ok


@pytest.mark.parametrize("init", ["pissa_niter_2", "corda", "loftq"])
def test_inits_that_cannot_be_recomputed_need_the_initial_adapter(init: str, tmp_path: Path, base_dirs) -> None:
    folder = tmp_path / "adapter"
    peft_adapter(folder, tiny_model("llama"), target_modules=["q_proj"])
    import json

    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(config | {"init_lora_weights": init}))
    with pytest.raises(lora_hub.UnsupportedFeatureError) as caught:
        lora_hub.convert_adapter(folder, base=base_dirs["llama"])
    assert caught.value.code == "FEATURE_INIT_NEEDS_INITIAL" and "initial adapter" in str(caught.value)
    report = lora_hub.validate(folder, base=base_dirs["llama"])
    assert not report.ok and report.codes[:1] == ["FEATURE_INIT_NEEDS_INITIAL"]
