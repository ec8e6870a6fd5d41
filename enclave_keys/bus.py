"""The event bus: the runtime-agnostic sequencer and subscriber registry.

:class:`EventBus` turns publish requests (payload events, a source and an optional cause)
into :class:`~enclave_keys.events.StoredEvent` envelopes and appends them to the log:

* sequences continue the log (recovered from ``store.last_sequence()`` on :meth:`start`);
* event ids come from a seeded :class:`random.Random` for deterministic runs, else from
  the OS CSPRNG; timestamps from the :class:`~enclave_keys.clock.Clock` (read once per
  group);
* ``causation_id`` is the cause's id, ``correlation_id`` the cause's correlation id (or its
  own id when it has none); an external publish, with no cause, has neither.

**Group commit.** :meth:`EventBus.commit` takes *every* queued request and appends them in
one ``store.write()`` batch: one transaction, one fsync. A request that cannot be stamped
(e.g. a malformed source) is rejected alone without consuming sequences; if the write
itself fails, every request of the group fails with that error and nothing is written.

The bus also keeps the subscriber registry (exact payload type, or everything), in
registration order. It is not thread-safe: exactly one owner drives it — the deterministic
dispatcher's thread, or the Pykka bus actor. Delivering is the runtime's job.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import structlog

from enclave_keys.clock import Clock
from enclave_keys.errors import InvalidIdentifier, LifecycleError, MalformedEvent
from enclave_keys.events import (
    EVENT_TYPES,
    MAX_SEQUENCE,
    MAX_SOURCE_LEN,
    Event,
    StoredEvent,
    check_source,
    check_timestamp,
)
from enclave_keys.handler import Handler, StagedWrite, Staging, Ticking, settle_writes
from enclave_keys.ids import EventId
from enclave_keys.store import Store

__all__ = [
    "EventBus",
    "Outcome",
    "PublishRequest",
    "Subscriber",
    "qualified_type_name",
]

_log = structlog.get_logger(__name__)

_IDENTIFIER: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MAX_QUALIFIED_NAME: Final = 256


def qualified_type_name(error: BaseException) -> str:
    """``module.QualName`` of an exception's type, safe for ``HandlerFailed.error_type``.

    Builtins drop the module (``ValueError``); segments that are not plain identifiers
    (``<locals>``) are dropped; the name is shortened from the left to 256 characters.
    Only the *type* is named: messages and arguments may carry secrets.
    """
    cls = type(error)
    parts = [] if cls.__module__ == "builtins" else cls.__module__.split(".")
    parts += cls.__qualname__.split(".")
    kept = [part for part in parts if _IDENTIFIER.fullmatch(part)]
    while len(kept) > 1 and len(".".join(kept)) > _MAX_QUALIFIED_NAME:
        kept.pop(0)
    return ".".join(kept)[:_MAX_QUALIFIED_NAME] or "Exception"


# --- publish requests and their outcomes ------------------------------------------------


@dataclass(frozen=True, slots=True)
class PublishRequest:
    """Events to append, who publishes them, the stored event that caused them, and the
    store writes (of a :class:`~enclave_keys.handler.Staging` handler) that commit with
    them."""

    events: tuple[Event, ...]
    source: str
    cause: StoredEvent | None = None
    writes: tuple[StagedWrite, ...] = ()

    @classmethod
    def of(
        cls, events: Sequence[Event], *, source: str, cause: StoredEvent | None = None
    ) -> PublishRequest:
        """A request from a caller's sequence; :class:`MalformedEvent` if it holds a non-event."""
        if isinstance(events, Event) or not isinstance(events, Sequence):
            raise MalformedEvent(f"publish takes a sequence of events, not {type(events).__name__}")
        items = tuple(events)
        for event in items:
            if not isinstance(event, Event):
                raise MalformedEvent(f"cannot publish a {type(event).__name__}: not an Event")
        return cls(items, source, cause)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one request in a group commit: its stored events, or the error."""

    request: PublishRequest
    events: tuple[StoredEvent, ...] = ()
    error: Exception | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


# --- subscribers ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class Subscriber:
    """A subscribed handler as registered: name and subscriptions are read once."""

    handler: Handler
    name: str
    subscriptions: frozenset[type[Event]] | None
    ticking: bool
    staging: bool

    def wants(self, event: Event) -> bool:
        """True if ``event``'s exact type is subscribed (or the subscriber takes all)."""
        return self.subscriptions is None or type(event) in self.subscriptions

    @classmethod
    def of(cls, handler: Handler) -> Subscriber:
        """Read and check a handler's name and subscriptions.

        The name is the ``source`` of what the handler publishes, so it must be a valid
        source: 1 to 64 printable characters (:class:`InvalidIdentifier` otherwise).
        Subscriptions must be registered event types (:class:`LifecycleError` otherwise).
        """
        if not isinstance(handler, Handler):
            raise LifecycleError(
                f"a {type(handler).__name__} is not a Handler (name, subscriptions, handle)"
            )
        name = handler.name
        if not (isinstance(name, str) and 1 <= len(name) <= MAX_SOURCE_LEN and name.isprintable()):
            raise InvalidIdentifier(
                f"handler name must be 1 to {MAX_SOURCE_LEN} printable characters"
            )
        return cls(
            handler,
            name,
            _checked_subscriptions(handler),
            isinstance(handler, Ticking),
            isinstance(handler, Staging),
        )


