"""The storage epoch ratchet: wrap, ratchet, window, crash at every step, rotation, timer.

Crashes are taken as disk images: at each step of an epoch change a copy of everything
committed (store and slots) is made, and a fresh keeper opened over the copy must find
every live round key, with the interrupted change finished or undone. The SIGKILL
version of this runs in tests/forensics.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass

import pytest
from structlog.testing import capture_logs

from enclave_keys.clock import ManualClock
from enclave_keys.crypto import (
    Keyring,
    RoundCipher,
    SecretBytes,
    read_wrapped_header,
    unwrap_round_key,
    wrap_round_key,
)
from enclave_keys.epochs import (
    CLEAN_RECORD,
    ESTIMATED_RATCHET_SECONDS_PER_KEY,
    EpochChange,
    EpochKeeper,
    RatchetPhase,
    slot_status,
)
from enclave_keys.errors import (
    RatchetFailed,
    Sealed,
    StoreError,
    UnknownEpoch,
    UnwrapFailed,
)
from enclave_keys.ids import EpochNumber, KekVersion, RoundId
from enclave_keys.master import MasterKeys
from enclave_keys.store import LmdbStore, MemoryBacking, MemoryStore, Store
from enclave_keys.store.api import PreparedBatch
from enclave_keys.store.slots import SLOT_SIZE, MemorySlots, decode_slot

ROOT = bytes(range(0x40, 0x60))
WINDOW = 1.0
E1, E2, E3 = EpochNumber(1), EpochNumber(2), EpochNumber(3)
PHASES = ("slot_written", "keys_rewrapped", "old_slot_wiped")


def image(backing: MemoryBacking) -> MemoryBacking:
    """A copy of everything committed: what a crash at this instant leaves on disk."""
    slots = MemorySlots()
    for index in (0, 1):
        slots.write(index, backing.slots.read(index))
    return MemoryBacking(
        events=list(backing.events),
        round_keys=dict(backing.round_keys),
        snapshots=dict(backing.snapshots),
        meta=dict(backing.meta),
        slots=slots,
    )


def recorder(images: dict[str, MemoryBacking], backing: MemoryBacking) -> RatchetPhase:
    """A phase hook that takes a disk image at the first passage of every step."""

    def record(name: str) -> None:
        images.setdefault(name, image(backing))

    return record


def store_key(keeper: EpochKeeper, store: Store, name: str) -> RoundCipher:
    """Make and store a round key the way the round cipher does; returns the live cipher."""
    rid = RoundId(name)
    cipher = RoundCipher.generate(rid)
    with keeper.active_epoch() as epoch:
        store.put_key(rid, wrap_round_key(epoch, cipher))
    return cipher


def readable(keeper: EpochKeeper, store: Store) -> dict[RoundId, bytes]:
    """Round id -> key id of every stored key the keeper can open now."""
    found = {}
    for rid, blob in store.list_keys():
        number, key_id = read_wrapped_header(blob)
        try:
            with keeper.epoch_for(number) as epoch, unwrap_round_key(epoch, rid, blob):
                found[rid] = key_id.raw
        except (UnknownEpoch, UnwrapFailed):
            continue
    return found


def valid_slots(store: Store) -> list[int]:
    return [s.epoch.number for s in slot_status(store) if s.epoch is not None]


@dataclass
class Bench:
    """A keeper over a MemoryStore and a keyring, with a manual clock."""

    backing: MemoryBacking
    store: MemoryStore
    ring: Keyring
    clock: ManualClock
    keeper: EpochKeeper

    def reopen(self, backing: MemoryBacking | None = None) -> tuple[EpochKeeper, MemoryStore]:
        store = MemoryStore(backing or self.backing)
        keeper, _ = EpochKeeper.open(store, self.ring, clock=self.clock, window=WINDOW)
        return keeper, store


@pytest.fixture
def bench() -> Iterator[Bench]:
    backing = MemoryBacking()
    store = MemoryStore(backing)
    ring = Keyring.create()
    clock = ManualClock()
    keeper, recovery = EpochKeeper.open(store, ring, clock=clock, window=WINDOW)
    assert recovery.created
    assert recovery.epoch == E1
    yield Bench(backing, store, ring, clock, keeper)
    keeper.close()
    ring.seal(0.0, force=True)


# --- basics ----------------------------------------------------------------------------------


def test_a_fresh_store_gets_epoch_1_in_slot_0(bench: Bench) -> None:
    assert bench.keeper.epoch == E1
    assert bench.keeper.kek_version == KekVersion(1)
    states = slot_status(bench.store)
    assert [(s.state, s.epoch, s.sequence) for s in states] == [
        ("epoch", E1, 1),
        ("empty", None, None),
    ]


def test_keys_wrap_under_the_current_epoch_only(bench: Bench) -> None:
    with store_key(bench.keeper, bench.store, "a"):
        pass
    [(_, blob)] = bench.store.list_keys()
    assert read_wrapped_header(blob)[0] == E1
    with pytest.raises(UnknownEpoch), bench.keeper.epoch_for(E2):
        pass
    # the refused lookup left no lease behind: a ratchet gets in without waiting
    assert bench.keeper.ratchet(timeout=0.0).new_epoch == E2


def test_reopening_finds_the_same_epoch_and_every_key(bench: Bench) -> None:
    for name in "abc":
        store_key(bench.keeper, bench.store, name).wipe()
    before = readable(bench.keeper, bench.store)
    keeper, store = bench.reopen()
    try:
        assert keeper.epoch == E1
        assert readable(keeper, store) == before
    finally:
        keeper.close()


def test_the_repr_names_numbers_only(bench: Bench) -> None:
    assert repr(bench.keeper) == "EpochKeeper(epoch=1, kek_version=1, slot=0)"
    bench.keeper.close()
    assert repr(bench.keeper) == "EpochKeeper(closed)"


# --- the ratchet -----------------------------------------------------------------------------


def test_a_ratchet_rewraps_live_keys_and_destroys_the_old_epoch(bench: Bench) -> None:
    for name in "abcd":
        store_key(bench.keeper, bench.store, name).wipe()
    old_blobs = dict(bench.store.list_keys())
    before = readable(bench.keeper, bench.store)
    change = bench.keeper.ratchet("test")
    assert (change.old_epoch, change.new_epoch, change.rewrapped) == (E1, E2, 4)
    assert readable(bench.keeper, bench.store) == before, "every live key survives"
    assert all(read_wrapped_header(b)[0] == E2 for _, b in bench.store.list_keys())
    assert valid_slots(bench.store) == [2], "the old slot is wiped"
    assert bench.backing.slots.read(0) == bytes(SLOT_SIZE)
    for rid, blob in old_blobs.items():  # a lingering copy of an old blob opens no more
        with pytest.raises(UnknownEpoch), bench.keeper.epoch_for(read_wrapped_header(blob)[0]):
            pass
        assert rid in before


def test_slots_alternate_and_sequences_grow(bench: Bench) -> None:
    seen = []
    for _ in range(4):
        bench.keeper.ratchet()
        [slot] = [s for s in slot_status(bench.store) if s.state == "epoch"]
        seen.append((slot.index, slot.sequence, slot.epoch))
    assert seen == [(1, 2, E2), (0, 3, E3), (1, 4, EpochNumber(4)), (0, 5, EpochNumber(5))]
    assert bench.keeper.changes == 4


def test_a_purge_makes_a_ratchet_due_after_half_the_window(bench: Bench) -> None:
    assert bench.keeper.ratchet_if_due(bench.clock.now()) is None
    bench.keeper.purged()
    bench.clock.advance(WINDOW / 2 - 0.01)
    assert not bench.keeper.due(bench.clock.now())
    assert bench.keeper.ratchet_if_due(bench.clock.now()) is None
    bench.keeper.purged()  # a second purge joins the same batch
    bench.clock.advance(0.01)
    change = bench.keeper.ratchet_if_due(bench.clock.now())
    assert change is not None
    assert change.reason == "window"
    assert bench.keeper.pending_since is None
    assert bench.keeper.ratchet_pending() is None


def test_ratchet_pending_ratchets_only_when_something_was_purged(bench: Bench) -> None:
    assert bench.keeper.ratchet_pending() is None
    bench.keeper.purged()
    change = bench.keeper.ratchet_pending()
    assert change is not None
    assert change.new_epoch == E2


def test_unreadable_blobs_do_not_hold_the_ratchet_back(bench: Bench) -> None:
    store_key(bench.keeper, bench.store, "good").wipe()
    blob = bytearray(dict(bench.store.list_keys())[RoundId("good")])
    blob[-1] ^= 1
    bench.store.put_key(RoundId("tampered"), bytes(blob))
    change = bench.keeper.ratchet()
    assert (change.rewrapped, change.skipped) == (1, 1)
    assert list(readable(bench.keeper, bench.store)) == [RoundId("good")]


class FailingStore(MemoryStore):
    """Refuses the next write batch."""

    fail = False

    def _commit(self, batch: PreparedBatch) -> None:
        if self.fail:
            raise StoreError("disk full")
        super()._commit(batch)


class FailingSlots(MemorySlots):
    fail = False

    def write(self, index: int, raw: bytes) -> None:
        if self.fail:
            raise StoreError("slot write failed")
        super().write(index, raw)


def test_a_ratchet_whose_slot_write_fails_keeps_the_current_epoch() -> None:
    slots = FailingSlots()
    store = MemoryStore(MemoryBacking(slots=slots))
    ring = Keyring.create()
    keeper, _ = EpochKeeper.open(store, ring, clock=ManualClock())
    try:
        store_key(keeper, store, "a").wipe()
        before = readable(keeper, store)
        slots.fail = True
        with pytest.raises(StoreError):
            keeper.ratchet()
        slots.fail = False
        assert keeper.epoch == E1
        assert valid_slots(store) == [1]
        assert readable(keeper, store) == before
        store_key(keeper, store, "b").wipe()  # still under epoch 1, nothing held
        assert keeper.ratchet().new_epoch == EpochNumber(3), "epoch numbers are never reused"
        assert readable(keeper, store).keys() == {RoundId("a"), RoundId("b")}
    finally:
        keeper.close()
        ring.seal(0.0, force=True)


def test_a_ratchet_whose_rewrap_fails_is_finished_by_the_next() -> None:
    """New keys may already be wrapped under the new epoch when the rewrap's commit
    fails: the change stays begun (both epochs readable, both slots valid) rather than
    roll back, and the next ratchet finishes it."""
    backing = MemoryBacking()
    store = FailingStore(backing)
    ring = Keyring.create()
    keeper, _ = EpochKeeper.open(store, ring, clock=ManualClock())
    try:
        store_key(keeper, store, "a").wipe()
        store.fail = True
        with pytest.raises(RatchetFailed):
            keeper.ratchet()
        store.fail = False
        assert keeper.epoch == E2, "new keys wrap under the new epoch"
        store_key(keeper, store, "b").wipe()
        assert valid_slots(store) == [1, 2], "the old epoch is not destroyed yet"
        assert read_wrapped_header(store.list_keys()[0][1])[0] == E1, "'a' is not rewrapped"
        assert readable(keeper, store).keys() == {RoundId("b")}
        assert not keeper.mark_clean(), "a change begun is not a clean state"

        with capture_logs() as logs:
            change = keeper.ratchet_pending()
        assert change is not None
        finished = [
            (e["old_epoch"], e["new_epoch"], e["rewrapped"])
            for e in logs
            if e["event"] == "epoch_changed"
        ]
        assert finished == [(1, 2, 1), (2, 3, 2)], "the begun change finished, then a new one"
        assert (change.old_epoch, change.new_epoch, change.skipped) == (E2, E3, 0)
        assert valid_slots(store) == [3]
        assert readable(keeper, store).keys() == {RoundId("a"), RoundId("b")}
        assert all(read_wrapped_header(blob)[0] == E3 for _, blob in store.list_keys())
        assert keeper.ratchet_pending() is None
    finally:
        keeper.close()
        ring.seal(0.0, force=True)


def test_the_ratchet_that_finishes_a_change_also_covers_purges_made_since() -> None:
    """A key made under the new epoch after a failed rewrap, then purged: finishing the
    old change does not cover it, so the same ratchet (a stop's, a seal's) makes another."""
    store = FailingStore(MemoryBacking())
    ring = Keyring.create()
    keeper, _ = EpochKeeper.open(store, ring, clock=ManualClock())
    try:
        store_key(keeper, store, "a").wipe()
        keeper.purged()
        store.fail = True
        with pytest.raises(RatchetFailed):
            keeper.ratchet("window")
        store.fail = False
        store_key(keeper, store, "b").wipe()
        purged = store.get_key(RoundId("b"))
        assert purged is not None
        assert read_wrapped_header(purged)[0] == E2
        with keeper.hold_ratchet():
            store.delete_key(RoundId("b"))
        keeper.purged()

        change = keeper.ratchet_pending()
        assert change is not None
        assert (change.old_epoch, change.new_epoch) == (E2, E3)
        assert valid_slots(store) == [3], "the purged key's epoch is destroyed too"
        assert keeper.pending_since is None
        assert keeper.changes == 2
        assert readable(keeper, store).keys() == {RoundId("a")}
    finally:
        keeper.close()
        ring.seal(0.0, force=True)


class WipeFailingSlots(MemorySlots):
    """Refuses to zero one slot (an I/O error on the old slot's wipe)."""

    refuse: int | None = None

    def write(self, index: int, raw: bytes) -> None:
        if index == self.refuse and raw == bytes(len(raw)):
            raise StoreError("slot wipe failed")
        super().write(index, raw)


def test_a_rotation_whose_old_slot_cannot_be_wiped_still_rotates() -> None:
    """The keyring has committed: the rotation stands (the master takes the new KEK),
    the change stays begun, the next ratchet finishes it, and every key survives later
    ratchets and a restart."""
    slots = WipeFailingSlots()
    backing = MemoryBacking(slots=slots)
    store = MemoryStore(backing)
    master = MasterKeys.initialise(store, SecretBytes.from_bytes(ROOT), "raw")
    keeper, _ = EpochKeeper.open(store, master, clock=ManualClock())
    names = {RoundId(name) for name in "abc"}
    try:
        for name in "abc":
            store_key(keeper, store, name).wipe()
        slots.refuse = keeper._index
        with capture_logs() as logs:
            rotation = keeper.rotate_kek(master)
        assert rotation.new_version == KekVersion(2)
        assert [e["event"] for e in logs if e["log_level"] == "error"] == [
            "epoch_change_unfinished"
        ]
        assert master.active_version == keeper.kek_version == KekVersion(2)
        assert valid_slots(store) == [1, 2]
        slots.refuse = None
        assert keeper.due(0.0), "a change left begun is due"
        assert keeper.ratchet().old_epoch == E2, "the next ratchet finishes it, then its own"
        assert valid_slots(store) == [3]
        keeper.ratchet()
        assert readable(keeper, store).keys() == names
    finally:
        keeper.close()
        master.seal(0.0, force=True)
    reopened = MasterKeys.open(MemoryStore(backing), SecretBytes.from_bytes(ROOT), "raw")
    try:
        keeper, recovery = EpochKeeper.open(MemoryStore(backing), reopened, clock=ManualClock())
        try:
            assert not recovery.created
            assert readable(keeper, MemoryStore(backing)).keys() == names
        finally:
            keeper.close()
    finally:
        reopened.seal(0.0, force=True)


class PausingStore(MemoryStore):
    """Holds the ratchet's listing of the live keys until the test lets it go on."""

    def __init__(self, backing: MemoryBacking) -> None:
        super().__init__(backing)
        self.listing = threading.Event()
        self.go_on = threading.Event()

    def list_key_records(self) -> list[tuple[bytes, bytes]]:
        records = super().list_key_records()
        self.listing.set()
        assert self.go_on.wait(30.0), "the test never let the ratchet go on"
        return records


def test_keys_are_made_and_deleted_while_a_ratchet_rewraps() -> None:
    """Only the switch keeps wraps and deletes out: while the live keys are rewrapped, a
    new key wraps under the new epoch at once and a deleted key stays deleted."""
    store = PausingStore(MemoryBacking())
    ring = Keyring.create()
    clock = ManualClock()
    keeper, _ = EpochKeeper.open(store, ring, clock=clock, lease_timeout=2.0)
    outcome: list[object] = []
    try:
        for name in ("kept", "gone"):
            store_key(keeper, store, name).wipe()
        ratchet = threading.Thread(target=lambda: outcome.append(keeper.ratchet()))
        ratchet.start()
        assert store.listing.wait(30.0)

        store_key(keeper, store, "new").wipe()  # a LeaseTimeout here: the wrap was held
        with keeper.hold_ratchet():
            store.delete_key(RoundId("gone"))
        keeper.purged()
        store.go_on.set()
        ratchet.join(30.0)

        (change,) = outcome
        assert isinstance(change, EpochChange)
        assert (change.old_epoch, change.new_epoch, change.skipped) == (E1, E2, 0)
        epochs = {rid.value: read_wrapped_header(blob)[0] for rid, blob in store.list_keys()}
        assert epochs == {"kept": E2, "new": E2}, "the deleted key did not come back"
        assert readable(keeper, store).keys() == {RoundId("kept"), RoundId("new")}
        assert valid_slots(store) == [2]
        assert keeper.pending_since == clock.now(), "the purge after the switch waits"
    finally:
        store.go_on.set()
        keeper.close()
        ring.seal(0.0, force=True)


def test_a_ratchet_due_while_another_runs_is_not_made_twice() -> None:
    """A tick that finds a ratchet due while the timer's covers the same purges waits for
    it and then makes none of its own (at 100,000 live keys that would be another second)."""
    store = PausingStore(MemoryBacking())
    ring = Keyring.create()
    clock = ManualClock()
    keeper, _ = EpochKeeper.open(store, ring, clock=clock, window=WINDOW)
    results: list[object] = []
    try:
        store_key(keeper, store, "a").wipe()
        keeper.purged()
        clock.advance(WINDOW)
        first = threading.Thread(target=lambda: results.append(keeper.ratchet_pending()))
        first.start()
        assert store.listing.wait(30.0)
        assert keeper.due(clock.now()), "still due: the running change has not finished"
        asking = threading.Event()
        one_change = keeper._one_change

        def ask_then_wait(wait: float) -> AbstractContextManager[None]:
            asking.set()  # past its first look at due(): it waits for the running change
            return one_change(wait)

        keeper._one_change = ask_then_wait  # type: ignore[method-assign, assignment]
        second = threading.Thread(target=lambda: results.append(keeper.ratchet_if_due(clock.now())))
        second.start()
        assert asking.wait(30.0)
        store.go_on.set()
        first.join(30.0)
        second.join(30.0)
        assert sorted(map(type, results), key=str) == sorted([EpochChange, type(None)], key=str)
        assert keeper.changes == 1
    finally:
        store.go_on.set()
        keeper.close()
        ring.seal(0.0, force=True)


class CollectorWatchingStore(MemoryStore):
    """Records whether the cyclic collector was on when the keys were listed and written."""

    def __init__(self, backing: MemoryBacking) -> None:
        super().__init__(backing)
        self.collector_on: list[bool] = []

    def list_key_records(self) -> list[tuple[bytes, bytes]]:
        self.collector_on.append(gc.isenabled())
        return super().list_key_records()

    def _commit(self, batch: PreparedBatch) -> None:
        self.collector_on.append(gc.isenabled())
        super()._commit(batch)


def test_a_ratchet_rewraps_with_the_collector_paused_and_turns_it_back_on() -> None:
    store = CollectorWatchingStore(MemoryBacking())
    ring = Keyring.create()
    keeper, _ = EpochKeeper.open(store, ring, clock=ManualClock())
    try:
        store_key(keeper, store, "a").wipe()
        store.collector_on.clear()
        assert gc.isenabled()
        keeper.ratchet()
        # The rewrap's listing and its commit ran with it off (the slot writes need not).
        assert store.collector_on == [False, False]
        assert gc.isenabled()
        assert readable(keeper, store).keys() == {RoundId("a")}
    finally:
        keeper.close()
        ring.seal(0.0, force=True)


# --- crash at every step --------------------------------------------------------------------


@pytest.mark.parametrize("phase", PHASES)
def test_a_crash_at_any_step_of_a_ratchet_loses_no_live_key(bench: Bench, phase: str) -> None:
    for name in "abcdef":
        store_key(bench.keeper, bench.store, name).wipe()
    before = readable(bench.keeper, bench.store)
    images: dict[str, MemoryBacking] = {}
    bench.keeper._phase_hook = recorder(images, bench.backing)
    bench.keeper.ratchet()
    crashed = images[phase]
    if phase != "old_slot_wiped":
        assert len(valid_slots(MemoryStore(crashed))) == 2, "both slots valid mid-change"
    keeper, store = bench.reopen(crashed)
    try:
        assert keeper.epoch == E2, "recovery finishes the change"
        assert readable(keeper, store) == before
        assert valid_slots(store) == [2], "and wipes the stale slot"
        assert all(read_wrapped_header(b)[0] == E2 for _, b in store.list_keys())
    finally:
        keeper.close()


@pytest.mark.parametrize("phase", PHASES)
def test_a_crash_at_any_step_of_a_kek_rotation_loses_no_live_key(phase: str) -> None:
    backing = MemoryBacking()
    store = MemoryStore(backing)
    master = MasterKeys.initialise(store, SecretBytes.from_bytes(ROOT), "raw")
    keeper, _ = EpochKeeper.open(store, master, clock=ManualClock())
    images: dict[str, MemoryBacking] = {}
    try:
        for name in "abcd":
            store_key(keeper, store, name).wipe()
        before = readable(keeper, store)
        keeper._phase_hook = recorder(images, backing)
        rotation = keeper.rotate_kek(master)
        assert (rotation.new_version, rotation.rewrapped) == (KekVersion(2), 4)
        assert keeper.kek_version == KekVersion(2)
    finally:
        keeper.close()
        master.seal(0.0, force=True)
    crashed = MemoryStore(images[phase])
    reopened = MasterKeys.open(crashed, SecretBytes.from_bytes(ROOT), "raw")
    try:
        keeper2, recovery = EpochKeeper.open(crashed, reopened, clock=ManualClock())
        try:
            assert readable(keeper2, crashed) == before
            committed = phase != "slot_written"
            assert reopened.active_version == KekVersion(2 if committed else 1)
            assert keeper2.kek_version == reopened.active_version
            assert keeper2.epoch == (E2 if committed else E1), "rolled forward or back"
            assert len(valid_slots(crashed)) == 1
            if phase != "old_slot_wiped":
                assert recovery.wiped_slots, "the stale slot is wiped"
        finally:
            keeper2.close()
    finally:
        reopened.seal(0.0, force=True)


def test_a_crash_before_the_rewrap_commits_is_rolled_forward(bench: Bench) -> None:
    for name in "abc":
        store_key(bench.keeper, bench.store, name).wipe()
    images: dict[str, MemoryBacking] = {}
    bench.keeper._phase_hook = recorder(images, bench.backing)
    bench.keeper.ratchet()
    keeper, store = bench.reopen(images["slot_written"])
    try:
        assert keeper.epoch == E2
        assert readable(keeper, store).keys() == {RoundId(n) for n in "abc"}
    finally:
        keeper.close()


# --- lost and damaged slots -------------------------------------------------------------------


def test_a_corrupt_slot_is_wiped_at_open(bench: Bench) -> None:
    bench.backing.slots.write(1, b"\xff" * SLOT_SIZE)
    keeper, _store = bench.reopen()
    try:
        assert keeper.epoch == E1
        assert bench.backing.slots.read(1) == bytes(SLOT_SIZE)
    finally:
        keeper.close()


def test_lost_slots_leave_stored_keys_unreadable_and_start_a_new_epoch(bench: Bench) -> None:
    store_key(bench.keeper, bench.store, "a").wipe()
    bench.keeper.ratchet()  # stored blobs now name epoch 2
    for index in (0, 1):
        bench.backing.slots.write(index, bytes(SLOT_SIZE))
    with capture_logs() as logs:
        keeper, store = bench.reopen()
    try:
        assert keeper.epoch == E3, "a new number above every stored one"
        assert readable(keeper, store) == {}
        assert any(e["event"] == "epoch_keys_lost" for e in logs)
    finally:
        keeper.close()


def test_a_slot_under_an_unknown_kek_version_is_wiped(bench: Bench) -> None:
    other = Keyring.create().rotated()  # active v2: unknown to bench.ring
    try:
        stranger, _ = EpochKeeper.open(MemoryStore(), other, clock=bench.clock)
        stranger.close()
        raw = stranger._slots.read(0)
    finally:
        other.seal(0.0, force=True)
    bench.backing.slots.write(1, raw)
    assert decode_slot(raw) is not None
    keeper, _ = bench.reopen()
    try:
        assert keeper.epoch == E1
        assert bench.backing.slots.read(1) == bytes(SLOT_SIZE)
    finally:
        keeper.close()


# --- close, timer, LMDB --------------------------------------------------------------------


def test_close_wipes_the_epoch_key_and_refuses_use(bench: Bench) -> None:
    with bench.keeper.active_epoch() as epoch:
        pass
    bench.keeper.close()
    assert epoch.is_wiped
    with pytest.raises(Sealed), bench.keeper.active_epoch():
        pass
    with bench.keeper.hold_ratchet():  # deletes still may proceed
        pass


def test_the_timer_ratchets_on_real_time_after_a_purge(bench: Bench) -> None:
    keeper, _store = bench.reopen()
    done = threading.Event()
    keeper._phase_hook = lambda name: done.set() if name == "old_slot_wiped" else None
    try:
        keeper.start_timer()
        keeper.start_timer()  # idempotent
        assert not done.wait(0.05), "nothing purged, nothing to do"
        keeper.purged()
        assert done.wait(10.0), "the timer ratchets within the window"
        assert keeper.changes == 1
    finally:
        keeper.close()
    assert keeper._timer is None


def test_the_keeper_works_over_lmdb_files(tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path))
    ring = Keyring.create()
    try:
        with LmdbStore.open(path) as store:
            keeper, _ = EpochKeeper.open(store, ring, clock=ManualClock())
            store_key(keeper, store, "a").wipe()
            keeper.ratchet()
            keeper.close()
        with LmdbStore.open(path) as store:
            keeper, recovery = EpochKeeper.open(store, ring, clock=ManualClock())
            try:
                assert not recovery.created
                assert keeper.epoch == E2
                assert list(readable(keeper, store)) == [RoundId("a")]
            finally:
                keeper.close()
    finally:
        ring.seal(0.0, force=True)


