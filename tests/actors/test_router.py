from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enclave_keys.context import ContextRegistry
from enclave_keys.errors import CorruptRecord
from enclave_keys.events import (
    EVENT_TYPES,
    DecryptionShareCreated,
    DecryptionShareFailed,
    DecryptionShareRequested,
    Event,
    FailureReason,
    HandlerFailed,
    KekRotated,
    KeyshareCreated,
    NodeSealed,
    NodeUnsealed,
    RootRekeyed,
    RoundAlreadyCompleted,
    RoundComplete,
    RoundFailed,
    RoundKeyReady,
    RoundOpened,
    RoundPurged,
    RoundRequested,
    RoundStage,
    RoundStageChanged,
    UnsealProgress,
)
from enclave_keys.handler import Handler
from enclave_keys.ids import EventId, KekVersion, KeyId, RoundId
from enclave_keys.router import (
    ROUTED,
    Action,
    Decision,
    OpenRound,
    RouterCore,
    RouterState,
    route,
)
from enclave_keys.testing.strategies import events_of
from tests.actors.helpers import T0, stored

R = RoundId("e3:1")
DEADLINE = T0 + 600.0

# --- every event kind, for one round ---------------------------------------------------

EVENTS: dict[str, Callable[[RoundId], Event]] = {
    "requested": lambda r: RoundRequested(
        round_id=r, deadline=DEADLINE, threshold=2, committee_size=3
    ),
    "opened": lambda r: RoundOpened(round_id=r, deadline=DEADLINE),
    "already_completed": lambda r: RoundAlreadyCompleted(
        round_id=r, rejected_tag="round.requested"
    ),
    "complete": lambda r: RoundComplete(round_id=r),
    "key_ready": lambda r: RoundKeyReady(
        round_id=r, key_id=KeyId(bytes(16)), kek_version=KekVersion(1)
    ),
    "purged": lambda r: RoundPurged(round_id=r, key_id=KeyId(bytes(16))),
    "keyshare": lambda r: KeyshareCreated(
        round_id=r, key_id=KeyId(bytes(16)), ciphertext=b"\x01" * 60
    ),
    "ds_requested": lambda r: DecryptionShareRequested(round_id=r, request_id=EventId(bytes(16))),
    "ds_created": lambda r: DecryptionShareCreated(
        round_id=r, request_id=EventId(bytes(16)), ciphertext=b"\x02" * 60
    ),
    "ds_failed": lambda r: DecryptionShareFailed(
        round_id=r, request_id=EventId(bytes(16)), reason="no_keyshare"
    ),
    "handler_failed": lambda r: HandlerFailed(
        subscriber="keyshare", failed_sequence=3, error_type="builtins.RuntimeError"
    ),
    "unseal_progress": lambda r: UnsealProgress(submitted=1, threshold=2),
    "unsealed": lambda r: NodeUnsealed(method="passphrase", active_kek=KekVersion(1)),
    "sealed": lambda r: NodeSealed(),
    "kek_rotated": lambda r: KekRotated(
        old_version=KekVersion(1), new_version=KekVersion(2), rewrapped=0
    ),
    "root_rekeyed": lambda r: RootRekeyed(old_method="env", new_method="passphrase"),
}


def _stage_changed(stage: RoundStage) -> Callable[[RoundId], Event]:
    return lambda r: RoundStageChanged(round_id=r, stage=stage)


def _failed(reason: FailureReason) -> Callable[[RoundId], Event]:
    return lambda r: RoundFailed(round_id=r, failed_at=RoundStage.KEY_GENERATION, reason=reason)


EVENTS.update({f"stage_{s.value}": _stage_changed(s) for s in RoundStage})
EVENTS.update({f"failed_{r.value}": _failed(r) for r in FailureReason})

OWN = {"opened", "already_completed", "key_ready", "purged", "keyshare", "ds_created", "ds_failed"}
STATES = ("unknown", "open", "accusation", "ending", "completed")


def test_every_registered_event_type_is_in_the_table() -> None:
    covered = {type(make(R)) for make in EVENTS.values()}
    assert covered == set(EVENT_TYPES.values())


def state_in(kind: str) -> RouterState:
    """A router state with round R in ``kind``, reached through route() itself."""
    state = RouterState()
    steps = {
        "unknown": [],
        "open": ["requested"],
        "accusation": ["requested", f"failed_{FailureReason.INVALID_DKG_SHARES.value}"],
        "ending": ["requested", f"failed_{FailureReason.DKG_TIMEOUT.value}"],
        "completed": ["requested", "complete"],
    }[kind]
    for step in steps:
        state.apply(route(state, stored(EVENTS[step](R))))
    return state


