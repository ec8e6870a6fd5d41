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

Two paths, one set of checks. Replay decodes every record of the log, all of them written
by :func:`encode_event`, so :func:`decode_event` first tries the *canonical path*: one
``msgpack.unpackb`` call (no Python hook per map, no buffer bookkeeping), maps kept as
their ``(key, value)`` pairs, and a field map accepted only in canonical form -- exactly
the type's fields, in sorted order, so no key can be missing, extra or repeated. Every
other check is the same code on both paths. Whatever the canonical path does not accept,
for any reason, is decoded again by the *checked path* (a reused ``Unpacker`` whose hook
refuses repeated keys in any map, then the same checks), which alone decides the outcome:
errors are exactly what they would be without the canonical path, and a valid event in a
non-canonical encoding (other key order, wider headers) still decodes.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
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
    EMPTY_PARAMETERS,
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
_MAX_STR_BYTES: Final = 4 * MAX_TEXT_LEN  # every str is at most MAX_TEXT_LEN characters
_UNPACKER_OPTIONS: Final[dict[str, Any]] = {
    "raw": False,
    "strict_map_key": True,
    "use_list": True,
    "max_buffer_size": MAX_EVENT_SIZE,
    "max_str_len": _MAX_STR_BYTES,
    "max_bin_len": MAX_CIPHERTEXT_LEN,
    "max_array_len": _ENVELOPE_LEN,  # the envelope is the only array
    "max_map_len": _MAX_MAP_LEN,
    "max_ext_len": 0,
}
_new: Final = object.__new__
_unpackb: Final = msgpack.unpackb
_INF: Final = math.inf


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
            {name: write(getattr(payload, name)) for name, write in codec.fields},
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
    if ``data`` is not bytes, bytearray or memoryview). Canonical ``bytes`` (what
    :func:`encode_event` writes) take the canonical path; anything it does not accept is
    decoded by the checked path, which alone decides errors (see the module docstring).
    """
    if type(data) is bytes:
        stored = _decode_canonical(data)
        if stored is not None:
            return stored
    return _decode_message(_unpack(data), canonical=False)


def _decode_canonical(data: bytes) -> StoredEvent | None:
    """The event in ``data`` if it is canonically encoded and valid, else ``None``.

    Swallowing every exception is safe because nothing is decided here: on ``None`` the
    checked path decodes ``data`` from scratch and raises its own, precise error. A value
    is returned only after every check the checked path makes, on the same values:

    * one ``msgpack.unpackb`` call applies the checked unpacker's limits and refuses what
      it refuses (ext types, non-str/bin keys, invalid UTF-8, absurd nesting, truncated
      input, trailing bytes). It runs no Python hook: each map comes back as a tuple of
      its (key, value) pairs, so no key is lost to a repeat;
    * the one check it skips -- a repeated key in some map -- cannot matter: on success
      every map was read, as pairs, where a map is allowed, and the field map had exactly
      the type's keys in sorted order (:attr:`_TypeCodec.read_pairs`), while a parameter
      map with a repeated key is refused by :class:`FrozenStrMap`.

    The options are spelled out because ``unpackb(**options)`` parses them far more slowly.
    """
    if len(data) > MAX_EVENT_SIZE:
        return None
    try:
        message = _unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            object_pairs_hook=tuple,
            ext_hook=_reject_ext,
            max_str_len=_MAX_STR_BYTES,
            max_bin_len=MAX_CIPHERTEXT_LEN,
            max_array_len=_ENVELOPE_LEN,
            max_map_len=_MAX_MAP_LEN,
            max_ext_len=0,
        )
        return _decode_message(message, canonical=True)
    except Exception:  # not accepted here, whatever the reason: the checked path decides
        return None


class _NotCanonical(Exception):
    """Raised on the canonical path for input it leaves to the checked path."""


# --- the envelope -------------------------------------------------------------------------


def _decode_message(message: object, *, canonical: bool) -> StoredEvent:
    """The stored event in an unpacked ``message``: maps as (key, value) pairs from the
    canonical path, as dicts from the checked path; the checks are the same."""
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
    if type(timestamp) is not float or not -_INF < timestamp < _INF:  # NaN fails both
        raise MalformedEvent("timestamp must be a finite float")
    if type(source) is not str or not 1 <= len(source) <= MAX_SOURCE_LEN:
        raise MalformedEvent(f"source must be a str of 1 to {MAX_SOURCE_LEN} characters")
    if not source.isprintable():
        raise MalformedEvent("source must be printable")
    if round_id is not None:
        round_id = _read_round_id(round_id)
    event_id = _read_event_id(event_id, "event_id")
    if causation_id is not None:
        causation_id = _read_causation_id(causation_id)
    if correlation_id is not None:
        correlation_id = _read_correlation_id(correlation_id)
    payload = codec.read_pairs(round_id, fields) if canonical else codec.decode(round_id, fields)

    stored = _new(StoredEvent)
    _set_sequence(stored, sequence)
    _set_event_id(stored, event_id)
    _set_timestamp(stored, timestamp)
    _set_round_id(stored, round_id)
    _set_causation_id(stored, causation_id)
    _set_correlation_id(stored, correlation_id)
    _set_source(stored, source)
    _set_payload(stored, payload)
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
    """Exactly one msgpack value from ``data`` (the checked path).

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
# Round ids, key ids, KEK versions and the event ids that recur through a log (causation,
# correlation and request ids) are built through small caches keyed by their wire value:
# a round's events repeat them. Each cache holds only values that passed the id type's own
# check. Event ids and key ids are built like the decoded events, without ``__init__``,
# after the same check their type makes (exactly 16 bytes); an event's own id is unique,
# so it is not cached.

