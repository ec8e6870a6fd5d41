"""Key and value layouts shared by both backends, and the checks on every argument.

Everything here is pure: it turns Python values into the exact bytes stored (see
``docs/storage-format.md``) and back, and rejects malformed input with a typed error
*before* any backend is touched. A record read back that does not have the expected
layout raises :class:`~enclave_keys.errors.CorruptRecord`.

Argument errors: a malformed identifier (round id, sequence number, meta name) raises
:class:`~enclave_keys.errors.InvalidIdentifier`; a malformed value (wrong type or size of a
blob, snapshot or meta value, a non-event in an append, a bad limit) raises
:class:`~enclave_keys.errors.StoreError` itself.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable
from typing import Any, Final

from enclave_keys.errors import CorruptRecord, InvalidIdentifier, StoreError
from enclave_keys.ids import ROUND_ID_FORM, RoundId

# --- names ----------------------------------------------------------------------------

EVENTS_DB: Final = b"events"
ROUND_KEYS_DB: Final = b"round_keys"
SNAPSHOTS_DB: Final = b"snapshots"
META_DB: Final = b"meta"
DATABASES: Final = (EVENTS_DB, ROUND_KEYS_DB, SNAPSHOTS_DB, META_DB)

FORMAT_VERSION: Final = 1
"""The on-disk format this code reads and writes (a u32 in ``meta``)."""

FORMAT_VERSION_NAME: Final = "store.format_version"
RESERVED_META_PREFIX: Final = "store."
"""Meta names with this prefix belong to the store itself; callers cannot write them."""

# --- limits ---------------------------------------------------------------------------

MAX_SEQUENCE: Final = 2**64 - 1
MIN_BLOB_SIZE: Final = 1
MAX_BLOB_SIZE: Final = 4096
MAX_META_NAME_SIZE: Final = 128
DEFAULT_SNAPSHOT_RETENTION: Final = 3

_U64: Final = struct.Struct(">Q")
_U32: Final = struct.Struct(">I")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --- sequences (events and snapshots) -------------------------------------------------


def check_sequence(value: object, *, minimum: int, what: str) -> int:
    """Return ``value`` if it is an int in ``[minimum, 2**64 - 1]``."""
    if not _is_int(value):
        raise InvalidIdentifier(f"{what} must be an int")
    assert isinstance(value, int)
    if not minimum <= value <= MAX_SEQUENCE:
        raise InvalidIdentifier(f"{what} must be from {minimum} to 2**64 - 1, got {value}")
    return value


def sequence_key(sequence: int) -> bytes:
    """A sequence number as a storage key: u64 big-endian, so byte order is numeric order."""
    return _U64.pack(sequence)


def parse_sequence_key(raw: bytes, *, db: str) -> int:
    if len(raw) != _U64.size:
        raise CorruptRecord(f"{db} record key has {len(raw)} bytes, expected {_U64.size}")
    value: int = _U64.unpack(raw)[0]
    return value


# --- round keys -----------------------------------------------------------------------


def check_round_id(value: object) -> RoundId:
    if not isinstance(value, RoundId):
        raise InvalidIdentifier(f"round id must be a RoundId, got {type(value).__name__}")
    return value


_ROUND_ID_BYTES: Final = re.compile(ROUND_ID_FORM.encode("ascii"))


def check_round_id_bytes(value: object) -> bytes:
    """A round id's canonical bytes (``RoundId.to_bytes()``), checked without a RoundId."""
    if type(value) is not bytes or _ROUND_ID_BYTES.fullmatch(value) is None:
        raise InvalidIdentifier("round id bytes are not a round id's form")
    return value


def check_blob(value: object) -> bytes:
    """A wrapped round-key blob: opaque bytes, 1 to 4096 of them."""
    if not isinstance(value, bytes):
        raise StoreError(f"wrapped key must be bytes, got {type(value).__name__}")
    if not MIN_BLOB_SIZE <= len(value) <= MAX_BLOB_SIZE:
        raise StoreError(
            f"wrapped key must be {MIN_BLOB_SIZE} to {MAX_BLOB_SIZE} bytes, got {len(value)}"
        )
    return value


