"""The benchmark harness runs (`python -m benchmarks --quick`); it asserts nothing about speed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import REPO


@pytest.mark.slow
def test_quick_benchmarks_run_and_write_json(tmp_path) -> None:
    out = tmp_path / "results.json"
    result = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--json", str(out)], cwd=REPO,
                            capture_output=True, text=True, check=True, timeout=300)
    assert "lora-hub benchmarks" in result.stdout
    data = json.loads(out.read_text())
    assert data["machine"]["cores"] and data["results"]
    assert {row["suite"] for row in data["results"]} == {"validate", "runtime", "combine", "many"}
    names = " ".join(row["name"] for row in data["results"])
    for scenario in ("gpt2, fp32", "llama, int8", "8 adapters", "svd of two adapters", "64 adapters",
                     "from the host tier"):
        assert scenario in names, scenario
    assert all(row["ours"] > 0 for row in data["results"] if row["unit"] in ("ms", "MB/s", "x base"))
    assert all(row["ours"] == 0 for row in data["results"] if "drift" in row["name"])
