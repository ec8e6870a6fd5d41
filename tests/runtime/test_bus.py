"""EventBus: sequencing, stamping, group commit, failures and the subscriber registry."""

from __future__ import annotations

import random

import pytest

from enclave_keys.bus import EventBus, PublishRequest, qualified_type_name
from enclave_keys.clock import ManualClock
from enclave_keys.errors import (
    InvalidIdentifier,
    LifecycleError,
    MalformedEvent,
    SequenceConflict,
    StoreError,
)
from enclave_keys.events import (
    HandlerFailed,
    RoundRequested,
    RoundStage,
    RoundStageChanged,
    StoredEvent,
)
from enclave_keys.ids import EventId, RoundId
from enclave_keys.store import MemoryStore, WriteBatch
from tests.runtime.helpers import Answerer, FlakyStore, Recorder, Ticker, requested, stage

START = 1_700_000_000.0


def started_bus(store: MemoryStore | None = None, seed: int | None = 1) -> EventBus:
    rng = None if seed is None else random.Random(seed)
    bus = EventBus(MemoryStore() if store is None else store, ManualClock(START), rng=rng)
    bus.start()
    return bus


def external(*events: RoundRequested, source: str = "test") -> PublishRequest:
    return PublishRequest.of(events, source=source)


# --- stamping -----------------------------------------------------------------------------


def test_commit_stamps_sequences_ids_time_source_and_round() -> None:
    bus = started_bus()
    [outcome] = bus.commit([external(requested("e3:1"), requested("e3:2"))])

    first, second = outcome.events
    assert outcome.ok
    assert (first.sequence, second.sequence) == (1, 2)
    assert first.timestamp == second.timestamp == START
    assert first.source == "test"
    assert str(first.round_id) == "e3:1"
    assert first.causation_id is None
    assert first.correlation_id is None
    assert first.event_id != second.event_id
    assert list(bus.store.read_events()) == [first, second]
    assert bus.next_sequence == 3


def test_a_caused_publish_carries_causation_and_correlation() -> None:
    bus = started_bus()
    [origin] = bus.commit([external(requested())])[0].events
    answer_request = PublishRequest(
        (stage("e3:1", RoundStage.COMMITTEE_FORMATION),), "answerer", origin
    )
    [answer] = bus.commit([answer_request])[0].events
    follow_request = PublishRequest((stage("e3:1", RoundStage.COMPUTE),), "next", answer)
    [follow] = bus.commit([follow_request])[0].events

    assert answer.causation_id == origin.event_id
    assert answer.correlation_id == origin.event_id
    assert follow.causation_id == answer.event_id
    assert follow.correlation_id == origin.event_id


def test_node_level_events_have_no_round() -> None:
    bus = started_bus()
    failed = HandlerFailed(subscriber="x", failed_sequence=1, error_type="ValueError")
    [stored] = bus.commit([PublishRequest((failed,), "runtime")])[0].events
    assert stored.round_id is None


def test_event_ids_follow_the_seeded_rng_or_the_os() -> None:
    def ids(seed: int | None) -> list[EventId]:
        outcome = started_bus(seed=seed).commit([external(requested(), requested())])[0]
        return [stored.event_id for stored in outcome.events]

    assert ids(1) == ids(1)
    assert ids(1) != ids(2)
    assert ids(None) != ids(None)


def test_start_recovers_the_next_sequence_from_the_store() -> None:
    store = MemoryStore()
    started_bus(store).commit([external(requested(), requested(), requested())])

    bus = started_bus(store)

    assert bus.next_sequence == 4
    assert bus.commit([external(requested())])[0].events[0].sequence == 4


# --- group commit ---------------------------------------------------------------------------


def test_a_group_is_one_write() -> None:
    store = FlakyStore()
    bus = started_bus(store)

    outcomes = bus.commit([external(requested(f"e3:{n}")) for n in range(10)])

    assert store.commits == 1
    assert [o.events[0].sequence for o in outcomes] == list(range(1, 11))


def test_an_empty_group_writes_nothing() -> None:
    store = FlakyStore()
    bus = started_bus(store)

    assert bus.commit([]) == []
    [outcome] = bus.commit([PublishRequest((), "test")])

    assert outcome.ok
    assert outcome.events == ()
    assert store.attempts == 0