def expected(state: str, event_name: str, event: Event) -> tuple[Action, str, tuple[Event, ...]]:
    """The rules of the router, written out independently of its code."""
    ignore = (Action.IGNORE,)
    if event.round_id_or_none is None:  # node-level: HandlerFailed, the master-key audit
        return (*ignore, "node_event", ())
    if event_name in OWN:
        return (*ignore, "own_output", ())
    if state == "unknown":
        if isinstance(event, RoundRequested):
            return Action.OPEN, "fresh_request", (RoundOpened(round_id=R, deadline=DEADLINE),)
        return (*ignore, "unknown_round", ())
    if state == "completed":
        late = (
            isinstance(event, RoundComplete)
            or (isinstance(event, RoundStageChanged) and event.stage.is_terminal)
            or (isinstance(event, RoundFailed) and event.reason.is_timeout)
        )
        if late:
            return (*ignore, "late_terminal", ())
        report = RoundAlreadyCompleted(round_id=R, rejected_tag=event.TAG)
        return Action.REJECT, "already_completed", (report,)
    # open, accusation, ending
    if isinstance(event, RoundRequested):
        return (*ignore, "duplicate_request", ())
    if isinstance(event, RoundStageChanged):
        return Action.TRACK_STAGE, "stage_changed", ()
    if isinstance(event, RoundComplete):
        return Action.TEAR_DOWN, "round_complete", ()
    if isinstance(event, RoundFailed):
        if state == "ending":
            if event.reason is FailureReason.DEADLINE_EXCEEDED:  # its RoundComplete was lost
                return Action.END, "ending_past_deadline", (RoundComplete(round_id=R),)
            return (*ignore, "already_ending", ())
        if event.reason.is_misbehaviour:
            return Action.ACCUSE, "misbehaviour", ()
        why = "timeout" if event.reason.is_timeout else "failed"
        return Action.END, why, (RoundComplete(round_id=R),)
    return (*ignore, "not_a_lifecycle_event", ())


@pytest.mark.parametrize("event_name", sorted(EVENTS))
@pytest.mark.parametrize("state", STATES)
def test_route_over_every_event_kind_and_round_state(state: str, event_name: str) -> None:
    view = state_in(state)
    before = view.snapshot()
    event = EVENTS[event_name](R)
    decision = route(view, stored(event))
    action, why, publish = expected(state, event_name, event)
    assert (decision.action, decision.why, decision.publish) == (action, why, publish)
    assert view.snapshot() == before  # route is pure


def test_the_states_are_what_their_names_say() -> None:
    assert state_in("unknown").open_round(R) is None
    assert state_in("open").open_round(R) == OpenRound(RoundStage.REQUESTED, DEADLINE)
    assert state_in("accusation").open_round(R) == OpenRound(
        RoundStage.REQUESTED, DEADLINE, accusation=True
    )
    assert state_in("ending").open_round(R) == OpenRound(
        RoundStage.REQUESTED, DEADLINE, ending=True
    )
    completed = state_in("completed")
    assert completed.open_round(R) is None
    assert completed.is_completed(R)


def test_events_of_other_rounds_do_not_leak() -> None:
    view = state_in("completed")
    other = RoundId("e3:2")
    decision = route(view, stored(EVENTS["failed_insufficient_committee"](other)))
    assert decision == Decision(Action.IGNORE, other, "unknown_round")


# --- the core: state, contexts, published events -----------------------------------------


@pytest.fixture
def registry() -> ContextRegistry:
    return ContextRegistry()


@pytest.fixture
def core(registry: ContextRegistry) -> RouterCore:
    return RouterCore(registry)


def feed(core: RouterCore, name: str, round_id: RoundId = R) -> list[Event]:
    return list(core.handle(stored(EVENTS[name](round_id))))


def test_router_core_is_a_handler_of_the_routed_events(core: RouterCore) -> None:
    assert isinstance(core, Handler)
    assert core.name == "router"
    assert core.subscriptions == ROUTED


@settings(max_examples=300)
@given(
    event=st.sampled_from([t for t in EVENT_TYPES.values() if t not in ROUTED]).flatmap(events_of),
    where=st.sampled_from(["open", "completed", "unknown"]),
)
def test_the_router_ignores_every_event_it_does_not_subscribe_to(event: Event, where: str) -> None:
    # Whatever round it names and whatever state that round is in: the subscription
    # list may leave these events out only because route() never acts on them.
    state = RouterState()
    round_id = event.round_id_or_none
    if round_id is not None and where != "unknown":
        requested = RoundRequested(
            round_id=round_id, deadline=DEADLINE, threshold=1, committee_size=1
        )
        state.apply(route(state, stored(requested)))
        if where == "completed":
            state.apply(route(state, stored(RoundComplete(round_id=round_id))))
    decision = route(state, stored(event))
    assert decision.action is Action.IGNORE
    assert decision.publish == ()


