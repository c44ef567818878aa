"""Patterns from adapter files run at a bounded cost: catastrophic-backtracking regexes in target_modules,
rank_pattern and alpha_pattern keys finish at once through every entry point, with PEFT's answers for ordinary
patterns, and patterns that cannot be matched in linear time are refused by name."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi
from safetensors.torch import save_file

import lora_hub
from lora_hub.patterns import fullmatch, matches_key

EVIL_NAME = "a" * 40
"""Against '(a+)+$' with a non-matching tail, Python's re needs about 2**40 steps."""


def _evil_peft_folder(folder: Path, *, extra_modules: int = 0, **config) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    modules = [f"{EVIL_NAME}x", f"layers.0.{EVIL_NAME}c", *(f"layers.{i}.m" for i in range(extra_modules))]
    tensors = {}
    for module in modules:
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.ones(2, 4)
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.ones(4, 2)
    save_file(tensors, folder / "adapter_model.safetensors")
    settings = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": "(a+)+$",
                "base_model_name_or_path": "tiny/llama", **config}
    (folder / "adapter_config.json").write_text(json.dumps(settings))
    return folder


EVIL_CONFIGS = {
    "target_modules": {},
    "rank_pattern": {"target_modules": ["x"], "rank_pattern": {"(a+)+b": 8}},
    "alpha_pattern": {"target_modules": ["x"], "alpha_pattern": {"(a|aa)+$": 3}},
}

_ENTRY_POINTS = """
import sys, time, warnings
warnings.simplefilter("ignore")
import lora_hub
from lora_hub.testing import tiny_model
path = sys.argv[1]
start = time.perf_counter()
lora_hub.validate(path, level="full", profile="peft")
lora_hub.summarize(path)
lora_hub.convert_adapter(path)
try:
    lora_hub.attach(tiny_model("llama")).load("evil", path)
except lora_hub.AdapterMismatchError:
    pass
print(f"{time.perf_counter() - start:.2f}")
"""


@pytest.mark.slow
@pytest.mark.parametrize("field", list(EVIL_CONFIGS))
def test_backtracking_patterns_finish_at_once_everywhere(field: str, tmp_path: Path) -> None:
    folder = _evil_peft_folder(tmp_path / "evil", **EVIL_CONFIGS[field])
    result = subprocess.run([sys.executable, "-c", _ENTRY_POINTS, str(folder)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout.strip()) < 20, result.stdout  # Python's re alone would take hours
    cli = subprocess.run([sys.executable, "-m", "lora_hub_cli", "inspect", str(folder)], capture_output=True,
                         text=True, timeout=120)
    assert cli.returncode == 0 and "modules" in cli.stdout, cli.stderr


def test_a_pull_of_a_backtracking_config_finishes(hub, tmp_path: Path) -> None:
    folder = _evil_peft_folder(tmp_path / "evil")
    api = HfApi(endpoint=hub.endpoint, token=hub.alice)
    api.create_repo("alice/evil-regex", exist_ok=True)
    api.upload_folder(repo_id="alice/evil-regex", folder_path=folder)
    start = time.perf_counter()
    path = lora_hub.pull("alice/evil-regex", token=hub.alice, endpoint=hub.endpoint)
    assert time.perf_counter() - start < 20 and path.is_dir()


@pytest.mark.parametrize(("pattern", "text"), [
    (r".*\.(q_proj|v_proj)", "model.layers.0.self_attn.q_proj"),
    (r".*\.(q_proj|v_proj)", "model.layers.0.self_attn.k_proj"),
    (r"model\.layers\.\d+\.mlp\..*", "model.layers.12.mlp.up_proj"),
    (r"(?i)Q_PROJ", "q_proj"),
    (r"[^.]+_proj", "q_proj"),
    (r"q_proj|v_proj", "v_proj"),
    (r"a{2,3}", "aaaa"),
    (r"(a+)+$", EVIL_NAME + "b"),
])
def test_answers_equal_pythons_re(pattern: str, text: str) -> None:
    if pattern == "(a+)+$":  # Python's answer would take hours to compute; RE2 gives it at once
        assert not fullmatch(pattern, text, what="t") and not matches_key(pattern, text, what="t")
        return
    assert fullmatch(pattern, text, what="t") == (re.fullmatch(pattern, text) is not None)
    try:
        expected = re.match(rf"(.*\.)?({pattern})$", text) is not None
    except re.error:  # PEFT's own wrapping breaks the pattern (a global flag moved inside): refused, as PEFT fails
        with pytest.raises(lora_hub.PeftConfigError):
            matches_key(pattern, text, what="t")
        return
    assert matches_key(pattern, text, what="t") == expected


@pytest.mark.parametrize(("pattern", "code"), [
    (r"(q)_\1", "PATTERN_UNSUPPORTED"),
    (r"(?=q)q_proj", "PATTERN_UNSUPPORTED"),
    ("x" * 70_000, "PATTERN_TOO_COMPLEX"),
    ("(unclosed", "PEFT_CONFIG_INVALID"),
])
def test_patterns_that_cannot_run_safely_are_findings(pattern: str, code: str, tmp_path: Path) -> None:
    folder = _evil_peft_folder(tmp_path / "p", target_modules=pattern)
    report = lora_hub.validate(folder)
    assert report.codes == [code] or report.codes[:1] == [code], report.findings
    assert "target_modules" in report.findings[0].message
    with pytest.raises(lora_hub.ConversionError) as caught:
        lora_hub.convert_adapter(folder)
    assert caught.value.code == code


@pytest.mark.slow
@pytest.mark.parametrize(("keys", "modules"), [(9_000, 0), (8_000, 600)], ids=["compiles", "tests"])
def test_a_config_needing_too_much_pattern_work_is_refused(keys: int, modules: int, tmp_path: Path) -> None:
    pattern = {f"k{i}.*": 8 for i in range(keys)}  # regular expressions, not plain names
    folder = _evil_peft_folder(tmp_path / "many", extra_modules=modules, target_modules=["x"], rank_pattern=pattern)
    start = time.perf_counter()
    report = lora_hub.validate(folder, level="header")
    assert report.codes[:1] == ["PATTERN_TOO_COMPLEX"], report.findings
    assert time.perf_counter() - start < 30


@pytest.mark.slow
def test_plain_name_keys_cost_no_pattern_tests(tmp_path: Path) -> None:
    pattern = {f"k{i}": 8 for i in range(500_000)}  # 6 MB of config: looked up, never matched
    folder = _evil_peft_folder(tmp_path / "many", extra_modules=10, target_modules=["x"], rank_pattern=pattern)
    report = lora_hub.validate(folder, level="header")
    assert report.ok, report.findings


def test_key_patterns_give_peft_get_pattern_key_answers() -> None:
    from peft.utils.other import get_pattern_key

    from lora_hub.patterns import KeyPatterns, PatternBudget

    keys = {"^model\\.layers\\.1\\.mlp\\.up_proj": 1, r"layers\.0\..*_proj": 2, "q_proj": 3,
            "self_attn\\.v_proj": 4, "down_proj": 5, r"mlp\.(gate|up)_proj": 6, "up_proj": 7}
    patterns = KeyPatterns(keys, what="rank_pattern", budget=PatternBudget())
    modules = [f"model.layers.{i}.{part}" for i in range(3) for part in
               ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.gate_proj", "mlp.down_proj")]
    for module in modules + ["up_proj", "model.layers.1.mlp.up_proj.extra", "xq_proj"]:
        key = get_pattern_key(list(keys), module)
        assert patterns.value(module, None) == keys.get(key), module
