"""Pausing CPython's cyclic garbage collector while a node builds its live state (or an
epoch ratchet rewraps every live key, or a snapshot is written).

A start makes a dozen or more container objects per live round — round ids, contexts,
ciphers, each core's entries — and keeps nearly all of them. The collector would trace
them again and again for nothing: a full collection runs each time the tracked objects
have grown by a quarter, and each traces the whole heap, so at 100,000 live rounds it
took about a third of the start (``docs/performance.md``). Reference counting still
frees at once whatever is not a cycle; a cycle made meanwhile waits for a full
collection.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

__all__ = ["collector_paused"]


class _CollectorPause:
    """Keeps the cyclic collector off while any start is running.

    At the end every tracked object — in effect those made meanwhile: older ones are
    mostly there already — is moved straight to the oldest generation (``gc.freeze()``
    then ``gc.unfreeze()``, which only splice lists), rather than the whole new state
    being traced by a young collection at once, and again on its way up. Skipped when the
    application has frozen objects itself, which ``unfreeze`` would thaw.

    The switch is process-wide: starts that overlap share one pause (the last to finish
    turns the collector back on), and a collector that was already off stays off.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders = 0
        self._resume = False
        self._promote = False  # some holder built state to keep: promote it at the end

    @contextmanager
    def paused(self, *, promote: bool = True) -> Iterator[None]:
        with self._lock:
            if self._holders == 0:
                self._resume = gc.isenabled()
                self._promote = False
                gc.disable()
            self._holders += 1
            self._promote = self._promote or promote
        try:
            yield
        finally:
            with self._lock:
                self._holders -= 1
                if self._holders == 0 and self._resume:
                    if self._promote and gc.get_freeze_count() == 0:
                        gc.freeze()
                        gc.unfreeze()
                    gc.enable()


_COLLECTOR = _CollectorPause()


def collector_paused(*, promote: bool = True) -> AbstractContextManager[None]:
    """The collector off for the block (process-wide; overlapping blocks share a pause).

    ``promote``: the block builds state that is kept (a node start), so what it made goes
    straight to the oldest generation at the end. Pass ``False`` for a block whose
    objects are mostly transient (an epoch ratchet's rewrapped blobs): they are freed by
    reference counting, and anything left is collected as usual afterwards.
    """
    return _COLLECTOR.paused(promote=promote)