_Reader = Callable[[object], Any]


@functools.lru_cache(maxsize=4096)
def _round_id(text: str) -> RoundId:
    return RoundId(text)


@functools.lru_cache(maxsize=4096)
def _key_id(raw: bytes) -> KeyId:
    if len(raw) != KeyId.SIZE:
        raise InvalidIdentifier(f"key id must be exactly {KeyId.SIZE} bytes")
    key_id = _new(KeyId)
    _set_key_raw(key_id, raw)
    return key_id


@functools.lru_cache(maxsize=256)
def _kek_version(number: int) -> KekVersion:
    return KekVersion(number)


@functools.lru_cache(maxsize=1024)  # causes and correlations are recent events
def _event_id(raw: bytes) -> EventId:
    if len(raw) != EventId.SIZE:
        raise InvalidIdentifier(f"event id must be exactly {EventId.SIZE} bytes")
    event_id = _new(EventId)
    _set_id_raw(event_id, raw)
    return event_id


def _id_reader(
    name: str, wire_type: type, wire_name: str, make: Callable[[Any], Any], what: str
) -> _Reader:
    """A reader of one id: the exact wire type, then ``make`` (a cached constructor)."""

    def read(value: object) -> Any:
        if type(value) is not wire_type:
            raise _wrong_type(name, wire_name, value)
        try:
            return make(value)
        except InvalidIdentifier:
            raise MalformedEvent(f"{name} is not a valid {what}") from None

    return read


_read_round_id: Final = _id_reader("round_id", str, "str", _round_id, "round id")
_read_causation_id: Final = _id_reader("causation_id", bytes, "bin", _event_id, "event id")
_read_correlation_id: Final = _id_reader("correlation_id", bytes, "bin", _event_id, "event id")


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
_Writer = Callable[[Any], object]
_PairsReader = Callable[[RoundId | None, object], Event]


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
_set_key_raw: Final = _slot_setter(KeyId, "raw")


