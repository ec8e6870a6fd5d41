"""The deadline reaper (design §2, step 7): no round key outlives its round's deadline.

:class:`ReaperCore` tracks every opened round's deadline (from ``RoundOpened``) and its
last non-terminal stage (from ``RoundStageChanged``) until ``RoundComplete``. When the
runtime reads its clock it calls :meth:`ReaperCore.tick`; every round still open past
``deadline + grace`` is failed once with ``deadline_exceeded`` (a timeout reason, which
the router turns into completion, which purges the key). Deadlines are absolute POSIX
times carried in the log, so they survive restarts.
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

_SNAPSHOT_VERSION: Final = 2  # 2: "requested" rounds


@dataclass(slots=True)
class TrackedRound:
    """A live round as the reaper sees it. ``fired``: it was already failed by deadline."""

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
        # A RoundComplete can precede the round's RoundOpened in the log (both published
        # around one request): such a round must never be tracked, let alone reaped.
        self._completed = RecentRounds(horizon)
        # Only a RoundComplete for a round requested before it counts: a stray one must
        # not keep a later request of the same id from being tracked.
        self._requested = RecentRounds(horizon)

    @property
    def grace(self) -> float:
        return self._grace

    def tracked(self) -> dict[RoundId, TrackedRound]:
        """A copy of the tracked rounds."""
        return {rid: TrackedRound(t.deadline, t.stage, t.fired) for rid, t in self._rounds.items()}

    def handle(self, stored: StoredEvent) -> Sequence[Event]:
        """Update the tracked rounds; the reaper publishes only from :meth:`tick`."""
        self.replay(stored)
        return ()

    def replay(self, stored: StoredEvent) -> None:
        """Apply an already-logged event (the same as :meth:`handle`, which returns nothing).

        A logged ``deadline_exceeded`` failure marks the round as fired, so a restart does
        not fail it a second time.
        """
        event = stored.payload
        if isinstance(event, RoundRequested):
            self._requested.add(event.round_id)
            return
        if isinstance(event, RoundOpened):
            if event.round_id not in self._rounds and event.round_id not in self._completed:
                self._rounds[event.round_id] = TrackedRound(event.deadline)
            return
        rid = event.round_id_or_none
        if rid is not None and isinstance(event, RoundComplete):
            if rid in self._requested or rid in self._rounds:
                self._completed.add(rid)
            self._rounds.pop(rid, None)
            return
        tracked = None if rid is None else self._rounds.get(rid)
        if rid is None or tracked is None:
            return
        if isinstance(event, RoundStageChanged):
            if not event.stage.is_terminal:
                tracked.stage = event.stage
        elif isinstance(event, RoundFailed) and event.reason is FailureReason.DEADLINE_EXCEEDED:
            tracked.fired = True

    def tick(self, now: float) -> Sequence[Event]:
        """Fail, once each, the rounds still open past ``deadline + grace`` at ``now``."""
        now = _finite(now, "now")
        overdue = sorted(
            (t.deadline, rid)
            for rid, t in self._rounds.items()
            if not t.fired and t.deadline + self._grace < now
        )
        failures: list[Event] = []
        for deadline, rid in overdue:
            tracked = self._rounds[rid]
            tracked.fired = True
            _log.warning(
                "round_deadline_exceeded",
                round_id=rid.value,
                stage=tracked.stage.value,
                deadline=deadline,
                now=now,
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

    def __repr__(self) -> str:
        return f"ReaperCore(tracked={len(self._rounds)}, grace={self._grace})"
