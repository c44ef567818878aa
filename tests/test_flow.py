"""The headline flow as a new user runs it, on a fresh machine: a third party's base model (with a tokenizer) and a
plain PEFT adapter for it are uploaded with huggingface_hub to `lora-hub serve`; then, with empty Hugging Face and
registry caches, the installed command line pulls the adapter, applies it on the base it fetches, and inspects and
validates it by name. PEFT is the oracle of the generated text."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_hub.testing import random_peft_adapter, save_tiny_model, tiny_model

from .conftest import Hub

PROMPT = "hello world"


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lora_hub_cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_pull_and_apply_on_a_fresh_machine(hub: Hub, tmp_path: Path) -> None:
    base = save_tiny_model("llama", tmp_path / "tiny-llama", tokenizer=True)
    bob = HfApi(token=hub.bob)
    bob.create_repo("bob/tiny-llama")
    bob.upload_folder(folder_path=base, repo_id="bob/tiny-llama")
    adapter = random_peft_adapter(tiny_model("llama"), tmp_path / "sql-lora", seed=3)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "bob/tiny-llama"}))
    alice = HfApi(token=hub.alice)
    alice.create_repo("alice/sql-lora")
    alice.upload_folder(folder_path=adapter, repo_id="alice/sql-lora")

    fresh = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "LORA_HUB_HOME": str(tmp_path / "lora-hub-home")}
    pulled = _cli("pull", "alice/sql-lora", env=fresh)
    assert pulled.returncode == 0, pulled.stderr
    assert not (tmp_path / "hf-home" / "hub" / "models--bob--tiny-llama").exists()  # the base comes when needed
    applied = _cli("apply", "--prompt", PROMPT, "--max-new-tokens", "8", env=fresh)
    assert applied.returncode == 0, applied.stderr
    assert "bob/tiny-llama" in applied.stderr  # says which base it put the adapter on

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    inputs = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    expected = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert applied.stdout.rstrip("\n") == expected

    inspected = _cli("inspect", "alice/sql-lora", "--json", env=fresh)
    assert inspected.returncode == 0, inspected.stderr
    assert json.loads(inspected.stdout)["module_count"] == 14 and "registry entry" in inspected.stderr
    validated = _cli("validate", "alice/sql-lora", env=fresh)
    assert validated.returncode == 0 and "alice/sql-lora (registry entry: " in validated.stdout, validated.stdout
    converted = _cli("convert", "alice/sql-lora", "-o", str(tmp_path / "sql.safetensors"), env=fresh)
    assert converted.returncode == 0 and (tmp_path / "sql.safetensors").is_file(), converted.stderr

    offline = {**fresh, "HF_HUB_OFFLINE": "1"}  # everything is cached now
    again = _cli("apply", "alice/sql-lora", "--prompt", PROMPT, "--max-new-tokens", "8", env=offline)
    assert again.returncode == 0 and again.stdout == applied.stdout, again.stderr

    never = {**fresh, "HF_HOME": str(tmp_path / "empty"), "LORA_HUB_HOME": str(tmp_path / "empty-registry")}
    validated = _cli("validate", "alice/sql-lora", "--json", env=never)  # a Hub id not pulled yet: pulled first
    assert validated.returncode == 0 and json.loads(validated.stdout)[0]["resolved"].startswith("pulled: ")
    with_base = _cli("pull", "alice/sql-lora", "--with-base", env=never)
    assert with_base.returncode == 0 and (tmp_path / "empty" / "hub" / "models--bob--tiny-llama").is_dir()
    cold = {**never, "HF_HOME": str(tmp_path / "cold"), "HF_HUB_OFFLINE": "1"}
    refused = _cli("apply", "alice/sql-lora", "--prompt", PROMPT, env=cold)
    assert refused.returncode == 1 and "[HUB_NOT_CACHED]" in refused.stderr


def test_a_declared_base_that_is_no_hub_id_is_named_as_such(tmp_path: Path) -> None:
    from click.testing import CliRunner
    from lora_hub_cli.main import cli

    adapter = random_peft_adapter(tiny_model("llama"), tmp_path / "peft")
    config = json.loads((adapter / "adapter_config.json").read_text())
    local = "/home/someone/models/llama-7b"  # where the adapter was trained
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": local}))
    result = CliRunner().invoke(cli, ["apply", str(adapter), "--prompt", PROMPT])
    assert result.exit_code == 1 and "[BASE_MODEL_UNAVAILABLE]" in result.output
    assert "not a Hub repository id" in result.output and "--base" in result.output
