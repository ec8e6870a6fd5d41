"""The strict msgpack codec for stored events.

A stored event is one msgpack array::

    [WIRE_VERSION, sequence, event_id, timestamp, round_id, causation_id,
     correlation_id, source, tag, schema, fields]

(see docs/events.md for every element). Encoding is deterministic: fixed element order,
field maps and parameter maps in sorted key order, floats always float64, ints in their
shortest form. Decoding is strict and table-driven: each event type's decoder is built
once, from the type's :class:`~enclave_keys.events.FieldSpec` table, the first time the
type is seen. Whatever bytes it is given, :func:`decode_event` raises only
:class:`~enclave_keys.errors.CodecError` subclasses:

* :class:`TruncatedData` -- the input ends inside the value;
* :class:`TrailingBytes` -- bytes follow the value;
* :class:`UnknownEventTag` -- no event type has the tag;
* :class:`SchemaMismatch` -- wrong wire version or schema number;
* :class:`MalformedEvent` -- anything else: not msgpack, ext types, non-str map keys,
  repeated map keys, lengths over the limits, a missing, extra or mistyped field, a value
  out of range, a malformed id.

Decoded events are built without calling ``__init__`` (it is the costly part of a frozen
dataclass): every field is checked here against the same ``FieldSpec`` the constructor
uses, then the type's cross-field ``_validate()`` runs. The result is equal to the event
the constructor would build from the same values.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import msgpack

from enclave_keys.errors import (
    CodecError,
    InvalidIdentifier,
    MalformedEvent,
    SchemaMismatch,
    TrailingBytes,
    TruncatedData,
    UnknownEventTag,
)
from enclave_keys.events import (
    MAX_CIPHERTEXT_LEN,
    MAX_SEQUENCE,
    MAX_SOURCE_LEN,
    MAX_TEXT_LEN,
    Event,
    FieldKind,
    FieldSpec,
    FrozenStrMap,
    RoundEvent,
    StoredEvent,
    event_class,
)
from enclave_keys.ids import EventId, KekVersion, KeyId, RoundId

__all__ = [
    "MAX_EVENT_SIZE",
    "WIRE_VERSION",
    "decode_event",
    "encode_event",
]

WIRE_VERSION: Final = 1
"""Version of the envelope layout (element 0 of every stored event)."""
MAX_EVENT_SIZE: Final = MAX_CIPHERTEXT_LEN + 1024 * 1024
"""Largest encoded event accepted, in bytes (one maximal ciphertext plus headroom)."""

_ENVELOPE_LEN: Final = 11
_MAX_MAP_LEN: Final = 64
_UNPACKER_OPTIONS: Final[dict[str, Any]] = {
    "raw": False,
    "strict_map_key": True,
    "use_list": True,
    "max_buffer_size": MAX_EVENT_SIZE,
    "max_str_len": 4 * MAX_TEXT_LEN,  # every str is at most MAX_TEXT_LEN characters
    "max_bin_len": MAX_CIPHERTEXT_LEN,
    "max_array_len": _ENVELOPE_LEN,  # the envelope is the only array
    "max_map_len": _MAX_MAP_LEN,
    "max_ext_len": 0,
}
_new: Final = object.__new__


# --- public API ---------------------------------------------------------------------------


def encode_event(stored: StoredEvent) -> bytes:
    """The canonical wire bytes of ``stored`` (equal events give equal bytes).

    Cannot fail for a ``StoredEvent`` built normally: construction validated every value.
    """
    if not isinstance(stored, StoredEvent):
        raise TypeError(f"encode_event() takes a StoredEvent, not {type(stored).__name__}")
    payload = stored.payload
    codec = _codec_for_class(type(payload))
    round_id = stored.round_id
    causation_id = stored.causation_id
    correlation_id = stored.correlation_id
    try:
        message = [
            WIRE_VERSION,
            stored.sequence,
            stored.event_id.raw,
            stored.timestamp,
            None if round_id is None else round_id.value,
            None if causation_id is None else causation_id.raw,
            None if correlation_id is None else correlation_id.raw,
            stored.source,
            codec.tag,
            codec.schema,
            {name: write(getattr(payload, name)) for name, _, _, write in codec.fields},
        ]
        encoded: bytes = msgpack.packb(message, use_bin_type=True, strict_types=True)
    except Exception as exc:  # only reachable if a validated value was tampered with
        raise MalformedEvent(f"cannot encode {codec.tag} ({type(exc).__name__})") from None
    if len(encoded) > MAX_EVENT_SIZE:
        raise MalformedEvent(f"encoded event exceeds {MAX_EVENT_SIZE} bytes")
    return encoded


def decode_event(data: bytes | bytearray | memoryview) -> StoredEvent:
    """Decode one stored event, strictly.

    Raises only :class:`CodecError` subclasses for any bytes-like input (``TypeError``
    if ``data`` is not bytes, bytearray or memoryview).
    """
    message = _unpack(data)
    if type(message) is not list or not message:
        raise MalformedEvent("a stored event is a non-empty msgpack array")
    version = message[0]
    if type(version) is not int or version != WIRE_VERSION:
        raise SchemaMismatch(f"wire version must be {WIRE_VERSION}")
    if len(message) != _ENVELOPE_LEN:
        raise MalformedEvent(f"a stored event has {_ENVELOPE_LEN} elements")
    (
        _,
        sequence,
        event_id,
        timestamp,
        round_id,
        causation_id,
        correlation_id,
        source,
        tag,
        schema,
        fields,
    ) = message

    if type(tag) is not str:
        raise MalformedEvent("tag must be a str")
    codec = _CODECS_BY_TAG.get(tag) or _codec_for_tag(tag)
    if type(schema) is not int or schema != codec.schema:
        raise SchemaMismatch(f"{tag} is read at schema {codec.schema}")

    if type(sequence) is not int or not 1 <= sequence <= MAX_SEQUENCE:
        raise MalformedEvent("sequence must be an int from 1 to 2**63 - 1")
    if type(timestamp) is not float or not math.isfinite(timestamp):
        raise MalformedEvent("timestamp must be a finite float")
    if type(source) is not str or not 1 <= len(source) <= MAX_SOURCE_LEN:
        raise MalformedEvent(f"source must be a str of 1 to {MAX_SOURCE_LEN} characters")
    if not source.isprintable():
        raise MalformedEvent("source must be printable")
    rid = None if round_id is None else _read_round_id(round_id, "round_id")

    stored = _new(StoredEvent)
    _set_sequence(stored, sequence)
    _set_event_id(stored, _read_event_id(event_id, "event_id"))
    _set_timestamp(stored, timestamp)
    _set_round_id(stored, rid)
    if causation_id is not None:
        causation_id = _read_event_id(causation_id, "causation_id")
    _set_causation_id(stored, causation_id)
    if correlation_id is not None:
        correlation_id = _read_event_id(correlation_id, "correlation_id")
    _set_correlation_id(stored, correlation_id)
    _set_source(stored, source)
    _set_payload(stored, codec.decode(rid, fields))
    return stored


# --- msgpack ------------------------------------------------------------------------------


def _reject_ext(code: int, data: bytes) -> object:
    raise MalformedEvent("msgpack ext types are not allowed")


def _unique_keys(pairs: list[tuple[object, object]]) -> dict[object, object]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise MalformedEvent("a map has a repeated key")
    return result


_LOCAL: Final = threading.local()
_REUSE_LIMIT: Final = 64 * 1024


def _new_unpacker() -> Any:
    return msgpack.Unpacker(
        None, ext_hook=_reject_ext, object_pairs_hook=_unique_keys, **_UNPACKER_OPTIONS
    )


def _unpack(data: bytes | bytearray | memoryview) -> object:
    """Exactly one msgpack value from ``data``.

    Each thread reuses one ``Unpacker`` (building one costs more than decoding a small
    event); after any failure, or a large input, it is dropped, so no half-read input
    leaks into the next call and no large buffer stays alive.
    """
    if isinstance(data, (bytes, bytearray)):
        size = len(data)
    elif isinstance(data, memoryview):
        size = data.nbytes
    else:
        raise TypeError(f"decode_event() takes bytes, not {type(data).__name__}")
    if size == 0:
        raise TruncatedData("no bytes to decode")
    if size > MAX_EVENT_SIZE:
        raise MalformedEvent(f"encoded event exceeds {MAX_EVENT_SIZE} bytes")
    unpacker = getattr(_LOCAL, "unpacker", None)
    if unpacker is None:
        unpacker = _LOCAL.unpacker = _new_unpacker()
    start = unpacker.tell()
    error: CodecError | None = None
    try:
        unpacker.feed(data)
        value = unpacker.unpack()
    except CodecError:  # raised by our hooks
        _LOCAL.unpacker = None
        raise
    except msgpack.OutOfData:
        error = TruncatedData("the input ends inside the encoded event")
    except Exception as exc:  # msgpack reports bad input with assorted ValueErrors
        error = MalformedEvent(f"not a valid msgpack value ({type(exc).__name__})")
    except BaseException:  # KeyboardInterrupt and friends
        _LOCAL.unpacker = None
        raise
    if error is not None:
        # Raised outside the handler so that no __context__ is attached: msgpack's
        # UnicodeDecodeError would carry the input bytes.
        _LOCAL.unpacker = None
        raise error
    consumed = unpacker.tell() - start
    if consumed != size:
        _LOCAL.unpacker = None
        raise TrailingBytes(f"{size - consumed} bytes follow the encoded event")
    if size > _REUSE_LIMIT:
        _LOCAL.unpacker = None  # do not keep a large buffer alive in every thread
    return value


# --- identifiers --------------------------------------------------------------------------
# Round ids, key ids and KEK versions recur through a log, so their (validated)
# construction is cached. Event ids are unique; they are built like the decoded events,
# without ``__init__``, after the same check EventId makes (exactly 16 bytes).


@functools.lru_cache(maxsize=4096)
def _round_id(text: str) -> RoundId:
    return RoundId(text)


@functools.lru_cache(maxsize=4096)
def _key_id(raw: bytes) -> KeyId:
    return KeyId(raw)


@functools.lru_cache(maxsize=256)
def _kek_version(number: int) -> KekVersion:
    return KekVersion(number)


def _read_round_id(value: object, name: str) -> RoundId:
    if type(value) is not str:
        raise _wrong_type(name, "str", value)
    try:
        return _round_id(value)
    except InvalidIdentifier:
        raise MalformedEvent(f"{name} is not a valid round id") from None


def _read_event_id(value: object, name: str) -> EventId:
    if type(value) is not bytes:
        raise _wrong_type(name, "bin", value)
    if len(value) != EventId.SIZE:
        raise MalformedEvent(f"{name} is not a valid event id")
    event_id = _new(EventId)
    _set_id_raw(event_id, value)
    return event_id


def _wrong_type(name: str, expected: str, value: object) -> MalformedEvent:
    return MalformedEvent(f"{name}: expected {expected}, got {type(value).__name__}")


# --- per-type codecs ----------------------------------------------------------------------

_Setter = Callable[[object, object], None]
_Reader = Callable[[object], object]
_Writer = Callable[[Any], object]


def _slot_setter(cls: type, name: str) -> _Setter:
    """The slot descriptor's ``__set__``: writes a frozen dataclass field in place."""
    setter: _Setter = getattr(cls, name).__set__
    return setter


