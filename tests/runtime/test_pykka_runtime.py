"""PykkaRuntime: group commit under concurrency, threads, timeouts and a clean stop."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import cast

import pykka
import pytest

from enclave_keys.clock import ManualClock
from enclave_keys.errors import ActorsStopped, LifecycleError
from enclave_keys.events import Event, RoundRequested, StoredEvent
from enclave_keys.runtime import PykkaRuntime
from enclave_keys.runtime.pykka_runtime import _BusActor, _Publish
from enclave_keys.store import LmdbStore, Store
from tests.runtime.helpers import WAIT, Answerer, FlakyStore, Recorder, Stager, requested

START = 1_700_000_000.0


@pytest.fixture
def runtimes() -> Iterator[Callable[..., PykkaRuntime]]:
    made: list[PykkaRuntime] = []

    def make(store: Store, *handlers: Recorder, timeout: float = WAIT) -> PykkaRuntime:
        runtime = PykkaRuntime(store, ManualClock(START), delivery_timeout=timeout)
        for handler in handlers:
            runtime.subscribe(handler)
        runtime.start()
        made.append(runtime)
        return runtime

    yield make
    for runtime in made:
        runtime.stop()


def run_threads(count: int, target: Callable[[int], None]) -> None:
    threads = [threading.Thread(target=target, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert not any(thread.is_alive() for thread in threads)


# --- group commit -------------------------------------------------------------------------


def test_publishes_queued_during_a_commit_go_in_one_transaction(
    runtimes: Callable[..., PykkaRuntime],
) -> None:
    """Hold the first commit; N publishers queue up; they are committed together."""
    store = FlakyStore(hold_first=True)
    first, second = Recorder("first"), Recorder("second")
    runtime = runtimes(store, first, second)
    publishers = 100
    results: dict[int, list[StoredEvent]] = {}

    def publish(n: int) -> None:
        results[n] = runtime.publish([requested(f"e3:{n}")], source=f"p{n}")

    opener = threading.Thread(target=publish, args=(0,))
    opener.start()
    assert store.held.wait(WAIT)
    others = [threading.Thread(target=publish, args=(n,)) for n in range(1, publishers)]
    for thread in others:
        thread.start()
    # every publish is counted in flight before it is sent: wait until all are queued
    assert runtime._in_flight.wait_until(lambda n: n >= publishers, WAIT)
    store.release.set()
    for thread in [opener, *others]:
        thread.join(WAIT)
    runtime.wait_idle(WAIT)

    log = list(store.read_events())
    assert [s.sequence for s in log] == list(range(1, publishers + 1))
    assert store.commits <= 3  # the held one, the queued ones (+ at most one straggler)
    assert first.sequences == second.sequences == list(range(1, publishers + 1))
    for n, [stored] in results.items():
        assert stored.source == f"p{n}"
        assert log[stored.sequence - 1] == stored


def test_many_concurrent_publishers_on_lmdb(
    tmp_path: Path, runtimes: Callable[..., PykkaRuntime]
) -> None:
    store = LmdbStore.open(tmp_path / "store")
    everything, answerer = Recorder("everything"), Answerer()
    runtime = runtimes(store, everything, answerer)
    threads, per_thread = 20, 20
    published: dict[int, list[int]] = {}
    txn_before = store.last_transaction_id

    def publish(n: int) -> None:
        published[n] = [
            runtime.publish([requested(f"e3:{n}.{i}")], source="test")[0].sequence
            for i in range(per_thread)
        ]

    run_threads(threads, publish)
    runtime.wait_idle(WAIT)

    total = 2 * threads * per_thread  # each request, and its answer
    log = list(store.read_events())
    assert [s.sequence for s in log] == list(range(1, total + 1))
    assert store.last_transaction_id - txn_before < total
    assert everything.sequences == list(range(1, total + 1))
    assert len(answerer.seen) == threads * per_thread
    assert all(seq == sorted(seq) for seq in published.values())
    store.close()


# --- threads and waiting ------------------------------------------------------------------


def test_each_core_runs_on_its_own_single_thread(runtimes: Callable[..., PykkaRuntime]) -> None:
    one, two = Recorder("one"), Recorder("two")
    runtime = runtimes(FlakyStore(), one, two)

    def publish(n: int) -> None:
        runtime.publish([requested(f"e3:{n}")], source="test")

    run_threads(4, publish)
    runtime.wait_idle(WAIT)

    assert len(one.threads) == len(two.threads) == 1
    assert one.threads != two.threads
    assert threading.get_ident() not in one.threads | two.threads


class Blocking(Recorder):
    """Blocks on its first event until released."""

    def __init__(self) -> None:
        super().__init__("blocking", (RoundRequested,))
        self.entered = threading.Event()
        self.release = threading.Event()

    def handle(self, stored: StoredEvent) -> Sequence[Event]:
        self.entered.set()
        assert self.release.wait(WAIT)
        return super().handle(stored)


def test_wait_idle_times_out_while_a_handler_is_busy(
    runtimes: Callable[..., PykkaRuntime],
) -> None:
    blocking = Blocking()
    runtime = runtimes(FlakyStore(), blocking)
    runtime.publish([requested()], source="test")
    assert blocking.entered.wait(WAIT)

    with pytest.raises(LifecycleError, match="not idle after"):
        runtime.wait_idle(0.05)
    blocking.release.set()
    runtime.wait_idle(WAIT)

    assert blocking.sequences == [1]


def test_an_external_publish_times_out_but_may_still_commit(
    runtimes: Callable[..., PykkaRuntime],
) -> None:
    store = FlakyStore(hold_first=True)
    runtime = runtimes(store)

    with pytest.raises(LifecycleError, match="not durable"):
        runtime.publish([requested()], source="test", timeout=0.05)
    store.release.set()
    runtime.wait_idle(WAIT)

    assert store.last_sequence() == 1


# --- stopping -----------------------------------------------------------------------------


def test_stop_stops_exactly_its_own_actors(runtimes: Callable[..., PykkaRuntime]) -> None:
    class Bystander(pykka.ThreadingActor):
        pass

    bystander = Bystander.start()
    runtime = runtimes(FlakyStore(), Recorder("a"), Recorder("b"), Answerer())
    refs = runtime.actor_refs
    assert len(refs) == 4
    assert all(ref.is_alive() for ref in refs)

    runtime.stop()

    assert not any(ref.is_alive() for ref in refs)
    assert set(pykka.ActorRegistry.get_all()).isdisjoint(refs)
    assert runtime._threads.join(0) == 0  # every actor thread has ended
    assert bystander.is_alive()
    bystander.stop()


def test_stop_commits_publishes_it_had_accepted(runtimes: Callable[..., PykkaRuntime]) -> None:
    store = FlakyStore(hold_first=True)
    runtime = runtimes(store, Recorder())
    results: dict[int, list[StoredEvent]] = {}

    def publish(n: int) -> None:
        results[n] = runtime.publish([requested(f"e3:{n}")], source="test")

    first = threading.Thread(target=publish, args=(0,))
    first.start()
    assert store.held.wait(WAIT)
    second = threading.Thread(target=publish, args=(1,))
    second.start()
    assert runtime._in_flight.wait_until(lambda n: n >= 2, WAIT)
    stopper = threading.Thread(target=runtime.stop)
    stopper.start()
    store.release.set()
    for thread in (first, second, stopper):
        thread.join(WAIT)

    assert sorted(s.sequence for [s] in results.values()) == [1, 2]
    assert store.last_sequence() == 2
    with pytest.raises(LifecycleError, match="stopped"):
        runtime.publish([requested()], source="test")


def test_a_bad_delivery_timeout_is_refused() -> None:
    with pytest.raises(LifecycleError):
        PykkaRuntime(FlakyStore(), ManualClock(START), delivery_timeout=0)


# --- stopped from outside -----------------------------------------------------------------


class CountedSends:
    """Wraps a runtime's sends to its bus actor, so a test can wait for the Nth."""

    def __init__(self, runtime: PykkaRuntime) -> None:
        self._send = runtime._send_to_bus
        self._sent = threading.Condition()
        self.count = 0
        runtime._send_to_bus = self  # type: ignore[method-assign]

    def __call__(self, message: _Publish) -> bool:
        sent = self._send(message)
        with self._sent:
            self.count += sent
            self._sent.notify_all()
        return sent

    def wait_for(self, count: int) -> bool:
        with self._sent:
            return self._sent.wait_for(lambda: self.count >= count, WAIT)


