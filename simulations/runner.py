"""Running a scenario: N simulated nodes, one manual clock, invariants checked as it goes.

Each node has its own LMDB directory (``DATA/node-I``) and its own master key. The
runner walks the scenario's actions in time order: it sets the clock, delivers an event
(or drops it if the node is down), ticks every node's reaper, crashes a node
(``Node.crash()``: no settle, no snapshot) or restarts it (snapshot, replay, hydration,
recovery sweep), or rotates a node's KEK. After every step it feeds the node's new log
events to a :class:`~enclave_keys.replay.LogState` and checks the rounds they touched;
after restarts, rotations and at the end it checks everything. The run stops at the first
violation.

At the end every node is ticked, stopped cleanly, reopened, and checked once more
(keyshares must open under their round keys after the restart); the log hash is the
SHA-256 over every node's exported log (:mod:`enclave_keys.logfile`).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

from enclave_keys.clock import ManualClock
from enclave_keys.errors import ScenarioError
from enclave_keys.events import StoredEvent
from enclave_keys.ids import RoundId
from enclave_keys.invariants import (
    LOG_CHECKS,
    STORE_CHECKS,
    SecretScanner,
    Violation,
    check_events,
    check_log,
    check_store,
    summarise,
)
from enclave_keys.log import configure_logging
from enclave_keys.logfile import log_digest
from enclave_keys.node import NodeConfig
from enclave_keys.replay import LogState
from enclave_keys.store import LmdbStore
from simulations.checks import NODE_CHECKS, check_forensics, check_node
from simulations.config import SimConfig
from simulations.faults import fault_hook
from simulations.scenario import CLOCK_START, Action, Scenario, build
from simulations.simnode import CoreHook, SecretLedger, SimNode, master_key, open_node

MARKER = ".enclave-keys-simulation"
ALL_CHECKS = (*LOG_CHECKS, *STORE_CHECKS, *NODE_CHECKS)
Progress = Callable[[int, int], None]


class _Stop(Exception):
    """Internal: a violation was found; the run stops."""


@dataclass
class NodeSlot:
    index: int
    path: Path
    node: SimNode | None = None
    state: LogState = field(default_factory=LogState)
    crashes: int = 0
    restarts: int = 0
    rotations: int = 0
    dropped: int = 0

    @property
    def name(self) -> str:
        return f"node-{self.index}"


@dataclass
class SimResult:
    """What a run found. ``violations`` is empty when every invariant held."""

    config: SimConfig
    scenario: Scenario
    violations: list[Violation]
    node_hashes: list[str]
    log_hash: str
    states: list[LogState]
    crashes: int
    restarts: int
    rotations: int
    dropped: int
    steps: int
    wall_seconds: float
    secrets_scanned: int
    trace: list[str]

    @property
    def ok(self) -> bool:
        return not self.violations

    def invariant_summary(self) -> dict[str, int]:
        return summarise(self.violations, ALL_CHECKS)


def prepare_data_dir(path: Path) -> None:
    """Make ``path`` an empty simulation directory; refuse to clear anything foreign."""
    if path.exists():
        names = {p.name for p in path.iterdir()}
        if names and MARKER not in names and not names <= {"data.mdb", "lock.mdb"}:
            raise ScenarioError(
                f"{path} is not empty and not a simulation directory; not clearing it"
            )
        shutil.rmtree(path)
    path.mkdir(parents=True)
    (path / MARKER).write_text("made by `python -m simulations`; cleared by the next run\n")


class Simulation:
    """One run of ``config`` (see the module doc)."""

    def __init__(
        self,
        config: SimConfig,
        *,
        hook: CoreHook | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.config = config
        self.scenario = build(config)
        self._hook = hook if hook is not None else fault_hook(config.fault)
        self._progress = progress
        self._clock = ManualClock(CLOCK_START)
        self._ledger = SecretLedger()
        self._violations: list[Violation] = []
        self._slots: list[NodeSlot] = []
        self._steps = 0

    # --- the run ---------------------------------------------------------------------

    def run(self) -> SimResult:
        configure_logging(level=logging.CRITICAL)  # the reaper warns for every round it ends
        started = time.perf_counter()
        cfg = self.config
        prepare_data_dir(cfg.data_dir)
        self._slots = [NodeSlot(i, cfg.data_dir / f"node-{i}") for i in range(cfg.nodes)]
        try:
            for slot in self._slots:
                self._open(slot)
            total = len(self.scenario.actions)
            for step, action in enumerate(self.scenario.actions, 1):
                self._steps = step
                self._do(action)
                if self._progress is not None:
                    self._progress(step, total)
            self._finish()
        except _Stop:
            pass
        finally:
            for slot in self._slots:
                if slot.node is not None:
                    slot.node.stop()
                    slot.node = None
        return self._result(time.perf_counter() - started)

    def _do(self, action: Action) -> None:
        when = CLOCK_START + action.time
        if when > self._clock.now():
            self._clock.set(when)
        if action.kind == "tick":
            for slot in self._slots:
                if slot.node is not None:
                    slot.node.tick()
                    self._settle(slot)
                    touched = self._feed(slot)
                    live = slot.state.live_rounds()
                    self._check(slot, touched, reaper_rounds=live)
            return
        slot = self._slots[action.node]
        if action.kind == "deliver":
            assert action.event is not None
            if slot.node is None:
                slot.dropped += 1
                return
            slot.node.publish(action.event)
            self._settle(slot)
            self._check(slot, self._feed(slot))
        elif action.kind == "crash":
            if slot.node is not None:
                slot.node.crash()
                slot.node = None
                slot.crashes += 1
        elif action.kind == "restart":
            if slot.node is None:
                self._open(slot)
                slot.restarts += 1
                self._check_all(slot)
        elif action.kind == "rotate" and slot.node is not None:
            slot.node.rotate_kek()
            self._settle(slot)
            slot.rotations += 1
            self._feed(slot)
            self._check_all(slot)

    def _finish(self) -> None:
        """Tick everything once more, restart every node cleanly, check everything."""
        self._clock.advance(self.config.tick_interval)
        for slot in self._slots:
            if slot.node is None:
                self._open(slot)
                slot.restarts += 1
            slot.node.tick()  # type: ignore[union-attr]
            self._settle(slot)
            self._feed(slot)
            self._check_all(slot, now=self._clock.now())
        for slot in self._slots:
            assert slot.node is not None
            slot.node.stop()
            slot.node = None
            self._open(slot)
            self._check_all(slot, open_keyshares=True)
        if self.config.scan_secrets:
            self._scan_secrets()

    # --- nodes -----------------------------------------------------------------------

    def _open(self, slot: NodeSlot) -> None:
        cfg = self.config
        config = NodeConfig(
            runtime=cfg.runtime,
            seed=cfg.seed * 1000 + slot.index,
            reaper_grace=cfg.reaper_grace,
            snapshot_every=200,
            harden=False,
        )
        slot.node = open_node(
            slot.path,
            seed=cfg.seed,
            index=slot.index,
            clock=self._clock,
            config=config,
            ledger=self._ledger,
            deterministic_entropy=cfg.runtime == "deterministic",
            hook=self._hook,
        )
        self._settle(slot)
        self._feed(slot)

    def _settle(self, slot: NodeSlot) -> None:
        if slot.node is not None and self.config.runtime == "pykka":
            slot.node.wait_idle()

    def _feed(self, slot: NodeSlot) -> set[RoundId]:
        assert slot.node is not None
        store = slot.node.store
        return slot.state.feed_all(store.read_events(slot.state.last_sequence + 1))

    # --- checks ----------------------------------------------------------------------

    def _record(self, slot: NodeSlot, found: list[Violation]) -> None:
        if found:
            self._violations.extend(v.with_node(slot.name) for v in found)
            raise _Stop

    def _check(
        self,
        slot: NodeSlot,
        touched: Collection[RoundId],
        *,
        reaper_rounds: Collection[RoundId] = (),
    ) -> None:
        if not self.config.check_every_step or slot.node is None:
            return
        found = check_log(slot.state, rounds=touched)
        if reaper_rounds:
            found += check_log(
                slot.state,
                rounds=reaper_rounds,
                now=self._clock.now(),
                grace=self.config.reaper_grace,
            )
        found += check_store(slot.state, slot.node.store, rounds=touched)
        found += check_node(slot.state, slot.node, rounds=touched)
        self._record(slot, found)

    def _check_all(
        self, slot: NodeSlot, *, now: float | None = None, open_keyshares: bool = False
    ) -> None:
        assert slot.node is not None
        grace = None if now is None else self.config.reaper_grace
        found = check_log(slot.state, now=now, grace=grace)
        found += check_store(slot.state, slot.node.store)
        found += check_node(slot.state, slot.node, open_keyshares=open_keyshares)
        self._record(slot, found)

    def _scan_secrets(self) -> None:
        scanner = SecretScanner(self._ledger.all())
        for slot in self._slots:
            assert slot.node is not None
            store = slot.node.store
            found = check_events(store.read_events(), scanner)
            found += check_store(slot.state, store, scanner=scanner)
            # The clean stop and start before this ratcheted every node's epoch.
            with master_key(self.config.seed, slot.index) as master:
                found += check_forensics(
                    slot.state, slot.path, master, kek_versions=slot.rotations + 1
                )
            self._record(slot, found)

    # --- the result ------------------------------------------------------------------

    def _result(self, wall: float) -> SimResult:
        hashes: list[str] = []
        trace: list[str] = []
        for slot in self._slots:
            with LmdbStore.open(slot.path, create=False) as store:
                events = list(store.read_events())
            hashes.append(log_digest(events))
            if self._violations and self._violations[0].node == slot.name:
                trace = self._trace(self._violations[0], events)
        combined = hashlib.sha256(
            b"".join(f"{s.name}:{h}\n".encode() for s, h in zip(self._slots, hashes, strict=True))
        ).hexdigest()
        return SimResult(
            config=self.config,
            scenario=self.scenario,
            violations=list(self._violations),
            node_hashes=hashes,
            log_hash=combined,
            states=[s.state for s in self._slots],
            crashes=sum(s.crashes for s in self._slots),
            restarts=sum(s.restarts for s in self._slots),
            rotations=sum(s.rotations for s in self._slots),
            dropped=sum(s.dropped for s in self._slots),
            steps=self._steps,
            wall_seconds=wall,
            secrets_scanned=len(self._ledger),
            trace=trace,
        )

    def _trace(self, violation: Violation, events: list[StoredEvent]) -> list[str]:
        """The offending round's events on the offending node (or the cited sequences)."""
        wanted = set(violation.sequences)
        rid = violation.round_id
        lines = []
        for stored in events:
            mine = rid is not None and stored.round_id is not None and stored.round_id.value == rid
            if mine or stored.sequence in wanted or (rid is None and not wanted):
                lines.append(format_event(stored))
        return lines


def format_event(stored: StoredEvent) -> str:
    """One log line: sequence, protocol time, source and the event (ciphertexts as sizes)."""
    return (
        f"#{stored.sequence:<6} t+{stored.timestamp - CLOCK_START:8.1f}s "
        f"{stored.source:<13} {stored.payload!r}"
    )
