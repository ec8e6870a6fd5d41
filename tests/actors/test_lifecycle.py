"""The four cores together, driven by a minimal in-order dispatcher (no runtime needed)."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence

import pytest

from enclave_keys.clock import ManualClock
from enclave_keys.context import ContextRegistry
from enclave_keys.crypto import Keyring, read_wrapped_header
from enclave_keys.epochs import DEFAULT_EPOCH_WINDOW
from enclave_keys.events import (
    DecryptionShareCreated,
    DecryptionShareRequested,
    Event,
    FailureReason,
    KeyshareCreated,
    RoundAlreadyCompleted,
    RoundComplete,
    RoundFailed,
    RoundKeyReady,
    RoundOpened,
    RoundPurged,
    RoundRequested,
    RoundStage,
    StoredEvent,
)
from enclave_keys.handler import Handler, Ticking
from enclave_keys.ids import EpochNumber, EventId, RoundId
from enclave_keys.keyshare import KeyshareCore
from enclave_keys.reaper import ReaperCore
from enclave_keys.round_cipher import ROUND_CIPHER, RoundCipherCore
from enclave_keys.router import RouterCore
from enclave_keys.store import MemoryBacking, MemoryStore, Store
from tests.actors.helpers import T0, make_keyring, open_keeper

A, B = RoundId("e3:a"), RoundId("e3:b")


class MiniNode:
    """The cores of a node, wired over one registry and one store, with an in-order log,
    and the store's epoch keeper (ratcheted on tick, as the node does)."""

    def __init__(self, store: Store, ring: Keyring, clock: ManualClock) -> None:
        self.store, self.ring, self.clock = store, ring, clock
        self.registry = ContextRegistry()
        self.router = RouterCore(self.registry)
        self.keeper = open_keeper(store, ring, clock=clock, lease_timeout=1.0)
        self.ciphers = RoundCipherCore(store, self.keeper, self.registry, lease_timeout=1.0)
        self.keyshare = KeyshareCore(self.registry)
        self.reaper = ReaperCore(grace=10.0)
        self.cores: list[Handler] = [self.router, self.ciphers, self.keyshare, self.reaper]
        self.log: list[StoredEvent] = []
        self._queue: deque[StoredEvent] = deque()

    def publish(self, event: Event, source: str = "test") -> None:
        self._append(event, source)
        self._drain()

    def tick(self, seconds: float) -> None:
        now = self.clock.advance(seconds)
        ticking: Ticking = self.reaper
        for event in ticking.tick(now):
            self._append(event, self.reaper.name)
        self._drain()
        self.keeper.ratchet_if_due(now)

    def stop(self) -> None:
        self.ciphers.wipe_all()
        self.keeper.close()

    def _append(self, event: Event, source: str) -> None:
        stored = StoredEvent(
            sequence=len(self.log) + 1,
            event_id=EventId.random(),
            timestamp=self.clock.now(),
            source=source,
            payload=event,
        )
        self.log.append(stored)
        self._queue.append(stored)

    def _drain(self) -> None:
        while self._queue:
            stored = self._queue.popleft()
            for core in self.cores:
                wanted = core.subscriptions
                if wanted is None or isinstance(stored.payload, wanted):
                    for out in core.handle(stored):
                        self._append(out, core.name)

    def tags(self, round_id: RoundId) -> list[str]:
        return [s.tag for s in self.log if s.round_id == round_id]

    def request(self, round_id: RoundId, deadline: float) -> None:
        self.publish(
            RoundRequested(round_id=round_id, deadline=deadline, threshold=2, committee_size=3)
        )


def last(node: MiniNode) -> Event:
    return node.log[-1].payload


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
def ring() -> Iterator[Keyring]:
    with make_keyring() as made:
        yield made


@pytest.fixture
def node(ring: Keyring, clock: ManualClock) -> Iterator[MiniNode]:
    made = MiniNode(MemoryStore(), ring, clock)
    yield made
    made.stop()