def test_actors_stopped_from_outside_refuse_work_at_once_and_leak_nothing() -> None:
    """The bus actor stopped from outside (as ``ActorRegistry.stop_all()`` does first)
    while a commit runs: what was accepted before the stop is committed; what queued
    behind it is refused -- an external publisher is told, a handler's staged write is
    settled as not committed (releasing what it holds) -- nothing stays in flight, and
    the runtime says so at once instead of timing out."""
    store = FlakyStore(hold_first=True, hold_at=2)
    stager = Stager()
    runtime = PykkaRuntime(store, ManualClock(START), delivery_timeout=WAIT)
    runtime.subscribe(stager)
    sends = CountedSends(runtime)
    runtime.start()
    try:
        outcomes: dict[int, object] = {}

        def publish(n: int) -> None:
            try:
                outcomes[n] = runtime.publish([requested(f"e3:{n}")], source="test")
            except LifecycleError as exc:
                outcomes[n] = exc

        publish(0)  # sequence 1, delivered: the stager blocks inside it
        assert stager.entered.wait(WAIT)
        first = threading.Thread(target=publish, args=(1,))
        first.start()
        assert store.held.wait(WAIT)  # the bus is inside its second commit
        stopping = runtime.actor_refs[0].stop(block=False)  # behind that publish
        stager.release.set()  # its output (a staged write) lands behind the stop
        assert sends.wait_for(3)
        second = threading.Thread(target=publish, args=(2,))
        second.start()  # so does this one
        assert sends.wait_for(4)
        store.release.set()
        for thread in (first, second):
            thread.join(WAIT)
        assert stopping.get(timeout=WAIT) is True

        assert [s.sequence for s in cast(list[StoredEvent], outcomes[1])] == [2]
        assert isinstance(outcomes[2], ActorsStopped)
        assert store.last_sequence() == 2  # the stager's output was never committed
        assert runtime._in_flight.wait_until(lambda n: n == 0, WAIT)
        # every write the stager made (one for event 1; one for event 2 if it was
        # delivered before the stop closed the gate) was settled once, as not committed
        assert stager.sequences[0] == 1
        assert [write.settled for write in stager.writes] == [[False]] * len(stager.sequences)
        with pytest.raises(ActorsStopped, match="'bus' was stopped from outside"):
            runtime.wait_idle(WAIT)
        with pytest.raises(ActorsStopped):
            runtime.publish([requested("e3:3")], source="test")
        with pytest.raises(ActorsStopped):
            runtime.tick()
    finally:
        store.release.set()
        stager.release.set()
        runtime.stop()  # stops and joins what is left, without error
    assert runtime._threads.join(0) == 0


