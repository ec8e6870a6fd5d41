"""The in-memory twin of the LMDB store, for tests and simulations.

Same interface, same validation, same errors, same atomicity: a batch is checked in full
under the lock and only then applied, so a failing batch changes nothing. Events are kept
*encoded* and decoded on every read, exactly like the LMDB store, so the codec is
exercised the same way.

The data lives in a :class:`MemoryBacking`, separate from the store object, so a test can
"restart" a node: :meth:`MemoryStore.reopen` (or a new ``MemoryStore(backing)``) sees
exactly what was committed — a batch is either all there or not at all.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from enclave_keys.errors import StoreClosed
from enclave_keys.store import records
from enclave_keys.store.api import (
    DeleteKey,
    DeleteMeta,
    PreparedBatch,
    PutKey,
    PutKeys,
    PutMeta,
    PutSnapshot,
    ReplaceKeys,
    snapshots_to_prune,
)
from enclave_keys.store.base import StoreBase
from enclave_keys.store.slots import MemorySlots, SlotDevice


def _initial_meta() -> dict[bytes, bytes]:
    return {records.FORMAT_VERSION_NAME.encode(): records.format_version_value()}


@dataclass(eq=False)
class MemoryBacking:
    """The committed contents of a :class:`MemoryStore`; outlives the store objects."""

    events: list[bytes] = field(default_factory=list)  # index i holds sequence i + 1
    round_keys: dict[bytes, bytes] = field(default_factory=dict)
    snapshots: dict[int, bytes] = field(default_factory=dict)
    meta: dict[bytes, bytes] = field(default_factory=_initial_meta)
    slots: MemorySlots = field(default_factory=MemorySlots)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __repr__(self) -> str:
        return (
            f"MemoryBacking(events={len(self.events)}, round_keys={len(self.round_keys)},"
            f" snapshots={len(self.snapshots)}, meta={len(self.meta)})"
        )


class _StoreSlots:
    """The backing's slots as one :class:`MemoryStore` lends them: :class:`StoreClosed`
    once that store (or this device) is closed, as ``LmdbStore``'s slot file is, while the
    slots themselves stay in the backing for :meth:`MemoryStore.reopen`."""

    __slots__ = ("_closed", "_store")

    def __init__(self, store: MemoryStore) -> None:
        self._store = store
        self._closed = False

    def _check_open(self) -> None:
        self._store._check_open()
        if self._closed:
            raise StoreClosed("the store's epoch slot device is closed")

    def read(self, index: int) -> bytes:
        with self._store.backing.lock:  # the lock close() takes: nothing slips past it
            self._check_open()
            return self._store.backing.slots.read(index)

    def write(self, index: int, raw: bytes) -> None:
        with self._store.backing.lock:
            self._check_open()
            self._store.backing.slots.write(index, raw)

    def close(self) -> None:
        self._closed = True

    def __repr__(self) -> str:
        return f"_StoreSlots({'closed' if self._closed else 'open'})"


class MemoryStore(StoreBase):
    """A :class:`~enclave_keys.store.api.Store` in process memory."""

    def __init__(
        self,
        backing: MemoryBacking | None = None,
        *,
        snapshot_retention: int = records.DEFAULT_SNAPSHOT_RETENTION,
    ) -> None:
        super().__init__(snapshot_retention=snapshot_retention)
        self._backing = MemoryBacking() if backing is None else backing
        self._slots = _StoreSlots(self)

    @property
    def backing(self) -> MemoryBacking:
        return self._backing

    def reopen(self) -> MemoryStore:
        """Close this store and return a new one over the same committed data."""
        self.close()
        return MemoryStore(self._backing, snapshot_retention=self._retention)

    def _close(self) -> None:
        with self._backing.lock:
            self._closed = True

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"MemoryStore({state}, {self._backing!r})"

    # --- writes -----------------------------------------------------------------------

    def _commit(self, batch: PreparedBatch) -> None:
        data = self._backing
        with data.lock:
            self._check_open()
            batch.check_against(len(data.events))
            # Nothing below can fail: the batch is applied whole.
            data.events.extend(batch.events)
            snapshots_written = False
            for op in batch.operations:
                match op:
                    case PutKey(key, blob):
                        data.round_keys[key] = blob
                    case PutKeys(pairs):
                        data.round_keys.update(pairs)
                    case ReplaceKeys(triples):
                        keys = data.round_keys
                        keys.update([(k, new) for k, old, new in triples if keys.get(k) == old])
                    case DeleteKey(key):
                        data.round_keys.pop(key, None)
                    case PutSnapshot(sequence, snapshot):
                        data.snapshots[sequence] = snapshot
                        snapshots_written = True
                    case PutMeta(key, value):
                        data.meta[key] = value
                    case DeleteMeta(key):
                        data.meta.pop(key, None)
            # Pruned only by a batch that writes a snapshot, as LmdbStore does: a store
            # reopened with a smaller retention keeps the older ones until then.
            if snapshots_written:
                for sequence in snapshots_to_prune(list(data.snapshots), self._retention):
                    del data.snapshots[sequence]

    # --- reads ------------------------------------------------------------------------

    def _slot_device(self) -> SlotDevice:
        return self._slots

    def _last_sequence(self) -> int:
        with self._backing.lock:
            return len(self._backing.events)

    def _event_records(self, start: int, count: int) -> list[tuple[bytes, bytes]]:
        with self._backing.lock:
            self._check_open()
            window = self._backing.events[start - 1 : start - 1 + count]
        return [(records.sequence_key(start + i), raw) for i, raw in enumerate(window)]

    def _get_key(self, key: bytes) -> bytes | None:
        with self._backing.lock:
            return self._backing.round_keys.get(key)

    def _key_records(self) -> list[tuple[bytes, bytes]]:
        with self._backing.lock:
            return sorted(self._backing.round_keys.items())

    def _key_count(self) -> int:
        with self._backing.lock:
            return len(self._backing.round_keys)

    def _snapshot_keys(self) -> list[bytes]:
        with self._backing.lock:
            return [records.sequence_key(s) for s in sorted(self._backing.snapshots)]

    def _latest_snapshot_record(self) -> tuple[bytes, bytes] | None:
        with self._backing.lock:
            if not self._backing.snapshots:
                return None
            sequence = max(self._backing.snapshots)
            return records.sequence_key(sequence), self._backing.snapshots[sequence]

    def _get_meta(self, key: bytes) -> bytes | None:
        with self._backing.lock:
            return self._backing.meta.get(key)
