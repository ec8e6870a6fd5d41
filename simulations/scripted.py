"""The main job until the full simulator lands: a scripted run of one real node.

A node opens a local LMDB directory (unsealed with a passphrase), then ``--rounds``
rounds go through their life on real Pykka actors (or the deterministic dispatcher) with
real crypto: requested, keyed (a fresh AES-256-GCM key, wrapped and stored durably),
given a sealed keyshare, then ended by a seeded mix of outcomes — complete, a timeout
failure, misbehaviour followed by completion, terminal events lost so the deadline reaper
must end the round — or left live. The node is stopped and reopened, and the run checks
what must hold after the restart: every live round's keyshare opens under its round key,
no ended round's key is left in the store or in memory, the log decodes end to end.

The passphrase comes from ``ENCLAVE_KEYS_DEMO_PASSPHRASE`` (a fixed demo phrase when
unset): this is a demonstration, not how to run a production node.
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

from enclave_keys.clock import ManualClock
from enclave_keys.errors import EnclaveKeysError
from enclave_keys.events import (
    Event,
    FailureReason,
    RoundComplete,
    RoundFailed,
    RoundRequested,
    RoundStage,
)
from enclave_keys.ids import RoundId
from enclave_keys.keyshare import KEYSHARE_PURPOSE
from enclave_keys.log import configure_logging
from enclave_keys.node import Node, NodeConfig
from enclave_keys.round_cipher import ROUND_CIPHER
from enclave_keys.unseal import PassphraseUnseal

PASSPHRASE_ENV = "ENCLAVE_KEYS_DEMO_PASSPHRASE"  # noqa: S105 (a variable name)
DEMO_PASSPHRASE = "enclave-keys demo passphrase (not for production)"  # noqa: S105
OUTCOMES = ("complete", "timeout", "misbehaviour_then_complete", "reaper", "live")
ROUND_LIFETIME = 600.0  # protocol seconds from request to deadline
BATCH = 50  # rounds requested per publish (one group commit)


@dataclass
class Plan:
    """The seeded script: which outcome each round gets."""

    outcomes: dict[RoundId, str] = field(default_factory=dict)

    @classmethod
    def draw(cls, rng: random.Random, rounds: int, prefix: str) -> Plan:
        return cls({RoundId(f"{prefix}:{n}"): rng.choice(OUTCOMES) for n in range(rounds)})

    def rounds(self, outcome: str) -> list[RoundId]:
        return [rid for rid, o in self.outcomes.items() if o == outcome]

    @property
    def ended(self) -> set[RoundId]:
        return {rid for rid, o in self.outcomes.items() if o != "live"}


def drive(node: Node, clock: ManualClock, plan: Plan) -> None:
    """Request every round, then end each as the plan says."""
    rids = list(plan.outcomes)
    for start in range(0, len(rids), BATCH):
        node.publish(
            *(
                RoundRequested(
                    round_id=r,
                    # Live rounds must outlast the run; every other deadline passes in it.
                    deadline=clock.now()
                    + ROUND_LIFETIME * (1000 if plan.outcomes[r] == "live" else 1),
                    threshold=2,
                    committee_size=3,
                )
                for r in rids[start : start + BATCH]
            )
        )
    node.wait_idle()

    endings: list[Event] = []
    for rid in plan.rounds("complete"):
        endings.append(RoundComplete(round_id=rid))
    for rid in plan.rounds("timeout"):
        endings.append(_failed(rid, RoundStage.KEY_GENERATION, FailureReason.DKG_TIMEOUT))
    for rid in plan.rounds("misbehaviour_then_complete"):
        endings.append(_failed(rid, RoundStage.DECRYPTION, FailureReason.INVALID_DECRYPTION_SHARES))
        endings.append(RoundComplete(round_id=rid))
    node.publish(*endings)
    node.wait_idle()

    # The "reaper" rounds never get a terminal event: only their deadline ends them.
    clock.advance(ROUND_LIFETIME + node.config.reaper_grace + 1)
    node.tick()
    node.wait_idle()


def _failed(rid: RoundId, stage: RoundStage, reason: FailureReason) -> RoundFailed:
    return RoundFailed(round_id=rid, failed_at=stage, reason=reason)


def verify(node: Node, plan: Plan) -> list[str]:
    """The properties after a restart; returns the violations (empty when all hold)."""
    problems: list[str] = []
    for rid, outcome in plan.outcomes.items():
        stored = node.store.get_key(rid)
        context = node.registry.get(rid)
        if outcome != "live":
            if stored is not None:
                problems.append(f"ended round {rid} still has a stored key")
            if context is not None and context.get(ROUND_CIPHER) is not None:
                problems.append(f"ended round {rid} still has a cipher in memory")
            continue
        share = node.keyshare.keyshare_of(rid)
        if stored is None or context is None or share is None:
            problems.append(f"live round {rid} lost its key or keyshare")
            continue
        try:
            with context.require(ROUND_CIPHER).lease() as cipher:
                cipher.open(KEYSHARE_PURPOSE, share[1])
        except EnclaveKeysError as exc:
            problems.append(f"live round {rid}: keyshare does not open ({type(exc).__name__})")
    try:
        events = sum(1 for _ in node.store.read_events())
    except EnclaveKeysError as exc:
        problems.append(f"the log does not decode ({type(exc).__name__})")
        events = 0
    if events == 0:
        problems.append("the log is empty")
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
    parser.add_argument("--rounds", type=int, default=500)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--runtime", choices=("pykka", "deterministic"), default="pykka")
    parser.add_argument("--keep", action="store_true", help="reuse an existing data directory")
    args = parser.parse_args(argv)
    configure_logging(level=logging.ERROR)  # the reaper warns per round it ends: noisy here
    if not args.keep:
        _clear_store(args.data_dir)

    plan = Plan.draw(random.Random(args.seed), args.rounds, prefix=f"e3:{args.seed}")
    clock = ManualClock()
    config = NodeConfig(runtime=args.runtime, seed=args.seed)
    unseal = PassphraseUnseal(os.environ.get(PASSPHRASE_ENV, DEMO_PASSPHRASE))
    started = time.perf_counter()

    with Node.open(args.data_dir, unseal, clock=clock, config=config) as node:
        drive(node, clock, plan)
    driven = time.perf_counter() - started

    with Node.open(args.data_dir, unseal, clock=clock, config=config) as node:  # restart
        problems = verify(node, plan)
        recovery = node.recovery
        events = node.store.last_sequence()
        live_keys = node.store.key_count()

    counts = Counter(plan.outcomes.values())
    print(f"data directory   {args.data_dir}  (runtime {args.runtime}, seed {args.seed})")
    print(f"rounds           {args.rounds}")
    for outcome in OUTCOMES:
        print(f"  {outcome:<27} {counts[outcome]}")
    print(f"events in log    {events}")
    print(
        f"restart          {len(recovery.hydrated)} live keys hydrated, "
        f"{len(recovery.purged)} purged, {len(recovery.failed)} failed by recovery"
    )
    print(f"live round keys  {live_keys} stored, {counts['live']} expected")
    print(
        f"elapsed          {driven:.2f} s driving, "
        f"{time.perf_counter() - started:.2f} s with restart and checks"
    )
    for problem in problems:
        print(f"VIOLATION: {problem}")
    print("invariants       " + ("all hold" if not problems else f"{len(problems)} violated"))
    return 0 if not problems else 1
