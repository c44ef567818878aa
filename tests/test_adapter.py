"""lora_hub.adapter: the config model and its validation, and delta_weight against loralib and PEFT."""

from __future__ import annotations

import math

import loralib
import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora import Linear as PeftLinear

import lora_hub
from lora_hub import AdapterConfig, ModuleSpec, delta_weight


def _merged_linear(enable_lora: list[bool], fan_in_fan_out: bool, seed: int) -> loralib.MergedLinear:
    torch.manual_seed(seed)
    layer = loralib.MergedLinear(12, 18, r=3, lora_alpha=6, enable_lora=enable_lora, fan_in_fan_out=fan_in_fan_out,
                                 merge_weights=False)
    torch.nn.init.normal_(layer.lora_A)
    torch.nn.init.normal_(layer.lora_B)
    layer.eval()  # loralib's train() returns None
    return layer


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("enable_lora", [[True, False, True], [False, True, False], [True, True, True]])
def test_enable_lora_delta_equals_loralib_merged_linear(enable_lora, fan_in_fan_out) -> None:
    layer = _merged_linear(enable_lora, fan_in_fan_out, seed=len(enable_lora) + sum(enable_lora))
    spec = ModuleSpec(r=3, alpha=6, in_features=12, out_features=18, fan_in_fan_out=fan_in_fan_out,
                      enable_lora=tuple(enable_lora))
    ours = delta_weight(spec, layer.lora_A.data, layer.lora_B.data)
    before = layer.weight.data.clone()
    layer.merge_weights = True
    layer.train(False)  # loralib merges on eval
    loralib_delta = layer.weight.data - before
    expected_shape = (12, 18) if fan_in_fan_out else (18, 12)
    assert ours.shape == expected_shape == loralib_delta.shape
    torch.testing.assert_close(ours, loralib_delta, rtol=1e-5, atol=1e-5)
    merge_ab = layer.merge_AB() * layer.scaling  # loralib's own delta, already in the weight's orientation
    torch.testing.assert_close(ours, merge_ab, rtol=1e-6, atol=1e-6)


def test_enable_lora_forward_matches_the_delta() -> None:
    layer = _merged_linear([True, False, True], False, seed=7)
    spec = ModuleSpec(r=3, alpha=6, in_features=12, out_features=18, enable_lora=(True, False, True))
    x = torch.randn(5, 12)
    expected = layer(x)
    ours = torch.nn.functional.linear(x, layer.weight + delta_weight(spec, layer.lora_A.data, layer.lora_B.data),
                                      layer.bias)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_plain_delta_is_bit_identical_to_peft(use_rslora, fan_in_fan_out) -> None:
    torch.manual_seed(3)
    base = torch.nn.Linear(10, 6)
    config = LoraConfig(r=4, lora_alpha=7, use_rslora=use_rslora, init_lora_weights=False,
                        fan_in_fan_out=fan_in_fan_out)
    layer = PeftLinear(base, "default", config, r=4, lora_alpha=7)
    spec = ModuleSpec(r=4, alpha=7, in_features=10, out_features=6, rslora=use_rslora, fan_in_fan_out=fan_in_fan_out)
    ours = delta_weight(spec, layer.lora_A["default"].weight.data, layer.lora_B["default"].weight.data)
    assert torch.equal(ours, layer.get_delta_weight("default").detach())
    assert spec.scaling == (7 / math.sqrt(4) if use_rslora else 7 / 4)


def test_delta_is_computed_in_float32_and_returned_in_the_adapter_dtype() -> None:
    spec = ModuleSpec(r=2, alpha=2, in_features=3, out_features=3)
    a = torch.tensor([[1.0, 1 / 3, 2.0], [0.5, 1.0, -1.0]]).to(torch.bfloat16)
    b = torch.tensor([[1 / 3, 1.0], [2.0, 0.25], [-1.0, 1.0]]).to(torch.bfloat16)
    ours = delta_weight(spec, a, b)
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours, (b.float() @ a.float()).to(torch.bfloat16))
    assert delta_weight(spec, a, b, dtype=torch.float64).dtype == torch.float64


def test_config_round_trips_through_canonical_json() -> None:
    config = AdapterConfig(
        modules={"b.q": ModuleSpec(r=2, alpha=32.0, in_features=4, out_features=6, enable_lora=(True, False, True)),
                 "a.v": ModuleSpec(r=1, alpha=0.5, in_features=4, out_features=4, rslora=True)},
        modules_to_save=("head", "head"), tags=("x",), license="mit")
    text = config.to_json()
    assert text.index('"a.v"') < text.index('"b.q"')
    assert '"alpha":32,' in text  # integral alpha written as an integer
    assert AdapterConfig.from_json(text) == config
    assert config.modules_to_save == ("head",)


