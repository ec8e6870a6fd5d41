from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import msgpack
import pytest
from structlog.testing import capture_logs

from enclave_keys.clock import ManualClock
from enclave_keys.context import ContextRegistry, RoundContext
from enclave_keys.crypto import (
    WRAPPED_KEY_SIZE,
    EpochKey,
    Kek,
    Keyring,
    RoundCipher,
    read_wrapped_header,
    unwrap_round_key,
)
from enclave_keys.epochs import DEFAULT_EPOCH_WINDOW, EpochKeeper
from enclave_keys.errors import (
    CorruptRecord,
    RoundCipherRetired,
    SecretWiped,
    StoreError,
    UnknownEpoch,
    UnwrapFailed,
)
from enclave_keys.events import (
    FailureReason,
    RoundComplete,
    RoundFailed,
    RoundKeyReady,
    RoundOpened,
    RoundPurged,
    RoundRequested,
    RoundStage,
)
from enclave_keys.handler import Handler
from enclave_keys.ids import EpochNumber, KekVersion, RoundId
from enclave_keys.round_cipher import (
    ROUND_CIPHER,
    HydrationProblem,
    LeasedRoundCipher,
    RoundCipherCore,
)
from enclave_keys.store import MemoryStore, Store, WriteBatch
from tests.actors.helpers import (
    T0,
    RecordingEntropy,
    StoreOpener,
    open_keeper,
    stored,
)

R = RoundId("e3:1")
WAIT = 10.0  # bound on every wait for another thread


def requested(round_id: RoundId = R) -> RoundRequested:
    return RoundRequested(round_id=round_id, deadline=T0 + 600, threshold=1, committee_size=1)


def opened(round_id: RoundId = R) -> RoundOpened:
    return RoundOpened(round_id=round_id, deadline=T0 + 600)


def key_round(core: RoundCipherCore, registry: ContextRegistry, round_id: RoundId = R) -> Any:
    """Open the round's context (as the router does) and let the core key it."""
    registry.open(round_id)
    (ready,) = core.handle(stored(opened(round_id)))
    assert isinstance(ready, RoundKeyReady)
    return ready


def cipher_in(registry: ContextRegistry, round_id: RoundId = R) -> LeasedRoundCipher:
    context = registry.get(round_id)
    assert context is not None
    return context.require(ROUND_CIPHER)


# --- creation ---------------------------------------------------------------------------


def test_core_is_a_handler_of_requested_opened_and_complete(core: RoundCipherCore) -> None:
    assert isinstance(core, Handler)
    assert core.name == "round-cipher"
    assert core.subscriptions == (RoundRequested, RoundOpened, RoundComplete)


def test_round_opened_creates_stores_and_contexts_the_key(
    core: RoundCipherCore,
    store: Store,
    kek: Kek,
    keeper: EpochKeeper,
    registry: ContextRegistry,
) -> None:
    ready = key_round(core, registry)
    assert ready.kek_version == kek.version  # the version under which the epoch key is kept
    blob = store.get_key(R)
    assert blob is not None
    assert len(blob) == WRAPPED_KEY_SIZE
    assert read_wrapped_header(blob) == (keeper.epoch, ready.key_id)
    assert keeper.epoch == EpochNumber(1)
    assert keeper.pending_since is None  # a creation is no purge: no ratchet is due
    leased = cipher_in(registry)
    assert leased.key_id == ready.key_id
    assert core.held_rounds() == [R]
    assert core.cipher_of(R) is leased


