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