def test_a_round_from_request_to_purge(node: MiniNode) -> None:
    node.request(A, T0 + 600)
    assert node.tags(A) == [
        RoundRequested.TAG,
        RoundOpened.TAG,
        RoundKeyReady.TAG,
        KeyshareCreated.TAG,
    ]
    assert node.store.key_count() == 1
    node.publish(DecryptionShareRequested(round_id=A, request_id=EventId.random()))
    assert node.log[-1].tag == DecryptionShareCreated.TAG
    leased = node.ciphers.cipher_of(A)
    assert leased is not None
    node.publish(RoundComplete(round_id=A))
    assert last(node) == RoundPurged(round_id=A, key_id=leased.key_id)
    assert node.store.key_count() == 0
    assert leased.is_wiped
    assert len(node.registry) == 0
    # the epoch that wrapped A's key is destroyed half a window after the purge
    assert node.keeper.epoch == EpochNumber(1)
    node.tick(DEFAULT_EPOCH_WINDOW / 2)
    assert node.keeper.epoch == EpochNumber(2)
    assert node.keeper.pending_since is None
    # late and non-late events after completion
    size = len(node.log)
    node.publish(
        RoundFailed(round_id=A, failed_at=RoundStage.COMPUTE, reason=FailureReason.DKG_TIMEOUT)
    )
    assert len(node.log) == size + 1  # ignored silently
    node.request(A, T0 + 600)
    assert last(node) == RoundAlreadyCompleted(round_id=A, rejected_tag="round.requested")
    assert node.store.key_count() == 0


def test_the_reaper_ends_a_round_stuck_in_accusation(node: MiniNode) -> None:
    node.request(A, T0 + 60)
    node.publish(
        RoundFailed(
            round_id=A, failed_at=RoundStage.KEY_GENERATION, reason=FailureReason.INVALID_DKG_SHARES
        )
    )
    assert node.store.key_count() == 1  # kept for the accusation phase
    node.tick(65)
    assert node.store.key_count() == 1  # within the grace
    node.tick(10)
    assert node.tags(A)[-3:] == [RoundFailed.TAG, RoundComplete.TAG, RoundPurged.TAG]
    assert node.store.key_count() == 0
    assert node.keeper.epoch == EpochNumber(1)  # the purge is pending ...
    node.tick(1000)
    assert node.tags(A)[-1] == RoundPurged.TAG  # nothing more
    assert node.keeper.epoch == EpochNumber(2)  # ... and the next tick ended its epoch


def test_restart_replays_hydrates_and_sweeps(ring: Keyring, clock: ManualClock) -> None:
    backing = MemoryBacking()
    first = MiniNode(MemoryStore(backing), ring, clock)
    first.request(A, T0 + 600)
    first.request(B, T0 + 600)
    snapshot_at = len(first.log)
    snapshots = {
        "router": first.router.snapshot_state(),
        "reaper": first.reaper.snapshot_state(),
        "keyshare": first.keyshare.snapshot_state(),
    }
    # B completes, but the node crashes before the round cipher purges it: the
    # RoundComplete is in the log, the key is still in the store.
    first.cores.remove(first.ciphers)
    first.publish(RoundComplete(round_id=B))
    first.stop()
    assert MemoryStore(backing).key_count() == 2

    again = MiniNode(MemoryStore(backing), ring, clock)
    again.router.restore_state(snapshots["router"])
    again.reaper.restore_state(snapshots["reaper"])
    again.keyshare.restore_state(snapshots["keyshare"])
    for stored in first.log[snapshot_at:]:
        again.router.replay(stored)
        again.reaper.replay(stored)
        again.keyshare.replay(stored)
    live = list(again.router.open_rounds())
    assert live == [A]
    report = again.ciphers.hydrate(live)
    assert (report.hydrated, report.orphans, report.missing, report.failed) == ((A,), (B,), (), ())
    assert again.ciphers.purge_orphan(B) is not None
    assert again.store.key_count() == 1
    # as the node does after its sweep: the epoch that wrapped B's key ends now
    change = again.keeper.ratchet("start")
    assert (change.old_epoch, change.new_epoch, change.rewrapped) == (
        EpochNumber(1),
        EpochNumber(2),
        1,
    )
    blob = again.store.get_key(A)
    assert blob is not None
    assert read_wrapped_header(blob)[0] == EpochNumber(2)
    # the live round carries on: its keyshare still opens under the re-hydrated key
    again.log = list(first.log)
    again.publish(DecryptionShareRequested(round_id=A, request_id=EventId.random()))
    assert again.log[-1].tag == DecryptionShareCreated.TAG
    context = again.registry.get(A)
    assert context is not None
    assert context.get(ROUND_CIPHER) is again.ciphers.cipher_of(A)
    again.stop()


def test_the_cores_are_handlers(node: MiniNode) -> None:
    handlers: Sequence[Handler] = [node.router, node.ciphers, node.keyshare, node.reaper]
    assert [h.name for h in handlers] == ["router", "round-cipher", "keyshare", "reaper"]
