"""The round-cipher actor: creates, stores, hands out and purges each round's key.

On ``RoundOpened`` (published by the router for a fresh round) :class:`RoundCipherCore`
generates a round key, wraps it under the current storage epoch key, stores the wrapped
blob durably, puts a :class:`LeasedRoundCipher` into the round's context and only then
publishes ``RoundKeyReady``. The epoch key comes from an
:class:`~enclave_keys.crypto.EpochSource` (the node's
:class:`~enclave_keys.epochs.EpochKeeper`) under a lease held across the wrap *and* the
store of the blob, so an epoch change either rewraps the new blob or runs before it.
If anything fails, what was made is undone and the round fails with
``key_creation_failed`` — there is never a fallback to the master key. Under a runtime
the blob commits with ``RoundKeyReady`` in the bus's group; if that commit fails, the
key is taken back and wiped, and the next :meth:`RoundCipherCore.tick` fails the round. On
``RoundComplete`` the key is retired, wiped, deleted from the store (with the ratchet
kept out, so an epoch change in flight cannot write it back) and removed from the
context, ``RoundPurged`` is published, and the epoch source is told: within its window
it destroys the epoch key the deleted blob was wrapped under.

Consumers use the cipher under a lease (``with leased.lease() as cipher: ...``) so a
purge waits, bounded, for operations in flight. At start the node rebuilds this core from
the store with :meth:`RoundCipherCore.hydrate`, not from the log.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence
from contextlib import AbstractContextManager, ExitStack, suppress
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType
from typing import Any, Final

import structlog

from enclave_keys.context import ContextRegistry, DependencyKey
from enclave_keys.core_state import DEFAULT_HORIZON, RecentRounds, StateReader
from enclave_keys.crypto import (
    Entropy,
    EpochKey,
    EpochSource,
    RoundCipher,
    read_wrapped_header,
    unwrap_round_key,
    wrap_round_key,
)
from enclave_keys.errors import ContextClosed, LeaseTimeout, RoundCipherRetired, UnwrapFailed
from enclave_keys.events import (
    Event,
    FailureReason,
    RoundComplete,
    RoundFailed,
    RoundKeyReady,
    RoundOpened,
    RoundPurged,
    RoundRequested,
    RoundStage,
    StoredEvent,
)
from enclave_keys.ids import EpochNumber, KekVersion, KeyId, RoundId, by_round_id
from enclave_keys.store import Store, WriteBatch

__all__ = [
    "ROUND_CIPHER",
    "HydrationFailure",
    "HydrationProblem",
    "HydrationReport",
    "LeasedRoundCipher",
    "RoundCipherCore",
]

_log = structlog.get_logger(__name__)

_SNAPSHOT_VERSION: Final = 1


# --- the leased cipher ---------------------------------------------------------------------


class LeasedRoundCipher:
    """A round's :class:`RoundCipher`, lent out under counted leases.

    ``with leased.lease() as cipher: cipher.seal(...)``. :meth:`retire` stops new leases
    (they raise :class:`RoundCipherRetired`), waits a bounded time for open ones to end,
    then wipes the key. Thread-safe. The repr shows the round and key id only.

    ``condition`` lets a test observe the wait; leave it ``None``. A live round holds one
    of these per round, so it stays small: a plain lock and a counter, and a condition
    only once a retire has to wait.
    """

    __slots__ = ("_cipher", "_condition", "_leases", "_lock", "_retired", "_waiter")

    def __init__(
        self, cipher: RoundCipher, *, condition: threading.Condition | None = None
    ) -> None:
        if not isinstance(cipher, RoundCipher):
            raise TypeError("LeasedRoundCipher wraps a RoundCipher")
        self._cipher = cipher
        self._lock = threading.Lock()  # guards the three fields below
        self._leases = 0
        self._retired = False
        self._waiter: threading.Condition | None = None  # set when a retire waits
        self._condition = condition

    @property
    def round_id(self) -> RoundId:
        return self._cipher.round_id

    @property
    def key_id(self) -> KeyId:
        return self._cipher.key_id

    @property
    def retired(self) -> bool:
        """True once :meth:`retire` has begun: no new lease can be taken."""
        with self._lock:
            return self._retired

    @property
    def open_leases(self) -> int:
        with self._lock:
            return self._leases

    @property
    def is_wiped(self) -> bool:
        return self._cipher.is_wiped

    def lease(self) -> AbstractContextManager[RoundCipher]:
        """The cipher, for the length of the block. Raises :class:`RoundCipherRetired`."""
        return _CipherLease(self)

    def _take_lease(self) -> RoundCipher:
        with self._lock:
            if self._retired:
                raise RoundCipherRetired(f"round cipher of round {self.round_id} is retired")
            self._leases += 1
        return self._cipher

    def _end_lease(self) -> None:
        with self._lock:
            self._leases -= 1
            waiter = self._waiter if self._leases == 0 else None
        if waiter is not None:
            with waiter:
                waiter.notify_all()

    def retire(self, timeout: float) -> bool:
        """Stop new leases, wait up to ``timeout`` seconds for open ones, then wipe.

        Returns False if leases were still open when the wait ended: the key is wiped
        anyway (forward secrecy wins) and ``purge_lease_timeout`` is logged. An operation
        already inside ``AESGCM`` still completes: that object keeps its own key copy.
        Idempotent.
        """
        with self._lock:
            self._retired = True
            waiter = None
            if self._leases:
                made = threading.Condition() if self._condition is None else self._condition
                waiter = self._waiter = made
        drained = True
        if waiter is not None:
            with waiter:
                drained = waiter.wait_for(lambda: self.open_leases == 0, max(0.0, timeout))
        if not drained:
            _log.warning(
                "purge_lease_timeout",
                round_id=self.round_id.value,
                key_id=self.key_id.hex(),
                open_leases=self.open_leases,
                timeout=timeout,
            )
        self._cipher.wipe()
        return drained

    def __repr__(self) -> str:
        state = "retired" if self._retired else "live"
        return (
            f"LeasedRoundCipher(round_id={self.round_id.value!r},"
            f" key_id={self.key_id.hex()!r}, {state})"
        )


class _CipherLease:
    """One lease of a :class:`LeasedRoundCipher` (a plain class: cheaper than a generator)."""

    __slots__ = ("_leased",)

    def __init__(self, leased: LeasedRoundCipher) -> None:
        self._leased = leased

    def __enter__(self) -> RoundCipher:
        return self._leased._take_lease()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._leased._end_lease()


ROUND_CIPHER: Final = DependencyKey("round_cipher", LeasedRoundCipher)
"""Where the round's cipher lives in its :class:`~enclave_keys.context.RoundContext`."""


