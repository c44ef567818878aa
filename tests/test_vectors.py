"""The conformance vectors of spec/vectors: each invalid file gives exactly its code, each valid file its facts,
canonical ones survive a load/save round trip byte for byte, and the committed files are what the script makes."""

from __future__ import annotations

import json
import re
import runpy
import subprocess
import sys

import pytest
import torch

import lora_hub
from lora_hub.jsontext import strict_loads

from .conftest import SPEC

VECTORS = SPEC / "vectors"
MANIFEST = json.loads((VECTORS / "manifest.json").read_text())


@pytest.mark.parametrize("name, code", sorted(MANIFEST["invalid"].items()))
def test_invalid_vector_gives_its_code(name: str, code: str) -> None:
    with pytest.raises(lora_hub.InvalidAdapterError) as raised:
        lora_hub.read_header(VECTORS / name)
    assert raised.value.code == code, str(raised.value)
    assert raised.value.path == str(VECTORS / name)
    with pytest.raises(lora_hub.InvalidAdapterError) as again:
        lora_hub.load_adapter(VECTORS / name)
    assert again.value.code == code


@pytest.mark.parametrize("name, facts", sorted(MANIFEST["valid"].items()))
def test_valid_vector_reads_with_its_facts(name: str, facts: dict, tmp_path) -> None:
    adapter = lora_hub.load_adapter(VECTORS / name)
    assert len(adapter.tensors) == facts["tensor_count"]
    assert {m: s.to_dict() for m, s in adapter.modules.items()} == facts["modules"]
    assert list(adapter.config.modules_to_save) == facts.get("modules_to_save", [])
    for module, expected in facts.get("delta", {}).items():
        assert torch.equal(adapter.delta_weight(module, dtype=torch.float64),
                           torch.tensor(expected, dtype=torch.float64))
    resaved = lora_hub.save_adapter(adapter, tmp_path / "resaved.safetensors")
    if facts["canonical"]:
        assert resaved.read_bytes() == (VECTORS / name).read_bytes()
    else:
        assert lora_hub.load_adapter(resaved).modules == adapter.modules


def test_committed_vectors_are_what_the_script_makes(tmp_path) -> None:
    subprocess.run([sys.executable, str(VECTORS / "make_vectors.py"), str(tmp_path)], check=True)
    assert json.loads((tmp_path / "manifest.json").read_text()) == MANIFEST
    made = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    committed = sorted(p.relative_to(VECTORS) for p in VECTORS.rglob("*") if p.is_file() and p.suffix != ".py")
    assert made == committed
    for path in made:
        assert (tmp_path / path).read_bytes() == (VECTORS / path).read_bytes(), path


@pytest.mark.slow
def test_large_vectors_give_their_codes(tmp_path) -> None:
    subprocess.run([sys.executable, str(VECTORS / "make_vectors.py"), "--large", str(tmp_path)], check=True)
    large = json.loads((tmp_path / "manifest.json").read_text())["invalid_large"]
    assert large
    for name, code in large.items():
        with pytest.raises(lora_hub.InvalidAdapterError) as raised:
            lora_hub.read_header(tmp_path / name)
        assert raised.value.code == code


def test_every_error_code_in_the_spec_has_a_vector() -> None:
    spec_text = (SPEC / "FORMAT.md").read_text()
    codes = {cls.code for cls in vars(lora_hub).values()
             if isinstance(cls, type) and issubclass(cls, lora_hub.InvalidAdapterError)}
    codes.discard("INVALID_ADAPTER")
    covered = set(MANIFEST["invalid"].values()) | {"TOO_MANY_TENSORS"}  # the one vector too large to commit
    assert codes <= covered, codes - covered
    assert all(f"`{code}`" in spec_text for code in codes)