def _reader(spec: FieldSpec) -> _Reader:
    """Wire value -> field value, checking the exact wire type first (bool is not int,
    int is not float, str is not bytes), then the same limits as the constructor; a
    precise :class:`MalformedEvent` otherwise."""
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
        # A dict on the checked path; on the canonical path the map's (key, value) pairs,
        # which FrozenStrMap takes too (refusing a repeated key). Nothing else decodes to
        # an exact tuple: msgpack arrays are lists here.
        if type(value) is not dict and type(value) is not tuple:
            raise _wrong_type(name, "map", value)
        return FrozenStrMap(value) if value else EMPTY_PARAMETERS

    if spec.enum is not None:
        members = {member.value: member for member in spec.enum}
        enum_name = spec.enum.__name__

        def read_enum(value: object) -> object:
            member = members.get(value) if type(value) is str else None
            if member is None:
                raise MalformedEvent(f"{name}: not a {enum_name} value")
            return member

        return read_enum

    readers: dict[FieldKind, _Reader] = {
        FieldKind.ROUND_ID: _id_reader(name, str, "str", _round_id, "round id"),
        FieldKind.KEY_ID: _id_reader(name, bytes, "bytes", _key_id, "key id"),
        FieldKind.EVENT_ID: _id_reader(name, bytes, "bin", _event_id, "event id"),
        FieldKind.KEK_VERSION: _id_reader(name, int, "int", _kek_version, "KEK version"),
        FieldKind.INT: read_int,
        FieldKind.FLOAT: typed(float, "float"),
        FieldKind.STR: typed(str, "str"),
        FieldKind.BYTES: typed(bytes, "bin"),
        FieldKind.STR_MAP: read_map,
    }
    return readers[kind]


# The usual value of a field of these kinds is accepted by a test written into the type's
# compiled reader: the very test the field's reader makes on a value of the exact wire type
# (ASCII text is valid UTF-8; other text is left to the reader's full check). A value that
# fails it goes to the reader, which explains (or, for non-ASCII text, may accept it).
# Kinds not listed (ids, enums, maps) always go to their reader: one call, mostly a cache hit.
_INLINE_TESTS: Final[dict[FieldKind, str]] = {
    FieldKind.INT: "type({v}) is int and {lo} <= {v} <= {hi}",
    FieldKind.FLOAT: "type({v}) is float and -_INF < {v} < _INF",  # finite: NaN fails both
    FieldKind.BYTES: "type({v}) is bytes and {lo} <= len({v}) <= {hi}",
    FieldKind.STR: "type({v}) is str and {lo} <= len({v}) <= {hi} and {v}.isascii()",
}


def _compile_read_pairs(cls: type[Event], specs: list[FieldSpec]) -> tuple[_PairsReader, str]:
    """The payload reader of one type, compiled once, and its source.

    It takes the field map as its (key, value) pairs and accepts it only in canonical form:
    exactly the type's fields, in sorted order -- so none is missing, extra or repeated --
    else it raises :class:`_NotCanonical`. Then each value costs an inline test and a slot
    store (or its reader's call, see ``_INLINE_TESTS``), where a loop over per-field
    readers would cost several Python calls. For ``RoundKeyReady`` it reads::

        def read_pairs(round_id, fields):
            if type(fields) is not tuple or len(fields) != 2:
                raise _NotCanonical
            [(k0, v0), (k1, v1)] = fields
            if k0 != 'kek_version' or k1 != 'key_id':
                raise _NotCanonical
            event = _new(cls)
            if round_id is None:
                raise MalformedEvent(round_id_error)
            set_round_id(event, round_id)
            set0(event, read0(v0))
            set1(event, read1(v1))
            return event

    Only ints (field count, bounds) and ``repr`` of the field names -- identifiers -- are
    written into the source; every object it uses is passed in its namespace.
    """
    names: dict[str, object] = {
        "_NotCanonical": _NotCanonical,
        "MalformedEvent": MalformedEvent,
        "_new": _new,
        "_INF": _INF,
        "cls": cls,
    }
    count = len(specs)
    lines = [
        "def read_pairs(round_id, fields):",
        f"    if type(fields) is not tuple or len(fields) != {count:d}:",
        "        raise _NotCanonical",
    ]
    if specs:
        pairs = ", ".join(f"(k{i}, v{i})" for i in range(count))
        keys = " or ".join(f"k{i} != {spec.name!r}" for i, spec in enumerate(specs))
        lines += [f"    [{pairs}] = fields", f"    if {keys}:", "        raise _NotCanonical"]
    lines.append("    event = _new(cls)")
    if issubclass(cls, RoundEvent):
        names["set_round_id"] = _slot_setter(cls, "round_id")
        names["round_id_error"] = f"{cls.TAG} belongs to a round: round_id is required"
        lines += [
            "    if round_id is None:",
            "        raise MalformedEvent(round_id_error)",
            "    set_round_id(event, round_id)",
        ]
    else:
        names["round_id_error"] = f"{cls.TAG} is a node-level event: round_id must be nil"
        lines += ["    if round_id is not None:", "        raise MalformedEvent(round_id_error)"]
    for i, spec in enumerate(specs):
        names[f"set{i}"] = _slot_setter(cls, spec.name)
        names[f"read{i}"] = _reader(spec)
        lines.append(f"    set{i}(event, {_read_expression(i, spec, names)})")
    if cls._validate is not Event._validate:
        names["validate"] = cls._validate
        lines.append("    validate(event)")
    lines.append("    return event")
    source = "\n".join(lines) + "\n"
    exec(compile(source, f"<{cls.TAG} reader>", "exec"), names)  # noqa: S102 - see above
    read_pairs: _PairsReader = names["read_pairs"]  # type: ignore[assignment]
    return read_pairs, source


