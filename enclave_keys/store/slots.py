"""The epoch slot file: two fixed-size slots, overwritten in place, never copy-on-write.

The storage epoch key (wrapped under the keyring) must be destroyable: a value deleted
from LMDB lingers in free pages, so the epoch key lives here instead. The file is exactly
``SLOT_FILE_SIZE`` = 2 * ``SLOT_SIZE`` bytes; slot *i* occupies bytes ``[i * 4096,
(i + 1) * 4096)``, each in its own 4 KiB block, so writing one slot never touches the
other. Every write is ``pwrite`` of the whole slot followed by ``fdatasync``.

A slot is empty (all zero bytes) or holds one record::

    offset  size  field
    0       8     magic b"EKSLOT\\x00\\x01" (the last two bytes: slot format 1)
    8       8     sequence number, big-endian, >= 1 (higher is newer)
    16      2     payload length n, big-endian, 1..256
    18      n     payload (for the epoch ratchet: a 73-byte wrapped epoch key)
    18+n    32    SHA-256 of bytes [0, 18+n)
    ...           zero up to 4096

The checksum only detects torn or foreign writes (the payload authenticates itself).
:class:`SlotFile` is the durable device, :class:`MemorySlots` its in-memory twin; both are
:class:`SlotDevice`\\ s.
"""

from __future__ import annotations

import errno
import hashlib
import os
import struct
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

import structlog

from enclave_keys.errors import CorruptSlot, StoreClosed, StoreError, StoreUnavailable
from enclave_keys.store.datafile import fsync_directory

__all__ = [
    "SLOT_COUNT",
    "SLOT_FILE_NAME",
    "SLOT_FILE_SIZE",
    "SLOT_SIZE",
    "MemorySlots",
    "SlotDevice",
    "SlotFile",
    "SlotRecord",
    "decode_slot",
    "encode_slot",
]

_log = structlog.get_logger(__name__)

SLOT_FILE_NAME: Final = "epoch.slots"
TMP_PREFIX: Final = ".tmp."  # epoch.slots.tmp.<random>: one creator's file (see _create)
SLOT_SIZE: Final = 4096
SLOT_COUNT: Final = 2
SLOT_FILE_SIZE: Final = SLOT_SIZE * SLOT_COUNT
MAX_PAYLOAD: Final = 256
_MAGIC: Final = b"EKSLOT\x00\x01"
_HEAD: Final = struct.Struct(">8sQH")
_DIGEST: Final = 32
_EMPTY: Final = bytes(SLOT_SIZE)


@dataclass(frozen=True, slots=True)
class SlotRecord:
    """One slot's record: its sequence number and payload."""

    sequence: int
    payload: bytes

    def __repr__(self) -> str:  # the payload is a wrapped key: its length only
        return f"SlotRecord(sequence={self.sequence}, payload=<{len(self.payload)} bytes>)"


def encode_slot(record: SlotRecord) -> bytes:
    """The exact ``SLOT_SIZE`` bytes of ``record`` (:class:`StoreError` if out of range)."""
    if not isinstance(record.sequence, int) or not 1 <= record.sequence < 2**64:
        raise StoreError("slot sequence must be an int from 1 to 2**64 - 1")
    if not isinstance(record.payload, bytes) or not 1 <= len(record.payload) <= MAX_PAYLOAD:
        raise StoreError(f"slot payload must be 1 to {MAX_PAYLOAD} bytes")
    body = _HEAD.pack(_MAGIC, record.sequence, len(record.payload)) + record.payload
    raw = body + hashlib.sha256(body).digest()
    return raw + bytes(SLOT_SIZE - len(raw))


