"""In-memory adapters for tests: random LoRA factors for a few modules of varied kinds."""

from __future__ import annotations

import loralib
import torch

from lora_hub import Adapter, AdapterConfig, BaseModelRef, ModuleSpec
from lora_hub.testing import tiny_model

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


QKV = {"gpt2": "transformer.h.{}.attn.c_attn", "bloom": "transformer.h.{}.self_attention.query_key_value"}


def with_loralib_qkv(kind: str, *, seed: int) -> torch.nn.Module:
    """The tiny model with every fused qkv replaced by a loralib MergedLinear (r=2, alpha=4, [T, F, T]) holding the
    same base weights and random LoRA factors: loralib's own layers, as the oracle for enable_lora."""
    model = tiny_model(kind)
    generator = torch.Generator().manual_seed(seed)
    for layer in range(model.config.num_hidden_layers):
        path = QKV[kind].format(layer)
        parent_path, name = path.rsplit(".", 1)
        parent, old = model.get_submodule(parent_path), model.get_submodule(path)
        new = loralib.MergedLinear(64, 192, r=2, lora_alpha=4, enable_lora=[True, False, True],
                                   fan_in_fan_out=kind == "gpt2", merge_weights=False)  # Conv1D stores (in, out)
        new.weight.data = old.weight.data.clone()
        new.bias.data = old.bias.data.clone()
        new.lora_A.data = torch.randn(new.lora_A.shape, generator=generator) * 0.3
        new.lora_B.data = torch.randn(new.lora_B.shape, generator=generator) * 0.3
        setattr(parent, name, new)
    return model.eval()


def counting_compile(model: torch.nn.Module) -> tuple[torch.nn.Module, list]:
    """torch.compile with a backend that records each graph it is given: the list grows on every (re)compilation."""
    compiles: list = []

    def counting_backend(graph, example_inputs):
        compiles.append(graph)
        return graph.forward

    return torch.compile(model, backend=counting_backend), compiles
