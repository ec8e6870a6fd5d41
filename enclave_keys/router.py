"""The router: decides what each event means for its round's lifecycle (design §2, §4).

The decision is a pure function, :func:`route`, over a read-only :class:`RouterView` of
the router's state; :class:`RouterCore` applies the decision (state, round contexts) and
returns the events it asks for. Rules:

* a fresh ``RoundRequested`` opens the round's context and publishes ``RoundOpened``
  (the round-cipher actor keys rounds on that, so the router is the one gate that filters
  duplicate requests and requests for completed rounds);
* ``RoundStageChanged`` is tracked;
* ``RoundFailed`` with a timeout reason, or any reason that is neither timeout nor
  misbehaviour, ends the round: ``RoundComplete`` is published at once. A misbehaviour
  failure keeps the context for the accusation phase (a later ``RoundComplete`` or the
  deadline reaper ends it). Further failures of an ending round are ignored, except the
  reaper's ``deadline_exceeded``: a round still open then lost its ``RoundComplete``
  (the commit failed), so it is published again;
* ``RoundComplete`` tears the round down: its context is closed and it becomes completed;
* for a completed round, late terminal events (a terminal stage change, a timeout
  failure, a repeated ``RoundComplete``) are ignored silently, other external protocol
  events are answered with ``RoundAlreadyCompleted``, and the outputs of our own actors
  are never reported;
* events for rounds the router does not know are ignored (logged at debug level).

Completed rounds are remembered up to a *horizon*: the ``horizon`` most recent
completions. A late event for a round evicted from the horizon is treated like one for an
unknown round — in particular a repeated ``RoundRequested`` for it would open it afresh —
so the horizon must exceed the number of rounds that complete while a late event can
still be in flight.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, Final, Protocol

import structlog

from enclave_keys.context import ContextRegistry
from enclave_keys.core_state import DEFAULT_HORIZON, KnownRoundIds, RecentRounds, StateReader
from enclave_keys.events import (
    DecryptionShareCreated,
    DecryptionShareFailed,
    DecryptionShareRequested,
    Event,
    FailureReason,
    KeyshareCreated,
    RoundAlreadyCompleted,
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
from enclave_keys.ids import RoundId, by_round_id

__all__ = [
    "DEFAULT_HORIZON",
    "OWN_OUTPUTS",
    "ROUTED",
    "Action",
    "Decision",
    "OpenRound",
    "RouterCore",
    "RouterState",
    "RouterView",
    "route",
]

_log = structlog.get_logger(__name__)


OWN_OUTPUTS: Final[frozenset[type[Event]]] = frozenset(
    {
        RoundOpened,
        RoundAlreadyCompleted,
        RoundKeyReady,
        RoundPurged,
        KeyshareCreated,
        DecryptionShareCreated,
        DecryptionShareFailed,
    }
)
"""Events our own actors publish: never reported as ``RoundAlreadyCompleted``."""

ROUTED: Final[tuple[type[Event], ...]] = (
    RoundRequested,
    RoundStageChanged,
    RoundComplete,
    RoundFailed,
    DecryptionShareRequested,
)
"""The events :func:`route` can act on; it ignores every other event (a property test
checks this), so the router subscribes to these alone — most of a round's events never
reach it."""

_SNAPSHOT_VERSION: Final = 1


# --- the view and the decision ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OpenRound:
    """What the router knows about a live round.

    ``accusation``: a misbehaviour failure was seen, the context stays for the accusation
    phase. ``ending``: the router has asked for ``RoundComplete`` and awaits it.
    """

    stage: RoundStage
    deadline: float
    accusation: bool = False
    ending: bool = False


class RouterView(Protocol):
    """Read-only access to the router's state, all :func:`route` may look at."""

    def open_round(self, round_id: RoundId) -> OpenRound | None:
        """The round's state if it is open, else ``None``."""
        ...

    def is_completed(self, round_id: RoundId) -> bool:
        """True if the round completed (and is still within the horizon)."""
        ...