def test_stored_key_round_trips_and_survives_a_reopen(
    core: RoundCipherCore,
    store: Store,
    ring: Keyring,
    keeper: EpochKeeper,
    registry: ContextRegistry,
    opener: StoreOpener,
) -> None:
    key_round(core, registry)
    epoch = keeper.epoch
    with cipher_in(registry).lease() as cipher:
        sealed = cipher.seal("keyshare", b"share bytes")
    keeper.close()
    store.close()
    with opener() as reopened:
        blob = reopened.get_key(R)
        assert blob is not None
        # the epoch key comes back from the store's slots, under the same KEK
        again, recovery = EpochKeeper.open(reopened, ring, clock=ManualClock(T0))
        try:
            assert (recovery.epoch, recovery.created, recovery.wiped_slots) == (epoch, False, ())
            with (
                again.epoch_for(epoch) as epoch_key,
                unwrap_round_key(epoch_key, R, blob) as loaded,
            ):
                assert loaded.open("keyshare", sealed) == b"share bytes"
        finally:
            again.close()


def test_creation_is_idempotent(
    core: RoundCipherCore, store: Store, keeper: EpochKeeper, registry: ContextRegistry
) -> None:
    key_round(core, registry)
    leased = cipher_in(registry)
    blob = store.get_key(R)
    assert core.handle(stored(opened())) == ()
    assert cipher_in(registry) is leased
    assert store.get_key(R) == blob
    # a second core over the same store (a stored key, not held) creates nothing either
    other = RoundCipherCore(store, keeper, registry)
    assert other.handle(stored(opened())) == ()
    assert store.key_count() == 1


def test_no_key_for_a_round_the_log_completed_before_it_opened(
    core: RoundCipherCore, store: Store, registry: ContextRegistry
) -> None:
    # On threads the router may not have closed the context yet: the log order decides.
    registry.open(R)
    assert core.handle(stored(requested())) == ()
    assert core.handle(stored(RoundComplete(round_id=R))) == ()
    assert core.handle(stored(opened())) == ()
    assert store.get_key(R) is None
    assert core.cipher_of(R) is None


def test_a_stray_complete_before_the_request_does_not_stop_the_key(
    core: RoundCipherCore, store: Store, registry: ContextRegistry
) -> None:
    """A RoundComplete for a round nobody requested yet is not that round's end."""
    assert core.handle(stored(RoundComplete(round_id=R))) == ()
    core.handle(stored(requested()))
    ready = key_round(core, registry)
    assert store.get_key(R) is not None
    assert core.cipher_of(R) is not None
    assert ready.round_id == R


def test_no_key_for_a_round_whose_context_is_gone(core: RoundCipherCore, store: Store) -> None:
    assert core.handle(stored(opened())) == ()
    assert store.key_count() == 0
    assert core.held_rounds() == []


class ClosingStore(MemoryStore):
    """Closes a round's context right after each write commits (the round ended)."""

    def __init__(self, registry: ContextRegistry) -> None:
        super().__init__()
        self.registry = registry

    @contextmanager
    def write(self) -> Iterator[WriteBatch]:
        with super().write() as batch:
            yield batch
        self.registry.close(R)


def test_round_ending_during_creation_leaves_nothing_once_it_completes(
    ring: Keyring, registry: ContextRegistry
) -> None:
    # The key was stored as the round ended: the round's RoundComplete, which the log
    # orders after the RoundOpened, purges it.
    store = ClosingStore(registry)
    keeper = open_keeper(store, ring)
    core = RoundCipherCore(store, keeper, registry)
    registry.open(R)
    core.handle(stored(requested()))
    (ready,) = core.handle(stored(opened()))
    assert isinstance(ready, RoundKeyReady)
    assert store.key_count() == 1
    (purged,) = core.handle(stored(RoundComplete(round_id=R)))
    assert isinstance(purged, RoundPurged)
    assert store.key_count() == 0
    assert core.held_rounds() == []
    keeper.close()


class FailingStore(MemoryStore):
    """Every write fails to commit (nothing of it is applied)."""

    @contextmanager
    def write(self) -> Iterator[WriteBatch]:
        with super().write() as batch:
            yield batch
            raise StoreError("disk full")


class BrokenContext(RoundContext):
    def put(self, key: Any, value: Any) -> None:
        raise RuntimeError("boom")