@pytest.mark.parametrize("text, fragment", [
    ("[]", "must be a JSON object"),
    ('{"modules": []}', "'modules'"),
    ('{"modules": {}}', "no modules"),
    ('{"modules": {"m": {"r": 2, "alpha": 1, "in_features": 3}}}', "out_features"),
    ('{"modules": {"m": {"r": 2.5, "alpha": 1, "in_features": 3, "out_features": 3}}}', "r must be"),
    ('{"modules": {"m": {"r": 2, "alpha": true, "in_features": 3, "out_features": 3}}}', "alpha must be"),
    ('{"modules": {"m": {"r": 2, "alpha": 1, "in_features": 3, "out_features": 3, "enable_lora": [false]}}}',
     "at least one"),
    ('{"modules": {"m.lora_A": {"r": 2, "alpha": 1, "in_features": 3, "out_features": 3}}}', "reserved"),
    ('{"modules": {"m": {"r": 2, "alpha": 1, "in_features": 3, "out_features": 3}}, "modules_to_save": ["m"]}',
     "overlaps"),
    ('{"modules": {"m": {"r": 2, "alpha": 1, "in_features": 3, "out_features": 3}}, "tensors_sha256": "x"}',
     "64 lowercase hex"),
    ('{"modules": {"m": {"r": 2, "alpha": 1, "in_features": 3, "out_features": 3}}, "base_model": {"name": 3}}',
     "base_model"),
])
def test_config_errors_say_what_is_wrong(text: str, fragment: str) -> None:
    with pytest.raises(lora_hub.ConfigError, match=fragment):
        AdapterConfig.from_json(text)


def test_adapter_checks_its_tensors_and_names_modules() -> None:
    spec = ModuleSpec(r=2, alpha=2, in_features=3, out_features=4)
    config = AdapterConfig(modules={"m": spec})
    good = {"base_model.model.m.lora_A.weight": torch.zeros(2, 3),
            "base_model.model.m.lora_B.weight": torch.zeros(4, 2)}
    adapter = lora_hub.Adapter(config, good)
    assert adapter.lora_A("m").shape == (2, 3)
    with pytest.raises(KeyError, match="no module 'x'"):
        adapter.delta_weight("x")
    with pytest.raises(lora_hub.MissingTensorError, match="only base_model.model.m.lora_A.weight"):
        lora_hub.Adapter(config, {"base_model.model.m.lora_A.weight": torch.zeros(2, 3)})
    with pytest.raises(lora_hub.ShapeMismatchError, match=r"requires lora_A \[2, 3\]"):
        lora_hub.Adapter(config, {**good, "base_model.model.m.lora_A.weight": torch.zeros(2, 5)})
    with pytest.raises(lora_hub.UnexpectedTensorError, match="extra.weight"):
        lora_hub.Adapter(config, {**good, "base_model.model.extra.weight": torch.zeros(1)})
    with pytest.raises(lora_hub.TensorDtypeError, match="I64"):
        lora_hub.Adapter(config, {**good, "base_model.model.m.lora_B.weight": torch.zeros(4, 2, dtype=torch.int64)})


def test_identical_module_entries_share_a_spec_but_json_types_still_count() -> None:
    """from_json reads each distinct entry once (a 512-module header is mostly a few shapes); entries that Python
    compares equal but JSON does not (true and 1) are still read, and refused, on their own."""
    import json

    from lora_hub import AdapterConfig, ConfigError

    entry = {"r": 4, "alpha": 8, "rslora": False, "in_features": 16, "out_features": 16, "fan_in_fan_out": False,
             "enable_lora": None}
    config = AdapterConfig.from_json(json.dumps({"modules": {"m.a": entry, "m.b": dict(entry)}}))
    assert config.modules["m.a"] is config.modules["m.b"]
    with pytest.raises(ConfigError, match="module 'm.b': rslora must be true or false, got 0"):
        AdapterConfig.from_json(json.dumps({"modules": {"m.a": entry, "m.b": {**entry, "rslora": 0}}}))
    with pytest.raises(ConfigError, match="module 'm.b': r must be a positive integer, got 4.0"):
        AdapterConfig.from_json(json.dumps({"modules": {"m.a": entry, "m.b": {**entry, "r": 4.0}}}))


def test_delta_shapes_are_each_modules_own() -> None:
    shared = ModuleSpec(r=2, alpha=4, in_features=16, out_features=48, fan_in_fan_out=True)
    modules = {"h.0.attn.c_attn": shared, "h.1.attn.c_attn": shared,
               "h.0.mlp.fc": ModuleSpec(r=2, alpha=4, in_features=16, out_features=64),
               "wte": ModuleSpec(r=2, alpha=4, in_features=100, out_features=16, kind="embedding"),
               "experts.w": ModuleSpec(r=2, alpha=4, in_features=16, out_features=8, kind="experts", experts=3)}
    config = AdapterConfig(modules=modules)
    assert config.delta_shapes() == {m: s.delta_shape for m, s in config.modules.items()}
    assert config.delta_shapes()["h.1.attn.c_attn"] == (16, 48) and config.delta_shapes()["experts.w"] == (3, 8, 16)
