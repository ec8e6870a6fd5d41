"""The event vocabulary: stages, failure reasons, the registry, validation, safe reprs."""

import dataclasses
import math
import pickle
import typing
from collections.abc import Mapping
from typing import Any

import pytest

from enclave_keys.errors import CodecError, MalformedEvent
from enclave_keys.events import (
    EVENT_TYPES,
    MAX_COMMITTEE_SIZE,
    MAX_SEQUENCE,
    DecryptionShareCreated,
    DecryptionShareFailed,
    DecryptionShareRequested,
    Event,
    FailureReason,
    FieldKind,
    FrozenStrMap,
    HandlerFailed,
    KekRotated,
    KeyshareCreated,
    Length,
    NodeSealed,
    NodeUnsealed,
    RootRekeyed,
    RoundAlreadyCompleted,
    RoundComplete,
    RoundEvent,
    RoundFailed,
    RoundKeyReady,
    RoundOpened,
    RoundPurged,
    RoundRequested,
    RoundStage,
    RoundStageChanged,
    StoredEvent,
    UnsealProgress,
    event_class,
    event_type,
    timeout_for,
)
from enclave_keys.ids import EventId, KekVersion, KeyId, RoundId

RID = RoundId("round-1")
KID = KeyId(b"\x02" * 16)
EID = EventId(b"\x01" * 16)
SECRET_LOOKING = b"\xde\xad\xbe\xef" * 8

# --- stages and failure reasons -------------------------------------------------------

TIMEOUTS = {
    FailureReason.COMMITTEE_FORMATION_TIMEOUT,
    FailureReason.DKG_TIMEOUT,
    FailureReason.COMPUTE_TIMEOUT,
    FailureReason.DECRYPTION_TIMEOUT,
    FailureReason.DEADLINE_EXCEEDED,
}
MISBEHAVIOUR = {
    FailureReason.INVALID_DKG_SHARES,
    FailureReason.INVALID_DECRYPTION_SHARES,
    FailureReason.VERIFICATION_FAILED,
}
OTHER = {
    FailureReason.INSUFFICIENT_COMMITTEE,
    FailureReason.NO_INPUTS,
    FailureReason.COMPUTE_PROVIDER_EXPIRED,
    FailureReason.COMPUTE_PROVIDER_FAILED,
    FailureReason.REQUESTER_CANCELLED,
    FailureReason.KEY_CREATION_FAILED,
    FailureReason.KEY_MISSING_AFTER_RESTART,
    FailureReason.ROUND_CIPHER_MISSING,
    FailureReason.INTERNAL_ERROR,
}


def test_round_stage_values_are_the_documented_wire_strings() -> None:
    assert [stage.value for stage in RoundStage] == [
        "requested",
        "committee_formation",
        "key_generation",
        "compute",
        "decryption",
        "complete",
        "failed",
    ]
    assert {stage for stage in RoundStage if stage.is_terminal} == {
        RoundStage.COMPLETE,
        RoundStage.FAILED,
    }


def test_failure_reason_groups_partition_all_reasons() -> None:
    assert set(FailureReason) == TIMEOUTS | MISBEHAVIOUR | OTHER
    assert len(TIMEOUTS) + len(MISBEHAVIOUR) + len(OTHER) == len(FailureReason)


@pytest.mark.parametrize("reason", list(FailureReason), ids=str)
def test_each_failure_reason_is_exactly_one_of_timeout_misbehaviour_other(
    reason: FailureReason,
) -> None:
    assert reason.is_timeout == (reason in TIMEOUTS)
    assert reason.is_misbehaviour == (reason in MISBEHAVIOUR)
    assert not (reason.is_timeout and reason.is_misbehaviour)
    assert (reason in OTHER) == (not reason.is_timeout and not reason.is_misbehaviour)


def test_failure_reason_wire_values_equal_lower_case_names() -> None:
    for reason in FailureReason:
        assert reason.value == reason.name.lower()


@pytest.mark.parametrize(
    ("stage", "reason"),
    [
        (RoundStage.REQUESTED, FailureReason.DEADLINE_EXCEEDED),
        (RoundStage.COMMITTEE_FORMATION, FailureReason.COMMITTEE_FORMATION_TIMEOUT),
        (RoundStage.KEY_GENERATION, FailureReason.DKG_TIMEOUT),
        (RoundStage.COMPUTE, FailureReason.COMPUTE_TIMEOUT),
        (RoundStage.DECRYPTION, FailureReason.DECRYPTION_TIMEOUT),
        (RoundStage.COMPLETE, FailureReason.DEADLINE_EXCEEDED),
        (RoundStage.FAILED, FailureReason.DEADLINE_EXCEEDED),
    ],
)
def test_timeout_for_maps_each_stage_to_a_timeout(stage: RoundStage, reason: FailureReason) -> None:
    assert FailureReason.timeout_for(stage) is reason
    assert timeout_for(stage) is reason
    assert reason.is_timeout


