"""Inputs that once crashed lora-hub with a traceback or an exception outside the LoraHubError tree: each now gives
a typed error, and through the command line exit code 1 and one line."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lora_hub
from lora_hub.testing import random_peft_adapter, save_tiny_model, tiny_model

from .factories import random_adapter


def with_config(source: Path, target: Path, **changes) -> Path:
    """A copy of a lora-hub file whose config has `changes` applied (module entries: key 'module:<field>')."""
    data = source.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    config = json.loads(header["__metadata__"]["lora_hub.config"])
    for key, value in changes.items():
        if key.startswith("module:"):
            for entry in config["modules"].values():
                entry[key.split(":", 1)[1]] = value
        else:
            config[key] = value
    header["__metadata__"]["lora_hub.config"] = json.dumps(config)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    target.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + size:])
    return target


def cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lora_hub_cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def one_line_error(result: subprocess.CompletedProcess, code: str) -> None:
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"[{code}]" in result.stderr, result.stderr


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("crash")
    return lora_hub.save_adapter(random_adapter(3, with_head=False), folder / "a.safetensors")


@pytest.mark.parametrize("changes", [{"module:alpha": 1e308}, {"module:alpha": 4e6}, {"modules_to_save": [[]]},
                                     {"modules_to_save": [{}]}, {"tags": [[]]}, {"modules_to_save": "head"},
                                     {"module:enable_lora": [[]]}, {"module:r": [4]}])
def test_config_values_that_crashed_are_config_errors(plain: Path, tmp_path: Path, changes: dict) -> None:
    path = with_config(plain, tmp_path / "bad.safetensors", **changes)
    with pytest.raises(lora_hub.ConfigError):
        lora_hub.load_adapter(path)
    report = lora_hub.validate(path)
    assert report.codes == ["CONFIG_INVALID"], report.findings
    for args in (["inspect", path], ["convert", path, "-o", tmp_path / "out.safetensors"], ["validate", path]):
        result = cli(*args)
        if args[0] == "validate":
            assert result.returncode == 1 and "CONFIG_INVALID" in result.stdout and not result.stderr.strip()
        else:
            one_line_error(result, "CONFIG_INVALID")
    assert not (tmp_path / "out.safetensors").exists()


def test_a_scaling_too_large_for_the_run_time_is_refused_before_loading(tmp_path: Path) -> None:
    base = save_tiny_model("llama", tmp_path / "base")
    folder = random_peft_adapter(tiny_model("llama"), tmp_path / "peft", lora_alpha=1e308)
    report = lora_hub.validate(folder, base=base)
    assert report.codes == ["PEFT_CONFIG_INVALID"] and "exceeds the limit" in report.findings[0].message
    with pytest.raises(lora_hub.PeftConfigError):
        lora_hub.attach(tiny_model("llama")).load("huge", folder)
    one_line_error(cli("apply", folder, "--base", base, "--prompt", "hi", "--max-new-tokens", "2"),
                   "PEFT_CONFIG_INVALID")
    ok = random_peft_adapter(tiny_model("llama"), tmp_path / "ok", lora_alpha=65504 * 4, r=4)  # scaling 65504
    assert lora_hub.validate(ok).ok


def test_a_pickle_named_safetensors_is_read_as_a_pickle(tmp_path: Path) -> None:
    state = {"layer.lora_A": torch.randn(2, 8), "layer.lora_B": torch.randn(8, 2)}
    path = tmp_path / "lora.safetensors"
    torch.save(state, path)
    one_line_error(cli("convert", path, "-o", tmp_path / "refused.safetensors"), "PICKLE_REFUSED")
    result = cli("convert", path, "-o", tmp_path / "out.safetensors", "--allow-pickle", "--alpha", "4")
    assert result.returncode == 0, result.stderr
    adapter = lora_hub.load_adapter(tmp_path / "out.safetensors")
    assert torch.equal(adapter.lora_A("layer"), state["layer.lora_A"])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x80\x04" + b"\xff" * 64)
    one_line_error(cli("convert", garbage, "-o", tmp_path / "g.safetensors", "--allow-pickle", "--alpha", "4"),
                   "PICKLE_UNSAFE")


def test_peft_weights_with_a_pickle_inside_a_safetensors_name(tmp_path: Path) -> None:
    folder = tmp_path / "peft"
    folder.mkdir()
    torch.save({"base_model.model.q.lora_A.weight": torch.ones(2, 4),
                "base_model.model.q.lora_B.weight": torch.ones(4, 2)}, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    report = lora_hub.validate(folder, allow_pickle=True)
    assert report.ok, report.findings
    save_file({"x": torch.ones(1)}, tmp_path / "plain.safetensors")  # and a real safetensors file is not a pickle
    assert lora_hub.validate(tmp_path / "plain.safetensors").codes == ["LAYOUT_UNKNOWN"]
