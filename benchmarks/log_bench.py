"""Families 1 and 2: durable append with group commit, and replay, over the event log.

Ours appends the way the node's bus does (``EventBus.commit``: one publish request per
event, ``batch`` requests per group, each group one ``store.write()`` — stamp, encode,
one durable LMDB commit). The baselines append the same number of events in the same
batches: raw LMDB ``putmulti`` of the same msgpack bytes, and the peer library.

Replay decodes the whole log with ``store.read_events()`` (strict decoding, typed
events), against a raw LMDB cursor plus ``msgpack.unpackb``, and against reading the
peer's notification log.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final, TypeVar

from benchmarks import peer
from benchmarks.config import Sizes
from benchmarks.dataset import Published, lifecycle_events, requests_of, stamped
from benchmarks.harness import Row, Target, median_seconds, timed
from benchmarks.raw import RawLog
from benchmarks.workdir import Workdir
from enclave_keys.bus import EventBus, PublishRequest
from enclave_keys.clock import SystemClock
from enclave_keys.store import LmdbStore

__all__ = ["run_append", "run_replay"]

APPEND_TARGET: Final = Target(50_000)
PEER_TARGET: Final = Target(20, on="ratio")
REPLAY_TARGET: Final = Target(300_000)
_BUDGET: Final = 500_000  # events over all repeats of one size
T = TypeVar("T")


def _chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _each(append: Callable[[Sequence[T]], None], groups: Sequence[Sequence[T]]) -> None:
    for group in groups:
        append(group)


def append_ours(path: Path, requests: Sequence[PublishRequest], batch: int) -> float:
    """Seconds to append every request through the bus, ``batch`` per group commit."""
    with LmdbStore.open(path) as store:
        bus = EventBus(store, SystemClock())
        bus.start()
        groups = [requests[i : i + batch] for i in range(0, len(requests), batch)]

        def work() -> None:
            for group in groups:
                for outcome in bus.commit(group):
                    if outcome.error is not None:
                        raise outcome.error

        return timed(work)


def append_raw(path: Path, encoded: Sequence[bytes], batch: int) -> float:
    log = RawLog(path)
    try:
        return timed(lambda: _each(log.append, _chunks(encoded, batch)))
    finally:
        log.close()


def append_peer(path: Path, events: Sequence[Published], batch: int) -> float:
    log = peer.PeerLog(path)
    try:
        groups = _chunks(log.prepare(events), batch)  # our events in the peer's terms, untimed
        return timed(lambda: _each(log.append, groups))
    finally:
        log.close()


def _median_rate(count: int, repeats: int, run: Callable[[], float]) -> float:
    return count / median_seconds(run, repeats)


def _append_rows(sizes: Sizes, work: Workdir, count: int) -> list[Row]:
    events = lifecycle_events(count)
    requests = requests_of(events)
    encoded = stamped(events)
    repeats = sizes.repeats_for(count, _BUDGET)

    def ours() -> float:
        with work.scratch("append-ours") as path:
            return append_ours(path, requests, sizes.batch)

    def raw() -> float:
        with work.scratch("append-raw") as path:
            return append_raw(path, encoded, sizes.batch)

    def other() -> float:
        with work.scratch("append-peer") as path:
            return append_peer(path, events, sizes.batch)

    mine = _median_rate(count, repeats, ours)
    label = f"durable append, groups of {sizes.batch}"
    rows = [
        Row(
            "append",
            label,
            count,
            "ev/s",
            mine,
            "raw LMDB putmulti",
            _median_rate(count, repeats, raw),
            APPEND_TARGET,
        )
    ]
    if peer.AVAILABLE:
        theirs = _median_rate(count, repeats, other)
        rows.append(
            Row(
                "append",
                label,
                count,
                "ev/s",
                mine,
                "eventsourcing SQLite+AES",
                theirs,
                PEER_TARGET,
            )
        )
    return rows


def run_append(sizes: Sizes, work: Workdir) -> list[Row]:
    return [row for count in sizes.events for row in _append_rows(sizes, work, count)]


def _replay_rows(sizes: Sizes, base: Path, count: int) -> list[Row]:
    events = lifecycle_events(count)
    repeats = sizes.repeats_for(count, _BUDGET)
    label = "replay: decode the whole log"
    append_ours(base / "ours", requests_of(events), sizes.batch)
    with LmdbStore.open(base / "ours") as store:
        mine = _median_rate(
            count,
            repeats,
            lambda: timed(lambda: _check(count, sum(1 for _ in store.read_events()))),
        )
    raw = RawLog(base / "raw")
    try:
        for group in _chunks(stamped(events), sizes.batch):
            raw.append(group)
        bare = _median_rate(count, repeats, lambda: timed(lambda: _check(count, raw.scan())))
    finally:
        raw.close()
    rows = [
        Row("replay", label, count, "ev/s", mine, "raw LMDB cursor + msgpack", bare, REPLAY_TARGET)
    ]
    if peer.AVAILABLE:
        log = peer.PeerLog(base / "peer")
        try:
            for batch in _chunks(log.prepare(events), sizes.batch):
                log.append(batch)
            theirs = _median_rate(count, repeats, lambda: timed(lambda: _check(count, log.scan())))
        finally:
            log.close()
        rows.append(
            Row("replay", label, count, "ev/s", mine, "eventsourcing notification log", theirs)
        )
    return rows


def run_replay(sizes: Sizes, work: Workdir) -> list[Row]:
    rows: list[Row] = []
    for count in sizes.events:
        with work.scratch("replay") as base:
            rows += _replay_rows(sizes, base, count)
    return rows


def _check(expected: int, got: int) -> None:
    if got != expected:
        raise RuntimeError(f"read {got} events, expected {expected}")
