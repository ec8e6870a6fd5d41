"""Families 4 and 6: restart with many live rounds, and memory per live round.

One data directory is grown to each size in turn (1k, then 10k, then 100k live rounds:
requested and keyed, never completed), by a node on the deterministic runtime that
snapshots only when it stops. At each size:

* **restart**: the time ``Node.open`` takes on a stopped node's directory — open the
  store, unseal, load the snapshot, replay what follows it, hydrate every live round's
  key (unwrap under the KEK, into its context), start the Pykka actors, run the recovery
  sweep. The baseline reads the same number of wrapped keys with a raw LMDB cursor,
  decrypts each with raw AES-GCM and builds its ``AESGCM`` object;
* **memory**: in a fresh subprocess (:mod:`benchmarks.memory_child`), the growth of
  resident memory when a node over the directory starts, divided by the live rounds,
  against a subprocess that holds the bare minimum per round (its id, 32 key bytes and
  an ``AESGCM`` object).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Final

from benchmarks.config import Sizes
from benchmarks.harness import Row, Target, median_seconds, timed
from benchmarks.nodes import NodeOpener, request_all, round_ids
from benchmarks.raw import RawLog, generate_key, new_aead, unwrap_key, wrap_key
from benchmarks.workdir import Workdir
from enclave_keys.node import Node

__all__ = ["run_live"]

HYDRATE_TARGET: Final = Target(0.5, kind="at_most")
HYDRATE_TARGET_SIZE: Final = 10_000
MEMORY_TARGET: Final = Target(4096, kind="at_most")
_BUDGET: Final = 300_000  # live rounds hydrated over all repeats of one size
_NO_SNAPSHOTS: Final = 10**12


class LiveDir:
    """A node directory holding ``count`` live rounds, grown on demand."""

    def __init__(self, opener: NodeOpener, path: Path) -> None:
        self.opener = opener
        self.path = path
        self.count = 0

    def grow(self, count: int) -> None:
        if count <= self.count:
            return
        node = self.opener.open(self.path, "deterministic", snapshot_every=_NO_SNAPSHOTS)
        try:
            request_all(node, round_ids(self.count, count))
        finally:
            node.stop()
        self.count = count


def _restart(live: LiveDir, repeats: int) -> tuple[float, int]:
    """Median seconds of ``Node.open`` over the directory; events replayed (last open)."""
    replayed = 0

    def once() -> float:
        nonlocal replayed
        opened: list[Node] = []
        seconds = timed(lambda: opened.append(live.opener.open(live.path)))
        node = opened[0]
        try:
            hydrated = len(node.recovery.hydrated)
            replayed = node.recovery.replayed
        finally:
            node.stop()
        if hydrated != live.count:
            raise RuntimeError(f"hydrated {hydrated} rounds, expected {live.count}")
        return seconds

    return median_seconds(once, repeats), replayed


def _bare_hydrate(work: Workdir, count: int, repeats: int) -> float:
    kek = new_aead(generate_key())
    items = [(rid.to_bytes(), b"") for rid in round_ids(0, count)]
    items = [(name, wrap_key(kek, generate_key(), name)) for name, _ in items]
    with work.scratch("bare-hydrate") as path:
        log = RawLog(path)
        try:
            log.put_keys(items)

            def once() -> float:
                return timed(lambda: {k: unwrap_key(kek, b, k) for k, b in log.read_keys()})

            return median_seconds(once, repeats)
        finally:
            log.close()


def _child(args: list[str], secret: bytes = b"") -> dict[str, float]:
    """Run :mod:`benchmarks.memory_child` and read its JSON answer."""
    root = str(Path(__file__).resolve().parent.parent)  # where ``benchmarks`` is importable
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory_child", *args],
        input=secret.hex().encode(),
        capture_output=True,
        check=True,
        timeout=1800,
        env={**os.environ, "PYTHONPATH": path, "PYTHONHASHSEED": "0"},
    )
    answer: dict[str, float] = json.loads(done.stdout)
    return answer


def _memory_rows(live: LiveDir, work: Workdir) -> Row:
    with live.opener.master.borrow() as view:
        secret = bytes(view)
    with work.scratch("memory-empty") as empty:
        ours = _child(["node", str(live.path), str(live.count), str(empty)], secret)
    bare = _child(["bare", str(live.count)])
    return Row(
        "memory",
        "resident memory per live round",
        live.count,
        "B/round",
        ours["per_round"],
        "round id + key + AESGCM object",
        bare["per_round"],
        MEMORY_TARGET,
        notes={"rss_before": ours["before"], "rss_after": ours["after"]},
    )


def run_live(sizes: Sizes, work: Workdir, *, restart: bool, memory: bool) -> list[Row]:
    rows: list[Row] = []
    opener = NodeOpener()
    try:
        live = LiveDir(opener, work.fresh("live"))
        for count in sizes.live:
            live.grow(count)
            if restart:
                repeats = sizes.repeats_for(count, _BUDGET)
                seconds, replayed = _restart(live, repeats)
                rows.append(
                    Row(
                        "restart",
                        "restart: Node.open, hydrating every live round",
                        count,
                        "s",
                        seconds,
                        "raw cursor + AES-GCM unwrap",
                        _bare_hydrate(work, count, repeats),
                        HYDRATE_TARGET if count == HYDRATE_TARGET_SIZE else None,
                        notes={"replayed_events": replayed},
                    )
                )
            if memory:
                rows.append(_memory_rows(live, work))
    finally:
        opener.close()
    return rows
