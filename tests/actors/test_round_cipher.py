from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import msgpack
import pytest
from structlog.testing import capture_logs

from enclave_keys.context import ContextRegistry, RoundContext
from enclave_keys.crypto import Kek, Keyring, RoundCipher, read_wrapped_header, unwrap_round_key
from enclave_keys.errors import (
    CorruptRecord,
    RoundCipherRetired,
    SecretWiped,
    StoreError,
    UnwrapFailed,
)
from enclave_keys.events import (
    FailureReason,
    RoundComplete,
    RoundFailed,
    RoundKeyReady,
    RoundOpened,
    RoundPurged,
    RoundStage,
)
from enclave_keys.handler import Handler
from enclave_keys.ids import KekVersion, RoundId
from enclave_keys.round_cipher import (
    ROUND_CIPHER,
    HydrationProblem,
    LeasedRoundCipher,
    RoundCipherCore,
)
from enclave_keys.store import MemoryStore, Store
from tests.actors.helpers import (
    T0,
    RecordingEntropy,
    StoreOpener,
    lmdb_opener,
    make_keyring,
    memory_opener,
    stored,
)

R = RoundId("e3:1")
WAIT = 10.0  # bound on every wait for another thread


@pytest.fixture(params=["memory", "lmdb"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> StoreOpener:
    return memory_opener() if request.param == "memory" else lmdb_opener(tmp_path / "store")


@pytest.fixture
def store(opener: StoreOpener) -> Iterator[Store]:
    opened = opener()
    yield opened
    opened.close()


@pytest.fixture
def ring() -> Iterator[Keyring]:
    with make_keyring() as made:
        yield made


@pytest.fixture
def kek(ring: Keyring) -> Kek:
    return ring.active


@pytest.fixture
def registry() -> ContextRegistry:
    return ContextRegistry()


@pytest.fixture
def core(store: Store, ring: Keyring, registry: ContextRegistry) -> Iterator[RoundCipherCore]:
    made = RoundCipherCore(store, ring, registry, lease_timeout=WAIT)
    yield made
    made.wipe_all()


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


def test_core_is_a_handler_of_opened_and_complete(core: RoundCipherCore) -> None:
    assert isinstance(core, Handler)
    assert core.name == "round-cipher"
    assert core.subscriptions == (RoundOpened, RoundComplete)


def test_round_opened_creates_stores_and_contexts_the_key(
    core: RoundCipherCore, store: Store, kek: Kek, registry: ContextRegistry
) -> None:
    ready = key_round(core, registry)
    assert ready.kek_version == kek.version
    blob = store.get_key(R)
    assert blob is not None
    assert read_wrapped_header(blob) == (kek.version, ready.key_id)
    leased = cipher_in(registry)
    assert leased.key_id == ready.key_id
    assert core.held_rounds() == [R]
    assert core.cipher_of(R) is leased


def test_stored_key_round_trips_and_survives_a_reopen(
    core: RoundCipherCore, store: Store, kek: Kek, registry: ContextRegistry, opener: StoreOpener
) -> None:
    key_round(core, registry)
    with cipher_in(registry).lease() as cipher:
        sealed = cipher.seal("keyshare", b"share bytes")
    store.close()
    with opener() as reopened:
        blob = reopened.get_key(R)
    assert blob is not None
    with unwrap_round_key(kek, R, blob) as loaded:
        assert loaded.open("keyshare", sealed) == b"share bytes"


def test_creation_is_idempotent(
    core: RoundCipherCore, store: Store, ring: Keyring, registry: ContextRegistry
) -> None:
    key_round(core, registry)
    leased = cipher_in(registry)
    blob = store.get_key(R)
    assert core.handle(stored(opened())) == ()
    assert cipher_in(registry) is leased
    assert store.get_key(R) == blob
    # a second core over the same store (a stored key, not held) creates nothing either
    other = RoundCipherCore(store, ring, registry)
    assert other.handle(stored(opened())) == ()
    assert store.key_count() == 1


def test_no_key_for_a_round_the_log_completed_before_it_opened(
    core: RoundCipherCore, store: Store, registry: ContextRegistry
) -> None:
    # On threads the router may not have closed the context yet: the log order decides.
    registry.open(R)
    assert core.handle(stored(RoundComplete(round_id=R))) == ()
    assert core.handle(stored(opened())) == ()
    assert store.get_key(R) is None
    assert core.cipher_of(R) is None


def test_no_key_for_a_round_whose_context_is_gone(core: RoundCipherCore, store: Store) -> None:
    assert core.handle(stored(opened())) == ()
    assert store.key_count() == 0
    assert core.held_rounds() == []


class ClosingStore(MemoryStore):
    """Closes the round's context right after the key is stored (the round ended)."""

    def __init__(self, registry: ContextRegistry) -> None:
        super().__init__()
        self.registry = registry
        self.blobs: list[bytes] = []

    def put_key(self, round_id: RoundId, blob: bytes) -> None:
        super().put_key(round_id, blob)
        self.registry.close(round_id)


def test_round_ending_during_creation_leaves_nothing(
    ring: Keyring, registry: ContextRegistry
) -> None:
    store = ClosingStore(registry)
    core = RoundCipherCore(store, ring, registry)
    registry.open(R)
    assert core.handle(stored(opened())) == ()
    assert store.key_count() == 0
    assert core.held_rounds() == []


class FailingStore(MemoryStore):
    def put_key(self, round_id: RoundId, blob: bytes) -> None:
        raise StoreError("disk full")


class BrokenContext(RoundContext):
    def put(self, key: Any, value: Any) -> None:
        raise RuntimeError("boom")


class BrokenRegistry(ContextRegistry):
    def get(self, round_id: RoundId) -> RoundContext | None:
        return BrokenContext(round_id)


def _sealed_keyring() -> Keyring:
    sealed = make_keyring()
    sealed.seal()
    return sealed


@pytest.mark.parametrize("failure", ["store", "kek", "context"])
def test_creation_failure_fails_the_round_and_leaves_nothing(ring: Keyring, failure: str) -> None:
    store: Store = FailingStore() if failure == "store" else MemoryStore()
    registry = BrokenRegistry() if failure == "context" else ContextRegistry()
    core = RoundCipherCore(store, _sealed_keyring() if failure == "kek" else ring, registry)
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


# --- purge ------------------------------------------------------------------------------


def test_complete_purges_the_key_everywhere(
    core: RoundCipherCore, store: Store, registry: ContextRegistry
) -> None:
    ready = key_round(core, registry)
    leased = cipher_in(registry)
    assert core.handle(stored(RoundComplete(round_id=R))) == (
        RoundPurged(round_id=R, key_id=ready.key_id),
    )
    assert store.get_key(R) is None
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
    core: RoundCipherCore, store: Store, ring: Keyring, registry: ContextRegistry
) -> None:
    ready = key_round(core, registry)
    fresh = RoundCipherCore(store, ring, ContextRegistry())  # e.g. hydration failed
    assert fresh.handle(stored(RoundComplete(round_id=R))) == (
        RoundPurged(round_id=R, key_id=ready.key_id),
    )
    assert store.get_key(R) is None


def test_complete_without_a_key_publishes_nothing(core: RoundCipherCore) -> None:
    assert core.handle(stored(RoundComplete(round_id=R))) == ()


def test_a_stored_blob_with_an_unreadable_header_is_still_deleted(
    core: RoundCipherCore, store: Store
) -> None:
    store.put_key(R, b"\xff" * 81)
    assert core.purge_orphan(R) is None
    assert store.get_key(R) is None


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


def test_wrong_kek_cannot_unwrap(
    core: RoundCipherCore, store: Store, registry: ContextRegistry
) -> None:
    key_round(core, registry)
    blob = store.get_key(R)
    assert blob is not None
    with make_keyring() as wrong:
        assert wrong.active_version == KekVersion(1)
        with pytest.raises(UnwrapFailed):
            unwrap_round_key(wrong.active, R, blob)
        fresh_registry = ContextRegistry()
        fresh = RoundCipherCore(store, wrong, fresh_registry)
        report = fresh.hydrate(wrong, [R])
    assert report.hydrated == ()
    assert [(f.round_id, f.problem) for f in report.failed] == [(R, HydrationProblem.UNWRAP_FAILED)]
    assert fresh.held_rounds() == []
    context = fresh_registry.get(R)
    assert context is None or context.get(ROUND_CIPHER) is None


class RecordingSource:
    """A keyring as the KEK source, remembering which versions were asked for."""

    def __init__(self, ring: Keyring) -> None:
        self.ring = ring
        self.versions: list[KekVersion] = []

    def active_kek(self) -> AbstractContextManager[Kek]:
        return self.ring.active_kek()

    def kek_for(self, version: KekVersion) -> AbstractContextManager[Kek]:
        self.versions.append(version)
        return self.ring.kek_for(version)

    def hold_rotation(self) -> AbstractContextManager[None]:
        return self.ring.hold_rotation()


def test_hydrate_restores_the_same_key_after_a_restart(
    core: RoundCipherCore,
    store: Store,
    ring: Keyring,
    kek: Kek,
    registry: ContextRegistry,
    opener: StoreOpener,
) -> None:
    ready = key_round(core, registry)
    with cipher_in(registry).lease() as cipher:
        sealed = cipher.seal("keyshare", b"sealed before the restart")
    core.wipe_all()
    store.close()
    with opener() as reopened:
        new_registry = ContextRegistry()
        restarted = RoundCipherCore(reopened, ring, new_registry)
        source = RecordingSource(ring)
        report = restarted.hydrate(source, [R])
        assert report.hydrated == (R,)
        assert report.ok
        assert source.versions == [kek.version]
        leased = cipher_in(new_registry)
        assert leased.key_id == ready.key_id
        with leased.lease() as cipher:
            assert cipher.open("keyshare", sealed) == b"sealed before the restart"
        assert restarted.hydrate(source, [R]).hydrated == (R,)  # idempotent
        assert cipher_in(new_registry) is leased
        restarted.wipe_all()


def test_hydrate_reports_orphans_missing_and_bad_blobs(
    core: RoundCipherCore, store: Store, ring: Keyring, registry: ContextRegistry
) -> None:
    good, orphan, missing = RoundId("good"), RoundId("orphan"), RoundId("missing")
    malformed, tampered, unknown_kek = RoundId("malformed"), RoundId("tampered"), RoundId("v2")
    for rid in (good, orphan, tampered, unknown_kek):
        key_round(core, registry, rid)
    core.wipe_all()
    store.put_key(malformed, b"\x07" * 81)
    blob = store.get_key(tampered)
    assert blob is not None
    store.put_key(tampered, blob[:-1] + bytes([blob[-1] ^ 1]))
    other = store.get_key(unknown_kek)
    assert other is not None
    store.put_key(unknown_kek, other[:1] + (2).to_bytes(4, "big") + other[5:])

    fresh_registry = ContextRegistry()
    fresh = RoundCipherCore(store, ring, fresh_registry)  # the keyring has no KEK v2
    live = [good, missing, malformed, tampered, unknown_kek]
    report = fresh.hydrate(ring, live)
    assert report.hydrated == (good,)
    assert report.orphans == (orphan,)
    assert report.missing == (missing,)
    assert {f.round_id: f.problem for f in report.failed} == {
        malformed: HydrationProblem.MALFORMED_BLOB,
        tampered: HydrationProblem.UNWRAP_FAILED,
        unknown_kek: HydrationProblem.KEK_UNAVAILABLE,
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
    core = RoundCipherCore(store, ring, registry, entropy=entropy)
    with capture_logs() as logs:
        registry.open(R)
        events = list(core.handle(stored(opened())))
        snapshot = core.snapshot_state()
        events += core.handle(stored(RoundComplete(round_id=R)))
    (key,) = entropy.secrets_of_size(32)
    text = repr(logs) + repr(events) + repr(snapshot) + repr(core)
    assert key.hex() not in text
    assert repr(key) not in text
    assert key not in msgpack.packb(snapshot)


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


def test_lease_timeout_is_validated(store: Store, ring: Keyring, registry: ContextRegistry) -> None:
    for bad in (-1.0, float("inf"), float("nan"), True, "5"):
        with pytest.raises(ValueError, match="lease_timeout"):
            RoundCipherCore(store, ring, registry, lease_timeout=bad)  # type: ignore[arg-type]