class BrokenRegistry(ContextRegistry):
    def get(self, round_id: RoundId) -> RoundContext | None:
        return BrokenContext(round_id)


@pytest.mark.parametrize("failure", ["store", "epoch", "context"])
def test_creation_failure_fails_the_round_and_leaves_nothing(ring: Keyring, failure: str) -> None:
    store: Store = FailingStore() if failure == "store" else MemoryStore()
    registry = BrokenRegistry() if failure == "context" else ContextRegistry()
    keeper = open_keeper(store, ring)
    if failure == "epoch":
        keeper.close()  # no epoch key to wrap under (a sealed node)
    core = RoundCipherCore(store, keeper, registry)
    registry.open(R)
    with capture_logs() as logs:
        result = core.handle(stored(opened()))
    assert len(result) == 1
    failed = result[0]
    assert isinstance(failed, RoundFailed)
    assert (failed.round_id, failed.failed_at, failed.reason) == (
        R,
        RoundStage.REQUESTED,
        FailureReason.KEY_CREATION_FAILED,
    )
    assert store.key_count() == 0  # in the context case the key was stored, then deleted
    assert core.held_rounds() == []
    assert any(e["event"] == "round_key_creation_failed" for e in logs)
    keeper.close()


# --- purge ------------------------------------------------------------------------------


def test_complete_purges_the_key_everywhere(
    core: RoundCipherCore,
    store: Store,
    keeper: EpochKeeper,
    clock: ManualClock,
    registry: ContextRegistry,
) -> None:
    ready = key_round(core, registry)
    leased = cipher_in(registry)
    clock.advance(3.0)
    assert core.handle(stored(RoundComplete(round_id=R))) == (
        RoundPurged(round_id=R, key_id=ready.key_id),
    )
    assert store.get_key(R) is None
    # the epoch source heard of the deletion: its epoch must end within the window
    assert keeper.pending_since == clock.now()
    assert not keeper.due(clock.now())
    assert keeper.due(clock.now() + DEFAULT_EPOCH_WINDOW / 2)
    assert leased.is_wiped
    assert leased.retired
    context = registry.get(R)
    assert context is not None
    assert context.get(ROUND_CIPHER) is None
    assert core.held_rounds() == []
    with pytest.raises(RoundCipherRetired), leased.lease():
        pass
    assert core.handle(stored(RoundComplete(round_id=R))) == ()  # nothing left


def test_complete_purges_a_key_that_is_only_stored(
    core: RoundCipherCore, store: Store, keeper: EpochKeeper, registry: ContextRegistry
) -> None:
    ready = key_round(core, registry)
    fresh = RoundCipherCore(store, keeper, ContextRegistry())  # e.g. hydration failed
    assert fresh.handle(stored(RoundComplete(round_id=R))) == (
        RoundPurged(round_id=R, key_id=ready.key_id),
    )
    assert store.get_key(R) is None
    assert keeper.pending_since is not None


def test_complete_without_a_key_publishes_nothing(
    core: RoundCipherCore, keeper: EpochKeeper
) -> None:
    assert core.handle(stored(RoundComplete(round_id=R))) == ()
    assert keeper.pending_since is None  # nothing was deleted: no ratchet needed


def test_a_stored_blob_with_an_unreadable_header_is_still_deleted(
    core: RoundCipherCore, store: Store, keeper: EpochKeeper
) -> None:
    store.put_key(R, b"\xff" * WRAPPED_KEY_SIZE)
    assert core.purge_orphan(R) is None
    assert store.get_key(R) is None
    assert keeper.pending_since is not None  # its bytes may linger: the epoch still ends


def test_purge_orphan_returns_the_event_for_the_node(
    core: RoundCipherCore, store: Store, registry: ContextRegistry
) -> None:
    ready = key_round(core, registry)
    assert core.purge_orphan(R) == RoundPurged(round_id=R, key_id=ready.key_id)
    assert store.key_count() == 0
    assert core.purge_orphan(R) is None


