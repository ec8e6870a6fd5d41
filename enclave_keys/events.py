"""The event vocabulary: round stages, failure reasons, event types and the stored envelope.

Every concrete event is a frozen, slotted, keyword-only dataclass registered with
:func:`event_type` under a short stable wire tag (``"round.requested"``) and a schema
number. Field types and limits are declared in the annotations (``Annotated[int,
IntRange(1, 10)]``); registration turns them into a table of :class:`FieldSpec` that both
construction-time validation and :mod:`enclave_keys.codec` read, so an event that can be
built can be encoded, and an event that decodes is one that could have been built.

No event carries key material: the only ``bytes`` fields allowed are AEAD ciphertexts
named ``ciphertext`` (registration refuses anything else), and reprs show their length
only. This module imports nothing above the vocabulary layer, so it cannot even name a
``SecretBytes``.

Invalid values raise :class:`~enclave_keys.errors.MalformedEvent` (a ``CodecError``);
problems with an event *definition* (bad tag, duplicate tag, unsupported field type) raise
:class:`~enclave_keys.errors.CodecError` at import time.
"""

from __future__ import annotations

import math
import re
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import Field, dataclass, field, fields
from enum import StrEnum
from types import MappingProxyType
from typing import Annotated, Any, ClassVar, Final, TypeAlias, TypeVar, cast

from enclave_keys.errors import CodecError, MalformedEvent
from enclave_keys.ids import EventId, KekVersion, KeyId, RoundId

__all__ = [
    "EMPTY_PARAMETERS",
    "EVENT_TYPES",
    "INT64_MAX",
    "INT64_MIN",
    "MAX_CIPHERTEXT_LEN",
    "MAX_COMMITTEE_SIZE",
    "MAX_SEQUENCE",
    "MAX_SOURCE_LEN",
    "MAX_TEXT_LEN",
    "Ciphertext",
    "DecryptionShareCreated",
    "DecryptionShareFailed",
    "DecryptionShareRequested",
    "Event",
    "FailureReason",
    "FieldKind",
    "FieldSpec",
    "FrozenStrMap",
    "HandlerFailed",
    "IntRange",
    "KekRotated",
    "KeyshareCreated",
    "Length",
    "Matches",
    "MemberCount",
    "Name",
    "NodeSealed",
    "NodeUnsealed",
    "QualifiedName",
    "RootRekeyed",
    "RoundAlreadyCompleted",
    "RoundComplete",
    "RoundEvent",
    "RoundFailed",
    "RoundKeyReady",
    "RoundOpened",
    "RoundPurged",
    "RoundRequested",
    "RoundStage",
    "RoundStageChanged",
    "SequenceNumber",
    "StoredEvent",
    "Text",
    "UnsealMethod",
    "UnsealProgress",
    "check_source",
    "check_timestamp",
    "event_class",
    "event_type",
    "field_spec",
    "timeout_for",
]

# --- limits -----------------------------------------------------------------------------

MAX_SEQUENCE: Final = 2**63 - 1
"""Largest log sequence number (sequences start at 1)."""
MAX_SOURCE_LEN: Final = 64
"""Longest ``StoredEvent.source``, in characters."""
MAX_COMMITTEE_SIZE: Final = 65_535
MAX_TEXT_LEN: Final = 1024
"""Default longest ``str`` field, in characters."""
MAX_CIPHERTEXT_LEN: Final = 16 * 1024 * 1024
"""Longest ``bytes`` field (an AEAD ciphertext), in bytes."""
INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1

_TAG_PATTERN: Final = re.compile(r"[a-z][a-z0-9_]*(?:\.[a-z][a-z0-9_]*)*")
_MAX_TAG_LEN: Final = 64
_QUALIFIED_NAME: Final = r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*"


# --- stages and failure reasons ---------------------------------------------------------


class RoundStage(StrEnum):
    """Where a round is in its lifecycle (design §2)."""

    REQUESTED = "requested"
    COMMITTEE_FORMATION = "committee_formation"
    KEY_GENERATION = "key_generation"  # the DKG
    COMPUTE = "compute"
    DECRYPTION = "decryption"
    COMPLETE = "complete"
    FAILED = "failed"

    @property
    def is_terminal(self) -> bool:
        """True for ``complete`` and ``failed``."""
        return self in (RoundStage.COMPLETE, RoundStage.FAILED)


