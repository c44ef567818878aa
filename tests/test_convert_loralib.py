"""loralib is the oracle for enable_lora: loralib state dicts and early-PEFT MergedLinear checkpoints convert to
adapters whose deltas equal loralib's merge, and whose PEFT export gives the logits of loralib's own layers."""

from __future__ import annotations

import json
from pathlib import Path

import loralib
import pytest
import torch
from peft import PeftModel

import lora_hub
from lora_hub.testing import tiny_model

from .factories import QKV
from .factories import with_loralib_qkv as _with_loralib_qkv


def _logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


TOKENS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))


def test_loralib_merged_linear_state_dict_converts_exactly(base_dirs, tmp_path: Path) -> None:
    oracle = _with_loralib_qkv("gpt2", seed=1)
    state = loralib.lora_state_dict(oracle)
    adapter = lora_hub.from_loralib(state, alpha=4, enable_lora=[True, False, True], base=base_dirs["gpt2"])
    spec = adapter.modules["transformer.h.0.attn.c_attn"]
    assert (spec.r, spec.enable_lora, spec.fan_in_fan_out, spec.out_features) == (2, (True, False, True), True, 192)
    for layer in range(2):
        qkv = oracle.get_submodule(QKV["gpt2"].format(layer))
        torch.testing.assert_close(adapter.delta_weight(QKV["gpt2"].format(layer)), qkv.merge_AB() * qkv.scaling)
    exported = lora_hub.to_peft(lora_hub.load_adapter(lora_hub.save_adapter(adapter, tmp_path / "a.safetensors")),
                                tmp_path / "peft")
    peft_config = json.loads((exported / "adapter_config.json").read_text())
    assert (peft_config["r"], peft_config["lora_alpha"]) == (4, 8)  # rank r*k, alpha*k: same scaling
    peft_logits = _logits(PeftModel.from_pretrained(tiny_model("gpt2"), exported).eval(), TOKENS)
    torch.testing.assert_close(peft_logits, _logits(oracle, TOKENS), rtol=1e-5, atol=1e-5)


def test_early_peft_merged_linear_checkpoint_converts_exactly(base_dirs, tmp_path: Path) -> None:
    """The layout of PEFT 0.2: lora_B saved as a Conv1d weight (n*k, r, 1), enable_lora in the config, and
    fan_in_fan_out=true on BLOOM's nn.Linear, which PEFT 0.2 itself overrode to false."""
    oracle = _with_loralib_qkv("bloom", seed=2)
    source = tmp_path / "early-peft"
    source.mkdir()
    state = {}
    for layer in range(2):
        qkv = oracle.get_submodule(QKV["bloom"].format(layer))
        prefix = f"base_model.model.{QKV['bloom'].format(layer)}"
        state[f"{prefix}.lora_A.weight"] = qkv.lora_A.data.clone()
        state[f"{prefix}.lora_B.weight"] = qkv.lora_B.data.clone().unsqueeze(-1)
    torch.save(state, source / "adapter_model.bin")
    (source / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "bigscience/bloom-560m", "r": 2,
        "lora_alpha": 4, "enable_lora": [True, False, True], "fan_in_fan_out": True, "merge_weights": False,
        "target_modules": ["query_key_value"], "bias": "none", "lora_dropout": 0.05}))
    assert lora_hub.detect_layout(source).layout is lora_hub.Layout.PEFT_MERGED_LINEAR
    with pytest.warns(lora_hub.LoraHubWarning, match="fan_in_fan_out corrected"):
        adapter = lora_hub.convert_adapter(source, allow_pickle=True, base=base_dirs["bloom"])
    assert not any(spec.fan_in_fan_out for spec in adapter.modules.values())
    assert adapter.config.base_model.name == "bigscience/bloom-560m"
    exported = lora_hub.to_peft(adapter, tmp_path / "peft")
    peft_logits = _logits(PeftModel.from_pretrained(tiny_model("bloom"), exported).eval(), TOKENS)
    torch.testing.assert_close(peft_logits, _logits(oracle, TOKENS), rtol=1e-5, atol=1e-5)


def test_plain_loralib_linear_and_replacement_tensors(tmp_path: Path) -> None:
    torch.manual_seed(0)
    layer = loralib.Linear(8, 6, r=2, lora_alpha=3, merge_weights=False)
    torch.nn.init.normal_(layer.lora_B)
    model = torch.nn.Module()
    model.encoder = torch.nn.Module()
    model.encoder.query = layer
    model.classifier = torch.nn.Linear(6, 2)
    state = {**loralib.lora_state_dict(model), "classifier.weight": model.classifier.weight.data,
             "classifier.bias": model.classifier.bias.data}
    path = tmp_path / "lora.safetensors"
    from safetensors.torch import save_file

    save_file(state, path)
    assert lora_hub.detect_layout(path).layout is lora_hub.Layout.LORALIB
    adapter = lora_hub.convert_adapter(path, alpha=3)
    assert adapter.config.modules_to_save == ("classifier",)
    before = layer.weight.data.clone()
    layer.merge_weights = True
    layer.train(False)
    torch.testing.assert_close(adapter.delta_weight("encoder.query"), layer.weight.data - before)


def test_what_loralib_does_not_record_must_be_given() -> None:
    layer = loralib.MergedLinear(8, 12, r=2, lora_alpha=2, enable_lora=[True, False, True])
    state = {f"qkv.{k}": v for k, v in layer.state_dict().items() if "lora_" in k}
    with pytest.raises(lora_hub.ParameterRequiredError, match="alpha"):
        lora_hub.from_loralib(state, alpha=None)
    with pytest.raises(lora_hub.ParameterRequiredError, match="pass enable_lora"):
        lora_hub.from_loralib(state, alpha=2)
    with pytest.raises(lora_hub.RankMismatchError, match="enables 3 slices"):
        lora_hub.from_loralib(state, alpha=2, enable_lora=[True, True, True])
    with pytest.raises(lora_hub.RankMismatchError, match="r=3 was given"):
        lora_hub.from_loralib(state, alpha=2, r=3, enable_lora=[True, False, True])
    spec = lora_hub.from_loralib(state, alpha=2, enable_lora={"qkv": [True, False, True]}).modules["qkv"]
    assert (spec.r, spec.out_features) == (2, 12)
    every_slice = loralib.MergedLinear(8, 12, r=2, lora_alpha=2, enable_lora=[True, True])
    state = {f"qkv.{k}": v for k, v in every_slice.state_dict().items() if "lora_" in k}
    with pytest.raises(lora_hub.ParameterRequiredError):
        lora_hub.from_loralib(state, alpha=2)  # k=2 groups of 6 rows: [T, T], or two of three slices?


def test_every_slice_enabled_is_inferred_from_the_base() -> None:
    layer = loralib.MergedLinear(64, 192, r=2, lora_alpha=2, enable_lora=[True, True, True])
    factors = {k: v for k, v in layer.state_dict().items() if "lora_" in k}
    state = {f"{QKV['bloom'].format(i)}.{k}": v for i in range(2) for k, v in factors.items()}
    adapter = lora_hub.from_loralib(state, alpha=2, base=tiny_model("bloom"))
    assert adapter.modules[QKV["bloom"].format(0)].enable_lora == (True, True, True)