# --- the clean record: a clean stop lets the next start skip its ratchet --------------


def test_a_clean_mark_lets_the_next_open_skip_its_start_ratchet_once(bench: Bench) -> None:
    assert not bench.keeper.clean_at_open  # a fresh store
    assert bench.keeper.mark_clean()
    bench.keeper.close()
    keeper, _ = bench.reopen()
    assert keeper.clean_at_open
    assert bench.store.get_meta(CLEAN_RECORD) is None  # taken by that open
    keeper.close()
    again, _ = bench.reopen()  # a crash after that open would come back here
    assert not again.clean_at_open
    again.close()


def test_no_clean_mark_while_a_purge_waits_for_its_epoch_change(bench: Bench) -> None:
    bench.keeper.purged()
    assert not bench.keeper.mark_clean()
    assert bench.store.get_meta(CLEAN_RECORD) is None
    bench.keeper.ratchet_pending()
    assert bench.keeper.mark_clean()


def test_a_purge_after_the_clean_mark_takes_it_back(bench: Bench) -> None:
    assert bench.keeper.mark_clean()
    bench.keeper.purged()
    assert bench.store.get_meta(CLEAN_RECORD) is None
    bench.keeper.close()
    keeper, _ = bench.reopen()
    assert not keeper.clean_at_open
    keeper.close()


