"""Family 3: the round lifecycle through real Pykka actors, durable.

``count`` rounds are requested (publishes of 256), run until every one is keyed — key
generated, wrapped, stored durably, in its context, keyshare sealed — then completed
until every key is purged (deleted, wiped, context closed). Rounds per second over the
whole cycle. The baselines are the bare per-round work: an AES-256 key generated, wrapped
(one AES-GCM encryption of 32 bytes), put into LMDB and deleted from it — once with puts
and deletes grouped 256 to a durable transaction (as the node's group commit writes them),
once with one durable transaction each; the table also shows each primitive alone.

The *steady-state* row runs the largest size again, 100 rounds live at a time, in a node
restarted from a snapshot that remembers as many ended rounds as its cores keep (the
default horizon): what a node that has been up a while does. Two costs that grow with a
node's history — forgetting the oldest ended round, and snapshots full of remembered
rounds — only show there (and in the horizon row).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from benchmarks.config import Sizes
from benchmarks.harness import Row, Target, median_seconds, timed
from benchmarks.nodes import NodeOpener, complete_all, request_all, round_ids
from benchmarks.raw import RawLog, generate_key, new_aead, wrap_key
from benchmarks.workdir import Workdir
from enclave_keys.core_state import DEFAULT_HORIZON, RecentRounds
from enclave_keys.ids import RoundId
from enclave_keys.snapshot import NodeSnapshot
from enclave_keys.store import LmdbStore

__all__ = ["run_lifecycle"]

LIFECYCLE_TARGET: Final = Target(5_000)
GROUP: Final = 256  # keys per transaction in the grouped baseline (the bus's publish size)
GROUPED_PUT: Final = f"LMDB put, durable, in groups of {GROUP} (per key)"
GROUPED_DELETE: Final = f"LMDB delete, durable, in groups of {GROUP} (per key)"
_BUDGET: Final = 3_000  # rounds over all repeats of one size


def _cycle(opener: NodeOpener, work: Workdir, count: int) -> tuple[float, float]:
    """(seconds requested->keyed, seconds complete->purged) for ``count`` fresh rounds."""
    with work.scratch("lifecycle") as path:
        node = opener.open(path)
        try:
            rids = round_ids(0, count)
            keyed = timed(lambda: request_all(node, rids))
            purged = timed(lambda: complete_all(node, rids))
            if node.store.key_count() != 0 or node.router.open_rounds():
                raise RuntimeError("rounds left keyed after the lifecycle")
        finally:
            node.stop()
    return keyed, purged


STEADY_LIVE: Final = 100  # rounds live at a time in the steady-state run
# Each core's snapshot lists of the ended rounds it remembers (the round cipher's are
# rebuilt at start, not snapshotted).
_REMEMBERED: Final = {
    "router": ("completed",),
    "reaper": ("completed", "requested"),
    "keyshare": ("ended",),
}


def _as_if_seasoned(path: Path, ended: int) -> None:
    """Make the stopped node at ``path`` restart as one that has ended ``ended`` rounds:
    its newest snapshot gets that many ended round ids in each core's memory of them."""
    with LmdbStore.open(path) as store:
        latest = store.latest_snapshot()
        if latest is None:
            raise RuntimeError("the node wrote no snapshot on stop")
        snapshot = NodeSnapshot.from_bytes(latest[1])
        old = [f"ended:{n}" for n in range(ended)]
        for core, fields in _REMEMBERED.items():
            for name in fields:
                snapshot.cores[core][name] = old + snapshot.cores[core][name]
        store.put_snapshot(latest[0], snapshot.to_bytes())


def _steady_cycle(opener: NodeOpener, work: Workdir, count: int) -> float:
    """Seconds for ``count`` rounds, ``STEADY_LIVE`` live at a time, in a node that has
    already ended as many rounds as its cores remember (the default horizon)."""
    with work.scratch("steady") as path:
        opener.open(path).stop()
        _as_if_seasoned(path, DEFAULT_HORIZON)
        node = opener.open(path)
        try:
            rids = round_ids(0, count)

            def cycle() -> None:
                for i in range(0, count, STEADY_LIVE):
                    request_all(node, rids[i : i + STEADY_LIVE])
                    complete_all(node, rids[i : i + STEADY_LIVE])

            return timed(cycle)
        finally:
            node.stop()


def _per_op(
    ops: int, repeats: int, op: Callable[[int], object], setup: Callable[[], object] | None = None
) -> float:
    """Median seconds of one call of ``op`` (over ``ops`` calls per repeat, each repeat
    after an untimed ``setup``)."""

    def run() -> float:
        if setup is not None:
            setup()
        start = time.perf_counter()
        for i in range(ops):
            op(i)
        return (time.perf_counter() - start) / ops

    return median_seconds(run, repeats)