_set_sequence: Final = _slot_setter(StoredEvent, "sequence")
_set_event_id: Final = _slot_setter(StoredEvent, "event_id")
_set_timestamp: Final = _slot_setter(StoredEvent, "timestamp")
_set_round_id: Final = _slot_setter(StoredEvent, "round_id")
_set_causation_id: Final = _slot_setter(StoredEvent, "causation_id")
_set_correlation_id: Final = _slot_setter(StoredEvent, "correlation_id")
_set_source: Final = _slot_setter(StoredEvent, "source")
_set_payload: Final = _slot_setter(StoredEvent, "payload")
_set_id_raw: Final = _slot_setter(EventId, "raw")


def _reader(spec: FieldSpec) -> _Reader:
    """Wire value -> field value, checking the exact wire type first (bool is not int,
    int is not float, str is not bytes), then the same limits as the constructor."""
    name, kind, lo, hi, check = spec.name, spec.kind, spec.lo, spec.hi, spec.check

    def typed(wire_type: type, wire_name: str) -> _Reader:
        def read(value: object) -> object:
            if type(value) is not wire_type:
                raise _wrong_type(name, wire_name, value)
            return check(value)

        return read

    def read_int(value: object) -> object:
        if type(value) is not int:
            raise _wrong_type(name, "int", value)
        if not lo <= value <= hi:
            raise MalformedEvent(f"{name}: must be from {lo} to {hi}")
        return value

    def read_map(value: object) -> object:
        if type(value) is not dict:
            raise _wrong_type(name, "map", value)
        return FrozenStrMap(value)

    if spec.enum is not None:
        members = {member.value: member for member in spec.enum}
        enum_name = spec.enum.__name__

        def read_enum(value: object) -> object:
            member = members.get(value) if type(value) is str else None
            if member is None:
                raise MalformedEvent(f"{name}: not a {enum_name} value")
            return member

        return read_enum

    def cached_id(wire_type: type, make: Callable[[Any], object], what: str) -> _Reader:
        def read(value: object) -> object:
            if type(value) is not wire_type:
                raise _wrong_type(name, wire_type.__name__, value)
            try:
                return make(value)
            except InvalidIdentifier:
                raise MalformedEvent(f"{name} is not a valid {what}") from None

        return read

    readers: dict[FieldKind, _Reader] = {
        FieldKind.ROUND_ID: cached_id(str, _round_id, "round id"),
        FieldKind.KEY_ID: cached_id(bytes, _key_id, "key id"),
        FieldKind.EVENT_ID: lambda value: _read_event_id(value, name),
        FieldKind.KEK_VERSION: cached_id(int, _kek_version, "KEK version"),
        FieldKind.INT: read_int,
        FieldKind.FLOAT: typed(float, "float"),
        FieldKind.STR: typed(str, "str"),
        FieldKind.BYTES: typed(bytes, "bin"),
        FieldKind.STR_MAP: read_map,
    }
    return readers[kind]


