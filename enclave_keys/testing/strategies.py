"""Hypothesis strategies for enclave_keys ids and events.

Requires the ``test`` extra (``pip install enclave-keys[test]``), which brings
Hypothesis; the rest of the library never imports this module.

Every value these strategies draw is valid: it constructs without error, and a stored
event encodes and decodes back to itself. :func:`events` covers every registered event
type, including types registered by your own code (strategies for their fields are
derived from their :class:`~enclave_keys.events.FieldSpec` table).

Example::

    from hypothesis import given
    from enclave_keys.testing.strategies import stored_events

    @given(stored_events())
    def test_my_projection_accepts_any_event(stored): ...
"""

from __future__ import annotations

import string
from typing import Any

from hypothesis import reject
from hypothesis import strategies as st

from enclave_keys.errors import MalformedEvent
from enclave_keys.events import (
    EVENT_TYPES,
    MAX_COMMITTEE_SIZE,
    MAX_SEQUENCE,
    MAX_SOURCE_LEN,
    Event,
    FailureReason,
    FieldKind,
    FieldSpec,
    FrozenStrMap,
    HandlerFailed,
    RoundRequested,
    RoundStage,
    StoredEvent,
)
from enclave_keys.ids import EventId, KekVersion, KeyId, RoundId

__all__ = [
    "ciphertexts",
    "event_ids",
    "events",
    "events_of",
    "failure_reasons",
    "field_values",
    "handler_failed",
    "kek_versions",
    "key_ids",
    "parameters",
    "qualified_names",
    "round_ids",
    "round_requested",
    "round_stages",
    "sources",
    "stored_events",
    "timestamps",
]

# Year 2100: far enough for deadlines, near enough to be a plausible clock reading.
_LATEST_TIMESTAMP = 4_102_444_800.0


# --- identifiers and enums ----------------------------------------------------------------


_ALNUM = string.ascii_letters + string.digits


def round_ids() -> st.SearchStrategy[RoundId]:
    """Valid round ids: 1-128 characters of ``[A-Za-z0-9._:-]``, starting alphanumeric."""
    first = st.sampled_from(_ALNUM)
    rest = st.text(_ALNUM + "._:-", max_size=RoundId.MAX_LENGTH - 1)
    return st.builds(lambda head, tail: RoundId(head + tail), first, rest)


def key_ids() -> st.SearchStrategy[KeyId]:
    """Key ids (16 arbitrary bytes)."""
    return st.binary(min_size=16, max_size=16).map(KeyId)


def event_ids() -> st.SearchStrategy[EventId]:
    """Event ids (16 arbitrary bytes)."""
    return st.binary(min_size=16, max_size=16).map(EventId)


def kek_versions() -> st.SearchStrategy[KekVersion]:
    """KEK versions, small ones more often."""
    return st.one_of(st.integers(1, 8), st.integers(1, KekVersion.MAX)).map(KekVersion)


def round_stages() -> st.SearchStrategy[RoundStage]:
    return st.sampled_from(RoundStage)


def failure_reasons() -> st.SearchStrategy[FailureReason]:
    return st.sampled_from(FailureReason)


# --- field values -------------------------------------------------------------------------


def timestamps(
    min_value: float = 0.0, max_value: float = _LATEST_TIMESTAMP
) -> st.SearchStrategy[float]:
    """Finite POSIX times (by default from 1970 to 2100)."""
    return st.floats(min_value=min_value, max_value=max_value, allow_nan=False)


def ciphertexts(max_size: int = 256) -> st.SearchStrategy[bytes]:
    """Stand-ins for AEAD ciphertexts: 1 to ``max_size`` random bytes."""
    return st.binary(min_size=1, max_size=max_size)


def parameters() -> st.SearchStrategy[FrozenStrMap]:
    """Small round-parameter maps."""
    keys = st.text(min_size=1, max_size=16)
    values = st.text(max_size=32)
    return st.dictionaries(keys, values, max_size=6).map(FrozenStrMap)


