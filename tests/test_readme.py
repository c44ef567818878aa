"""README.md's examples run, and its test line is the one CI runs."""

from __future__ import annotations

import re

from .conftest import REPO

README = (REPO / "README.md").read_text()


def test_python_examples_run(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", README, re.DOTALL)
    assert len(blocks) >= 2
    namespace = {"__name__": "readme"}  # the blocks run in order, like a reader running them in one session
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert (tmp_path / "peft-again" / "adapter_config.json").is_file()


def test_ci_runs_the_readme_test_line() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    line = re.search(r"^TEST_LINE='(.*)'$", ci, re.MULTILINE).group(1)
    assert f"\n{line}\n" in README
    assert "pytest" in line and "pip install -e" in line
    assert re.search(r"^python3 -m venv .*pip install \. && lora-hub demo$", README, re.MULTILINE)