class Action(StrEnum):
    """What applying a :class:`Decision` does to the router's state."""

    IGNORE = "ignore"  # nothing changes
    OPEN = "open"  # the round becomes open, its context is opened
    TRACK_STAGE = "track_stage"  # the round's stage is updated
    ACCUSE = "accuse"  # the round enters (or stays in) the accusation phase
    END = "end"  # the round is marked ending; RoundComplete is published
    TEAR_DOWN = "tear_down"  # the context is closed, the round becomes completed
    REJECT = "reject"  # RoundAlreadyCompleted is published; nothing changes


@dataclass(frozen=True, slots=True)
class Decision:
    """The router's verdict on one event: a state change, a reason, events to publish.

    ``why`` is a short label for logs and tests (``"duplicate_request"``,
    ``"late_terminal"``, ...). ``stage`` and ``deadline`` are set for the actions that
    need them (``OPEN``, ``TRACK_STAGE``).
    """

    action: Action
    round_id: RoundId | None
    why: str
    publish: tuple[Event, ...] = ()
    stage: RoundStage | None = None
    deadline: float | None = None


def _ignore(round_id: RoundId | None, why: str) -> Decision:
    return Decision(Action.IGNORE, round_id, why)


# --- the pure decision function -----------------------------------------------------------


def route(view: RouterView, stored: StoredEvent) -> Decision:
    """Decide what ``stored`` means, given the router's state. Pure: changes nothing."""
    event = stored.payload
    round_id = event.round_id_or_none
    if round_id is None:
        return _ignore(None, "node_event")
    if type(event) in OWN_OUTPUTS:
        return _ignore(round_id, "own_output")
    current = view.open_round(round_id)
    if current is not None:
        return _route_open(round_id, current, event)
    if view.is_completed(round_id):
        return _route_completed(round_id, event)
    return _route_unknown(round_id, event)


def _route_unknown(round_id: RoundId, event: Event) -> Decision:
    if isinstance(event, RoundRequested):
        opened = RoundOpened(round_id=round_id, deadline=event.deadline)
        return Decision(
            Action.OPEN,
            round_id,
            "fresh_request",
            publish=(opened,),
            stage=RoundStage.REQUESTED,
            deadline=event.deadline,
        )
    return _ignore(round_id, "unknown_round")


def _route_open(round_id: RoundId, current: OpenRound, event: Event) -> Decision:
    if isinstance(event, RoundRequested):
        return _ignore(round_id, "duplicate_request")
    if isinstance(event, RoundStageChanged):
        return Decision(Action.TRACK_STAGE, round_id, "stage_changed", stage=event.stage)
    if isinstance(event, RoundComplete):
        return Decision(Action.TEAR_DOWN, round_id, "round_complete")
    if isinstance(event, RoundFailed):
        if current.ending:
            if event.reason is FailureReason.DEADLINE_EXCEEDED:
                # Still open at the reaper's deadline although ending: the RoundComplete
                # asked for earlier never reached the log (its commit failed). Again.
                return Decision(
                    Action.END,
                    round_id,
                    "ending_past_deadline",
                    publish=(RoundComplete(round_id=round_id),),
                )
            return _ignore(round_id, "already_ending")
        if event.reason.is_misbehaviour:
            return Decision(Action.ACCUSE, round_id, "misbehaviour")
        why = "timeout" if event.reason.is_timeout else "failed"
        return Decision(Action.END, round_id, why, publish=(RoundComplete(round_id=round_id),))
    return _ignore(round_id, "not_a_lifecycle_event")


def _is_late_terminal(event: Event) -> bool:
    """A terminal event that may legitimately arrive after the round completed."""
    if isinstance(event, RoundComplete):
        return True
    if isinstance(event, RoundStageChanged):
        return event.stage.is_terminal
    if isinstance(event, RoundFailed):
        return event.reason.is_timeout
    return False


_REPORTED_WHEN_COMPLETED: Final = (
    RoundRequested,
    RoundStageChanged,
    RoundFailed,
    DecryptionShareRequested,
)


