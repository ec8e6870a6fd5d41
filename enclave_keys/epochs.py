"""The storage epoch ratchet: forward secrecy for round keys at rest (design §6).

Round keys are stored wrapped under the current **storage epoch key**; the epoch key is
kept, wrapped under the active KEK, in the store's slot file (:mod:`enclave_keys.store.
slots`), which is overwritten in place — never in LMDB, whose deleted values linger in
free pages. When round keys are purged, :class:`EpochKeeper` *ratchets* within the
configured window: it makes the next epoch key, rewraps every live round key under it and
destroys the old one. After that, a purged round's wrapped key — wherever a copy of it
lingers — names an epoch key that no longer exists anywhere: the master secret does not
bring it back.

One epoch change, crash-safe at every step (``docs/key-hierarchy.md``)::

    1. write the new epoch key to the *other* slot (sequence + 1), fdatasync;
       it becomes current: new round keys wrap under it
                                               -> both slots valid
    2. rewrap every live round key under the old epoch, beside live traffic;
       one LMDB commit writes back those still as listed
    3. overwrite the old slot with zeros, fdatasync
                                               -> old epoch key destroyed

Only step 1 keeps wraps and deletes out (the exclusive section of the epoch gate): a
ratchet over 100,000 live keys does not stall round creation and purges for its rewrap.

At open, :meth:`EpochKeeper.open` finishes an interrupted change: with two usable slots
it rewraps whatever is still under the older epoch, then wipes the older slot (roll
forward, so an epoch meant to be destroyed is destroyed). A slot that is torn, or whose
KEK version the keyring does not have (a KEK rotation that did not commit), is wiped.

A KEK rotation is an epoch change too (:meth:`EpochKeeper.rotate_kek`): the new epoch key
is wrapped under the new KEK, and the keyring commits in the same LMDB transaction as the
rewrapped round keys, all under the exclusive section.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Final

import structlog

from enclave_keys.clock import Clock
from enclave_keys.collector import collector_paused
from enclave_keys.crypto import (
    DEFAULT_LEASE_WAIT,
    Entropy,
    EpochKey,
    Kek,
    KekSource,
    LeaseGate,
    check_timeout,
    read_epoch_header,
    read_wrapped_header,
    rewrap_round_keys,
    unwrap_epoch_key,
    wrap_epoch_key,
)
from enclave_keys.errors import (
    CorruptSlot,
    KekRetired,
    LeaseTimeout,
    RatchetFailed,
    StoreUnavailable,
    UnknownEpoch,
    UnknownKekVersion,
    UnwrapFailed,
)
from enclave_keys.ids import EpochNumber, KekVersion
from enclave_keys.master import KekDependent, KekRotation, MasterKeys
from enclave_keys.store import Store, WriteBatch
from enclave_keys.store.slots import (
    SLOT_COUNT,
    SLOT_SIZE,
    SlotDevice,
    SlotRecord,
    decode_slot,
    encode_slot,
)

__all__ = [
    "DEFAULT_EPOCH_WINDOW",
    "ESTIMATED_RATCHET_SECONDS_PER_KEY",
    "EpochChange",
    "EpochKeeper",
    "EpochRecovery",
    "RatchetPhase",
    "SlotStatus",
    "slot_status",
]

_log = structlog.get_logger(__name__)

DEFAULT_EPOCH_WINDOW: Final = 1.0
"""Seconds within which a purged round key becomes unrecoverable (design §6)."""

_EMPTY_SLOT: Final = bytes(SLOT_SIZE)
_FIRST_EPOCH: Final = EpochNumber(1)

RatchetPhase = Callable[[str], None]
"""Test hook, called with ``"slot_written"``, ``"keys_rewrapped"``, ``"old_slot_wiped"``."""


@dataclass(frozen=True, slots=True)
class EpochChange:
    """What one epoch change did (numbers and counts, never key bytes)."""

    old_epoch: EpochNumber
    new_epoch: EpochNumber
    rewrapped: int
    skipped: int  # stored blobs that were already unreadable (left for the sweep)
    reason: str


@dataclass(frozen=True, slots=True)
class EpochRecovery:
    """What :meth:`EpochKeeper.open` found in the slot file."""

    epoch: EpochNumber
    created: bool  # no usable slot: a new epoch was made
    rolled_forward: int  # round keys rewrapped to finish an interrupted change
    wiped_slots: tuple[int, ...]  # stale, torn or unusable slots overwritten


@dataclass(slots=True)
class _Slot:
    index: int
    record: SlotRecord
    kek_version: KekVersion
    epoch: EpochNumber


class _Rewrap(KekDependent):
    """An epoch change staged for a KEK rotation: the new slot is written, the rewrapped
    keys wait for the rotation's commit (all under the exclusive section)."""

    def __init__(
        self,
        keeper: EpochKeeper,
        new: EpochKey,
        kek_version: KekVersion,
        *,
        started: float,
        covering: float | None,
    ) -> None:
        self._keeper = keeper
        self._new = new
        self._kek_version = kek_version
        self._started = started  # monotonic: when the rotation began its change
        self._covering = covering  # monotonic: the first purge it covers, if any
        self._rewrapped = 0
        self._skipped = 0

    def write(self, batch: WriteBatch) -> int:
        triples, self._skipped = self._keeper._rewrapped(self._keeper._live(), self._new)
        batch.replace_key_records(triples)
        self._rewrapped = len(triples)
        return self._rewrapped

    def committed(self) -> None:
        """The keyring and the rewrapped keys are committed: the new epoch is current
        whatever follows. Never raises (the rotation has happened; ``MasterKeys`` must
        take its new keyring): if the old slot cannot be wiped, the change stays begun
        and the next ratchet finishes it."""
        keeper = self._keeper
        retiring = keeper._switch(self._new, self._kek_version, self._covering)
        try:
            keeper._phase("keys_rewrapped")
            keeper._retire(retiring, self._rewrapped, self._skipped, "kek")
            keeper._account(self._started, self._covering)
        except Exception as exc:
            _log.error(
                "epoch_change_unfinished",
                old_epoch=retiring.key.number.number,
                new_epoch=self._new.number.number,
                error_type=type(exc).__qualname__,
            )

    def aborted(self) -> None:
        self._keeper._roll_back(self._new)


