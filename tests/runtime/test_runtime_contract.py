"""One contract, both runtimes: DeterministicRuntime and PykkaRuntime, on memory and LMDB."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest
from structlog.testing import capture_logs

from enclave_keys.clock import ManualClock
from enclave_keys.errors import InvalidIdentifier, LifecycleError, MalformedEvent, StoreError
from enclave_keys.events import (
    HandlerFailed,
    RoundFailed,
    RoundRequested,
    RoundStage,
    RoundStageChanged,
    StoredEvent,
)
from enclave_keys.handler import Handler
from enclave_keys.runtime import RUNTIME_SOURCE, DeterministicRuntime, PykkaRuntime, Runtime
from enclave_keys.store import LmdbStore, MemoryStore, Store
from tests.runtime.helpers import (
    SECRET_MESSAGE,
    WAIT,
    Answerer,
    BadReturner,
    Escalator,
    Exploder,
    FlakyStore,
    Recorder,
    Ticker,
    requested,
    stage,
)

START = 1_700_000_000.0


class Make(Protocol):
    def __call__(
        self, *handlers: Handler, store: Store | None = None, start: bool = True
    ) -> Runtime: ...


class Env:
    """What a contract test gets: a runtime factory, the default store and the clock."""

    def __init__(self, kind: str, backend: str, tmp_path: Path) -> None:
        self.kind = kind
        self.backend = backend
        self.clock = ManualClock(START)
        self._path = tmp_path / "store"
        self.store: Store = self.open_store()
        self._runtimes: list[Runtime] = []

    def open_store(self) -> Store:
        if self.backend == "memory":
            return MemoryStore()
        return LmdbStore.open(self._path)

    def make(self, *handlers: Handler, store: Store | None = None, start: bool = True) -> Runtime:
        store = self.store if store is None else store
        runtime: Runtime
        if self.kind == "deterministic":
            runtime = DeterministicRuntime(store, self.clock, seed=7)
        else:
            runtime = PykkaRuntime(store, self.clock, delivery_timeout=WAIT)
        self._runtimes.append(runtime)
        for handler in handlers:
            runtime.subscribe(handler)
        if start:
            runtime.start()
        return runtime

    def close(self) -> None:
        for runtime in self._runtimes:
            runtime.stop()
        self.store.close()


@pytest.fixture(
    params=[
        ("deterministic", "memory"),
        ("deterministic", "lmdb"),
        ("pykka", "memory"),
        ("pykka", "lmdb"),
    ],
    ids=lambda p: "-".join(p),
)
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Env]:
    kind, backend = request.param
    made = Env(kind, backend, tmp_path)
    yield made
    made.close()


@pytest.fixture
def make(env: Env) -> Make:
    return env.make


def log_of(runtime: Runtime) -> list[StoredEvent]:
    return list(runtime.store.read_events())


def payloads(runtime: Runtime) -> list[Any]:
    return [stored.payload for stored in log_of(runtime)]


# --- publishing ---------------------------------------------------------------------------


def test_publish_returns_the_durable_events_in_order(env: Env, make: Make) -> None:
    runtime = make()
    events = [requested("e3:1"), requested("e3:2")]

    stored = runtime.publish(events, source="test")

    assert [s.sequence for s in stored] == [1, 2]
    assert [s.payload for s in stored] == events
    assert all(s.source == "test" and s.timestamp == START for s in stored)
    assert all(s.causation_id is None and s.correlation_id is None for s in stored)
    assert [str(s.round_id) for s in stored] == ["e3:1", "e3:2"]
    assert stored[0].event_id != stored[1].event_id
    assert log_of(runtime) == stored


def test_an_empty_publish_writes_nothing(make: Make) -> None:
    runtime = make()
    assert runtime.publish([], source="test") == []
    assert runtime.store.last_sequence() == 0


@pytest.mark.parametrize(
    ("events", "source"),
    [
        ([requested()], "x" * 65),
        ([requested()], ""),
        (["not an event"], "test"),
        (requested(), "test"),
    ],
    ids=["source-too-long", "empty-source", "not-an-event", "not-a-sequence"],
)
def test_a_malformed_publish_is_rejected_and_writes_nothing(
    make: Make, events: Any, source: str
) -> None:
    runtime = make(Recorder())
    with pytest.raises(MalformedEvent):
        runtime.publish(events, source=source)
    runtime.wait_idle(WAIT)
    assert runtime.store.last_sequence() == 0
    assert runtime.publish([requested()], source="test")[0].sequence == 1


def test_sequences_continue_an_existing_log(env: Env) -> None:
    first = env.make()
    first.publish([requested("e3:1"), requested("e3:2")], source="test")
    first.stop()
    if env.backend == "lmdb":
        env.store.close()
        env.store = env.open_store()

    second = env.make()
    stored = second.publish([requested("e3:3")], source="test")

    assert stored[0].sequence == 3
    assert [s.sequence for s in log_of(second)] == [1, 2, 3]


# --- delivery -----------------------------------------------------------------------------


def test_a_handler_answer_is_published_with_its_cause(make: Make) -> None:
    answerer = Answerer()
    runtime = make(answerer)

    [request] = runtime.publish([requested("e3:1")], source="test")
    runtime.wait_idle(WAIT)

    log = log_of(runtime)
    assert [s.payload for s in log] == [
        request.payload,
        stage("e3:1", RoundStage.COMMITTEE_FORMATION),
    ]
    answer = log[1]
    assert answer.source == "answerer"
    assert answer.causation_id == request.event_id
    assert answer.correlation_id == request.event_id
    assert str(answer.round_id) == "e3:1"
    assert answerer.sequences == [1]


def test_the_correlation_id_follows_the_whole_chain(make: Make) -> None:
    runtime = make(Answerer(), Escalator())

    runtime.publish([requested("e3:1")], source="test")
    runtime.wait_idle(WAIT)

    origin, first, second = log_of(runtime)
    assert second.payload == stage("e3:1", RoundStage.KEY_GENERATION)
    assert second.source == "escalator"
    assert second.causation_id == first.event_id
    assert second.correlation_id == origin.event_id == first.correlation_id


def test_subscriptions_match_the_exact_event_type(make: Make) -> None:
    stages = Recorder("stages", (RoundStageChanged,))
    nothing = Recorder("nothing", ())
    runtime = make(Answerer(), stages, nothing)

    runtime.publish([requested("e3:1"), requested("e3:2")], source="test")
    runtime.wait_idle(WAIT)

    assert all(isinstance(s.payload, RoundStageChanged) for s in stages.seen)
    assert len(stages.seen) == 2
    assert nothing.seen == []


def test_every_subscriber_sees_each_event_once_in_log_order(make: Make) -> None:
    everything = Recorder("everything")
    stages = Recorder("stages", (RoundStageChanged,))
    runtime = make(Answerer(), Escalator(), everything, stages)

    for n in range(5):
        runtime.publish([requested(f"e3:{n}")], source="test")
    runtime.publish([requested("e3:a"), requested("e3:b")], source="test")
    runtime.wait_idle(WAIT)

    log = log_of(runtime)
    assert len(log) == 7 * 3
    assert everything.sequences == [s.sequence for s in log]
    expected_stages = [s.sequence for s in log if isinstance(s.payload, RoundStageChanged)]
    assert stages.sequences == expected_stages


# --- failure isolation ----------------------------------------------------------------------


def test_a_raising_handler_is_isolated_and_reported(make: Make) -> None:
    exploder = Exploder(rounds=frozenset({"e3:bad"}))
    answerer = Answerer()
    everything = Recorder("everything")
    runtime = make(exploder, answerer, everything)

    with capture_logs() as logs:
        [bad] = runtime.publish([requested("e3:bad")], source="test")
        runtime.wait_idle(WAIT)
        runtime.publish([requested("e3:good")], source="test")
        runtime.wait_idle(WAIT)

    log = log_of(runtime)
    [failed] = [s for s in log if isinstance(s.payload, HandlerFailed)]
    assert failed.payload == HandlerFailed(
        subscriber="exploder", failed_sequence=bad.sequence, error_type="tests.runtime.helpers.Boom"
    )
    assert failed.source == RUNTIME_SOURCE
    assert failed.causation_id == bad.event_id
    # the failing handler keeps receiving; the others were unaffected
    assert [str(s.round_id) for s in exploder.seen] == ["e3:bad", "e3:good"]
    assert len(answerer.seen) == 2
    assert everything.sequences == [s.sequence for s in log]
    [entry] = [e for e in logs if e["event"] == "handler_failed"]
    assert entry["handler"] == "exploder"
    assert entry["sequence"] == bad.sequence
    assert entry["error_type"] == "tests.runtime.helpers.Boom"
    assert SECRET_MESSAGE not in repr(logs)


def test_a_failure_handling_handler_failed_does_not_cascade(make: Make) -> None:
    always = Exploder("always", subscriptions=None)
    runtime = make(always)

    runtime.publish([requested()], source="test")
    runtime.wait_idle(WAIT)

    assert [type(p) for p in payloads(runtime)] == [RoundRequested, HandlerFailed]
    assert always.sequences == [1, 2]


def test_a_handler_returning_non_events_fails_with_type_error(make: Make) -> None:
    runtime = make(BadReturner())

    runtime.publish([requested()], source="test")
    runtime.wait_idle(WAIT)

    failed = payloads(runtime)[1]
    assert isinstance(failed, HandlerFailed)
    assert failed.error_type == "TypeError"
    assert failed.subscriber == "bad_returner"


# --- ticking --------------------------------------------------------------------------------


def test_tick_publishes_what_ticking_handlers_return(env: Env, make: Make) -> None:
    ticker = Ticker("e3:1")
    everything = Recorder("everything")
    runtime = make(ticker, everything)
    env.clock.advance(30)

    runtime.tick()
    runtime.wait_idle(WAIT)

    [stored] = log_of(runtime)
    assert isinstance(stored.payload, RoundFailed)
    assert stored.source == "ticker"
    assert stored.causation_id is None
    assert stored.correlation_id is None
    assert ticker.ticks == [START + 30]
    assert everything.sequences == [1]


def test_a_raising_tick_is_isolated(make: Make) -> None:
    ticker = Ticker(explode=True)
    runtime = make(ticker, Answerer())

    with capture_logs() as logs:
        runtime.tick()
        runtime.wait_idle(WAIT)
    runtime.publish([requested()], source="test")
    runtime.wait_idle(WAIT)

    assert len(ticker.ticks) == 1
    assert [type(p) for p in payloads(runtime)] == [RoundRequested, RoundStageChanged]
    [entry] = [e for e in logs if e["event"] == "handler_tick_failed"]
    assert entry["handler"] == "ticker"
    assert SECRET_MESSAGE not in repr(logs)


# --- store failures -------------------------------------------------------------------------


def test_an_external_publish_raises_when_the_commit_fails(env: Env) -> None:
    store = FlakyStore()
    runtime = env.make(Answerer(), store=store)
    store.fail_attempt(1)

    with pytest.raises(StoreError, match="injected"):
        runtime.publish([requested()], source="test")
    runtime.wait_idle(WAIT)

    assert store.last_sequence() == 0
    assert runtime.publish([requested()], source="test")[0].sequence == 1
    runtime.wait_idle(WAIT)
    assert [s.sequence for s in log_of(runtime)] == [1, 2]


def test_a_failed_handler_publish_is_surfaced_by_wait_idle(env: Env) -> None:
    store = FlakyStore()
    runtime = env.make(Answerer(), store=store)
    store.fail_attempt(2)  # the answer's commit

    with capture_logs() as logs:
        runtime.publish([requested("e3:1")], source="test")
        with pytest.raises(StoreError, match="could not be committed"):
            runtime.wait_idle(WAIT)
    runtime.wait_idle(WAIT)  # reported once

    [failure] = runtime.failures
    assert failure.source == "answerer"
    assert failure.cause_sequence == 1
    assert failure.event_count == 1
    assert failure.error_type == "enclave_keys.errors.StoreError"
    assert [e["event"] for e in logs if e["log_level"] == "error"].count("publish_failed") == 1
    runtime.publish([requested("e3:2")], source="test")
    runtime.wait_idle(WAIT)
    assert [s.sequence for s in log_of(runtime)] == [1, 2, 3]


# --- lifecycle ------------------------------------------------------------------------------


def test_publishing_before_start_is_refused(make: Make) -> None:
    runtime = make(start=False)
    for call in (
        lambda: runtime.publish([requested()], source="test"),
        runtime.tick,
        lambda: runtime.wait_idle(WAIT),
    ):
        with pytest.raises(LifecycleError, match="not started"):
            call()


def test_subscribing_after_start_is_refused(make: Make) -> None:
    runtime = make()
    with pytest.raises(LifecycleError):
        runtime.subscribe(Recorder())


@pytest.mark.parametrize(
    ("handlers", "error"),
    [
        ((Recorder("twin"), Recorder("twin")), LifecycleError),
        ((Recorder("x" * 65),), InvalidIdentifier),
        ((Recorder("bad\nname"),), InvalidIdentifier),
        ((Recorder("wrong", (int,)),), LifecycleError),  # type: ignore[arg-type]
    ],
    ids=["duplicate-name", "long-name", "unprintable-name", "not-an-event-type"],
)
def test_bad_subscriptions_are_refused(
    make: Make, handlers: tuple[Handler, ...], error: type[Exception]
) -> None:
    with pytest.raises(error):
        make(*handlers, start=False)


def test_stop_is_idempotent_and_final(make: Make) -> None:
    runtime = make(Answerer())
    runtime.publish([requested()], source="test")
    runtime.wait_idle(WAIT)

    runtime.stop()
    runtime.stop()

    calls: list[Callable[[], object]] = [
        lambda: runtime.publish([requested()], source="test"),
        runtime.tick,
        lambda: runtime.wait_idle(WAIT),
        runtime.start,
    ]
    for call in calls:
        with pytest.raises(LifecycleError):
            call()
    assert runtime.store.last_sequence() == 2


def test_a_runtime_never_started_can_be_stopped(make: Make) -> None:
    runtime = make(Recorder(), start=False)
    runtime.stop()
    runtime.stop()
