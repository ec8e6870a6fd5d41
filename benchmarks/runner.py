"""Which benchmark families exist and how one run goes through them."""

from __future__ import annotations

import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

from benchmarks import peer
from benchmarks.config import Sizes
from benchmarks.harness import Row
from benchmarks.lifecycle import run_lifecycle
from benchmarks.live import run_live
from benchmarks.log_bench import run_append, run_replay
from benchmarks.nodes import quiet_logs
from benchmarks.ratchet import run_ratchet
from benchmarks.seal import run_seal
from benchmarks.workdir import Workdir

__all__ = ["FAMILIES", "run"]

FAMILIES: Final = ("append", "replay", "lifecycle", "restart", "seal", "memory", "ratchet")


def _steps(sizes: Sizes, work: Workdir, only: set[str]) -> list[Callable[[], list[Row]]]:
    steps: list[Callable[[], list[Row]]] = []
    if "append" in only:
        steps.append(lambda: run_append(sizes, work))
    if "replay" in only:
        steps.append(lambda: run_replay(sizes, work))
    if "lifecycle" in only:
        steps.append(lambda: run_lifecycle(sizes, work))
    if "seal" in only:
        steps.append(lambda: run_seal(sizes))
    if "ratchet" in only:
        steps.append(lambda: run_ratchet(sizes, work))
    if only & {"restart", "memory"}:
        steps.append(
            lambda: run_live(sizes, work, restart="restart" in only, memory="memory" in only)
        )
    return steps


def run(
    sizes: Sizes,
    only: Sequence[str] = FAMILIES,
    workdir: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[Row], dict[str, object]]:
    """Run the selected families; every row, and what describes the run."""
    quiet_logs()
    base = Path(tempfile.mkdtemp(prefix="enclave-bench-", dir=workdir))
    started = time.perf_counter()
    rows: list[Row] = []
    try:
        work = Workdir(base)
        for step in _steps(sizes, work, set(only)):
            produced = step()
            rows += produced
            if progress is not None and produced:
                progress(f"{produced[0].family}: {len(produced)} rows")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    meta: dict[str, object] = {
        "size": sizes.name,
        "repeats": sizes.repeats,
        "seconds": round(time.perf_counter() - started, 1),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "peer": "eventsourcing" if peer.AVAILABLE else "not installed",
    }
    return rows, meta
