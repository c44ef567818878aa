"""PEFT is the oracle: adapters made by PEFT go PEFT -> lora-hub -> PEFT and give the same tensors, deltas and
logits, for tiny Llama, GPT-2 (Conv1D), BLOOM (fused query_key_value) and OPT models built from configs."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

import lora_hub
from lora_hub.testing import LORA_TARGETS, random_peft_adapter, tiny_config, tiny_model

REGEX_TARGETS = {"llama": r".*\.(q_proj|v_proj|down_proj)", "gpt2": r".*attn\.c_attn", "bloom": r".*query_key_value",
                 "opt": r".*(q_proj|out_proj|fc2)"}


def _variant(kind: str, name: str) -> dict:
    first, second = LORA_TARGETS[kind][0], LORA_TARGETS[kind][-1]
    variants = {
        "plain": {},
        "rslora": {"use_rslora": True},
        "patterns": {"rank_pattern": {first: 8}, "alpha_pattern": {second: 3}},
        "regex_targets": {"target_modules": REGEX_TARGETS[kind]},
    }
    return {"fan_in_fan_out": kind == "gpt2", **variants[name]}


def _peft_layers(model: PeftModel) -> dict:
    return {name: module for name, module in model.base_model.model.named_modules()
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {})}


def _logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("variant", ["plain", "rslora", "patterns", "regex_targets"])
@pytest.mark.parametrize("kind", ["llama", "gpt2", "bloom", "opt"])
def test_peft_round_trip_is_exact(kind: str, variant: str, base_dirs, tmp_path: Path) -> None:
    source = random_peft_adapter(tiny_model(kind), tmp_path / "peft", seed=11, **_variant(kind, variant))
    adapter = lora_hub.convert_adapter(source, base=base_dirs[kind])
    assert adapter.config.base_model.model_type == kind
    assert adapter.config.base_model.fingerprint.startswith("sha256:")
    loaded = lora_hub.load_adapter(lora_hub.save_adapter(adapter, tmp_path / "adapter.safetensors"))
    exported = lora_hub.to_peft(loaded, tmp_path / "exported")

    before = load_file(source / "adapter_model.safetensors")
    after = load_file(exported / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)

    original = PeftModel.from_pretrained(tiny_model(kind), source).eval()
    roundtrip = PeftModel.from_pretrained(tiny_model(kind), exported).eval()
    tokens = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    expected = _logits(original, tokens)
    assert not torch.allclose(expected, _logits(tiny_model(kind), tokens))  # the adapter does something
    assert torch.equal(_logits(roundtrip, tokens), expected)

    layers = _peft_layers(original)
    assert set(layers) == set(loaded.modules)
    for name, layer in layers.items():
        spec = loaded.modules[name]
        assert (spec.r, spec.scaling) == (layer.r["default"], layer.scaling["default"]), name
        assert spec.fan_in_fan_out == (kind == "gpt2")
        assert torch.equal(loaded.delta_weight(name), layer.get_delta_weight("default").detach()), name


def test_modules_to_save_replace_the_head(tmp_path: Path) -> None:
    def classifier(seed: int):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            config = tiny_config("gpt2", num_labels=3, pad_token_id=0)
            return AutoModelForSequenceClassification.from_config(config).eval()

    source = random_peft_adapter(classifier(0), tmp_path / "peft", task_type="SEQ_CLS", fan_in_fan_out=True)
    adapter = lora_hub.convert_adapter(source)
    assert adapter.config.modules_to_save == ("score",)
    assert adapter.config.task_type == "SEQ_CLS"
    exported = lora_hub.to_peft(lora_hub.load_adapter(lora_hub.save_adapter(adapter, tmp_path / "a.safetensors")),
                                tmp_path / "exported")
    tokens = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    # Load onto a base whose head differs: the saved head must replace it in both.
    expected = _logits(PeftModel.from_pretrained(classifier(5), source).eval(), tokens)
    assert torch.equal(_logits(PeftModel.from_pretrained(classifier(5), exported).eval(), tokens), expected)
    assert not torch.allclose(_logits(classifier(5), tokens), expected)


def test_legacy_bin_needs_the_opt_in_and_then_matches(tmp_path: Path) -> None:
    model = tiny_model("llama")
    safe = random_peft_adapter(model, tmp_path / "safe", seed=3)
    pickled = random_peft_adapter(model, tmp_path / "pickled", seed=3, safe_serialization=False)
    assert (pickled / "adapter_model.bin").is_file() and not (pickled / "adapter_model.safetensors").exists()
    with pytest.raises(lora_hub.PickleRefusedError, match="allow_pickle=True"):
        lora_hub.convert_adapter(pickled)
    from_bin = lora_hub.convert_adapter(pickled, allow_pickle=True)
    alone = tmp_path / "alone.bin"
    alone.write_bytes((pickled / "adapter_model.bin").read_bytes())
    with pytest.raises(lora_hub.ConfigMissingError, match="adapter_config.json"):
        lora_hub.convert_adapter(alone, allow_pickle=True)
    from_safetensors = lora_hub.convert_adapter(safe)
    assert from_bin.modules == from_safetensors.modules
    assert all(torch.equal(from_bin.tensors[n], t) for n, t in from_safetensors.tensors.items())


def test_tensors_saved_on_cuda_load_on_the_cpu(tmp_path: Path, monkeypatch) -> None:
    source = random_peft_adapter(tiny_model("opt"), tmp_path / "peft", seed=4)
    state = load_file(source / "adapter_model.safetensors")
    (source / "adapter_model.safetensors").unlink()
    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
    torch.save(state, source / "adapter_model.bin")
    monkeypatch.undo()
    if not torch.cuda.is_available():  # the file really refers to CUDA storages
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(source / "adapter_model.bin", weights_only=True)
    adapter = lora_hub.convert_adapter(source, allow_pickle=True)
    assert all(t.device.type == "cpu" for t in adapter.tensors.values())
    assert all(torch.equal(adapter.tensors[n], t) for n, t in state.items())


def test_base_model_corrects_fan_in_fan_out_like_peft(tmp_path: Path, base_dirs) -> None:
    source = random_peft_adapter(tiny_model("gpt2"), tmp_path / "peft", fan_in_fan_out=True)
    config = json.loads((source / "adapter_config.json").read_text())
    (source / "adapter_config.json").write_text(json.dumps({**config, "fan_in_fan_out": False}))
    assert not any(s.fan_in_fan_out for s in lora_hub.convert_adapter(source).modules.values())
    with pytest.warns(lora_hub.LoraHubWarning, match="fan_in_fan_out corrected for 8 module"):
        adapter = lora_hub.convert_adapter(source, base=base_dirs["gpt2"])
    assert all(s.fan_in_fan_out for s in adapter.modules.values())
    tokens = torch.randint(0, 128, (1, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = _logits(PeftModel.from_pretrained(tiny_model("gpt2"), source).eval(), tokens)
    exported = lora_hub.to_peft(adapter, tmp_path / "exported")
    assert torch.equal(_logits(PeftModel.from_pretrained(tiny_model("gpt2"), exported).eval(), tokens), expected)


def test_wrong_base_is_refused(tmp_path: Path, base_dirs) -> None:
    source = random_peft_adapter(tiny_model("llama"), tmp_path / "peft")
    with pytest.raises(lora_hub.BaseModelMismatchError, match="are not adaptable layers of the base"):
        lora_hub.convert_adapter(source, base=base_dirs["opt"])
    wide = tmp_path / "wide"
    tiny_model("llama", hidden_size=128, intermediate_size=256).save_pretrained(wide)
    with pytest.raises(lora_hub.BaseModelMismatchError, match="the adapter has in=.*; the base layer has in="):
        lora_hub.convert_adapter(source, base=wide)


def test_config_that_contradicts_the_tensors_is_refused(tmp_path: Path) -> None:
    source = random_peft_adapter(tiny_model("llama"), tmp_path / "peft", r=4)
    config = json.loads((source / "adapter_config.json").read_text())
    (source / "adapter_config.json").write_text(json.dumps({**config, "r": 5}))
    with pytest.raises(lora_hub.PeftConfigError, match="r=5 was given but lora_B has rank 4"):
        lora_hub.convert_adapter(source)


def test_other_peft_methods_are_refused_before_loading(tmp_path: Path) -> None:
    (tmp_path / "ia3").mkdir()
    (tmp_path / "ia3" / "adapter_config.json").write_text('{"peft_type": "IA3"}')
    (tmp_path / "ia3" / "adapter_model.bin").write_bytes(b"\x80\x04 not even read")
    with pytest.raises(lora_hub.UnsupportedFeatureError, match="IA3"):
        lora_hub.convert_adapter(tmp_path / "ia3")


def test_mixed_rslora_export_keeps_every_scaling(tmp_path: Path) -> None:
    specs = {f"model.layers.{i}.self_attn.{p}": lora_hub.ModuleSpec(r=r, alpha=a, in_features=64, out_features=out,
                                                                     rslora=rs)
             for i in range(2)
             for p, r, a, rs, out in (("q_proj", 4, 8, True, 64), ("k_proj", 2, 8, False, 32),
                                      ("v_proj", 8, 5, True, 32))}
    config = lora_hub.AdapterConfig(modules=specs)
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for module, spec in specs.items():
        a, b = config.lora_tensor_names(module)
        tensors[a], tensors[b] = torch.randn(*spec.a_shape, generator=generator), torch.randn(*spec.b_shape,
                                                                                                generator=generator)
    adapter = lora_hub.Adapter(config, tensors)
    exported = lora_hub.to_peft(adapter, tmp_path / "exported")
    model = PeftModel.from_pretrained(tiny_model("llama"), exported)
    for name, layer in _peft_layers(model).items():
        assert layer.scaling["default"] == pytest.approx(specs[name].scaling, rel=1e-12)
        torch.testing.assert_close(layer.get_delta_weight("default").detach(), adapter.delta_weight(name))


def test_pattern_keys_match_exactly_one_module_even_when_paths_nest() -> None:
    spec = lora_hub.ModuleSpec(r=2, alpha=2, in_features=4, out_features=4)
    modules = {"h.0.attn": spec, "x.h.0.attn": lora_hub.ModuleSpec(r=4, alpha=2, in_features=4, out_features=4),
               "y.h.0.attn": spec, "z.q": lora_hub.ModuleSpec(r=8, alpha=3, in_features=4, out_features=4)}
    config = lora_hub.convert.peft_config(lora_hub.AdapterConfig(modules=modules))
    for name, spec in modules.items():
        key = get_pattern_key(config["rank_pattern"].keys(), name)
        assert config["rank_pattern"].get(key, config["r"]) == spec.r, name
        key = get_pattern_key(config["alpha_pattern"].keys(), name)
        assert config["alpha_pattern"].get(key, config["lora_alpha"]) == spec.alpha, name
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    peft = LoraConfig(target_modules=config["target_modules"])
    candidates = [*modules, "w.h.0.attn", "h.0.attn.inner", "z.q2"]
    assert {c for c in candidates if check_target_module_exists(peft, c)} == set(modules)


def test_an_exported_folder_reads_back_as_lora_hub(tmp_path: Path) -> None:
    adapter = lora_hub.convert_adapter(random_peft_adapter(tiny_model("opt"), tmp_path / "peft"))
    exported = lora_hub.to_peft(adapter, tmp_path / "exported")
    detected = lora_hub.detect_layout(exported)
    assert detected.layout is lora_hub.Layout.LORA_HUB and detected.weights.name == "adapter_model.safetensors"
    config = json.loads((exported / "adapter_config.json").read_text())
    (exported / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))  # ignored: derived
    assert lora_hub.convert_adapter(exported).modules == adapter.modules


_REWRITE_FOREVER = """
import sys, lora_hub
from lora_hub.testing import random_peft_adapter, tiny_model
first = lora_hub.convert_adapter(sys.argv[2])
second = lora_hub.convert_adapter(sys.argv[3])
print("ready", flush=True)
while True:
    for adapter in (first, second):
        lora_hub.to_peft(adapter, sys.argv[1])