def _route_completed(round_id: RoundId, event: Event) -> Decision:
    if _is_late_terminal(event):
        return _ignore(round_id, "late_terminal")
    if isinstance(event, _REPORTED_WHEN_COMPLETED):
        report = RoundAlreadyCompleted(round_id=round_id, rejected_tag=event.TAG)
        return Decision(Action.REJECT, round_id, "already_completed", publish=(report,))
    return _ignore(round_id, "completed_round")


# --- the state ----------------------------------------------------------------------------


def _check_horizon(horizon: object) -> int:
    if not isinstance(horizon, int) or isinstance(horizon, bool) or horizon < 1:
        raise ValueError("horizon must be a positive int")
    return horizon


class RouterState:
    """The router's mutable state: open rounds and the bounded set of completed ones.

    Implements :class:`RouterView`. Not thread-safe: one actor owns it.
    """

    __slots__ = ("_completed", "_horizon", "_open")

    def __init__(self, *, horizon: int = DEFAULT_HORIZON) -> None:
        self._horizon = _check_horizon(horizon)
        self._open: dict[RoundId, OpenRound] = {}
        self._completed = RecentRounds(horizon)

    @property
    def horizon(self) -> int:
        return self._horizon

    def open_round(self, round_id: RoundId) -> OpenRound | None:
        return self._open.get(round_id)

    def is_completed(self, round_id: RoundId) -> bool:
        return round_id in self._completed

    def open_rounds(self) -> dict[RoundId, OpenRound]:
        """A copy of the open rounds."""
        return dict(self._open)

    def completed_rounds(self) -> list[RoundId]:
        """The remembered completed rounds, oldest completion first."""
        return list(self._completed)

    def apply(self, decision: Decision) -> None:
        """Change the state as ``decision`` says (no events, no contexts)."""
        rid = decision.round_id
        action = decision.action
        if rid is None or action in (Action.IGNORE, Action.REJECT):
            return
        if action is Action.OPEN:
            if decision.stage is None or decision.deadline is None:
                raise ValueError("an OPEN decision needs a stage and a deadline")
            self._open[rid] = OpenRound(decision.stage, decision.deadline)
            return
        current = self._open.get(rid)
        if current is None:
            return
        if action is Action.TRACK_STAGE:
            if decision.stage is None:
                raise ValueError("a TRACK_STAGE decision needs a stage")
            self._open[rid] = replace(current, stage=decision.stage)
        elif action is Action.ACCUSE:
            self._open[rid] = replace(current, accusation=True)
        elif action is Action.END:
            self._open[rid] = replace(current, ending=True)
        elif action is Action.TEAR_DOWN:
            del self._open[rid]
            self._mark_completed(rid)

    def _mark_completed(self, round_id: RoundId) -> None:
        self._completed.add(round_id)

    # --- snapshots ------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Plain values only: round ids as text, stages as their wire values."""
        return {
            "version": _SNAPSHOT_VERSION,
            "open": [
                {
                    "round_id": rid.value,
                    "stage": state.stage.value,
                    "deadline": state.deadline,
                    "accusation": state.accusation,
                    "ending": state.ending,
                }
                for rid, state in sorted(self._open.items(), key=by_round_id)
            ],
            "completed": [rid.value for rid in self._completed],
        }

    def restore(self, state: object, *, round_ids: KnownRoundIds | None = None) -> None:
        """Replace the state with a :meth:`snapshot`; :class:`CorruptRecord` if malformed.

        Completed rounds beyond the horizon are dropped, oldest first. Nothing changes
        when the input is malformed. ``round_ids``: shared with the other cores' restores.
        """
        reader = StateReader(
            "router snapshot", state, version=_SNAPSHOT_VERSION, round_ids=round_ids
        )
        opened = reader.unique(
            (
                reader.round_id(item.get("round_id")),
                OpenRound(
                    reader.stage(item.get("stage")),
                    reader.finite(item.get("deadline"), "deadline"),
                    reader.flag(item.get("accusation"), "accusation"),
                    reader.flag(item.get("ending"), "ending"),
                ),
            )
            for item in map(reader.map, reader.items("open"))
        )
        completed = [reader.round_id(raw) for raw in reader.items("completed")]
        if not opened.keys().isdisjoint(completed):
            raise reader.corrupt("a round is both open and completed")
        self._open, self._completed = opened, RecentRounds(self._horizon, completed)


