"""The node: the composition root that builds, connects, starts and stops everything.

A :class:`Node` owns one store (an LMDB directory by default), unlocks its KEK through
an unseal source, wires the cores (router, round cipher, keyshare, reaper) onto a
runtime (Pykka threads, or the deterministic dispatcher), and runs recovery on start::

    with Node.open("data", PassphraseUnseal(passphrase)) as node:
        node.publish(RoundRequested(round_id=rid, deadline=..., threshold=2, committee_size=3))
        node.wait_idle()

Start (design §3): load the newest snapshot, replay the log after it through the router,
reaper and keyshare cores, re-hydrate every live round's cipher from the key store, then
the recovery sweep — a stored key whose round is not live is purged now; a live round
whose key is missing (or cannot be unwrapped) is failed with a clear reason; a hydrated
round that has no keyshare yet is announced again (``RoundKeyReady``) so its consumers
finish. Snapshots are taken every ``snapshot_every`` events and on stop.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal

import structlog

from enclave_keys.clock import Clock, SystemClock
from enclave_keys.context import ContextRegistry
from enclave_keys.crypto import Kek
from enclave_keys.errors import CorruptRecord, LifecycleError
from enclave_keys.events import (
    Event,
    FailureReason,
    RoundFailed,
    RoundKeyReady,
    RoundStage,
    StoredEvent,
)
from enclave_keys.ids import KekVersion, RoundId
from enclave_keys.keyshare import KeyshareCore
from enclave_keys.reaper import ReaperCore
from enclave_keys.round_cipher import ROUND_CIPHER, HydrationReport, RoundCipherCore
from enclave_keys.router import RouterCore
from enclave_keys.runtime import DeterministicRuntime, PykkaRuntime, Runtime
from enclave_keys.snapshot import NodeSnapshot
from enclave_keys.store import LmdbStore, Store
from enclave_keys.unseal import UnsealSource

_log = structlog.get_logger(__name__)

NODE_SOURCE = "node"


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """Tunables of a node. The defaults suit a production node on the system clock."""

    runtime: Literal["pykka", "deterministic"] = "pykka"
    seed: int = 0  # deterministic runtime only: event ids and subscriber order
    snapshot_every: int = 1000  # events between snapshots (and one on stop)
    reaper_grace: float = 30.0  # seconds past a round's deadline before it is failed
    share_size: int = 32  # bytes of keyshare material the reference keyshare actor makes
    lease_timeout: float = 5.0  # bounded wait of a purge for open leases
    completed_horizon: int = 100_000  # completed rounds remembered for late events
    idle_timeout: float = 60.0  # bound of every internal wait for the runtime to settle

    def __post_init__(self) -> None:
        if self.snapshot_every < 1:
            raise ValueError("snapshot_every must be at least 1")
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


class Node:
    """One node: a store, a KEK, the lifecycle cores on a runtime. See the module doc."""

    def __init__(
        self,
        store: Store,
        unseal: UnsealSource,
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
        self._kek: Kek | None = None
        self._cores: _Cores | None = None
        self._runtime: Runtime | None = None
        self._last_snapshot = 0
        self._stopped = False

    @classmethod
    def open(
        cls,
        data_dir: str | Path,
        unseal: UnsealSource,
        *,
        clock: Clock | None = None,
        config: NodeConfig | None = None,
    ) -> Node:
        """A node over the LMDB directory ``data_dir`` (created if missing), started."""
        store = LmdbStore.open(Path(data_dir))
        node = cls(store, unseal, clock=clock, config=config, owns_store=True)
        try:
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
    def registry(self) -> ContextRegistry:
        """The open round contexts: resolve a round's cipher with ``ROUND_CIPHER``."""
        return self._registry

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
        """Let the deadline reaper look at the clock (call periodically)."""
        with self._lock:
            self._runtime_or_raise().tick()

    def wait_idle(self, timeout: float | None = None) -> None:
        """Wait until every event published so far and all it caused has been handled."""
        self._runtime_or_raise().wait_idle(timeout or self._config.idle_timeout)

    def snapshot(self) -> int:
        """Write a snapshot now (after the runtime settles); returns its sequence."""
        with self._lock:
            runtime = self._runtime_or_raise()
            runtime.wait_idle(self._config.idle_timeout)
            cores = self._started()
            sequence = self._store.last_sequence()
            record = NodeSnapshot(
                sequence=sequence,
                cores={core.name: core.snapshot_state() for core in cores.all()},
                contexts={rid: list(deps) for rid, deps in self._registry.snapshot().items()},
            )
            self._store.put_snapshot(sequence, record.to_bytes())
            self._last_snapshot = sequence
            _log.info("snapshot_written", sequence=sequence)
            return sequence

    # --- start ------------------------------------------------------------------------

    _recovery: RecoveryReport | None = None

    def start(self) -> RecoveryReport:
        """Unlock, restore, replay, hydrate, start the runtime and run the recovery sweep."""
        with self._lock:
            if self._cores is not None:
                raise LifecycleError("the node is already started")
            self._kek = self._unseal.unlock(self._store)
            cores = self._build_cores()
            snapshot_sequence = self._restore_snapshot(cores)
            if snapshot_sequence is None:
                # No snapshot, or an unreadable one: start from scratch, replay everything.
                for rid in self._registry.round_ids():
                    self._registry.close(rid)
                cores = self._build_cores()
            self._cores = cores
            replayed = self._replay(cores, after=snapshot_sequence or 0)
            report = cores.round_cipher.hydrate(self._kek_for, list(cores.router.open_rounds()))
            self._runtime = self._build_runtime(cores)
            self._runtime.start()
            self._recovery = self._sweep(snapshot_sequence, replayed, report)
            _log.info(
                "node_started",
                snapshot_sequence=snapshot_sequence,
                replayed=replayed,
                hydrated=len(self._recovery.hydrated),
                purged=len(self._recovery.purged),
                failed=len(self._recovery.failed),
            )
            return self._recovery

    def _build_cores(self) -> _Cores:
        cfg = self._config
        return _Cores(
            router=RouterCore(self._registry, horizon=cfg.completed_horizon),
            round_cipher=RoundCipherCore(
                self._store, self._active_kek, self._registry, lease_timeout=cfg.lease_timeout
            ),
            keyshare=KeyshareCore(
                self._registry, share_size=cfg.share_size, horizon=cfg.completed_horizon
            ),
            reaper=ReaperCore(grace=cfg.reaper_grace),
        )

    def _build_runtime(self, cores: _Cores) -> Runtime:
        runtime: Runtime
        if self._config.runtime == "deterministic":
            runtime = DeterministicRuntime(self._store, self._clock, self._config.seed)
        else:
            runtime = PykkaRuntime(self._store, self._clock)
        for core in cores.all():
            runtime.subscribe(core)
        return runtime

    def _restore_snapshot(self, cores: _Cores) -> int | None:
        """Restore the newest snapshot into ``cores``; ``None`` when there is none usable."""
        latest = self._store.latest_snapshot()
        if latest is None:
            return None
        try:
            snap = NodeSnapshot.from_bytes(latest[1])
            for core in cores.replayed_by_log:
                core.restore_state(snap.cores.get(core.name))
        except CorruptRecord:
            _log.warning("snapshot_unreadable", sequence=latest[0])
            return None
        self._last_snapshot = snap.sequence
        return snap.sequence

    def _replay(self, cores: _Cores, *, after: int) -> int:
        count = 0
        for stored in self._store.read_events(after + 1):
            for core in cores.replayed_by_log:
                core.replay(stored)
            count += 1
        return count

    def _sweep(
        self, snapshot_sequence: int | None, replayed: int, report: HydrationReport
    ) -> RecoveryReport:
        cores = self._started()
        runtime = self._runtime_or_raise()
        open_rounds = cores.router.open_rounds()
        to_publish: list[Event] = []

        purged = []
        for rid in report.orphans:
            event = cores.round_cipher.purge_orphan(rid)
            purged.append(rid)
            if event is not None:
                to_publish.append(event)

        broken = sorted({*report.missing, *(f.round_id for f in report.failed)})
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

        with_share = set(cores.keyshare.rounds_with_keyshare())
        reannounced = []
        for rid in report.hydrated:
            if rid in with_share:
                continue
            context = self._registry.get(rid)
            leased = None if context is None else context.get(ROUND_CIPHER)
            if leased is None:
                continue
            reannounced.append(rid)
            to_publish.append(
                RoundKeyReady(
                    round_id=rid, key_id=leased.key_id, kek_version=self._active_kek().version
                )
            )

        if to_publish:
            runtime.publish(to_publish, source=NODE_SOURCE)
            runtime.wait_idle(self._config.idle_timeout)
        return RecoveryReport(
            snapshot_sequence=snapshot_sequence,
            replayed=replayed,
            hydrated=report.hydrated,
            purged=tuple(purged),
            failed=tuple(broken),
            reannounced=tuple(reannounced),
        )

    # --- stop -------------------------------------------------------------------------

    def stop(self) -> None:
        """Settle, snapshot, stop the actors, wipe every key, close an owned store."""
        with self._lock:
            if self._stopped:
                return
            if self._runtime is not None and self._cores is not None:
                try:
                    self.snapshot()
                finally:
                    self._abandon()
            else:
                self._abandon()
            _log.info("node_stopped")

    def crash(self) -> None:
        """Drop everything in memory without a clean stop (no settle, no snapshot).

        For tests and simulations: the on-disk state is what a SIGKILL would leave, as
        far as this process can tell (committed batches are durable; nothing else is).
        """
        with self._lock:
            self._abandon()

    def _abandon(self) -> None:
        self._stopped = True
        if self._runtime is not None:
            self._runtime.stop()
        if self._cores is not None:
            self._cores.round_cipher.wipe_all()
        for rid in self._registry.round_ids():
            self._registry.close(rid)
        if self._kek is not None:
            self._kek.wipe()
        if self._owns_store:
            self._store.close()

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
        state = "stopped" if self._stopped else ("started" if self._cores else "new")
        return f"Node({state}, rounds={len(self._registry)})"

    # --- internals --------------------------------------------------------------------

    def _active_kek(self) -> Kek:
        if self._kek is None:
            raise LifecycleError("the node is not unsealed")
        return self._kek

    def _kek_for(self, version: KekVersion) -> Kek:
        kek = self._active_kek()
        if version != kek.version:
            raise LifecycleError(f"KEK {version} is not in this node's keyring")
        return kek

    def _started(self) -> _Cores:
        if self._cores is None:
            raise LifecycleError("the node has not started")
        return self._cores

    def _runtime_or_raise(self) -> Runtime:
        if self._runtime is None or self._stopped:
            raise LifecycleError("the node is not running")
        return self._runtime

    def _maybe_snapshot(self) -> None:
        if self._store.last_sequence() - self._last_snapshot >= self._config.snapshot_every:
            self.snapshot()
