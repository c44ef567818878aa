"""Tiny transformers models and PEFT adapters built from configs, for tests, the demo and benchmarks: nothing is
downloaded, and the same seed gives the same weights. The global random state is left as it was.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                  max_position_embeddings=128),
    "mistral": dict(model_type="mistral", architectures=["MistralForCausalLM"], hidden_size=64,
                    intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    vocab_size=128, max_position_embeddings=128, sliding_window=None),
    "qwen2": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                  max_position_embeddings=128, tie_word_embeddings=False),
    "qwen3": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128,
                  max_position_embeddings=128, tie_word_embeddings=False),
    "gpt2": dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_embd=64, n_layer=2, n_head=4,
                 vocab_size=128, n_positions=128, bos_token_id=0, eos_token_id=0),
    "bloom": dict(model_type="bloom", architectures=["BloomForCausalLM"], hidden_size=64, n_layer=2, n_head=4,
                  vocab_size=128, bos_token_id=0, eos_token_id=0, pad_token_id=0),
    "opt": dict(model_type="opt", architectures=["OPTForCausalLM"], hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                num_attention_heads=4, vocab_size=128, max_position_embeddings=128, word_embed_proj_dim=64),
}
"""Small configs: Llama, Mistral, Qwen2, Qwen3 and OPT (nn.Linear), GPT-2 (Conv1D, fused c_attn) and BLOOM (fused
query_key_value)."""

LORA_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "bloom": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
}
"""Every linear projection of each tiny architecture, as PEFT target_modules."""


def tiny_config(kind: str, **overrides: Any) -> PretrainedConfig:
    """The config of a tiny model of `kind` (a key of TINY_CONFIGS), with `overrides` applied."""
    from transformers import AutoConfig

    settings = {**TINY_CONFIGS[kind], **overrides}
    return AutoConfig.for_model(settings.pop("model_type"), **settings)


def tiny_model(kind: str, *, seed: int = 0, dtype: torch.dtype | None = None, **overrides: Any) -> PreTrainedModel:
    """A tiny causal LM of `kind`, in eval mode, with weights drawn from `seed`."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(tiny_config(kind, **overrides))
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def tiny_tokenizer():
    """A character-level tokenizer for the tiny models (97 tokens: <unk>, <eos>, printable ASCII), built offline."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{chr(c): c - 30 for c in range(32, 127)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<eos>",
                                   pad_token="<eos>")


def save_tiny_model(kind: str, directory: str | os.PathLike[str], *, seed: int = 0, tokenizer: bool = True,
                    **overrides: Any) -> Path:
    """Saves a tiny model (config.json, weights and, by default, a tokenizer) to `directory`, as a base model
    folder that `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` open offline."""
    model = tiny_model(kind, seed=seed, **overrides)
    model.save_pretrained(directory)
    if tokenizer:
        tiny_tokenizer().save_pretrained(directory)
    return Path(directory)


def random_peft_adapter(model: PreTrainedModel, directory: str | os.PathLike[str], *, seed: int = 0,
                        target_modules: Sequence[str] | str | None = None, r: int = 4, lora_alpha: float = 8,
                        safe_serialization: bool = True, **lora_config: Any) -> Path:
    """Trains nothing, but saves a PEFT LoRA adapter for `model` whose lora_A and lora_B are random (not the
    zero-initialised B of a fresh adapter), so that it changes the model's output. `model` is left unchanged.

    Args:
        model: The base model (its type picks the default target_modules).
        directory: Where PEFT saves adapter_config.json and adapter_model.safetensors.
        seed: Seed for the adapter weights.
        target_modules, r, lora_alpha, lora_config: LoraConfig settings.
        safe_serialization: False saves the legacy pickle adapter_model.bin instead of safetensors.
    """
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    targets = target_modules if target_modules is not None else LORA_TARGETS[model.config.model_type]
    config = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=targets, init_lora_weights=False,
                        **lora_config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(copy.deepcopy(model), config)
    peft_model.save_pretrained(directory, safe_serialization=safe_serialization)
    return Path(directory)