def decode_slot(raw: bytes) -> SlotRecord | None:
    """The record in ``raw`` (one slot), ``None`` for an empty slot.

    Raises :class:`CorruptSlot` for anything else: a torn write, a foreign file.
    """
    if len(raw) != SLOT_SIZE:
        raise CorruptSlot(f"a slot is {SLOT_SIZE} bytes, not {len(raw)}")
    if raw == _EMPTY:
        return None
    magic, sequence, length = _HEAD.unpack_from(raw)
    if magic != _MAGIC:
        raise CorruptSlot("slot has a wrong magic or format version")
    end = _HEAD.size + length
    if not 1 <= length <= MAX_PAYLOAD or sequence == 0:
        raise CorruptSlot("slot header is out of range")
    if hashlib.sha256(raw[:end]).digest() != raw[end : end + _DIGEST]:
        raise CorruptSlot("slot checksum does not match (torn or foreign write)")
    if any(raw[end + _DIGEST :]):
        raise CorruptSlot("slot has bytes after its checksum")
    return SlotRecord(sequence, raw[_HEAD.size : end])


def _check_index(index: object) -> int:
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < SLOT_COUNT:
        raise StoreError(f"slot index must be 0 to {SLOT_COUNT - 1}")
    return index


class SlotDevice(Protocol):
    """Two fixed-size slots that are overwritten in place; each write is durable."""

    def read(self, index: int) -> bytes:
        """The ``SLOT_SIZE`` raw bytes of slot ``index``."""
        ...

    def write(self, index: int, raw: bytes) -> None:
        """Overwrite slot ``index`` with ``raw`` (``SLOT_SIZE`` bytes); durable on return."""
        ...

    def close(self) -> None: ...


class SlotFile:
    """The slot file in a data directory. Use :meth:`open`."""

    __slots__ = ("_fd", "_lock", "_path")

    def __init__(self, fd: int, path: Path) -> None:
        self._fd: int | None = fd
        self._path = path
        self._lock = threading.Lock()

    @classmethod
    def open(cls, directory: Path, *, create: bool = True) -> SlotFile:
        """Open ``directory/epoch.slots``, creating it (two empty slots) if ``create``.

        :class:`StoreUnavailable` for a file of the wrong size or type (truncated, foreign).
        """
        path = directory / SLOT_FILE_NAME
        flags = os.O_RDWR | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
        try:
            try:
                fd = os.open(path, flags)
            except FileNotFoundError:
                if not create:
                    raise StoreUnavailable(f"no epoch slot file at {path}") from None
                _create(path)
                fd = os.open(path, flags)
        except OSError as exc:
            raise StoreUnavailable(f"cannot open epoch slot file {path}: {exc}") from exc
        try:
            size = os.fstat(fd).st_size
            if size != SLOT_FILE_SIZE:
                raise StoreUnavailable(
                    f"{path} is {size} bytes, not {SLOT_FILE_SIZE}: truncated or foreign"
                )
        except OSError as exc:
            os.close(fd)
            raise StoreUnavailable(f"cannot read the size of {path}: {exc}") from exc
        except BaseException:
            os.close(fd)
            raise
        _remove_stale_temporaries(path)
        return cls(fd, path)

    @property
    def path(self) -> Path:
        return self._path

    def _open_fd(self) -> int:
        if self._fd is None:
            raise StoreClosed(f"epoch slot file {self._path} is closed")
        return self._fd

    def read(self, index: int) -> bytes:
        """:class:`StoreError` if the device fails (``EIO``): never a raw ``OSError``."""
        index = _check_index(index)
        with self._lock:
            fd = self._open_fd()
            try:
                raw = os.pread(fd, SLOT_SIZE, index * SLOT_SIZE)
            except OSError as exc:
                raise StoreError(f"cannot read slot {index} of {self._path}: {exc}") from exc
        if len(raw) != SLOT_SIZE:
            raise CorruptSlot(f"{self._path} ends inside slot {index}")
        return raw

    def write(self, index: int, raw: bytes) -> None:
        """:class:`StoreError` if the device fails (``EIO``, ``ENOSPC``), so callers see
        the store's typed error; the message names the slot, never its bytes. The slot
        may then hold the old record, the new one or a torn mix: decoding tells."""
        index = _check_index(index)
        if not isinstance(raw, bytes) or len(raw) != SLOT_SIZE:
            raise StoreError(f"a slot write is exactly {SLOT_SIZE} bytes")
        with self._lock:
            fd = self._open_fd()
            try:
                written = os.pwrite(fd, raw, index * SLOT_SIZE)
                if written != SLOT_SIZE:
                    raise StoreError(f"short write to {self._path}: {written} bytes")
                os.fdatasync(fd)
            except OSError as exc:
                raise StoreError(f"cannot write slot {index} of {self._path}: {exc}") from exc

    def close(self) -> None:
        """Idempotent. :class:`StoreError` if closing fails (``EIO`` from a delayed
        write); the device is closed either way."""
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError as exc:
                raise StoreError(f"cannot close {self._path}: {exc}") from exc

    def __repr__(self) -> str:
        return f"SlotFile({str(self._path)!r}, {'closed' if self._fd is None else 'open'})"