def primitives(sizes: Sizes, work: Workdir) -> dict[str, float]:
    """Median seconds per call of each bare primitive a round needs."""
    ops, repeats = sizes.primitive_ops, sizes.repeats
    kek = new_aead(generate_key())
    key = generate_key()
    aad = os.urandom(40)
    with work.scratch("primitives") as path:
        log = RawLog(path)
        try:
            blob = wrap_key(kek, key, aad)
            names = [i.to_bytes(8, "big") for i in range(ops)]
            size = min(GROUP, len(names))  # full groups only, so the cost per key is exact
            groups = [names[i : i + size] for i in range(0, len(names) - size + 1, size)]
            costs = {
                "key generation": _per_op(ops, repeats, lambda _: generate_key()),
                "wrap (AES-GCM, 32 B)": _per_op(ops, repeats, lambda _: wrap_key(kek, key, aad)),
                "LMDB put, durable": _per_op(ops, repeats, lambda i: log.put_key(names[i], blob)),
                "LMDB delete, durable": _per_op(
                    ops,
                    repeats,
                    lambda i: log.delete_key(names[i]),
                    setup=lambda: log.put_keys([(name, blob) for name in names]),
                ),
                GROUPED_PUT: _per_op(
                    len(groups),
                    repeats,
                    lambda g: log.put_keys([(name, blob) for name in groups[g]]),
                )
                / size,
                GROUPED_DELETE: _per_op(
                    len(groups),
                    repeats,
                    lambda g: log.delete_keys(groups[g]),
                    setup=lambda: log.put_keys([(name, blob) for name in names]),
                )
                / size,
            }
        finally:
            log.close()
    return costs


def _ended_rounds_row(sizes: Sizes) -> Row:
    """Each core remembers the ended rounds up to a horizon (``RecentRounds``); once a node
    has seen more rounds than that, every round ended also forgets the oldest. Measured
    at the default horizon, full, against adding to a plain dict."""
    horizon = DEFAULT_HORIZON
    older = [RoundId(f"old:{n}") for n in range(horizon)]
    # As many adds as the horizon: a plain dict's deleted entries pile up at its front
    # until a resize compacts it, so fewer adds would not show a full cycle of that.
    newer = [RoundId(f"new:{n}") for n in range(horizon)]

    def per_add(add: Callable[[RoundId], object]) -> float:
        start = time.perf_counter()
        for rid in newer:
            add(rid)
        return (time.perf_counter() - start) / len(newer)

    def recent() -> float:
        return per_add(RecentRounds(horizon, older).add)

    def plain() -> float:
        known = dict.fromkeys(older)
        return per_add(lambda rid: known.setdefault(rid))

    return Row(
        "lifecycle",
        f"round ended at the full horizon ({horizon:,} remembered)",
        len(newer),
        "us/op",
        median_seconds(recent, sizes.repeats) * 1e6,
        "dict insert",
        median_seconds(plain, sizes.repeats) * 1e6,
    )


def run_lifecycle(sizes: Sizes, work: Workdir) -> list[Row]:
    costs = primitives(sizes, work)
    crypto = costs["key generation"] + costs["wrap (AES-GCM, 32 B)"]
    one_by_one = 1.0 / (crypto + costs["LMDB put, durable"] + costs["LMDB delete, durable"])
    grouped = 1.0 / (crypto + costs[GROUPED_PUT] + costs[GROUPED_DELETE])
    rows = [
        Row("lifecycle", f"bare primitive: {name}", 1, "us/op", seconds * 1e6)
        for name, seconds in costs.items()
    ]
    rows.append(_ended_rounds_row(sizes))
    opener = NodeOpener()
    try:
        for count in sizes.rounds:
            runs = [_cycle(opener, work, count) for _ in range(sizes.repeats_for(count, _BUDGET))]
            total = statistics.median(k + p for k, p in runs)
            notes = {
                "keyed_rounds_per_s": count / statistics.median(k for k, _ in runs),
                "purged_rounds_per_s": count / statistics.median(p for _, p in runs),
            }
            rows += [
                Row(
                    "lifecycle",
                    "rounds requested -> keyed -> purged (Pykka)",
                    count,
                    "rounds/s",
                    count / total,
                    baseline_name,
                    baseline,
                    target,
                    notes=notes,
                )
                for baseline_name, baseline, target in (
                    (f"keygen+wrap, put+delete in groups of {GROUP}", grouped, LIFECYCLE_TARGET),
                    ("keygen+wrap+put+delete, a commit each", one_by_one, None),
                )
            ]
        count = max(sizes.rounds)
        steady = [
            _steady_cycle(opener, work, count) for _ in range(sizes.repeats_for(count, _BUDGET))
        ]
        rows.append(
            Row(
                "lifecycle",
                f"steady state: {DEFAULT_HORIZON:,} rounds ended before, {STEADY_LIVE} live"
                " at a time (Pykka)",
                count,
                "rounds/s",
                count / statistics.median(steady),
                f"keygen+wrap, put+delete in groups of {GROUP}",
                grouped,
                LIFECYCLE_TARGET,
            )
        )
    finally:
        opener.close()
    return rows
