"""MasterKeys: the keyring in the store — initialise, open, rotate, rekey, seal, crash.

A KEK wraps the storage epoch key, which wraps the round keys: a rotation rewraps through
the epoch keeper's hook (``EpochKeeper.rotate_kek``), so these tests run the master keys
together with an :class:`~enclave_keys.epochs.EpochKeeper` over the same store.
"""

from __future__ import annotations

import queue
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest
from structlog.testing import capture_logs

from enclave_keys.clock import ManualClock
from enclave_keys.context import ContextRegistry
from enclave_keys.crypto import (
    EpochKey,
    Kek,
    KekSource,
    KekState,
    RoundCipher,
    SecretBytes,
    read_wrapped_header,
    wrap_round_key,
)
from enclave_keys.epochs import EpochKeeper, EpochRecovery, slot_status
from enclave_keys.errors import (
    AlreadyInitialised,
    CorruptRecord,
    InvalidIdentifier,
    KekRetired,
    LeaseTimeout,
    MasterKeyError,
    Sealed,
    StoreError,
    UnknownKekVersion,
    UnsealMismatch,
    UnwrapFailed,
)
from enclave_keys.events import (
    FailureReason,
    KekRotated,
    RoundComplete,
    RoundFailed,
    RoundKeyReady,
    RoundOpened,
    RoundPurged,
)
from enclave_keys.ids import EpochNumber, KekVersion, RoundId
from enclave_keys.master import KEYRING_RECORD, METHOD_RECORD, KekRotation, MasterKeys
from enclave_keys.round_cipher import ROUND_CIPHER, LeasedRoundCipher, RoundCipherCore
from enclave_keys.store import LmdbStore, MemoryBacking, MemoryStore, Store, WriteBatch
from enclave_keys.store.api import PreparedBatch, PutKey, PutMeta
from enclave_keys.store.slots import SLOT_COUNT
from tests import crash_rotation_child as child
from tests.actors.helpers import T0, StoreOpener, lmdb_opener, memory_opener, open_keeper, stored

WAIT = 10.0  # bound on every wait for another thread or process
ROOT = bytes(range(0x80, 0xA0))
OTHER_ROOT = bytes(range(0xA0, 0xC0))
V1, V2, V3 = KekVersion(1), KekVersion(2), KekVersion(3)
E1, E2 = EpochNumber(1), EpochNumber(2)
PASSPHRASE_RECORDS = {"unseal.passphrase.kdf": b"kdf parameters and salt"}


def root_key(raw: bytes = ROOT) -> SecretBytes:
    return SecretBytes.from_bytes(raw)


class RecordingStore(MemoryStore):
    """A memory store that remembers its batches and can be told to fail or block one."""

    def __init__(self, backing: MemoryBacking | None = None) -> None:
        super().__init__(backing)
        self.batches: list[PreparedBatch] = []
        self.fail_next_commit = False
        self.block_commit: threading.Event | None = None
        self.in_commit = threading.Event()
        self.block_listing: threading.Event | None = None
        self.in_listing = threading.Event()
        self.block_put: threading.Event | None = None
        self.in_put = threading.Event()

    def list_key_records(self) -> list[tuple[bytes, bytes]]:
        if self.block_listing is not None:  # only a rotation lists keys in these tests
            self.in_listing.set()
            assert self.block_listing.wait(WAIT)
        return super().list_key_records()

    def _commit(self, batch: PreparedBatch) -> None:
        if self.block_put is not None and any(isinstance(op, PutKey) for op in batch.operations):
            self.in_put.set()
            assert self.block_put.wait(WAIT)
        if self.fail_next_commit:
            self.fail_next_commit = False
            raise StoreError("disk full")
        if self.block_commit is not None:
            self.in_commit.set()
            assert self.block_commit.wait(WAIT)
        super()._commit(batch)
        self.batches.append(batch)


Disk = tuple[dict[bytes, bytes], dict[bytes, bytes], tuple[bytes, ...]]


def disk(store: MemoryStore) -> Disk:
    """Everything a master-key operation may write: round keys, metadata, epoch slots."""
    slots = store.backing.slots
    return (
        dict(store.backing.round_keys),
        dict(store.backing.meta),
        tuple(slots.read(index) for index in range(SLOT_COUNT)),
    )


def recover(store: Store, keks: KekSource, probes: dict[RoundId, bytes]) -> EpochRecovery:
    """Recover every round in ``probes`` as a restarted node would — a FRESH epoch keeper
    opened from the slot file under ``keks``, then hydration — and check each key opens
    its probe. Returns what the keeper found in the slot file."""
    keeper, recovery = EpochKeeper.open(store, keks, clock=ManualClock(T0))
    try:
        registry = ContextRegistry()
        core = RoundCipherCore(store, keeper, registry)
        report = core.hydrate(list(probes))
        assert report.ok, report
        assert set(report.hydrated) == set(probes)
        for rid, probe in probes.items():
            context = registry.get(rid)
            assert context is not None
            with context.require(ROUND_CIPHER).lease() as cipher:
                assert cipher.open("probe", probe) == rid.to_bytes()
        core.wipe_all()
    finally:
        keeper.close()
    return recovery