# --- hydration report -------------------------------------------------------------------


class HydrationProblem(StrEnum):
    """Why a stored key of a live round could not be put back into its context."""

    MALFORMED_BLOB = "malformed_blob"  # the header cannot be read
    EPOCH_UNAVAILABLE = "epoch_unavailable"  # the blob's storage epoch key is destroyed
    UNWRAP_FAILED = "unwrap_failed"  # authentication failed (tampered, moved)
    CONTEXT_CLOSED = "context_closed"  # the round's context was torn down meanwhile


@dataclass(frozen=True, slots=True)
class HydrationFailure:
    """A stored key that could not be hydrated. Holds ids only, never bytes."""

    round_id: RoundId
    problem: HydrationProblem
    key_id: KeyId | None = None
    epoch: EpochNumber | None = None


@dataclass(frozen=True, slots=True)
class HydrationReport:
    """What :meth:`RoundCipherCore.hydrate` found, each tuple sorted by round id.

    * ``hydrated``: live rounds whose cipher is now in their context;
    * ``orphans``: stored keys whose round is not live (the node purges them);
    * ``missing``: live rounds with no stored key at all;
    * ``failed``: stored keys of live rounds that could not be hydrated.
    """

    hydrated: tuple[RoundId, ...] = ()
    orphans: tuple[RoundId, ...] = ()
    missing: tuple[RoundId, ...] = ()
    failed: tuple[HydrationFailure, ...] = ()

    @property
    def ok(self) -> bool:
        """True if every live round got its key back and no key is orphaned."""
        return not (self.orphans or self.missing or self.failed)


