"""A single-threaded, seeded dispatcher: the runtime of simulations and property tests.

Everything happens inside the caller's ``publish`` / ``tick`` call, in *generations*:

1. the queue of publish requests is committed as one group (one ``store.write()``);
2. each committed event, in log order, is delivered to its subscribers — in registration
   order, or in an order drawn from the seeded generator when ``shuffle=True`` — and
   whatever the handlers return is queued;
3. repeat until nothing is queued or undelivered.

So every subscriber sees events in log order, and the same seed with the same inputs gives
the same log byte for byte (event ids come from ``random.Random(seed)``, timestamps from
the clock you pass). Dispatching is bounded: more than ``max_steps`` deliveries in one
run raise :class:`~enclave_keys.errors.LifecycleError` (a handler answering its own events
forever); what the handlers returned so far is committed first (so no staged store write
waits between runs), and the events not yet delivered stay for a later run.

Handlers must not call ``publish`` themselves (they return events): a re-entrant call
raises ``LifecycleError``, which the runtime isolates like any handler failure.

``stop()`` abandons what is still undelivered (only possible after a run that hit
``max_steps``), settling any staged write still queued as not committed; the log keeps
every committed event.
"""

from __future__ import annotations

import random
from collections import Counter, deque
from collections.abc import Sequence

import structlog

from enclave_keys.bus import EventBus, Outcome, PublishRequest
from enclave_keys.clock import Clock
from enclave_keys.errors import LifecycleError
from enclave_keys.events import Event, StoredEvent
from enclave_keys.handler import Handler
from enclave_keys.runtime import shell
from enclave_keys.runtime.failures import CommitFailure, FailureLog
from enclave_keys.store import Store

__all__ = ["DEFAULT_MAX_STEPS", "DeterministicRuntime"]

_log = structlog.get_logger(__name__)

DEFAULT_MAX_STEPS = 100_000
"""Deliveries allowed per run before dispatch is declared runaway."""