# --- the registry ---------------------------------------------------------------------

EXPECTED_TAGS: dict[str, type[Event]] = {
    "round.requested": RoundRequested,
    "round.opened": RoundOpened,
    "round.already_completed": RoundAlreadyCompleted,
    "round.stage_changed": RoundStageChanged,
    "round.failed": RoundFailed,
    "round.complete": RoundComplete,
    "round.key_ready": RoundKeyReady,
    "round.purged": RoundPurged,
    "keyshare.created": KeyshareCreated,
    "decryption_share.requested": DecryptionShareRequested,
    "decryption_share.created": DecryptionShareCreated,
    "decryption_share.failed": DecryptionShareFailed,
    "node.handler_failed": HandlerFailed,
    "master.unseal_progress": UnsealProgress,
    "master.unsealed": NodeUnsealed,
    "master.sealed": NodeSealed,
    "master.kek_rotated": KekRotated,
    "master.root_rekeyed": RootRekeyed,
}


def test_registry_holds_every_event_type_under_its_tag() -> None:
    assert dict(EVENT_TYPES) == EXPECTED_TAGS
    for tag, cls in EXPECTED_TAGS.items():
        assert tag == cls.TAG
        assert cls.SCHEMA == 1
        assert event_class(tag) is cls
    assert event_class("no.such_tag") is None


def test_registry_is_read_only() -> None:
    with pytest.raises(TypeError):
        EVENT_TYPES["x.y"] = RoundComplete  # type: ignore[index]


@pytest.mark.parametrize("cls", list(EXPECTED_TAGS.values()), ids=lambda c: c.__name__)
def test_every_event_type_is_a_frozen_slotted_kw_only_dataclass(cls: type[Event]) -> None:
    params: Any = cls.__dict__["__dataclass_params__"]
    assert params.frozen
    assert "__slots__" in cls.__dict__
    assert all(f.kw_only for f in dataclasses.fields(cls))  # type: ignore[arg-type]
    node_level = {HandlerFailed, UnsealProgress, NodeUnsealed, NodeSealed, KekRotated, RootRekeyed}
    assert issubclass(cls, RoundEvent) == (cls not in node_level)


def test_a_duplicate_tag_is_refused_and_the_registry_is_unchanged() -> None:
    before = dict(EVENT_TYPES)
    with pytest.raises(CodecError, match="already registered"):

        @event_type("round.complete", schema=1)
        @dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
        class Impostor(RoundEvent):
            pass

    assert dict(EVENT_TYPES) == before


def test_registering_a_class_twice_is_refused() -> None:
    with pytest.raises(CodecError, match="already registered"):
        event_type("round.complete_again", schema=1)(RoundComplete)
    assert "round.complete_again" not in EVENT_TYPES


@pytest.mark.parametrize("tag", ["", "Round.Requested", "round requested", "round.", ".x", 7])
def test_malformed_tags_are_refused(tag: Any) -> None:
    with pytest.raises(CodecError):
        event_type(tag, schema=1)


@pytest.mark.parametrize("schema", [0, -1, True, 1.0, 2**31])
def test_malformed_schema_numbers_are_refused(schema: Any) -> None:
    with pytest.raises(CodecError):
        event_type("test.schema", schema=schema)


def test_a_class_that_is_not_a_frozen_slotted_kw_only_dataclass_is_refused() -> None:
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class NotSlotted(RoundEvent):
        pass

    @dataclasses.dataclass(slots=True, kw_only=True)
    class NotFrozen(Event):
        name: str

    @dataclasses.dataclass(frozen=True, slots=True)
    class NotKwOnly(Event):
        name: str

    class NotADataclass(Event):
        pass

    for cls in (NotSlotted, NotFrozen, NotKwOnly, NotADataclass):
        with pytest.raises(CodecError, match="dataclass"):
            event_type("test.refused", schema=1)(cls)
    with pytest.raises(CodecError):
        event_type("test.refused", schema=1)(int)  # type: ignore[type-var]
    assert "test.refused" not in EVENT_TYPES


