"""A shared/exclusive lock for the LMDB environment.

Every transaction (read or write) holds the lock *shared* for its short lifetime. The two
operations that LMDB allows only when no transaction is active in the process — growing
the map (``mdb_env_set_mapsize``) and closing the environment — take it *exclusive*.
A waiting exclusive holder blocks new shared holders, so it cannot be starved.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class SharedExclusiveLock:
    """Many shared holders or one exclusive holder. Not reentrant."""

    __slots__ = ("_cond", "_exclusive", "_shared", "_waiting_exclusive")

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._shared = 0
        self._exclusive = False
        self._waiting_exclusive = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive or self._waiting_exclusive:
                self._cond.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                if self._shared == 0:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting_exclusive += 1
            try:
                while self._exclusive or self._shared:
                    self._cond.wait()
            finally:
                self._waiting_exclusive -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()