def test_a_clean_mark_for_another_epoch_counts_for_nothing(bench: Bench) -> None:
    assert bench.keeper.mark_clean()  # names epoch 1
    bench.keeper.close()
    keeper, _ = bench.reopen()
    keeper.ratchet()  # epoch 2, no mark taken for it
    keeper.close()
    bench.store.put_meta(CLEAN_RECORD, E1.to_bytes())  # a stale record (a restored backup)
    stale, _ = bench.reopen()
    assert not stale.clean_at_open
    stale.close()


# --- the window, measured -------------------------------------------------------------------


@pytest.fixture
def timed() -> Iterator[tuple[EpochKeeper, ManualClock]]:
    """A keeper whose monotonic clock is a manual one, with ten live keys."""
    store = MemoryStore(MemoryBacking())
    ring = Keyring.create()
    clock = ManualClock()
    keeper, _ = EpochKeeper.open(store, ring, clock=clock, window=WINDOW, monotonic=clock.now)
    for n in range(10):
        store_key(keeper, store, f"e3:timed{n}").wipe()
    yield keeper, clock
    keeper.close()
    ring.seal(0.0, force=True)


def taking(clock: ManualClock, seconds: float) -> RatchetPhase:
    """A phase hook that makes the rewrap step take ``seconds`` on ``clock``."""

    def hook(name: str) -> None:
        if name == "keys_rewrapped":
            clock.advance(seconds)

    return hook