@dataclass
class Rounds:
    """Round keys made through a RoundCipherCore whose epoch keeper keeps its epoch key
    under ``master``'s KEK."""

    store: Store
    master: MasterKeys
    registry: ContextRegistry = field(default_factory=ContextRegistry)
    probes: dict[RoundId, bytes] = field(default_factory=dict)
    keeper: EpochKeeper = field(init=False)
    core: RoundCipherCore = field(init=False)

    def __post_init__(self) -> None:
        self.keeper = open_keeper(self.store, self.master, lease_timeout=WAIT)
        self.core = RoundCipherCore(self.store, self.keeper, self.registry, lease_timeout=WAIT)

    def rotate(self, timeout: float = WAIT) -> KekRotation:
        """Rotate the KEK as the node does: an epoch change through the keeper."""
        return self.keeper.rotate_kek(self.master, timeout=timeout)

    def create(self, round_id: RoundId) -> RoundKeyReady:
        self.registry.open(round_id)
        (ready,) = self.core.handle(stored(RoundOpened(round_id=round_id, deadline=T0 + 600)))
        assert isinstance(ready, RoundKeyReady), ready
        with self.leased(round_id).lease() as cipher:
            self.probes[round_id] = cipher.seal("probe", round_id.to_bytes())
        return ready

    def purge(self, round_id: RoundId) -> None:
        (purged,) = self.core.handle(stored(RoundComplete(round_id=round_id)))
        assert isinstance(purged, RoundPurged)
        self.registry.close(round_id)
        del self.probes[round_id]

    def leased(self, round_id: RoundId) -> LeasedRoundCipher:
        context = self.registry.get(round_id)
        assert context is not None
        return context.require(ROUND_CIPHER)

    def check_stored(self, master: MasterKeys, version: KekVersion) -> None:
        """Exactly the live rounds are stored, each under the current epoch, whose key the
        slot file keeps (alone) under KEK ``version``; each is the same round key, as a
        fresh keeper opened from the slot file with ``master`` finds."""
        stored_keys = self.store.list_keys()
        assert {rid for rid, _ in stored_keys} == set(self.probes)
        epoch = self.keeper.epoch
        assert self.keeper.kek_version == version
        in_use = [slot for slot in slot_status(self.store) if slot.state != "empty"]
        assert [(s.state, s.epoch, s.kek_version) for s in in_use] == [("epoch", epoch, version)]
        for rid, blob in stored_keys:
            assert read_wrapped_header(blob) == (epoch, self.leased(rid).key_id)
            with self.leased(rid).lease() as live:  # the cipher in memory never changed
                assert live.open("probe", self.probes[rid]) == rid.to_bytes()
        recovery = recover(self.store, master, self.probes)
        assert (recovery.epoch, recovery.created, recovery.rolled_forward) == (epoch, False, 0)
        assert recovery.wiped_slots == ()  # a consistent disk: nothing to clean up

    def close(self) -> None:
        self.core.wipe_all()
        self.keeper.close()