def test_wipe_all_wipes_held_keys_but_keeps_them_stored(
    core: RoundCipherCore, store: Store, registry: ContextRegistry
) -> None:
    key_round(core, registry, RoundId("a"))
    key_round(core, registry, RoundId("b"))
    ciphers = [cipher_in(registry, RoundId("a")), cipher_in(registry, RoundId("b"))]
    core.wipe_all()
    assert all(c.is_wiped for c in ciphers)
    assert core.held_rounds() == []
    assert store.key_count() == 2


# --- hydration --------------------------------------------------------------------------


class FixedEpoch:
    """An epoch source lending one given epoch key (and nothing else): e.g. another node's
    epoch key that happens to carry the same number."""

    def __init__(self, epoch: EpochKey) -> None:
        self.epoch = epoch

    @property
    def kek_version(self) -> KekVersion:
        return KekVersion(1)

    @contextmanager
    def active_epoch(self) -> Iterator[EpochKey]:
        yield self.epoch

    @contextmanager
    def epoch_for(self, number: EpochNumber) -> Iterator[EpochKey]:
        if number != self.epoch.number:
            raise UnknownEpoch(f"no epoch {number}")
        yield self.epoch

    @contextmanager
    def hold_ratchet(self) -> Iterator[None]:
        yield

    def purged(self) -> None:
        pass


def test_another_epoch_key_cannot_unwrap(
    core: RoundCipherCore, store: Store, keeper: EpochKeeper, registry: ContextRegistry
) -> None:
    key_round(core, registry)
    blob = store.get_key(R)
    assert blob is not None
    with EpochKey.generate(keeper.epoch) as wrong:  # same number, other key
        with pytest.raises(UnwrapFailed):
            unwrap_round_key(wrong, R, blob)
        fresh_registry = ContextRegistry()
        fresh = RoundCipherCore(store, FixedEpoch(wrong), fresh_registry)
        report = fresh.hydrate([R])
    assert report.hydrated == ()
    assert [(f.round_id, f.problem, f.epoch) for f in report.failed] == [
        (R, HydrationProblem.UNWRAP_FAILED, keeper.epoch)
    ]
    assert fresh.held_rounds() == []
    context = fresh_registry.get(R)
    assert context is None or context.get(ROUND_CIPHER) is None


class RecordingEpochs:
    """An epoch keeper as the epoch source, remembering which epochs were lent."""

    def __init__(self, keeper: EpochKeeper) -> None:
        self.keeper = keeper
        self.numbers: list[EpochNumber] = []

    @property
    def kek_version(self) -> KekVersion:
        return self.keeper.kek_version

    def active_epoch(self) -> AbstractContextManager[EpochKey]:
        self.numbers.append(self.keeper.epoch)
        return self.keeper.active_epoch()

    def epoch_for(self, number: EpochNumber) -> AbstractContextManager[EpochKey]:
        self.numbers.append(number)
        return self.keeper.epoch_for(number)

    def hold_ratchet(self) -> AbstractContextManager[None]:
        return self.keeper.hold_ratchet()

    def purged(self) -> None:
        self.keeper.purged()


