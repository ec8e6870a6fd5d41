from __future__ import annotations

import msgpack
import pytest

from enclave_keys.clock import ManualClock
from enclave_keys.errors import CorruptRecord
from enclave_keys.events import (
    FailureReason,
    RoundComplete,
    RoundFailed,
    RoundOpened,
    RoundRequested,
    RoundStage,
    RoundStageChanged,
)
from enclave_keys.handler import Handler, Ticking
from enclave_keys.ids import RoundId
from enclave_keys.reaper import ReaperCore, TrackedRound
from tests.actors.helpers import T0, stored

R = RoundId("e3:1")
DEADLINE = T0 + 60.0
GRACE = 30.0


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
def reaper() -> ReaperCore:
    core = ReaperCore(grace=GRACE)
    core.handle(stored(RoundOpened(round_id=R, deadline=DEADLINE)))
    return core


def overdue(round_id: RoundId = R, stage: RoundStage = RoundStage.REQUESTED) -> RoundFailed:
    return RoundFailed(
        round_id=round_id,
        failed_at=stage,
        reason=FailureReason.DEADLINE_EXCEEDED,
        detail=f"deadline {DEADLINE} plus grace {GRACE}s passed",
    )


def test_reaper_is_a_ticking_handler(reaper: ReaperCore) -> None:
    assert isinstance(reaper, Handler)
    assert isinstance(reaper, Ticking)
    assert reaper.name == "reaper"


def test_fires_past_deadline_plus_grace_and_again_while_open(
    reaper: ReaperCore, clock: ManualClock
) -> None:
    clock.set(DEADLINE)
    assert reaper.tick(clock.now()) == []
    clock.set(DEADLINE + GRACE)
    assert reaper.tick(clock.now()) == []  # not before: strictly past deadline + grace
    clock.advance(0.001)
    assert reaper.tick(clock.now()) == [overdue()]
    assert reaper.tracked()[R].fired
    assert reaper.refire_interval == GRACE
    clock.advance(GRACE - 0.001)
    assert reaper.tick(clock.now()) == []  # its ending may still be on its way
    clock.advance(0.001)
    assert reaper.tick(clock.now()) == [overdue()]  # it never came: again
    reaper.handle(stored(RoundComplete(round_id=R)))
    clock.advance(3600)
    assert reaper.tick(clock.now()) == []  # ended: never again


def test_a_failure_that_never_reached_the_log_is_repeated(clock: ManualClock) -> None:
    """The reaper's own failure is lost (its group commit failed): the round is failed
    again a refire interval later -- at least a second, whatever the grace."""
    reaper = ReaperCore(grace=0.0)
    reaper.handle(stored(RoundOpened(round_id=R, deadline=DEADLINE)))
    clock.set(DEADLINE + 1)
    [first] = reaper.tick(clock.now())
    clock.advance(0.5)
    assert reaper.tick(clock.now()) == []
    clock.advance(0.5)
    assert reaper.tick(clock.now()) == [first]


def test_fails_at_the_last_known_stage(reaper: ReaperCore, clock: ManualClock) -> None:
    reaper.handle(stored(RoundStageChanged(round_id=R, stage=RoundStage.KEY_GENERATION)))
    reaper.handle(stored(RoundStageChanged(round_id=R, stage=RoundStage.FAILED)))  # terminal
    clock.set(DEADLINE + GRACE + 1)
    assert reaper.tick(clock.now()) == [overdue(stage=RoundStage.KEY_GENERATION)]


def test_not_after_completion(reaper: ReaperCore, clock: ManualClock) -> None:
    assert reaper.handle(stored(RoundComplete(round_id=R))) == ()
    clock.set(DEADLINE + GRACE + 1)
    assert reaper.tick(clock.now()) == []
    assert reaper.tracked() == {}


def test_overdue_rounds_fire_in_deadline_order(clock: ManualClock) -> None:
    reaper = ReaperCore(grace=0.0)
    for name, deadline in (("c", T0 + 3), ("a", T0 + 2), ("b", T0 + 1), ("late", T0 + 100)):
        reaper.handle(stored(RoundOpened(round_id=RoundId(name), deadline=deadline)))
    clock.set(T0 + 10)
    fired = reaper.tick(clock.now())
    assert [e.round_id_or_none for e in fired] == [RoundId("b"), RoundId("a"), RoundId("c")]


def test_events_for_untracked_rounds_are_ignored(clock: ManualClock) -> None:
    reaper = ReaperCore()
    other = RoundId("other")
    reaper.handle(stored(RoundStageChanged(round_id=other, stage=RoundStage.COMPUTE)))
    reaper.handle(stored(RoundComplete(round_id=other)))
    assert reaper.tracked() == {}
    assert reaper.tick(clock.now() + 10**6) == []


def test_a_duplicate_opened_changes_nothing(reaper: ReaperCore, clock: ManualClock) -> None:
    clock.set(DEADLINE + GRACE + 1)
    reaper.tick(clock.now())
    reaper.handle(stored(RoundOpened(round_id=R, deadline=DEADLINE + 10_000)))
    assert reaper.tracked()[R] == TrackedRound(DEADLINE, RoundStage.REQUESTED, fired=True)


def test_a_logged_deadline_failure_counts_from_its_timestamp_after_a_restart(
    clock: ManualClock,
) -> None:
    restarted = ReaperCore(grace=GRACE)
    restarted.replay(stored(RoundOpened(round_id=R, deadline=DEADLINE)))
    fired_at = DEADLINE + GRACE + 1
    restarted.replay(stored(overdue(), source="reaper", timestamp=fired_at))
    clock.set(fired_at + 1)
    assert restarted.tick(clock.now()) == []  # not repeated at once
    clock.set(fired_at + GRACE)
    assert restarted.tick(clock.now()) == [overdue()]  # still open: repeated