def check_key_records(items: Iterable[object], width: int, what: str) -> tuple[Any, ...]:
    """``items`` as a tuple, each a ``width``-tuple of round id bytes then blobs, checked
    as :func:`check_round_id_bytes` and :func:`check_blob` do (inline: an epoch change
    passes 100,000 of them); ``StoreError`` naming ``what`` for anything else."""
    try:
        checked = tuple(items)
    except TypeError:
        raise StoreError(f"{what} takes an iterable of tuples") from None
    fullmatch = _ROUND_ID_BYTES.fullmatch
    for item in checked:
        if type(item) is not tuple or len(item) != width:
            raise StoreError(f"{what} takes tuples of {width}: round id bytes, then blobs")
        round_id = item[0]
        if type(round_id) is not bytes or fullmatch(round_id) is None:
            check_round_id_bytes(round_id)  # raises
        for blob in item[1:]:
            if type(blob) is not bytes or not MIN_BLOB_SIZE <= len(blob) <= MAX_BLOB_SIZE:
                check_blob(blob)  # raises
    return checked


def parse_round_key_record(raw_key: bytes, raw_value: bytes) -> tuple[RoundId, bytes]:
    try:
        round_id = RoundId.from_bytes(raw_key)
    except InvalidIdentifier as exc:
        raise CorruptRecord(
            f"round_keys record key of {len(raw_key)} bytes is no round id"
        ) from exc
    return round_id, parse_blob(raw_value, round_id)


def parse_blob(raw_value: bytes, round_id: RoundId) -> bytes:
    if not MIN_BLOB_SIZE <= len(raw_value) <= MAX_BLOB_SIZE:
        raise CorruptRecord(
            f"round_keys record for round {round_id} has {len(raw_value)} bytes,"
            f" expected {MIN_BLOB_SIZE} to {MAX_BLOB_SIZE}"
        )
    return raw_value


# --- snapshots ------------------------------------------------------------------------


def check_snapshot_data(value: object) -> bytes:
    if not isinstance(value, bytes):
        raise StoreError(f"snapshot must be bytes, got {type(value).__name__}")
    if not value:
        raise StoreError("snapshot must not be empty")
    return value


def parse_snapshot_record(raw_key: bytes, raw_value: bytes) -> tuple[int, bytes]:
    sequence = parse_sequence_key(raw_key, db="snapshots")
    if not raw_value:
        raise CorruptRecord(f"snapshot at sequence {sequence} is empty")
    return sequence, raw_value


def check_retention(value: object) -> int:
    if not _is_int(value) or not isinstance(value, int) or value < 1:
        raise StoreError("snapshot retention must be an int >= 1")
    return value


# --- meta -----------------------------------------------------------------------------


def meta_key(name: object) -> bytes:
    """A meta name as a storage key: its UTF-8 bytes (1 to 128 of them)."""
    if not isinstance(name, str):
        raise InvalidIdentifier(f"meta name must be a str, got {type(name).__name__}")
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidIdentifier("meta name is not valid UTF-8 text") from None
    if not 1 <= len(raw) <= MAX_META_NAME_SIZE:
        raise InvalidIdentifier(
            f"meta name must be 1 to {MAX_META_NAME_SIZE} UTF-8 bytes, got {len(raw)}"
        )
    return raw


def writable_meta_key(name: object) -> bytes:
    """Like :func:`meta_key`, but refuses the names the store reserves for itself."""
    raw = meta_key(name)
    assert isinstance(name, str)
    if name.startswith(RESERVED_META_PREFIX):
        raise InvalidIdentifier(f"meta names starting with {RESERVED_META_PREFIX!r} are reserved")
    return raw


def check_meta_value(value: object) -> bytes:
    if not isinstance(value, bytes):
        raise StoreError(f"meta value must be bytes, got {type(value).__name__}")
    return value


def format_version_value(version: int = FORMAT_VERSION) -> bytes:
    return _U32.pack(version)


def parse_format_version(raw: bytes) -> int:
    if len(raw) != _U32.size:
        raise CorruptRecord(f"format version record has {len(raw)} bytes, expected {_U32.size}")
    value: int = _U32.unpack(raw)[0]
    return value


# --- reads ----------------------------------------------------------------------------


def check_limit(value: object) -> int | None:
    if value is None:
        return None
    if not _is_int(value) or not isinstance(value, int) or value < 0:
        raise StoreError("limit must be None or an int >= 0")
    return value
