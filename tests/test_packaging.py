"""The distribution: one wheel with the library, the CLI as lora_hub_cli (never a global `cli`), py.typed, and the
console script."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from .conftest import REPO


def test_wheel_holds_the_library_the_cli_and_the_console_script(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(REPO)], check=True)
    wheel = next(tmp_path.glob("lora_hub-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert tops == {"lora_hub", "lora_hub_cli"}
    for required in ("lora_hub/py.typed", "lora_hub_cli/main.py", "lora_hub_cli/commands.py"):
        assert required in names, required
    sources = {path.relative_to(REPO).as_posix() for path in (REPO / "lora_hub").rglob("*.py")}
    assert sources <= set(names), sorted(sources - set(names))
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "lora-hub = lora_hub_cli.main:main" in text