def sources() -> st.SearchStrategy[str]:
    """Valid ``StoredEvent.source`` names: 1 to 64 printable characters."""
    printable = st.characters(exclude_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"))
    return st.text(printable, min_size=1, max_size=MAX_SOURCE_LEN).filter(str.isprintable)


def field_values(spec: FieldSpec) -> st.SearchStrategy[Any]:
    """Valid values for one event field, from its spec (lengths capped to stay fast)."""
    kind = spec.kind
    if spec.enum is not None:
        return st.sampled_from(spec.enum)
    if kind is FieldKind.INT:
        return st.one_of(
            st.integers(spec.lo, min(spec.hi, spec.lo + 100)), st.integers(spec.lo, spec.hi)
        )
    if kind is FieldKind.STR:
        if spec.pattern is not None:
            pattern = spec.pattern.pattern
            return st.from_regex(pattern, fullmatch=True).filter(
                lambda text: spec.lo <= len(text) <= spec.hi
            )
        return st.text(min_size=spec.lo, max_size=min(spec.hi, spec.lo + 64))
    if kind is FieldKind.BYTES:
        return st.binary(min_size=spec.lo, max_size=min(spec.hi, spec.lo + 256))
    simple: dict[FieldKind, st.SearchStrategy[Any]] = {
        FieldKind.ROUND_ID: round_ids(),
        FieldKind.KEY_ID: key_ids(),
        FieldKind.EVENT_ID: event_ids(),
        FieldKind.KEK_VERSION: kek_versions(),
        FieldKind.FLOAT: st.floats(allow_nan=False, allow_infinity=False),
        FieldKind.STR_MAP: parameters(),
    }
    return simple[kind]


# --- events -------------------------------------------------------------------------------


@st.composite
def round_requested(draw: st.DrawFn) -> RoundRequested:
    """``RoundRequested`` events with ``1 <= threshold <= committee_size``."""
    committee_size = draw(st.one_of(st.integers(1, 16), st.integers(1, MAX_COMMITTEE_SIZE)))
    return RoundRequested(
        round_id=draw(round_ids()),
        deadline=draw(timestamps()),
        threshold=draw(st.integers(1, committee_size)),
        committee_size=committee_size,
        parameters=draw(parameters()),
    )


def qualified_names() -> st.SearchStrategy[str]:
    """Dotted Python names such as ``builtins.KeyError`` (what HandlerFailed records)."""
    part = st.builds(
        lambda head, tail: head + tail,
        st.sampled_from(string.ascii_letters + "_"),
        st.text(_ALNUM + "_", max_size=12),
    )
    return st.lists(part, min_size=1, max_size=4).map(".".join)


@st.composite
def handler_failed(draw: st.DrawFn) -> HandlerFailed:
    """``HandlerFailed`` events."""
    return HandlerFailed(
        subscriber=draw(st.text(min_size=1, max_size=32)),
        failed_sequence=draw(st.integers(1, MAX_SEQUENCE)),
        error_type=draw(qualified_names()),
    )


_CUSTOM: dict[type[Event], st.SearchStrategy[Event]] = {
    RoundRequested: round_requested(),
    HandlerFailed: handler_failed(),
}


def events_of(cls: type[Event]) -> st.SearchStrategy[Event]:
    """Valid events of one registered type.

    Fields are drawn from their specs; draws that break a type's cross-field rules
    (its ``_validate``) are rejected, so give a type with tight rules its own strategy.
    """
    custom = _CUSTOM.get(cls)
    if custom is not None:
        return custom
    fields = st.fixed_dictionaries({spec.name: field_values(spec) for spec in cls.FIELDS})
    return _valid_events(cls, fields)


@st.composite
def _valid_events(
    draw: st.DrawFn, cls: type[Event], fields: st.SearchStrategy[dict[str, Any]]
) -> Event:
    try:
        return cls(**draw(fields))
    except MalformedEvent:
        reject()


def events() -> st.SearchStrategy[Event]:
    """Valid events of any registered type."""
    return st.one_of([events_of(cls) for cls in EVENT_TYPES.values()])


def stored_events(
    payloads: st.SearchStrategy[Event] | None = None,
    times: st.SearchStrategy[float] | None = None,
) -> st.SearchStrategy[StoredEvent]:
    """Stored events (envelope plus payload).

    ``payloads`` defaults to :func:`events`, ``times`` (the envelope timestamp) to
    :func:`timestamps`. ``round_id`` is derived from the payload.
    """
    optional_ids = st.none() | event_ids()
    return st.builds(
        StoredEvent,
        sequence=st.one_of(st.integers(1, 1000), st.integers(1, MAX_SEQUENCE)),
        event_id=event_ids(),
        timestamp=timestamps() if times is None else times,
        causation_id=optional_ids,
        correlation_id=optional_ids,
        source=sources(),
        payload=events() if payloads is None else payloads,
    )
