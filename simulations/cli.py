"""``python -m simulations`` (also ``enclave-keys simulate``): run a seeded scenario.

N nodes, each with its own LMDB directory and master key, form committees for M rounds
with a configurable mix of outcomes (complete; a timeout at some stage; misbehaviour
then completion; terminal events lost, so only the deadline reaper ends the round).
Nodes crash and restart at random points, KEKs are rotated, terminal events arrive late,
twice or out of order. The invariants of the design (§7) are checked during and after
the run. The same seed gives byte-identical event logs: compare the printed log hash.

Exit status: 0 when every invariant holds; 1 on a violation (the seed, a shrunk
reproducing command and the offending round's event trace are printed); 2 on a usage
error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from enclave_keys.errors import EnclaveKeysError
from simulations.config import DEFAULT_MIX, SimConfig, parse_mix
from simulations.faults import FAULTS
from simulations.report import ProgressBar, make_plots, markdown_report, text_report
from simulations.runner import SimResult, Simulation
from simulations.shrink import shrink


def _rounds_list(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


def parser(prog: str = "python -m simulations") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[1],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = SimConfig()
    p.add_argument(
        "--data-dir", type=Path, default=d.data_dir, help="cleared, then one dir per node"
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--nodes", type=int, default=d.nodes)
    p.add_argument("--rounds", type=int, default=d.rounds)
    p.add_argument("--committee", type=int, default=d.committee, help="nodes per round")
    p.add_argument("--threshold", type=int, default=d.threshold)
    p.add_argument(
        "--mix",
        type=parse_mix,
        default=",".join(f"{k}={v}" for k, v in DEFAULT_MIX.items()),
        help="outcome weights (complete, timeout, misbehaviour, lost)",
    )
    p.add_argument("--runtime", choices=("deterministic", "pykka"), default=d.runtime)
    p.add_argument("--crash-every", type=float, default=d.crash_every, help="mean s; 0 = none")
    p.add_argument("--rotate-every", type=float, default=d.rotate_every, help="mean s; 0 = none")
    p.add_argument("--duplicate", type=float, default=d.duplicate, help="P(terminal twice)")
    p.add_argument("--late", type=float, default=d.late, help="P(terminal after the reaper)")
    p.add_argument("--reorder", type=float, default=d.reorder, help="P(last two swapped)")
    p.add_argument("--only-rounds", type=_rounds_list, default=None, help="e.g. 3,17")
    p.add_argument("--fault", choices=sorted(FAULTS), default=None, help="break a core on purpose")
    p.add_argument("--report", type=Path, default=None, help="default: DATA_DIR/report.md")
    p.add_argument("--progress", action="store_true", help="progress bar even without a tty")
    p.add_argument("--no-shrink", action="store_true", help="on a violation, do not shrink")
    return p


def config_from(args: argparse.Namespace) -> SimConfig:
    return SimConfig(
        seed=args.seed,
        nodes=args.nodes,
        rounds=args.rounds,
        committee=args.committee,
        threshold=args.threshold,
        mix=args.mix,
        runtime=args.runtime,
        data_dir=args.data_dir,
        crash_every=args.crash_every,
        rotate_every=args.rotate_every,
        duplicate=args.duplicate,
        late=args.late,
        reorder=args.reorder,
        only_rounds=args.only_rounds,
        fault=args.fault,
    )


def main(argv: Sequence[str] | None = None, *, prog: str = "python -m simulations") -> int:
    args = parser(prog).parse_args(argv)
    try:
        config = config_from(args)
        progress = ProgressBar() if args.progress or sys.stderr.isatty() else None
        result = Simulation(config, progress=progress).run()
        return _report(result, args, prog)
    except EnclaveKeysError as exc:
        print(f"{prog}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


def _report(result: SimResult, args: argparse.Namespace, prog: str) -> int:
    shrunk = result
    if not result.ok and not args.no_shrink:
        print(f"VIOLATION with seed {result.config.seed}: {result.violations[0]}")
        print("shrinking ...", flush=True)
        shrunk = shrink(result, result.config.data_dir / "shrink", log=print)
    reproduce = ["python -m simulations", *shrunk.config.reproduce_args()]
    report_path = args.report or result.config.data_dir / "report.md"
    report_path.parent.mkdir(parents=True, exist_ok=True)
    plots = make_plots(result, report_path.parent)
    report_path.write_text(markdown_report(result, plots, reproduce, shrunk.trace))
    for line in text_report(result):
        print(line)
    print(f"report: {report_path}" + (f" (+ {len(plots)} plots)" if plots else " (no plots)"))
    if result.ok:
        return 0
    print()
    print(f"VIOLATION with seed {result.config.seed}:")
    for violation in result.violations:
        print(f"  {violation}")
    print("shortest reproduction found:")
    print("  " + " ".join(reproduce))
    print(f"  ({len(shrunk.scenario.plans)} round(s); violation: {shrunk.violations[0]})")
    print("event trace of the offending round:")
    for line in shrunk.trace:
        print("  " + line)
    return 1
