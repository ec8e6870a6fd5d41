"""The node: the composition root that builds, connects, starts and stops everything.

A :class:`Node` owns one store (an LMDB directory by default), unseals its keyring
through an unseal source (:mod:`enclave_keys.unseal` gives the root key,
:class:`~enclave_keys.master.MasterKeys` opens the keyring of KEK versions with it),
wires the cores (router, round cipher, keyshare, reaper) onto a runtime (Pykka threads,
or the deterministic dispatcher), and runs recovery on start::

    with Node.open("data", PassphraseUnseal(passphrase)) as node:
        node.publish(RoundRequested(round_id=rid, deadline=..., threshold=2, committee_size=3))
        node.wait_idle()

Start (design §3): load the newest snapshot, replay the log after it through the router,
reaper and keyshare cores, re-hydrate every live round's cipher from the key store, then
the recovery sweep — a stored key whose round is not live is purged now; a live round
whose key is missing (or cannot be unwrapped) is failed with a clear reason; a hydrated
round that has no keyshare yet is announced again (``RoundKeyReady``) so its consumers
finish. Snapshots are taken every ``snapshot_every`` events (less often while more rounds
than that are live) and on stop.

A node initialised with a Shamir share set starts *sealed*: ``Node.open(dir)`` without a
source, then :meth:`Node.submit_share` once per share until the threshold is reached.
:meth:`Node.seal` wipes every key and returns to that state; :meth:`Node.rotate_kek` and
:meth:`Node.rekey_root` change the keyring and the root key. Every such step is an audit
event in the log (never with a secret in it).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Final, Literal

import structlog

from enclave_keys.bus import EventBus, PublishRequest
from enclave_keys.clock import Clock, SystemClock
from enclave_keys.collector import collector_paused
from enclave_keys.context import ContextRegistry
from enclave_keys.core_state import KnownRoundIds
from enclave_keys.crypto.hardening import harden_process
from enclave_keys.epochs import DEFAULT_EPOCH_WINDOW, EpochKeeper, EpochRecovery
from enclave_keys.errors import (
    ActorsStopped,
    CorruptRecord,
    EnclaveKeysError,
    LifecycleError,
    Sealed,
    StoreError,
)
from enclave_keys.events import (
    Event,
    FailureReason,
    NodeSealed,
    NodeUnsealed,
    RootRekeyed,
    RoundComplete,
    RoundFailed,
    RoundKeyReady,
    RoundStage,
    StoredEvent,
)
from enclave_keys.ids import RoundId
from enclave_keys.keyshare import KeyshareCore
from enclave_keys.master import KekRotation, MasterKeys
from enclave_keys.reaper import ReaperCore
from enclave_keys.round_cipher import ROUND_CIPHER, HydrationReport, RoundCipherCore
from enclave_keys.router import RouterCore
from enclave_keys.runtime import DeterministicRuntime, PykkaRuntime, Runtime
from enclave_keys.snapshot import NodeSnapshot
from enclave_keys.store import LmdbStore, Store
from enclave_keys.store.claim import DirectoryClaim
from enclave_keys.unseal import CeremonyProgress, Enrolment, ShamirCeremony, UnsealSource
from enclave_keys.unseal import record_names as unseal_records

_log = structlog.get_logger(__name__)

NODE_SOURCE = "node"
SNAPSHOT_BYTES_PER_EVENT: Final = 256
"""Snapshot spacing: at least one event per this many bytes of the last snapshot (a
snapshot costs ~0.02 µs per byte to build and write, so ~5 µs per event at most)."""


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """Tunables of a node. The defaults suit a production node on the system clock."""

    runtime: Literal["pykka", "deterministic"] = "pykka"
    seed: int = 0  # deterministic runtime only: event ids and subscriber order
    snapshot_every: int = 1000  # events between snapshots, at least (and one on stop)
    reaper_grace: float = 30.0  # seconds past a round's deadline before it is failed
    share_size: int = 32  # bytes of keyshare material the reference keyshare actor makes
    lease_timeout: float = 5.0  # bounded wait of a purge for open leases
    completed_horizon: int = 100_000  # completed rounds remembered for late events
    idle_timeout: float = 60.0  # bound of every internal wait for the runtime to settle
    harden: bool = True  # RLIMIT_CORE=0 and PR_SET_DUMPABLE=0 at start (process-wide)
    epoch_window: float = DEFAULT_EPOCH_WINDOW  # seconds from a purge to its epoch's end

    def __post_init__(self) -> None:
        if self.snapshot_every < 1:
            raise ValueError("snapshot_every must be at least 1")
        if not 0 < self.epoch_window < float("inf"):
            raise ValueError("epoch_window must be a finite number of seconds > 0")
        if self.reaper_grace < 0 or self.lease_timeout <= 0 or self.idle_timeout <= 0:
            raise ValueError("grace must be >= 0; lease and idle timeouts must be > 0")


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    """What the start-up recovery found and did (ids only)."""

    snapshot_sequence: int | None
    replayed: int
    hydrated: tuple[RoundId, ...]
    purged: tuple[RoundId, ...]
    failed: tuple[RoundId, ...]
    reannounced: tuple[RoundId, ...]
    epoch: EpochRecovery | None = None  # what the slot file held (interrupted changes)


@dataclass
class _Cores:
    router: RouterCore
    round_cipher: RoundCipherCore
    keyshare: KeyshareCore
    reaper: ReaperCore

    @property
    def replayed_by_log(self) -> tuple[RouterCore, ReaperCore, KeyshareCore]:
        """The cores rebuilt from snapshot + log (the round cipher is rebuilt from keys)."""
        return (self.router, self.reaper, self.keyshare)

    def all(self) -> tuple[RouterCore, RoundCipherCore, KeyshareCore, ReaperCore]:
        return (self.router, self.round_cipher, self.keyshare, self.reaper)


def _claim_and_open(where: Path) -> tuple[DirectoryClaim, LmdbStore]:
    """The claim on ``where`` and its store: claimed first where the directory exists (so
    that a second node is refused before it touches the store), else right after the
    store has created it."""
    claim = DirectoryClaim(where) if where.is_dir() else None
    try:
        store = LmdbStore.open(where)
    except BaseException:
        if claim is not None:
            claim.release()
        raise
    if claim is None:
        try:
            claim = DirectoryClaim(where)
        except BaseException:
            store.close()
            raise
    return claim, store


class Node:
    """One node: a store, a keyring, the lifecycle cores on a runtime. See the module doc."""

    def __init__(
        self,
        store: Store,
        unseal: UnsealSource | None = None,
        *,
        clock: Clock | None = None,
        config: NodeConfig | None = None,
        owns_store: bool = False,
    ) -> None:
        self._store = store
        self._unseal = unseal
        self._clock = clock or SystemClock()
        self._config = config or NodeConfig()
        self._owns_store = owns_store
        self._lock = threading.RLock()
        self._registry = ContextRegistry()
        self._master: MasterKeys | None = None
        self._epochs: EpochKeeper | None = None
        self._ceremony: ShamirCeremony | None = None
        self._cores: _Cores | None = None
        self._runtime: Runtime | None = None
        self._recovery: RecoveryReport | None = None
        self._last_snapshot = 0
        self._last_snapshot_size = 0  # bytes of the newest snapshot written or restored
        self._stopped = False
        self._claim: DirectoryClaim | None = None  # held by a node opened on a directory

    @classmethod
    def open(
        cls,
        data_dir: str | Path,
        unseal: UnsealSource | None = None,
        *,
        clock: Clock | None = None,
        config: NodeConfig | None = None,
    ) -> Node:
        """A node over the LMDB directory ``data_dir`` (created if missing), which it holds
        until it stops: a second node on the same directory, in this process or another,
        is refused with :class:`~enclave_keys.errors.DirectoryInUse`
        (:mod:`enclave_keys.store.claim`).

        With an unseal source the node is initialised (first start) or unsealed, and
        started. Without one it stays sealed: submit key-ceremony shares with
        :meth:`submit_share`, or call :meth:`start` with a source.
        """
        claim, store = _claim_and_open(Path(data_dir))
        node = cls(store, unseal, clock=clock, config=config, owns_store=True)
        node._claim = claim
        try:
            if unseal is not None:
                node.start()
        except BaseException:
            node._abandon()
            raise
        return node

    # --- what a node offers -----------------------------------------------------------

    @property
    def store(self) -> Store:
        return self._store

    @property
    def config(self) -> NodeConfig:
        return self._config

    @property
    def claim(self) -> DirectoryClaim | None:
        """The claim this node holds on its directory (None for a node over a store it
        was given rather than a directory it opened)."""
        return self._claim

    @property
    def registry(self) -> ContextRegistry:
        """The open round contexts: resolve a round's cipher with ``ROUND_CIPHER``."""
        return self._registry

    @property
    def sealed(self) -> bool:
        """True until the keyring is unsealed, and again after :meth:`seal`."""
        return self._master is None

    @property
    def master(self) -> MasterKeys:
        if self._master is None:
            raise Sealed("the node is sealed")
        return self._master

    @property
    def epochs(self) -> EpochKeeper:
        """The storage epoch keeper (forward secrecy at rest)."""
        if self._epochs is None:
            raise Sealed("the node is sealed")
        return self._epochs

    @property
    def router(self) -> RouterCore:
        return self._started().router

    @property
    def round_cipher(self) -> RoundCipherCore:
        return self._started().round_cipher

    @property
    def keyshare(self) -> KeyshareCore:
        return self._started().keyshare

    @property
    def reaper(self) -> ReaperCore:
        return self._started().reaper

    @property
    def recovery(self) -> RecoveryReport:
        if self._recovery is None:
            raise LifecycleError("the node has not started")
        return self._recovery

    def publish(self, *events: Event) -> list[StoredEvent]:
        """Append events durably and deliver them; returns them as stored.

        With the deterministic runtime everything they cause has happened on return;
        with Pykka call :meth:`wait_idle` to wait for it.
        """
        with self._lock:
            stored = self._runtime_or_raise().publish(list(events), source=NODE_SOURCE)
            self._maybe_snapshot()
            return stored

    def tick(self) -> None:
        """Let the deadline reaper look at the clock, and ratchet the storage epoch if
        purges have waited half its window (call periodically)."""
        with self._lock:
            self._runtime_or_raise().tick()
            try:
                self.epochs.ratchet_if_due(self._clock.now())
            except EnclaveKeysError as exc:  # a full disk, say: the node keeps running
                # As the epoch timer does: the purges stay pending and the next tick (or
                # the timer) tries again; every late ratchet is counted as a window miss.
                _log.error("epoch_ratchet_failed", error_type=type(exc).__qualname__)

    def wait_idle(self, timeout: float | None = None) -> None:
        """Wait until every event published so far and all it caused has been handled."""
        self._runtime_or_raise().wait_idle(timeout or self._config.idle_timeout)

    def snapshot(self) -> int:
        """Write a snapshot now (after the runtime settles); returns its sequence."""
        with self._lock:
            self._runtime_or_raise().wait_idle(self._config.idle_timeout)
            return self._write_snapshot()

    def _write_snapshot(self) -> int:
        """The snapshot of a settled node, written; its sequence."""
        with self._lock:
            cores = self._started()
            sequence = self._store.last_sequence()
            # A snapshot's plain values are transient, several per live round: with the
            # collector on, building them set off a full collection of the whole heap.
            with collector_paused(promote=False):
                record = NodeSnapshot(
                    sequence=sequence,
                    cores={core.name: core.snapshot_state() for core in cores.all()},
                ).to_bytes()
                self._store.put_snapshot(sequence, record)
                self._last_snapshot_size = len(record)
            self._last_snapshot = sequence
            _log.info("snapshot_written", sequence=sequence)
            return sequence

    # --- master keys ------------------------------------------------------------------

    def submit_share(self, mnemonic: str) -> CeremonyProgress:
        """Submit one key-ceremony share to a sealed node; it starts at the threshold.

        A rejected share raises its :class:`~enclave_keys.errors.CeremonyError`
        (invalid, duplicate, mismatched) and the node stays sealed and usable. Progress
        is logged as ``UnsealProgress`` (counts only; shares are never stored).
        """
        with self._lock:
            if not self.sealed:
                raise LifecycleError("the node is already unsealed")
            if self._ceremony is None:
                self._ceremony = ShamirCeremony(self._store)
            progress = self._ceremony.submit(mnemonic)
            self._append_while_sealed(progress.to_event())
            if progress.complete:
                root = self._ceremony.root()
                self._ceremony = None
                self._start_with(
                    MasterKeys.open(
                        self._store, root, "shamir", lease_timeout=self._config.lease_timeout
                    )
                )
            return progress

    def seal(self) -> None:
        """Wipe the keyring and every round key from memory; the node waits to be unsealed.

        Round keys stay in the store (wrapped); rounds keep their deadlines. Unseal again
        with :meth:`start` (a source) or :meth:`submit_share`.
        """
        with self._lock:
            self._runtime_or_raise()
            covered = False
            try:
                # Its audit event first; if that cannot be written (a full disk), the keys
                # must leave memory all the same.
                self._audit(NodeSealed())
                settled = self._settle_for_stop()
                self.epochs.ratchet_pending()
                covered = settled
            finally:
                # Sealed even if that ratchet failed (as NodeSealed says): the keys leave
                # memory, no clean mark is written, and the next start ratchets.
                self._shut_down(clean=covered)
                _log.info("node_sealed")

    def rotate_kek(self, *, timeout: float | None = None) -> KekRotation:
        """Make a new active KEK and retire the old, as a storage epoch change: a new
        epoch key wrapped under the new KEK, every live round key rewrapped under it.

        One store transaction: a crash leaves the old or the new keyring, never neither.
        Waits (bounded) for wraps in flight. Publishes ``KekRotated``.
        """
        with self._lock:
            self._runtime_or_raise()
            wait = timeout or self._config.lease_timeout
            rotation = self.epochs.rotate_kek(self.master, timeout=wait)
            self._audit(rotation.event())
            return rotation

    def rekey_root(self, enrolment: Enrolment, method: str) -> None:
        """Re-seal the keyring under a new root (new passphrase, shares, HSM seal, or a
        migration off the environment key). Round keys are not touched. Takes ownership
        of ``enrolment.root`` (wiped if the rekey fails). Publishes ``RootRekeyed``.

        The records of the old method that the new one does not write are dropped; an
        application's own method (not one of this library's) has none we know of."""
        with self._lock:
            try:
                self._runtime_or_raise()
                master = self.master
            except BaseException:
                enrolment.root.wipe()
                raise
            old_method = master.method
            try:
                known = unseal_records(old_method)
            except KeyError:
                known = ()
            drop = [name for name in known if name not in enrolment.records]
            master.rekey_root(enrolment.root, method, enrolment.records, drop)  # owns it now
            self._audit(RootRekeyed(old_method=old_method, new_method=method))

    def _audit(self, event: Event) -> None:
        """Publish the audit event of a change that stands whatever happens to it (a KEK
        rotation or rekey already committed, a seal): if it cannot be published, that is
        logged (``audit_event_not_logged``), not raised as if the change had failed.

        No snapshot is taken here (the next publish takes it if one is due): its settling
        would raise the report of other handlers' failed publishes, as if this change had
        failed — and that report stays for the next ``wait_idle``."""
        try:
            self._runtime_or_raise().publish([event], source=NODE_SOURCE)
        except EnclaveKeysError as exc:
            _log.error("audit_event_not_logged", tag=event.TAG, error_type=type(exc).__qualname__)

    # --- start ------------------------------------------------------------------------

    def start(self, unseal: UnsealSource | None = None) -> RecoveryReport:
        """Unseal (initialising a new store), restore, replay, hydrate, start, sweep."""
        with self._lock:
            source = unseal or self._unseal
            if source is None:
                raise Sealed("no unseal source: submit key-ceremony shares instead")
            if not self.sealed:
                raise LifecycleError("the node is already started")
            return self._start_with(self._unlock(source))

    def _unlock(self, source: UnsealSource) -> MasterKeys:
        wait = self._config.lease_timeout
        if MasterKeys.is_initialised(self._store):
            root = source.unlock_root(self._store)
            return MasterKeys.open(self._store, root, source.method, lease_timeout=wait)
        MasterKeys.check_can_initialise(self._store)  # before enrol (an HSM makes a key)
        enrolment = source.enrol()
        return MasterKeys.initialise(
            self._store, enrolment.root, source.method, enrolment.records, lease_timeout=wait
        )

    def _start_with(self, master: MasterKeys) -> RecoveryReport:
        if self._stopped:
            master.seal(force=True)
            raise LifecycleError("the node is stopped")
        if self._config.harden:
            harden_process()
        self._master = master
        cfg = self._config
        try:
            # The live state is built all at once: see enclave_keys.collector.
            with collector_paused():
                self._epochs, epoch_recovery = EpochKeeper.open(
                    self._store,
                    master,
                    clock=self._clock,
                    window=cfg.epoch_window,
                    lease_timeout=cfg.lease_timeout,
                )
                cores = self._build_cores(self._epochs)
                snapshot_sequence = self._restore_snapshot(cores)
                if snapshot_sequence is None:
                    # No snapshot, or an unreadable one: start from scratch, replay everything.
                    self._close_contexts()
                    cores = self._build_cores(self._epochs)
                self._cores = cores
                replayed = self._replay(cores, after=snapshot_sequence or 0)
                report = cores.round_cipher.hydrate(list(cores.router.open_rounds()))
                self._runtime = self._build_runtime(cores)
                self._runtime.start()
                self._recovery = self._sweep(snapshot_sequence, replayed, report, epoch_recovery)
                # Whatever was purged before this start (a crash may have cut a window
                # short) has its epoch destroyed now — unless the last session ended
                # cleanly with every purge covered, when only this start's own purges
                # (the sweep's) need an epoch change.
                if self._epochs.clean_at_open:
                    self._epochs.ratchet_pending()
                else:
                    self._epochs.ratchet("start")
                if cfg.runtime == "pykka":
                    self._epochs.start_timer()
        except BaseException:
            self._shut_down()
            raise
        _log.info(
            "node_started",
            method=master.method,
            active_kek=master.active_version.number,
            snapshot_sequence=snapshot_sequence,
            replayed=replayed,
            hydrated=len(self._recovery.hydrated),
            purged=len(self._recovery.purged),
            failed=len(self._recovery.failed),
        )
        return self._recovery

    def _build_cores(self, epochs: EpochKeeper) -> _Cores:
        cfg = self._config
        return _Cores(
            router=RouterCore(self._registry, horizon=cfg.completed_horizon),
            round_cipher=RoundCipherCore(
                self._store,
                epochs,
                self._registry,
                lease_timeout=cfg.lease_timeout,
                horizon=cfg.completed_horizon,
            ),
            keyshare=KeyshareCore(
                self._registry, share_size=cfg.share_size, horizon=cfg.completed_horizon
            ),
            reaper=ReaperCore(grace=cfg.reaper_grace, horizon=cfg.completed_horizon),
        )

    def _build_runtime(self, cores: _Cores) -> Runtime:
        runtime: Runtime
        if self._config.runtime == "deterministic":
            # The log position joins the seed: a restarted run draws fresh event ids, and
            # the same seed over the same history still gives the same ids.
            seed = self._config.seed * 2**64 + self._store.last_sequence()
            runtime = DeterministicRuntime(self._store, self._clock, seed)
        else:
            runtime = PykkaRuntime(self._store, self._clock)
        for core in cores.all():
            runtime.subscribe(core)
        return runtime

    def _restore_snapshot(self, cores: _Cores) -> int | None:
        """Restore the newest snapshot into ``cores``; ``None`` when there is none usable
        (none, or one the store cannot read or the cores cannot restore: the log is then
        replayed whole)."""
        try:
            latest = self._store.latest_snapshot()
        except CorruptRecord:  # a damaged record: the log alone still tells everything
            _log.warning("snapshot_unreadable", sequence=None)
            return None
        if latest is None:
            return None
        # One table for all cores: a live round's id is validated once, not once per core
        # that names it, and the cores share the one RoundId.
        round_ids: KnownRoundIds = {}
        try:
            snap = NodeSnapshot.from_bytes(latest[1])
            for core in cores.replayed_by_log:
                core.restore_state(snap.cores.get(core.name), round_ids=round_ids)
        except CorruptRecord:
            _log.warning("snapshot_unreadable", sequence=latest[0])
            return None
        self._last_snapshot = snap.sequence
        self._last_snapshot_size = len(latest[1])
        return snap.sequence

    def _replay(self, cores: _Cores, *, after: int) -> int:
        count = 0
        for stored in self._store.read_events(after + 1):
            for core in cores.replayed_by_log:
                core.replay(stored)
            count += 1
        return count

    def _sweep(
        self,
        snapshot_sequence: int | None,
        replayed: int,
        report: HydrationReport,
        epoch_recovery: EpochRecovery,
    ) -> RecoveryReport:
        cores = self._started()
        master = self.master
        open_rounds = cores.router.open_rounds()
        to_publish: list[Event] = [
            NodeUnsealed(method=master.method, active_kek=master.active_version)
        ]

        purged = []
        for rid in report.orphans:
            event = cores.round_cipher.purge_orphan(rid)
            purged.append(rid)
            if event is not None:
                to_publish.append(event)

        # A round the router had decided to end (a timeout logged) whose RoundComplete
        # never reached the log before a crash: finish it now, or it would never end.
        ending = sorted(rid for rid, state in open_rounds.items() if state.ending)
        to_publish.extend(RoundComplete(round_id=rid) for rid in ending)

        broken = sorted({*report.missing, *(f.round_id for f in report.failed)}.difference(ending))
        for rid in broken:
            stage = open_rounds[rid].stage if rid in open_rounds else RoundStage.REQUESTED
            to_publish.append(
                RoundFailed(
                    round_id=rid,
                    failed_at=stage,
                    reason=FailureReason.KEY_MISSING_AFTER_RESTART,
                    detail="round key missing or unreadable at start",
                )
            )

        keyshare = cores.keyshare
        ended = set(ending)
        reannounced = []
        kek_version = self.epochs.kek_version
        for rid in report.hydrated:
            if rid in ended or keyshare.keyshare_of(rid) is not None:
                continue
            # Hydrated: its key was just read, and its cipher has the key id.
            context = self._registry.get(rid)
            leased = None if context is None else context.get(ROUND_CIPHER)
            if leased is None:
                continue
            reannounced.append(rid)
            to_publish.append(
                RoundKeyReady(round_id=rid, key_id=leased.key_id, kek_version=kek_version)
            )

        runtime = self._runtime_or_raise()
        runtime.publish(to_publish, source=NODE_SOURCE)
        runtime.wait_idle(self._config.idle_timeout)
        return RecoveryReport(
            snapshot_sequence=snapshot_sequence,
            replayed=replayed,
            hydrated=report.hydrated,
            purged=tuple(purged),
            failed=tuple(broken),
            reannounced=tuple(reannounced),
            epoch=epoch_recovery,
        )

    # --- stop -------------------------------------------------------------------------

    def stop(self) -> None:
        """Settle, snapshot, stop the actors, wipe every key, close an owned store."""
        with self._lock:
            if self._stopped:
                return
            clean = False
            try:
                settled = self._settle_for_stop()
                if self._epochs is not None:
                    self._epochs.ratchet_pending()
                clean = settled
            finally:
                self._abandon(clean=clean)
            _log.info("node_stopped")

    def _settle_for_stop(self) -> bool:
        """Snapshot a settled node before a stop or seal; False (no snapshot) where that
        cannot be, logged (``node_stopping_without_snapshot``) and never raised: the stop
        or seal must go on to cover the purges and wipe the keys. The next start then
        replays from the last snapshot, as after a crash. No snapshot when:

        * the actors were stopped from outside: the cores may have missed events already
          in the log, so a snapshot could skip them;
        * a handler's publish could not be committed (the report ``wait_idle`` raises):
          its core may hold what it published, which never reached the log;
        * the node did not settle in time, or the snapshot could not be written.
        """
        if self._runtime is None or self._cores is None:
            return True
        try:
            self.snapshot()
        except ActorsStopped:
            _log.error("node_stopping_without_snapshot", why="actors_stopped_from_outside")
            self._runtime.stop()  # stop what is left and join it: no lease is held after
            return False
        except (StoreError, LifecycleError) as exc:
            _log.error(
                "node_stopping_without_snapshot",
                why="not_settled",
                error_type=type(exc).__qualname__,
            )
            return False
        return True

    def crash(self) -> None:
        """Drop everything in memory without a clean stop (no settle, no snapshot).

        For tests and simulations: the on-disk state is what a SIGKILL would leave, as
        far as this process can tell (committed batches are durable; nothing else is).
        """
        with self._lock:
            self._abandon()

    def install_signal_handlers(self) -> None:
        """On SIGTERM or SIGINT: stop cleanly (wiping every key), then exit 128 + signal.

        For a process that runs a node in its main thread (the CLI does). The handler
        does no work on the interrupted stack (which may hold the node's lock or be in
        the middle of handing a message to an actor): it starts a thread that stops the
        node — waiting for a publish in progress to finish — and then signals the main
        thread again, whose handler now raises ``SystemExit(128 + signal)``. Signals that
        arrive while the stop is under way are ignored.
        """
        stopping: list[threading.Thread] = []
        done = threading.Event()

        def stop_then_exit(signum: int) -> None:
            try:
                self.stop()
            finally:
                done.set()
                signal.pthread_kill(threading.main_thread().ident or 0, signum)

        def on_signal(signum: int, frame: FrameType | None) -> None:
            if done.is_set():
                raise SystemExit(128 + signum)
            if not stopping:
                _log.warning("node_signal", signal=signal.Signals(signum).name)
                thread = threading.Thread(
                    target=stop_then_exit, args=(signum,), name="node-signal-stop", daemon=True
                )
                stopping.append(thread)
                thread.start()

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)

    def _shut_down(self, *, clean: bool = False) -> None:
        """Stop the actors and wipe every key; the node is sealed afterwards.

        ``clean``: every purge was covered by an epoch change just before (a stop or
        seal); once the actors are stopped that is recorded, and the next start skips
        its ratchet (:meth:`EpochKeeper.mark_clean`).

        Every step runs even if one before it failed — an actor that did not stop in
        time must not keep the keys in memory — and the first error is raised at the end.
        """
        errors: list[Exception] = []

        def step(action: Callable[[], object]) -> bool:
            try:
                action()
            except Exception as exc:
                errors.append(exc)
                return False
            return True

        if self._runtime is not None:
            runtime, self._runtime = self._runtime, None
            clean = step(runtime.stop) and clean  # an actor still running may purge
        if self._cores is not None:
            cores, self._cores = self._cores, None
            step(cores.round_cipher.wipe_all)
        if self._epochs is not None:
            epochs, self._epochs = self._epochs, None
            if clean:
                self._mark_clean(epochs)
            step(epochs.close)
        step(self._close_contexts)
        if self._ceremony is not None:
            ceremony, self._ceremony = self._ceremony, None
            step(ceremony.reset)
        if self._master is not None:
            master, self._master = self._master, None
            step(lambda: master.seal(self._config.lease_timeout, force=True))
        if errors:
            raise errors[0]

    @staticmethod
    def _mark_clean(epochs: EpochKeeper) -> None:
        try:
            epochs.mark_clean()
        except Exception as exc:  # no record: the next start ratchets, as after a crash
            _log.warning("epoch_clean_record_not_written", error_type=type(exc).__qualname__)

    def _abandon(self, *, clean: bool = False) -> None:
        self._stopped = True
        try:
            self._shut_down(clean=clean)
        finally:
            try:
                if self._owns_store:
                    self._store.close()
            finally:
                if self._claim is not None:
                    self._claim.release()

    def _close_contexts(self) -> None:
        for rid in self._registry.round_ids():
            self._registry.close(rid)

    def __enter__(self) -> Node:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "stopped" if self._stopped else ("sealed" if self.sealed else "running")
        return f"Node({state}, rounds={len(self._registry)})"

    # --- internals --------------------------------------------------------------------

    def _append_while_sealed(self, event: Event) -> None:
        """Log an audit event while no runtime runs (the ceremony happens sealed)."""
        bus = EventBus(self._store, self._clock)
        bus.start()
        [outcome] = bus.commit([PublishRequest.of([event], source=NODE_SOURCE)])
        if outcome.error is not None:
            raise outcome.error

    def _started(self) -> _Cores:
        if self._cores is None:
            raise (
                Sealed("the node is sealed")
                if not self._stopped
                else LifecycleError("the node is stopped")
            )
        return self._cores

    def _runtime_or_raise(self) -> Runtime:
        if self._stopped:
            raise LifecycleError("the node is stopped")
        if self._runtime is None:
            raise Sealed("the node is sealed")
        return self._runtime

    def _maybe_snapshot(self) -> None:
        """Snapshot every ``snapshot_every`` events — or less often, as a snapshot grows.

        A snapshot costs in proportion to what it holds: the live rounds, and the ended
        rounds each core remembers (up to its horizon, 100,000 by default) to recognise
        late events. Taken every ``snapshot_every`` events regardless, it made a node's
        cost per event grow with its live rounds, and a node that had seen 100,000 rounds
        spend ~110 ms per snapshot — more than the rounds themselves. So one is due after
        as many events as there are live rounds, or as the last snapshot had
        :data:`SNAPSHOT_BYTES_PER_EVENT`-byte units, whichever is more: the cost per
        event stays flat, and a restart replays at most about as many events as its
        snapshot is large.
        """
        due = max(
            self._config.snapshot_every,
            len(self._registry),
            self._last_snapshot_size // SNAPSHOT_BYTES_PER_EVENT,
        )
        if self._store.last_sequence() - self._last_snapshot < due:
            return
        # The publish that got here is durable: a snapshot that cannot be taken now must
        # not fail it (its caller would publish it again); the next publish tries again.
        # wait_idle's report of failed handler publishes (a StoreError) still propagates,
        # as it would from any wait_idle: swallowing it would lose the report.
        try:
            self._runtime_or_raise().wait_idle(self._config.idle_timeout)
        except LifecycleError as exc:  # not settled in time, or the actors were stopped
            _log.warning("snapshot_deferred", error_type=type(exc).__qualname__)
            return
        try:
            self._write_snapshot()
        except StoreError as exc:
            _log.warning("snapshot_deferred", error_type=type(exc).__qualname__)