def test_hydrate_restores_the_same_key_after_a_ratchet_and_a_restart(
    core: RoundCipherCore,
    store: Store,
    ring: Keyring,
    keeper: EpochKeeper,
    registry: ContextRegistry,
    opener: StoreOpener,
) -> None:
    ready = key_round(core, registry)
    with cipher_in(registry).lease() as cipher:
        sealed = cipher.seal("keyshare", b"sealed before the restart")
    before = store.get_key(R)
    change = keeper.ratchet("test")
    assert (change.old_epoch, change.new_epoch, change.rewrapped) == (
        EpochNumber(1),
        EpochNumber(2),
        1,
    )
    after = store.get_key(R)
    assert before is not None
    assert after is not None
    assert after != before  # rewrapped: new bytes, same round key
    assert read_wrapped_header(after) == (EpochNumber(2), ready.key_id)
    core.wipe_all()
    keeper.close()
    store.close()
    with opener() as reopened:
        restarted_keeper = open_keeper(reopened, ring)
        assert restarted_keeper.epoch == EpochNumber(2)
        new_registry = ContextRegistry()
        source = RecordingEpochs(restarted_keeper)
        restarted = RoundCipherCore(reopened, source, new_registry)
        report = restarted.hydrate([R])
        assert report.hydrated == (R,)
        assert report.ok
        assert source.numbers == [EpochNumber(2)], "one lease for the whole hydration"
        leased = cipher_in(new_registry)
        assert leased.key_id == ready.key_id
        with leased.lease() as cipher:
            assert cipher.open("keyshare", sealed) == b"sealed before the restart"
        assert restarted.hydrate([R]).hydrated == (R,)  # idempotent
        assert cipher_in(new_registry) is leased
        # the blob of the destroyed epoch 1, had it lingered, names an epoch that is gone
        reopened.put_key(R, before)
        fresh = RoundCipherCore(reopened, restarted_keeper, ContextRegistry())
        assert [(f.problem, f.epoch) for f in fresh.hydrate([R]).failed] == [
            (HydrationProblem.EPOCH_UNAVAILABLE, EpochNumber(1))
        ]
        restarted.wipe_all()
        restarted_keeper.close()


def test_hydrate_reports_orphans_missing_and_bad_blobs(
    core: RoundCipherCore, store: Store, keeper: EpochKeeper, registry: ContextRegistry
) -> None:
    good, orphan, missing = RoundId("good"), RoundId("orphan"), RoundId("missing")
    malformed, tampered, stale = RoundId("malformed"), RoundId("tampered"), RoundId("stale")
    for rid in (good, orphan, tampered, stale):
        key_round(core, registry, rid)
    core.wipe_all()
    stale_blob = store.get_key(stale)
    assert stale_blob is not None
    keeper.ratchet("test")  # epoch 1 destroyed; every stored key now under epoch 2
    store.put_key(stale, stale_blob)  # a blob from before the ratchet, written back
    store.put_key(malformed, b"\x07" * WRAPPED_KEY_SIZE)
    blob = store.get_key(tampered)
    assert blob is not None
    store.put_key(tampered, blob[:-1] + bytes([blob[-1] ^ 1]))

    fresh_registry = ContextRegistry()
    fresh = RoundCipherCore(store, keeper, fresh_registry)
    live = [good, missing, malformed, tampered, stale]
    report = fresh.hydrate(live)
    assert report.hydrated == (good,)
    assert report.orphans == (orphan,)
    assert report.missing == (missing,)
    assert {f.round_id: (f.problem, f.epoch) for f in report.failed} == {
        malformed: (HydrationProblem.MALFORMED_BLOB, None),
        tampered: (HydrationProblem.UNWRAP_FAILED, EpochNumber(2)),
        stale: (HydrationProblem.EPOCH_UNAVAILABLE, EpochNumber(1)),
    }
    assert not report.ok
    for _, raw in store.list_keys():  # ids only, never bytes
        assert raw.hex() not in repr(report)
        assert repr(raw) not in repr(report)
    assert fresh.held_rounds() == [good]
    assert store.key_count() == 5  # hydrate deletes nothing: the node's sweep does
    fresh.wipe_all()


# --- leases -----------------------------------------------------------------------------


