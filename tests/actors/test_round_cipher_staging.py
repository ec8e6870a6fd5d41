"""The round cipher's staged writes: key puts and deletes that commit with its events.

Under a runtime the core stages each put and delete; the bus applies them in the group's
transaction and settles them. These tests drive the protocol by hand (to hold a write
between staging and commit) and through the deterministic runtime with a failing store.
"""

from __future__ import annotations

import threading

import pytest

from enclave_keys.clock import ManualClock
from enclave_keys.context import ContextRegistry
from enclave_keys.crypto import Keyring, read_wrapped_header
from enclave_keys.epochs import EpochChange, EpochKeeper
from enclave_keys.errors import LifecycleError, StoreError
from enclave_keys.events import (
    FailureReason,
    RoundComplete,
    RoundFailed,
    RoundKeyReady,
    RoundOpened,
    RoundPurged,
)
from enclave_keys.handler import StagedWrite, Staging
from enclave_keys.ids import RoundId
from enclave_keys.round_cipher import ROUND_CIPHER, RoundCipherCore
from enclave_keys.runtime import DeterministicRuntime
from enclave_keys.store import MemoryStore, Store
from enclave_keys.store.api import PreparedBatch, PutKey
from tests.actors.helpers import (
    T0,
    open_keeper,
    stored,
)

R = RoundId("e3:staged")
WAIT = 10.0  # bound on every wait for another thread


@pytest.fixture
def core(core: RoundCipherCore) -> RoundCipherCore:
    """The conftest's core, staging its writes as it does under a runtime."""
    core.stage_writes()
    return core


def commit(store: Store, writes: tuple[StagedWrite, ...]) -> None:
    """What the bus does with a group's writes: apply in one batch, then settle."""
    with store.write() as batch:
        for write in writes:
            write.apply(batch)
    for write in writes:
        write.settle(committed=True)


def stage_key(core: RoundCipherCore, registry: ContextRegistry) -> tuple[StagedWrite, ...]:
    registry.open(R)
    (ready,) = core.handle(stored(RoundOpened(round_id=R, deadline=T0 + 600)))
    assert isinstance(ready, RoundKeyReady)
    writes = core.take_writes()
    assert len(writes) == 1
    assert core.take_writes() == ()  # taken once
    return writes


def test_a_staging_core_is_a_staging_handler(core: RoundCipherCore) -> None:
    assert isinstance(core, Staging)


def test_a_staged_key_reaches_the_store_only_with_its_commit(
    core: RoundCipherCore, store: Store, registry: ContextRegistry
) -> None:
    writes = stage_key(core, registry)
    assert store.get_key(R) is None  # staged, not written
    assert core.held_rounds() == [R]
    commit(store, writes)
    blob = store.get_key(R)
    assert blob is not None
    leased = registry.get(R)
    assert leased is not None
    assert read_wrapped_header(blob)[1] == leased.require(ROUND_CIPHER).key_id


def test_a_ratchet_waits_for_a_staged_key_and_then_rewraps_it(
    core: RoundCipherCore, store: Store, registry: ContextRegistry, keeper: EpochKeeper
) -> None:
    # The blob was wrapped under the current epoch. A ratchet that ran before it is
    # stored would list the keys without it and destroy its epoch: the key would be lost.
    before = keeper.epoch
    writes = stage_key(core, registry)
    changes: list[EpochChange] = []
    ratchet = threading.Thread(target=lambda: changes.append(keeper.ratchet(timeout=WAIT)))
    ratchet.start()
    gate = keeper._gate  # no public view of the keeper's waiters
    assert gate.wait_until(lambda g: g.exclusive_waiting == 1, WAIT)
    assert not changes  # held out by the staged write's lease
    commit(store, writes)
    ratchet.join(WAIT)
    assert not ratchet.is_alive()
    assert keeper.epoch.number == before.number + 1
    blob = store.get_key(R)
    assert blob is not None
    assert read_wrapped_header(blob)[0] == keeper.epoch  # rewrapped by the ratchet
    context = registry.get(R)
    assert context is not None
    with context.require(ROUND_CIPHER).lease() as cipher:
        assert cipher.open("test", cipher.seal("test", b"still works")) == b"still works"


def test_a_staged_key_never_committed_is_taken_back_and_wiped(
    core: RoundCipherCore, store: Store, registry: ContextRegistry, keeper: EpochKeeper
) -> None:
    writes = stage_key(core, registry)
    context = registry.get(R)
    assert context is not None
    leased = context.require(ROUND_CIPHER)
    for write in writes:
        write.settle(committed=False)
        write.settle(committed=False)  # idempotent
    assert core.held_rounds() == []
    assert context.get(ROUND_CIPHER) is None
    assert leased.is_wiped
    assert store.get_key(R) is None
    keeper.ratchet(timeout=0.5)  # the epoch lease was released: no wait


