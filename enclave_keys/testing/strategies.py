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
from dataclasses import dataclass
from enum import StrEnum
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
    RoundComplete,
    RoundFailed,
    RoundRequested,
    RoundStage,
    RoundStageChanged,
    StoredEvent,
)
from enclave_keys.ids import EventId, KekVersion, KeyId, RoundId

__all__ = [
    "RoundOutcome",
    "RoundScript",
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
    "round_outcomes",
    "round_requested",
    "round_scripts",
    "round_stages",
    "sources",
    "stored_events",
    "terminal_events",
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


# --- round outcomes -----------------------------------------------------------------------


class RoundOutcome(StrEnum):
    """How a generated round's life ends (design §2)."""

    COMPLETED = "completed"  # RoundComplete
    TIMED_OUT = "timed_out"  # RoundFailed with a timeout reason: completion at once
    FAILED = "failed"  # RoundFailed with an "other" reason: the router completes it
    ACCUSED_THEN_COMPLETED = "accused_then_completed"  # misbehaviour, then RoundComplete
    ACCUSED = "accused"  # misbehaviour only: stays live for the accusation phase
    REAPED = "reaped"  # no terminal event: the deadline reaper ends it
    LIVE = "live"  # nothing ends it (before its deadline)

    @property
    def ends_by_events(self) -> bool:
        """True if the round's own events end it (no clock needed)."""
        return self in _ENDED_BY_EVENTS


_ENDED_BY_EVENTS = frozenset(
    {
        RoundOutcome.COMPLETED,
        RoundOutcome.TIMED_OUT,
        RoundOutcome.FAILED,
        RoundOutcome.ACCUSED_THEN_COMPLETED,
    }
)
_LIVE_STAGES = (
    RoundStage.COMMITTEE_FORMATION,
    RoundStage.KEY_GENERATION,
    RoundStage.COMPUTE,
    RoundStage.DECRYPTION,
)


@dataclass(frozen=True, slots=True)
class RoundScript:
    """The events of one generated round, in publish order, and how it should end.

    ``events`` start with the ``RoundRequested``; for :attr:`RoundOutcome.REAPED` the round
    ends only once the clock passes ``deadline`` plus the node's reaper grace and the node
    ticks.
    """

    round_id: RoundId
    deadline: float
    outcome: RoundOutcome
    events: tuple[Event, ...]

    @property
    def ends_by_events(self) -> bool:
        return self.outcome.ends_by_events


def round_outcomes() -> st.SearchStrategy[RoundOutcome]:
    return st.sampled_from(RoundOutcome)


def _reasons(kind: str) -> st.SearchStrategy[FailureReason]:
    pool = [
        reason
        for reason in FailureReason
        if (kind == "timeout" and reason.is_timeout)
        or (kind == "misbehaviour" and reason.is_misbehaviour)
        or (kind == "other" and not (reason.is_timeout or reason.is_misbehaviour))
    ]
    return st.sampled_from(pool)


def terminal_events(round_id: RoundId) -> st.SearchStrategy[Event]:
    """Events that end a round or arrive late after its end: ``RoundComplete``, any
    ``RoundFailed`` and a stage change to ``complete`` or ``failed``."""
    stages = st.sampled_from([RoundStage.COMPLETE, RoundStage.FAILED])
    return st.one_of(
        st.just(RoundComplete(round_id=round_id)),
        st.builds(
            RoundFailed,
            round_id=st.just(round_id),
            failed_at=round_stages(),
            reason=failure_reasons(),
        ),
        st.builds(RoundStageChanged, round_id=st.just(round_id), stage=stages),
    )


@st.composite
def round_scripts(
    draw: st.DrawFn,
    round_id: RoundId | None = None,
    *,
    now: float = 1_700_000_000.0,
    outcomes: st.SearchStrategy[RoundOutcome] | None = None,
) -> RoundScript:
    """One round's life: request, stage changes, then what ends it (see
    :class:`RoundOutcome`). ``now`` is the clock reading the deadline is drawn after;
    ``round_id`` is drawn if not given."""
    rid = draw(round_ids()) if round_id is None else round_id
    outcome = draw(round_outcomes() if outcomes is None else outcomes)
    deadline = now + draw(st.integers(1, 7 * 24 * 3600))
    committee = draw(st.integers(1, 16))
    events: list[Event] = [
        RoundRequested(
            round_id=rid,
            deadline=float(deadline),
            threshold=draw(st.integers(1, committee)),
            committee_size=committee,
        )
    ]
    stages = draw(st.lists(st.sampled_from(_LIVE_STAGES), max_size=4))
    events.extend(RoundStageChanged(round_id=rid, stage=stage) for stage in stages)
    last = stages[-1] if stages else RoundStage.REQUESTED

    def failed(kind: str) -> RoundFailed:
        return RoundFailed(round_id=rid, failed_at=last, reason=draw(_reasons(kind)))

    if outcome in (RoundOutcome.ACCUSED, RoundOutcome.ACCUSED_THEN_COMPLETED):
        events.append(failed("misbehaviour"))
    if outcome in (RoundOutcome.COMPLETED, RoundOutcome.ACCUSED_THEN_COMPLETED):
        events.append(RoundComplete(round_id=rid))
    elif outcome is RoundOutcome.TIMED_OUT:
        events.append(failed("timeout"))
    elif outcome is RoundOutcome.FAILED:
        events.append(failed("other"))
    if outcome.ends_by_events:
        # Late terminal events after the end change nothing.
        events.extend(draw(st.lists(terminal_events(rid), max_size=2)))
    return RoundScript(rid, float(deadline), outcome, tuple(events))