class DeterministicRuntime:
    """In-process, single-threaded :class:`~enclave_keys.runtime.api.Runtime`."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        seed: int,
        *,
        shuffle: bool = False,
        max_steps: int = DEFAULT_MAX_STEPS,
    ) -> None:
        if max_steps < 1:
            raise LifecycleError("max_steps must be at least 1")
        # Seeded, reproducible ids and orders are the point of this runtime (not secrets).
        self._bus = EventBus(store, clock, rng=random.Random(seed))  # noqa: S311
        self._order_rng = (
            random.Random(f"subscriber-order/{seed}")  # noqa: S311
            if shuffle
            else None
        )
        self._max_steps = max_steps
        self._failures = FailureLog()
        self._queue: list[PublishRequest] = []
        self._undelivered: deque[StoredEvent] = deque()
        self._dispatching = False
        self._stopped = False

    @property
    def store(self) -> Store:
        return self._bus.store

    @property
    def failures(self) -> tuple[CommitFailure, ...]:
        return self._failures.all()

    @property
    def pending(self) -> int:
        """Requests queued plus events committed but not yet delivered."""
        return len(self._queue) + len(self._undelivered)

    # --- lifecycle ----------------------------------------------------------------------

    def subscribe(self, handler: Handler) -> None:
        if self._stopped:
            raise LifecycleError("the runtime is stopped")
        self._bus.subscribe(handler)

    def start(self) -> None:
        if self._stopped:
            raise LifecycleError("the runtime is stopped")
        self._bus.start()

    def stop(self) -> None:
        """Stop; abandon queued requests and undelivered events (logged). Idempotent.

        Raises ``LifecycleError`` from inside a handler: the delivery in progress would
        queue what the handler returns after the queue was abandoned, and its staged
        writes (holding an epoch lease) would never be settled.
        """
        if self._stopped:
            return
        if self._dispatching:
            raise LifecycleError("called from inside a handler: stop the node from outside")
        self._stopped = True
        if self._queue or self._undelivered:
            _log.warning(
                "dispatch_abandoned", publishes=len(self._queue), events=len(self._undelivered)
            )
        for request in self._queue:
            shell.abandon(request)
        self._queue.clear()
        self._undelivered.clear()

    # --- work ---------------------------------------------------------------------------

    def publish(self, events: Sequence[Event], *, source: str) -> list[StoredEvent]:
        """Commit ``events`` (with anything queued) as one group, then dispatch until idle.

        Returns the stored events once committed; raises the commit error if they are not.
        A runaway dispatch raises ``LifecycleError`` *after* the events were committed.
        """
        self._check_can_run()
        request = PublishRequest.of(events, source=source)
        if not request.events:
            return []
        self._queue.append(request)
        outcome = self._commit_queue(external=request)
        if outcome is not None and outcome.error is not None:
            raise outcome.error
        self.run_until_idle()
        return [] if outcome is None else list(outcome.events)

    def tick(self) -> None:
        """Tick every ticking handler (registration order) with one clock reading; dispatch."""
        self._check_can_run()
        now = self._bus.clock.now()
        self._dispatching = True
        try:
            for subscriber in self._bus.ticking():
                request = shell.tick(subscriber, now)
                if request is not None:
                    self._queue.append(request)
        finally:
            self._dispatching = False
        self.run_until_idle()

    def wait_idle(self, timeout: float) -> None:
        """Dispatch anything left over, then report failed handler publishes.

        Dispatch is synchronous, so ``timeout`` is not needed; ``max_steps`` bounds it.
        """
        self._check_can_run()
        self.run_until_idle()
        self._failures.raise_unreported()

    def run_until_idle(self, max_steps: int | None = None) -> int:
        """Deliver until nothing is queued or undelivered; return the number of deliveries.

        Raises ``LifecycleError`` once more than ``max_steps`` (default: the runtime's)
        deliveries would be needed; the remaining work stays queued.
        """
        self._check_can_run()
        limit = self._max_steps if max_steps is None else max_steps
        steps = 0
        while self._queue or self._undelivered:
            if not self._undelivered:
                self._commit_queue(external=None)
                continue
            if steps >= limit:
                # What the handlers returned so far is committed (and stays undelivered):
                # no staged write waits in the queue, holding its lease, between runs.
                if self._queue:
                    self._commit_queue(external=None)
                raise LifecycleError(self._runaway_message(limit))
            self._deliver(self._undelivered.popleft())
            steps += 1
        return steps

    # --- internals ----------------------------------------------------------------------

    def _check_can_run(self) -> None:
        if self._stopped:
            raise LifecycleError("the runtime is stopped")
        if not self._bus.started:
            raise LifecycleError("the runtime is not started")
        if self._dispatching:
            raise LifecycleError("called from inside a handler: return events instead")

    def _commit_queue(self, *, external: PublishRequest | None) -> Outcome | None:
        """Commit the whole queue as one group; record failed handler requests."""
        group, self._queue = self._queue, []
        mine = None
        for outcome in self._bus.commit(group):
            if outcome.request is external:
                mine = outcome
            elif outcome.error is not None:
                self._failures.record(outcome)
            self._undelivered.extend(outcome.events)
        return mine

    def _deliver(self, stored: StoredEvent) -> None:
        subscribers = list(self._bus.subscribers_for(stored))
        if self._order_rng is not None:
            self._order_rng.shuffle(subscribers)
        self._dispatching = True
        try:
            for subscriber in subscribers:
                request = shell.deliver(subscriber, stored)
                if request is not None:
                    self._queue.append(request)
        finally:
            self._dispatching = False

    def _runaway_message(self, limit: int) -> str:
        sources = Counter(stored.source for stored in self._undelivered)
        sources.update(request.source for request in self._queue)
        busiest = ", ".join(f"{name!r} x{count}" for name, count in sources.most_common(3))
        return (
            f"dispatch not idle after {limit} deliveries: a handler may be answering its own"
            f" events forever (pending by source: {busiest})"
        )