def test_the_timer_starts_half_a_window_early_or_twice_the_last_ratchet(
    timed: tuple[EpochKeeper, ManualClock],
) -> None:
    keeper, clock = timed
    assert keeper.timer_lead == WINDOW / 2  # nothing measured yet
    for took, lead in [(0.1, WINDOW / 2), (0.3, 0.6), (0.45, 0.9), (0.7, WINDOW), (0.0, 0.5)]:
        keeper._phase_hook = taking(clock, took)
        keeper.ratchet()
        assert keeper.timer_lead == pytest.approx(lead)


def test_before_its_first_ratchet_the_timer_estimates_one_from_the_live_keys() -> None:
    many = int(0.6 * WINDOW / ESTIMATED_RATCHET_SECONDS_PER_KEY)  # an estimated 0.6 window
    store = MemoryStore(MemoryBacking())
    with store.write() as batch:
        batch.put_key_records([(f"e3:{n}".encode(), b"blob") for n in range(many)])
    ring = Keyring.create()
    keeper, _ = EpochKeeper.open(store, ring, clock=ManualClock(), window=WINDOW)
    try:
        assert keeper.timer_lead == WINDOW  # twice the estimate, at most the window
    finally:
        keeper.close()
        ring.seal(0.0, force=True)


def test_a_ratchet_that_ends_after_the_window_is_counted_and_logged(
    timed: tuple[EpochKeeper, ManualClock],
) -> None:
    keeper, clock = timed
    keeper.purged()
    clock.advance(WINDOW / 2)
    keeper._phase_hook = taking(clock, WINDOW / 2 - 0.01)
    keeper.ratchet_pending()  # ends 0.99 window after the purge
    assert keeper.window_misses == 0

    keeper.purged()
    clock.advance(WINDOW / 2)
    keeper._phase_hook = taking(clock, WINDOW / 2 + 0.25)
    with capture_logs() as logs:
        keeper.ratchet_pending()  # ends 1.25 windows after the purge
    assert keeper.window_misses == 1
    [missed] = [entry for entry in logs if entry["event"] == "epoch_window_missed"]
    assert missed["late_by"] == pytest.approx(0.25)
    assert missed["ratchet_seconds"] == pytest.approx(WINDOW / 2 + 0.25)

    keeper._phase_hook = taking(clock, 5 * WINDOW)
    keeper.ratchet()  # nothing purged: no window to miss
    assert keeper.window_misses == 1