def test_a_malformed_request_is_rejected_alone_without_a_gap() -> None:
    bus = started_bus()
    good, bad, also_good = bus.commit(
        [
            external(requested("e3:1")),
            external(requested("e3:2"), source="x" * 65),
            external(requested("e3:3")),
        ]
    )

    assert isinstance(bad.error, MalformedEvent)
    assert bad.events == ()
    assert good.events[0].sequence == 1
    assert also_good.events[0].sequence == 2
    assert [s.sequence for s in bus.store.read_events()] == [1, 2]


def test_a_failed_write_fails_the_whole_group_and_writes_nothing() -> None:
    store = FlakyStore()
    bus = started_bus(store)
    store.fail_attempt(1)

    outcomes = bus.commit([external(requested("e3:1")), external(requested("e3:2"))])

    assert all(isinstance(o.error, StoreError) and o.events == () for o in outcomes)
    assert store.last_sequence() == 0
    assert bus.next_sequence == 1
    assert bus.commit([external(requested())])[0].events[0].sequence == 1


def test_the_bus_resynchronises_after_a_sequence_conflict() -> None:
    store = MemoryStore()
    bus = started_bus(store)
    intruder = started_bus(store)
    intruder.commit([external(requested("e3:x"))])

    [conflicted] = bus.commit([external(requested("e3:1"))])
    [retried] = bus.commit([external(requested("e3:1"))])

    assert isinstance(conflicted.error, SequenceConflict)
    assert retried.events[0].sequence == 2


def test_commit_before_start_is_refused() -> None:
    bus = EventBus(MemoryStore(), ManualClock(START))
    with pytest.raises(LifecycleError):
        bus.commit([external(requested())])
    bus.start()
    with pytest.raises(LifecycleError):
        bus.start()


# --- requests -------------------------------------------------------------------------------


@pytest.mark.parametrize("events", [requested(), "abc", [requested(), 3], None])
def test_a_request_holds_a_sequence_of_events(events: object) -> None:
    with pytest.raises(MalformedEvent):
        PublishRequest.of(events, source="test")  # type: ignore[arg-type]


# --- registry -------------------------------------------------------------------------------


def test_routing_is_by_exact_type_or_all_in_registration_order() -> None:
    bus = EventBus(MemoryStore(), ManualClock(START))
    everything = bus.subscribe(Recorder("everything"))
    answerer = bus.subscribe(Answerer())
    stages = bus.subscribe(Recorder("stages", (RoundStageChanged,)))
    bus.start()

    def route(event: RoundRequested | RoundStageChanged) -> tuple[str, ...]:
        stored = StoredEvent(
            sequence=1, event_id=EventId(bytes(16)), timestamp=START, source="t", payload=event
        )
        return tuple(s.name for s in bus.subscribers_for(stored))

    assert route(requested()) == ("everything", "answerer")
    assert route(stage("e3:1", RoundStage.COMPUTE)) == ("everything", "stages")
    assert bus.subscribers == (everything, answerer, stages)


def test_ticking_handlers_are_recognised() -> None:
    bus = EventBus(MemoryStore(), ManualClock(START))
    bus.subscribe(Recorder())
    ticker = bus.subscribe(Ticker())
    assert bus.ticking() == (ticker,)


def test_registry_refuses_bad_handlers() -> None:
    bus = EventBus(MemoryStore(), ManualClock(START))
    bus.subscribe(Recorder("one"))
    with pytest.raises(LifecycleError, match="already subscribed"):
        bus.subscribe(Recorder("one"))
    with pytest.raises(InvalidIdentifier):
        bus.subscribe(Recorder(""))
    with pytest.raises(LifecycleError, match="not a Handler"):
        bus.subscribe(object())  # type: ignore[arg-type]
    with pytest.raises(LifecycleError, match="not an event type"):
        bus.subscribe(Recorder("sub", (StoredEvent,)))  # type: ignore[arg-type]
    bus.start()
    with pytest.raises(LifecycleError):
        bus.subscribe(Recorder("late"))


# --- error type names -----------------------------------------------------------------------


class _Outer:
    class Inner(Exception):
        pass


def test_qualified_type_names_are_valid_and_name_only_the_type() -> None:
    class Local(Exception):
        pass

    assert qualified_type_name(ValueError("secret")) == "ValueError"
    assert qualified_type_name(StoreError("x")) == "enclave_keys.errors.StoreError"
    assert qualified_type_name(_Outer.Inner()) == "tests.runtime.test_bus._Outer.Inner"
    assert qualified_type_name(Local()) == (
        "tests.runtime.test_bus.test_qualified_type_names_are_valid_and_name_only_the_type.Local"
    )
    long = type("L" * 300, (Exception,), {})
    name = qualified_type_name(long())
    assert name == "L" * 256
    HandlerFailed(subscriber="x", failed_sequence=1, error_type=name)  # a valid field value