def test_unsupported_field_types_and_misplaced_constraints_are_refused() -> None:
    @dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
    class HasBool(Event):
        flag: bool

    @dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
    class HasList(Event):
        items: list[str]

    @dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
    class HasOptional(Event):
        maybe: int | None

    @dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
    class HasOverlongText(Event):
        text: typing.Annotated[str, Length(0, 10**9)]

    for cls in (HasBool, HasList, HasOptional, HasOverlongText):
        with pytest.raises(CodecError):
            event_type("test.refused", schema=1)(cls)
    assert "test.refused" not in EVENT_TYPES


def test_bytes_fields_other_than_ciphertext_are_refused() -> None:
    @dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
    class LeaksAKey(RoundEvent):
        round_key: bytes

    with pytest.raises(CodecError, match="ciphertext"):
        event_type("test.leaks_a_key", schema=1)(LeaksAKey)
    assert "test.leaks_a_key" not in EVENT_TYPES


def test_round_id_fields_belong_to_round_events_only() -> None:
    @dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
    class Confused(Event):
        round_id: RoundId

    with pytest.raises(CodecError, match="round_id"):
        event_type("test.confused", schema=1)(Confused)


def test_validation_belongs_in_validate_not_post_init() -> None:
    @dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
    class OwnPostInit(RoundEvent):
        def __post_init__(self) -> None:
            pass

    with pytest.raises(CodecError, match="_validate"):
        event_type("test.own_post_init", schema=1)(OwnPostInit)


# --- no key material --------------------------------------------------------------------

BYTES_LIKE = (bytes, bytearray, memoryview)