def _read_expression(i: int, spec: FieldSpec, names: dict[str, object]) -> str:
    """The expression reading value ``v{i}``: its inline test, else its reader."""
    test = _INLINE_TESTS.get(spec.kind)
    if test is None:
        return f"read{i}(v{i})"
    # ":d" writes an integer literal into the source, or raises
    test = test.format(v=f"v{i}", lo=f"{spec.lo:d}", hi=f"{spec.hi:d}")
    if spec.pattern is not None:
        names[f"pattern{i}"] = spec.pattern
        test += f" and pattern{i}.fullmatch(v{i}) is not None"
    return f"v{i} if {test} else read{i}(v{i})"


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
    fields: tuple[tuple[str, _Writer], ...]  # (name, writer) per wire field, sorted by name
    names: frozenset[str]
    read_pairs: _PairsReader  # see _compile_read_pairs
    source: str = field(repr=False)  # of read_pairs

    def decode(self, round_id: RoundId | None, fields: object) -> Event:
        """The payload from a field map decoded as a dict (the checked path): the field
        names are checked here, with a precise error, then the values are read by
        :attr:`read_pairs`, given in canonical order."""
        if type(fields) is not dict:
            raise MalformedEvent(f"{self.tag}: fields must be a map")
        if fields.keys() != self.names:
            missing = sorted(self.names - fields.keys())
            extra = len(fields.keys() - self.names)
            raise MalformedEvent(f"{self.tag}: missing fields {missing}, {extra} unexpected")
        return self.read_pairs(round_id, tuple((name, fields[name]) for name, _ in self.fields))


def _build_codec(cls: type[Event]) -> _TypeCodec:
    is_round_event = issubclass(cls, RoundEvent)
    wire_specs = sorted(
        (spec for spec in cls.FIELDS if not (is_round_event and spec.name == "round_id")),
        key=lambda spec: spec.name,
    )
    if len(wire_specs) > _MAX_MAP_LEN:
        raise CodecError(f"{cls.TAG}: more than {_MAX_MAP_LEN} fields")
    read_pairs, source = _compile_read_pairs(cls, wire_specs)
    return _TypeCodec(
        cls=cls,
        tag=cls.TAG,
        schema=cls.SCHEMA,
        fields=tuple((spec.name, _WRITERS[spec.kind]) for spec in wire_specs),
        names=frozenset(spec.name for spec in wire_specs),
        read_pairs=read_pairs,
        source=source,
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