# --- the core -----------------------------------------------------------------------------


class RoundCipherCore:
    """The round-cipher actor's logic. See the module docstring.

    ``epochs`` lends the current epoch key for each key created (``active_epoch()``),
    keeps the ratchet out while a stored key is deleted (``hold_ratchet()``) and hears of
    each deletion (``purged()``). ``entropy`` makes keys and nonces deterministic: FOR
    SIMULATIONS ONLY.
    """

    name: Final = "round-cipher"
    subscriptions: Final[tuple[type[Event], ...]] = (RoundRequested, RoundOpened, RoundComplete)

    def __init__(
        self,
        store: Store,
        epochs: EpochSource,
        registry: ContextRegistry,
        *,
        lease_timeout: float = 5.0,
        entropy: Entropy | None = None,
        horizon: int = DEFAULT_HORIZON,
    ) -> None:
        if (
            isinstance(lease_timeout, bool)
            or not isinstance(lease_timeout, int | float)
            or not 0 <= lease_timeout < float("inf")
        ):
            raise ValueError("lease_timeout must be a finite number of seconds >= 0")
        self._store = store
        self._epochs = epochs
        self._registry = registry
        self._lease_timeout = float(lease_timeout)
        self._entropy = entropy
        self._lock = threading.Lock()
        self._held: dict[RoundId, LeasedRoundCipher] = {}
        # Rounds seen completing. On a threaded runtime the router may close a round's
        # context only after this core handled a RoundOpened that the log orders after
        # the round's RoundComplete: the log order is what counts, never key such a round.
        self._completed = RecentRounds(horizon)
        # Rounds requested so far: a RoundComplete counts only for a round requested
        # before it. A stray one (for a round nobody requested yet) must not stop a
        # later request of that id from being keyed.
        self._requested = RecentRounds(horizon)
        # Writes waiting for the runtime's group commit; None: commit each at once.
        self._staged: list[_PutKey | _DeleteKey] | None = None
        # Rounds whose staged key the group commit did not store (settled on the bus's
        # thread): failed by the next tick rather than left to their deadline.
        self._unstored: list[RoundId] = []
        # Ended rounds whose key could not be deleted (the group commit and the retry
        # alone both failed): deleted again by the next tick, until it works.
        self._undeleted: set[RoundId] = set()
        # Rounds whose key delete is staged or committing, not yet settled: a repeated
        # RoundComplete finds the blob still stored, and must not purge it a second time.
        self._deleting: set[RoundId] = set()

    # --- queries ------------------------------------------------------------------------

    def held_rounds(self) -> list[RoundId]:
        """The rounds whose cipher this core holds, sorted."""
        with self._lock:
            return sorted(self._held)

    def cipher_of(self, round_id: RoundId) -> LeasedRoundCipher | None:
        """The held cipher of ``round_id``, if any."""
        with self._lock:
            return self._held.get(round_id)

    # --- events ---------------------------------------------------------------------------

    def handle(self, stored: StoredEvent) -> Sequence[Event]:
        event = stored.payload
        if isinstance(event, RoundRequested):
            self._requested.add(event.round_id)
            return ()
        if isinstance(event, RoundOpened):
            if event.round_id in self._completed:
                _log.debug("round_key_not_needed", why="completed", round_id=event.round_id.value)
                return ()
            return self._create(event.round_id)
        if isinstance(event, RoundComplete):
            rid = event.round_id
            if rid in self._requested or self.cipher_of(rid) is not None:
                self._completed.add_first(rid)
            purged = self._purge(event.round_id)
            return () if purged is None else (purged,)
        return ()

    def _create(self, rid: RoundId) -> Sequence[Event]:
        fields = {"round_id": rid.value}
        if self.cipher_of(rid) is not None or self._store.get_key(rid) is not None:
            _log.debug("round_key_exists", **fields)
            return ()
        if self._registry.get(rid) is None:
            _log.debug("round_key_not_needed", why="round_ended", **fields)
            return ()
        write: _PutKey | None = None
        try:
            write = self._new_key(rid)
            context = self._registry.get(rid)
            if context is None:
                raise ContextClosed(f"context of round {rid} is closed")
            context.put(ROUND_CIPHER, write.leased)
            with self._lock:
                self._held[rid] = write.leased
            self._write(write)
        except ContextClosed:
            _log.info("round_key_discarded", why="round_ended", **fields)
            if write is not None:
                write.settle(committed=False)
            return ()
        except Exception as exc:
            _log.error("round_key_creation_failed", error_type=type(exc).__qualname__, **fields)
            if write is not None:
                write.settle(committed=False)
            failed = RoundFailed(
                round_id=rid,
                failed_at=RoundStage.REQUESTED,
                reason=FailureReason.KEY_CREATION_FAILED,
                detail=type(exc).__qualname__,
            )
            return (failed,)
        key_id = write.leased.key_id
        _log.info(
            "round_key_created",
            key_id=key_id.hex(),
            kek_version=write.kek_version.number,
            **fields,
        )
        return (RoundKeyReady(round_id=rid, key_id=key_id, kek_version=write.kek_version),)

    def _new_key(self, rid: RoundId) -> _PutKey:
        """A fresh round key, wrapped under the current epoch key, as a write to commit.

        The epoch lease taken for the wrap goes with the write and ends when the write is
        settled: no ratchet can run between the wrap and the commit of the blob, so none
        misses it, and none destroys the epoch it is wrapped under before it is stored.
        """
        with ExitStack() as lease:
            epoch = lease.enter_context(self._epochs.active_epoch())
            kek_version = self._epochs.kek_version
            cipher = RoundCipher.generate(rid, entropy=self._entropy)
            try:
                blob = wrap_round_key(epoch, cipher)
            except BaseException:
                cipher.wipe()
                raise
            return _PutKey(self, rid, blob, LeasedRoundCipher(cipher), kek_version, lease.pop_all())

    def _write(self, write: _PutKey | _DeleteKey, *, now: bool = False) -> None:
        """Stage ``write`` for the group commit of this event's output, or — when not
        staging, or ``now`` — commit it at once (settled either way; raises if it failed).
        """
        if self._staged is not None and not now:
            write.staged = True
            self._staged.append(write)
            return
        try:
            with self._store.write() as batch:
                write.apply(batch)
        except BaseException:
            write.settle(committed=False)
            raise
        write.settle(committed=True)

    def tick(self, now: float) -> Sequence[Event]:
        """Delete again the keys of ended rounds whose delete failed, and fail the rounds
        whose key was made but never stored (its group commit failed): they cannot go
        on, and should not wait for their deadline. Once each."""
        with self._lock:
            unstored, self._unstored = self._unstored, []
            undeleted, self._undeleted = sorted(self._undeleted), set()
        for rid in undeleted:
            if self.cipher_of(rid) is not None:
                continue  # keyed afresh (never while the old key is stored): keep it
            # A failure is settled as not committed: retried alone, else kept for the next.
            with suppress(Exception):
                self._delete(rid)
        failed: list[Event] = []
        for rid in unstored:
            if self._registry.get(rid) is None or rid in self._completed:
                continue  # ended meanwhile: nothing to fail
            if self.cipher_of(rid) is not None or self._store.get_key(rid) is not None:
                continue  # keyed after all
            _log.error("round_key_not_stored", round_id=rid.value)
            failed.append(
                RoundFailed(
                    round_id=rid,
                    failed_at=RoundStage.REQUESTED,
                    reason=FailureReason.KEY_CREATION_FAILED,
                    detail="the round key could not be stored",
                )
            )
        return failed

    def _unkey(self, write: _PutKey) -> None:
        """A new key that will never be stored: take it back out of the core and the
        context, and wipe it."""
        rid, leased = write.round_id, write.leased
        with self._lock:
            if self._held.get(rid) is leased:
                del self._held[rid]
        context = self._registry.get(rid)
        if context is not None and context.get(ROUND_CIPHER) is leased:
            context.remove(ROUND_CIPHER)
        leased.retire(self._lease_timeout)
        if write.staged:  # (a key written at once fails its round in _create)
            with self._lock:
                self._unstored.append(rid)

    def _purge(self, rid: RoundId, *, now: bool = False) -> RoundPurged | None:
        """Retire, wipe, delete and un-context the round's key. None if there was none.

        The delete is staged (or, ``now``, committed at once) with the ratchet kept out
        until it is settled: an epoch change in flight cannot write the blob back.
        """
        with self._lock:
            leased = self._held.pop(rid, None)
            deleting = rid in self._deleting or rid in self._undeleted
        if leased is None and deleting:
            return None  # purged already (a repeated RoundComplete): its delete is on its way
        context = self._registry.get(rid)
        if context is not None:
            context.remove(ROUND_CIPHER)
        key_id: KeyId | None = None
        if leased is not None:
            key_id = leased.key_id
            leased.retire(self._lease_timeout)
        # A held key needs no read: its put may even still be staged ahead of this delete.
        blob = None if leased is not None else self._store.get_key(rid)
        if leased is None and blob is None:
            return None
        self._delete(rid, now=now)
        if key_id is None and blob is not None:
            key_id = _key_id_of(blob)
        if key_id is None:
            _log.warning("round_key_purged", round_id=rid.value, key_id=None)
            return None
        _log.info("round_key_purged", round_id=rid.value, key_id=key_id.hex())
        return RoundPurged(round_id=rid, key_id=key_id)

    def _delete(self, rid: RoundId, *, now: bool = False) -> None:
        """Stage (or, ``now``, commit) the delete of ``rid``'s key; in flight until settled."""
        write = _DeleteKey(self, rid, self._ratchet_guard(rid))
        with self._lock:
            self._deleting.add(rid)  # from here on it is settled, which discards it
        self._write(write, now=now)

    def _ratchet_guard(self, rid: RoundId) -> ExitStack:
        """The ratchet kept out until a delete is settled (or, if that cannot be had in
        time, nothing: the key is deleted anyway — a blob an epoch change writes back is an
        orphan the recovery sweep purges, a key kept is worse)."""
        guard = ExitStack()
        try:
            guard.enter_context(self._epochs.hold_ratchet())
        except LeaseTimeout:
            _log.warning("round_key_delete_unguarded", round_id=rid.value)
        return guard

    def _retry_delete(self, rid: RoundId) -> None:
        """A delete whose group was never committed (a failed commit, a runtime stopping):
        try it alone, at once — a completed round's key must not stay on disk. If that
        fails too, every tick tries again (until then each epoch change rewraps the key,
        so it stays recoverable: the delete is what ends that); a restart's recovery
        sweep deletes it as well (its round is not live)."""
        try:
            self._store.delete_key(rid)
        except Exception as exc:
            with self._lock:
                self._undeleted.add(rid)
            _log.error(
                "round_key_delete_failed",
                round_id=rid.value,
                error_type=type(exc).__qualname__,
                retry="next_tick",
            )

    # --- staging (the Staging protocol) -------------------------------------------------

    def stage_writes(self) -> None:
        """Queue key puts and deletes for the runtime's group commit from now on."""
        if self._staged is None:
            self._staged = []

    def take_writes(self) -> tuple[_PutKey | _DeleteKey, ...]:
        """The writes queued by the last ``handle`` (called by the runtime after it)."""
        if not self._staged:
            return ()
        writes, self._staged = tuple(self._staged), []
        return writes

    # --- node operations ----------------------------------------------------------------

    def hydrate(self, live_rounds: Collection[RoundId]) -> HydrationReport:
        """Put the stored key of every live round back into its context (node start).

        Each blob is unwrapped under the current epoch key, held under one lease for the
        whole pass; a blob naming any other epoch names a destroyed one. Keys of rounds
        that are not live are reported as orphans and left in the store for the node's
        recovery sweep (:meth:`purge_orphan`).
        """
        live = {rid: rid for rid in live_rounds}  # the caller's ids: stored ones are copies
        hydrated: list[RoundId] = []
        orphans: list[RoundId] = []
        failed: list[HydrationFailure] = []
        with self._lock:
            held_before = set(self._held)
        restored: dict[RoundId, LeasedRoundCipher] = {}
        try:
            with ExitStack() as lease:
                try:
                    epoch: EpochKey | None = lease.enter_context(self._epochs.active_epoch())
                except Exception as exc:
                    _log.error("round_key_hydration_no_epoch", error_type=type(exc).__qualname__)
                    epoch = None
                for stored_rid, blob in self._store.list_keys():
                    rid = live.get(stored_rid)
                    if rid is None:
                        orphans.append(stored_rid)
                    elif rid in held_before:
                        hydrated.append(rid)
                    else:
                        problem = self._hydrate_one(rid, blob, epoch, restored)
                        if problem is None:
                            hydrated.append(rid)
                        else:
                            failed.append(problem)
        finally:  # whatever is in a context is held, so wipe_all() finds it
            with self._lock:
                self._held.update(restored)
        have_key = set(hydrated) | {f.round_id for f in failed}
        report = HydrationReport(
            hydrated=tuple(sorted(hydrated)),
            orphans=tuple(sorted(orphans)),
            missing=tuple(sorted(live.keys() - have_key)),
            failed=tuple(sorted(failed, key=lambda f: f.round_id)),
        )
        _log.info(
            "round_keys_hydrated",
            hydrated=len(report.hydrated),
            orphans=len(report.orphans),
            missing=len(report.missing),
            failed=len(report.failed),
        )
        return report

    def _hydrate_one(
        self,
        rid: RoundId,
        blob: bytes,
        epoch: EpochKey | None,
        restored: dict[RoundId, LeasedRoundCipher],
    ) -> HydrationFailure | None:
        if epoch is None:
            return self._not_hydrated(rid, blob, None)
        try:
            cipher = unwrap_round_key(epoch, rid, blob, entropy=self._entropy)
        except UnwrapFailed:
            return self._not_hydrated(rid, blob, epoch)
        leased = LeasedRoundCipher(cipher)
        try:
            self._registry.open(rid).put(ROUND_CIPHER, leased)
        except ContextClosed:
            cipher.wipe()
            return self._hydration_failed(
                rid, HydrationProblem.CONTEXT_CLOSED, leased.key_id, epoch.number
            )
        restored[rid] = leased
        return None

    def _not_hydrated(self, rid: RoundId, blob: bytes, epoch: EpochKey | None) -> HydrationFailure:
        """Why ``blob`` did not unwrap: its header is read only on this path."""
        try:
            number, key_id = read_wrapped_header(blob)
        except UnwrapFailed:
            return self._hydration_failed(rid, HydrationProblem.MALFORMED_BLOB)
        if epoch is None or number != epoch.number:
            return self._hydration_failed(rid, HydrationProblem.EPOCH_UNAVAILABLE, key_id, number)
        return self._hydration_failed(rid, HydrationProblem.UNWRAP_FAILED, key_id, number)

    @staticmethod
    def _hydration_failed(
        rid: RoundId,
        problem: HydrationProblem,
        key_id: KeyId | None = None,
        epoch: EpochNumber | None = None,
    ) -> HydrationFailure:
        _log.warning(
            "round_key_hydration_failed",
            round_id=rid.value,
            problem=problem.value,
            key_id=None if key_id is None else key_id.hex(),
            epoch=None if epoch is None else epoch.number,
        )
        return HydrationFailure(rid, problem, key_id, epoch)

    def purge_orphan(self, round_id: RoundId) -> RoundPurged | None:
        """Purge a round's key for the recovery sweep; the event for the node to publish.

        ``None`` when nothing was held or stored for the round (or the stored blob's
        header could not be read — the blob is deleted all the same).
        """
        return self._purge(round_id, now=True)

    def wipe_all(self) -> None:
        """Retire and wipe every held cipher (node stop). The store is not touched."""
        with self._lock:
            held, self._held = self._held, {}
        for rid, leased in sorted(held.items(), key=by_round_id):
            leased.retire(self._lease_timeout)
            context = self._registry.get(rid)
            if context is not None:
                context.remove(ROUND_CIPHER)
        if held:
            _log.info("round_keys_wiped", count=len(held))

    # --- snapshots ------------------------------------------------------------------------

    def snapshot_state(self) -> dict[str, Any]:
        """``{"version": 1, "held": [round id, ...]}`` — informational only.

        This core is rebuilt from the store (:meth:`hydrate`), never from a snapshot.
        """
        return {"version": _SNAPSHOT_VERSION, "held": [rid.value for rid in self.held_rounds()]}

    def restore_state(self, state: object) -> None:
        """Check a :meth:`snapshot_state` for form (``CorruptRecord``); changes nothing."""
        reader = StateReader("round-cipher snapshot", state, version=_SNAPSHOT_VERSION)
        if not all(isinstance(raw, str) for raw in reader.items("held")):
            raise reader.corrupt("'held' must be a list of round ids")

    def __repr__(self) -> str:
        return f"RoundCipherCore(held={len(self.held_rounds())})"