def _identity(value: object) -> object:
    return value


_WRITERS: Final[dict[FieldKind, _Writer]] = {
    FieldKind.ROUND_ID: lambda value: value.value,
    FieldKind.KEY_ID: lambda value: value.raw,
    FieldKind.EVENT_ID: lambda value: value.raw,
    FieldKind.KEK_VERSION: lambda value: value.number,
    FieldKind.ENUM: lambda value: value.value,
    FieldKind.INT: _identity,
    FieldKind.FLOAT: _identity,
    FieldKind.STR: _identity,
    FieldKind.BYTES: _identity,
    FieldKind.STR_MAP: lambda value: value.to_dict(),
}


@dataclass(frozen=True, slots=True)
class _TypeCodec:
    """Everything needed to encode and decode one event type, built once."""

    cls: type[Event]
    tag: str
    schema: int
    set_round_id: _Setter | None  # None for node-level events
    # (name, setter, reader, writer) per wire field, in sorted name order
    fields: tuple[tuple[str, _Setter, _Reader, _Writer], ...]
    names: frozenset[str]
    validate: Callable[[Any], None] | None  # the type's _validate, if it has rules

    def decode(self, round_id: RoundId | None, fields: object) -> Event:
        if type(fields) is not dict:
            raise MalformedEvent(f"{self.tag}: fields must be a map")
        if fields.keys() != self.names:
            missing = sorted(self.names - fields.keys())
            extra = len(fields.keys() - self.names)
            raise MalformedEvent(f"{self.tag}: missing fields {missing}, {extra} unexpected")
        event = _new(self.cls)
        if self.set_round_id is not None:
            if round_id is None:
                raise MalformedEvent(f"{self.tag} belongs to a round: round_id is required")
            self.set_round_id(event, round_id)
        elif round_id is not None:
            raise MalformedEvent(f"{self.tag} is a node-level event: round_id must be nil")
        for name, setter, read, _ in self.fields:
            setter(event, read(fields[name]))
        if self.validate is not None:
            self.validate(event)
        return event