# --- staged writes ----------------------------------------------------------------------


class KeyWrite:
    """A staged write that puts a key (or raises in ``apply``) and records its settling."""

    def __init__(self, round_id: str, *, broken: bool = False) -> None:
        self.round_id = RoundId(round_id)
        self.broken = broken
        self.settled: list[bool] = []

    def apply(self, batch: WriteBatch) -> None:
        if self.broken:
            raise StoreError("cannot stage this write")
        batch.put_key(self.round_id, b"wrapped")

    def settle(self, committed: bool) -> None:
        self.settled.append(committed)


def with_writes(event: RoundRequested, *writes: KeyWrite) -> PublishRequest:
    return PublishRequest((event,), "test", None, writes)


def test_staged_writes_commit_with_their_events_and_are_settled_once() -> None:
    bus = started_bus()
    first, second = KeyWrite("e3:1"), KeyWrite("e3:2")
    outcomes = bus.commit([with_writes(requested("e3:1"), first, second)])
    assert outcomes[0].ok
    assert first.settled == second.settled == [True]
    assert {rid.value for rid, _ in bus.store.list_keys()} == {"e3:1", "e3:2"}


def test_a_request_whose_write_cannot_be_staged_is_rejected_alone_with_its_events() -> None:
    bus = started_bus()
    good, broken, also_good = KeyWrite("e3:1"), KeyWrite("e3:2", broken=True), KeyWrite("e3:3")
    sibling = KeyWrite("e3:4")  # staged before the broken one, in the same request
    outcomes = bus.commit(
        [
            with_writes(requested("e3:1"), good),
            with_writes(requested("e3:2"), sibling, broken),
            with_writes(requested("e3:3"), also_good),
        ]
    )
    assert [o.ok for o in outcomes] == [True, False, True]
    assert isinstance(outcomes[1].error, StoreError)
    assert [s.round_id.value for s in bus.store.read_events() if s.round_id] == ["e3:1", "e3:3"]
    assert {rid.value for rid, _ in bus.store.list_keys()} == {"e3:1", "e3:3"}
    assert (good.settled, sibling.settled, broken.settled, also_good.settled) == (
        [True],
        [False],
        [False],
        [True],
    )


def test_a_failed_group_settles_every_write_as_not_committed() -> None:
    store = FlakyStore()
    bus = started_bus(store)
    store.fail_attempt(1)
    writes = [KeyWrite("e3:1"), KeyWrite("e3:2")]
    outcomes = bus.commit([with_writes(requested(w.round_id.value), w) for w in writes])
    assert not any(o.ok for o in outcomes)
    assert [w.settled for w in writes] == [[False], [False]]
    assert store.key_count() == 0


class NanClock(ManualClock):
    """A broken clock: the group fails before any request is reached."""

    def now(self) -> float:
        return float("nan")


def test_a_group_that_fails_before_reaching_its_requests_settles_them_all() -> None:
    bus = EventBus(MemoryStore(), NanClock(START))
    bus.start()
    writes = [KeyWrite("e3:1"), KeyWrite("e3:2")]
    outcomes = bus.commit([with_writes(requested(w.round_id.value), w) for w in writes])
    assert not any(o.ok for o in outcomes)
    assert [w.settled for w in writes] == [[False], [False]]  # none left holding a lease


class WatchingWrite(KeyWrite):
    """Records how many events the log held when it was settled."""

    def __init__(self, round_id: str, store: MemoryStore, *, broken: bool = False) -> None:
        super().__init__(round_id, broken=broken)
        self.store = store
        self.log_at_settle: list[int] = []

    def settle(self, committed: bool) -> None:
        super().settle(committed)
        self.log_at_settle.append(self.store.last_sequence())


def test_a_rejected_requests_writes_are_settled_after_the_group_commits() -> None:
    # A rejected delete retries on its own when settled: inside the batch, that retry
    # would commit before the group and the group's put of the same key would win.
    store = MemoryStore()
    bus = started_bus(store)
    good = WatchingWrite("e3:1", store)
    broken = WatchingWrite("e3:2", store, broken=True)
    bus.commit([with_writes(requested("e3:1"), good), with_writes(requested("e3:2"), broken)])
    assert broken.settled == [False]
    assert broken.log_at_settle == [1]  # the group's event was already committed
