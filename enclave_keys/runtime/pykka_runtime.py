"""The threaded runtime of a real node: a Pykka bus actor plus one actor per handler.

* The **bus actor** owns the :class:`~enclave_keys.bus.EventBus`: it alone sequences and
  appends. After each group commit it sends every subscriber's actor *one* message with
  the group's events for it, in log order.
* A **handler actor** is a thin shell around one core: for each event of a delivery,
  ``handle`` (failure-isolated, see :mod:`enclave_keys.runtime.shell`), then tell the bus
  to publish the result with that cause — at once, not at the end of the delivery. A core
  only ever runs on its own actor's thread, one event at a time, in log order.

**Group commit.** A publish message only *enqueues* on the bus; the first one queued sends
the bus a flush message, which lands behind everything already in its inbox. The flush
commits *everything* queued by then in one ``store.write()`` (one transaction, one
fsync). While a commit is running, publishes pile up in the inbox and go together in the
next one: the busier the bus, the bigger the groups.

**Idle tracking.** An in-flight counter (under a ``threading.Condition``) counts publish
requests not yet committed, deliveries and ticks not yet handled. Each unit of work is
counted before the message is sent and released only after the work it causes has been
counted, so the count reaches zero only when everything is durable and delivered;
``wait_idle`` waits on the condition.

**Stop.** ``stop()`` closes the gate (no new external publishes, deliveries or ticks),
then stops the bus actor — which first commits every publish it had accepted, answering
its publishers — then the handler actors, which skip the deliveries still in their
inboxes, and joins their threads. Handler output produced after the gate closed is
abandoned (logged ``publish_abandoned``). For a graceful shutdown call ``wait_idle()``
first. Only this runtime's actors are stopped.

**Stopped from outside.** Pykka lets anyone stop any actor (``ActorRegistry.stop_all()``
is the usual shutdown of a Pykka program; a ``BaseException`` in an actor does the same).
An actor that stops while its runtime is still running tells the runtime, which closes
the gate and from then on refuses ``publish``, ``tick`` and ``wait_idle`` with
:class:`~enclave_keys.errors.ActorsStopped` (at once, not after a timeout). Each stopping
actor then drains its own inbox: publishes nobody will commit are refused (an external
publisher gets ``ActorsStopped``; a handler's staged writes are settled as not committed,
so the leases they hold are released), deliveries and ticks are dropped, and nothing
stays counted in flight. What was committed is in the log; the node recovers the rest on
its next start, as after a crash.

Handlers return events rather than calling the runtime: a ``publish`` from inside a
handler carries no cause, and ``wait_idle`` or ``stop`` called on a handler's own thread
would wait for that very handler and end in a timeout.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from enum import Enum
from typing import Any

import pykka
import structlog

from enclave_keys.bus import EventBus, Outcome, PublishRequest, Subscriber, qualified_type_name
from enclave_keys.clock import Clock
from enclave_keys.errors import ActorsStopped, LifecycleError
from enclave_keys.events import Event, StoredEvent
from enclave_keys.handler import Handler
from enclave_keys.runtime import shell
from enclave_keys.runtime.failures import CommitFailure, FailureLog
from enclave_keys.store import Store

__all__ = ["DEFAULT_DELIVERY_TIMEOUT", "PykkaRuntime"]

_log = structlog.get_logger(__name__)

DEFAULT_DELIVERY_TIMEOUT = 10.0
"""Seconds an external publish waits to be durable, and ``stop`` waits for each actor."""


# --- messages -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Publish:
    request: PublishRequest
    reply: Future[list[StoredEvent]] | None  # None: a handler's publish, nobody waits


@dataclass(frozen=True, slots=True)
class _Flush:
    pass


@dataclass(frozen=True, slots=True)
class _Deliver:
    events: tuple[StoredEvent, ...]  # in log order


@dataclass(frozen=True, slots=True)
class _Tick:
    now: float


# --- shared bookkeeping -------------------------------------------------------------------


class _InFlight:
    """A counter of outstanding work with a condition to wait on."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._count = 0

    @property
    def count(self) -> int:
        with self._cond:
            return self._count

    def add(self) -> None:
        with self._cond:
            self._count += 1

    def done(self, n: int = 1) -> None:
        with self._cond:
            self._count -= n
            if self._count <= 0:
                self._cond.notify_all()

    def wait_until(self, predicate: Callable[[int], bool], timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self._count), timeout)

    def notify(self) -> None:
        with self._cond:
            self._cond.notify_all()


