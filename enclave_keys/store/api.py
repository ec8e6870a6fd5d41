"""The storage interface: the :class:`Store` protocol and the :class:`WriteBatch` type.

A store holds four things: the event log (append-only, sequences 1, 2, 3, ...), wrapped
round keys (opaque blobs by round id), snapshots (opaque blobs by sequence, newest N kept)
and small metadata records. Every write goes through a batch::

    with store.write() as batch:
        batch.append_events(events)
        batch.put_key(round_id, wrapped)

A batch only *records* operations, validating (and encoding) each one when it is called.
On a clean exit of the ``with`` block the whole batch is applied atomically — in the LMDB
backend as one write transaction, so one durable commit — or not at all: if the body
raises, or applying fails (for example with
:class:`~enclave_keys.errors.SequenceConflict`), nothing is written.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, runtime_checkable

from enclave_keys.codec import encode_event
from enclave_keys.errors import SequenceConflict, StoreError
from enclave_keys.events import StoredEvent
from enclave_keys.ids import RoundId
from enclave_keys.store import records
from enclave_keys.store.slots import SlotDevice

# --- recorded operations ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PutKey:
    key: bytes
    blob: bytes


@dataclass(frozen=True, slots=True)
class PutKeys:
    """Many :class:`PutKey` at once (a ratchet's rewrap): ``(key, blob)`` pairs."""

    pairs: tuple[tuple[bytes, bytes], ...]


@dataclass(frozen=True, slots=True)
class ReplaceKeys:
    """A ratchet's rewrap written back beside live traffic: ``(key, expected, blob)``
    triples; each key gets ``blob`` only if it still holds exactly ``expected``."""

    triples: tuple[tuple[bytes, bytes, bytes], ...]


@dataclass(frozen=True, slots=True)
class DeleteKey:
    key: bytes


@dataclass(frozen=True, slots=True)
class PutSnapshot:
    sequence: int
    data: bytes


@dataclass(frozen=True, slots=True)
class PutMeta:
    key: bytes
    value: bytes


@dataclass(frozen=True, slots=True)
class DeleteMeta:
    key: bytes


Operation = PutKey | PutKeys | ReplaceKeys | DeleteKey | PutSnapshot | PutMeta | DeleteMeta


@dataclass(frozen=True, slots=True)
class PreparedBatch:
    """A validated batch, ready for a backend to apply: encoded events plus operations.

    ``events`` are encoded and consecutive from ``first_sequence`` (which is ``None`` when
    there are none); ``operations`` are in the order they were recorded.
    """

    first_sequence: int | None
    events: tuple[bytes, ...]
    operations: tuple[Operation, ...]

    @property
    def is_empty(self) -> bool:
        return not self.events and not self.operations

    def check_against(self, last_sequence: int) -> None:
        """Raise :class:`SequenceConflict` unless this batch fits a log ending at ``last_sequence``.

        The events must continue the log exactly, and no snapshot may claim a sequence the
        log will not have reached once the batch is applied.
        """
        if self.first_sequence is not None and self.first_sequence != last_sequence + 1:
            raise SequenceConflict(
                f"batch starts at sequence {self.first_sequence}"
                f" but the log ends at {last_sequence}"
            )
        last_after = last_sequence + len(self.events)
        for op in self.operations:
            if isinstance(op, PutSnapshot) and op.sequence > last_after:
                raise SequenceConflict(
                    f"snapshot at sequence {op.sequence} is past the end of the log"
                    f" ({last_after} after this batch)"
                )


def snapshots_to_prune(sequences: Sequence[int], retention: int) -> list[int]:
    """The oldest sequences to delete so that only the newest ``retention`` remain."""
    ordered = sorted(sequences)
    return ordered[: max(0, len(ordered) - retention)]


# --- the batch a caller fills ---------------------------------------------------------


class WriteBatch:
    """Operations recorded inside ``with store.write() as batch:``; applied on exit.

    Each method validates its arguments at once and raises a typed error before anything
    is recorded; a batch is usable only inside its ``with`` block.
    """

    __slots__ = ("_events", "_first_sequence", "_open", "_operations")

    def __init__(self) -> None:
        self._events: list[bytes] = []
        self._first_sequence: int | None = None
        self._operations: list[Operation] = []
        self._open = True

    def _check_open(self) -> None:
        if not self._open:
            raise StoreError("write batch used outside its 'with' block")

    @property
    def next_sequence(self) -> int | None:
        """The sequence the next appended event must have, if this batch has events."""
        if self._first_sequence is None:
            return None
        return self._first_sequence + len(self._events)

    def append_events(self, events: Sequence[StoredEvent]) -> None:
        """Append events (encoded now); they must be consecutive with those already here.

        Whether they continue the log is checked when the batch is applied.
        """
        self._check_open()
        # A tuple or list (what the bus hands over) skips the slower ABC check.
        if type(events) not in (tuple, list) and (
            not isinstance(events, Sequence) or isinstance(events, (str, bytes))
        ):
            raise StoreError("events must be a sequence of StoredEvent")
        expected = self.next_sequence
        encoded: list[bytes] = []
        for stored in events:
            if not isinstance(stored, StoredEvent):
                raise StoreError(f"cannot append a {type(stored).__name__}: not a StoredEvent")
            sequence = records.check_sequence(stored.sequence, minimum=1, what="event sequence")
            if expected is not None and sequence != expected:
                raise SequenceConflict(
                    f"event sequence {sequence} in a batch where {expected} comes next"
                )
            encoded.append(encode_event(stored))
            expected = sequence + 1
        if encoded and self._first_sequence is None:
            self._first_sequence = events[0].sequence
        self._events.extend(encoded)

    def put_key(self, round_id: RoundId, blob: bytes) -> None:
        """Store (or replace) the wrapped key of a round: opaque bytes, 1 to 4096."""
        self._check_open()
        key = records.check_round_id(round_id).to_bytes()
        self._operations.append(PutKey(key, records.check_blob(blob)))

    def put_key_records(self, pairs: Iterable[tuple[bytes, bytes]]) -> None:
        """:meth:`put_key` for each ``(round id bytes, blob)`` tuple, as one operation: an
        epoch change writes back every live key as :meth:`Store.list_key_records` gave
        them. Each id is checked as a round id's form, without building a ``RoundId``;
        all are checked before any is recorded."""
        self._check_open()
        checked = records.check_key_records(pairs, 2, "put_key_records")
        self._operations.append(PutKeys(checked))

    def replace_key_records(self, triples: Iterable[tuple[bytes, bytes, bytes]]) -> None:
        """For each ``(round id bytes, expected, blob)`` tuple: the key gets ``blob`` if,
        when the batch commits, it still holds exactly ``expected`` — a key deleted or
        written meanwhile is left as it is. One operation: an epoch change rewraps the
        live keys outside any lock, then writes back only those nothing changed since
        (a deleted key must never come back). Checked like :meth:`put_key_records`."""
        self._check_open()
        checked = records.check_key_records(triples, 3, "replace_key_records")
        self._operations.append(ReplaceKeys(checked))

    def delete_key(self, round_id: RoundId) -> None:
        """Delete a round's wrapped key; deleting a missing key is not an error."""
        self._check_open()
        self._operations.append(DeleteKey(records.check_round_id(round_id).to_bytes()))

    def put_snapshot(self, sequence: int, data: bytes) -> None:
        """Store a snapshot of the state after event ``sequence`` (0: before any event).

        Older snapshots beyond the store's retention are pruned in the same transaction.
        """
        self._check_open()
        checked = records.check_sequence(sequence, minimum=0, what="snapshot sequence")
        self._operations.append(PutSnapshot(checked, records.check_snapshot_data(data)))

    def put_meta(self, name: str, value: bytes) -> None:
        """Store (or replace) a metadata record. Names starting ``store.`` are reserved."""
        self._check_open()
        key = records.writable_meta_key(name)
        self._operations.append(PutMeta(key, records.check_meta_value(value)))

    def delete_meta(self, name: str) -> None:
        """Delete a metadata record; deleting a missing one is not an error."""
        self._check_open()
        self._operations.append(DeleteMeta(records.writable_meta_key(name)))

    def mark(self) -> tuple[int, int]:
        """A savepoint: how much this batch holds now (see :meth:`rewind`)."""
        self._check_open()
        return len(self._events), len(self._operations)

    def rewind(self, mark: tuple[int, int]) -> None:
        """Drop everything recorded since ``mark``: a group commit rejects one request's
        share of a batch and keeps the rest."""
        self._check_open()
        events, operations = mark
        if not (0 <= events <= len(self._events) and 0 <= operations <= len(self._operations)):
            raise StoreError("rewind to a mark this batch never had")
        del self._events[events:]
        del self._operations[operations:]
        if not self._events:
            self._first_sequence = None

    def _seal(self) -> PreparedBatch:
        """Close the batch to further recording and return what it holds."""
        self._open = False
        return PreparedBatch(self._first_sequence, tuple(self._events), tuple(self._operations))

    def _discard(self) -> None:
        self._open = False
        self._events.clear()
        self._operations.clear()

    def __repr__(self) -> str:
        return f"WriteBatch(events={len(self._events)}, operations={len(self._operations)})"


# --- single-operation writes, for any store -----------------------------------------


class SingleWrites(ABC):
    """The single-operation conveniences of :class:`Store`, each a batch of one, for any
    class that provides :meth:`write` (both backends, and wrappers such as test fakes)."""

    __slots__ = ()

    @abstractmethod
    def write(self) -> AbstractContextManager[WriteBatch]: ...

    def append_events(self, events: Sequence[StoredEvent]) -> None:
        with self.write() as batch:
            batch.append_events(events)

    def put_key(self, round_id: RoundId, blob: bytes) -> None:
        with self.write() as batch:
            batch.put_key(round_id, blob)

    def delete_key(self, round_id: RoundId) -> None:
        with self.write() as batch:
            batch.delete_key(round_id)

    def put_snapshot(self, sequence: int, data: bytes) -> None:
        with self.write() as batch:
            batch.put_snapshot(sequence, data)

    def put_meta(self, name: str, value: bytes) -> None:
        with self.write() as batch:
            batch.put_meta(name, value)

    def delete_meta(self, name: str) -> None:
        with self.write() as batch:
            batch.delete_meta(name)


# --- the interface both backends implement -------------------------------------------


@runtime_checkable
class Store(Protocol):
    """What the rest of the library needs from storage; implemented by
    :class:`~enclave_keys.store.lmdb_store.LmdbStore` and
    :class:`~enclave_keys.store.memory.MemoryStore`.

    Safe to share between threads: write batches are serialized, reads see committed
    batches only, never part of one. Every method raises
    :class:`~enclave_keys.errors.StoreClosed` after :meth:`close`.
    """

    @property
    def closed(self) -> bool: ...

    def write(self) -> AbstractContextManager[WriteBatch]:
        """A batch applied atomically when the ``with`` block exits cleanly."""
        ...

    # single-operation conveniences: each is a batch of one
    def append_events(self, events: Sequence[StoredEvent]) -> None: ...
    def put_key(self, round_id: RoundId, blob: bytes) -> None: ...
    def delete_key(self, round_id: RoundId) -> None: ...
    def put_snapshot(self, sequence: int, data: bytes) -> None: ...
    def put_meta(self, name: str, value: bytes) -> None: ...
    def delete_meta(self, name: str) -> None: ...

    # reads
    def last_sequence(self) -> int:
        """Sequence of the last event in the log; 0 when the log is empty."""
        ...

    def read_events(
        self, from_sequence: int = 1, limit: int | None = None
    ) -> Iterator[StoredEvent]:
        """Events from ``from_sequence`` on, in order, at most ``limit`` of them.

        Read in chunks: no read transaction stays open while the caller iterates.
        """
        ...

    def get_key(self, round_id: RoundId) -> bytes | None: ...
    def list_keys(self) -> list[tuple[RoundId, bytes]]:
        """Every stored (round id, wrapped key), ordered by round id bytes."""
        ...

    def list_key_records(self) -> list[tuple[bytes, bytes]]:
        """Every stored (round id bytes, wrapped key) as stored, unparsed: for a pass over
        every key that only hands them back (the epoch ratchet). Ordered like
        :meth:`list_keys`; use that one to read keys."""
        ...

    def key_count(self) -> int: ...
    def latest_snapshot(self) -> tuple[int, bytes] | None:
        """The newest snapshot as (sequence, data), or ``None``."""
        ...

    def snapshot_sequences(self) -> list[int]:
        """Sequences of the retained snapshots, oldest first."""
        ...

    def get_meta(self, name: str) -> bytes | None: ...

    # the epoch slots: kept outside the copy-on-write store, overwritten in place
    def epoch_slots(self) -> SlotDevice:
        """The store's :class:`~enclave_keys.store.slots.SlotDevice` (closed with it)."""
        ...

    # lifecycle
    def close(self) -> None:
        """Release the store. Idempotent."""
        ...

    def __enter__(self) -> Store: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...
