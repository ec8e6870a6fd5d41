"""Calling a core, with failure isolation: the part both runtimes' shells share.

A handler that raises (or returns something that is not a sequence of events) never
takes the runtime down. :func:`deliver` catches the exception, logs ``handler_failed``
with the handler's name, the event's sequence and the exception's *type* — never its
message or arguments, which could hold secrets — and returns a request to publish
:class:`~enclave_keys.events.HandlerFailed` (source ``"runtime"``, caused by the event).
The handler keeps receiving later events.

To stop a cascade, a failure while handling a ``HandlerFailed`` event is logged only.
A failing :meth:`~enclave_keys.handler.Ticking.tick` is logged only as well
(``handler_tick_failed``): ``HandlerFailed`` names the *event* that failed, and a tick
has none.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final, cast

import structlog

from enclave_keys.bus import PublishRequest, Subscriber, qualified_type_name
from enclave_keys.events import Event, HandlerFailed, StoredEvent
from enclave_keys.handler import StagedWrite, Staging, Ticking, settle_writes

__all__ = ["RUNTIME_SOURCE", "abandon", "deliver", "tick"]

_log = structlog.get_logger(__name__)

RUNTIME_SOURCE: Final = "runtime"
"""The ``source`` of what the runtime publishes itself (``HandlerFailed``)."""


def deliver(subscriber: Subscriber, stored: StoredEvent) -> PublishRequest | None:
    """Hand ``stored`` to the subscriber's handler; return what to publish, if anything."""
    try:
        events = _events(subscriber.handler.handle(stored))
    except Exception as exc:
        settle_writes(_writes(subscriber), committed=False)
        return _failed(subscriber, stored, exc)
    writes = _writes(subscriber)
    if not (events or writes):
        return None
    return PublishRequest(events, subscriber.name, stored, writes)


def tick(subscriber: Subscriber, now: float) -> PublishRequest | None:
    """Call the subscriber's ``tick(now)``; return what to publish (no cause), if anything."""
    try:
        events = _events(cast(Ticking, subscriber.handler).tick(now))
    except Exception as exc:
        settle_writes(_writes(subscriber), committed=False)
        _log.warning(
            "handler_tick_failed", handler=subscriber.name, error_type=qualified_type_name(exc)
        )
        return None
    writes = _writes(subscriber)
    if not (events or writes):
        return None
    return PublishRequest(events, subscriber.name, writes=writes)


def abandon(request: PublishRequest) -> None:
    """A request that will never reach the bus: settle its writes as not committed."""
    settle_writes(request.writes, committed=False)


def _writes(subscriber: Subscriber) -> tuple[StagedWrite, ...]:
    """The writes a staging handler queued while it handled the last event or tick."""
    if not subscriber.staging:
        return ()
    return cast(Staging, subscriber.handler).take_writes()


def _events(returned: Iterable[Event]) -> tuple[Event, ...]:
    """What a handler returned, as a tuple of events; ``TypeError`` for anything else."""
    events = tuple(returned)
    for event in events:
        if not isinstance(event, Event):
            raise TypeError(f"a handler returned a {type(event).__name__}, not an Event")
    return events


def _failed(subscriber: Subscriber, stored: StoredEvent, error: Exception) -> PublishRequest | None:
    error_type = qualified_type_name(error)
    _log.warning(
        "handler_failed",
        handler=subscriber.name,
        sequence=stored.sequence,
        tag=stored.tag,
        error_type=error_type,
    )
    if isinstance(stored.payload, HandlerFailed):
        return None  # no HandlerFailed about a HandlerFailed: that could loop forever
    report = HandlerFailed(
        subscriber=subscriber.name, failed_sequence=stored.sequence, error_type=error_type
    )
    return PublishRequest((report,), RUNTIME_SOURCE, stored)
