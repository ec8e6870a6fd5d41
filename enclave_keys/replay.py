"""Rebuild a node's round state from its event log alone: pure, no keys, no store.

:class:`LogState` is a projection fed one stored event at a time (:meth:`LogState.feed`)
or built from a whole log (:func:`replay`). It follows the rules of the round lifecycle
(``docs/lifecycle.md``) independently of the router, so comparing the two finds bugs in
either: a round is *opened* by ``RoundOpened``, *keyed* by ``RoundKeyReady``, *ended* by
the first ``RoundComplete`` while open, and its key *purged* by ``RoundPurged``. Each
ended round gets exactly one :class:`Outcome`, decided by what preceded its end.

It also records the facts the invariant checker (:mod:`enclave_keys.invariants`) needs —
how many times a round was opened or ended, which key ids were announced and purged, a
timeout that did not end the round — and the statistics of a simulation report (key
lifetimes, live keys over time). It never sees key material: none is in the log.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from enclave_keys.events import (
    DecryptionShareCreated,
    KekRotated,
    KeyshareCreated,
    NodeUnsealed,
    RoundComplete,
    RoundFailed,
    RoundKeyReady,
    RoundOpened,
    RoundPurged,
    RoundRequested,
    RoundStage,
    RoundStageChanged,
    StoredEvent,
)
from enclave_keys.ids import KeyId, RoundId

__all__ = ["LogState", "Outcome", "RoundView", "replay"]


class Outcome(StrEnum):
    """How an ended round ended (one per round)."""

    COMPLETE = "complete"  # RoundComplete with no failure before it
    TIMEOUT = "timeout"  # a stage timeout, turned into completion by the router
    MISBEHAVIOUR = "misbehaviour_then_complete"  # accusation phase, then RoundComplete
    REAPED = "reaped"  # the deadline reaper's deadline_exceeded
    FAILED = "failed"  # any other reason (key_missing_after_restart, ...)


@dataclass
class RoundView:
    """What the log says about one round. Key ids as hex; times are event timestamps."""

    round_id: RoundId
    requested_at: float | None = None
    deadline: float | None = None
    opened: int = 0  # number of RoundOpened
    ended: int = 0  # number of RoundComplete that found the round open (or opened again)
    reopened: bool = False  # a RoundOpened after the round ended: its next end counts too
    stage: RoundStage = RoundStage.REQUESTED
    accusation: bool = False
    ending_reason: str | None = None  # a non-misbehaviour failure awaiting RoundComplete
    ending_sequence: int | None = None
    outcome: Outcome | None = None
    reason: str | None = None  # the failure reason that decided the outcome
    keys: dict[str, float] = field(default_factory=dict)  # key id -> first RoundKeyReady time
    key_sequence: dict[str, int] = field(default_factory=dict)
    purged: Counter[str] = field(default_factory=Counter)  # key id -> RoundPurged count
    purged_at: dict[str, float] = field(default_factory=dict)
    kek_version: int | None = None  # of the current key, following KEK rotations
    keyshare_key: str | None = None  # key id the keyshare was sealed under
    keyshares: int = 0
    mismatched_keyshares: int = 0  # KeyshareCreated naming another key than the round's
    used_after_purge: int = 0  # a keyshare or decryption share under a key already purged
    keyed_after_end: int = 0  # RoundKeyReady / KeyshareCreated after the round ended
    ended_at: float | None = None
    ended_sequence: int | None = None
    sequences: list[int] = field(default_factory=list)  # every event of this round

    @property
    def is_live(self) -> bool:
        return self.opened > 0 and self.ended == 0

    @property
    def current_key(self) -> str | None:
        """The announced key id not yet purged (the newest one), if any."""
        live = [k for k in self.keys if not self.purged[k]]
        return live[-1] if live else None

    @property
    def unpurged_keys(self) -> list[str]:
        return [k for k in self.keys if not self.purged[k]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "round_id": self.round_id.value,
            "state": "live" if self.is_live else ("ended" if self.ended else "unopened"),
            "stage": self.stage.value,
            "deadline": self.deadline,
            "outcome": None if self.outcome is None else self.outcome.value,
            "reason": self.reason,
            "key_id": self.current_key,
            "kek_version": self.kek_version,
            "keys_announced": len(self.keys),
            "keys_purged": sum(1 for k in self.keys if self.purged[k]),
        }


class LogState:
    """The projection of one node's log. Feed events in log order."""

    def __init__(self) -> None:
        self.rounds: dict[RoundId, RoundView] = {}
        self.last_sequence = 0
        self.last_time: float | None = None
        self.first_time: float | None = None
        self.events = 0
        self.active_kek: int | None = None
        self.kek_versions: list[int] = []
        self.rotations = 0
        self.unseals = 0
        self.purges = 0
        self.out_of_order: list[int] = []  # sequences that did not follow the previous one
        self.tags: Counter[str] = Counter()
        self.live_series: list[tuple[float, int]] = []  # (time, live keys) at each change
        self._live_keys = 0

    # --- feeding -------------------------------------------------------------------------

    def feed(self, stored: StoredEvent) -> RoundId | None:
        """Apply one event; returns its round id (``None`` for node-level events)."""
        if stored.sequence != self.last_sequence + 1:
            self.out_of_order.append(stored.sequence)
        self.last_sequence = stored.sequence
        self.last_time = stored.timestamp
        if self.first_time is None:
            self.first_time = stored.timestamp
        self.events += 1
        self.tags[stored.tag] += 1
        event = stored.payload
        if isinstance(event, KekRotated):
            self._kek(event.new_version.number)
            self.rotations += 1
            for view in self.rounds.values():
                if view.current_key is not None:
                    view.kek_version = event.new_version.number
        elif isinstance(event, NodeUnsealed):
            self._kek(event.active_kek.number)
            self.unseals += 1
        rid = event.round_id_or_none
        if rid is None:
            return None
        if rid not in self.rounds:
            self.rounds[rid] = RoundView(rid)
        view = self.rounds[rid]
        view.sequences.append(stored.sequence)
        self._apply(view, stored)
        return rid

    def feed_all(self, events: Iterable[StoredEvent]) -> set[RoundId]:
        """Apply events in order; returns the rounds they touched."""
        touched: set[RoundId] = set()
        for stored in events:
            rid = self.feed(stored)
            if rid is not None:
                touched.add(rid)
        return touched

    def _kek(self, number: int) -> None:
        self.active_kek = number
        if number not in self.kek_versions:
            self.kek_versions.append(number)

    def _apply(self, view: RoundView, stored: StoredEvent) -> None:
        event = stored.payload
        now = stored.timestamp
        if isinstance(event, RoundRequested):
            if view.requested_at is None:
                view.requested_at = now
        elif isinstance(event, RoundOpened):
            view.opened += 1
            view.deadline = event.deadline
            if view.ended:
                view.reopened = True
        elif isinstance(event, RoundStageChanged):
            if view.is_live and not event.stage.is_terminal:
                view.stage = event.stage
        elif isinstance(event, RoundFailed):
            self._failed(view, event, stored.sequence)
        elif isinstance(event, RoundComplete):
            if view.is_live:
                self._end(view, stored)
            elif view.reopened:  # a second end: one_outcome reports it
                view.reopened = False
                view.ended += 1
        elif isinstance(event, RoundKeyReady):
            key = event.key_id.hex()
            if view.ended:
                view.keyed_after_end += 1
            if key not in view.keys:
                view.keys[key] = now
                view.key_sequence[key] = stored.sequence
                self._live_change(now, +1)
            view.kek_version = event.kek_version.number
        elif isinstance(event, KeyshareCreated):
            view.keyshares += 1
            if view.ended:
                view.keyed_after_end += 1
            key = event.key_id.hex()
            if view.keys and key not in view.keys:
                view.mismatched_keyshares += 1
            if view.purged[key]:
                view.used_after_purge += 1
            view.keyshare_key = key
        elif isinstance(event, DecryptionShareCreated):
            # Sealed under the key that holds the round's keyshare (else its newest key).
            sealed_under = view.keyshare_key or next(reversed(view.keys), None)
            if sealed_under is not None and view.purged[sealed_under]:
                view.used_after_purge += 1
        elif isinstance(event, RoundPurged):
            self._purged(view, event.key_id, now)

    def _failed(self, view: RoundView, event: RoundFailed, sequence: int) -> None:
        if not view.is_live or view.ending_reason is not None:
            return
        if event.reason.is_misbehaviour:
            view.accusation = True
            if view.reason is None:
                view.reason = event.reason.value
            return
        view.ending_reason = event.reason.value
        view.ending_sequence = sequence

    def _end(self, view: RoundView, stored: StoredEvent) -> None:
        view.ended += 1
        view.ended_at = stored.timestamp
        view.ended_sequence = stored.sequence
        reason = view.ending_reason
        if reason == "deadline_exceeded":
            view.outcome = Outcome.REAPED
        elif reason is not None and reason.endswith("_timeout"):
            view.outcome = Outcome.TIMEOUT
        elif reason is not None:
            view.outcome = Outcome.FAILED
        elif view.accusation:
            view.outcome = Outcome.MISBEHAVIOUR
        else:
            view.outcome = Outcome.COMPLETE
        if reason is not None:
            view.reason = reason
        view.ending_reason = None

    def _purged(self, view: RoundView, key_id: KeyId, now: float) -> None:
        key = key_id.hex()
        view.purged[key] += 1
        self.purges += 1
        if view.purged[key] == 1:
            view.purged_at[key] = now
            if key in view.keys:
                self._live_change(now, -1)

    def _live_change(self, now: float, delta: int) -> None:
        self._live_keys += delta
        self.live_series.append((now, self._live_keys))

    # --- queries -------------------------------------------------------------------------

    def live_rounds(self) -> list[RoundId]:
        return sorted(rid for rid, v in self.rounds.items() if v.is_live)

    def ended_rounds(self) -> list[RoundId]:
        return sorted(rid for rid, v in self.rounds.items() if v.ended)

    def outcomes(self) -> Counter[str]:
        counts: Counter[str] = Counter()
        for view in self.rounds.values():
            if view.outcome is not None:
                counts[view.outcome.value] += 1
            elif view.is_live:
                counts["live"] += 1
        return counts

    def key_lifetimes(self) -> list[float]:
        """Seconds from each key's first announcement to its purge (purged keys only)."""
        return [
            view.purged_at[key] - made
            for view in self.rounds.values()
            for key, made in view.keys.items()
            if key in view.purged_at
        ]

    @property
    def live_keys(self) -> int:
        return self._live_keys

    def summary(self) -> dict[str, Any]:
        lifetimes = self.key_lifetimes()
        return {
            "events": self.events,
            "last_sequence": self.last_sequence,
            "first_time": self.first_time,
            "last_time": self.last_time,
            "rounds": len(self.rounds),
            "live_rounds": len(self.live_rounds()),
            "outcomes": dict(sorted(self.outcomes().items())),
            "purges": self.purges,
            "live_keys": self._live_keys,
            "max_key_lifetime": max(lifetimes, default=None),
            "active_kek": self.active_kek,
            "kek_versions": list(self.kek_versions),
            "kek_rotations": self.rotations,
            "starts": self.unseals,
        }


def replay(events: Iterable[StoredEvent]) -> LogState:
    """The :class:`LogState` of a whole log."""
    state = LogState()
    state.feed_all(events)
    return state