def test_a_kek_rotation_that_ends_after_the_window_is_counted_and_logged() -> None:
    """A rotation is an epoch change too: it destroys the epoch that wrapped the purged
    keys, so it is held to the same window as a ratchet (and times the timer's lead)."""
    store = MemoryStore(MemoryBacking())
    master = MasterKeys.initialise(store, SecretBytes.from_bytes(ROOT), "raw")
    clock = ManualClock()
    keeper, _ = EpochKeeper.open(store, master, clock=clock, window=WINDOW, monotonic=clock.now)
    try:
        store_key(keeper, store, "e3:kept").wipe()
        keeper.purged()
        clock.advance(WINDOW / 2)
        keeper._phase_hook = taking(clock, WINDOW / 2 - 0.01)
        keeper.rotate_kek(master)  # ends 0.99 window after the purge
        assert keeper.window_misses == 0
        assert keeper.pending_since is None
        assert keeper.timer_lead == pytest.approx(WINDOW - 0.02)  # twice the rotation

        keeper.purged()
        clock.advance(WINDOW / 2)
        keeper._phase_hook = taking(clock, WINDOW / 2 + 0.25)
        with capture_logs() as logs:
            keeper.rotate_kek(master)  # ends 1.25 windows after the purge
        assert keeper.window_misses == 1
        [missed] = [entry for entry in logs if entry["event"] == "epoch_window_missed"]
        assert missed["late_by"] == pytest.approx(0.25)
        assert keeper.timer_lead == pytest.approx(WINDOW)  # 2 x 0.75, at most the window

        keeper._phase_hook = taking(clock, 5 * WINDOW)
        keeper.rotate_kek(master)  # nothing purged: no window to miss
        assert keeper.window_misses == 1
        assert readable(keeper, store).keys() == {RoundId("e3:kept")}
    finally:
        keeper.close()
        master.seal(0.0, force=True)