@dataclass(slots=True)
class _Retiring:
    """The old epoch of a change begun: the new epoch is current and both slots hold a
    key; the old one is destroyed once every live key under it is rewrapped."""

    key: EpochKey
    index: int
    covering: float | None  # monotonic time of the first purge the change covers


CLEAN_RECORD: Final = "epoch.clean"
"""Meta record written at a clean stop or seal when no purge is waiting for an epoch
change: the current epoch number. The next open reads and deletes it; if it names the
epoch the keeper opened with, that open's start ratchet can be skipped. Any purge after
it is written deletes it again."""


ESTIMATED_RATCHET_SECONDS_PER_KEY: Final = 10e-6
"""What one live key is taken to add to a ratchet's duration until one has been measured
(about 1.7x what this library's benchmark measures: a slow first estimate costs a ratchet
started early; a fast one, a window missed)."""


class EpochKeeper:
    """Holds the current storage epoch key and ratchets it. An :class:`EpochSource`.

    Build with :meth:`open` once the keyring is unsealed. ``window`` bounds the time from
    a purge to the destruction of the epoch key that wrapped the purged key: a ratchet
    is due ``window / 2`` after the first purge not yet covered on ``clock``
    (:meth:`ratchet_if_due`, called on every node tick). :meth:`start_timer` ratchets on
    real time (``monotonic``) for a threaded node, and starts each ratchet
    :attr:`timer_lead` seconds before the window closes: half the window, or twice the
    last ratchet's duration if that is longer, since a ratchet's cost grows with the live
    keys it rewraps. An epoch change (a ratchet or a KEK rotation) that destroys the old
    epoch later than ``window`` after the first purge it covers is counted
    (:attr:`window_misses`) and logged (``epoch_window_missed``). ``entropy`` (FOR
    SIMULATIONS ONLY) makes epoch keys and nonces deterministic. Thread-safe.
    """

    def __init__(
        self,
        store: Store,
        keks: KekSource,
        *,
        clock: Clock,
        window: float = DEFAULT_EPOCH_WINDOW,
        lease_timeout: float = DEFAULT_LEASE_WAIT,
        entropy: Entropy | None = None,
        phase_hook: RatchetPhase | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """Private: use :meth:`open`."""
        self._store = store
        self._slots: SlotDevice = store.epoch_slots()
        self._keks = keks
        self._clock = clock
        self._window = check_timeout(window, "window")
        self._lease_timeout = check_timeout(lease_timeout, "lease_timeout")
        self._entropy = entropy
        self._phase_hook = phase_hook
        self._monotonic = monotonic
        self._gate = LeaseGate("storage epoch")
        self._changing = threading.Lock()  # one epoch change (ratchet, rotation) at a time
        self._lock = threading.Lock()  # guards the fields below
        self._current: EpochKey | None = None
        self._retiring: _Retiring | None = None  # a change begun, not yet finished
        self._index = 0
        self._sequence = 0
        self._kek_version = KekVersion(1)
        self._last_number = 0  # highest epoch number made or seen: never reused
        self._pending_since: float | None = None
        self._pending_at: float | None = None  # the same purge, on the monotonic clock
        self._purges = 0  # purges since the last epoch change began
        self._since_stage: tuple[float, float] | None = None  # the first of those: times
        self._last_duration = 0.0  # seconds the last ratchet took, monotonic
        self._window_misses = 0
        self._changes = 0
        self._timer: threading.Thread | None = None
        self._wake = threading.Condition(self._lock)
        self._closing = False
        self._clean_at_open = False
        self._marked_clean = False  # this keeper wrote CLEAN_RECORD (a purge deletes it)

    # --- open and recovery ----------------------------------------------------------------

    @classmethod
    def open(
        cls,
        store: Store,
        keks: KekSource,
        *,
        clock: Clock,
        window: float = DEFAULT_EPOCH_WINDOW,
        lease_timeout: float = DEFAULT_LEASE_WAIT,
        entropy: Entropy | None = None,
        phase_hook: RatchetPhase | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> tuple[EpochKeeper, EpochRecovery]:
        """Load the current epoch from the slot file, finishing an interrupted change.

        A fresh store gets epoch 1. If no slot is usable although round keys are stored
        (the slot file was lost), a new epoch is made and those keys stay unreadable:
        hydration reports them and the node fails their rounds.
        """
        keeper = cls(
            store,
            keks,
            clock=clock,
            window=window,
            lease_timeout=lease_timeout,
            entropy=entropy,
            phase_hook=phase_hook,
            monotonic=monotonic,
        )
        try:
            recovery = keeper._recover()
            keeper._clean_at_open = keeper._take_clean_record()
            keeper._last_duration = store.key_count() * ESTIMATED_RATCHET_SECONDS_PER_KEY
        except BaseException:
            keeper.close()
            raise
        return keeper, recovery

    def _take_clean_record(self) -> bool:
        """Read and delete :data:`CLEAN_RECORD`: True if it names the current epoch.
        Deleted before anything else runs, so a crash from here on leaves no record."""
        raw = self._store.get_meta(CLEAN_RECORD)
        if raw is None:
            return False
        with self._store.write() as batch:
            batch.delete_meta(CLEAN_RECORD)
        return raw == self._epoch_number().to_bytes()

    @property
    def clean_at_open(self) -> bool:
        """True if the last session ended cleanly with no purge waiting for an epoch
        change, in the epoch this keeper opened with: its start needs no ratchet for
        purges made before it (see :data:`CLEAN_RECORD`)."""
        return self._clean_at_open

    def mark_clean(self) -> bool:
        """At a clean stop or seal, after :meth:`ratchet_pending`: record that no purge
        is waiting for an epoch change, so the next open may skip its start ratchet.

        Written under the exclusive section, so no delete is in flight; False (and
        nothing written) if a purge is still waiting. A purge after this deletes the
        record again.
        """
        with self._gate.exclusive(self._lease_timeout):
            with self._lock:
                if (
                    self._pending_since is not None
                    or self._retiring is not None
                    or self._current is None
                ):
                    return False
                number = self._current.number
                self._marked_clean = True
            self._store.put_meta(CLEAN_RECORD, number.to_bytes())
        return True

    def _recover(self) -> EpochRecovery:
        found: list[_Slot] = []
        wipe: list[int] = []
        highest_sequence = 0
        highest_epoch = 0
        for index in range(SLOT_COUNT):
            try:
                record = decode_slot(self._slots.read(index))
            except CorruptSlot as exc:
                _log.warning("epoch_slot_corrupt", slot=index, error=str(exc))
                wipe.append(index)
                continue
            if record is None:
                continue
            highest_sequence = max(highest_sequence, record.sequence)
            try:
                kek_version, epoch = read_epoch_header(record.payload)
            except UnwrapFailed:
                _log.warning("epoch_slot_unusable", slot=index, why="malformed")
                wipe.append(index)
                continue
            highest_epoch = max(highest_epoch, epoch.number)
            found.append(_Slot(index, record, kek_version, epoch))

        usable: list[tuple[_Slot, EpochKey]] = []
        for slot in found:
            key = self._open_slot(slot)
            if key is None:
                wipe.append(slot.index)
            else:
                usable.append((slot, key))
        usable.sort(key=lambda pair: (pair[0].record.sequence, pair[0].epoch.number))

        rolled = 0
        created = False
        if not usable:
            highest_epoch = max([highest_epoch, *self._stored_epochs()], default=0)
            created = True
            self._create_first(highest_sequence, highest_epoch, wipe)
        else:
            (slot, key) = usable[-1]
            self._adopt(slot, key)
            for old_slot, old_key in usable[:-1]:
                rolled += self._roll_forward(old_key, key)
                old_key.wipe()
                wipe.append(old_slot.index)
        with self._lock:
            self._last_number = max(highest_epoch, self._live_locked().number.number)
        wiped = tuple(sorted(set(wipe) - {self._index}))
        for index in wiped:
            self._slots.write(index, _EMPTY_SLOT)
        current = self._epoch_number()
        _log.info(
            "epoch_opened",
            epoch=current.number,
            kek_version=self._kek_version.number,
            created=created,
            rolled_forward=rolled,
            wiped_slots=list(wiped),
        )
        return EpochRecovery(current, created, rolled, wiped)

    def _open_slot(self, slot: _Slot) -> EpochKey | None:
        try:
            with self._keks.kek_for(slot.kek_version) as kek:
                return unwrap_epoch_key(kek, slot.record.payload, entropy=self._entropy)
        except (UnknownKekVersion, KekRetired, UnwrapFailed) as exc:
            # A rotation that never committed, or one whose old slot was not yet wiped.
            _log.warning(
                "epoch_slot_unusable",
                slot=slot.index,
                epoch=slot.epoch.number,
                kek_version=slot.kek_version.number,
                why=type(exc).__name__,
            )
            return None

    def _stored_epochs(self) -> list[int]:
        numbers = []
        for _, blob in self._store.list_keys():
            try:
                numbers.append(read_wrapped_header(blob)[0].number)
            except UnwrapFailed:
                continue
        return numbers

    def _create_first(self, highest_sequence: int, highest_epoch: int, wipe: list[int]) -> None:
        epoch = EpochNumber(highest_epoch + 1) if highest_epoch else _FIRST_EPOCH
        key = EpochKey.generate(epoch, entropy=self._entropy)
        index = 0
        try:
            with self._keks.active_kek() as kek:
                payload = wrap_epoch_key(kek, key)
                self._slots.write(index, encode_slot(SlotRecord(highest_sequence + 1, payload)))
                kek_version = kek.version
        except BaseException:
            key.wipe()
            raise
        stored = self._store.key_count()
        if stored:
            _log.error("epoch_keys_lost", stored_round_keys=stored, new_epoch=epoch.number)
        with self._lock:
            self._current, self._index = key, index
            self._sequence, self._kek_version = highest_sequence + 1, kek_version
        wipe.append(1 - index)

    def _adopt(self, slot: _Slot, key: EpochKey) -> None:
        with self._lock:
            self._current, self._index = key, slot.index
            self._sequence, self._kek_version = slot.record.sequence, slot.kek_version

    def _roll_forward(self, old: EpochKey, new: EpochKey) -> int:
        """Rewrap what is still under ``old`` (an interrupted change) under ``new``."""
        rewrapped = rewrap_round_keys(old, new, self._store.list_key_records())
        todo = [(round_id, blob) for round_id, blob in rewrapped if blob is not None]
        if todo:
            with self._store.write() as batch:
                batch.put_key_records(todo)
        _log.info("epoch_change_rolled_forward", old=old.number.number, new=new.number.number)
        return len(todo)

    # --- EpochSource --------------------------------------------------------------------

    @property
    def kek_version(self) -> KekVersion:
        """The KEK version that wraps the current epoch key."""
        with self._lock:
            return self._kek_version

    @property
    def epoch(self) -> EpochNumber:
        """The current epoch number."""
        return self._epoch_number()

    @property
    def changes(self) -> int:
        """Epoch changes made by this keeper (ratchets and KEK rotations)."""
        with self._lock:
            return self._changes

    @property
    def pending_since(self) -> float | None:
        """Clock time of the first purge not yet covered by an epoch change."""
        with self._lock:
            return self._pending_since

    @property
    def window_misses(self) -> int:
        """Epoch changes (ratchets and KEK rotations) that destroyed an epoch key later
        than ``window`` after the first purge they covered (monotonic time)."""
        with self._lock:
            return self._window_misses

    @property
    def timer_lead(self) -> float:
        """Seconds before the window closes at which :meth:`start_timer` starts a ratchet:
        ``max(window / 2, 2 x the last ratchet's duration)``, at most ``window``. Until
        this keeper has ratcheted, the duration is estimated from the live keys at open
        (:data:`ESTIMATED_RATCHET_SECONDS_PER_KEY` each)."""
        with self._lock:
            return self._lead_locked()

    def _lead_locked(self) -> float:
        # Before the first ratchet, _last_duration is an estimate from the key count.
        return min(self._window, max(self._window / 2, 2 * self._last_duration))

    def _epoch_number(self) -> EpochNumber:
        return self._live().number

    def _live(self) -> EpochKey:
        with self._lock:
            return self._live_locked()

    def _live_locked(self) -> EpochKey:
        if self._current is None:
            raise UnknownEpoch("the epoch keeper is closed")
        return self._current

    def active_epoch(self) -> AbstractContextManager[EpochKey]:
        return self._gate.leased(self._lease_timeout, self._live)

    def epoch_for(self, number: EpochNumber) -> AbstractContextManager[EpochKey]:
        def live_as_numbered() -> EpochKey:
            current = self._live()
            if number != current.number:  # mid-change, the retiring epoch is not lent
                raise UnknownEpoch(f"storage epoch {number} is destroyed or unknown")
            return current

        return self._gate.leased(self._lease_timeout, live_as_numbered)

    def hold_ratchet(self) -> AbstractContextManager[None]:
        return self._gate.shared(self._lease_timeout, allow_closed=True)

    def purged(self) -> None:
        with self._lock:
            if self._pending_since is None or self._purges == 0:
                now, at = self._clock.now(), self._monotonic()
                if self._pending_since is None:
                    self._pending_since, self._pending_at = now, at
                if self._purges == 0:
                    self._since_stage = (now, at)
            self._purges += 1
            self._wake.notify_all()
            unmark, self._marked_clean = self._marked_clean, False
        if unmark:  # a purge after a clean mark (the node marks only once stopped)
            try:
                self._store.delete_meta(CLEAN_RECORD)
            except Exception as exc:  # on the bus's thread: report, never raise
                _log.error("epoch_clean_record_not_deleted", error_type=type(exc).__qualname__)

    # --- ratchet --------------------------------------------------------------------------

    def due(self, now: float) -> bool:
        """True once half the window has passed since the first uncovered purge, or
        while a change a failed ratchet left begun waits to be finished."""
        with self._lock:
            since, begun = self._pending_since, self._retiring is not None
        return begun or (since is not None and now - since >= self._window / 2)

    def ratchet_if_due(self, now: float) -> EpochChange | None:
        """Ratchet if :meth:`due`; the node calls this on every tick. Asked again once
        no other change runs: a ratchet the timer just made is not made twice."""
        if not self.due(now):
            return None
        return self._ratchet("window", self._lease_timeout, lambda: self.due(now))

    def ratchet_pending(self) -> EpochChange | None:
        """Ratchet now if any purge is not yet covered, or a change is left begun (clean
        stop, seal). Asked again once no other change runs."""
        if not self._pending():
            return None
        return self._ratchet("pending", self._lease_timeout, self._pending)

    def _pending(self) -> bool:
        with self._lock:
            return self._pending_since is not None or self._retiring is not None

    def ratchet(self, reason: str = "requested", *, timeout: float | None = None) -> EpochChange:
        """Make the next epoch, rewrap every live round key under it, destroy the old.

        Only the switch to the new epoch keeps wraps and deletes out (bounded wait for
        those in flight, then one slot write): from then on new round keys wrap under the
        new epoch while the live keys are rewrapped beside them and written back wherever
        they are unchanged (a key deleted meanwhile stays deleted). Then the old epoch
        key is destroyed. If the switch fails, memory and disk keep the current epoch; if
        the rewrap fails (:class:`RatchetFailed`), the change stays begun: the new epoch
        stays current, the old one stays in its slot, and the next ratchet finishes that
        change before it makes its own (a key made under the new epoch may have been
        purged meanwhile); the timer and :meth:`due` see a begun change as due. A crash
        leaves it to the next open. On return, every purge reported before the call is
        covered.
        """
        wait = self._lease_timeout if timeout is None else check_timeout(timeout)
        change = self._ratchet(reason, wait, None)
        assert change is not None
        return change

    def _ratchet(
        self, reason: str, wait: float, needed: Callable[[], bool] | None
    ) -> EpochChange | None:
        """:meth:`ratchet`, or None if ``needed`` says no once this thread may change
        the epoch (a change on another thread may have covered what was pending)."""
        with self._one_change(wait):
            if needed is not None and not needed():
                return None
            self._finish_begun(reason, wait)
            return self._change(reason, wait, resume=False)

    def _finish_begun(self, reason: str, wait: float) -> None:
        """Finish the change a failed ratchet left begun, if any (``_changing`` held)."""
        with self._lock:
            begun = self._retiring is not None
        if begun:
            self._change(reason, wait, resume=True)

    def _change(self, reason: str, wait: float, *, resume: bool) -> EpochChange:
        """One epoch change — begun here unless ``resume`` — finished and accounted."""
        started = self._monotonic()
        if not resume:
            with self._gate.exclusive(wait), self._keks.active_kek() as kek:
                started = self._monotonic()  # the lead counts the change, not the wait
                new, covering = self._stage(kek)
                self._switch(new, kek.version, covering)
        change, covering = self._complete(reason)
        self._account(started, covering)
        return change

    @contextmanager
    def _one_change(self, wait: float) -> Iterator[None]:
        """The right to make an epoch change (bounded wait: ``LeaseTimeout``)."""
        if not self._changing.acquire(timeout=wait):
            raise LeaseTimeout(f"another storage epoch change still runs after {wait:g} s")
        try:
            yield
        finally:
            self._changing.release()

    def _switch(self, new: EpochKey, kek_version: KekVersion, covering: float | None) -> _Retiring:
        """Make ``new`` (durable in the other slot) the current epoch; the old one retires."""
        with self._lock:
            retiring = _Retiring(self._live_locked(), self._index, covering)
            self._retiring = retiring
            self._current, self._index = new, 1 - self._index
            self._sequence += 1
            self._kek_version = kek_version
        return retiring

    def _complete(self, reason: str) -> tuple[EpochChange, float | None]:
        """Steps 2 and 3 of the change begun: rewrap what is under the retiring epoch,
        write back what is unchanged, destroy the retiring epoch."""
        with self._lock:
            retiring, new = self._retiring, self._live_locked()
        assert retiring is not None
        try:
            # Tens of thousands of short-lived objects alive at once would trigger a
            # full collection of the whole heap: ~40% of a ratchet at 30k live keys.
            with collector_paused(promote=False):
                triples, skipped = self._rewrapped(retiring.key, new)
                with self._store.write() as batch:
                    batch.replace_key_records(triples)
            self._phase("keys_rewrapped")
            change = self._retire(retiring, len(triples), skipped, reason)
        except BaseException as exc:
            _log.error(
                "epoch_change_unfinished",
                old_epoch=retiring.key.number.number,
                new_epoch=new.number.number,
                error_type=type(exc).__qualname__,
            )
            with self._lock:
                self._wake.notify_all()  # the timer finishes it
            if isinstance(exc, Exception):
                raise RatchetFailed(
                    f"epoch change not finished: {type(exc).__name__}; the next ratchet"
                    " (or open) finishes it"
                ) from exc
            raise
        return change, retiring.covering

    def _account(self, started: float, covering: float | None) -> None:
        """Record how long the ratchet begun at ``started`` took once it held the epoch
        (the timer's lead), and whether it destroyed the old epoch within the window of
        the first purge it covered (at ``covering``, monotonic)."""
        done = self._monotonic()
        with self._lock:
            self._last_duration = duration = done - started
            late = 0.0 if covering is None else done - covering - self._window
            if late > 0:
                self._window_misses += 1
        if late > 0:
            _log.warning(
                "epoch_window_missed",
                late_by=round(late, 3),
                window=self._window,
                ratchet_seconds=round(duration, 3),
            )

    def rotate_kek(self, master: MasterKeys, *, timeout: float | None = None) -> KekRotation:
        """Rotate ``master``'s KEK as an epoch change: the next epoch key, wrapped under
        the new KEK, and every live round key rewrapped under it, commit in the same
        LMDB transaction as the new keyring. Waits (bounded) for wraps in flight; a
        change a failed ratchet left begun is finished first."""
        wait = self._lease_timeout if timeout is None else check_timeout(timeout)
        with self._one_change(wait):
            self._finish_begun("resumed", wait)
            with self._gate.exclusive(wait):
                return master.rotate_kek(timeout=wait, rewrap=self._prepare_rotation)

    def _prepare_rotation(self, new_kek: Kek) -> _Rewrap:
        started = self._monotonic()
        new, covering = self._stage(new_kek)
        return _Rewrap(self, new, new_kek.version, started=started, covering=covering)

    def _stage(self, kek: Kek) -> tuple[EpochKey, float | None]:
        """Step 1: the next epoch key, written durably to the other slot; and the time
        (monotonic) of the first purge this change covers, if any."""
        with self._lock:
            self._last_number = max(self._last_number, self._live_locked().number.number) + 1
            number = EpochNumber(self._last_number)
            target, sequence = 1 - self._index, self._sequence + 1
            self._purges, self._since_stage = 0, None
            covering = self._pending_at
        new = EpochKey.generate(number, entropy=self._entropy)
        try:
            record = SlotRecord(sequence, wrap_epoch_key(kek, new))
            self._slots.write(target, encode_slot(record))
            self._phase("slot_written")
        except BaseException:
            new.wipe()
            raise
        return new, covering

    def _rewrapped(
        self, old: EpochKey, new: EpochKey
    ) -> tuple[list[tuple[bytes, bytes, bytes]], int]:
        """Step 2's blobs: ``(round id bytes, stored blob, rewrapped blob)`` for every
        stored key under ``old``. Blobs that do not open (another epoch — keys made after
        the switch —, tampered) are skipped: they must not hold the ratchet back."""
        records = self._store.list_key_records()
        rewrapped = rewrap_round_keys(old, new, records)
        pairs = list(zip(records, rewrapped, strict=True))
        triples = [(rid, stored, blob) for (rid, stored), (_, blob) in pairs if blob is not None]
        unreadable = [  # a key made since the switch (under the new epoch) is no concern
            rid for (rid, stored), (_, blob) in pairs if blob is None and not _under(stored, new)
        ]
        for round_id in unreadable:
            _log.warning("epoch_rewrap_skipped", round_id=round_id.decode("ascii", "replace"))
        skipped = len(unreadable)
        return triples, skipped

    def _retire(
        self, retiring: _Retiring, rewrapped: int, skipped: int, reason: str
    ) -> EpochChange:
        """Step 3: destroy the retiring epoch key on disk, then in memory."""
        self._slots.write(retiring.index, _EMPTY_SLOT)
        self._phase("old_slot_wiped")
        with self._lock:
            new = self._live_locked()
            self._retiring = None
            self._changes += 1
            # A purge reported since the switch is pending from when it was reported (not
            # from the purges this change covered): its key may be under the new epoch.
            since = self._since_stage if self._purges else None
            self._pending_since, self._pending_at = since or (None, None)
        old = retiring.key
        old.wipe()
        change = EpochChange(old.number, new.number, rewrapped, skipped, reason)
        _log.info(
            "epoch_changed",
            old_epoch=old.number.number,
            new_epoch=new.number.number,
            kek_version=self._kek_version.number,
            rewrapped=rewrapped,
            skipped=skipped,
            reason=reason,
        )
        return change

    def _roll_back(self, new: EpochKey) -> None:
        """Undo step 1 after a failure: wipe the new slot and key (best effort)."""
        with self._lock:
            target = 1 - self._index
        new.wipe()
        try:
            self._slots.write(target, _EMPTY_SLOT)
        except Exception as exc:  # both slots stay valid: the next open rolls forward
            _log.error("epoch_rollback_incomplete", error_type=type(exc).__name__)
        _log.warning("epoch_change_rolled_back", abandoned=new.number.number)

    def _phase(self, name: str) -> None:
        if self._phase_hook is not None:
            self._phase_hook(name)

    # --- the real-time timer ----------------------------------------------------------------

    def start_timer(self) -> None:
        """Ratchet on real time: :attr:`timer_lead` seconds before the window of the first
        uncovered purge closes (so, by default, half a window after it).

        For a threaded node whose ticks may be far apart. Idempotent; stopped by
        :meth:`close`.
        """
        with self._lock:
            if self._timer is not None or self._closing:
                return
            self._timer = threading.Thread(target=self._run_timer, name="epoch-ratchet")
            self._timer.daemon = True
            self._timer.start()

    def _run_timer(self) -> None:
        delay = self._window / 2
        while True:
            with self._lock:
                self._wake.wait_for(
                    lambda: (
                        self._closing or self._pending_at is not None or self._retiring is not None
                    )
                )
                if self._closing:
                    return
                if self._pending_at is None:  # a change left begun: finish it now
                    wait = 0.0
                else:
                    # Let purges gather until the lead before the window closes, unless the
                    # keeper closes (counted from the purge: the timer may have woken late).
                    start_at = self._pending_at + self._window - self._lead_locked()
                    wait = max(0.0, start_at - self._monotonic())
                self._wake.wait_for(lambda: self._closing, timeout=wait)
                if self._closing:
                    return
            try:
                self.ratchet_pending()
            except Exception as exc:
                _log.error("epoch_timer_ratchet_failed", error_type=type(exc).__name__)
                with self._lock:
                    self._wake.wait_for(lambda: self._closing, timeout=delay)

    # --- close ----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the timer and wipe the epoch key from memory. The slots are not touched."""
        with self._lock:
            self._closing = True
            self._wake.notify_all()
            timer, self._timer = self._timer, None
        if timer is not None and timer is not threading.current_thread():
            timer.join()
        self._gate.close(self._lease_timeout, force=True)
        with self._lock:
            current, self._current = self._current, None
            retiring, self._retiring = self._retiring, None
        for key in (current, None if retiring is None else retiring.key):
            if key is not None:
                key.wipe()

    def __repr__(self) -> str:
        with self._lock:
            if self._current is None:
                return "EpochKeeper(closed)"
            return (
                f"EpochKeeper(epoch={self._current.number.number},"
                f" kek_version={self._kek_version.number}, slot={self._index})"
            )


def _under(blob: bytes, epoch: EpochKey) -> bool:
    """Whether the wrapped round key ``blob`` names ``epoch`` (False if malformed)."""
    try:
        return read_wrapped_header(blob)[0] == epoch.number
    except UnwrapFailed:
        return False


@dataclass(frozen=True, slots=True)
class SlotStatus:
    """What a slot holds, read without any key: for status pages and ``inspect``."""

    index: int
    state: str  # "empty", "epoch", "corrupt", or "missing" (no slot file)
    sequence: int | None = None
    epoch: EpochNumber | None = None
    kek_version: KekVersion | None = None


def slot_status(store: Store) -> list[SlotStatus]:
    """Each epoch slot's state: sequence, epoch number and KEK version (never key bytes)."""
    found = []
    try:
        device = store.epoch_slots()
    except StoreUnavailable:
        return [SlotStatus(index, "missing") for index in range(SLOT_COUNT)]
    for index in range(SLOT_COUNT):
        try:
            record = decode_slot(device.read(index))
            if record is None:
                found.append(SlotStatus(index, "empty"))
                continue
            kek_version, epoch = read_epoch_header(record.payload)
        except (CorruptSlot, UnwrapFailed):
            found.append(SlotStatus(index, "corrupt"))
            continue
        found.append(SlotStatus(index, "epoch", record.sequence, epoch, kek_version))
    return found