@pytest.fixture(params=["memory", "lmdb"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> StoreOpener:
    return memory_opener() if request.param == "memory" else lmdb_opener(tmp_path / "store")


@pytest.fixture
def store(opener: StoreOpener) -> Iterator[Store]:
    with opener() as opened:
        yield opened


@pytest.fixture
def master(store: Store) -> Iterator[MasterKeys]:
    made = MasterKeys.initialise(store, root_key(), "passphrase", PASSPHRASE_RECORDS)
    yield made
    made.seal(0.0, force=True)


# --- initialise and open ---------------------------------------------------------------------


def test_initialise_writes_records_method_and_keyring_in_one_batch() -> None:
    store = RecordingStore()
    assert not MasterKeys.is_initialised(store)
    assert MasterKeys.method_of(store) is None
    master = MasterKeys.initialise(store, root_key(), "passphrase", PASSPHRASE_RECORDS)
    (batch,) = store.batches
    names = [op.key for op in batch.operations if isinstance(op, PutMeta)]
    assert names == [b"unseal.passphrase.kdf", METHOD_RECORD.encode(), KEYRING_RECORD.encode()]
    assert MasterKeys.is_initialised(store)
    assert MasterKeys.method_of(store) == "passphrase"
    assert store.get_meta("unseal.passphrase.kdf") == PASSPHRASE_RECORDS["unseal.passphrase.kdf"]
    assert master.method == "passphrase"
    assert master.active_version == V1
    assert master.versions() == [(V1, KekState.ACTIVE)]
    master.seal()


def test_initialise_refuses_an_initialised_store(master: MasterKeys, store: Store) -> None:
    blob = store.get_meta(KEYRING_RECORD)
    root = root_key(OTHER_ROOT)
    with pytest.raises(AlreadyInitialised):
        MasterKeys.initialise(store, root, "shamir", {"unseal.shamir": b"x"})
    assert root.is_wiped  # ownership was taken, and the root is wiped on failure
    assert store.get_meta(KEYRING_RECORD) == blob
    assert MasterKeys.method_of(store) == "passphrase"
    assert store.get_meta("unseal.shamir") is None


def test_initialise_refuses_a_store_that_lost_its_keyring(master: MasterKeys, store: Store) -> None:
    """A store with a method record but no keyring was initialised: a new keyring over
    it (what a node's start would do for a store with none) would orphan every round key."""
    with store.write() as batch:
        batch.delete_meta(KEYRING_RECORD)
    root = root_key(OTHER_ROOT)
    with pytest.raises(CorruptRecord, match="keyring is lost"):
        MasterKeys.initialise(store, root, "passphrase")
    assert root.is_wiped
    assert store.get_meta(KEYRING_RECORD) is None
    assert MasterKeys.method_of(store) == "passphrase"


def test_a_failed_initialise_writes_nothing() -> None:
    store = RecordingStore()
    before = disk(store)
    store.fail_next_commit = True
    with pytest.raises(StoreError):
        MasterKeys.initialise(store, root_key(), "raw", {"unseal.raw": b"x"})
    with pytest.raises(InvalidIdentifier):  # the store's own reserved names, refused in the batch
        MasterKeys.initialise(store, root_key(), "raw", {"store.format_version": b"x"})
    assert disk(store) == before
    assert not MasterKeys.is_initialised(store)


@pytest.mark.parametrize(
    "bad",
    [
        {"method": ""},
        {"method": "Passphrase"},
        {"method": "pass phrase"},
        {"method": "x" * 33},
        {"method": 7},
        {"records": {"master.keyring": b"x"}},
        {"records": {"master.extra": b"x"}},
    ],
)
def test_initialise_validates_method_and_record_names(bad: dict[str, object]) -> None:
    store = MemoryStore()
    root = root_key()
    arguments: dict[str, object] = {"method": "raw", "records": {}} | bad
    with pytest.raises(InvalidIdentifier):
        MasterKeys.initialise(store, root, arguments["method"], arguments["records"])  # type: ignore[arg-type]
    assert root.is_wiped
    assert not MasterKeys.is_initialised(store)


def test_open_restores_the_keyring(master: MasterKeys, store: Store) -> None:
    rounds = Rounds(store, master)
    rounds.create(RoundId("a"))
    rounds.rotate()
    again = MasterKeys.open(store, root_key(), "passphrase")
    assert again.versions() == master.versions() == [(V1, KekState.RETIRED), (V2, KekState.ACTIVE)]
    rounds.check_stored(again, V2)
    again.seal()
    rounds.close()


def test_open_refuses_a_mismatch_or_a_wrong_root(master: MasterKeys, store: Store) -> None:
    for method in ("shamir", "raw"):
        root = root_key()
        with pytest.raises(UnsealMismatch, match="passphrase"):
            MasterKeys.open(store, root, method)
        assert root.is_wiped
    wrong = root_key(OTHER_ROOT)
    with pytest.raises(UnwrapFailed) as excinfo:
        MasterKeys.open(store, wrong, "passphrase")
    assert wrong.is_wiped
    assert ROOT.hex() not in str(excinfo.value)
    with pytest.raises(UnsealMismatch, match="not initialised"):
        MasterKeys.open(MemoryStore(), root_key(), "passphrase")


def test_a_corrupt_method_record_is_reported(master: MasterKeys, store: Store) -> None:
    store.put_meta(METHOD_RECORD, b"\xff\xfe")
    with pytest.raises(CorruptRecord):
        MasterKeys.method_of(store)
    with pytest.raises(CorruptRecord):
        MasterKeys.open(store, root_key(), "passphrase")


# --- the KEK source ---------------------------------------------------------------------------


def test_master_lends_keks_to_the_epoch_keeper(master: MasterKeys, store: Store) -> None:
    rounds = Rounds(store, master)
    ready = rounds.create(RoundId("a"))
    assert ready.kek_version == V1  # the version that keeps the epoch key
    assert master.gate.open_leases == 0  # no KEK lease outlives the keeper's open
    assert recover(store, master, rounds.probes).epoch == E1
    with master.kek_for(V1) as kek:
        assert kek.version == V1
    with pytest.raises(UnknownKekVersion), master.kek_for(V2):
        pass
    rounds.close()


# --- rotation ---------------------------------------------------------------------------------


def test_rotation_rewraps_every_stored_key(master: MasterKeys, store: Store) -> None:
    rounds = Rounds(store, master)
    for index in range(5):
        rounds.create(RoundId(f"r{index}"))
    before = dict(store.list_keys())
    with capture_logs() as logs:
        rotation = rounds.rotate()
    assert rotation == KekRotation(old_version=V1, new_version=V2, rewrapped=5)
    assert rotation.event() == KekRotated(old_version=V1, new_version=V2, rewrapped=5)
    assert master.active_version == V2
    assert master.versions() == [(V1, KekState.RETIRED), (V2, KekState.ACTIVE)]
    with pytest.raises(KekRetired), master.kek_for(V1):
        pass
    # a rotation is an epoch change: a new epoch key under the new KEK, the old one gone
    assert rounds.keeper.epoch == E2
    rounds.check_stored(master, V2)
    assert all(blob != before[rid] for rid, blob in store.list_keys())
    events = [e["event"] for e in logs if e["log_level"] != "debug"]
    assert events == ["epoch_changed", "kek_rotated"]
    (changed,) = [e for e in logs if e["event"] == "epoch_changed"]
    assert (changed["old_epoch"], changed["new_epoch"], changed["kek_version"]) == (1, 2, 2)
    assert (changed["rewrapped"], changed["reason"]) == (5, "kek")
    # new rounds are wrapped under the new epoch; a second rotation moves all again
    assert rounds.create(RoundId("after")).kek_version == V2
    assert rounds.rotate().rewrapped == 6
    assert rounds.keeper.epoch == EpochNumber(3)
    rounds.check_stored(master, V3)
    assert master.versions() == [
        (V1, KekState.RETIRED),
        (V2, KekState.RETIRED),
        (V3, KekState.ACTIVE),
    ]
    rounds.close()


def test_a_blob_from_before_a_rotation_is_unrecoverable_after_it(
    master: MasterKeys, store: Store
) -> None:
    """Forward secrecy across a rotation: a copy of a blob taken before it (a lingering LMDB
    page) names an epoch that no longer exists, and no KEK brings it back."""
    rounds = Rounds(store, master)
    rounds.create(RoundId("a"))
    old_blob = store.get_key(RoundId("a"))
    assert old_blob is not None
    rounds.rotate()
    store.put_key(RoundId("a"), old_blob)
    keeper = open_keeper(store, master)
    try:
        report = RoundCipherCore(store, keeper, ContextRegistry()).hydrate([RoundId("a")])
    finally:
        keeper.close()
    assert report.hydrated == ()
    assert [(f.round_id, f.epoch) for f in report.failed] == [(RoundId("a"), E1)]
    rounds.close()


def test_rotation_of_an_empty_store(master: MasterKeys, store: Store) -> None:
    assert master.rotate_kek() == KekRotation(V1, V2, 0)
    with MasterKeys.open(store, root_key(), "passphrase") as reopened:
        assert reopened.active_version == V2
    rounds = Rounds(store, master)  # a keeper opened after the rotation: epoch 1 under v2
    assert rounds.rotate() == KekRotation(V2, V3, 0)
    assert (rounds.keeper.epoch, rounds.keeper.kek_version) == (E2, V3)
    rounds.close()


class Dependent:
    """A stand-in for what a rotation must rewrap: records what the rotation asks of it."""

    def __init__(self, new_kek: Kek) -> None:
        self.new_version = new_kek.version
        self.calls: list[str] = []

    def write(self, batch: WriteBatch) -> int:
        self.calls.append("write")
        batch.put_key(RoundId("dependent"), b"rewrapped under the new KEK")
        return 3

    def committed(self) -> None:
        self.calls.append("committed")

    def aborted(self) -> None:
        self.calls.append("aborted")


def test_rotation_commits_its_dependent_in_the_keyring_batch() -> None:
    store = RecordingStore()
    master = MasterKeys.initialise(store, root_key(), "raw")
    made: list[Dependent] = []

    def rewrap(new_kek: Kek) -> Dependent:
        assert master.gate.exclusive_held  # staged under the exclusive section
        made.append(Dependent(new_kek))
        return made[-1]

    store.fail_next_commit = True
    before = disk(store)
    with pytest.raises(StoreError):
        master.rotate_kek(rewrap=rewrap)
    assert made[-1].calls == ["write", "aborted"]
    assert disk(store) == before
    assert master.versions() == [(V1, KekState.ACTIVE)]

    assert master.rotate_kek(rewrap=rewrap) == KekRotation(V1, V2, 3)
    assert made[-1].new_version == V2
    assert made[-1].calls == ["write", "committed"]
    last = store.batches[-1]  # ONE batch: the dependent's records and the keyring
    dependent_op, keyring_op = last.operations
    assert isinstance(dependent_op, PutKey)
    assert isinstance(keyring_op, PutMeta)
    assert (dependent_op.key, keyring_op.key) == (b"dependent", KEYRING_RECORD.encode())
    master.seal()


def test_a_rotation_without_the_epoch_keeper_is_refused_and_loses_no_round_key(
    master: MasterKeys, store: Store
) -> None:
    rounds = Rounds(store, master)
    for index in range(3):
        rounds.create(RoundId(f"r{index}"))
    probes = dict(rounds.probes)
    rounds.close()
    with pytest.raises(MasterKeyError, match="epoch keeper"):
        master.rotate_kek()  # e.g. a tool that rotates without a node
    assert master.versions() == [(V1, KekState.ACTIVE)]
    recover(store, master, probes)


# --- a failed rotation changes nothing --------------------------------------------------------


@pytest.fixture
def recording() -> Iterator[tuple[RecordingStore, MasterKeys, Rounds]]:
    store = RecordingStore()
    master = MasterKeys.initialise(store, root_key(), "raw")
    rounds = Rounds(store, master)
    for index in range(4):
        rounds.create(RoundId(f"r{index}"))
    yield store, master, rounds
    rounds.close()
    master.seal(0.0, force=True)


def assert_unchanged(
    store: RecordingStore, master: MasterKeys, rounds: Rounds, before: Disk
) -> None:
    assert disk(store) == before  # round keys, metadata and both epoch slots
    assert master.versions() == [(V1, KekState.ACTIVE)]
    assert rounds.keeper.epoch == E1
    rounds.check_stored(master, V1)  # the old epoch key, under the old KEK, unwraps all
    with MasterKeys.open(MemoryStore(store.backing), root_key(), "raw") as reopened:
        assert reopened.versions() == [(V1, KekState.ACTIVE)]
        rounds.check_stored(reopened, V1)


def test_a_store_failure_mid_rotation_changes_nothing(
    recording: tuple[RecordingStore, MasterKeys, Rounds],
) -> None:
    store, master, rounds = recording
    before = disk(store)
    writes = store.backing.slots.writes
    store.fail_next_commit = True
    with capture_logs() as logs, pytest.raises(StoreError):
        rounds.rotate()
    errors = [e["event"] for e in logs if e["log_level"] == "error"]
    assert errors == ["kek_rotation_failed"]
    assert "epoch_change_rolled_back" in [e["event"] for e in logs]
    assert store.backing.slots.writes == writes + 2  # the new slot written, then wiped
    assert_unchanged(store, master, rounds, before)
    # and the next attempt succeeds, from the same state
    assert rounds.rotate() == KekRotation(V1, V2, 4)
    rounds.check_stored(master, V2)


@pytest.mark.parametrize("damage", ["tampered", "stale epoch", "malformed"])
def test_a_blob_that_does_not_unwrap_does_not_stop_the_rotation(
    recording: tuple[RecordingStore, MasterKeys, Rounds], damage: str
) -> None:
    """A blob that does not open under the current epoch is already unreadable: the epoch
    change skips it (it must not hold forward secrecy back) and leaves it for the sweep."""
    store, master, rounds = recording
    bad = RoundId("bad")
    if damage == "stale epoch":  # e.g. written back from a destroyed epoch
        with RoundCipher.generate(bad) as cipher, EpochKey.generate(EpochNumber(7)) as gone:
            blob = wrap_round_key(gone, cipher)
    else:
        with RoundCipher.generate(bad) as cipher, rounds.keeper.active_epoch() as epoch:
            blob = wrap_round_key(epoch, cipher)
        tampered = blob[:-1] + bytes([blob[-1] ^ 1])
        blob = tampered if damage == "tampered" else b"\x07" * len(blob)
    store.put_key(bad, blob)
    with capture_logs() as logs:
        rotation = rounds.rotate()
    assert rotation == KekRotation(V1, V2, 4)  # every good key rewrapped
    (skipped,) = [e for e in logs if e["event"] == "epoch_rewrap_skipped"]
    assert skipped["round_id"] == "bad"
    (changed,) = [e for e in logs if e["event"] == "epoch_changed"]
    assert (changed["rewrapped"], changed["skipped"]) == (4, 1)
    assert store.get_key(bad) == blob  # left alone, for the sweep to purge
    store.delete_key(bad)
    rounds.check_stored(master, V2)


def test_rotation_refuses_while_a_lease_stays_open(
    recording: tuple[RecordingStore, MasterKeys, Rounds],
) -> None:
    store, master, rounds = recording
    before = disk(store)
    with master.active_kek() as kek:  # a KEK lease ...
        with pytest.raises(LeaseTimeout):
            rounds.rotate(timeout=0.0)
        assert kek.version == V1
    assert_unchanged(store, master, rounds, before)
    with rounds.keeper.active_epoch() as epoch:  # ... or an epoch lease (a wrap in flight)
        with pytest.raises(LeaseTimeout):
            rounds.rotate(timeout=0.0)
        assert epoch.number == E1
        assert not epoch.is_wiped
    assert_unchanged(store, master, rounds, before)


def test_rotation_waits_for_an_open_lease(
    recording: tuple[RecordingStore, MasterKeys, Rounds],
) -> None:
    _, master, rounds = recording
    results: list[object] = []
    with master.active_kek() as kek:
        rotator = threading.Thread(target=lambda: results.append(rounds.rotate()))
        rotator.start()
        assert master.gate.wait_until(lambda g: g.exclusive_waiting == 1, WAIT)
        assert results == []
        assert kek.version == V1  # the lease in flight keeps its KEK until it ends
    rotator.join(WAIT)
    assert results == [KekRotation(V1, V2, 4)]
    rounds.check_stored(master, V2)


def test_round_keys_made_or_purged_during_a_rotation_wait_for_it(
    recording: tuple[RecordingStore, MasterKeys, Rounds],
) -> None:
    """Creation holds the epoch lease across wrap and store, deletion holds the ratchet
    out: neither can slip between the rotation's listing of the keys and its commit."""
    store, master, rounds = recording
    store.block_listing = threading.Event()
    rotator = threading.Thread(target=rounds.rotate)
    rotator.start()
    assert store.in_listing.wait(WAIT)  # the rotation holds the keeper exclusively
    creator = threading.Thread(target=lambda: rounds.create(RoundId("during")))
    purger = threading.Thread(target=lambda: rounds.purge(RoundId("r0")))
    creator.start()
    purger.start()
    gate = rounds.keeper._gate  # no public view of the keeper's waiters
    assert gate.wait_until(lambda g: g.leases_waiting == 2, WAIT)  # both wait
    assert store.get_key(RoundId("r0")) is not None
    assert store.get_key(RoundId("during")) is None
    store.block_listing.set()
    for thread in (rotator, creator, purger):
        thread.join(WAIT)
        assert not thread.is_alive()
    assert store.get_key(RoundId("r0")) is None  # not written back by the rotation
    rounds.check_stored(master, V2)  # "during" was wrapped under the new epoch
    # r0's blob was rewrapped under the new epoch before its delete: that epoch must end too
    assert rounds.keeper.pending_since is not None


def test_a_key_being_stored_when_a_rotation_starts_is_rewrapped_by_it(
    recording: tuple[RecordingStore, MasterKeys, Rounds],
) -> None:
    store, master, rounds = recording
    store.block_put = threading.Event()
    creator = threading.Thread(target=lambda: rounds.create(RoundId("during")))
    creator.start()
    assert store.in_put.wait(WAIT)  # wrapped under epoch 1, not yet stored
    rotator = threading.Thread(target=rounds.rotate)
    rotator.start()
    gate = rounds.keeper._gate  # no public view of the keeper's waiters
    assert gate.wait_until(lambda g: g.exclusive_waiting == 1, WAIT)
    store.block_put.set()
    for thread in (creator, rotator):
        thread.join(WAIT)
        assert not thread.is_alive()
    rounds.check_stored(master, V2)  # the epoch-1 blob was stored before the rotation listed


# --- rekey --------------------------------------------------------------------------------


def test_rekey_root_keeps_round_keys_and_retires_the_old_root(
    master: MasterKeys, store: Store
) -> None:
    rounds = Rounds(store, master)
    for index in range(3):
        rounds.create(RoundId(f"r{index}"))
    keys_before = store.list_keys()
    slots = store.epoch_slots()
    slots_before = [slots.read(index) for index in range(SLOT_COUNT)]
    versions = master.versions()
    with capture_logs() as logs:
        master.rekey_root(
            root_key(OTHER_ROOT),
            "shamir",
            {"unseal.shamir.digest": b"share-set digest"},
            drop_records=["unseal.passphrase.kdf"],
        )
    assert [e for e in logs if e["event"] == "root_rekeyed"] == [
        {
            "event": "root_rekeyed",
            "log_level": "info",
            "old_method": "passphrase",
            "new_method": "shamir",
        }
    ]
    assert store.list_keys() == keys_before  # byte-identical
    assert [slots.read(index) for index in range(SLOT_COUNT)] == slots_before  # epoch untouched
    assert master.method == "shamir"
    assert MasterKeys.method_of(store) == "shamir"
    assert store.get_meta("unseal.passphrase.kdf") is None
    assert store.get_meta("unseal.shamir.digest") == b"share-set digest"
    with pytest.raises(UnwrapFailed):
        MasterKeys.open(store, root_key(ROOT), "shamir")
    with MasterKeys.open(store, root_key(OTHER_ROOT), "shamir") as reopened:
        assert reopened.versions() == versions
        rounds.check_stored(reopened, V1)
    # the held root is the new one: a rotation seals the keyring under it
    rounds.rotate()
    with MasterKeys.open(store, root_key(OTHER_ROOT), "shamir") as reopened:
        rounds.check_stored(reopened, V2)
    rounds.close()


def test_a_failed_rekey_changes_nothing(
    recording: tuple[RecordingStore, MasterKeys, Rounds],
) -> None:
    store, master, rounds = recording
    before = disk(store)
    new_root = root_key(OTHER_ROOT)
    store.fail_next_commit = True
    with pytest.raises(StoreError):
        master.rekey_root(new_root, "shamir", {"unseal.shamir": b"x"})
    assert new_root.is_wiped
    assert master.method == "raw"
    assert_unchanged(store, master, rounds, before)
    for records, drop in (({"master.method": b"x"}, ()), ({"a.b": b"x"}, ("a.b",))):
        new_root = root_key(OTHER_ROOT)
        with pytest.raises(InvalidIdentifier):
            master.rekey_root(new_root, "shamir", records, drop)
        assert new_root.is_wiped
    assert disk(store) == before
    rounds.rotate()  # still under the old root
    with MasterKeys.open(MemoryStore(store.backing), root_key(), "raw") as reopened:
        rounds.check_stored(reopened, V2)


# --- seal -----------------------------------------------------------------------------------


def test_seal_wipes_everything_and_refuses_later_use(master: MasterKeys, store: Store) -> None:
    rounds = Rounds(store, master)
    rounds.create(RoundId("a"))
    with master.active_kek() as kek:
        pass
    master.seal()
    master.seal()  # idempotent
    assert master.is_sealed
    assert kek.is_wiped
    assert repr(master) == "MasterKeys(method='passphrase', sealed)"
    for use in (
        lambda: master.active_version,
        master.versions,
        master.rotate_kek,
        lambda: master.rekey_root(root_key(OTHER_ROOT), "raw"),
        lambda: master.active_kek().__enter__(),
        lambda: master.kek_for(V1).__enter__(),
        rounds.rotate,
        rounds.keeper.ratchet,  # no KEK to keep a new epoch key under
    ):
        with pytest.raises(Sealed):
            use()
    assert rounds.keeper.epoch == E1  # the failed ratchet changed nothing
    # the node closes its keeper when it seals: the round cipher then fails new rounds (no
    # fallback) but still purges old ones
    rounds.keeper.close()
    rounds.registry.open(RoundId("b"))
    (failed,) = rounds.core.handle(stored(RoundOpened(round_id=RoundId("b"), deadline=T0)))
    assert isinstance(failed, RoundFailed)
    assert failed.reason is FailureReason.KEY_CREATION_FAILED
    rounds.purge(RoundId("a"))
    assert store.key_count() == 0
    rounds.close()


def test_seal_waits_for_leases_or_times_out_unless_forced(master: MasterKeys) -> None:
    with master.active_kek() as kek:
        with pytest.raises(LeaseTimeout):
            master.seal(0.0)
        assert not master.is_sealed
        assert not kek.is_wiped
        sealer = threading.Thread(target=lambda: master.seal(WAIT))
        sealer.start()
        assert master.gate.wait_until(lambda g: g.exclusive_waiting == 1, WAIT)
        assert not kek.is_wiped
    sealer.join(WAIT)
    assert master.is_sealed
    assert kek.is_wiped


def test_a_forced_seal_during_a_rotation_keeps_no_key() -> None:
    store = RecordingStore()
    root = root_key()
    master = MasterKeys.initialise(store, root, "raw")
    rounds = Rounds(store, master)
    rounds.create(RoundId("a"))
    store.block_commit = threading.Event()
    results: list[object] = []
    rotator = threading.Thread(target=lambda: results.append(rounds.rotate()))
    rotator.start()
    assert store.in_commit.wait(WAIT)  # the rotation is inside its store commit
    master.seal(0.0, force=True)  # e.g. SIGTERM: cannot wait for the rotation
    assert root.is_wiped
    store.block_commit.set()
    rotator.join(WAIT)
    assert results == [KekRotation(V1, V2, 1)]  # it committed ...
    assert master.is_sealed  # ... but installed nothing in memory
    with pytest.raises(Sealed), master.active_kek():
        pass
    with MasterKeys.open(MemoryStore(store.backing), root_key(), "raw") as reopened:
        rounds.check_stored(reopened, V2)  # and the disk is consistent
    rounds.close()


def test_no_key_bytes_in_reprs_logs_or_errors(store: Store) -> None:
    with capture_logs() as logs:
        master = MasterKeys.initialise(store, root_key(), "raw")
        rounds = Rounds(store, master)
        rounds.create(RoundId("a"))
        rounds.rotate()
        master.rekey_root(root_key(OTHER_ROOT), "passphrase")
        text = repr(master) + repr(master.versions()) + repr(rounds.keeper)
        with pytest.raises(UnwrapFailed) as excinfo:
            MasterKeys.open(store, root_key(ROOT), "passphrase")
        master.seal()
    text += repr(logs) + str(excinfo.value) + repr(master)
    keyring_blob = store.get_meta(KEYRING_RECORD)
    assert keyring_blob is not None
    for secret in (ROOT, OTHER_ROOT, keyring_blob[13:45]):
        assert secret.hex() not in text
        assert repr(secret) not in text
    rounds.close()


# --- rotation under load ------------------------------------------------------------------


ROTATIONS = 12
PER_ROTATION = 6  # rounds the worker makes between two rotations, at least


def test_rotation_under_load_loses_no_live_round(store: Store, master: MasterKeys) -> None:
    """Rotations and ratchets (each an epoch change) race with creations and purges."""
    rounds = Rounds(store, master)
    progress = threading.Condition()
    made = [0]
    rotations_done = threading.Event()
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            index = 0
            after_last_rotation = 0
            while after_last_rotation < PER_ROTATION:
                rid = RoundId(f"load:{index:04d}")
                rounds.create(rid)
                if index % 2 == 1:  # complete an older round: its key is purged
                    rounds.purge(min(rounds.probes))
                with progress:
                    made[0] += 1
                    progress.notify_all()
                if rotations_done.is_set():
                    after_last_rotation += 1
                index += 1
        except BaseException as exc:
            errors.append(exc)
            with progress:
                made[0] = 10**9  # let the rotator go on and fail the test below
                progress.notify_all()

    def made_at_least(count: int) -> bool:
        with progress:
            return progress.wait_for(lambda: made[0] >= count, WAIT)

    def rotator() -> None:
        try:
            for turn in range(ROTATIONS):
                assert made_at_least((turn + 1) * PER_ROTATION)
                rounds.rotate()
                rounds.keeper.ratchet("test", timeout=WAIT)
        except BaseException as exc:
            errors.append(exc)
        finally:
            rotations_done.set()

    threads = [threading.Thread(target=worker), threading.Thread(target=rotator)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT * 3)
        assert not thread.is_alive()
    assert errors == []
    final = KekVersion(1 + ROTATIONS)
    assert master.active_version == final
    assert master.versions()[-1] == (final, KekState.ACTIVE)
    assert all(state is KekState.RETIRED for _, state in master.versions()[:-1])
    assert rounds.keeper.epoch == EpochNumber(1 + 2 * ROTATIONS)
    rounds.check_stored(master, final)  # no live round lost, no purged one written back
    assert len(rounds.probes) >= ROTATIONS * PER_ROTATION // 2
    rounds.close()


# --- SIGKILL at random points of a rotation -----------------------------------------------------


CRASH_SEED = 20261123
CRASH_KILLS = 8
CRASH_ROUNDS = 40
REPO = Path(__file__).resolve().parent.parent


def lines_of(stream: IO[str]) -> queue.Queue[str | None]:
    """The lines a child prints, through a queue the test reads with a timeout."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line.strip())
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def next_line(lines: queue.Queue[str | None], stderr: Path) -> list[str]:
    try:
        line = lines.get(timeout=WAIT)
    except queue.Empty:
        raise AssertionError("the child printed nothing in time") from None
    assert line is not None, f"the child ended early: {stderr.read_text()[-2000:]}"
    return line.split()


def check_after_crash(data: Path) -> tuple[KekVersion, EpochRecovery]:
    """Reopen as a restarted node would: the master keys, then a fresh epoch keeper (which
    finishes or rolls back the change in flight), then hydration. Every round is there,
    under the one epoch left in the slot file, and unwraps to its own round key."""
    rids = child.round_ids(CRASH_ROUNDS)
    with LmdbStore.open(data) as store:
        master = MasterKeys.open(store, root_key(), child.METHOD)  # old or new, never neither
        with master:
            active = master.active_version
            probes: dict[RoundId, bytes] = {}
            for rid in rids:
                probe = store.get_meta(child.probe_record(rid))
                assert probe is not None
                probes[rid] = probe
            assert [rid for rid, _ in store.list_keys()] == rids
            recovery = recover(store, master, probes)
            in_use = [slot for slot in slot_status(store) if slot.state != "empty"]
            assert [(s.epoch, s.kek_version) for s in in_use] == [(recovery.epoch, active)]
            for _, blob in store.list_keys():
                assert read_wrapped_header(blob)[0] == recovery.epoch
            return active, recovery


def spawn(data: Path, root_file: Path, stderr: Path, *extra: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "tests.crash_rotation_child", str(data), str(root_file)]
    with stderr.open("w") as err:
        return subprocess.Popen(
            [*command, str(CRASH_ROUNDS), *extra],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )


@pytest.mark.slow
def test_sigkill_during_rotation_reopens_with_the_old_or_the_new_keyring(
    tmp_path: Path,
) -> None:
    """The parent SIGKILLs the child after a seeded number of progress lines (wherever the
    rotation then is: writing the new epoch slot, rewrapping, sealing, committing, wiping
    the old slot); in three runs the child kills itself inside a rotation, at an instant
    the parent cannot aim at: right after the new epoch slot is durable, right after the
    commit (old slot not yet wiped), right after the rotation returned. Each time the store
    must reopen with the keyring of the last reported commit or of the one in flight, one
    epoch slot kept under its active KEK, and every round key recoverable.
    """
    rng = random.Random(CRASH_SEED)
    root_file = tmp_path / "root.key"
    root_file.write_bytes(ROOT)
    root_file.chmod(0o600)
    data = tmp_path / "data"
    stderr = tmp_path / "child.err"
    modes = ["parent"] * (CRASH_KILLS - len(child.DIE_AT)) + list(child.DIE_AT)
    rng.shuffle(modes)
    committed = 0  # newest version a child reported committed (0: none yet)
    outcomes: list[str] = []
    for mode in modes:
        die_after = rng.randint(1, 4)
        extra = [] if mode == "parent" else [str(die_after), mode]
        proc = spawn(data, root_file, stderr, *extra)
        try:
            assert proc.stdout is not None
            lines = lines_of(proc.stdout)
            word, version = next_line(lines, stderr)
            assert word == "ready"
            assert int(version) >= committed  # nothing committed was lost
            committed = begun = int(version)
            reads = rng.randint(1, 7) if mode == "parent" else 2 * die_after - 1
            for _ in range(reads):  # a seeded number of progress lines
                word, version = next_line(lines, stderr)
                if word == "begin":
                    begun = int(version)
                else:
                    assert word == "rotated"
                    committed = int(version)
            if mode == "parent":
                proc.send_signal(signal.SIGKILL)
            assert proc.wait(WAIT) == -signal.SIGKILL
            last = word  # the last line the child printed before it died
            while (line := lines.get(timeout=WAIT)) is not None:
                last, version = line.split()
                if last == "rotated":
                    committed = int(version)
            if mode != "parent":
                assert last == "begin"  # it died inside its rotation
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(WAIT)
        active_version, recovery = check_after_crash(data)
        active = active_version.number
        # the last reported commit is durable; at most the one in flight may have landed
        assert committed <= active <= committed + 1
        if mode == "slot_written":
            assert active == committed  # nothing committed: the old keyring and epoch ...
            assert recovery.wiped_slots != ()  # ... and the new slot (unknown KEK) wiped
        elif mode == "committed":
            assert active == begun  # the new keyring and epoch ...
            assert recovery.wiped_slots != ()  # ... and the old slot (retired KEK) wiped
        elif mode == "returned":
            assert active == begun
            assert recovery.wiped_slots == ()  # the rotation had finished
        assert not recovery.created  # the epoch key was never lost
        where = "mid-rotation" if last == "begin" else "between rotations"
        outcomes.append(f"{mode}, {where}: {'new' if active > committed else 'old'}")
        committed = active
    print("SIGKILL outcomes (killer, where, keyring after restart):", *outcomes, sep="\n  ")
    assert "slot_written, mid-rotation: old" in outcomes
    assert "committed, mid-rotation: new" in outcomes
    assert "returned, mid-rotation: new" in outcomes
    assert sum(o.startswith("parent") for o in outcomes) >= 5