class _Gate:
    """Admits messages (counting them in flight) until closed.

    Sending and closing are atomic with respect to each other, so every message admitted
    before ``close()`` is in its actor's inbox before any stop request sent after it.
    """

    def __init__(self, in_flight: _InFlight) -> None:
        self._lock = threading.Lock()
        self._open = True
        self._in_flight = in_flight

    @property
    def is_open(self) -> bool:
        """Read without the lock (handlers ask once per event, and the lock is busy with
        sends). A stale True costs one more event handled: its publish is then refused
        by :meth:`send`, which alone decides under the lock."""
        return self._open

    def close(self) -> None:
        with self._lock:
            self._open = False

    def send(self, ref: pykka.ActorRef[Any], message: object) -> bool:
        """Tell ``ref`` the message, counted in flight; False if closed or the actor is dead."""
        with self._lock:
            if not self._open:
                return False
            self._in_flight.add()
            try:
                ref.tell(message)
            except pykka.ActorDeadError:
                self._in_flight.done()
                return False
            except BaseException:
                # Anything else (a signal handler raising mid-tell, say): the message was
                # not sent, so it must not stay counted, or every wait_idle would time out.
                self._in_flight.done()
                raise
            return True


class _Threads:
    """The threads of a runtime's actors, so ``stop`` can join exactly those."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def add_current(self) -> None:
        with self._lock:
            self._threads.append(threading.current_thread())

    def join(self, timeout: float) -> int:
        """Join every thread (each for at most ``timeout``); return how many still run."""
        with self._lock:
            threads = [t for t in self._threads if t is not threading.current_thread()]
        for thread in threads:
            thread.join(timeout)
        return sum(thread.is_alive() for thread in threads)


class _RuntimeActor(pykka.ThreadingActor):
    """Base of this runtime's actors: records its thread when it starts; when it stops,
    tells the runtime (``stopped(name)``) and disposes of what is left in its inbox."""

    def __init__(self, name: str, threads: _Threads, stopped: Callable[[str], None]) -> None:
        super().__init__()
        self._name = name
        self._threads = threads
        self._stopped = stopped

    def on_start(self) -> None:
        self._threads.add_current()

    def on_stop(self) -> None:
        self._stopped(self._name)
        self._drain()

    def _drain(self) -> None:
        """Dispose of this runtime's messages still in the inbox (Pykka drops them).

        By now the gate is closed (the runtime closes it before stopping its actors, and
        ``stopped`` closes it when the stop came from outside), so nothing more arrives.
        Pykka's own messages are put back for its teardown, which answers them.
        """
        inbox = self.actor_inbox
        others = []
        while not inbox.empty():
            envelope = inbox.get()
            if not self._dispose(envelope.message):
                others.append(envelope)
        for envelope in others:
            inbox.put(envelope)

    def _dispose(self, message: object) -> bool:
        """Drop one undelivered message of ours (False if it is not ours)."""
        return False


# --- actors -------------------------------------------------------------------------------


class _BusActor(_RuntimeActor):
    """Owns the EventBus: group-commits publishes, then delivers in log order."""

    def __init__(
        self,
        bus: EventBus,
        shells: Mapping[str, pykka.ActorRef[Any]],
        gate: _Gate,
        in_flight: _InFlight,
        failures: FailureLog,
        threads: _Threads,
        stopped: Callable[[str], None],
    ) -> None:
        super().__init__("bus", threads, stopped)
        self._bus = bus
        self._shells = shells
        self._gate = gate
        self._in_flight = in_flight
        self._failures = failures
        self._pending: list[_Publish] = []
        self._flush_scheduled = False

    def on_receive(self, message: Any) -> None:
        try:
            if isinstance(message, _Publish):
                self._pending.append(message)
                if not self._flush_scheduled:
                    self._flush_scheduled = True
                    self.actor_ref.tell(_Flush())
            elif isinstance(message, _Flush):
                self._flush_scheduled = False
                self._flush()
        except Exception as exc:  # never let the bus die; the counter shows the damage
            _log.error("bus_error", error_type=qualified_type_name(exc))

    def on_stop(self) -> None:
        """Commit every publish accepted before the stop (deliveries are off by now), and
        refuse those that came after it."""
        self._stopped(self._name)
        self._flush()
        self._drain()

    def _dispose(self, message: object) -> bool:
        if isinstance(message, _Flush):
            return True
        if not isinstance(message, _Publish):
            return False
        try:
            if message.reply is None:
                shell.abandon(message.request)
            else:
                message.reply.set_exception(ActorsStopped("the runtime's bus actor stopped"))
        finally:
            self._in_flight.done()
        return True

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if not pending:
            return
        try:
            outcomes = self._bus.commit([message.request for message in pending])
            deliveries: dict[str, list[StoredEvent]] = {}
            for outcome in outcomes:
                for stored in outcome.events:  # log order: requests are in sequence order
                    for subscriber in self._bus.subscribers_for(stored):
                        deliveries.setdefault(subscriber.name, []).append(stored)
            for name, events in deliveries.items():
                self._gate.send(self._shells[name], _Deliver(tuple(events)))
            for message, outcome in zip(pending, outcomes, strict=True):
                self._answer(message, outcome)
        finally:
            self._in_flight.done(len(pending))

    def _answer(self, message: _Publish, outcome: Outcome) -> None:
        if message.reply is None:
            if outcome.error is not None:
                self._failures.record(outcome)
        elif outcome.error is None:
            message.reply.set_result(list(outcome.events))
        else:
            message.reply.set_exception(outcome.error)


class _HandlerActor(_RuntimeActor):
    """A thin shell around one core: handle (isolated), then forward the result."""

    def __init__(
        self,
        subscriber: Subscriber,
        forward: Callable[[PublishRequest], bool],
        gate: _Gate,
        in_flight: _InFlight,
        threads: _Threads,
        stopped: Callable[[str], None],
    ) -> None:
        super().__init__(subscriber.name, threads, stopped)
        self._subscriber = subscriber
        self._forward = forward
        self._gate = gate
        self._in_flight = in_flight

    def on_receive(self, message: Any) -> None:
        try:
            if not self._gate.is_open:
                return  # stopping: deliveries still queued are abandoned
            if isinstance(message, _Deliver):
                for stored in message.events:
                    if not self._gate.is_open:
                        break  # stopping: the rest of the delivery is abandoned
                    self._publish(shell.deliver(self._subscriber, stored))
            elif isinstance(message, _Tick):
                self._publish(shell.tick(self._subscriber, message.now))
        finally:
            self._in_flight.done()

    def _dispose(self, message: object) -> bool:
        if not isinstance(message, (_Deliver, _Tick)):
            return False
        self._in_flight.done()
        return True

    def _publish(self, request: PublishRequest | None) -> None:
        """Send what the core returned to the bus at once (a core blocked on a later event
        must not hold back what it made of an earlier one)."""
        if request is None:
            return
        try:
            sent = self._forward(request)
        except BaseException:
            shell.abandon(request)  # not sent: its writes must not wait forever
            raise
        if not sent:
            shell.abandon(request)
            _log.warning("publish_abandoned", source=request.source, events=len(request.events))


# --- the runtime --------------------------------------------------------------------------


class _State(Enum):
    NEW = "new"
    RUNNING = "running"
    BROKEN = "broken"  # an actor was stopped from outside; only stop() is left
    STOPPED = "stopped"


class PykkaRuntime:
    """Threaded :class:`~enclave_keys.runtime.api.Runtime` on Pykka actors.

    ``rng`` seeds event ids (OS randomness when ``None``). ``delivery_timeout`` bounds
    how long an external publish waits to be durable and how long ``stop`` waits for each
    actor.
    """

    def __init__(
        self,
        store: Store,
        clock: Clock,
        *,
        rng: random.Random | None = None,
        delivery_timeout: float = DEFAULT_DELIVERY_TIMEOUT,
    ) -> None:
        if delivery_timeout <= 0:
            raise LifecycleError("delivery_timeout must be positive")
        self._bus = EventBus(store, clock, rng=rng)
        self._timeout = delivery_timeout
        self._failures = FailureLog()
        self._in_flight = _InFlight()
        self._gate = _Gate(self._in_flight)
        self._state = _State.NEW
        self._state_lock = threading.Lock()
        self._bus_ref: pykka.ActorRef[_BusActor] | None = None
        self._shells: dict[str, pykka.ActorRef[_HandlerActor]] = {}
        self._threads = _Threads()
        self._stopped_actor = ""  # the first actor stopped from outside

    @property
    def store(self) -> Store:
        return self._bus.store

    @property
    def failures(self) -> tuple[CommitFailure, ...]:
        return self._failures.all()

    @property
    def actor_refs(self) -> tuple[pykka.ActorRef[Any], ...]:
        """This runtime's actors (the bus first); empty before start."""
        bus: tuple[pykka.ActorRef[Any], ...] = () if self._bus_ref is None else (self._bus_ref,)
        return bus + tuple(self._shells.values())

    # --- lifecycle ----------------------------------------------------------------------

    def subscribe(self, handler: Handler) -> None:
        with self._state_lock:
            if self._state is not _State.NEW:
                raise LifecycleError("subscribe before starting the runtime")
            self._bus.subscribe(handler)

    def start(self) -> None:
        """Recover the log position, then start one actor per handler and the bus actor."""
        error: BaseException | None = None
        with self._state_lock:
            if self._state is not _State.NEW:
                raise LifecycleError(f"the runtime is already {self._state.value}")
            self._bus.start()
            try:
                self._start_actors()
                self._state = _State.RUNNING
            except BaseException as exc:
                self._state = _State.STOPPED
                error = exc
        if error is not None:
            # Outside the state lock: each stopping actor's hook takes it.
            self._gate.close()
            self._stop_actors()
            raise error
        _log.info("runtime_started", runtime="pykka", handlers=len(self._shells))

    def _start_actors(self) -> None:
        for subscriber in self._bus.subscribers:
            self._shells[subscriber.name] = _HandlerActor.start(
                subscriber,
                self._forward,
                self._gate,
                self._in_flight,
                self._threads,
                self._actor_stopped,
            )
        self._bus_ref = _BusActor.start(
            self._bus,
            dict(self._shells),
            self._gate,
            self._in_flight,
            self._failures,
            self._threads,
            self._actor_stopped,
        )

    def stop(self) -> None:
        """Flush accepted publishes, abandon undelivered events, stop exactly our actors.

        Idempotent. Raises ``LifecycleError`` if an actor did not stop within the timeout.
        """
        with self._state_lock:
            if self._state is _State.STOPPED:
                return
            was_running = self._state in (_State.RUNNING, _State.BROKEN)
            self._state = _State.STOPPED
        self._gate.close()
        if not was_running:
            return
        stuck = self._stop_actors()
        self._in_flight.notify()
        _log.info("runtime_stopped", runtime="pykka", abandoned=self._in_flight.count)
        if stuck:
            raise LifecycleError(f"{stuck} actor(s) did not stop within {self._timeout} s")

    def _stop_actors(self) -> int:
        """Stop the bus, then the handler actors, and join their threads; count the stuck."""
        stuck = 0
        for ref in self.actor_refs:
            try:
                ref.stop(block=True, timeout=self._timeout)
            except pykka.Timeout:
                stuck += 1
        return max(stuck, self._threads.join(self._timeout))

    # --- work ---------------------------------------------------------------------------

    def publish(
        self, events: Sequence[Event], *, source: str, timeout: float | None = None
    ) -> list[StoredEvent]:
        """Append ``events``; block until they are durable (at most ``timeout`` seconds).

        Raises the commit's error if they could not be written. On timeout raises
        ``LifecycleError``: the events may still be committed later.
        """
        self._check_running()
        request = PublishRequest.of(events, source=source)
        if not request.events:
            return []
        reply: Future[list[StoredEvent]] = Future()
        if not self._send_to_bus(_Publish(request, reply)):
            self._check_running()
            raise LifecycleError("the runtime is stopped")
        wait = self._timeout if timeout is None else timeout
        try:
            error = reply.exception(wait)
        except TimeoutError:
            raise LifecycleError(
                f"publish not durable after {wait} s (it may still be committed)"
            ) from None
        if error is not None:
            raise error
        return reply.result()

    def tick(self) -> None:
        """Send ``tick(now)`` (one clock reading) to every ticking handler's actor."""
        self._check_running()
        now = self._bus.clock.now()
        for subscriber in self._bus.ticking():
            self._gate.send(self._shells[subscriber.name], _Tick(now))

    def wait_idle(self, timeout: float) -> None:
        """Wait until nothing is in flight; then report failed handler publishes."""
        self._check_running()
        idle_or_stopped = self._in_flight.wait_until(
            lambda n: n <= 0 or self._state in (_State.BROKEN, _State.STOPPED), timeout
        )
        if not idle_or_stopped:
            raise LifecycleError(
                f"not idle after {timeout} s ({self._in_flight.count} deliveries or"
                " publishes in flight)"
            )
        self._check_running()  # stopped while waiting: the zero means nothing
        self._failures.raise_unreported()

    def _actor_stopped(self, name: str) -> None:
        """Called by each actor as it stops (on its thread). While the runtime is running,
        that is a stop from outside: the runtime is broken from then on (see the module
        docstring). Either way the gate is closed before the actor drains its inbox: its
        lock lets a send already under way finish first, so none lands after the drain."""
        with self._state_lock:
            outside = self._state is _State.RUNNING
            if outside:
                self._state = _State.BROKEN
                self._stopped_actor = name
        self._gate.close()
        if outside:
            _log.error("runtime_actor_stopped_from_outside", actor=name)
            self._in_flight.notify()

    # --- internals ----------------------------------------------------------------------

    def _check_running(self) -> None:
        state = self._state
        if state is _State.NEW:
            raise LifecycleError("the runtime is not started")
        if state is _State.BROKEN:
            raise ActorsStopped(
                f"the runtime's actor {self._stopped_actor!r} was stopped from outside;"
                " stop the node and open it again"
            )
        if state is _State.STOPPED:
            raise LifecycleError("the runtime is stopped")

    def _send_to_bus(self, message: _Publish) -> bool:
        return self._bus_ref is not None and self._gate.send(self._bus_ref, message)

    def _forward(self, request: PublishRequest) -> bool:
        """A handler actor's publish: to the bus, unless the runtime is stopping."""
        return self._send_to_bus(_Publish(request, None))