def _key_id_of(blob: bytes) -> KeyId | None:
    try:
        return read_wrapped_header(blob)[1]
    except UnwrapFailed:
        return None


# --- the writes ---------------------------------------------------------------------------


class _KeyWrite(ABC):
    """A staged write of a round's key record, holding an epoch-gate lease until settled.

    :meth:`settle` runs once (later calls do nothing): if the write was never committed it
    is undone (:meth:`_not_committed`), then the lease ends, then :meth:`_settled` runs.
    """

    __slots__ = ("_core", "_lease", "_settled", "round_id", "staged")

    def __init__(self, core: RoundCipherCore, round_id: RoundId, lease: ExitStack) -> None:
        self._core = core
        self.round_id = round_id
        self._lease = lease
        self._settled = False
        self.staged = False  # handed to the runtime's group commit (not written at once)

    @abstractmethod
    def apply(self, batch: WriteBatch) -> None: ...

    def settle(self, committed: bool) -> None:
        if self._settled:
            return
        self._settled = True
        try:
            if not committed:
                self._not_committed()
        finally:
            self._lease.close()
        self._after()

    @abstractmethod
    def _not_committed(self) -> None: ...

    @abstractmethod
    def _after(self) -> None:
        """What follows the lease's end, committed or not."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(round_id={self.round_id.value!r})"


class _PutKey(_KeyWrite):
    """A new round key's wrapped blob, to store; holds the epoch lease it was wrapped under
    (a key never stored is taken back and wiped)."""

    __slots__ = ("blob", "kek_version", "leased")

    def __init__(
        self,
        core: RoundCipherCore,
        round_id: RoundId,
        blob: bytes,
        leased: LeasedRoundCipher,
        kek_version: KekVersion,
        lease: ExitStack,
    ) -> None:
        super().__init__(core, round_id, lease)
        self.blob = blob
        self.leased = leased
        self.kek_version = kek_version

    def apply(self, batch: WriteBatch) -> None:
        batch.put_key(self.round_id, self.blob)

    def _not_committed(self) -> None:
        self._core._unkey(self)

    def _after(self) -> None:
        """Nothing: a stored key needs no more, an unstored one was taken back."""


class _DeleteKey(_KeyWrite):
    """A round key's deletion; holds the ratchet out until it is settled (retried alone if
    never committed), then reports the purge to the epoch source."""

    __slots__ = ()

    def apply(self, batch: WriteBatch) -> None:
        batch.delete_key(self.round_id)

    def _not_committed(self) -> None:
        self._core._retry_delete(self.round_id)

    def _after(self) -> None:
        """Report the purge — unless the key is still stored (the retry failed too: it is
        in ``_undeleted`` by now), when no epoch change could help until the next tick
        deletes it and reports it then."""
        core = self._core
        with core._lock:
            core._deleting.discard(self.round_id)
            still_stored = self.round_id in core._undeleted
        if not still_stored:
            core._epochs.purged()
