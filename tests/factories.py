"""In-memory adapters for tests: random LoRA factors for a few modules of varied kinds."""

from __future__ import annotations

import torch

from lora_hub import Adapter, AdapterConfig, BaseModelRef, ModuleSpec

SPECS = {
    "model.layers.0.self_attn.q_proj": ModuleSpec(r=4, alpha=8, in_features=16, out_features=16),
    "model.layers.0.self_attn.v_proj": ModuleSpec(r=2, alpha=2.5, in_features=16, out_features=8, rslora=True),
    "transformer.h.0.attn.c_attn": ModuleSpec(r=2, alpha=4, in_features=16, out_features=48, fan_in_fan_out=True,
                                              enable_lora=(True, False, True)),
}


def random_adapter(seed: int = 0, *, dtype: torch.dtype = torch.float32, specs: dict | None = None,
                   with_head: bool = True) -> Adapter:
    """An adapter with random factors for `specs` (default SPECS) and, optionally, a replaced `score` head."""
    generator = torch.Generator().manual_seed(seed)
    specs = SPECS if specs is None else specs
    config = AdapterConfig(modules=specs, modules_to_save=("score",) if with_head else (),
                           base_model=BaseModelRef(name="tiny/test", model_type="llama"), name=f"random-{seed}")
    tensors = {}
    for module, spec in specs.items():
        a_name, b_name = config.lora_tensor_names(module)
        tensors[a_name] = torch.randn(*spec.a_shape, generator=generator).to(dtype)
        tensors[b_name] = torch.randn(*spec.b_shape, generator=generator).to(dtype)
    if with_head:
        tensors["base_model.model.score.weight"] = torch.randn(3, 16, generator=generator)
        tensors["base_model.model.score.bias"] = torch.randn(3, generator=generator).to(torch.float16)
    return Adapter(config, tensors)
