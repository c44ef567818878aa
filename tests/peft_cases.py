"""Tiny base models built from configs, and adapters written by PEFT itself for them (shared by the feature, verdict
and profile tests)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from lora_hub.testing import tiny_model


def _moe(model_type: str, **extra):
    def build() -> torch.nn.Module:
        config = AutoConfig.for_model(model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      max_position_embeddings=128, **extra)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return AutoModelForCausalLM.from_config(config).eval()
    return build


def _classifier() -> torch.nn.Module:
    config = tiny_model("llama").config
    config.num_labels, config.pad_token_id = 3, 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_config(config).eval()


def _resized() -> torch.nn.Module:
    model = tiny_model("llama")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        model.resize_token_embeddings(130)
    return model


BUILDERS = {
    "llama": lambda: tiny_model("llama"),
    "tied": lambda: tiny_model("llama", tie_word_embeddings=True),
    "gpt2": lambda: tiny_model("gpt2"),
    "resized": _resized,
    "mixtral": _moe("mixtral", num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": _moe("qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16),
    "llama_classifier": lambda: _classifier(),
}


def peft_adapter(folder: Path, model: torch.nn.Module, *, seed: int = 0, **settings) -> Path:
    """A PEFT adapter saved by PEFT: random factors, then moved further as a training step would."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        settings = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, **settings}
        peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(**settings))
        with torch.no_grad():
            for name, parameter in peft_model.named_parameters():
                if "lora_" in name or "trainable_tokens" in name:
                    parameter.add_(torch.randn_like(parameter) * 0.3)
    peft_model.save_pretrained(folder)
    return folder