class SignallingCondition(threading.Condition):
    """A condition that says when someone starts waiting on it."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        self.waiting.set()
        return super().wait(timeout)


def test_retire_waits_for_an_open_lease_then_wipes() -> None:
    condition = SignallingCondition()
    leased = LeasedRoundCipher(RoundCipher.generate(R), condition=condition)
    done = threading.Event()
    results: list[bool] = []

    def retire() -> None:
        results.append(leased.retire(WAIT))
        done.set()

    with leased.lease() as cipher:
        retirer = threading.Thread(target=retire)
        retirer.start()
        assert condition.waiting.wait(WAIT)  # retire() is now blocked on our lease
        assert leased.retired
        assert not done.is_set()
        assert not leased.is_wiped
        sealed = cipher.seal("keyshare", b"in flight")  # the open lease still works
        assert cipher.open("keyshare", sealed) == b"in flight"
        with pytest.raises(RoundCipherRetired), leased.lease():
            pass
        assert leased.open_leases == 1
    assert done.wait(WAIT)
    retirer.join(WAIT)
    assert results == [True]
    assert leased.is_wiped
    with pytest.raises(RoundCipherRetired), leased.lease():
        pass


def test_retire_times_out_logs_and_wipes_anyway() -> None:
    leased = LeasedRoundCipher(RoundCipher.generate(R))
    with leased.lease() as cipher, capture_logs() as logs:
        assert leased.retire(0.0) is False
        with pytest.raises(SecretWiped):
            cipher.seal("keyshare", b"too late")
    assert leased.is_wiped
    (entry,) = [e for e in logs if e["event"] == "purge_lease_timeout"]
    assert entry["round_id"] == R.value
    assert entry["open_leases"] == 1
    assert leased.retire(0.0) is True  # idempotent once the lease ended


def test_leased_cipher_repr_shows_round_and_key_id_only() -> None:
    entropy = RecordingEntropy()
    cipher = RoundCipher.generate(R, entropy=entropy)
    (key,) = entropy.secrets_of_size(32)
    leased = LeasedRoundCipher(cipher)
    text = repr(leased)
    assert R.value in text
    assert cipher.key_id.hex() in text
    assert key.hex() not in text
    assert repr(key) not in text
    leased.retire(0.0)
    assert "retired" in repr(leased)


def test_no_key_material_in_logs_events_or_snapshots(
    store: Store, ring: Keyring, registry: ContextRegistry
) -> None:
    entropy = RecordingEntropy()
    epoch_entropy = RecordingEntropy(seed=8)
    with capture_logs() as logs:
        keeper = open_keeper(store, ring, entropy=epoch_entropy)
        core = RoundCipherCore(store, keeper, registry, entropy=entropy)
        registry.open(R)
        events = list(core.handle(stored(opened())))
        snapshot = core.snapshot_state()
        events += core.handle(stored(RoundComplete(round_id=R)))
        keeper.ratchet("test")
        text = repr(keeper) + repr(core)
        keeper.close()
    (key,) = entropy.secrets_of_size(32)
    epoch_keys = epoch_entropy.secrets_of_size(32)
    assert len(epoch_keys) == 2  # epoch 1 and its successor
    text += repr(logs) + repr(events) + repr(snapshot)
    for secret in (key, *epoch_keys):
        assert secret.hex() not in text
        assert repr(secret) not in text
        assert secret not in msgpack.packb(snapshot)


# --- snapshots ----------------------------------------------------------------------------


def test_snapshot_lists_held_rounds_and_restore_checks_its_form(
    core: RoundCipherCore, registry: ContextRegistry
) -> None:
    key_round(core, registry)
    snapshot = core.snapshot_state()
    assert snapshot == {"version": 1, "held": [R.value]}
    core.restore_state(msgpack.unpackb(msgpack.packb(snapshot), raw=False))
    for bad in (None, {}, {"version": 2, "held": []}, {"version": 1, "held": [1]}):
        with pytest.raises(CorruptRecord):
            core.restore_state(bad)


def test_lease_timeout_is_validated(
    store: Store, keeper: EpochKeeper, registry: ContextRegistry
) -> None:
    for bad in (-1.0, float("inf"), float("nan"), True, "5"):
        with pytest.raises(ValueError, match="lease_timeout"):
            RoundCipherCore(store, keeper, registry, lease_timeout=bad)  # type: ignore[arg-type]
