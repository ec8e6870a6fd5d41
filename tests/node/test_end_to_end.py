"""End to end: 1,000 rounds with a seeded mix of outcomes on a real node and LMDB directory.

Outcomes (drawn per round from ``random.Random(seed)``): completed; failed with a timeout
reason; failed for misbehaviour and completed one chunk later; left live (some asked for
decryption shares); never ended, so the deadline reaper ends them as the ManualClock
moves. Rounds are requested in chunks of 100, in publishes of 1 to 8 requests, and each
chunk's endings interleave with the next chunk's requests.

The same workload runs on Pykka actors (the real node) and on the deterministic runtime;
two deterministic runs with one seed must write the same log (see
:func:`fingerprint` for exactly what is compared).
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from enclave_keys.clock import ManualClock
from enclave_keys.codec import encode_event
from enclave_keys.crypto import SecretBytes
from enclave_keys.errors import RoundCipherRetired
from enclave_keys.events import (
    DecryptionShareCreated,
    DecryptionShareFailed,
    DecryptionShareRequested,
    Event,
    FailureReason,
    HandlerFailed,
    KeyshareCreated,
    RoundAlreadyCompleted,
    RoundComplete,
    RoundFailed,
    RoundKeyReady,
    RoundOpened,
    RoundPurged,
    RoundStage,
    StoredEvent,
)
from enclave_keys.ids import EventId, RoundId
from enclave_keys.node import Node, NodeConfig
from enclave_keys.round_cipher import LeasedRoundCipher, RoundCipherCore
from enclave_keys.router import RouterCore
from enclave_keys.unseal import KeyUnseal
from tests.node.conftest import (
    FAR,
    T0,
    WAIT,
    NodeFactory,
    keyshare_ciphertexts,
    log_of,
    open_keyshare,
    publish,
    request,
    require_cipher,
    settle,
)

ROUNDS = 1_000
CHUNK = 100
SEED = 20_241_123
GRACE = 5.0
STEP = 10.0  # the clock moves this much per chunk; reaper rounds' deadlines follow it

COMPLETE = "complete"
TIMEOUT = "timeout"
ACCUSED = "misbehaviour_then_complete"
LIVE = "live"
REAPED = "reaper"
OUTCOMES = (COMPLETE, TIMEOUT, ACCUSED, LIVE, REAPED)
TIMEOUTS = [reason for reason in FailureReason if reason.is_timeout]
MISBEHAVIOUR = [reason for reason in FailureReason if reason.is_misbehaviour]


@dataclass
class Plan:
    """What the workload did to each round, and each round's cipher while it was live."""

    outcomes: dict[RoundId, str] = field(default_factory=dict)
    reasons: dict[RoundId, FailureReason] = field(default_factory=dict)
    decryption_requests: dict[RoundId, EventId] = field(default_factory=dict)
    ciphers: dict[RoundId, LeasedRoundCipher] = field(default_factory=dict)

    def having(self, *outcomes: str) -> list[RoundId]:
        return sorted(r for r, o in self.outcomes.items() if o in outcomes)

    @property
    def ended(self) -> list[RoundId]:
        return self.having(COMPLETE, TIMEOUT, ACCUSED, REAPED)

    @property
    def live(self) -> list[RoundId]:
        return self.having(LIVE)


def publish_in_batches(node: Node, rng: random.Random, events: Sequence[Event]) -> None:
    """Publish ``events`` in order, 1 to 8 per publish (sizes drawn from ``rng``)."""
    at = 0
    while at < len(events):
        size = rng.randint(1, 8)
        node.publish(*events[at : at + size])
        at += size


