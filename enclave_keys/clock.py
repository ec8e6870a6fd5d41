"""Time, passed in: a `Clock` protocol, the system clock, and a manual clock.

Nothing in the library reads the time except through a `Clock`, so tests and
simulations can run hours of protocol time in milliseconds, deterministically.
Times are POSIX seconds as floats (wall-clock time, because deadlines must survive a
restart and so cannot be monotonic-clock readings).
"""

from __future__ import annotations

import threading
import time
from typing import Protocol, runtime_checkable


@runtime_checkable
class Clock(Protocol):
    """Source of the current time in POSIX seconds."""

    def now(self) -> float:
        """Return the current time in seconds since the epoch."""
        ...


class SystemClock:
    """The host's wall clock."""

    __slots__ = ()

    def now(self) -> float:
        return time.time()

    def __repr__(self) -> str:
        return "SystemClock()"


class ManualClock:
    """A clock that only moves when told to. Thread-safe; never goes backwards."""

    __slots__ = ("_lock", "_now")

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._lock = threading.Lock()
        self._now = float(start)

    def now(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> float:
        """Move the clock forward by ``seconds`` (>= 0) and return the new time."""
        if seconds < 0:
            raise ValueError("a ManualClock cannot go backwards")
        with self._lock:
            self._now += seconds
            return self._now

    def set(self, when: float) -> None:
        """Jump to ``when``, which must not be earlier than the current time."""
        with self._lock:
            if when < self._now:
                raise ValueError("a ManualClock cannot go backwards")
            self._now = float(when)

    def __repr__(self) -> str:
        return f"ManualClock(now={self.now()!r})"
