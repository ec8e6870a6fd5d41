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

from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

import structlog

from enclave_keys.events import Event, StoredEvent
from enclave_keys.store import WriteBatch

_log = structlog.get_logger(__name__)


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


class StagedWrite(Protocol):
    """A store write that travels with a handler's events into the bus's group commit.

    The bus calls :meth:`apply` inside the group's ``store.write()`` batch, on its own
    thread, then :meth:`settle` exactly once: ``True`` after the batch is durable (and
    before any event of the group is delivered), ``False`` if the write will never be
    committed (the group failed, the request was rejected, or the runtime stopped first).
    ``settle`` must not raise; it releases whatever the write held (a lease, say).
    """

    def apply(self, batch: WriteBatch) -> None: ...

    def settle(self, committed: bool) -> None: ...


@runtime_checkable
class Staging(Protocol):
    """A handler whose store writes join the group commit of the events it returns.

    A runtime calls :meth:`stage_writes` when the handler is subscribed; from then on the
    handler queues its writes instead of committing them itself, and the runtime takes
    them (:meth:`take_writes`) right after each ``handle`` or ``tick``, on the same thread,
    and publishes them with the returned events: the writes and the events are durable
    together, in one transaction, or not at all.
    """

    def stage_writes(self) -> None: ...

    def take_writes(self) -> tuple[StagedWrite, ...]: ...


def settle_writes(writes: Iterable[StagedWrite], committed: bool) -> None:
    """Settle every write; a write whose ``settle`` raises is logged, never propagated."""
    for write in writes:
        try:
            write.settle(committed)
        except Exception as exc:
            _log.error("staged_write_settle_failed", error_type=type(exc).__qualname__)