class FailureReason(StrEnum):
    """Why a round failed. Each reason is exactly one of: timeout, misbehaviour, other.

    A timeout failure is treated as completion at once (the round key is purged); a
    misbehaviour failure keeps the round's context for the accusation phase.
    """

    # timeouts
    COMMITTEE_FORMATION_TIMEOUT = "committee_formation_timeout"
    DKG_TIMEOUT = "dkg_timeout"
    COMPUTE_TIMEOUT = "compute_timeout"
    DECRYPTION_TIMEOUT = "decryption_timeout"
    DEADLINE_EXCEEDED = "deadline_exceeded"  # the deadline reaper
    # misbehaviour
    INVALID_DKG_SHARES = "invalid_dkg_shares"
    INVALID_DECRYPTION_SHARES = "invalid_decryption_shares"
    VERIFICATION_FAILED = "verification_failed"
    # other
    INSUFFICIENT_COMMITTEE = "insufficient_committee"
    NO_INPUTS = "no_inputs"
    COMPUTE_PROVIDER_EXPIRED = "compute_provider_expired"
    COMPUTE_PROVIDER_FAILED = "compute_provider_failed"
    REQUESTER_CANCELLED = "requester_cancelled"
    KEY_CREATION_FAILED = "key_creation_failed"
    KEY_MISSING_AFTER_RESTART = "key_missing_after_restart"
    ROUND_CIPHER_MISSING = "round_cipher_missing"  # a consumer found no cipher in the context
    INTERNAL_ERROR = "internal_error"

    @property
    def is_timeout(self) -> bool:
        """True if the round ran out of time (treated as completion at once)."""
        return self in _TIMEOUTS

    @property
    def is_misbehaviour(self) -> bool:
        """True if a participant misbehaved (the context stays for the accusation phase)."""
        return self in _MISBEHAVIOUR

    @classmethod
    def timeout_for(cls, stage: RoundStage) -> FailureReason:
        """The timeout reason for a round that ran out of time in ``stage``.

        Stages without a timeout of their own (``requested``, ``complete``, ``failed``)
        map to ``deadline_exceeded``, the reason the deadline reaper uses.
        """
        return _STAGE_TIMEOUTS.get(stage, cls.DEADLINE_EXCEEDED)


_TIMEOUTS: Final = frozenset(
    {
        FailureReason.COMMITTEE_FORMATION_TIMEOUT,
        FailureReason.DKG_TIMEOUT,
        FailureReason.COMPUTE_TIMEOUT,
        FailureReason.DECRYPTION_TIMEOUT,
        FailureReason.DEADLINE_EXCEEDED,
    }
)
_MISBEHAVIOUR: Final = frozenset(
    {
        FailureReason.INVALID_DKG_SHARES,
        FailureReason.INVALID_DECRYPTION_SHARES,
        FailureReason.VERIFICATION_FAILED,
    }
)
_STAGE_TIMEOUTS: Final = {
    RoundStage.COMMITTEE_FORMATION: FailureReason.COMMITTEE_FORMATION_TIMEOUT,
    RoundStage.KEY_GENERATION: FailureReason.DKG_TIMEOUT,
    RoundStage.COMPUTE: FailureReason.COMPUTE_TIMEOUT,
    RoundStage.DECRYPTION: FailureReason.DECRYPTION_TIMEOUT,
}


def timeout_for(stage: RoundStage) -> FailureReason:
    """Module-level alias of :meth:`FailureReason.timeout_for`."""
    return FailureReason.timeout_for(stage)


# --- an immutable str -> str mapping -----------------------------------------------------


def _check_text(value: object, what: str, lo: int, hi: int) -> str:
    """``value`` as an exact ``str`` of ``lo..hi`` characters that UTF-8 can encode."""
    if type(value) is not str:
        if not isinstance(value, str):
            raise MalformedEvent(f"{what}: expected str, got {type(value).__name__}")
        value = str.__str__(value)  # a plain copy of a str subclass (e.g. a StrEnum)
    if not lo <= len(value) <= hi:
        raise MalformedEvent(f"{what}: length must be {lo} to {hi} characters")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise MalformedEvent(f"{what}: not encodable as UTF-8") from None
    return value