def _create(path: Path) -> None:
    """Create ``path`` whole — two empty slots, durable — or not at all.

    The zeros are written and fsynced in a temporary file of this creator's own
    (``epoch.slots.tmp.<random>``) and only then linked to the final name, so a crash
    never leaves a short ``epoch.slots`` (which every later open would refuse as
    truncated, keeping the node from ever starting). Linking (then unlinking the
    temporary name) is a rename that cannot replace: should another process create
    ``epoch.slots`` meanwhile, its file — maybe already holding an epoch key — is kept,
    and this one is dropped. Raises ``OSError``; :meth:`SlotFile.open` makes it
    :class:`StoreUnavailable`.
    """
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=path.name + TMP_PREFIX)
    tmp = Path(name)
    try:
        try:
            written = os.pwrite(fd, bytes(SLOT_FILE_SIZE), 0)
            if written != SLOT_FILE_SIZE:
                raise OSError(errno.ENOSPC, f"short write: {written} bytes")
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # created by someone else meanwhile: theirs is the file
        except FileNotFoundError:
            # Our temporary file was removed as stale by an opener that found
            # epoch.slots made meanwhile: theirs is the file.
            if not path.exists():
                raise
        else:
            _log.info("epoch_slot_file_created", path=str(path))
    finally:
        tmp.unlink(missing_ok=True)
    fsync_directory(path.parent)


def _remove_stale_temporaries(path: Path) -> None:
    """Remove the temporary files of creations a crash cut short (zeros only: nothing to
    erase), once ``path`` exists. A creation still running (another process, without the
    directory's claim) finds its own gone and uses the file that exists."""
    try:
        for stale in path.parent.glob(path.name + TMP_PREFIX + "*"):
            stale.unlink(missing_ok=True)
    except OSError as exc:  # best effort: they hold nothing, and the store opens anyway
        _log.warning("epoch_slot_temporary_not_removed", path=str(path), error=str(exc))


class MemorySlots:
    """Two slots in process memory: the twin of :class:`SlotFile` for tests."""

    __slots__ = ("_data", "_lock", "writes")

    def __init__(self) -> None:
        self._data = bytearray(SLOT_FILE_SIZE)
        self._lock = threading.Lock()
        self.writes = 0

    def read(self, index: int) -> bytes:
        index = _check_index(index)
        with self._lock:
            return bytes(self._data[index * SLOT_SIZE : (index + 1) * SLOT_SIZE])

    def write(self, index: int, raw: bytes) -> None:
        index = _check_index(index)
        if not isinstance(raw, bytes) or len(raw) != SLOT_SIZE:
            raise StoreError(f"a slot write is exactly {SLOT_SIZE} bytes")
        with self._lock:
            self._data[index * SLOT_SIZE : (index + 1) * SLOT_SIZE] = raw
            self.writes += 1

    def close(self) -> None:
        """Nothing to release: the slots outlive the store objects, like the backing."""

    def __repr__(self) -> str:
        return f"MemorySlots(writes={self.writes})"