def test_config_schema_accepts_valid_configs_and_rejects_invalid_ones() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((SPEC / "config.schema.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    for name in MANIFEST["valid"]:
        config = strict_loads(lora_hub.read_safetensors_header(VECTORS / name).metadata["lora_hub.config"])
        assert not list(validator.iter_errors(config)), name
    schema_level = ["config_no_modules", "config_rank_zero", "config_rank_over_limit", "config_alpha_not_positive",
                    "config_bad_module_path"]
    for stem in schema_level:
        header = lora_hub.read_safetensors_header(VECTORS / "invalid" / f"{stem}.safetensors")
        assert list(validator.iter_errors(strict_loads(header.metadata["lora_hub.config"]))), stem


def test_vector_script_uses_no_lora_hub_code() -> None:
    source = (VECTORS / "make_vectors.py").read_text()
    assert not re.search(r"^\s*(import|from)\s+lora_hub", source, re.MULTILINE)
    namespace = runpy.run_path(str(VECTORS / "make_vectors.py"), run_name="not_main")
    assert not any(getattr(v, "__module__", "").startswith("lora_hub") for v in namespace.values())


def _table_keys(text: str, heading: str, first_column: str) -> set[str]:
    """The backquoted names in the first column of the table after `heading` whose header starts with
    `first_column`."""
    section = text.split(heading, 1)[1]
    start = section.index(f"| {first_column}")
    rows = []
    for line in section[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        rows.append(line.split("|")[1].strip())
    return {row.strip("`") for row in rows}


def test_the_config_keys_have_one_source() -> None:
    from lora_hub.adapter import BASE_MODEL_KEYS, CONFIG_KEYS, MODULE_KEYS

    schema = json.loads((SPEC / "config.schema.json").read_text())
    assert set(schema["properties"]) == CONFIG_KEYS
    assert set(schema["properties"]["base_model"]["properties"]) == BASE_MODEL_KEYS
    assert set(schema["$defs"]["module"]["properties"]) == MODULE_KEYS
    text = (SPEC / "FORMAT.md").read_text()
    assert _table_keys(text, "## 6. The config document", "key ") == CONFIG_KEYS
    assert _table_keys(text, "A module entry:", "key ") == MODULE_KEYS
    for key in BASE_MODEL_KEYS:
        assert f"`{key}`" in text.split("## 6. The config document", 1)[1].split("A module entry:")[0]
    adapter = lora_hub.load_adapter(VECTORS / "valid" / "plain_f32.safetensors")
    full = adapter.config.to_dict() | {"provenance": {}, "trainable_tokens": {}}  # written only when present
    assert set(full) == CONFIG_KEYS
    everything = lora_hub.ModuleSpec(r=1, alpha=1, in_features=2, out_features=2, kind="experts", experts=2,
                                     bias=True, dora=True, replaces_base=True).to_dict()
    assert set(everything) == MODULE_KEYS  # (not a valid combination: every key written)


def test_every_writer_produces_files_that_pass_the_strictest_profile(tmp_path, base_dirs) -> None:
    from lora_hub.testing import random_peft_adapter, tiny_model

    first = random_peft_adapter(tiny_model("llama"), tmp_path / "p1", seed=1)
    second = random_peft_adapter(tiny_model("llama"), tmp_path / "p2", seed=2, r=8, use_rslora=True)
    converted = lora_hub.convert_adapter(first, base=base_dirs["llama"])
    written = {
        "save_adapter": lora_hub.save_adapter(converted, tmp_path / "saved.safetensors"),
        "convert (cli)": tmp_path / "cli.safetensors",
        "to_peft": lora_hub.to_peft(converted, tmp_path / "peft") / "adapter_model.safetensors",
    }
    from click.testing import CliRunner
    from lora_hub_cli.main import cli

    result = CliRunner().invoke(cli, ["convert", str(first), "-o", str(written["convert (cli)"]), "--base",
                                      str(base_dirs["llama"])])
    assert result.exit_code == 0, result.output
    for method in ("cat", "svd", "ties", "linear_ab"):
        sources = [converted, lora_hub.convert_adapter(second, base=base_dirs["llama"])]
        if method == "linear_ab":
            sources[1] = lora_hub.convert_adapter(random_peft_adapter(tiny_model("llama"), tmp_path / "p3", seed=3),
                                                  base=base_dirs["llama"])
        options = {"svd": {"rank": 4}, "ties": {"rank": 4, "density": 0.5}}.get(method, {})
        combined = lora_hub.combine(sources, [0.6, 0.4], method=method, **options)
        written[f"combine {method}"] = lora_hub.save_adapter(combined, tmp_path / f"{method}.safetensors")
    for writer, path in written.items():
        report = lora_hub.validate(path, profile="lora-hub", level="full", base=base_dirs["llama"])
        assert report.ok and not report.warnings, (writer, report.findings)