def test_a_rotation_left_begun_counts_its_purge_when_a_ratchet_finishes_it() -> None:
    slots = WipeFailingSlots()
    store = MemoryStore(MemoryBacking(slots=slots))
    master = MasterKeys.initialise(store, SecretBytes.from_bytes(ROOT), "raw")
    clock = ManualClock()
    keeper, _ = EpochKeeper.open(store, master, clock=clock, window=WINDOW, monotonic=clock.now)
    try:
        keeper.purged()
        slots.refuse = keeper._index
        keeper.rotate_kek(master)  # the old slot stays: the change is begun
        assert keeper.window_misses == 0
        slots.refuse = None
        clock.advance(2 * WINDOW)
        keeper.ratchet()  # finishes the rotation two windows after the purge
        assert keeper.window_misses == 1
        assert valid_slots(store) == [3]
    finally:
        keeper.close()
        master.seal(0.0, force=True)


def test_a_purge_reported_while_a_ratchet_runs_is_pending_from_its_own_time(
    timed: tuple[EpochKeeper, ManualClock],
) -> None:
    """A delete settled just before a ratchet took the epoch reports its purge while the
    ratchet runs: it stays pending (one more ratchet), timed from that report, not from
    the earlier purges the ratchet covered."""
    keeper, clock = timed
    keeper.purged()  # t = 0
    clock.advance(0.5)

    def report_a_purge_midway(name: str) -> None:
        if name == "keys_rewrapped":
            clock.advance(0.2)
            keeper.purged()  # t = 0.7
            clock.advance(0.1)

    keeper._phase_hook = report_a_purge_midway
    keeper.ratchet_pending()  # 0.5 -> 0.8: inside the first purge's window
    assert keeper.pending_since == pytest.approx(clock.now() - 0.1)
    assert keeper.window_misses == 0

    keeper._phase_hook = taking(clock, 0.4)
    clock.advance(0.4)
    keeper.ratchet_pending()  # 1.2 -> 1.6: inside the window of the purge at 0.7
    assert keeper.pending_since is None
    assert keeper.window_misses == 0


def test_the_timer_counts_from_the_purge_not_from_when_it_woke() -> None:
    """A purge already older than the timer's lead when the timer looks at it (the timer
    was busy, or started late) is ratcheted at once: with a 60 s window, waiting half a
    window from the wake-up would take 30 s."""
    store = MemoryStore(MemoryBacking())
    ring = Keyring.create()
    clock = ManualClock()
    keeper, _ = EpochKeeper.open(store, ring, clock=clock, window=60.0, monotonic=clock.now)
    done = threading.Event()
    keeper._phase_hook = lambda name: done.set() if name == "old_slot_wiped" else None
    try:
        keeper.purged()
        clock.advance(45.0)  # past the lead (30 s before the window closes)
        keeper.start_timer()
        assert done.wait(10.0), "the timer ratchets at once"
        assert keeper.changes == 1
    finally:
        keeper.close()
        ring.seal(0.0, force=True)