def test_fresh_request_opens_the_context_and_publishes_round_opened(
    core: RouterCore, registry: ContextRegistry
) -> None:
    assert feed(core, "requested") == [RoundOpened(round_id=R, deadline=DEADLINE)]
    assert registry.get(R) is not None
    assert feed(core, "requested") == []  # a duplicate
    assert registry.round_ids() == [R]


def test_stage_changes_are_tracked(core: RouterCore) -> None:
    feed(core, "requested")
    feed(core, "stage_key_generation")
    assert core.open_rounds()[R].stage is RoundStage.KEY_GENERATION


@pytest.mark.parametrize("reason", [r for r in FailureReason if r.is_timeout])
def test_each_timeout_reason_completes_the_round(
    core: RouterCore, registry: ContextRegistry, reason: FailureReason
) -> None:
    feed(core, "requested")
    assert feed(core, f"failed_{reason.value}") == [RoundComplete(round_id=R)]
    again = feed(core, f"failed_{reason.value}")
    if reason is FailureReason.DEADLINE_EXCEEDED:
        # The reaper fails a round again only while it stays open: its RoundComplete
        # was lost, so it is asked for again.
        assert again == [RoundComplete(round_id=R)]
    else:
        assert again == []  # already ending: asked once only
    assert feed(core, "complete") == []
    assert registry.get(R) is None
    assert core.is_completed(R)
    assert core.open_rounds() == {}


@pytest.mark.parametrize(
    "reason", [r for r in FailureReason if not (r.is_timeout or r.is_misbehaviour)]
)
def test_other_failures_end_the_round(core: RouterCore, reason: FailureReason) -> None:
    feed(core, "requested")
    assert feed(core, f"failed_{reason.value}") == [RoundComplete(round_id=R)]


@pytest.mark.parametrize("reason", [r for r in FailureReason if r.is_misbehaviour])
def test_invalid_shares_keep_the_context_for_the_accusation_phase(
    core: RouterCore, registry: ContextRegistry, reason: FailureReason
) -> None:
    feed(core, "requested")
    context = registry.get(R)
    assert feed(core, f"failed_{reason.value}") == []
    assert registry.get(R) is context
    assert core.open_rounds()[R].accusation
    # the accusation phase ends with RoundComplete (or a timeout from the reaper)
    assert feed(core, "failed_deadline_exceeded") == [RoundComplete(round_id=R)]
    feed(core, "complete")
    assert registry.get(R) is None
    assert context is not None
    assert context.closed


def test_late_events_are_ignored_after_completion(core: RouterCore) -> None:
    feed(core, "requested")
    feed(core, "complete")
    for late in ("complete", "stage_complete", "stage_failed", "failed_dkg_timeout"):
        assert feed(core, late) == []
    for own in sorted(OWN):
        assert feed(core, own) == []


@pytest.mark.parametrize(
    ("name", "tag"),
    [
        ("requested", "round.requested"),
        ("stage_compute", "round.stage_changed"),
        ("failed_invalid_decryption_shares", "round.failed"),
        ("failed_requester_cancelled", "round.failed"),
        ("ds_requested", "decryption_share.requested"),
    ],
)
def test_non_late_events_after_completion_are_reported(
    core: RouterCore, registry: ContextRegistry, name: str, tag: str
) -> None:
    feed(core, "requested")
    feed(core, "complete")
    assert feed(core, name) == [RoundAlreadyCompleted(round_id=R, rejected_tag=tag)]
    assert registry.get(R) is None  # a completed round is never reopened


def test_events_for_unknown_rounds_are_ignored(core: RouterCore) -> None:
    for name in ("complete", "failed_dkg_timeout", "stage_compute", "ds_requested"):
        assert feed(core, name) == []
    assert core.open_rounds() == {}
    assert core.completed_rounds() == []


def test_horizon_bounds_the_completed_rounds(registry: ContextRegistry) -> None:
    core = RouterCore(registry, horizon=2)
    rounds = [RoundId(f"e3:{i}") for i in range(3)]
    for rid in rounds:
        feed(core, "requested", rid)
        feed(core, "complete", rid)
    assert core.completed_rounds() == rounds[1:]
    evicted = rounds[0]
    # evicted from the horizon: treated as unknown
    assert feed(core, "failed_invalid_dkg_shares", evicted) == []
    assert feed(core, "requested", evicted) == [RoundOpened(round_id=evicted, deadline=DEADLINE)]
    # still within the horizon: reported
    assert feed(core, "requested", rounds[2]) == [
        RoundAlreadyCompleted(round_id=rounds[2], rejected_tag="round.requested")
    ]