@pytest.mark.parametrize("cls", list(EVENT_TYPES.values()), ids=lambda c: c.__name__)
def test_no_event_type_can_carry_key_material(cls: type[Event]) -> None:
    """The only bytes fields are AEAD ciphertexts named `ciphertext`; nothing crypto-typed."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        hint = hints[f.name]
        if isinstance(hint, type) and issubclass(hint, BYTES_LIKE):
            assert f.name == "ciphertext", f"{cls.__name__}.{f.name} is bytes"
        module = getattr(hint, "__module__", "") or ""
        assert not module.startswith("enclave_keys.crypto"), f"{cls.__name__}.{f.name}"
        assert "secret" not in f.name.lower()
    for spec in cls.FIELDS:
        if spec.kind is FieldKind.BYTES:
            assert spec.name == "ciphertext"


# --- construction-time validation ---------------------------------------------------------


def make_requested(**overrides: Any) -> RoundRequested:
    values: dict[str, Any] = {
        "round_id": RID,
        "deadline": 1_700_000_100.0,
        "threshold": 2,
        "committee_size": 3,
    }
    values.update(overrides)
    return RoundRequested(**values)


def test_round_requested_accepts_valid_shapes_and_normalises() -> None:
    event = make_requested(deadline=1_700_000_100, parameters={"b": "2", "a": "1"})
    assert type(event.deadline) is float
    assert isinstance(event.parameters, FrozenStrMap)
    assert list(event.parameters) == ["a", "b"]
    assert make_requested(threshold=1, committee_size=1).threshold == 1
    assert make_requested(threshold=MAX_COMMITTEE_SIZE, committee_size=MAX_COMMITTEE_SIZE)
    assert make_requested().parameters == {}
    hash(event)


@pytest.mark.parametrize(
    "overrides",
    [
        {"threshold": 4, "committee_size": 3},
        {"threshold": 0},
        {"threshold": -1},
        {"committee_size": MAX_COMMITTEE_SIZE + 1},
        {"threshold": True},
        {"threshold": 2.0},
        {"threshold": "2"},
        {"deadline": math.inf},
        {"deadline": -math.inf},
        {"deadline": math.nan},
        {"deadline": "soon"},
        {"deadline": True},
        {"deadline": 10**400},
        {"round_id": "round-1"},
        {"parameters": [("a", "b")]},
        {"parameters": {"a": 1}},
        {"parameters": {1: "a"}},
        {"parameters": {"": "a"}},
    ],
    ids=repr,
)
def test_round_requested_rejects_invalid_values(overrides: dict[str, Any]) -> None:
    with pytest.raises(MalformedEvent):
        make_requested(**overrides)


@pytest.mark.parametrize(
    "build",
    [
        lambda: RoundStageChanged(round_id=RID, stage="compute"),  # type: ignore[arg-type]
        lambda: RoundFailed(round_id=RID, failed_at=RoundStage.COMPUTE, reason="no_inputs"),  # type: ignore[arg-type]
        lambda: RoundFailed(
            round_id=RID,
            failed_at=RoundStage.COMPUTE,
            reason=FailureReason.NO_INPUTS,
            detail="x" * 1025,
        ),
        lambda: RoundKeyReady(round_id=RID, key_id=EID, kek_version=KekVersion(1)),  # type: ignore[arg-type]
        lambda: RoundKeyReady(round_id=RID, key_id=KID, kek_version=1),  # type: ignore[arg-type]
        lambda: KeyshareCreated(round_id=RID, key_id=KID, ciphertext=b""),
        lambda: KeyshareCreated(round_id=RID, key_id=KID, ciphertext="text"),  # type: ignore[arg-type]
        lambda: DecryptionShareRequested(round_id=RID, request_id=KID),  # type: ignore[arg-type]
        lambda: DecryptionShareFailed(round_id=RID, request_id=EID, reason=""),
        lambda: DecryptionShareFailed(round_id=RID, request_id=EID, reason="\ud800"),
        lambda: HandlerFailed(subscriber="", failed_sequence=1, error_type="ValueError"),
        lambda: HandlerFailed(subscriber="s", failed_sequence=0, error_type="ValueError"),
        lambda: HandlerFailed(subscriber="s", failed_sequence=MAX_SEQUENCE + 1, error_type="E"),
        lambda: HandlerFailed(subscriber="s", failed_sequence=1, error_type="key was 0xdeadbeef"),
        lambda: HandlerFailed(subscriber="s", failed_sequence=1, error_type="a..b"),
        lambda: RoundComplete(round_id=None),  # type: ignore[arg-type]
    ],
)
def test_invalid_field_values_raise_malformed_event(build: Any) -> None:
    with pytest.raises(MalformedEvent):
        build()


def test_values_are_normalised_to_exact_types() -> None:
    class Label(str):
        pass

    event = KeyshareCreated(round_id=RID, key_id=KID, ciphertext=bytearray(b"abc"))  # type: ignore[arg-type]
    assert type(event.ciphertext) is bytes
    failed = DecryptionShareFailed(round_id=RID, request_id=EID, reason=Label("busy"))
    assert type(failed.reason) is str
    reason_as_text = RoundFailed(
        round_id=RID,
        failed_at=RoundStage.COMPUTE,
        reason=FailureReason.NO_INPUTS,
        detail=FailureReason.NO_INPUTS,
    )
    assert type(reason_as_text.detail) is str


def test_event_and_round_event_cannot_be_instantiated() -> None:
    with pytest.raises(MalformedEvent, match="not a registered"):
        RoundEvent(round_id=RID)


def test_events_are_frozen_slotted_and_hashable() -> None:
    event = RoundKeyReady(round_id=RID, key_id=KID, kek_version=KekVersion(1))
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.key_id = KID  # type: ignore[misc]
    assert not hasattr(event, "__dict__")
    assert event == RoundKeyReady(round_id=RID, key_id=KID, kek_version=KekVersion(1))
    other: Event = RoundPurged(round_id=RID, key_id=KID)
    assert event != other
    assert len({event, RoundKeyReady(round_id=RID, key_id=KID, kek_version=KekVersion(1))}) == 1


def test_round_id_or_none() -> None:
    assert RoundComplete(round_id=RID).round_id_or_none == RID
    handler = HandlerFailed(subscriber="router", failed_sequence=7, error_type="builtins.KeyError")
    assert handler.round_id_or_none is None


# --- safe reprs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "event",
    [
        KeyshareCreated(round_id=RID, key_id=KID, ciphertext=SECRET_LOOKING),
        DecryptionShareCreated(round_id=RID, request_id=EID, ciphertext=SECRET_LOOKING),
    ],
    ids=lambda e: type(e).__name__,
)
def test_reprs_show_ciphertext_length_only(event: Event) -> None:
    stored = StoredEvent(sequence=1, event_id=EID, timestamp=1.0, source="node", payload=event)
    for text in (repr(event), str(event), repr(stored)):
        assert f"ciphertext=<{len(SECRET_LOOKING)} bytes>" in text
        assert "dead" not in text.lower()
        assert "\\xde" not in text
        assert "round-1" in text


# --- the parameter map ---------------------------------------------------------------------


def test_frozen_str_map_is_an_immutable_sorted_hashable_mapping() -> None:
    params = FrozenStrMap({"z": "1", "a": "2"})
    assert isinstance(params, Mapping)
    assert list(params) == ["a", "z"]
    assert list(params.items()) == [("a", "2"), ("z", "1")]
    assert params == {"a": "2", "z": "1"}
    assert params == FrozenStrMap([("a", "2"), ("z", "1")])
    assert params != FrozenStrMap({"a": "2"})
    assert params != ["a", "z"]
    assert hash(params) == hash(FrozenStrMap({"a": "2", "z": "1"}))
    assert params["a"] == "2"
    assert "z" in params
    assert "q" not in params
    assert len(params) == 2
    assert params.to_dict() == {"a": "2", "z": "1"}
    assert list(params.to_dict()) == ["a", "z"]
    assert repr(params) == "FrozenStrMap({'a': '2', 'z': '1'})"
    assert pickle.loads(pickle.dumps(params)) == params
    with pytest.raises(AttributeError):
        params._items = ()
    with pytest.raises(TypeError):
        params["a"] = "3"  # type: ignore[index]


@pytest.mark.parametrize(
    "items",
    [
        [("a", "1"), ("a", "2")],
        [("a",)],
        [["a", "1"]],
        {f"k{i}": "v" for i in range(FrozenStrMap.MAX_ENTRIES + 1)},
        {"k" * (FrozenStrMap.MAX_KEY_LEN + 1): "v"},
        {"k": "v" * (FrozenStrMap.MAX_VALUE_LEN + 1)},
        {b"k": "v"},
        {"k": None},
    ],
    ids=[
        "repeated",
        "short-pair",
        "list-pair",
        "too-many",
        "long-key",
        "long-value",
        "bytes-key",
        "none",
    ],
)
def test_frozen_str_map_rejects_invalid_content(items: Any) -> None:
    with pytest.raises(MalformedEvent):
        FrozenStrMap(items)


# --- the stored envelope ---------------------------------------------------------------------

PAYLOAD = RoundKeyReady(round_id=RID, key_id=KID, kek_version=KekVersion(3))
NODE_PAYLOAD = HandlerFailed(subscriber="router", failed_sequence=9, error_type="builtins.KeyError")


def make_stored(**overrides: Any) -> StoredEvent:
    values: dict[str, Any] = {
        "sequence": 1,
        "event_id": EID,
        "timestamp": 1_700_000_000.0,
        "source": "node-1",
        "payload": PAYLOAD,
    }
    values.update(overrides)
    return StoredEvent(**values)


def test_stored_event_derives_and_checks_round_id() -> None:
    assert make_stored().round_id == RID
    assert make_stored(round_id=RID).round_id == RID
    assert make_stored(payload=NODE_PAYLOAD).round_id is None
    with pytest.raises(MalformedEvent, match="round_id"):
        make_stored(round_id=RoundId("other"))
    with pytest.raises(MalformedEvent, match="round_id"):
        make_stored(round_id=RID, payload=NODE_PAYLOAD)


def test_stored_event_fields_and_tag() -> None:
    stored = make_stored(sequence=5, timestamp=7, causation_id=EID, correlation_id=EID)
    assert stored.sequence == 5
    assert type(stored.timestamp) is float
    assert stored.tag == "round.key_ready"
    assert stored.causation_id == stored.correlation_id == EID
    with pytest.raises(dataclasses.FrozenInstanceError):
        stored.sequence = 6  # type: ignore[misc]


@pytest.mark.parametrize(
    "overrides",
    [
        {"sequence": 0},
        {"sequence": -1},
        {"sequence": MAX_SEQUENCE + 1},
        {"sequence": True},
        {"sequence": 1.0},
        {"event_id": b"\x01" * 16},
        {"event_id": KID},
        {"timestamp": math.nan},
        {"timestamp": math.inf},
        {"timestamp": "now"},
        {"causation_id": b"\x01" * 16},
        {"correlation_id": "x"},
        {"source": ""},
        {"source": "x" * 65},
        {"source": "node\n1"},
        {"source": 7},
        {"payload": "RoundComplete"},
        {"payload": object()},
    ],
    ids=repr,
)
def test_stored_event_rejects_invalid_envelopes(overrides: dict[str, Any]) -> None:
    with pytest.raises(MalformedEvent):
        make_stored(**overrides)


def test_stored_event_accepts_boundary_values() -> None:
    assert make_stored(sequence=MAX_SEQUENCE).sequence == MAX_SEQUENCE
    assert make_stored(source="x" * 64).source == "x" * 64
    assert make_stored(source="nœud 1").source == "nœud 1"
