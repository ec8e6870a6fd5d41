"""Exported event logs: one file holding a node's log exactly as stored.

Format version 1 (all integers unsigned, big-endian; described in ``docs/simulations.md``):

* header, 16 bytes: magic ``b"EKLOG\\x00\\r\\n"`` (8), format version u16 (``1``), flags
  u16 (``0``), reserved u32 (``0``);
* records: a u32 length ``n`` (1 to :data:`MAX_RECORD`) then ``n`` bytes — one event
  encoded by :func:`enclave_keys.codec.encode_event`, the value the store keeps;
* trailer: a u32 ``0`` (end marker), the record count u64, then the SHA-256 (32 bytes) of
  every byte before the end marker.

A reader checks the magic, the version, every length, the count and the digest, and
decodes every record strictly: anything else is :class:`~enclave_keys.errors.LogFileError`
(which never quotes the bytes). The file holds only what the log holds — ciphertexts, ids
and times; never a key.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, Final

from enclave_keys.codec import decode_event, encode_event
from enclave_keys.errors import CodecError, LogFileError
from enclave_keys.events import StoredEvent

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_RECORD",
    "encode_log",
    "log_digest",
    "read_log_file",
    "write_log_file",
]

MAGIC: Final = b"EKLOG\x00\r\n"
FORMAT_VERSION: Final = 1
MAX_RECORD: Final = 64 * 1024 * 1024
_HEADER: Final = MAGIC + FORMAT_VERSION.to_bytes(2, "big") + bytes(2) + bytes(4)
_TRAILER_SIZE: Final = 4 + 8 + 32


class _Writer:
    """Streams records to ``out`` and keeps the running digest."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._digest = hashlib.sha256()
        self.count = 0
        self._put(_HEADER)

    def _put(self, data: bytes) -> None:
        self._digest.update(data)
        self._out.write(data)

    def record(self, stored: StoredEvent) -> None:
        data = encode_event(stored)
        self._put(len(data).to_bytes(4, "big") + data)
        self.count += 1

    def finish(self) -> None:
        body_digest = self._digest.digest()
        self._out.write(bytes(4) + self.count.to_bytes(8, "big") + body_digest)


def write_log_file(events: Iterable[StoredEvent], path: str | os.PathLike[str]) -> int:
    """Write ``events`` to ``path`` (replaced atomically); returns the number written.

    :class:`LogFileError` if it cannot be written (no such directory, no space): then
    ``path`` is as it was and no ``.partial`` file is left.
    """
    target = Path(path)
    partial = target.with_name(target.name + ".partial")
    try:
        try:
            with open(partial, "wb") as out:
                writer = _Writer(out)
                for stored in events:
                    writer.record(stored)
                writer.finish()
                out.flush()
                os.fsync(out.fileno())
            partial.replace(target)
        except BaseException:
            with contextlib.suppress(OSError):
                partial.unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise LogFileError(f"cannot write the log file {target}: {exc.strerror}") from None
    return writer.count


def encode_log(events: Iterable[StoredEvent]) -> bytes:
    """The bytes :func:`write_log_file` would write for ``events``."""
    buffer = io.BytesIO()
    writer = _Writer(buffer)
    for stored in events:
        writer.record(stored)
    writer.finish()
    return buffer.getvalue()


def log_digest(events: Iterable[StoredEvent]) -> str:
    """Hex SHA-256 of the exported form of ``events`` (the simulation's log hash)."""
    return hashlib.sha256(encode_log(events)).hexdigest()


def read_log_file(path: str | os.PathLike[str]) -> Iterator[StoredEvent]:
    """The events of an exported log file, in order, checked as the module doc says.

    :class:`LogFileError` if it cannot be read (missing, a directory, no permission)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise LogFileError(f"cannot read the log file {path}: {exc.strerror}") from None
    return iter(list(_parse(data)))


def _parse(data: bytes) -> Iterator[StoredEvent]:
    if len(data) < len(_HEADER) + _TRAILER_SIZE or not data.startswith(MAGIC):
        raise LogFileError("not an enclave_keys log file (bad magic or too short)")
    version = int.from_bytes(data[8:10], "big")
    if version != FORMAT_VERSION:
        raise LogFileError(f"log file format version {version} is not supported")
    if data[10:16] != bytes(6):
        raise LogFileError("log file header has unknown flags")
    offset = len(_HEADER)
    count = 0
    expected_sequence: int | None = None
    while True:
        if offset + 4 > len(data):
            raise LogFileError("log file is truncated (no end marker)")
        length = int.from_bytes(data[offset : offset + 4], "big")
        if length == 0:
            break
        if length > MAX_RECORD or offset + 4 + length > len(data):
            raise LogFileError(f"record {count + 1} is truncated or too long ({length} bytes)")
        try:
            stored = decode_event(data[offset + 4 : offset + 4 + length])
        except CodecError as exc:
            raise LogFileError(
                f"record {count + 1} does not decode ({type(exc).__name__})"
            ) from None
        if expected_sequence is not None and stored.sequence != expected_sequence:
            raise LogFileError(f"record {count + 1}: sequence {stored.sequence} breaks the order")
        expected_sequence = stored.sequence + 1
        count += 1
        offset += 4 + length
        yield stored
    trailer = data[offset:]
    if len(trailer) != _TRAILER_SIZE:
        raise LogFileError("log file trailer has the wrong size")
    if int.from_bytes(trailer[4:12], "big") != count:
        raise LogFileError("log file trailer count does not match the records")
    if hashlib.sha256(data[:offset]).digest() != trailer[12:]:
        raise LogFileError("log file digest does not match its contents")
