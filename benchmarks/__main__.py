"""python -m benchmarks [--quick] [--json PATH]: run every suite, print the table of medians and ratios."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from . import combination, many, runtime, validation
from .harness import machine, print_table, write_json

SUITES = {"validate": validation.run, "runtime": runtime.run, "combine": combination.run, "many": many.run}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats; asserts nothing")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--only", choices=sorted(SUITES), action="append", help="run only these suites")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="lora-hub-bench-") as tmp:
        for name in args.only or SUITES:
            rows += SUITES[name](Path(tmp), quick=args.quick)
    info = machine()
    print_table(rows, info)
    if args.json:
        write_json(args.json, rows, info)


if __name__ == "__main__":
    main()
