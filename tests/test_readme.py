"""README.md's and docs/python.md's examples run, docs/cli.md is what the commands say, and README's test line is
the one CI runs."""

from __future__ import annotations

import re

import pytest

from .conftest import REPO

README = (REPO / "README.md").read_text()


@pytest.mark.parametrize("page", ["README.md", "docs/python.md"])
def test_python_examples_run(page: str, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", (REPO / page).read_text(), re.DOTALL)
    assert blocks
    namespace = {"__name__": "readme"}  # the blocks run in order, like a reader running them in one session
    for block in blocks:
        exec(compile(block, page, "exec"), namespace)
    assert (tmp_path / "peft-again" / "adapter_config.json").is_file()


def test_the_cli_reference_is_what_the_commands_say() -> None:
    from lora_hub_cli.reference import reference_markdown

    assert (REPO / "docs" / "cli.md").read_text() == reference_markdown(), \
        "regenerate docs/cli.md: python -m lora_hub_cli.reference > docs/cli.md"


def test_the_front_door_links_to_pages_that_exist() -> None:
    for target in re.findall(r"\]\(([^)#]+)\)", README):
        if not target.startswith("http"):
            assert (REPO / target).exists(), target
    for page in (REPO / "docs").glob("*.md"):
        for target in re.findall(r"\]\(([^)#]+)\)", page.read_text()):
            if not target.startswith("http"):
                assert (page.parent / target).exists(), (page.name, target)


def test_ci_runs_the_readme_test_line() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    line = re.search(r"^TEST_LINE='(.*)'$", ci, re.MULTILINE).group(1)
    assert f"\n{line}\n" in README
    assert "pytest" in line and "pip install -e" in line
    assert re.search(r"^python3 -m venv .*pip install \. && lora-hub demo$", README, re.MULTILINE)
