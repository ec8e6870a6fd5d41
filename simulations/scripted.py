"""A scripted round lifecycle on real LMDB files with real crypto.

For each round: request it, create a fresh round key, wrap it under the node's KEK, store
the wrapped key and the events in one durable batch, seal a keyshare under the round key,
then end the round (complete, time out, or misbehave and then complete) or leave it live.
Ending a round deletes its wrapped key and wipes it from memory. Finally the store is
closed and reopened, and the run checks what must hold: every live round's keyshare opens
after the restart, no ended round's key is left, the log decodes end to end.

The passphrase comes from ``ENCLAVE_KEYS_DEMO_PASSPHRASE`` (a fixed demo phrase when
unset): this is a demonstration, not a way to run a production node.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from enclave_keys.clock import SystemClock
from enclave_keys.crypto import (
    Kek,
    PassphraseRecord,
    RoundCipher,
    enroll_passphrase,
    unlock_passphrase,
    unwrap_round_key,
    wrap_round_key,
)
from enclave_keys.errors import UnwrapFailed
from enclave_keys.events import (
    Event,
    FailureReason,
    KeyshareCreated,
    RoundComplete,
    RoundFailed,
    RoundKeyReady,
    RoundPurged,
    RoundRequested,
    RoundStage,
    StoredEvent,
)
from enclave_keys.ids import EventId, KekVersion, RoundId
from enclave_keys.log import configure_logging
from enclave_keys.store import LmdbStore

PASSPHRASE_ENV = "ENCLAVE_KEYS_DEMO_PASSPHRASE"  # noqa: S105 (a variable name)
DEMO_PASSPHRASE = "enclave-keys demo passphrase (not for production)"  # noqa: S105
PASSPHRASE_META = "demo.passphrase_record"  # noqa: S105 (a record name)
KEYSHARE_PURPOSE = "keyshare"
OUTCOMES = ("complete", "timeout", "misbehaviour_then_complete", "live")


@dataclass
class Run:
    store: LmdbStore
    kek: Kek
    rng: random.Random
    source: str = "scripted-demo"
    shares: dict[RoundId, bytes] = field(default_factory=dict)
    ended: set[RoundId] = field(default_factory=set)
    outcomes: Counter[str] = field(default_factory=Counter)

    def append(
        self,
        batch_events: Sequence[Event],
        *,
        put_key: tuple[RoundId, bytes] | None = None,
        delete_key: RoundId | None = None,
    ) -> None:
        """Append events, and put or delete one wrapped key, in one durable batch."""
        clock = SystemClock()
        first = self.store.last_sequence() + 1
        stored = [
            StoredEvent(
                sequence=first + i,
                event_id=EventId.random(self.rng),
                timestamp=clock.now(),
                source=self.source,
                payload=event,
            )
            for i, event in enumerate(batch_events)
        ]
        with self.store.write() as batch:
            batch.append_events(stored)
            if put_key is not None:
                batch.put_key(*put_key)
            if delete_key is not None:
                batch.delete_key(delete_key)


def unlock(store: LmdbStore) -> Kek:
    passphrase = os.environ.get(PASSPHRASE_ENV, DEMO_PASSPHRASE)
    raw = store.get_meta(PASSPHRASE_META)
    if raw is None:
        record, root = enroll_passphrase(passphrase)
        store.put_meta(PASSPHRASE_META, record.to_bytes())
    else:
        root = unlock_passphrase(passphrase, PassphraseRecord.from_bytes(raw))
    # Until the keyring lands, the passphrase-derived root key serves as KEK version 1.
    return Kek(KekVersion(1), root)


def _run_round(run: Run, round_id: RoundId, outcome: str) -> None:
    requested = RoundRequested(
        round_id=round_id, deadline=time.time() + 3600, threshold=2, committee_size=3
    )
    run.append([requested])
    cipher = RoundCipher.generate(round_id)
    wrapped = wrap_round_key(run.kek, cipher)
    ready = RoundKeyReady(round_id=round_id, key_id=cipher.key_id, kek_version=run.kek.version)
    run.append([ready], put_key=(round_id, wrapped))
    share = run.rng.randbytes(256)
    sealed = cipher.seal(KEYSHARE_PURPOSE, share)
    run.append([KeyshareCreated(round_id=round_id, key_id=cipher.key_id, ciphertext=sealed)])
    run.shares[round_id] = share
    run.outcomes[outcome] += 1

    ending: list[Event] = []
    if outcome == "timeout":
        ending = [
            RoundFailed(
                round_id=round_id,
                failed_at=RoundStage.KEY_GENERATION,
                reason=FailureReason.DKG_TIMEOUT,
            ),
        ]
    elif outcome == "misbehaviour_then_complete":
        run.append(
            [
                RoundFailed(
                    round_id=round_id,
                    failed_at=RoundStage.DECRYPTION,
                    reason=FailureReason.INVALID_DECRYPTION_SHARES,
                )
            ]
        )
    if outcome != "live":
        ending += [
            RoundComplete(round_id=round_id),
            RoundPurged(round_id=round_id, key_id=cipher.key_id),
        ]
        run.append(ending, delete_key=round_id)
        run.ended.add(round_id)
    cipher.wipe()


def run_rounds(store: LmdbStore, kek: Kek, rng: random.Random, rounds: int, *, prefix: str) -> Run:
    """Drive ``rounds`` rounds to a seeded mix of outcomes; return what happened."""
    run = Run(store=store, kek=kek, rng=rng)
    for n in range(rounds):
        _run_round(run, RoundId(f"{prefix}:{n}"), rng.choice(OUTCOMES))
    return run


def verify(store: LmdbStore, kek: Kek, run: Run) -> list[str]:
    """Check the properties after reopening; return the violations (empty when all hold)."""
    problems: list[str] = []
    sealed = {
        e.payload.round_id: e.payload.ciphertext
        for e in store.read_events()
        if isinstance(e.payload, KeyshareCreated)
    }
    for round_id, share in run.shares.items():
        blob = store.get_key(round_id)
        if round_id in run.ended:
            if blob is not None:
                problems.append(f"ended round {round_id} still has a stored key")
            continue
        if blob is None:
            problems.append(f"live round {round_id} lost its key")
            continue
        with unwrap_round_key(kek, round_id, blob) as cipher:
            try:
                if cipher.open(KEYSHARE_PURPOSE, sealed[round_id]) != share:
                    problems.append(f"live round {round_id}: keyshare differs")
            except UnwrapFailed:
                problems.append(f"live round {round_id}: keyshare does not open")
    return problems


def _clear_store(path: Path) -> None:
    """Start afresh: remove an earlier run's LMDB files, refusing to touch anything else."""
    if not path.exists():
        return
    names = {p.name for p in path.iterdir()}
    if not names <= {"data.mdb", "lock.mdb"}:
        raise SystemExit(f"{path} holds files that are not an enclave_keys store; not clearing")
    for name in names:
        (path / name).unlink()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations", description=__doc__)
    parser.add_argument("--data-dir", type=Path, default=Path("demo-data"))
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="reuse an existing data directory")
    args = parser.parse_args(argv)
    configure_logging(level=logging.WARNING)

    if not args.keep:
        _clear_store(args.data_dir)
    rng = random.Random(args.seed)
    started = time.perf_counter()

    with LmdbStore.open(args.data_dir) as store:
        run = run_rounds(store, unlock(store), rng, args.rounds, prefix=f"e3:{args.seed}")
        run.kek.wipe()

    with LmdbStore.open(args.data_dir) as store:  # restart: everything must come back
        kek = unlock(store)
        problems = verify(store, kek, run)
        events = sum(1 for _ in store.read_events())
        live_keys = store.key_count()
        kek.wipe()

    elapsed = time.perf_counter() - started
    print(f"data directory   {args.data_dir}")
    print(f"rounds           {args.rounds} (seed {args.seed})")
    for outcome in OUTCOMES:
        print(f"  {outcome:<27} {run.outcomes[outcome]}")
    print(f"events in log    {events}")
    print(f"live round keys  {live_keys} stored, {len(run.shares) - len(run.ended)} expected")
    print(f"elapsed          {elapsed:.2f} s")
    for problem in problems:
        print(f"VIOLATION: {problem}")
    print("invariants       " + ("all hold" if not problems else f"{len(problems)} violated"))
    return 0 if not problems else 1
