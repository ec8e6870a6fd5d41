"""The contract between an actor's logic (a *core*) and the runtime that drives it.

A core is a plain object: it holds state and reacts to stored events from the log by
returning the new events it wants published. It never publishes, sleeps or spawns
threads itself. The same core runs under Pykka threads in a node
(:mod:`enclave_keys.runtime.pykka_runtime`) and under the deterministic, seeded dispatcher
(:mod:`enclave_keys.runtime.deterministic`) in simulations and property tests.

The runtime publishes what a core returns with ``source = core.name``,
``causation_id`` = the handled event's id and ``correlation_id`` = the handled event's
correlation id (or its own id when it has none).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from enclave_keys.events import Event, StoredEvent


@runtime_checkable
class Handler(Protocol):
    """An actor's logic: state plus ``handle(stored) -> events to publish``."""

    @property
    def name(self) -> str:
        """Stable name, used as the ``source`` of what it publishes and in HandlerFailed."""
        ...

    @property
    def subscriptions(self) -> tuple[type[Event], ...] | None:
        """Event types delivered to this handler; ``None`` means every event."""
        ...

    def handle(self, stored: StoredEvent) -> Sequence[Event]:
        """React to one event, in log order. Raising is isolated by the runtime."""
        ...


@runtime_checkable
class Ticking(Protocol):
    """A handler that also acts on the passage of time (the deadline reaper)."""

    def tick(self, now: float) -> Sequence[Event]:
        """Called by the runtime when its clock is read; returns events to publish."""
        ...