def test_a_staged_delete_never_committed_is_done_alone_and_lets_the_ratchet_in(
    core: RoundCipherCore, store: Store, registry: ContextRegistry, keeper: EpochKeeper
) -> None:
    commit(store, stage_key(core, registry))
    core.handle(stored(RoundOpened(round_id=R, deadline=T0 + 600)))  # no second key
    assert core.take_writes() == ()
    (purged,) = core.handle(stored(RoundComplete(round_id=R)))
    assert isinstance(purged, RoundPurged)
    (delete,) = core.take_writes()
    assert store.get_key(R) is not None  # staged
    assert keeper.pending_since is None
    delete.settle(committed=False)  # its group failed, or the runtime stopped first
    assert store.get_key(R) is None  # deleted alone
    assert keeper.pending_since is not None  # the purge counts toward the window
    keeper.ratchet(timeout=0.5)  # the ratchet guard was released


class KeyGroupsFail(MemoryStore):
    """A memory store whose commits fail whenever a batch would store a round key."""

    def _commit(self, batch: PreparedBatch) -> None:
        if any(isinstance(op, PutKey) for op in batch.operations):
            raise StoreError("disk full")
        super()._commit(batch)


def test_a_failed_group_commit_leaves_neither_key_nor_announcement(ring: Keyring) -> None:
    store = KeyGroupsFail()
    keeper = open_keeper(store, ring, clock=ManualClock(T0), lease_timeout=WAIT)
    registry = ContextRegistry()
    core = RoundCipherCore(store, keeper, registry, lease_timeout=WAIT)
    runtime = DeterministicRuntime(store, ManualClock(T0), seed=1)
    runtime.subscribe(core)  # the runtime turns staging on
    runtime.start()
    context = registry.open(R)
    runtime.publish([RoundOpened(round_id=R, deadline=T0 + 600)], source="test")
    with pytest.raises(StoreError):
        runtime.wait_idle(WAIT)  # the core's group (key + RoundKeyReady) failed
    tags = [s.tag for s in store.read_events()]
    assert tags == [RoundOpened.TAG]  # no RoundKeyReady without its key
    assert store.get_key(R) is None
    assert core.held_rounds() == []
    assert context.get(ROUND_CIPHER) is None
    keeper.ratchet(timeout=0.5)  # the epoch lease went with the failed write

    runtime.tick()  # the round cannot go on: failed now, not at its deadline
    failures = [s.payload for s in store.read_events() if isinstance(s.payload, RoundFailed)]
    assert [(f.round_id, f.reason) for f in failures] == [(R, FailureReason.KEY_CREATION_FAILED)]
    runtime.tick()  # once
    assert store.last_sequence() == 2
    runtime.stop()
    keeper.close()


def test_a_key_written_at_once_is_not_failed_again_by_a_tick(
    store: Store, keeper: EpochKeeper, registry: ContextRegistry
) -> None:
    direct = RoundCipherCore(KeyGroupsFail(), keeper, registry, lease_timeout=WAIT)
    registry.open(R)
    (failed,) = direct.handle(stored(RoundOpened(round_id=R, deadline=T0 + 600)))
    assert isinstance(failed, RoundFailed)  # failed at once, by the handler
    assert direct.tick(T0) == []


def test_a_tick_leaves_an_unstored_round_alone_once_it_ended(ring: Keyring) -> None:
    store = KeyGroupsFail()
    keeper = open_keeper(store, ring, clock=ManualClock(T0), lease_timeout=WAIT)
    registry = ContextRegistry()
    core = RoundCipherCore(store, keeper, registry, lease_timeout=WAIT)
    runtime = DeterministicRuntime(store, ManualClock(T0), seed=1)
    runtime.subscribe(core)
    runtime.start()
    registry.open(R)
    runtime.publish([RoundOpened(round_id=R, deadline=T0 + 600)], source="test")
    with pytest.raises(StoreError):
        runtime.wait_idle(WAIT)
    registry.close(R)  # the round ended meanwhile (its deadline, say)
    runtime.tick()
    assert not any(isinstance(s.payload, RoundFailed) for s in store.read_events())
    runtime.stop()
    keeper.close()


def test_a_runaway_run_leaves_no_staged_write_holding_its_lease(
    store: Store, keeper: EpochKeeper, registry: ContextRegistry
) -> None:
    # One delivery allowed: the run stops with the first round keyed and the second
    # undelivered. The key's write must not wait for the next run, holding an epoch lease
    # that a ratchet on this very thread would wait for until its timeout.
    core = RoundCipherCore(store, keeper, registry, lease_timeout=WAIT)
    runtime = DeterministicRuntime(store, ManualClock(T0), seed=1, max_steps=1)
    runtime.subscribe(core)
    runtime.start()
    rounds = [RoundId(f"e3:runaway{i}") for i in range(2)]
    for rid in rounds:
        registry.open(rid)
    with pytest.raises(LifecycleError):
        runtime.publish(
            [RoundOpened(round_id=rid, deadline=T0 + 600) for rid in rounds], source="test"
        )
    assert core.held_rounds() == [rounds[0]]
    assert store.get_key(rounds[0]) is not None  # committed with its RoundKeyReady
    keeper.ratchet(timeout=0.5)  # no lease left behind: no wait
    blob = store.get_key(rounds[0])
    assert blob is not None
    assert read_wrapped_header(blob)[0] == keeper.epoch  # rewrapped by that ratchet
    runtime.stop()
    core.wipe_all()
