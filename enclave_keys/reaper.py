"""The deadline reaper (design §2, step 7): no round key outlives its round's deadline.

:class:`ReaperCore` tracks every round's deadline (from ``RoundRequested``, or
``RoundOpened``) and its last non-terminal stage (from ``RoundStageChanged``) until
``RoundComplete``. When the
runtime reads its clock it calls :meth:`ReaperCore.tick`; every round still open past
``deadline + grace`` is failed with ``deadline_exceeded`` (a timeout reason, which the
router turns into completion, which purges the key). Deadlines are absolute POSIX times
carried in the log, so they survive restarts.

The reaper is the safety net, so it does not give up: a round still open
:meth:`ReaperCore.refire_interval` seconds after it was failed is failed again. That
covers every way the ending can go missing — the failure's own group commit failed, or
the router's ``RoundComplete`` did — at the cost of a duplicate failure, which the router
ignores once the round is complete. When a round was failed is kept in memory only
(from the tick, or the logged failure's timestamp); a round restored from a snapshot as
failed but still open is failed again at the next tick: after a restart, nothing that
could still end it is in flight.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import structlog

from enclave_keys.core_state import DEFAULT_HORIZON, KnownRoundIds, RecentRounds, StateReader
from enclave_keys.events import (
    Event,
    FailureReason,
    RoundComplete,
    RoundFailed,
    RoundOpened,
    RoundRequested,
    RoundStage,
    RoundStageChanged,
    StoredEvent,
)
from enclave_keys.ids import RoundId, by_round_id

__all__ = ["DEFAULT_GRACE", "ReaperCore", "TrackedRound"]

_log = structlog.get_logger(__name__)

DEFAULT_GRACE: Final = 30.0
"""Seconds past a round's deadline before the reaper fails it."""
MIN_REFIRE_INTERVAL: Final = 1.0
"""Fewest seconds between two failures of one round (the interval is the grace, at least
this)."""

_SNAPSHOT_VERSION: Final = 2  # 2: "requested" rounds


@dataclass(slots=True)
class TrackedRound:
    """A live round as the reaper sees it. ``fired``: it was already failed by deadline
    (and is failed again while it stays open, see the module docstring)."""

    deadline: float
    stage: RoundStage = RoundStage.REQUESTED
    fired: bool = False