def test_horizon_must_be_positive(registry: ContextRegistry) -> None:
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="horizon"):
            RouterCore(registry, horizon=bad)  # type: ignore[arg-type]


# --- replay and snapshots --------------------------------------------------------------

SCRIPT = [
    ("requested", RoundId("a")),
    ("requested", RoundId("b")),
    ("stage_compute", RoundId("b")),
    ("requested", RoundId("c")),
    ("failed_invalid_dkg_shares", RoundId("c")),
    ("failed_dkg_timeout", RoundId("a")),
    ("complete", RoundId("a")),
]


def run(core: RouterCore, *, replay: bool) -> list[Event]:
    out: list[Event] = []
    for name, rid in SCRIPT:
        event = stored(EVENTS[name](rid))
        if replay:
            core.replay(event)
        else:
            out.extend(core.handle(event))
    return out


def test_replay_changes_state_and_contexts_like_handle_but_returns_nothing() -> None:
    live_registry, replay_registry = ContextRegistry(), ContextRegistry()
    live, replayed = RouterCore(live_registry), RouterCore(replay_registry)
    assert run(live, replay=False)  # handle publishes things...
    run(replayed, replay=True)  # ...replay does not
    assert replayed.snapshot_state() == live.snapshot_state()
    assert replay_registry.round_ids() == live_registry.round_ids() == [RoundId("b"), RoundId("c")]


def test_snapshot_round_trips_through_msgpack_and_reopens_contexts(core: RouterCore) -> None:
    run(core, replay=False)
    snapshot = core.snapshot_state()
    assert snapshot == {
        "version": 1,
        "open": [
            {
                "round_id": "b",
                "stage": "compute",
                "deadline": DEADLINE,
                "accusation": False,
                "ending": False,
            },
            {
                "round_id": "c",
                "stage": "requested",
                "deadline": DEADLINE,
                "accusation": True,
                "ending": False,
            },
        ],
        "completed": ["a"],
    }
    decoded = msgpack.unpackb(msgpack.packb(snapshot), raw=False)
    registry = ContextRegistry()
    restored = RouterCore(registry)
    restored.restore_state(decoded)
    assert restored.snapshot_state() == snapshot
    assert registry.round_ids() == [RoundId("b"), RoundId("c")]
    # and it carries on from there
    assert feed(restored, "requested", RoundId("a")) == [
        RoundAlreadyCompleted(round_id=RoundId("a"), rejected_tag="round.requested")
    ]


def test_restore_drops_completions_beyond_the_horizon() -> None:
    core = RouterCore(ContextRegistry(), horizon=2)
    core.restore_state({"version": 1, "open": [], "completed": ["x", "y", "z"]})
    assert core.completed_rounds() == [RoundId("y"), RoundId("z")]


def _good() -> dict[str, Any]:
    entry = {
        "round_id": "b",
        "stage": "compute",
        "deadline": DEADLINE,
        "accusation": False,
        "ending": False,
    }
    return {"version": 1, "open": [entry], "completed": ["a"]}


def _with(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    state = _good()
    target: Any = state
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return state


@pytest.mark.parametrize(
    "bad",
    [
        None,
        [],
        {},
        _with(("version",), 2),
        _with(("open",), None),
        _with(("completed",), "a"),
        _with(("completed",), [7]),
        _with(("completed",), ["not a round id!"]),
        _with(("completed",), ["b"]),  # both open and completed
        _with(("open", 0), "b"),
        _with(("open", 0, "round_id"), None),
        _with(("open", 0, "stage"), "nowhere"),
        _with(("open", 0, "deadline"), "soon"),
        _with(("open", 0, "deadline"), float("nan")),
        _with(("open", 0, "deadline"), True),
        _with(("open", 0, "accusation"), 1),
        _with(("open", 0, "ending"), None),
        {"version": 1, "open": [_good()["open"][0]] * 2, "completed": []},
    ],
)
def test_malformed_snapshots_are_refused_and_change_nothing(bad: object) -> None:
    registry = ContextRegistry()
    core = RouterCore(registry)
    core.restore_state(_good())
    before = core.snapshot_state()
    with pytest.raises(CorruptRecord):
        core.restore_state(bad)
    assert core.snapshot_state() == before