def test_one_handler_actor_stopped_from_outside_breaks_the_runtime(
    runtimes: Callable[..., PykkaRuntime],
) -> None:
    recorder = Recorder()
    runtime = runtimes(FlakyStore(), recorder, Recorder("other"))
    runtime.publish([requested()], source="test")
    runtime.wait_idle(WAIT)
    handler_ref = runtime.actor_refs[1]

    handler_ref.stop(block=True, timeout=WAIT)

    with pytest.raises(ActorsStopped, match="'recorder'"):
        runtime.wait_idle(WAIT)
    with pytest.raises(ActorsStopped):
        runtime.publish([requested("e3:2")], source="test")
    assert recorder.sequences == [1]
    runtime.stop()
    assert not any(ref.is_alive() for ref in runtime.actor_refs)


def test_the_runtimes_own_stop_is_not_a_stop_from_outside(
    runtimes: Callable[..., PykkaRuntime],
) -> None:
    runtime = runtimes(FlakyStore(), Recorder())
    runtime.publish([requested()], source="test")
    runtime.wait_idle(WAIT)

    runtime.stop()

    with pytest.raises(LifecycleError, match="the runtime is stopped") as raised:
        runtime.wait_idle(WAIT)
    assert not isinstance(raised.value, ActorsStopped)


def test_a_start_that_fails_part_way_stops_what_it_started(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The bus actor cannot start after the handler actors have: ``start`` raises, having
    stopped and joined those actors (their stop hooks take the runtime's state lock, so it
    must not be held while they stop)."""

    def refuse(*args: object, **kwargs: object) -> object:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(_BusActor, "start", refuse)
    runtime = PykkaRuntime(FlakyStore(), ManualClock(START), delivery_timeout=WAIT)
    runtime.subscribe(Recorder("a"))
    runtime.subscribe(Recorder("b"))

    with pytest.raises(RuntimeError, match="new thread"):
        runtime.start()

    assert len(runtime.actor_refs) == 2
    assert not any(ref.is_alive() for ref in runtime.actor_refs)
    assert runtime._threads.join(0) == 0
    with pytest.raises(LifecycleError, match="stopped"):
        runtime.publish([requested()], source="test")
