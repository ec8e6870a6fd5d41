"""Handler-originated publishes that could not be committed: recorded, logged, surfaced.

An external publish learns of a failed commit by raising. A publish a *handler* asked for
has nobody waiting on it, so the runtime records it here (and logs ``publish_failed``);
the next ``wait_idle()`` raises :class:`~enclave_keys.errors.StoreError` once for the
failures recorded since the previous report, and ``runtime.failures`` lists them all.
The events of a failed commit are not in the log; nothing is retried.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import structlog

from enclave_keys.bus import Outcome, qualified_type_name
from enclave_keys.errors import StoreError

__all__ = ["CommitFailure", "FailureLog"]

_log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class CommitFailure:
    """One handler publish that is not in the log, and why (by error type)."""

    source: str
    cause_sequence: int | None
    event_count: int
    error_type: str
    error: Exception = field(repr=False, compare=False)


class FailureLog:
    """Thread-safe list of :class:`CommitFailure`, with a cursor of what was reported."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._failures: list[CommitFailure] = []
        self._reported = 0

    def record(self, outcome: Outcome) -> CommitFailure:
        """Record (and log) a failed outcome of a handler-originated request."""
        assert outcome.error is not None
        request = outcome.request
        failure = CommitFailure(
            source=request.source,
            cause_sequence=None if request.cause is None else request.cause.sequence,
            event_count=len(request.events),
            error_type=qualified_type_name(outcome.error),
            error=outcome.error,
        )
        _log.error(
            "publish_failed",
            source=failure.source,
            cause_sequence=failure.cause_sequence,
            events=failure.event_count,
            error_type=failure.error_type,
        )
        with self._lock:
            self._failures.append(failure)
        return failure

    def all(self) -> tuple[CommitFailure, ...]:
        with self._lock:
            return tuple(self._failures)

    def raise_unreported(self) -> None:
        """Raise :class:`StoreError` if failures were recorded since the last report."""
        with self._lock:
            new = self._failures[self._reported :]
            self._reported = len(self._failures)
        if new:
            first = new[0]
            raise StoreError(
                f"{len(new)} handler publish(es) could not be committed (first: source"
                f" {first.source!r}, {first.error_type}); see runtime.failures"
            ) from first.error
