"""Operation-scoped access to key material: :class:`LeaseGate`.

A gate hands out *shared leases* (``with gate.shared(timeout):`` — one per operation that
uses a key, e.g. one wrap) and one *exclusive section* at a time (``with
gate.exclusive(timeout):`` — rotation, rekeying). The exclusive section waits for the
leases in flight to end; a waiting exclusive holder blocks new leases, so a stream of
short operations cannot starve it. Every wait is bounded and ends in
:class:`~enclave_keys.errors.LeaseTimeout`.

:meth:`LeaseGate.close` (what sealing does) waits like an exclusive section, then closes
the gate for good: a closed gate refuses every lease and section with
:class:`~enclave_keys.errors.Sealed`, except leases taken with ``allow_closed=True``
(which only keep exclusive sections out and need no key).

Not reentrant: a thread that holds a lease and asks for an exclusive section (or the
other way round) waits until its own timeout.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Generic, TypeVar

from enclave_keys.errors import LeaseTimeout, Sealed

__all__ = ["DEFAULT_LEASE_WAIT", "LeaseGate", "SharedLease", "check_timeout"]

T = TypeVar("T")

DEFAULT_LEASE_WAIT = 10.0
"""Seconds a lease, an exclusive section or a seal waits by default."""


def check_timeout(timeout: object, what: str = "timeout") -> float:
    """``timeout`` as a float if it is a finite number of seconds >= 0, else ``ValueError``."""
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not math.isfinite(timeout)
        or timeout < 0
    ):
        raise ValueError(f"{what} must be a finite number of seconds >= 0")
    return float(timeout)


class LeaseGate:
    """Counted shared leases, one exclusive section, bounded waits, and a final close.

    ``what`` names the guarded thing in error messages (``"keyring"``). Thread-safe.
    """

    __slots__ = (
        "_closed",
        "_cond",
        "_exclusive",
        "_shared",
        "_shared_waiting",
        "_waiting",
        "_what",
    )

    def __init__(self, what: str) -> None:
        self._what = what
        # Reentrant, so that a wait_until predicate may read the properties.
        self._cond = threading.Condition(threading.RLock())
        self._shared = 0
        self._exclusive = False
        self._waiting = 0  # exclusive sections (and closes) waiting for leases to end
        self._shared_waiting = 0  # leases waiting for an exclusive section to end
        self._closed = False

    # --- state ---------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        with self._cond:
            return self._closed

    @property
    def open_leases(self) -> int:
        with self._cond:
            return self._shared

    @property
    def leases_waiting(self) -> int:
        """How many leases are waiting for an exclusive section to end."""
        with self._cond:
            return self._shared_waiting

    @property
    def exclusive_waiting(self) -> int:
        """How many exclusive sections (or closes) are waiting for leases to end."""
        with self._cond:
            return self._waiting

    @property
    def exclusive_held(self) -> bool:
        with self._cond:
            return self._exclusive

    def wait_until(self, predicate: Callable[[LeaseGate], bool], timeout: float) -> bool:
        """Wait (bounded) until ``predicate(gate)`` holds; True if it did.

        Every change of the gate's state wakes the waiter, so tests and status pages can
        observe a lease or a waiting section without sleeping.
        """
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), check_timeout(timeout))

    def _check_open(self) -> None:
        if self._closed:
            raise Sealed(f"the {self._what} is sealed")

    # --- shared leases -------------------------------------------------------------------

    def shared(self, timeout: float, *, allow_closed: bool = False) -> SharedLease[None]:
        """A shared lease for the block; waits (bounded) while an exclusive section runs
        or waits.

        Raises :class:`Sealed` when the gate is (or becomes) closed, unless
        ``allow_closed``; :class:`LeaseTimeout` when the wait ends first.
        """
        return SharedLease(self, check_timeout(timeout), allow_closed, _nothing)

    def leased(self, timeout: float, value: Callable[[], T]) -> SharedLease[T]:
        """Like :meth:`shared`, binding ``value()`` — called once the lease is held —
        to the ``with`` target. If ``value`` raises, the lease ends at once."""
        return SharedLease(self, check_timeout(timeout), False, value)

    def _enter_shared(self, wait: float, allow_closed: bool) -> None:
        with self._cond:
            if not allow_closed:
                self._check_open()
            if self._exclusive or self._waiting:
                self._wait_for_shared(wait, allow_closed)
            self._shared += 1
            self._cond.notify_all()

    def _wait_for_shared(self, wait: float, allow_closed: bool) -> None:
        """Called with the condition held: wait until a lease may be taken."""

        def may_enter() -> bool:
            free = not self._exclusive and self._waiting == 0
            return free or (self._closed and not allow_closed)

        self._shared_waiting += 1
        self._cond.notify_all()
        try:
            entered = self._cond.wait_for(may_enter, wait)
        finally:
            self._shared_waiting -= 1
        if not entered:
            raise LeaseTimeout(
                f"no lease on the {self._what} within {wait:g} s: an exclusive section"
                " (rotation, rekey or seal) is running"
            )
        if not allow_closed:
            self._check_open()

    def _exit_shared(self) -> None:
        with self._cond:
            self._shared -= 1
            self._cond.notify_all()

    # --- the exclusive section -----------------------------------------------------------

    def _acquire_exclusive(self, wait: float) -> bool:
        """Register as waiting, wait for leases and sections to end; True if acquired.

        Called with the condition held. On False nothing is held.
        """
        self._waiting += 1
        self._cond.notify_all()
        try:
            acquired = self._cond.wait_for(
                lambda: self._closed or (not self._exclusive and self._shared == 0), wait
            )
            acquired = acquired and not self._closed
            if acquired:
                self._exclusive = True
            return acquired
        finally:
            self._waiting -= 1
            self._cond.notify_all()  # leases blocked behind this waiter may go on

    @contextmanager
    def exclusive(self, timeout: float) -> Iterator[None]:
        """The exclusive section for the block, once every lease has ended.

        Raises :class:`LeaseTimeout` if leases are still open when the bounded wait ends
        (nothing is held then) and :class:`Sealed` if the gate is or becomes closed.
        """
        wait = check_timeout(timeout)
        with self._cond:
            self._check_open()
            if not self._acquire_exclusive(wait):
                self._check_open()
                raise LeaseTimeout(
                    f"{self._shared} lease(s) on the {self._what} still open after {wait:g} s"
                )
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()

    def close(self, timeout: float, *, force: bool = False) -> bool:
        """Wait (bounded) for every lease and section to end, then close the gate for good.

        Returns True if the gate drained. If leases are still open when the wait ends,
        raises :class:`LeaseTimeout` and stays open — unless ``force``, which closes it
        anyway (and returns False): the caller then wipes keys under open leases, which
        fail with ``SecretWiped`` rather than use a key after the seal. Idempotent: an
        already closed gate returns True at once.
        """
        wait = check_timeout(timeout)
        with self._cond:
            if self._closed:
                return True
            drained = self._acquire_exclusive(wait)
            if drained:
                self._exclusive = False
            elif self._closed:
                return True  # closed by another thread meanwhile
            elif not force:
                raise LeaseTimeout(
                    f"{self._shared} lease(s) on the {self._what} still open after {wait:g} s"
                )
            self._closed = True
            self._cond.notify_all()
            return drained

    def __repr__(self) -> str:
        with self._cond:
            state = "closed" if self._closed else ("exclusive" if self._exclusive else "open")
            return f"LeaseGate({self._what}, {state}, leases={self._shared})"


def _nothing() -> None:
    return None


class SharedLease(Generic[T]):
    """One shared lease on a :class:`LeaseGate`, as a context manager (see
    :meth:`LeaseGate.shared` and :meth:`LeaseGate.leased`).

    A plain class rather than a generator: a node takes several leases per round, and a
    generator-based context manager cost about three times as much.
    """

    __slots__ = ("_allow_closed", "_gate", "_value", "_wait")

    def __init__(
        self, gate: LeaseGate, wait: float, allow_closed: bool, value: Callable[[], T]
    ) -> None:
        self._gate = gate
        self._wait = wait
        self._allow_closed = allow_closed
        self._value = value

    def __enter__(self) -> T:
        self._gate._enter_shared(self._wait, self._allow_closed)
        try:
            return self._value()
        except BaseException:
            self._gate._exit_shared()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._gate._exit_shared()
