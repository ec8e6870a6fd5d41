"""DeterministicRuntime: same seed, same bytes; bounded dispatch; generations as groups."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from enclave_keys.clock import ManualClock
from enclave_keys.errors import LifecycleError
from enclave_keys.events import Event, HandlerFailed, RoundStageChanged, StoredEvent
from enclave_keys.runtime import DeterministicRuntime
from enclave_keys.store import MemoryStore
from tests.runtime.helpers import (
    Answerer,
    Escalator,
    Exploder,
    FlakyStore,
    Recorder,
    Runaway,
    Ticker,
    requested,
)

START = 1_700_000_000.0


def scenario(seed: int, *, shuffle: bool) -> list[bytes]:
    """A little of everything; returns the log exactly as stored (encoded bytes)."""
    store = MemoryStore()
    clock = ManualClock(START)
    runtime = DeterministicRuntime(store, clock, seed, shuffle=shuffle)
    for handler in (
        Answerer(),
        Escalator(),
        Exploder(rounds=frozenset({"e3:2"})),
        Recorder("everything"),
        Ticker("e3:0"),
    ):
        runtime.subscribe(handler)
    runtime.start()
    for n in range(4):
        runtime.publish([requested(f"e3:{n}")], source="test")
        clock.advance(1.5)
    runtime.tick()
    runtime.wait_idle(1.0)
    runtime.stop()
    return list(store.backing.events)


def test_the_same_seed_gives_the_same_log_bytes() -> None:
    assert scenario(42, shuffle=True) == scenario(42, shuffle=True)
    assert scenario(42, shuffle=False) == scenario(42, shuffle=False)


def test_another_seed_changes_the_ids_but_not_the_story() -> None:
    def story(seed: int) -> list[tuple[int, str, str]]:
        store = MemoryStore()
        runtime = DeterministicRuntime(store, ManualClock(START), seed)
        runtime.subscribe(Answerer())
        runtime.subscribe(Escalator())
        runtime.start()
        runtime.publish([requested("e3:1"), requested("e3:2")], source="test")
        runtime.stop()
        log = list(store.read_events())
        ids.append({stored.event_id for stored in log})
        return [(stored.sequence, stored.tag, stored.source) for stored in log]

    ids: list[set[object]] = []
    assert story(1) == story(2)
    assert ids[0].isdisjoint(ids[1])


def test_shuffle_varies_the_subscriber_order_per_event_but_not_the_log_order() -> None:
    calls: list[str] = []

    class Noting(Recorder):
        def handle(self, stored: StoredEvent) -> Sequence[Event]:
            calls.append(self.name)
            return super().handle(stored)

    def first_called(seed: int) -> tuple[str, ...]:
        calls.clear()
        runtime = DeterministicRuntime(MemoryStore(), ManualClock(START), seed, shuffle=True)
        noters = [Noting(f"n{i}") for i in range(4)]
        for noter in noters:
            runtime.subscribe(noter)
        runtime.start()
        runtime.publish([requested(f"e3:{n}") for n in range(6)], source="test")
        runtime.stop()
        assert all(noter.sequences == list(range(1, 7)) for noter in noters)
        return tuple(calls[::4])  # who went first, per event

    orders = {first_called(seed) for seed in range(5)}
    assert len(orders) > 1
    assert first_called(3) == first_called(3)


def test_a_runaway_handler_is_bounded() -> None:
    store = MemoryStore()
    runtime = DeterministicRuntime(store, ManualClock(START), 0, max_steps=50)
    runtime.subscribe(Runaway())
    runtime.start()

    with pytest.raises(LifecycleError, match=r"not idle after 50 deliveries.*'runaway'"):
        runtime.publish([requested()], source="test")

    assert 50 <= store.last_sequence() <= 52
    assert runtime.pending > 0
    with pytest.raises(LifecycleError, match="not idle after 10"):
        runtime.run_until_idle(max_steps=10)
    runtime.stop()
    assert runtime.pending == 0


def test_each_generation_is_one_commit() -> None:
    store = FlakyStore()
    runtime = DeterministicRuntime(store, ManualClock(START), 0)
    for name in ("a1", "a2", "a3"):
        runtime.subscribe(Answerer(name))
    runtime.subscribe(Escalator())
    runtime.start()

    runtime.publish([requested()], source="test")

    # the request; three answers; three escalations
    assert store.last_sequence() == 7
    assert store.commits == 3


def test_a_handler_publishing_directly_is_refused_and_isolated() -> None:
    store = MemoryStore()
    runtime = DeterministicRuntime(store, ManualClock(START), 0)

    class Meddler(Recorder):
        def handle(self, stored: StoredEvent) -> Sequence[Event]:
            super().handle(stored)
            runtime.publish([requested("e3:other")], source="meddler")
            return []

    runtime.subscribe(Meddler("meddler", (type(requested()),)))
    runtime.start()
    runtime.publish([requested()], source="test")

    failed = [s.payload for s in store.read_events()][1]
    assert isinstance(failed, HandlerFailed)
    assert failed.error_type == "enclave_keys.errors.LifecycleError"
    assert store.last_sequence() == 2


def test_a_handler_stopping_the_runtime_is_refused_and_isolated() -> None:
    store = MemoryStore()
    runtime = DeterministicRuntime(store, ManualClock(START), 0)

    class Stopper(Recorder):
        def handle(self, stored: StoredEvent) -> Sequence[Event]:
            super().handle(stored)
            runtime.stop()
            return []

    runtime.subscribe(Stopper("stopper", (type(requested()),)))
    runtime.start()
    runtime.publish([requested()], source="test")

    failed = [s.payload for s in store.read_events()][1]
    assert isinstance(failed, HandlerFailed)
    assert failed.error_type == "enclave_keys.errors.LifecycleError"
    runtime.publish([requested("e3:after")], source="test")  # still running
    assert store.last_sequence() == 4
    runtime.stop()


def test_tick_reads_the_clock_once_and_commits_one_group() -> None:
    store = FlakyStore()
    clock = ManualClock(START)
    runtime = DeterministicRuntime(store, clock, 0)
    tickers = [Ticker("e3:1"), Ticker("e3:2")]
    tickers[1].name = "ticker2"
    for ticker in tickers:
        runtime.subscribe(ticker)
    stages = Recorder("stages", (RoundStageChanged,))
    runtime.subscribe(stages)
    runtime.start()
    clock.advance(10)

    runtime.tick()

    assert [t.ticks for t in tickers] == [[START + 10], [START + 10]]
    assert store.commits == 1
    assert [s.source for s in store.read_events()] == ["ticker", "ticker2"]


def test_bad_max_steps_is_refused() -> None:
    with pytest.raises(LifecycleError):
        DeterministicRuntime(MemoryStore(), ManualClock(START), 0, max_steps=0)