def _checked_subscriptions(handler: Handler) -> frozenset[type[Event]] | None:
    wanted = handler.subscriptions
    if wanted is None:
        return None
    registered = set(EVENT_TYPES.values())
    types = tuple(wanted)
    for kind in types:
        if kind not in registered:
            raise LifecycleError(
                f"handler {handler.name!r} subscribes to {kind!r}: not an event type"
            )
    return frozenset(types)


# --- the bus ----------------------------------------------------------------------------


class EventBus:
    """Sequencer (one ``store.write()`` per group) and subscriber registry."""

    def __init__(self, store: Store, clock: Clock, *, rng: random.Random | None = None) -> None:
        self._store = store
        self._clock = clock
        self._rng = rng
        self._subscribers: list[Subscriber] = []
        self._routes: dict[type[Event], tuple[Subscriber, ...]] = {}
        self._next_sequence: int | None = None

    @property
    def store(self) -> Store:
        return self._store

    @property
    def clock(self) -> Clock:
        return self._clock

    @property
    def started(self) -> bool:
        return self._next_sequence is not None

    @property
    def next_sequence(self) -> int:
        """The sequence the next committed event will get."""
        if self._next_sequence is None:
            raise LifecycleError("the event bus is not started")
        return self._next_sequence

    # --- registry -----------------------------------------------------------------------

    def subscribe(self, handler: Handler) -> Subscriber:
        """Register ``handler`` (before :meth:`start`); names must be unique."""
        if self.started:
            raise LifecycleError("subscribe before starting the bus")
        subscriber = Subscriber.of(handler)
        if any(s.name == subscriber.name for s in self._subscribers):
            raise LifecycleError(f"a handler named {subscriber.name!r} is already subscribed")
        if isinstance(handler, Staging):
            handler.stage_writes()
        self._subscribers.append(subscriber)
        return subscriber

    @property
    def subscribers(self) -> tuple[Subscriber, ...]:
        """Every subscriber, in registration order."""
        return tuple(self._subscribers)

    def ticking(self) -> tuple[Subscriber, ...]:
        """The subscribers whose handler implements :class:`~enclave_keys.handler.Ticking`."""
        return tuple(s for s in self._subscribers if s.ticking)

    def subscribers_for(self, stored: StoredEvent) -> tuple[Subscriber, ...]:
        """Who receives ``stored``, in registration order."""
        kind = type(stored.payload)
        route = self._routes.get(kind)
        if route is None:
            route = tuple(s for s in self._subscribers if s.wants(stored.payload))
            self._routes[kind] = route
        return route

    # --- sequencing ---------------------------------------------------------------------

    def start(self) -> None:
        """Recover the next sequence from the store; the registry is frozen from now on."""
        if self.started:
            raise LifecycleError("the event bus is already started")
        self._next_sequence = self._store.last_sequence() + 1
        _log.info(
            "bus_started", next_sequence=self._next_sequence, subscribers=len(self._subscribers)
        )

    def commit(self, requests: Sequence[PublishRequest]) -> list[Outcome]:
        """Stamp and append every request in one durable batch; one outcome per request.

        Never raises for a request or store problem: rejections and write failures come
        back as outcomes (and are logged, by error type only). On success the events of
        the group are consecutive, in request order. Each request's staged writes go into
        the same batch and are settled before this returns, *after* the batch has
        committed or failed: committed with the group, or not (a rejected request, a failed
        group). Never inside the batch: a write settled as not committed may retry on its
        own (a key deletion does), and that must not land before the group's own writes.
        """
        first = self.next_sequence
        rejected: dict[int, Outcome] = {}
        staged: dict[int, tuple[StoredEvent, ...]] = {}
        sequence = first
        try:
            now = check_timestamp(self._clock.now())
            with self._store.write() as batch:
                for index, request in enumerate(requests):
                    mark = batch.mark()
                    try:
                        stamped = self._stamp(request, sequence, now)
                        batch.append_events(stamped)
                        for write in request.writes:
                            write.apply(batch)
                    except Exception as exc:
                        batch.rewind(mark)
                        rejected[index] = Outcome(request, error=exc)
                        _log.warning(
                            "publish_rejected",
                            source=_printable(request.source),
                            error_type=qualified_type_name(exc),
                        )
                        continue
                    staged[index] = stamped
                    sequence += len(stamped)
        except Exception as exc:
            _log.error(
                "commit_failed",
                error_type=qualified_type_name(exc),
                publishes=len(staged),
                events=sequence - first,
            )
            self._resynchronise()
            for request in requests:  # failed before or while reaching any of them
                settle_writes(request.writes, committed=False)
            return [
                rejected[i] if i in rejected else Outcome(request, error=exc)
                for i, request in enumerate(requests)
            ]
        self._next_sequence = sequence
        for index, request in enumerate(requests):
            settle_writes(request.writes, committed=index in staged)
        if sequence > first:
            _log.debug("events_committed", first_sequence=first, events=sequence - first)
        return [
            rejected[i] if i in rejected else Outcome(request, staged[i])
            for i, request in enumerate(requests)
        ]

    def _stamp(self, request: PublishRequest, first: int, now: float) -> tuple[StoredEvent, ...]:
        """The request's envelopes: the source is checked once, every other field is the
        bus's own (see :meth:`StoredEvent.stamped`)."""
        source = check_source(request.source)
        events = request.events
        if first + len(events) - 1 > MAX_SEQUENCE:
            raise MalformedEvent("the log is full: no sequence left for these events")
        cause = request.cause
        causation = None if cause is None else cause.event_id
        correlation = None
        if cause is not None:
            correlation = cause.event_id if cause.correlation_id is None else cause.correlation_id
        ids = self._event_ids(len(events))
        return tuple(
            StoredEvent.stamped(
                first + offset, ids[offset], now, causation, correlation, source, event
            )
            for offset, event in enumerate(events)
        )

    def _event_ids(self, count: int) -> list[EventId]:
        """``count`` fresh event ids: one CSPRNG read for all of them (or, seeded, one draw
        each, so a simulation's ids stay what they were)."""
        if self._rng is not None:
            return [EventId.random(self._rng) for _ in range(count)]
        raw = os.urandom(EventId.SIZE * count)
        size = EventId.SIZE
        return [EventId(raw[i : i + size]) for i in range(0, len(raw), size)]

    def _resynchronise(self) -> None:
        """After a failed write, trust the store's idea of the log end (if it can say)."""
        try:
            self._next_sequence = self._store.last_sequence() + 1
        except Exception as exc:
            _log.warning("bus_resync_failed", error_type=qualified_type_name(exc))


def _printable(source: object) -> str:
    """A source as a log field: only a well-formed one (:func:`check_source`) is echoed."""
    try:
        return check_source(source)
    except MalformedEvent:
        return "<malformed>"
