"""lora_hub.basemodel: base model shapes from config.json on the meta device, layer kinds, and the fingerprint."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

import lora_hub
from lora_hub.testing import tiny_config, tiny_model


def test_every_source_kind_describes_the_same_layers(base_dirs, tmp_path: Path) -> None:
    from_dir = lora_hub.describe_base(base_dirs["gpt2"])
    (tmp_path / "weights-absent").mkdir()
    config_only = tmp_path / "weights-absent" / "config.json"
    config_only.write_text((base_dirs["gpt2"] / "config.json").read_text())
    from_file = lora_hub.describe_base(config_only)
    from_config = lora_hub.describe_base(tiny_config("gpt2"))
    from_model = lora_hub.describe_base(tiny_model("gpt2"))
    assert from_dir.layers == from_file.layers == from_config.layers == from_model.layers
    assert lora_hub.describe_base(from_dir) is from_dir
    assert from_dir.layers["transformer.h.0.attn.c_attn"] == lora_hub.LayerInfo("conv1d", 64, 192)
    assert from_dir.layers["transformer.h.0.attn.c_attn"].weight_shape == (64, 192)
    assert from_dir.model_type == "gpt2" and from_dir.name == str(base_dirs["gpt2"])


def test_task_type_chooses_the_model_class() -> None:
    causal = lora_hub.describe_base(tiny_config("llama"))
    classifier = lora_hub.describe_base(tiny_config("llama", num_labels=2), task_type="SEQ_CLS")
    assert "lm_head" in causal.layers and "score" not in causal.layers
    assert "score" in classifier.layers and "lm_head" not in classifier.layers


def test_eight_bit_layers_are_linear_layers(base_dirs) -> None:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(base_dirs["llama"], device_map="cpu",
                                                 quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    info = lora_hub.describe_base(model)
    q = info.layers["model.layers.0.self_attn.q_proj"]
    assert (q.kind, q.quantization, q.in_features, q.out_features) == ("linear", "int8", 64, 64)
    full = lora_hub.describe_base(base_dirs["llama"])
    q_proj = ["model.layers.0.self_attn.q_proj"]
    assert info.fingerprint(q_proj) == full.fingerprint(q_proj)


def test_fingerprint_follows_the_spec(base_dirs) -> None:
    info = lora_hub.describe_base(base_dirs["gpt2"])
    modules = ["transformer.h.1.mlp.c_proj", "transformer.h.0.attn.c_attn"]
    text = "transformer.h.0.attn.c_attn:64x192\ntransformer.h.1.mlp.c_proj:256x64\n"
    assert info.fingerprint(modules) == "sha256:" + hashlib.sha256(text.encode()).hexdigest()
    with pytest.raises(KeyError):
        info.fingerprint(["transformer.h.9.attn.c_attn"])


def test_unavailable_bases_are_clear_errors(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(lora_hub.BaseModelError, match="local cache"):
        lora_hub.describe_base("someone/not-downloaded")
    with pytest.raises(lora_hub.BaseModelError, match="no config.json"):
        lora_hub.describe_base(tmp_path)
    (tmp_path / "bad.json").write_text(json.dumps({"hidden_size": 3}))
    with pytest.raises(lora_hub.BaseModelError, match="model_type"):
        lora_hub.describe_base(tmp_path / "bad.json")


def test_describe_base_builds_on_the_meta_device(base_dirs, monkeypatch) -> None:
    """No weights are loaded: the model is built on the meta device even for a folder that has weights."""
    import transformers

    built = []
    original = transformers.LlamaForCausalLM.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        built.append(next(self.parameters()).device)

    monkeypatch.setattr(transformers.LlamaForCausalLM, "__init__", spy)
    lora_hub.describe_base(base_dirs["llama"])
    assert built == [torch.device("meta")]