# --- the core -------------------------------------------------------------------------------


class RouterCore:
    """The router actor's logic: :func:`route`, then apply the decision.

    Owns the opening and closing of round contexts in the shared ``registry``.
    """

    name: Final = "router"
    subscriptions: Final[tuple[type[Event], ...]] = ROUTED

    def __init__(self, registry: ContextRegistry, *, horizon: int = DEFAULT_HORIZON) -> None:
        self._registry = registry
        self._state = RouterState(horizon=horizon)

    @property
    def state(self) -> RouterView:
        """Read-only view of the state (what :func:`route` sees)."""
        return self._state

    def open_rounds(self) -> dict[RoundId, OpenRound]:
        """The live rounds and what the router knows of them (a copy)."""
        return self._state.open_rounds()

    def completed_rounds(self) -> list[RoundId]:
        """The remembered completed rounds, oldest completion first."""
        return self._state.completed_rounds()

    def is_completed(self, round_id: RoundId) -> bool:
        return self._state.is_completed(round_id)

    def handle(self, stored: StoredEvent) -> Sequence[Event]:
        """Route ``stored``, apply the decision, return the events it asks for."""
        decision = self._apply(stored)
        self._log(decision, stored)
        return decision.publish

    def replay(self, stored: StoredEvent) -> None:
        """Apply an already-logged event: state and contexts change, nothing is returned.

        Used after a snapshot is restored, for the log tail: the events :meth:`handle`
        would return are already in the log.
        """
        self._apply(stored)

    def _apply(self, stored: StoredEvent) -> Decision:
        decision = route(self._state, stored)
        self._state.apply(decision)
        if decision.round_id is not None:
            if decision.action is Action.OPEN:
                self._registry.open(decision.round_id)
            elif decision.action is Action.TEAR_DOWN:
                self._registry.close(decision.round_id)
        return decision

    def snapshot_state(self) -> dict[str, Any]:
        """``{"version": 1, "open": [{"round_id", "stage", "deadline", "accusation",
        "ending"}, ...], "completed": [round id, ...]}`` (oldest completion first)."""
        return self._state.snapshot()

    def restore_state(self, state: object, *, round_ids: KnownRoundIds | None = None) -> None:
        """Replace the state with a snapshot and open the contexts of its open rounds.

        Raises :class:`CorruptRecord` (changing nothing) when ``state`` is malformed.
        ``round_ids``: a table shared with the other cores restored from the same snapshot.
        """
        self._state.restore(state, round_ids=round_ids)
        for rid in self._state.open_rounds():
            self._registry.open(rid)

    def _log(self, decision: Decision, stored: StoredEvent) -> None:
        rid = None if decision.round_id is None else decision.round_id.value
        fields = {"round_id": rid, "tag": stored.tag, "sequence": stored.sequence}
        if decision.action is Action.OPEN:
            _log.info("round_opened", deadline=decision.deadline, **fields)
        elif decision.action is Action.END:
            _log.info("round_ending", why=decision.why, **fields)
        elif decision.action is Action.TEAR_DOWN:
            _log.info("round_torn_down", **fields)
        elif decision.action is Action.ACCUSE:
            _log.info("round_accusation_phase", **fields)
        elif decision.action is Action.REJECT:
            _log.info("event_for_completed_round", **fields)
        elif decision.action is Action.IGNORE:
            _log.debug("event_ignored", why=decision.why, **fields)

    def __repr__(self) -> str:
        return (
            f"RouterCore(open={len(self._state.open_rounds())},"
            f" completed={len(self._state.completed_rounds())})"
        )