"""


@pytest.mark.slow
def test_a_folder_write_killed_at_any_moment_leaves_a_consistent_pair(tmp_path: Path) -> None:
    import random
    import signal
    import subprocess
    import sys
    import time

    model = tiny_model("llama")
    first = random_peft_adapter(model, tmp_path / "first", seed=1, lora_alpha=8)
    second = random_peft_adapter(model, tmp_path / "second", seed=2, lora_alpha=32, r=8)
    target = tmp_path / "target"
    lora_hub.to_peft(lora_hub.convert_adapter(first), target)
    (target / "README.md").write_text("kept")
    rng = random.Random(0)
    for _ in range(8):
        process = subprocess.Popen([sys.executable, "-c", _REWRITE_FOREVER, str(target), str(first), str(second)],
                                   stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.4))
        process.send_signal(signal.SIGKILL)
        process.wait()
        report = lora_hub.validate(target, profile="peft")
        assert report.ok and "PEFT_CONFIG_DIFFERS" not in report.codes, report.findings
        assert (target / "README.md").read_text() == "kept"
        config = json.loads((target / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"]) in ((4, 8), (8, 32))
    for leftover in tmp_path.glob(".target.*"):  # what a kill may leave beside the folder: never inside it
        assert leftover.name.endswith((".tmp", ".old"))


def test_a_failed_folder_write_leaves_the_old_folder_untouched(tmp_path: Path, monkeypatch) -> None:
    import errno

    from lora_hub import atomicfile

    source = random_peft_adapter(tiny_model("llama"), tmp_path / "source", seed=3)
    target = lora_hub.to_peft(lora_hub.convert_adapter(source), tmp_path / "target")
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    other = lora_hub.convert_adapter(random_peft_adapter(tiny_model("llama"), tmp_path / "other", seed=4, r=8))

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomicfile, "atomic_write", full_disk)  # the weights are written first
    with pytest.raises(OSError, match="No space"):
        lora_hub.to_peft(other, target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "source", "target"]


def test_a_mixed_pair_is_detected(tmp_path: Path) -> None:
    model = tiny_model("llama")
    old = lora_hub.to_peft(lora_hub.convert_adapter(random_peft_adapter(model, tmp_path / "a", seed=1)),
                           tmp_path / "old")
    new = lora_hub.to_peft(lora_hub.convert_adapter(random_peft_adapter(model, tmp_path / "b", seed=2,
                                                                        lora_alpha=32)), tmp_path / "new")
    (new / "adapter_config.json").write_bytes((old / "adapter_config.json").read_bytes())  # new weights, old config
    for profile in (None, "peft"):
        report = lora_hub.validate(new, profile=profile)
        assert not report.ok and "PEFT_CONFIG_DIFFERS" in report.codes, report.findings
        assert "scaling 8 in the file" in report.findings[report.codes.index("PEFT_CONFIG_DIFFERS")].message
    untargeted = json.loads((old / "adapter_config.json").read_text()) | {"target_modules": ["q_proj"]}
    (old / "adapter_config.json").write_text(json.dumps(untargeted))
    assert "PEFT_CONFIG_DIFFERS" in lora_hub.validate(old).codes
