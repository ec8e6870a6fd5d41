"""Family 7: the storage epoch ratchet (forward secrecy at rest, issue 5).

* **Rewrap cost** at 10, 1,000 and 100,000 live round keys: one ``EpochKeeper.ratchet()``
  on real LMDB files (slot write, unwrap + wrap of every live key, one commit, old slot
  wiped), in rewrapped keys per second. The baseline is the bare work in the same run:
  ``AESGCM.decrypt`` + ``AESGCM.encrypt`` of every 32-byte key and one raw LMDB
  transaction putting the 85-byte results.
* **Longest wait beside a ratchet** at the largest size: while one ratchet runs on its own
  thread, round keys are made (wrap + durable put) and deleted (durable delete) one after
  another; the row is the longest any one of them took, against the ratchet's own
  duration (what each waited when the ratchet held the epoch throughout).
* **Purges per second** with ratchets on: a steady 1,000 live rounds; each purge deletes
  one key (its own durable commit, as the round cipher does) and adds a fresh one, and the
  keeper ratchets whenever half its window (the default 1 s, on real time) has passed.
  The baseline is the same puts and deletes on raw LMDB with no ratchet at all.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

import lmdb
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from benchmarks.config import Sizes
from benchmarks.harness import Row, median_seconds, timed
from benchmarks.workdir import Workdir
from enclave_keys.clock import SystemClock
from enclave_keys.crypto import Keyring, RoundCipher, wrap_round_key
from enclave_keys.epochs import EpochKeeper
from enclave_keys.ids import RoundId
from enclave_keys.store import LmdbStore

__all__ = ["run_ratchet"]

_STEADY_LIVE: Final = 1_000
_WRAPPED: Final = 85


def _fill(keeper: EpochKeeper, store: LmdbStore, count: int, prefix: str) -> list[RoundId]:
    rounds = [RoundId(f"{prefix}-{i:06d}") for i in range(count)]
    with keeper.active_epoch() as epoch, store.write() as batch:
        for rid in rounds:
            with RoundCipher.generate(rid) as cipher:
                batch.put_key(rid, wrap_round_key(epoch, cipher))
    return rounds


def _raw_rewrap(path: Path, count: int, repeats: int) -> float:
    """Seconds for the bare rewrap of ``count`` keys: decrypt, encrypt, one LMDB commit."""
    old, new = AESGCM(AESGCM.generate_key(256)), AESGCM(AESGCM.generate_key(256))
    blobs = []
    for _ in range(count):
        nonce = os.urandom(12)
        blobs.append((nonce, old.encrypt(nonce, os.urandom(32), b"aad")))
    env = lmdb.open(str(path), map_size=1 << 30, sync=True, metasync=True)
    try:

        def rewrap() -> None:
            with env.begin(write=True) as txn:
                for i, (nonce, sealed) in enumerate(blobs):
                    key = old.decrypt(nonce, sealed, b"aad")
                    fresh = os.urandom(12)
                    value = b"\x02" + bytes(24) + fresh + new.encrypt(fresh, key, b"aad")
                    assert len(value) == _WRAPPED
                    txn.put(b"r-%06d" % i, value)

        return median_seconds(lambda: timed(rewrap), repeats)
    finally:
        env.close()


@contextmanager
def _keeper_with_keys(
    work: Workdir, name: str, live: int
) -> Iterator[tuple[EpochKeeper, LmdbStore]]:
    """An epoch keeper over a new LMDB store holding ``live`` wrapped round keys."""
    ring = Keyring.create()
    try:
        with work.scratch(name) as path, LmdbStore.open(path) as store:
            keeper, _ = EpochKeeper.open(store, ring, clock=SystemClock())
            try:
                _fill(keeper, store, live, "live")
                yield keeper, store
            finally:
                keeper.close()
    finally:
        ring.seal(0.0, force=True)


def _rewrap_row(sizes: Sizes, work: Workdir, live: int) -> Row:
    repeats = sizes.repeats_for(live, 300_000)
    with _keeper_with_keys(work, "ratchet", live) as (keeper, _):
        ours = median_seconds(lambda: timed(keeper.ratchet), repeats)
    with work.scratch("ratchet-raw") as path:
        path.mkdir(parents=True)
        raw = _raw_rewrap(path, live, repeats)
    return Row(
        "ratchet",
        f"epoch ratchet, {live:,} live keys",
        live,
        "keys/s",
        live / ours,
        "raw decrypt+encrypt, one LMDB commit",
        live / raw,
    )


def _ratchet_beside_traffic(
    keeper: EpochKeeper, store: LmdbStore, turn: int
) -> tuple[float, float]:
    """(seconds of one ratchet, longest seconds one key make + delete took meanwhile)."""
    took: list[float] = []
    ratchet = threading.Thread(target=lambda: took.append(timed(keeper.ratchet)))
    longest = 0.0
    made = 0
    ratchet.start()
    while ratchet.is_alive() or made == 0:
        rid = RoundId(f"beside-{turn}-{made}")
        made += 1
        start = time.perf_counter()
        with keeper.active_epoch() as epoch, RoundCipher.generate(rid) as cipher:
            store.put_key(rid, wrap_round_key(epoch, cipher))
        with keeper.hold_ratchet():
            store.delete_key(rid)
        longest = max(longest, time.perf_counter() - start)
    ratchet.join()
    (seconds,) = took
    return seconds, longest


def _stall_row(sizes: Sizes, work: Workdir, live: int) -> Row:
    repeats = sizes.repeats_for(live, 300_000)
    with _keeper_with_keys(work, "ratchet-beside", live) as (keeper, store):
        runs = [_ratchet_beside_traffic(keeper, store, turn) for turn in range(repeats)]
    return Row(
        "ratchet",
        f"longest key make + delete during a ratchet, {live:,} live keys",
        live,
        "ms",
        statistics.median(longest for _, longest in runs) * 1e3,
        "the ratchet's own duration",
        statistics.median(seconds for seconds, _ in runs) * 1e3,
    )


def _purge_rate(keeper: EpochKeeper, store: LmdbStore, seconds: float) -> tuple[float, int]:
    """Purges per second over ``seconds`` of steady churn, and the ratchets it took."""
    rounds = _fill(keeper, store, _STEADY_LIVE, "steady")
    before = keeper.changes
    clock = SystemClock()
    done = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        rid = rounds[done % len(rounds)]
        with keeper.hold_ratchet():
            store.delete_key(rid)
        keeper.purged()
        with keeper.active_epoch() as epoch, RoundCipher.generate(rid) as cipher:
            store.put_key(rid, wrap_round_key(epoch, cipher))
        keeper.ratchet_if_due(clock.now())
        done += 1
    return done / (time.perf_counter() - start), keeper.changes - before


def _raw_purge_rate(path: Path, seconds: float) -> float:
    env = lmdb.open(str(path), map_size=1 << 30, sync=True, metasync=True)
    try:
        value = os.urandom(_WRAPPED)
        with env.begin(write=True) as txn:
            for i in range(_STEADY_LIVE):
                txn.put(b"s-%06d" % i, value)
        done = 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            key = b"s-%06d" % (done % _STEADY_LIVE)
            with env.begin(write=True) as txn:
                txn.delete(key)
            with env.begin(write=True) as txn:
                txn.put(key, value)
            done += 1
        return done / (time.perf_counter() - start)
    finally:
        env.close()


def _purge_row(sizes: Sizes, work: Workdir) -> Row:
    seconds = 0.3 if sizes.name == "tiny" else 3.0
    with _keeper_with_keys(work, "purges", 0) as (keeper, store):  # the default window
        rate, ratchets = _purge_rate(keeper, store, seconds)
    with work.scratch("purges-raw") as path:
        path.mkdir(parents=True)
        raw = _raw_purge_rate(path, seconds)
    return Row(
        "ratchet",
        f"purges with ratchets ({_STEADY_LIVE:,} live, {ratchets} ratchets)",
        _STEADY_LIVE,
        "purges/s",
        rate,
        "raw LMDB delete + put commits",
        raw,
    )


def run_ratchet(sizes: Sizes, work: Workdir) -> list[Row]:
    counts = (10, 40) if sizes.name == "tiny" else (10, 1_000, 100_000)
    if sizes.name == "small":
        counts = (10, 1_000, 10_000)
    return [
        *(_rewrap_row(sizes, work, live) for live in counts),
        _stall_row(sizes, work, counts[-1]),
        _purge_row(sizes, work),
    ]