def drive(node: Node, clock: ManualClock, seed: int, rounds: int = ROUNDS) -> Plan:
    """Run the workload; returns the plan. Every input is drawn from ``seed``."""
    rng = random.Random(seed)
    plan = Plan()
    accused: list[RoundId] = []
    for chunk_start in range(0, rounds, CHUNK):
        chunk = [RoundId(f"e2e:{i:04d}") for i in range(chunk_start, chunk_start + CHUNK)]
        deadline = clock.now() + STEP  # reaper rounds of this chunk: past due next chunk
        for r in chunk:
            plan.outcomes[r] = rng.choice(OUTCOMES)
        requests = [request(r, deadline if plan.outcomes[r] == REAPED else FAR) for r in chunk]
        publish_in_batches(node, rng, requests)
        settle(node)
        for r in chunk:
            plan.ciphers[r] = require_cipher(node, r)

        endings: list[Event] = [RoundComplete(round_id=r) for r in accused]
        accused = []
        for r in chunk:
            outcome = plan.outcomes[r]
            if outcome == COMPLETE:
                endings.append(RoundComplete(round_id=r))
            elif outcome == TIMEOUT:
                plan.reasons[r] = rng.choice(TIMEOUTS)
                endings.append(
                    RoundFailed(round_id=r, failed_at=RoundStage.COMPUTE, reason=plan.reasons[r])
                )
            elif outcome == ACCUSED:
                plan.reasons[r] = rng.choice(MISBEHAVIOUR)
                endings.append(
                    RoundFailed(round_id=r, failed_at=RoundStage.COMPUTE, reason=plan.reasons[r])
                )
                accused.append(r)
            elif outcome == LIVE and rng.random() < 0.3:
                plan.decryption_requests[r] = EventId.random(rng)
                endings.append(
                    DecryptionShareRequested(round_id=r, request_id=plan.decryption_requests[r])
                )
        rng.shuffle(endings)
        publish_in_batches(node, rng, endings)
        # No settling here: these endings race the next chunk's requests on Pykka.
        clock.advance(STEP)
        node.tick()
    publish_in_batches(node, rng, [RoundComplete(round_id=r) for r in accused])
    settle(node)
    clock.advance(STEP)
    node.tick()
    settle(node)
    return plan


def verify(node: Node, plan: Plan) -> None:
    """Every property the workload must leave behind (see the module docstring)."""
    events = log_of(node.store)
    store = node.store
    for kind in (RoundOpened, RoundKeyReady, KeyshareCreated):
        counts = Counter(s.round_id for s in events if isinstance(s.payload, kind))
        assert counts == dict.fromkeys(plan.outcomes, 1), f"each round has one {kind.TAG}"
    assert not [s for s in events if isinstance(s.payload, HandlerFailed | RoundAlreadyCompleted)]
    key_ids = {
        s.payload.round_id: s.payload.key_id for s in events if isinstance(s.payload, RoundKeyReady)
    }
    purged = {
        s.payload.round_id: s.payload.key_id for s in events if isinstance(s.payload, RoundPurged)
    }
    failures: dict[RoundId, list[tuple[str, FailureReason]]] = {}
    for s in events:
        if isinstance(s.payload, RoundFailed):
            failures.setdefault(s.payload.round_id, []).append((s.source, s.payload.reason))
    shares = keyshare_ciphertexts(events)

    # Ended rounds: key gone from the store and the context, cipher retired and wiped.
    for r in plan.ended:
        assert store.get_key(r) is None, f"ended round {r} still has a stored key"
        assert node.registry.get(r) is None
        assert node.round_cipher.cipher_of(r) is None
        assert node.router.is_completed(r)
        assert purged.get(r) == key_ids[r], f"ended round {r} was not purged exactly once"
        old = plan.ciphers[r]
        assert old.retired
        assert old.is_wiped
        with pytest.raises(RoundCipherRetired), old.lease():
            pass
    # Each ending happened for the planned reason.
    for r in plan.having(COMPLETE):
        assert r not in failures
    for r in plan.having(TIMEOUT, ACCUSED):
        assert failures[r] == [("node", plan.reasons[r])]
    for r in plan.having(REAPED):
        assert failures[r] == [("reaper", FailureReason.DEADLINE_EXCEEDED)]

    # Live rounds: same cipher as when keyed, key stored, keyshare opens, shares answered.
    for r in plan.live:
        assert store.get_key(r) is not None
        leased = require_cipher(node, r)
        assert leased is plan.ciphers[r]
        assert not leased.retired
        assert leased.key_id == key_ids[r]
        assert len(open_keyshare(node, r, shares[r])) == 32
        assert r not in purged
        assert r not in failures
    answered = {
        s.payload.request_id for s in events if isinstance(s.payload, DecryptionShareCreated)
    }
    assert answered == set(plan.decryption_requests.values())
    assert not [s for s in events if isinstance(s.payload, DecryptionShareFailed)]
    assert sorted(r for r, _ in store.list_keys()) == plan.live


SECRET_FIELDS = frozenset({"key_id", "ciphertext"})
"""Payload fields made from OS randomness (round keys' ids, AEAD nonces): they differ
between runs even with one seed."""