def _finite(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number")
    return float(value)


class ReaperCore:
    """The deadline reaper's logic; implements ``Handler`` and ``Ticking``."""

    name: Final = "reaper"
    subscriptions: Final[tuple[type[Event], ...]] = (
        RoundRequested,
        RoundOpened,
        RoundStageChanged,
        RoundFailed,
        RoundComplete,
    )

    def __init__(self, *, grace: float = DEFAULT_GRACE, horizon: int = DEFAULT_HORIZON) -> None:
        self._grace = _finite(grace, "grace")
        if self._grace < 0:
            raise ValueError("grace must be >= 0")
        self._rounds: dict[RoundId, TrackedRound] = {}
        self._fired_at: dict[RoundId, float] = {}  # when each fired round was last failed
        self._unopened: set[RoundId] = set()  # tracked from a request, RoundOpened not seen
        # A RoundComplete can precede the round's RoundOpened in the log (both published
        # around one request): such a round must never be tracked, let alone reaped.
        self._completed = RecentRounds(horizon)
        # Only a RoundComplete for a round requested before it counts: a stray one must
        # not keep a later request of the same id from being tracked.
        self._requested = RecentRounds(horizon)

    @property
    def grace(self) -> float:
        return self._grace

    @property
    def refire_interval(self) -> float:
        """Seconds after which a round failed by deadline, still open, is failed again."""
        return max(self._grace, MIN_REFIRE_INTERVAL)

    def tracked(self) -> dict[RoundId, TrackedRound]:
        """A copy of the tracked rounds."""
        return {rid: TrackedRound(t.deadline, t.stage, t.fired) for rid, t in self._rounds.items()}

    def handle(self, stored: StoredEvent) -> Sequence[Event]:
        """Update the tracked rounds; the reaper publishes only from :meth:`tick`."""
        self.replay(stored)
        return ()

    def replay(self, stored: StoredEvent) -> None:
        """Apply an already-logged event (the same as :meth:`handle`, which returns nothing).

        A logged ``deadline_exceeded`` failure marks the round as fired at the event's
        timestamp: it is failed again only if it is still open a refire interval later.
        """
        event = stored.payload
        if isinstance(event, RoundRequested):
            # Tracked from the request: if the router's RoundOpened is lost (its commit
            # failed), the round is open in the router all the same, and must still end.
            requested = event.round_id
            self._requested.add(requested)
            if requested not in self._rounds and requested not in self._completed:
                self._rounds[requested] = TrackedRound(event.deadline)
                self._unopened.add(requested)
            return
        if isinstance(event, RoundOpened):
            opened = event.round_id
            if opened in self._unopened:  # the router's deadline is the round's
                self._unopened.discard(opened)
                self._rounds[opened].deadline = event.deadline
            elif opened not in self._rounds and opened not in self._completed:
                self._rounds[opened] = TrackedRound(event.deadline)
            return
        rid = event.round_id_or_none
        if rid is not None and isinstance(event, RoundComplete):
            # Recorded when a tracked round ends, as the router records it when it tears
            # an open round down: a late duplicate must not make it the newest completed
            # round here alone (the two would then forget different rounds at the horizon).
            if rid in self._rounds:
                self._completed.add(rid)
            self._rounds.pop(rid, None)
            self._fired_at.pop(rid, None)
            self._unopened.discard(rid)
            return
        tracked = None if rid is None else self._rounds.get(rid)
        if rid is None or tracked is None:
            return
        if isinstance(event, RoundStageChanged):
            if not event.stage.is_terminal:
                tracked.stage = event.stage
        elif isinstance(event, RoundFailed) and event.reason is FailureReason.DEADLINE_EXCEEDED:
            tracked.fired = True
            self._fired_at[rid] = stored.timestamp

    def tick(self, now: float) -> Sequence[Event]:
        """Fail the rounds still open past ``deadline + grace`` at ``now``: once, and again
        every refire interval while they stay open."""
        now = _finite(now, "now")
        refire_before = now - self.refire_interval
        overdue = sorted(
            (t.deadline, rid)
            for rid, t in self._rounds.items()
            if t.deadline + self._grace < now
            and not (t.fired and self._fired_at.get(rid, -math.inf) > refire_before)
        )
        failures: list[Event] = []
        for deadline, rid in overdue:
            tracked = self._rounds[rid]
            again, tracked.fired = tracked.fired, True
            self._fired_at[rid] = now
            _log.warning(
                "round_deadline_exceeded",
                round_id=rid.value,
                stage=tracked.stage.value,
                deadline=deadline,
                now=now,
                again=again,
            )
            failures.append(
                RoundFailed(
                    round_id=rid,
                    failed_at=tracked.stage,
                    reason=FailureReason.DEADLINE_EXCEEDED,
                    detail=f"deadline {deadline} plus grace {self._grace}s passed",
                )
            )
        return failures

    def snapshot_state(self) -> dict[str, Any]:
        """``{"version": 1, "rounds": [{"round_id", "deadline", "stage", "fired"}, ...],
        "completed": [round id, ...]}`` (completed: oldest first, bounded by the horizon)."""
        return {
            "version": _SNAPSHOT_VERSION,
            "rounds": [
                {
                    "round_id": rid.value,
                    "deadline": t.deadline,
                    "stage": t.stage.value,
                    "fired": t.fired,
                }
                for rid, t in sorted(self._rounds.items(), key=by_round_id)
            ],
            "completed": [rid.value for rid in self._completed],
            "requested": [rid.value for rid in self._requested],
        }

    def restore_state(self, state: object, *, round_ids: KnownRoundIds | None = None) -> None:
        """Replace the state with a snapshot; :class:`CorruptRecord` (changing nothing)
        when it is malformed. ``round_ids``: a table shared with the other cores restored
        from the same snapshot."""
        reader = StateReader(
            "reaper snapshot", state, version=_SNAPSHOT_VERSION, round_ids=round_ids
        )
        completed = RecentRounds(
            self._completed.horizon, map(reader.round_id, reader.items("completed"))
        )
        requested = RecentRounds(
            self._requested.horizon, map(reader.round_id, reader.items("requested"))
        )
        self._rounds = reader.unique(
            (
                reader.round_id(item.get("round_id")),
                TrackedRound(
                    reader.finite(item.get("deadline"), "deadline"),
                    reader.stage(item.get("stage")),
                    reader.flag(item.get("fired"), "fired"),
                ),
            )
            for item in map(reader.map, reader.items("rounds"))
        )
        self._completed = completed
        self._requested = requested
        self._fired_at = {}  # not in a snapshot: a fired round still open fails again
        self._unopened = set()  # nor this: a snapshot is taken settled, every round opened

    def __repr__(self) -> str:
        return f"ReaperCore(tracked={len(self._rounds)}, grace={self._grace})"
