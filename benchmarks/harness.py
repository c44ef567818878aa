"""Measuring: medians of interleaved runs after a warm-up, peak resident memory of a child process, the machine
and versions a table was produced on, and the table itself."""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import date


@dataclass
class Row:
    """One line of the results table: a measurement of lora-hub and, where there is one, of the reference."""

    suite: str
    name: str
    ours: float
    unit: str
    reference: float | None = None
    reference_name: str | None = None
    lower_is_better: bool = True

    @property
    def ratio(self) -> float | None:
        """How many times better lora-hub is than the reference (above 1 is better)."""
        if self.reference is None or self.ours == 0:
            return None
        return self.reference / self.ours if self.lower_is_better else self.ours / self.reference


def interleaved_medians(runs: Sequence[Callable[[], object]], *, repeats: int, warmup: int = 1) -> list[float]:
    """Seconds per call of each function: after `warmup` rounds, `repeats` rounds that call each function in turn,
    so that drift in the machine's state affects them alike. Returns the median of each."""
    return interleaved_timings([lambda run=run: timed(run) for run in runs], repeats=repeats, warmup=warmup)


def interleaved_timings(runs: Sequence[Callable[[], float]], *, repeats: int, warmup: int = 1) -> list[float]:
    """Medians of interleaved runs of functions that time their own core section (excluding their set-up and
    tear-down) and return the seconds it took."""
    for _ in range(warmup):
        for run in runs:
            run()
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for index, run in enumerate(runs):
            times[index].append(run())
    return [statistics.median(t) for t in times]


def timed(function: Callable[[], object]) -> float:
    """Seconds one call takes, with the cyclic garbage collector paused during the call, as timeit does: otherwise a
    collection of the garbage that the previous measurement (often the other library's) left is timed as part of
    this one."""
    gc.disable()
    try:
        start = time.perf_counter()
        function()
        return time.perf_counter() - start
    finally:
        gc.enable()


def peak_memory_added(code: str, *, setup: str = "") -> int:
    """Bytes of peak resident memory that `code` adds in a fresh Python process, over the resident memory after
    `setup`. On Linux the peak is reset just before `code` (/proc/self/clear_refs), so import-time peaks do not hide
    it; elsewhere it falls back to the process's lifetime peak."""
    script = (
        "import json, resource\n"
        f"{setup}\n"
        "def rss():\n"
        "    try:\n"
        "        for line in open('/proc/self/status'):\n"
        "            if line.startswith(('VmHWM', 'VmRSS')):\n"
        "                yield int(line.split()[1]) * 1024\n"
        "    except OSError:\n"
        "        yield resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
        "try:\n"
        "    open('/proc/self/clear_refs', 'w').write('5')\n"
        "except OSError:\n"
        "    pass\n"
        "before = max(rss())\n"
        f"{code}\n"
        "print(json.dumps(max(rss()) - before))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
    return int(json.loads(result.stdout.strip().splitlines()[-1]))


def machine() -> dict[str, str]:
    import peft
    import safetensors
    import torch
    import transformers

    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "date": date.today().isoformat(),
        "cpu": model,
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "safetensors": safetensors.__version__,
    }


def print_table(rows: Sequence[Row], info: dict[str, str]) -> None:
    print(f"lora-hub benchmarks, {info['date']}, {info['cpu']} ({info['cores']} cores), torch {info['torch']}, "
          f"peft {info['peft']}")
    header = f"{'suite':<12} {'measurement':<44} {'lora-hub':>14} {'reference':>14}  {'ratio':>7}  reference is"
    print(header)
    print("-" * len(header))
    for row in rows:
        ref = f"{row.reference:,.3f} {row.unit}" if row.reference is not None else "-"
        ratio = f"{row.ratio:,.1f}x" if row.ratio is not None else "-"
        print(f"{row.suite:<12} {row.name:<44} {f'{row.ours:,.3f} {row.unit}':>14} {ref:>14}  {ratio:>7}  "
              f"{row.reference_name or ''}")


def write_json(path: str, rows: Sequence[Row], info: dict[str, str]) -> None:
    with open(path, "w") as f:
        json.dump({"machine": info, "results": [{**asdict(r), "ratio": r.ratio} for r in rows]}, f, indent=2)
