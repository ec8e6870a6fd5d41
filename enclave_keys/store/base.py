"""Behaviour both backends share, written once so their semantics cannot drift.

:class:`StoreBase` implements the whole :class:`~enclave_keys.store.api.Store` interface —
argument checks, batching, chunked reading, decoding and the corruption checks on every
record read — on top of a few raw primitives that a backend provides (raw bytes in,
raw bytes out).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Self

from enclave_keys.codec import decode_event
from enclave_keys.errors import CodecError, CorruptRecord, StoreClosed
from enclave_keys.events import StoredEvent
from enclave_keys.ids import RoundId
from enclave_keys.store import records
from enclave_keys.store.api import PreparedBatch, SingleWrites, WriteBatch
from enclave_keys.store.slots import SlotDevice

READ_CHUNK = 256
"""Events read per read transaction by :meth:`StoreBase.read_events`."""


def decode_event_record(raw_key: bytes, raw_value: bytes) -> StoredEvent:
    """Decode one stored event, or raise :class:`CorruptRecord` (never a codec error)."""
    sequence = records.parse_sequence_key(raw_key, db="events")
    stored = _decode_value(sequence, raw_value)
    if stored.sequence != sequence:
        raise CorruptRecord(f"event record {sequence} holds an event numbered {stored.sequence}")
    return stored


def _decode_value(sequence: int, raw_value: bytes) -> StoredEvent:
    """The event in record ``sequence``; :class:`CorruptRecord` if it cannot be decoded."""
    try:
        return decode_event(raw_value)
    except CodecError as exc:
        raise CorruptRecord(
            f"event record {sequence} cannot be decoded ({type(exc).__name__})"
        ) from exc


class StoreBase(SingleWrites):
    """Shared implementation of :class:`~enclave_keys.store.api.Store`."""

    def __init__(self, *, snapshot_retention: int = records.DEFAULT_SNAPSHOT_RETENTION) -> None:
        self._retention = records.check_retention(snapshot_retention)
        self._closed = False

    # --- primitives a backend provides ------------------------------------------------

    @abstractmethod
    def _commit(self, batch: PreparedBatch) -> None:
        """Apply a non-empty batch atomically, or raise having applied nothing.

        Must call ``batch.check_against(last_sequence)`` under the write lock, and prune
        snapshots beyond ``self._retention`` in the same atomic step.
        """

    @abstractmethod
    def _last_sequence(self) -> int: ...

    @abstractmethod
    def _slot_device(self) -> SlotDevice: ...

    @abstractmethod
    def _event_records(self, start: int, count: int) -> list[tuple[bytes, bytes]]:
        """Up to ``count`` raw (key, value) event records with key >= ``start``, in order."""

    @abstractmethod
    def _get_key(self, key: bytes) -> bytes | None: ...

    @abstractmethod
    def _key_records(self) -> list[tuple[bytes, bytes]]: ...

    @abstractmethod
    def _key_count(self) -> int: ...

    @abstractmethod
    def _snapshot_keys(self) -> list[bytes]: ...

    @abstractmethod
    def _latest_snapshot_record(self) -> tuple[bytes, bytes] | None: ...

    @abstractmethod
    def _get_meta(self, key: bytes) -> bytes | None: ...

    @abstractmethod
    def _close(self) -> None:
        """Release resources and set ``self._closed``; a second call must do nothing."""

    # --- lifecycle --------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def snapshot_retention(self) -> int:
        return self._retention

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed(f"{type(self).__name__} is closed")

    def close(self) -> None:
        """Release the store. Idempotent; any later use raises :class:`StoreClosed`."""
        if not self._closed:
            self._close()

    def __enter__(self) -> Self:
        self._check_open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- writes -----------------------------------------------------------------------

    @contextmanager
    def write(self) -> Iterator[WriteBatch]:
        self._check_open()
        batch = WriteBatch()
        try:
            yield batch
        except BaseException:
            batch._discard()
            raise
        prepared = batch._seal()
        if not prepared.is_empty:
            self._check_open()
            self._commit(prepared)

    # --- reads ------------------------------------------------------------------------

    def last_sequence(self) -> int:
        self._check_open()
        return self._last_sequence()

    def read_events(
        self, from_sequence: int = 1, limit: int | None = None
    ) -> Iterator[StoredEvent]:
        self._check_open()
        start = records.check_sequence(from_sequence, minimum=1, what="from_sequence")
        return self._iter_events(start, records.check_limit(limit))

    def _iter_events(self, start: int, limit: int | None) -> Iterator[StoredEvent]:
        expected = start
        remaining = limit
        while remaining is None or remaining > 0:
            count = READ_CHUNK if remaining is None else min(READ_CHUNK, remaining)
            self._check_open()
            chunk = self._event_records(expected, count)
            for raw_key, raw_value in chunk:
                # The record key is the one this position must have, and the event inside
                # carries the same number: a gap, a renumbered or a moved record fails one
                # of the two, and then the full decode below says which it is.
                if raw_key == records.sequence_key(expected):
                    stored = _decode_value(expected, raw_value)
                    if stored.sequence == expected:
                        yield stored
                        expected += 1
                        continue
                stored = decode_event_record(raw_key, raw_value)
                if stored.sequence != expected:
                    raise CorruptRecord(
                        f"event log has a gap: record {stored.sequence} where {expected} belongs"
                    )
                yield stored
                expected += 1
            if len(chunk) < count:
                return
            if remaining is not None:
                remaining -= len(chunk)

    def get_key(self, round_id: RoundId) -> bytes | None:
        self._check_open()
        checked = records.check_round_id(round_id)
        raw = self._get_key(checked.to_bytes())
        return None if raw is None else records.parse_blob(raw, checked)

    def list_keys(self) -> list[tuple[RoundId, bytes]]:
        self._check_open()
        return [records.parse_round_key_record(k, v) for k, v in self._key_records()]

    def list_key_records(self) -> list[tuple[bytes, bytes]]:
        self._check_open()
        return self._key_records()

    def key_count(self) -> int:
        self._check_open()
        return self._key_count()

    def latest_snapshot(self) -> tuple[int, bytes] | None:
        self._check_open()
        record = self._latest_snapshot_record()
        return None if record is None else records.parse_snapshot_record(*record)

    def snapshot_sequences(self) -> list[int]:
        self._check_open()
        return [records.parse_sequence_key(k, db="snapshots") for k in self._snapshot_keys()]

    def epoch_slots(self) -> SlotDevice:
        self._check_open()
        return self._slot_device()

    def get_meta(self, name: str) -> bytes | None:
        self._check_open()
        return self._get_meta(records.meta_key(name))
