"""Where the time goes: one workload under ``cProfile``, top functions with percentages.

``python -m benchmarks.profiling append|replay|restart|lifecycle [--count N] [--top K]``

* ``append``: ``count`` lifecycle events through ``EventBus.commit``, groups of 256;
* ``replay``: ``store.read_events()`` over a log of ``count`` lifecycle events;
* ``restart``: ``Node.open`` over a stopped node with ``count`` live rounds;
* ``lifecycle``: ``count`` rounds requested, keyed, completed and purged on the
  *deterministic* runtime — the same cores and store in one thread, so ``cProfile`` sees
  all of it. On Pykka the work is spread over actor threads: sample those with
  ``py-spy record --threads --idle -- python -m benchmarks --only lifecycle``.

Percentages are of the profiled call's total; ``self`` is time in the function's own
code, ``total`` includes what it calls.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from benchmarks.dataset import lifecycle_events, requests_of
from benchmarks.log_bench import append_ours
from benchmarks.nodes import NodeOpener, complete_all, quiet_logs, request_all, round_ids
from enclave_keys.store import LmdbStore

__all__ = ["main", "top_functions"]

Line = tuple[str, float, float, float, float]


def _profiled(work: Callable[[], object]) -> pstats.Stats:
    profiler = cProfile.Profile()
    profiler.runcall(work)
    return pstats.Stats(profiler)


def top_functions(stats: pstats.Stats, top: int) -> tuple[float, list[Line]]:
    """(total seconds, [(function, self s, self %, total s, total %)]) by self time."""
    table: dict[tuple[str, int, str], tuple[int, int, float, float, object]]
    table = stats.stats  # type: ignore[attr-defined]
    total = max(sum(entry[2] for entry in table.values()), 1e-9)
    lines = [
        (f"{Path(file).name}:{line}({name})", tt, 100 * tt / total, ct, 100 * ct / total)
        for (file, line, name), (_, _, tt, ct, _) in table.items()
    ]
    lines.sort(key=lambda line: line[1], reverse=True)
    return total, lines[:top]


def _append(base: Path, count: int) -> pstats.Stats:
    requests = requests_of(lifecycle_events(count))
    return _profiled(lambda: append_ours(base / "log", requests, 256))


def _replay(base: Path, count: int) -> pstats.Stats:
    append_ours(base / "log", requests_of(lifecycle_events(count)), 256)
    with LmdbStore.open(base / "log") as store:
        return _profiled(lambda: sum(1 for _ in store.read_events()))


def _restart(base: Path, count: int) -> pstats.Stats:
    opener = NodeOpener()
    try:
        node = opener.open(base / "node", "deterministic", snapshot_every=10**12)
        request_all(node, round_ids(0, count))
        node.stop()
        opened = []
        stats = _profiled(lambda: opened.append(opener.open(base / "node")))
        opened[0].stop()
        return stats
    finally:
        opener.close()


def _lifecycle(base: Path, count: int) -> pstats.Stats:
    opener = NodeOpener()
    try:
        node = opener.open(base / "node", "deterministic")
        rids = round_ids(0, count)

        def cycle() -> None:
            request_all(node, rids)
            complete_all(node, rids)

        stats = _profiled(cycle)
        node.stop()
        return stats
    finally:
        opener.close()


WORKLOADS: dict[str, Callable[[Path, int], pstats.Stats]] = {
    "append": _append,
    "replay": _replay,
    "restart": _restart,
    "lifecycle": _lifecycle,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profiling", description=__doc__)
    parser.add_argument("workload", choices=sorted(WORKLOADS))
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    quiet_logs()
    with tempfile.TemporaryDirectory(prefix="enclave-profile-") as tmp:
        stats = WORKLOADS[args.workload](Path(tmp), args.count)
    total, lines = top_functions(stats, args.top)
    print(f"{args.workload}, {args.count:,}: {total:.3f} s profiled (cProfile inflates this)")
    print(f"{'self %':>7} {'self s':>8} {'total %':>8}  function")
    for name, tt, tt_pct, _, ct_pct in lines:
        print(f"{tt_pct:6.1f}% {tt:8.3f} {ct_pct:7.1f}%  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
