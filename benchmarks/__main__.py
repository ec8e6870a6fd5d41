"""``python -m benchmarks``: run the benchmarks and print the table (or JSON)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from benchmarks.config import SIZES
from benchmarks.report import table, to_json
from benchmarks.runner import FAMILIES, run


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="enclave_keys against the bare primitives and the eventsourcing library.",
    )
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument(
        "--only", action="append", choices=FAMILIES, help="run this family (repeatable)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--json-out", type=Path, help="also write the JSON report here")
    parser.add_argument("--workdir", type=Path, help="where scratch stores go (a real disk)")
    args = parser.parse_args(argv)

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    rows, meta = run(SIZES[args.size], args.only or FAMILIES, args.workdir, progress)
    if args.json_out is not None:
        args.json_out.write_text(to_json(rows, meta) + "\n")
    if args.json:
        print(to_json(rows, meta))
    else:
        print(table(rows, markdown=args.markdown))
        print(f"\n{meta}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
