"""The vLLM LoRA resolver plugin: names from the registry (and the Hub when allowed) become PEFT folders that vLLM
loads, after the vllm profile has accepted them against the served model. Without vLLM, the folders are checked with
PeftModel; with vLLM installed (marked vllm), vLLM's own resolver interface, PEFTHelper and
LoRAModel.from_local_checkpoint take them, and the plugin is found through vLLM's entry point group."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
import torch
from peft import PeftModel

import lora_hub
from lora_hub.testing import random_peft_adapter, save_tiny_model, tiny_model
from lora_hub.vllm_plugin import peft_folder_for_vllm

from .conftest import Hub

INPUT = torch.tensor([[1, 5, 9, 2]])


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model vLLM would serve, as a folder (vLLM's model name is its path or Hub id)."""
    return save_tiny_model("llama", tmp_path_factory.mktemp("served") / "tiny-llama")


def _publish(hub: Hub, tmp_path: Path, repo: str, seed: int, **options) -> Path:
    adapter = random_peft_adapter(tiny_model("llama"), tmp_path / repo.replace("/", "-"), seed=seed, **options)
    lora_hub.push(adapter, repo, token=hub.alice)
    return adapter


def test_registry_names_become_folders_peftmodel_loads_with_the_same_logits(hub: Hub, served: Path, tmp_path,
                                                                            registry_home: Path) -> None:
    source = _publish(hub, tmp_path, "alice/vllm-sql", seed=1)
    lora_hub.pull("alice/vllm-sql")
    folder = peft_folder_for_vllm(str(served), "alice/vllm-sql")
    assert folder is not None and folder.parent == registry_home / "vllm"
    assert peft_folder_for_vllm(str(served), "alice/vllm-sql") == folder  # written once, then reused
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(tiny_model("llama"), source).eval()(INPUT).logits
        ours = PeftModel.from_pretrained(tiny_model("llama"), folder).eval()(INPUT).logits
    assert torch.equal(ours, theirs)


def test_names_not_served_get_none_and_the_reason_in_the_log(hub: Hub, served: Path, tmp_path, caplog) -> None:
    _publish(hub, tmp_path, "alice/vllm-dora", seed=2, use_dora=True)
    lora_hub.pull("alice/vllm-dora")
    _publish(hub, tmp_path, "alice/vllm-later", seed=3)
    with caplog.at_level(logging.WARNING, logger="lora_hub.vllm"):
        assert peft_folder_for_vllm(str(served), "alice/vllm-dora") is None
    assert "VLLM_DORA" in caplog.text
    assert peft_folder_for_vllm(str(served), "alice/vllm-later") is None  # not pulled, and the Hub is not allowed
    assert peft_folder_for_vllm(str(served), "alice/vllm-later", sources=("registry", "hub")) is not None
    assert lora_hub.Registry().get("alice/vllm-later").valid  # pulled on demand: validated, recorded
    for name in ("/etc/passwd", str(tmp_path / "alice-vllm-dora"), "../alice/vllm-sql", "alice/../x"):
        assert peft_folder_for_vllm(str(served), name, sources=("registry", "hub")) is None  # never a path
    other = save_tiny_model("opt", tmp_path / "tiny-opt")
    with caplog.at_level(logging.WARNING, logger="lora_hub.vllm"):
        assert peft_folder_for_vllm(str(other), "alice/vllm-later") is None  # for another model than vLLM serves
    assert "MODULE_NOT_IN_BASE" in caplog.text or "NO_MODULE_MATCHES" in caplog.text


@pytest.mark.vllm
def test_vllm_resolves_through_the_plugin_and_loads_the_folder(hub: Hub, served: Path, tmp_path) -> None:
    pytest.importorskip("vllm", reason="vLLM is the oracle: see ../shared/oracles/README.md")
    from importlib.metadata import entry_points

    from vllm.config.lora import LoRAConfig
    from vllm.lora import lora_model
    from vllm.lora.peft_helper import PEFTHelper
    from vllm.lora.resolver import LoRAResolverRegistry
    from vllm.plugins import load_plugins_by_group

    plugins = {p.name: p for p in entry_points(group="vllm.general_plugins")}
    assert plugins["lora_hub"].value == "lora_hub.vllm_plugin:register"
    load_plugins_by_group("vllm.general_plugins")["lora_hub"]()
    resolver = LoRAResolverRegistry.get_resolver("lora-hub")
    _publish(hub, tmp_path, "alice/vllm-served", seed=4)
    lora_hub.pull("alice/vllm-served")
    request = asyncio.run(resolver.resolve_lora(str(served), "alice/vllm-served"))
    assert request is not None and request.lora_name == "alice/vllm-served" and request.lora_int_id > 0
    assert asyncio.run(resolver.resolve_lora(str(served), "alice/unknown")) is None
    lora_model.PIN_MEMORY = False
    helper = PEFTHelper.from_local_dir(request.lora_path, max_position_embeddings=128)
    helper.validate_legal(LoRAConfig(max_lora_rank=8))
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    loaded = lora_model.LoRAModel.from_local_checkpoint(request.lora_path, modules, helper, lora_model_id=1,
                                                        device="cpu")
    assert len(loaded.loras) == 14