def fingerprint(stored: StoredEvent) -> object:
    """What must be identical between two runs with the same seed.

    An event without a ``key_id`` or ``ciphertext`` field: its whole wire encoding (bytes).
    One with such a field: every envelope field (sequence, event id, timestamp, round id,
    causation id, correlation id, source, tag) and every other payload field.
    """
    names = {spec.name for spec in type(stored.payload).FIELDS}
    if not names & SECRET_FIELDS:
        return encode_event(stored)
    payload = tuple((name, getattr(stored.payload, name)) for name in sorted(names - SECRET_FIELDS))
    return (
        stored.sequence,
        stored.event_id,
        stored.timestamp,
        stored.round_id,
        stored.causation_id,
        stored.correlation_id,
        stored.source,
        stored.tag,
        payload,
    )


# --- the tests --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["pykka"])
def test_a_thousand_rounds_on_pykka_actors_and_lmdb(
    nodes: NodeFactory, record_testsuite_property: Callable[[str, object], None]
) -> None:
    node = nodes.open(reaper_grace=GRACE)
    started = time.perf_counter()
    plan = drive(node, nodes.clock, SEED)
    elapsed = time.perf_counter() - started
    record_testsuite_property("e2e_pykka_rounds_per_second", round(ROUNDS / elapsed))
    record_testsuite_property("e2e_pykka_events", node.store.last_sequence())
    assert set(Counter(plan.outcomes.values())) == set(OUTCOMES)

    verify(node, plan)

    # And after a clean restart: every live round is back, nothing ended came back.
    shares = keyshare_ciphertexts(log_of(node.store))
    node.stop()
    node = nodes.open(reaper_grace=GRACE)
    assert node.recovery.hydrated == tuple(plan.live)
    assert node.recovery.purged == ()
    assert node.recovery.failed == ()
    for r in plan.live:
        assert len(open_keyshare(node, r, shares[r])) == 32
    for r in plan.ended:
        assert node.store.get_key(r) is None
        assert node.registry.get(r) is None


@pytest.mark.slow
def test_the_same_seed_writes_the_same_log_on_the_deterministic_runtime(
    tmp_path: Path, master: SecretBytes
) -> None:
    logs: list[list[object]] = []
    plans: list[dict[RoundId, str]] = []
    for run in range(2):
        clock = ManualClock(T0)
        config = NodeConfig(
            runtime="deterministic", seed=SEED, reaper_grace=GRACE, idle_timeout=WAIT
        )
        node = Node.open(tmp_path / f"run{run}", KeyUnseal(master), clock=clock, config=config)
        try:
            plan = drive(node, clock, SEED)
            verify(node, plan)
            logs.append([fingerprint(s) for s in node.store.read_events()])
            plans.append(plan.outcomes)
        finally:
            node.stop()
    assert plans[0] == plans[1]
    assert len(logs[0]) == len(logs[1]) > 4 * ROUNDS
    for first, second in zip(logs[0], logs[1], strict=True):
        assert first == second
    # Most of the log is compared byte for byte.
    assert sum(isinstance(f, bytes) for f in logs[0]) > 2 * ROUNDS


@pytest.mark.parametrize("runtime", ["pykka"])
def test_a_round_completed_before_it_is_keyed_never_gets_a_key(
    nodes: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Forces one legal interleaving of the actors: the router is slow to handle a
    ``RoundComplete`` that the round-cipher actor has already handled (log order is kept
    per actor; nothing orders the router's context close against other actors)."""
    target = RoundId("e3:cancelled")
    cipher_done = threading.Event()
    router_handle = RouterCore.handle
    cipher_handle = RoundCipherCore.handle

    def slow_router(self: RouterCore, stored: StoredEvent) -> Sequence[Event]:
        if isinstance(stored.payload, RoundComplete) and stored.round_id == target:
            cipher_done.wait(WAIT)
        return router_handle(self, stored)

    def watched_cipher(self: RoundCipherCore, stored: StoredEvent) -> Sequence[Event]:
        try:
            return cipher_handle(self, stored)
        finally:
            if isinstance(stored.payload, RoundOpened) and stored.round_id == target:
                cipher_done.set()

    monkeypatch.setattr(RouterCore, "handle", slow_router)
    monkeypatch.setattr(RoundCipherCore, "handle", watched_cipher)
    node = nodes.open()
    publish(node, request(target), RoundComplete(round_id=target))
    assert cipher_done.is_set()
    assert node.router.is_completed(target)
    events = log_of(node.store)
    order = [s.tag for s in events if s.round_id == target]
    assert order.index(RoundComplete.TAG) < order.index(RoundOpened.TAG)
    assert target not in {r for r, _ in node.store.list_keys()}, "a completed round has a key"
    assert node.round_cipher.cipher_of(target) is None