def _build_codec(cls: type[Event]) -> _TypeCodec:
    is_round_event = issubclass(cls, RoundEvent)
    wire_specs = sorted(
        (spec for spec in cls.FIELDS if not (is_round_event and spec.name == "round_id")),
        key=lambda spec: spec.name,
    )
    if len(wire_specs) > _MAX_MAP_LEN:
        raise CodecError(f"{cls.TAG}: more than {_MAX_MAP_LEN} fields")
    return _TypeCodec(
        cls=cls,
        tag=cls.TAG,
        schema=cls.SCHEMA,
        set_round_id=_slot_setter(cls, "round_id") if is_round_event else None,
        fields=tuple(
            (spec.name, _slot_setter(cls, spec.name), _reader(spec), _WRITERS[spec.kind])
            for spec in wire_specs
        ),
        names=frozenset(spec.name for spec in wire_specs),
        validate=None if cls._validate is Event._validate else cls._validate,
    )


_CODECS_BY_TAG: dict[str, _TypeCodec] = {}
_CODECS_BY_CLASS: dict[type[Event], _TypeCodec] = {}


def _codec_for_tag(tag: str) -> _TypeCodec:
    cls = event_class(tag)
    if cls is None:
        raise UnknownEventTag(f"unknown event tag {tag[:64]!r}")
    return _codec_for_class(cls)


def _codec_for_class(cls: type[Event]) -> _TypeCodec:
    codec = _CODECS_BY_CLASS.get(cls)
    if codec is None:
        if event_class(getattr(cls, "TAG", "")) is not cls:
            raise MalformedEvent(f"{cls.__name__} is not a registered event type")
        codec = _build_codec(cls)
        _CODECS_BY_CLASS[cls] = codec
        _CODECS_BY_TAG[codec.tag] = codec
    return codec