class FrozenStrMap(Mapping[str, str]):
    """An immutable, hashable ``str -> str`` mapping that iterates in sorted key order.

    Used for free-form round parameters. At most :attr:`MAX_ENTRIES` entries; keys are
    1 to :attr:`MAX_KEY_LEN` characters, values at most :attr:`MAX_VALUE_LEN`. Built from
    a mapping or from ``(key, value)`` pairs (a repeated key is an error).
    """

    __slots__ = ("_hash", "_index", "_items")

    MAX_ENTRIES: ClassVar[int] = 64
    MAX_KEY_LEN: ClassVar[int] = 128
    MAX_VALUE_LEN: ClassVar[int] = MAX_TEXT_LEN

    _items: tuple[tuple[str, str], ...]
    _index: dict[str, str]
    _hash: int

    def __init__(self, items: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> None:
        pairs = list(items.items()) if isinstance(items, Mapping) else list(items)
        if len(pairs) > self.MAX_ENTRIES:
            raise MalformedEvent(f"a parameter map holds at most {self.MAX_ENTRIES} entries")
        index: dict[str, str] = {}
        for pair in pairs:
            if type(pair) is not tuple or len(pair) != 2:
                raise MalformedEvent("parameter map entries must be (key, value) pairs")
            key = _check_text(pair[0], "parameter key", 1, self.MAX_KEY_LEN)
            if key in index:
                raise MalformedEvent("parameter map has a repeated key")
            index[key] = _check_text(pair[1], "parameter value", 0, self.MAX_VALUE_LEN)
        ordered = tuple(sorted(index.items()))
        object.__setattr__(self, "_items", ordered)
        object.__setattr__(self, "_index", dict(ordered))
        object.__setattr__(self, "_hash", hash(ordered))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("FrozenStrMap is immutable")

    def __getitem__(self, key: str) -> str:
        return self._index[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def __eq__(self, other: object) -> bool:
        if isinstance(other, FrozenStrMap):
            return self._items == other._items
        if isinstance(other, Mapping):
            return self._index == dict(other.items())
        return NotImplemented

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        return f"FrozenStrMap({self._index!r})"

    def __reduce__(self) -> tuple[type[FrozenStrMap], tuple[tuple[tuple[str, str], ...]]]:
        return (FrozenStrMap, (self._items,))

    def to_dict(self) -> dict[str, str]:
        """A new plain dict, keys in sorted order (the canonical encoding order)."""
        return dict(self._items)


EMPTY_PARAMETERS: Final = FrozenStrMap()


# --- field constraints and specs --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IntRange:
    """Constraint for an ``int`` field: ``lo <= value <= hi``."""

    lo: int
    hi: int


@dataclass(frozen=True, slots=True)
class Length:
    """Constraint for a ``str`` (characters) or ``bytes`` field: ``lo <= len <= hi``."""

    lo: int
    hi: int


@dataclass(frozen=True, slots=True)
class Matches:
    """Constraint for a ``str`` field: the whole value matches ``pattern``."""

    pattern: str


class FieldKind(StrEnum):
    """The supported field types; each has one wire encoding (see docs/events.md)."""

    ROUND_ID = "round_id"
    KEY_ID = "key_id"
    EVENT_ID = "event_id"
    KEK_VERSION = "kek_version"
    ENUM = "enum"
    INT = "int"
    FLOAT = "float"
    STR = "str"
    BYTES = "bytes"
    STR_MAP = "str_map"


_SIMPLE_KINDS: Final[dict[object, FieldKind]] = {
    RoundId: FieldKind.ROUND_ID,
    KeyId: FieldKind.KEY_ID,
    EventId: FieldKind.EVENT_ID,
    KekVersion: FieldKind.KEK_VERSION,
    int: FieldKind.INT,
    float: FieldKind.FLOAT,
    str: FieldKind.STR,
    bytes: FieldKind.BYTES,
    FrozenStrMap: FieldKind.STR_MAP,
}
_CONSTRAINT_KINDS: Final[dict[type, tuple[FieldKind, ...]]] = {
    IntRange: (FieldKind.INT,),
    Length: (FieldKind.STR, FieldKind.BYTES),
    Matches: (FieldKind.STR,),
}
_DEFAULT_BOUNDS: Final = {
    FieldKind.INT: (INT64_MIN, INT64_MAX),
    FieldKind.STR: (0, MAX_TEXT_LEN),
    FieldKind.BYTES: (0, MAX_CIPHERTEXT_LEN),
}


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One field of a registered event type, as read from its annotation.

    ``lo``/``hi`` are the value range of an ``int`` field or the length range of a
    ``str``/``bytes`` field (0 otherwise); ``pattern`` applies to ``str`` fields;
    ``enum`` is set for enum fields. ``check`` validates and normalises a value given to
    the constructor, raising :class:`MalformedEvent`.
    """

    name: str
    kind: FieldKind
    lo: int
    hi: int
    pattern: re.Pattern[str] | None
    enum: type[StrEnum] | None
    check: Callable[[object], Any] = field(compare=False, repr=False)


def field_spec(
    name: str,
    kind: FieldKind,
    *,
    lo: int | None = None,
    hi: int | None = None,
    pattern: str | None = None,
    enum: type[StrEnum] | None = None,
) -> FieldSpec:
    """Build a :class:`FieldSpec`; ``lo``/``hi`` default to the kind's widest bounds."""
    widest = _DEFAULT_BOUNDS.get(kind, (0, 0))
    lo = widest[0] if lo is None else lo
    hi = widest[1] if hi is None else hi
    if not widest[0] <= lo <= hi <= widest[1]:
        raise CodecError(f"field {name!r}: bounds {lo}..{hi} outside {widest[0]}..{widest[1]}")
    if (kind is FieldKind.ENUM) != (enum is not None):
        raise CodecError(f"field {name!r}: an enum type goes with kind 'enum' only")
    compiled = None if pattern is None else re.compile(pattern)
    check = _make_checker(name, kind, lo, hi, compiled, enum)
    return FieldSpec(name, kind, lo, hi, compiled, enum, check)


def _spec_from_hint(owner: str, name: str, hint: object) -> FieldSpec:
    base: object = hint
    extras: tuple[object, ...] = ()
    if typing.get_origin(hint) is Annotated:
        base, *rest = typing.get_args(hint)
        extras = tuple(rest)
    enum: type[StrEnum] | None = None
    if isinstance(base, type) and issubclass(base, StrEnum):
        kind, enum = FieldKind.ENUM, base
    elif typing.get_origin(base) is Mapping and typing.get_args(base) == (str, str):
        kind = FieldKind.STR_MAP
    elif base in _SIMPLE_KINDS:
        kind = _SIMPLE_KINDS[base]
    else:
        raise CodecError(f"{owner}.{name}: unsupported field type {base!r}")
    lo: int | None = None
    hi: int | None = None
    pattern: str | None = None
    for extra in extras:
        if kind not in _CONSTRAINT_KINDS.get(type(extra), ()):
            raise CodecError(f"{owner}.{name}: constraint {extra!r} does not apply to {kind}")
        if isinstance(extra, IntRange | Length):
            lo, hi = extra.lo, extra.hi
        elif isinstance(extra, Matches):
            pattern = extra.pattern
    return field_spec(name, kind, lo=lo, hi=hi, pattern=pattern, enum=enum)


def _make_checker(
    name: str,
    kind: FieldKind,
    lo: int,
    hi: int,
    pattern: re.Pattern[str] | None,
    enum: type[StrEnum] | None,
) -> Callable[[object], Any]:
    """The constructor-side validator of one field: returns the (normalised) value."""

    def wrong(value: object, expected: str) -> MalformedEvent:
        return MalformedEvent(f"field {name!r}: expected {expected}, got {type(value).__name__}")

    def of_type(cls: type) -> Callable[[object], object]:
        def check(value: object) -> object:
            if not isinstance(value, cls):
                raise wrong(value, cls.__name__)
            return value

        return check

    def check_int(value: object) -> object:
        if type(value) is not int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise wrong(value, "int")
            value = int(value)
        if not lo <= value <= hi:
            raise MalformedEvent(f"field {name!r}: must be from {lo} to {hi}")
        return value

    def check_float(value: object) -> object:
        if type(value) is not float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise wrong(value, "float")
            try:
                value = float(value)
            except OverflowError:
                raise MalformedEvent(f"field {name!r}: out of float range") from None
        if not math.isfinite(value):
            raise MalformedEvent(f"field {name!r}: must be finite")
        return value

    def check_str(value: object) -> object:
        text = _check_text(value, f"field {name!r}", lo, hi)
        if pattern is not None and pattern.fullmatch(text) is None:
            raise MalformedEvent(f"field {name!r}: does not match {pattern.pattern!r}")
        return text

    def check_bytes(value: object) -> object:
        if type(value) is not bytes:
            if not isinstance(value, (bytes, bytearray, memoryview)):
                raise wrong(value, "bytes")
            value = bytes(value)
        if not lo <= len(value) <= hi:
            raise MalformedEvent(f"field {name!r}: length must be {lo} to {hi} bytes")
        return value

    def check_map(value: object) -> object:
        if isinstance(value, FrozenStrMap):
            return value
        if not isinstance(value, Mapping):
            raise wrong(value, "a str -> str mapping")
        return FrozenStrMap(value)

    if enum is not None:
        return of_type(enum)
    checkers: dict[FieldKind, Callable[[object], object]] = {
        FieldKind.ROUND_ID: of_type(RoundId),
        FieldKind.KEY_ID: of_type(KeyId),
        FieldKind.EVENT_ID: of_type(EventId),
        FieldKind.KEK_VERSION: of_type(KekVersion),
        FieldKind.INT: check_int,
        FieldKind.FLOAT: check_float,
        FieldKind.STR: check_str,
        FieldKind.BYTES: check_bytes,
        FieldKind.STR_MAP: check_map,
    }
    return checkers[kind]


# --- events and their registry ----------------------------------------------------------


class Event:
    """Base of every event payload. Concrete types are registered with :func:`event_type`.

    Subclasses put cross-field rules in :meth:`_validate`, never in ``__post_init__``
    (the codec builds decoded events without calling ``__init__`` and then runs only
    the per-field checks and ``_validate``).
    """

    __slots__ = ()

    TAG: ClassVar[str]
    """The wire tag, e.g. ``"round.requested"`` (set by :func:`event_type`)."""
    SCHEMA: ClassVar[int]
    """The schema number of this type's fields (set by :func:`event_type`)."""
    FIELDS: ClassVar[tuple[FieldSpec, ...]]
    """The fields, in declaration order (set by :func:`event_type`)."""

    @property
    def round_id_or_none(self) -> RoundId | None:
        """The round this event belongs to, or ``None`` for a node-level event."""
        return None

    def __post_init__(self) -> None:
        specs = _FIELDS_BY_CLASS.get(type(self))
        if specs is None:
            raise MalformedEvent(f"{type(self).__name__} is not a registered event type")
        for spec in specs:
            value = getattr(self, spec.name)
            checked = spec.check(value)
            if checked is not value:
                object.__setattr__(self, spec.name, checked)
        self._validate()

    def _validate(self) -> None:
        """Cross-field rules of a concrete type; raise :class:`MalformedEvent`."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundEvent(Event):
    """Base of the events that belong to one round. On the wire, ``round_id`` travels in
    the envelope (``StoredEvent.round_id``), not in the field map."""

    round_id: RoundId

    @property
    def round_id_or_none(self) -> RoundId | None:
        return self.round_id


_BY_TAG: dict[str, type[Event]] = {}
_FIELDS_BY_CLASS: dict[type[Event], tuple[FieldSpec, ...]] = {}
EVENT_TYPES: Final[Mapping[str, type[Event]]] = MappingProxyType(_BY_TAG)
"""Every registered event type by wire tag (read-only, registration order)."""

_E = TypeVar("_E", bound=Event)


def event_type(tag: str, *, schema: int) -> Callable[[type[_E]], type[_E]]:
    """Register an event class under a wire ``tag`` and ``schema`` number.

    Apply it *above* ``@dataclass(frozen=True, slots=True, kw_only=True)``. Raises
    :class:`CodecError` at import for a malformed or duplicate tag, a class that is not
    such a dataclass, an unsupported field type, a ``bytes`` field not named
    ``ciphertext``, or a ``round_id`` field outside :class:`RoundEvent`.
    """
    if not isinstance(tag, str) or len(tag) > _MAX_TAG_LEN or not _TAG_PATTERN.fullmatch(tag):
        raise CodecError(f"event tag {tag!r} must be dotted lower-case words")
    if type(schema) is not int or not 1 <= schema <= 2**31 - 1:
        raise CodecError(f"schema of {tag!r} must be an int from 1 to 2**31 - 1")

    def register(cls: type[_E]) -> type[_E]:
        _check_definition(cls, tag)
        try:
            hints = typing.get_type_hints(cls, include_extras=True)
        except Exception as exc:
            raise CodecError(f"{cls.__name__}: cannot resolve field annotations") from exc
        specs = tuple(_spec_from_hint(cls.__name__, f.name, hints[f.name]) for f in _fields(cls))
        for spec in specs:
            if spec.kind is FieldKind.BYTES and spec.name != "ciphertext":
                raise CodecError(
                    f"{cls.__name__}.{spec.name}: the only bytes fields allowed are AEAD "
                    "ciphertexts named 'ciphertext' (no key material in events)"
                )
        has_round_field = any(s.name == "round_id" for s in specs)
        if has_round_field != issubclass(cls, RoundEvent):
            raise CodecError(f"{cls.__name__}: only RoundEvent subclasses have a round_id")
        if tag in _BY_TAG:
            raise CodecError(f"event tag {tag!r} is already registered by {_BY_TAG[tag]!r}")
        cls.TAG = tag
        cls.SCHEMA = schema
        cls.FIELDS = specs
        cls.__repr__ = _safe_repr  # type: ignore[method-assign]
        _BY_TAG[tag] = cls
        _FIELDS_BY_CLASS[cls] = specs
        return cls

    return register


def _fields(cls: type) -> tuple[Field[Any], ...]:
    return fields(cast(Any, cls))


def _check_definition(cls: type, tag: str) -> None:
    if not (isinstance(cls, type) and issubclass(cls, Event)) or cls in (Event, RoundEvent):
        raise CodecError(f"@event_type({tag!r}) applies to subclasses of Event only")
    if cls in _FIELDS_BY_CLASS:
        raise CodecError(f"{cls.__name__} is already registered as {cls.TAG!r}")
    params = cls.__dict__.get("__dataclass_params__")
    frozen_slotted = params is not None and params.frozen and "__slots__" in cls.__dict__
    if not frozen_slotted or not all(f.kw_only and f.init for f in _fields(cls)):
        raise CodecError(
            f"{cls.__name__} must be a @dataclass(frozen=True, slots=True, kw_only=True)"
        )
    if "__post_init__" in cls.__dict__:
        raise CodecError(f"{cls.__name__}: put validation in _validate(), not __post_init__")


def _safe_repr(self: object) -> str:
    """A repr safe to log: ``bytes`` fields show their length only."""
    parts = []
    for spec in _FIELDS_BY_CLASS[type(self)]:  # type: ignore[index]
        value = getattr(self, spec.name)
        shown = f"<{len(value)} bytes>" if spec.kind is FieldKind.BYTES else repr(value)
        parts.append(f"{spec.name}={shown}")
    return f"{type(self).__name__}({', '.join(parts)})"


def event_class(tag: str) -> type[Event] | None:
    """The event type registered under ``tag``, or ``None``."""
    return _BY_TAG.get(tag)


# --- field type aliases -----------------------------------------------------------------

Ciphertext: TypeAlias = Annotated[bytes, Length(1, MAX_CIPHERTEXT_LEN)]
"""An AEAD ciphertext (never plaintext key material)."""
MemberCount: TypeAlias = Annotated[int, IntRange(1, MAX_COMMITTEE_SIZE)]
Text: TypeAlias = Annotated[str, Length(0, MAX_TEXT_LEN)]
Name: TypeAlias = Annotated[str, Length(1, 128)]
QualifiedName: TypeAlias = Annotated[str, Length(1, 256), Matches(_QUALIFIED_NAME)]
SequenceNumber: TypeAlias = Annotated[int, IntRange(1, MAX_SEQUENCE)]


# --- the event types --------------------------------------------------------------------


@event_type("round.requested", schema=1)
@dataclass(frozen=True, slots=True, kw_only=True)
class RoundRequested(RoundEvent):
    """A round was requested: its deadline (POSIX seconds) and committee shape.

    ``1 <= threshold <= committee_size``; ``parameters`` is stored as a
    :class:`FrozenStrMap` whatever mapping is passed.
    """

    deadline: float
    threshold: MemberCount
    committee_size: MemberCount
    parameters: Mapping[str, str] = EMPTY_PARAMETERS

    def _validate(self) -> None:
        if self.threshold > self.committee_size:
            raise MalformedEvent("threshold must not exceed committee_size")


@event_type("round.opened", schema=1)
@dataclass(frozen=True, slots=True, kw_only=True)
class RoundOpened(RoundEvent):
    """The router accepted a fresh request and opened the round's context.

    The round-cipher actor keys rounds on this event, so the router is the single gate
    that filters duplicate requests and requests for rounds that already completed.
    """

    deadline: float


@event_type("round.already_completed", schema=1)
@dataclass(frozen=True, slots=True, kw_only=True)
class RoundAlreadyCompleted(RoundEvent):
    """The router's report of an event (by wire tag) for a round that already completed."""

    rejected_tag: Annotated[str, Length(1, 64)]


@event_type("round.stage_changed", schema=1)
@dataclass(frozen=True, slots=True, kw_only=True)
class RoundStageChanged(RoundEvent):
    """The round moved to ``stage``."""

    stage: RoundStage


@event_type("round.failed", schema=1)
@dataclass(frozen=True, slots=True, kw_only=True)
class RoundFailed(RoundEvent):
    """The round failed in stage ``failed_at`` for ``reason``; ``detail`` is free text."""

    failed_at: RoundStage
    reason: FailureReason
    detail: Text = ""


@event_type("round.complete", schema=1)
@dataclass(frozen=True, slots=True, kw_only=True)
class RoundComplete(RoundEvent):
    """The round ended successfully (or its accusation phase is over)."""


@event_type("round.key_ready", schema=1)
@dataclass(frozen=True, slots=True, kw_only=True)
class RoundKeyReady(RoundEvent):
    """The round key is durably stored, wrapped under ``kek_version``: the round is keyed."""

    key_id: KeyId
    kek_version: KekVersion


@event_type("round.purged", schema=1)
@dataclass(frozen=True, slots=True, kw_only=True)
class RoundPurged(RoundEvent):
    """The round key ``key_id`` was deleted from the store and wiped from memory."""

    key_id: KeyId


@event_type("keyshare.created", schema=1)
@dataclass(frozen=True, slots=True, kw_only=True)
class KeyshareCreated(RoundEvent):
    """A keyshare, sealed under round key ``key_id`` (only its ciphertext is logged)."""

    key_id: KeyId
    ciphertext: Ciphertext


@event_type("decryption_share.requested", schema=1)
@dataclass(frozen=True, slots=True, kw_only=True)
class DecryptionShareRequested(RoundEvent):
    """A decryption share was requested; ``request_id`` correlates the answer."""

    request_id: EventId


@event_type("decryption_share.created", schema=1)
@dataclass(frozen=True, slots=True, kw_only=True)
class DecryptionShareCreated(RoundEvent):
    """The decryption share for ``request_id``, sealed under the round key."""

    request_id: EventId
    ciphertext: Ciphertext


@event_type("decryption_share.failed", schema=1)
@dataclass(frozen=True, slots=True, kw_only=True)
class DecryptionShareFailed(RoundEvent):
    """The decryption share for ``request_id`` could not be made."""

    request_id: EventId
    reason: Annotated[str, Length(1, 256)]


@event_type("node.handler_failed", schema=1)
@dataclass(frozen=True, slots=True, kw_only=True)
class HandlerFailed(Event):
    """A subscriber raised while handling event ``failed_sequence``.

    Only the exception's qualified type name is kept, never its message (which could
    contain anything).
    """

    subscriber: Name
    failed_sequence: SequenceNumber
    error_type: QualifiedName


# --- audit events of the master-key hierarchy (node-level, never any secret) ----------

UnsealMethod: TypeAlias = Annotated[str, Length(1, 32), Matches(re.compile(r"[a-z][a-z0-9_]*"))]


@event_type("master.unseal_progress", schema=1)
@dataclass(frozen=True, slots=True, kw_only=True)
class UnsealProgress(Event):
    """A key-ceremony share was accepted: ``submitted`` of ``threshold`` (no share data)."""

    submitted: MemberCount
    threshold: MemberCount


@event_type("master.unsealed", schema=1)
@dataclass(frozen=True, slots=True, kw_only=True)
class NodeUnsealed(Event):
    """The root key was recovered with ``method`` and the keyring opened."""

    method: UnsealMethod
    active_kek: KekVersion


@event_type("master.sealed", schema=1)
@dataclass(frozen=True, slots=True, kw_only=True)
class NodeSealed(Event):
    """The keyring and every round key were wiped from memory; the node must be unsealed."""


@event_type("master.kek_rotated", schema=1)
@dataclass(frozen=True, slots=True, kw_only=True)
class KekRotated(Event):
    """A new KEK version became active; ``rewrapped`` round keys moved to it in one commit."""

    old_version: KekVersion
    new_version: KekVersion
    rewrapped: Annotated[int, IntRange(0, MAX_SEQUENCE)]


@event_type("master.root_rekeyed", schema=1)
@dataclass(frozen=True, slots=True, kw_only=True)
class RootRekeyed(Event):
    """The root key changed (new passphrase, new shares, new seal); round keys untouched."""

    old_method: UnsealMethod
    new_method: UnsealMethod


# --- the stored envelope ----------------------------------------------------------------

_check_timestamp: Final = field_spec("timestamp", FieldKind.FLOAT).check


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredEvent:
    """An event as it sits in the log: a payload plus its envelope.

    ``round_id`` is the payload's round (``None`` for node-level events); it may be
    omitted and is then derived, and if given it must match. ``timestamp`` is POSIX
    seconds from the node's :class:`~enclave_keys.clock.Clock`. ``source`` names the
    publisher: 1 to 64 printable characters.
    """

    sequence: int
    event_id: EventId
    timestamp: float
    round_id: RoundId | None = None
    causation_id: EventId | None = None
    correlation_id: EventId | None = None
    source: str
    payload: Event

    def __post_init__(self) -> None:
        if type(self.sequence) is not int or not 1 <= self.sequence <= MAX_SEQUENCE:
            raise MalformedEvent("sequence must be an int from 1 to 2**63 - 1")
        if not isinstance(self.event_id, EventId):
            raise MalformedEvent("event_id must be an EventId")
        object.__setattr__(self, "timestamp", _check_timestamp(self.timestamp))
        for name in ("causation_id", "correlation_id"):
            if not isinstance(getattr(self, name), EventId | None):
                raise MalformedEvent(f"{name} must be an EventId or None")
        object.__setattr__(self, "source", check_source(self.source))
        if type(self.payload) not in _FIELDS_BY_CLASS:
            raise MalformedEvent("payload must be an instance of a registered event type")
        derived = self.payload.round_id_or_none
        if self.round_id is None:
            object.__setattr__(self, "round_id", derived)
        elif self.round_id != derived:
            raise MalformedEvent("round_id does not match the payload's round")

    @classmethod
    def stamped(
        cls,
        sequence: int,
        event_id: EventId,
        timestamp: float,
        causation_id: EventId | None,
        correlation_id: EventId | None,
        source: str,
        payload: Event,
    ) -> StoredEvent:
        """An envelope from a sequencer that made, or checked once, every field itself.

        The bus stamps thousands of events a second with sequences it counts, ids it draws,
        one checked clock reading per group and a source checked per request; running
        :meth:`__post_init__` again for each would double its cost. Only the payload is
        checked here (a registered type; its own fields were checked when it was built),
        and the round id is derived from it. Anything else must use the constructor.
        """
        if type(payload) not in _FIELDS_BY_CLASS:
            raise MalformedEvent("payload must be an instance of a registered event type")
        made = _new_envelope(cls)
        _set = object.__setattr__
        _set(made, "sequence", sequence)
        _set(made, "event_id", event_id)
        _set(made, "timestamp", timestamp)
        _set(made, "round_id", payload.round_id_or_none)
        _set(made, "causation_id", causation_id)
        _set(made, "correlation_id", correlation_id)
        _set(made, "source", source)
        _set(made, "payload", payload)
        return made

    @property
    def tag(self) -> str:
        """The payload's wire tag."""
        return self.payload.TAG


_new_envelope: Final = object.__new__


def check_timestamp(value: object) -> float:
    """``value`` as an envelope timestamp (a finite float), else :class:`MalformedEvent`."""
    checked: float = _check_timestamp(value)
    return checked


def check_source(value: object) -> str:
    """``value`` as an envelope source (1 to 64 printable characters), else
    :class:`MalformedEvent`."""
    source = _check_text(value, "source", 1, MAX_SOURCE_LEN)
    if not source.isprintable():
        raise MalformedEvent("source must be printable")
    return source
