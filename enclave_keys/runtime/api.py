"""The :class:`Runtime` protocol: what both runtimes offer a node, a simulation or a test.

Lifecycle: ``subscribe`` handlers, ``start``, then ``publish`` / ``tick`` / ``wait_idle``,
and finally ``stop``. Misuse (subscribing after start, publishing before start or after
stop) and waits that time out raise :class:`~enclave_keys.errors.LifecycleError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from enclave_keys.events import Event, StoredEvent
from enclave_keys.handler import Handler
from enclave_keys.runtime.failures import CommitFailure
from enclave_keys.store import Store

__all__ = ["Runtime"]


class Runtime(Protocol):
    """Drives handlers (cores) from a durable event log."""

    @property
    def store(self) -> Store:
        """The store holding the log (read it with ``store.read_events()``)."""
        ...

    @property
    def failures(self) -> tuple[CommitFailure, ...]:
        """Every handler publish that could not be committed, oldest first."""
        ...

    def subscribe(self, handler: Handler) -> None:
        """Register a handler; only before :meth:`start`. Names must be unique."""
        ...

    def start(self) -> None:
        """Recover the log position from the store and begin delivering."""
        ...

    def publish(self, events: Sequence[Event], *, source: str) -> list[StoredEvent]:
        """Append ``events`` (no cause); return them once durable in the log.

        Raises the store's error if the commit fails (nothing is written), and
        :class:`~enclave_keys.errors.MalformedEvent` for a malformed request.
        """
        ...

    def tick(self) -> None:
        """Call ``tick(clock.now())`` on every ticking handler; publish what they return."""
        ...

    def wait_idle(self, timeout: float) -> None:
        """Return once every published event is delivered and all that followed is durable
        and delivered too. Raises :class:`~enclave_keys.errors.LifecycleError` on timeout,
        and :class:`~enclave_keys.errors.StoreError` once for handler publishes that failed
        to commit since the last call (listed in :attr:`failures`)."""
        ...

    def stop(self) -> None:
        """Stop delivering; idempotent. See each runtime for what happens to pending work."""
        ...