def test_other_failures_do_not_count_as_fired(reaper: ReaperCore, clock: ManualClock) -> None:
    misbehaviour = RoundFailed(
        round_id=R, failed_at=RoundStage.COMPUTE, reason=FailureReason.VERIFICATION_FAILED
    )
    reaper.handle(stored(misbehaviour))  # accusation phase: the reaper still ends it
    clock.set(DEADLINE + GRACE + 1)
    assert reaper.tick(clock.now()) == [overdue()]


def test_snapshot_round_trips_through_msgpack(reaper: ReaperCore, clock: ManualClock) -> None:
    reaper.handle(stored(requested(RoundId("b"))))
    reaper.handle(stored(RoundOpened(round_id=RoundId("b"), deadline=DEADLINE + 1000)))
    reaper.handle(stored(RoundStageChanged(round_id=RoundId("b"), stage=RoundStage.COMPUTE)))
    clock.set(DEADLINE + GRACE + 1)
    reaper.tick(clock.now())
    snapshot = reaper.snapshot_state()
    assert snapshot == {
        "version": 2,
        "rounds": [
            {"round_id": "b", "deadline": DEADLINE + 1000, "stage": "compute", "fired": False},
            {"round_id": "e3:1", "deadline": DEADLINE, "stage": "requested", "fired": True},
        ],
        "completed": [],
        "requested": ["b"],
    }
    restored = ReaperCore(grace=GRACE)
    restored.restore_state(msgpack.unpackb(msgpack.packb(snapshot), raw=False))
    assert restored.snapshot_state() == snapshot
    # Failed before the snapshot and still open after the restart: nothing that could
    # end it is in flight any more, so it is failed again at once.
    assert restored.tick(clock.now()) == [overdue()]
    assert restored.tick(clock.now()) == []


def requested(rid: RoundId) -> RoundRequested:
    return RoundRequested(round_id=rid, deadline=DEADLINE, threshold=1, committee_size=1)


def test_a_round_completed_before_it_was_opened_is_never_tracked(clock: ManualClock) -> None:
    """Requested, then completed, then (the router's) opened: the log order decides."""
    reaper = ReaperCore(grace=GRACE)
    rid = RoundId("e3:cancelled")
    reaper.handle(stored(requested(rid)))
    reaper.handle(stored(RoundComplete(round_id=rid)))
    reaper.handle(stored(RoundOpened(round_id=rid, deadline=DEADLINE)))
    assert rid not in reaper.tracked()
    clock.set(DEADLINE + GRACE + 1)
    assert reaper.tick(clock.now()) == []
    restored = ReaperCore(grace=GRACE)
    restored.restore_state(msgpack.unpackb(msgpack.packb(reaper.snapshot_state()), raw=False))
    restored.handle(stored(RoundOpened(round_id=rid, deadline=DEADLINE)))
    assert rid not in restored.tracked()


def test_a_stray_complete_before_the_request_does_not_stop_tracking(clock: ManualClock) -> None:
    """A RoundComplete for a round nobody has requested yet is not that round's end."""
    reaper = ReaperCore(grace=GRACE)
    rid = RoundId("e3:stray")
    reaper.handle(stored(RoundComplete(round_id=rid)))
    reaper.handle(stored(requested(rid)))
    reaper.handle(stored(RoundOpened(round_id=rid, deadline=DEADLINE)))
    assert rid in reaper.tracked()
    clock.set(DEADLINE + GRACE + 1)
    (fired,) = reaper.tick(clock.now())
    assert isinstance(fired, RoundFailed)
    assert fired.round_id == rid


GOOD = {"round_id": "a", "deadline": T0, "stage": "compute", "fired": False}


@pytest.mark.parametrize(
    "bad",
    [
        None,
        {"version": 1},
        {"version": 0, "rounds": []},
        {"version": 1, "rounds": ["a"]},
        {"version": 1, "rounds": [{**GOOD, "round_id": "?"}]},
        {"version": 1, "rounds": [{**GOOD, "round_id": 1}]},
        {"version": 1, "rounds": [{**GOOD, "deadline": "x"}]},
        {"version": 1, "rounds": [{**GOOD, "deadline": float("inf")}]},
        {"version": 1, "rounds": [{**GOOD, "stage": "done"}]},
        {"version": 1, "rounds": [{**GOOD, "fired": 0}]},
        {"version": 1, "rounds": [GOOD, GOOD]},
    ],
)
def test_malformed_snapshots_are_refused(reaper: ReaperCore, bad: object) -> None:
    before = reaper.snapshot_state()
    with pytest.raises(CorruptRecord):
        reaper.restore_state(bad)
    assert reaper.snapshot_state() == before


def test_grace_and_now_are_validated(reaper: ReaperCore) -> None:
    for bad in (-1.0, float("nan"), float("inf"), True, "30"):
        with pytest.raises(ValueError, match="grace"):
            ReaperCore(grace=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="now"):
        reaper.tick(float("nan"))


def test_a_round_is_tracked_from_its_request(clock: ManualClock) -> None:
    """Its RoundOpened may never reach the log (the router's commit failed): the request's
    deadline is enforced all the same; a RoundOpened that comes sets the router's."""
    reaper = ReaperCore(grace=GRACE)
    reaper.handle(stored(requested(R)))
    assert reaper.tracked()[R].deadline == DEADLINE
    clock.set(DEADLINE + GRACE + 1)
    assert reaper.tick(clock.now()) == [overdue()]

    other = RoundId("e3:2")
    reaper.handle(stored(requested(other)))
    reaper.handle(stored(RoundOpened(round_id=other, deadline=DEADLINE + 500)))
    assert reaper.tracked()[other].deadline == DEADLINE + 500
