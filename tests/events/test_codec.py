"""The strict msgpack codec: round trips, the exact wire format, and every strictness rule."""

import math
import threading
from typing import Any

import msgpack
import pytest

from enclave_keys import codec
from enclave_keys.codec import MAX_EVENT_SIZE, WIRE_VERSION, decode_event, encode_event
from enclave_keys.errors import (
    CodecError,
    MalformedEvent,
    SchemaMismatch,
    TrailingBytes,
    TruncatedData,
    UnknownEventTag,
)
from enclave_keys.events import (
    EVENT_TYPES,
    MAX_CIPHERTEXT_LEN,
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
)
from enclave_keys.ids import EventId, KekVersion, KeyId, RoundId

RID = RoundId("round-1")
KID = KeyId(b"\x02" * 16)
EID = EventId(b"\x01" * 16)
REQUEST = EventId(b"\x03" * 16)
CIPHERTEXT = b"\xde\xad\xbe\xef" * 8

PAYLOADS: list[Event] = [
    RoundRequested(
        round_id=RID,
        deadline=1_700_000_100.5,
        threshold=2,
        committee_size=3,
        parameters={"scheme": "bfv", "degree": "8192"},
    ),
    RoundOpened(round_id=RID, deadline=1_700_003_600.5),
    RoundAlreadyCompleted(round_id=RID, rejected_tag="round.requested"),
    RoundStageChanged(round_id=RID, stage=RoundStage.KEY_GENERATION),
    RoundFailed(
        round_id=RID,
        failed_at=RoundStage.DECRYPTION,
        reason=FailureReason.INVALID_DECRYPTION_SHARES,
        detail="party 3 sent a bad share",
    ),
    RoundComplete(round_id=RID),
    RoundKeyReady(round_id=RID, key_id=KID, kek_version=KekVersion(3)),
    RoundPurged(round_id=RID, key_id=KID),
    KeyshareCreated(round_id=RID, key_id=KID, ciphertext=CIPHERTEXT),
    DecryptionShareRequested(round_id=RID, request_id=REQUEST),
    DecryptionShareCreated(round_id=RID, request_id=REQUEST, ciphertext=CIPHERTEXT),
    DecryptionShareFailed(round_id=RID, request_id=REQUEST, reason="no round cipher"),
    HandlerFailed(subscriber="router", failed_sequence=41, error_type="builtins.KeyError"),
    UnsealProgress(submitted=2, threshold=3),
    NodeUnsealed(method="shamir", active_kek=KekVersion(2)),
    NodeSealed(),
    KekRotated(old_version=KekVersion(1), new_version=KekVersion(2), rewrapped=17),
    RootRekeyed(old_method="env", new_method="passphrase"),
]


def stored(payload: Event, **overrides: Any) -> StoredEvent:
    values: dict[str, Any] = {
        "sequence": 42,
        "event_id": EID,
        "timestamp": 1_700_000_000.0,
        "causation_id": EventId(b"\x04" * 16),
        "correlation_id": EventId(b"\x05" * 16),
        "source": "node-1",
        "payload": payload,
    }
    values.update(overrides)
    return StoredEvent(**values)


SAMPLES = [stored(payload) for payload in PAYLOADS]
SAMPLE_IDS = [s.tag for s in SAMPLES]


def wire(sample: StoredEvent) -> list[Any]:
    """The decoded msgpack array of a sample, to be altered and re-packed."""
    message: list[Any] = msgpack.unpackb(encode_event(sample), raw=False)
    return message


def pack(message: object) -> bytes:
    packed: bytes = msgpack.packb(message, use_bin_type=True)
    return packed


def test_samples_cover_every_registered_event_type() -> None:
    assert {type(p) for p in PAYLOADS} == set(EVENT_TYPES.values())


# --- round trips and determinism ------------------------------------------------------------


@pytest.mark.parametrize("sample", SAMPLES, ids=SAMPLE_IDS)
def test_every_event_type_round_trips(sample: StoredEvent) -> None:
    encoded = encode_event(sample)
    decoded = decode_event(encoded)
    assert decoded == sample
    assert hash(decoded) == hash(sample)
    assert type(decoded.payload) is type(sample.payload)
    assert encode_event(decoded) == encoded
    assert repr(decoded) == repr(sample)


@pytest.mark.parametrize("sample", SAMPLES, ids=SAMPLE_IDS)
def test_decoded_values_have_exact_types(sample: StoredEvent) -> None:
    decoded = decode_event(encode_event(sample))
    assert type(decoded.event_id) is EventId
    assert type(decoded.timestamp) is float
    for spec in type(decoded.payload).FIELDS:
        assert type(getattr(decoded.payload, spec.name)) is type(getattr(sample.payload, spec.name))


def test_node_level_events_round_trip_without_optional_ids() -> None:
    sample = stored(PAYLOADS[-1], causation_id=None, correlation_id=None)
    decoded = decode_event(encode_event(sample))
    assert decoded == sample
    assert decoded.round_id is None
    assert decoded.causation_id is None


@pytest.mark.parametrize("sample", SAMPLES, ids=SAMPLE_IDS)
def test_encoding_is_deterministic(sample: StoredEvent) -> None:
    assert encode_event(sample) == encode_event(sample)
    rebuilt = stored(
        type(sample.payload)(
            **{s.name: getattr(sample.payload, s.name) for s in sample.payload.FIELDS}
        )
    )
    assert encode_event(rebuilt) == encode_event(sample)


def test_map_insertion_order_does_not_change_the_bytes() -> None:
    one = RoundRequested(
        round_id=RID, deadline=1.0, threshold=1, committee_size=1, parameters={"a": "1", "b": "2"}
    )
    two = RoundRequested(
        round_id=RID, deadline=1.0, threshold=1, committee_size=1, parameters={"b": "2", "a": "1"}
    )
    assert encode_event(stored(one)) == encode_event(stored(two))


def test_golden_bytes_of_a_round_key_ready() -> None:
    sample = StoredEvent(
        sequence=42,
        event_id=EID,
        timestamp=1_700_000_000.0,
        source="node-1",
        payload=RoundKeyReady(round_id=RID, key_id=KID, kek_version=KekVersion(3)),
    )
    expected = bytes.fromhex(
        "9b"  # array of 11
        "01"  # wire version 1
        "2a"  # sequence 42
        "c410"
        + "01"
        * 16  # event id, bin 16
        + "cb41d954fc40000000"  # timestamp, float64
        "a7726f756e642d31"  # round id "round-1"
        "c0c0"  # causation id, correlation id: nil
        "a66e6f64652d31"  # source "node-1"
        "af726f756e642e6b65795f7265616479"  # tag "round.key_ready"
        "01"  # schema 1
        "82"  # fields: map of 2, sorted keys
        "ab6b656b5f76657273696f6e03"  # "kek_version": 3
        "a66b65795f6964c410" + "02" * 16  # "key_id": bin 16
    )
    assert encode_event(sample) == expected
    assert decode_event(expected) == sample


def test_wire_layout_matches_the_documented_envelope() -> None:
    sample = SAMPLES[0]
    assert wire(sample) == [
        WIRE_VERSION,
        42,
        EID.raw,
        1_700_000_000.0,
        "round-1",
        b"\x04" * 16,
        b"\x05" * 16,
        "node-1",
        "round.requested",
        1,
        {
            "committee_size": 3,
            "deadline": 1_700_000_100.5,
            "parameters": {"degree": "8192", "scheme": "bfv"},
            "threshold": 2,
        },
    ]
    assert list(wire(sample)[10]) == sorted(wire(sample)[10])


def test_floats_are_always_float64_even_when_integral() -> None:
    sample = stored(
        RoundRequested(round_id=RID, deadline=5, threshold=1, committee_size=1), timestamp=7
    )
    encoded = encode_event(sample)
    assert b"\xcb\x40\x1c\x00\x00\x00\x00\x00\x00" in encoded  # 7.0 as float64
    assert b"\xcb\x40\x14\x00\x00\x00\x00\x00\x00" in encoded  # 5.0 as float64


def test_decoded_identifiers_equal_constructed_ones() -> None:
    """The codec builds EventIds without __init__; they must be indistinguishable."""
    decoded = decode_event(encode_event(SAMPLES[0]))
    assert decoded.event_id == EID
    assert hash(decoded.event_id) == hash(EID)
    assert repr(decoded.event_id) == repr(EID)
    assert decoded.event_id.raw == EID.raw


def test_decode_accepts_bytearray_and_memoryview() -> None:
    encoded = encode_event(SAMPLES[4])
    assert decode_event(bytearray(encoded)) == SAMPLES[4]
    assert decode_event(memoryview(encoded)) == SAMPLES[4]


def test_decode_and_encode_reject_wrong_argument_types() -> None:
    with pytest.raises(TypeError):
        decode_event("not bytes")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        encode_event(PAYLOADS[0])  # type: ignore[arg-type]


# --- envelope strictness ---------------------------------------------------------------------


def altered(sample: StoredEvent, index: int, value: object) -> bytes:
    message = wire(sample)
    message[index] = value
    return pack(message)


def test_unknown_tag() -> None:
    with pytest.raises(UnknownEventTag):
        decode_event(altered(SAMPLES[3], 8, "round.exploded"))


@pytest.mark.parametrize("tag", [1, None, b"round.complete", True])
def test_tag_that_is_not_a_str(tag: object) -> None:
    with pytest.raises(MalformedEvent):
        decode_event(altered(SAMPLES[3], 8, tag))


@pytest.mark.parametrize("schema", [0, 2, -1, True, 1.0, "1", None])
def test_wrong_schema(schema: object) -> None:
    with pytest.raises(SchemaMismatch):
        decode_event(altered(SAMPLES[3], 9, schema))


@pytest.mark.parametrize("version", [0, 2, True, 1.0, "1", None])
def test_wrong_wire_version(version: object) -> None:
    with pytest.raises(SchemaMismatch):
        decode_event(altered(SAMPLES[3], 0, version))


@pytest.mark.parametrize("value", [{}, {"a": "b"}, 1, "event", b"event", None, [], True, 1.5])
def test_a_value_that_is_not_an_envelope_array(value: object) -> None:
    with pytest.raises(MalformedEvent):
        decode_event(pack(value))


@pytest.mark.parametrize("cut", [1, 2])
def test_envelope_with_missing_or_extra_elements(cut: int) -> None:
    message = wire(SAMPLES[3])
    with pytest.raises(MalformedEvent):
        decode_event(pack(message[:-cut]))
    with pytest.raises(MalformedEvent):
        decode_event(pack([*message, None][: 11 + cut]))


ENVELOPE_WRONG: list[tuple[int, object]] = [
    (1, 0),
    (1, -1),
    (1, MAX_SEQUENCE + 1),
    (1, True),
    (1, 1.0),
    (1, "1"),
    (1, None),
    (2, b"\x01" * 15),
    (2, b"\x01" * 17),
    (2, "01" * 16),
    (2, None),
    (3, 1_700_000_000),  # int is not float
    (3, True),
    (3, "now"),
    (3, None),
    (3, math.nan),
    (3, math.inf),
    (4, 1),
    (4, b"round-1"),
    (4, "bad id!"),
    (4, ""),
    (4, "r" * 129),
    (5, b"\x04" * 15),
    (5, "04" * 16),
    (5, 4),
    (6, b"\x05" * 17),
    (6, False),
    (7, ""),
    (7, "n" * 65),
    (7, "node\n1"),
    (7, b"node-1"),
    (7, 1),
    (7, None),
    (10, None),
    (10, "fields"),
]


@pytest.mark.parametrize(("index", "value"), ENVELOPE_WRONG, ids=repr)
def test_each_envelope_element_with_a_wrong_type_or_value(index: int, value: object) -> None:
    with pytest.raises(MalformedEvent):
        decode_event(altered(SAMPLES[4], index, value))


def test_round_events_need_a_round_id_and_node_events_must_not_have_one() -> None:
    with pytest.raises(MalformedEvent, match="round_id"):
        decode_event(altered(SAMPLES[4], 4, None))
    with pytest.raises(MalformedEvent, match="round_id"):
        decode_event(altered(SAMPLES[-1], 4, "round-1"))


def test_envelope_boundaries_are_accepted() -> None:
    sample = stored(PAYLOADS[3], sequence=MAX_SEQUENCE, source="x" * 64, timestamp=-0.0)
    assert decode_event(encode_event(sample)) == sample


# --- field strictness ----------------------------------------------------------------------

WRONG_WIRE_VALUES: dict[FieldKind, list[object]] = {
    FieldKind.INT: [True, False, 1.0, "1", b"\x01", None, {"a": "b"}],
    FieldKind.FLOAT: [1, 0, True, "1.0", b"\x00", None, math.nan, math.inf],
    FieldKind.STR: [b"text", 1, True, 1.5, None, {"a": "b"}],
    FieldKind.BYTES: ["text", 1, None, True, b""],
    FieldKind.ROUND_ID: [b"round-1", 1, None, "", "bad id!", "r" * 129],
    FieldKind.KEY_ID: [b"\x01" * 15, b"\x01" * 17, "01" * 16, 1, None],
    FieldKind.EVENT_ID: [b"\x01" * 15, b"\x01" * 17, "01" * 16, 1, None],
    FieldKind.KEK_VERSION: [0, -1, 2**32, True, 1.0, "1", None, b"\x00\x00\x00\x01"],
    FieldKind.ENUM: ["no_such_value", "COMPUTE", 1, None, b"compute", True],
    FieldKind.STR_MAP: ["a=b", {"a": 1}, {"a": None}, {b"a": "b"}, {"": "b"}, None, 1],
}


def field_cases() -> list[tuple[StoredEvent, str, object]]:
    cases = []
    for sample in SAMPLES:
        for spec in type(sample.payload).FIELDS:
            if isinstance(sample.payload, RoundEvent) and spec.name == "round_id":
                continue  # travels in the envelope; covered above
            for value in WRONG_WIRE_VALUES[spec.kind]:
                cases.append((sample, spec.name, value))
    return cases


@pytest.mark.parametrize(
    ("sample", "name", "value"),
    field_cases(),
    ids=[f"{s.tag}.{n}={v!r:.20}" for s, n, v in field_cases()],
)
def test_each_field_with_a_wrong_wire_type_or_value(
    sample: StoredEvent, name: str, value: object
) -> None:
    message = wire(sample)
    message[10][name] = value
    with pytest.raises(MalformedEvent):
        decode_event(pack(message))


@pytest.mark.parametrize("sample", SAMPLES, ids=SAMPLE_IDS)
def test_each_missing_field(sample: StoredEvent) -> None:
    for name in wire(sample)[10]:
        message = wire(sample)
        del message[10][name]
        with pytest.raises(MalformedEvent, match="missing"):
            decode_event(pack(message))


@pytest.mark.parametrize("sample", SAMPLES, ids=SAMPLE_IDS)
def test_an_extra_field(sample: StoredEvent) -> None:
    for extra in ("surprise", "round_id"):
        message = wire(sample)
        message[10][extra] = "x"
        with pytest.raises(MalformedEvent, match="unexpected"):
            decode_event(pack(message))


def test_bool_is_not_int_and_int_is_not_float() -> None:
    message = wire(SAMPLES[0])
    message[10]["threshold"] = True
    with pytest.raises(MalformedEvent, match="threshold"):
        decode_event(pack(message))
    message = wire(SAMPLES[0])
    message[10]["deadline"] = 1_700_000_100
    with pytest.raises(MalformedEvent, match="deadline"):
        decode_event(pack(message))


@pytest.mark.parametrize(
    ("field", "value"),
    [("threshold", 0), ("threshold", 4), ("committee_size", 1), ("committee_size", 65_536)],
)
def test_out_of_range_values_and_cross_field_rules(field: str, value: int) -> None:
    message = wire(SAMPLES[0])
    message[10][field] = value
    with pytest.raises(MalformedEvent):
        decode_event(pack(message))


def length_cases() -> list[tuple[StoredEvent, str, str | bytes]]:
    """For every str and bin field: one value too long and, if it has a minimum, too short."""
    cases: list[tuple[StoredEvent, str, str | bytes]] = []
    for sample in SAMPLES:
        for spec in type(sample.payload).FIELDS:
            if spec.kind is FieldKind.STR:
                cases.append((sample, spec.name, "x" * (spec.hi + 1)))
                if spec.lo > 0:
                    cases.append((sample, spec.name, "x" * (spec.lo - 1)))
            elif spec.kind is FieldKind.BYTES and spec.lo > 0:
                cases.append((sample, spec.name, b"x" * (spec.lo - 1)))
    return cases


@pytest.mark.parametrize(
    ("sample", "name", "value"),
    length_cases(),
    ids=[f"{s.tag}.{n}:len={len(v)}" for s, n, v in length_cases()],
)
def test_each_str_and_bin_field_outside_its_length(
    sample: StoredEvent, name: str, value: object
) -> None:
    message = wire(sample)
    message[10][name] = value
    with pytest.raises(MalformedEvent, match=name):
        decode_event(pack(message))


def test_handler_failed_error_type_must_be_a_qualified_name() -> None:
    [handler_failed] = [s for s in SAMPLES if isinstance(s.payload, HandlerFailed)]
    message = wire(handler_failed)
    message[10]["error_type"] = "KeyError: 'secret'"
    with pytest.raises(MalformedEvent, match="error_type"):
        decode_event(pack(message))


def test_a_repeated_map_key_is_refused() -> None:
    head = wire(SAMPLES[4])[:10]
    repeated = (
        b"\x9b"
        + b"".join(pack(item) for item in head)
        + b"\x83"
        + pack("kek_version")
        + pack(3)
        + pack("key_id")
        + pack(KID.raw)
        + pack("kek_version")
        + pack(4)
    )
    with pytest.raises(MalformedEvent, match="repeated"):
        decode_event(repeated)


def test_a_repeated_parameter_key_is_refused() -> None:
    head = wire(SAMPLES[0])
    fields = head.pop()
    fields["parameters"] = {}
    body = pack(fields)
    # splice a two-entry map with one key twice in place of the empty parameters map
    body = body.replace(b"\xaaparameters\x80", b"\xaaparameters\x82\xa1a\xa1x\xa1a\xa1y")
    with pytest.raises(MalformedEvent, match="repeated"):
        decode_event(b"\x9b" + b"".join(pack(item) for item in head) + body)


# --- msgpack-level strictness ----------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [msgpack.ExtType(5, b"x"), msgpack.ExtType(0, b""), msgpack.Timestamp(1, 0)],
    ids=["ext", "empty-ext", "timestamp"],
)
def test_ext_types_are_refused(value: object) -> None:
    for index in (1, 3, 10):
        with pytest.raises(MalformedEvent):
            decode_event(altered(SAMPLES[4], index, value))
    message = wire(SAMPLES[6])
    message[10]["ciphertext"] = value
    with pytest.raises(MalformedEvent):
        decode_event(pack(message))


def test_non_str_map_keys_are_refused() -> None:
    for key in (1, 1.5, True, None):
        message = wire(SAMPLES[4])
        message[10][key] = 3
        with pytest.raises(MalformedEvent):
            decode_event(pack(message))


def test_invalid_utf8_is_refused_without_echoing_the_input() -> None:
    message = wire(SAMPLES[4])
    message[7] = "SOURCE"
    encoded = pack(message).replace(b"\xa6SOURCE", b"\xa6\xff\xfeSRCE")
    with pytest.raises(MalformedEvent) as caught:
        decode_event(encoded)
    assert caught.value.__cause__ is None
    assert caught.value.__context__ is None  # a UnicodeDecodeError would hold the input


def test_lengths_claimed_beyond_the_input_are_truncated() -> None:
    for header in (b"\xdb\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff"):  # str32, bin32
        with pytest.raises(TruncatedData):
            decode_event(header + b"x" * 10)


def test_strings_and_binaries_over_the_limits_are_refused() -> None:
    with pytest.raises(MalformedEvent):
        decode_event(altered(SAMPLES[4], 7, "n" * (4 * 1024 + 1)))
    message = wire(SAMPLES[6])
    message[10]["ciphertext"] = b"\x00" * (MAX_CIPHERTEXT_LEN + 1)
    with pytest.raises(MalformedEvent):
        decode_event(pack(message))


@pytest.mark.parametrize(
    "data",
    [
        b"\xdd\xff\xff\xff\xff",  # array of 2**32 - 1 elements
        b"\xdf\xff\xff\xff\xff",  # map of 2**32 - 1 entries
        b"\x9b\x01\xdc\x01\x00",  # an array inside the envelope over the array limit
        b"\x91" * 100_000 + b"\xc0",  # absurd nesting
        b"\xc1",  # the never-used byte
    ],
    ids=["array32", "map32", "nested-array", "nesting", "0xc1"],
)
def test_absurd_lengths_and_invalid_msgpack_are_refused(data: bytes) -> None:
    with pytest.raises(MalformedEvent):
        decode_event(data)


def test_oversized_input_is_refused_before_parsing() -> None:
    with pytest.raises(MalformedEvent, match="exceeds"):
        decode_event(b"\x00" * (MAX_EVENT_SIZE + 1))


def test_empty_input_is_truncated() -> None:
    with pytest.raises(TruncatedData):
        decode_event(b"")


@pytest.mark.parametrize("sample", SAMPLES, ids=SAMPLE_IDS)
def test_truncated_at_every_length(sample: StoredEvent) -> None:
    encoded = encode_event(sample)
    for length in range(len(encoded)):
        with pytest.raises(TruncatedData):
            decode_event(encoded[:length])


@pytest.mark.parametrize(
    "tail", [b"\x00", b"\xc0\xc0", encode_event(SAMPLES[3])], ids=["one", "two", "event"]
)
def test_trailing_bytes(tail: bytes) -> None:
    with pytest.raises(TrailingBytes):
        decode_event(encode_event(SAMPLES[4]) + tail)


def test_non_canonical_but_unambiguous_encodings_are_accepted() -> None:
    """Documented: widths are not policed; re-encoding yields the canonical bytes."""
    canonical = encode_event(SAMPLES[4])
    wide = canonical.replace(b"\x9b\x01\x2a", b"\x9b\x01\xcf" + (42).to_bytes(8, "big"), 1)
    assert wide != canonical
    decoded = decode_event(wide)
    assert decoded == SAMPLES[4]
    assert encode_event(decoded) == canonical


# --- error hygiene and the reused unpacker ----------------------------------------------------


def corrupted_inputs() -> list[bytes]:
    good = encode_event(SAMPLES[6])
    message = wire(SAMPLES[6])
    message[10]["key_id"] = b"\x01" * 17
    return [good[:-3], good + b"\x00", pack(message), altered(SAMPLES[6], 8, "nope"), b"\xc1"]


@pytest.mark.parametrize(
    "data", corrupted_inputs(), ids=["truncated", "trailing", "bad-field", "tag", "c1"]
)
def test_errors_never_echo_ciphertext_bytes(data: bytes) -> None:
    with pytest.raises(CodecError) as caught:
        decode_event(data)
    text = f"{caught.value!s} {caught.value!r} {caught.value.args!r}"
    assert CIPHERTEXT.hex() not in text
    assert "\\xde\\xad" not in text


@pytest.mark.parametrize(
    "data", corrupted_inputs(), ids=["truncated", "trailing", "bad-field", "tag", "c1"]
)
def test_a_failed_decode_does_not_disturb_the_next_one(data: bytes) -> None:
    good = encode_event(SAMPLES[0])
    assert decode_event(good) == SAMPLES[0]
    with pytest.raises(CodecError):
        decode_event(data)
    assert decode_event(good) == SAMPLES[0]


def test_concurrent_decoding_in_threads() -> None:
    encoded = [encode_event(sample) for sample in SAMPLES]
    failures: list[BaseException] = []
    barrier = threading.Barrier(4)

    def work() -> None:
        try:
            barrier.wait(timeout=10)
            for _ in range(50):
                for data, sample in zip(encoded, SAMPLES, strict=True):
                    assert decode_event(data) == sample
                    with pytest.raises(TruncatedData):
                        decode_event(data[:-1])
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert failures == []


def test_encode_refuses_a_tampered_event() -> None:
    sample = stored(RoundComplete(round_id=RID))
    object.__setattr__(sample, "source", object())
    with pytest.raises(MalformedEvent):
        encode_event(sample)
    payload = RoundKeyReady(round_id=RID, key_id=KID, kek_version=KekVersion(1))
    object.__setattr__(payload, "key_id", "not a key id")
    with pytest.raises(MalformedEvent):
        encode_event(stored(payload))


def test_codec_tables_are_built_once_per_type() -> None:
    for sample in SAMPLES:
        decode_event(encode_event(sample))
    first = {tag: codec._CODECS_BY_TAG[tag] for tag in EVENT_TYPES}
    for sample in SAMPLES:
        decode_event(encode_event(sample))
    assert all(codec._CODECS_BY_TAG[tag] is first[tag] for tag in EVENT_TYPES)


# --- the canonical path ----------------------------------------------------------------------


def checked(data: bytes) -> StoredEvent:
    """Decode by the checked path alone: what decode_event did before the canonical path."""
    return codec._decode_message(codec._unpack(data), canonical=False)


ELEMENTS = [
    "version",
    "sequence",
    "event_id",
    "timestamp",
    "round_id",
    "causation_id",
    "correlation_id",
    "source",
    "tag",
    "schema",
]


def envelope(sample: StoredEvent, fields: bytes, **changes: object) -> bytes:
    """The sample's envelope, some elements changed (by name), with a field map spliced in
    as raw msgpack bytes (to write repeated keys, which packb cannot)."""
    head = wire(sample)[:10]
    for name, value in changes.items():
        head[ELEMENTS.index(name)] = value
    return b"\x9b" + b"".join(pack(item) for item in head) + fields


def raw_map(*pairs: tuple[object, object]) -> bytes:
    """A msgpack fixmap of ``pairs``, in that order, repeats included."""
    assert len(pairs) < 16
    return bytes([0x80 + len(pairs)]) + b"".join(pack(k) + pack(v) for k, v in pairs)


@pytest.mark.parametrize("sample", SAMPLES, ids=SAMPLE_IDS)
def test_canonical_bytes_never_reach_the_checked_path(
    sample: StoredEvent, monkeypatch: pytest.MonkeyPatch
) -> None:
    encoded = encode_event(sample)

    def unexpected(data: object) -> object:
        raise AssertionError("the checked path ran")

    monkeypatch.setattr(codec, "_unpack", unexpected)
    decoded = decode_event(encoded)
    assert decoded == sample
    assert encode_event(decoded) == encoded


@pytest.mark.parametrize("sample", SAMPLES, ids=SAMPLE_IDS)
def test_both_paths_build_equal_events(sample: StoredEvent) -> None:
    encoded = encode_event(sample)
    fast = codec._decode_canonical(encoded)
    assert fast is not None
    slow = checked(encoded)
    assert fast == slow == sample
    assert repr(fast) == repr(slow)
    assert encode_event(fast) == encode_event(slow) == encoded


def test_field_maps_out_of_key_order_go_to_the_checked_path_and_decode() -> None:
    sample = SAMPLES[0]  # four fields
    fields = wire(sample)[10]
    reordered = envelope(sample, raw_map(*reversed(list(fields.items()))))
    assert codec._decode_canonical(reordered) is None
    assert decode_event(reordered) == sample
    assert encode_event(decode_event(reordered)) == encode_event(sample)


def test_bytearray_and_memoryview_take_the_checked_path(monkeypatch: pytest.MonkeyPatch) -> None:
    encoded = encode_event(SAMPLES[0])
    calls: list[object] = []
    unpack = codec._unpack

    def counted(data: bytes | bytearray | memoryview) -> object:
        calls.append(data)
        return unpack(data)

    monkeypatch.setattr(codec, "_unpack", counted)
    assert decode_event(bytearray(encoded)) == SAMPLES[0]
    assert decode_event(memoryview(encoded)) == SAMPLES[0]
    assert len(calls) == 2


def test_non_ascii_text_is_accepted_on_the_canonical_path() -> None:
    payload = RoundFailed(
        round_id=RID,
        failed_at=RoundStage.COMPUTE,
        reason=FailureReason.NO_INPUTS,
        detail="keine Eingaben, aucune entrée ✗",
    )
    sample = stored(payload)
    assert codec._decode_canonical(encode_event(sample)) == sample
    requested = stored(
        RoundRequested(
            round_id=RID, deadline=1.0, threshold=1, committee_size=1, parameters={"é": "ü"}
        )
    )
    assert codec._decode_canonical(encode_event(requested)) == requested


def test_an_empty_parameter_map_decodes_on_both_paths() -> None:
    sample = stored(RoundRequested(round_id=RID, deadline=1.0, threshold=1, committee_size=1))
    encoded = encode_event(sample)
    for decoded in (decode_event(encoded), checked(encoded)):
        assert decoded == sample
        parameters = decoded.payload.parameters  # type: ignore[attr-defined]
        assert type(parameters) is FrozenStrMap
        assert parameters == {}


def test_a_repeated_field_key_is_refused_with_the_right_number_of_entries() -> None:
    """Two entries for a two-field type, but one key twice: no key may stand in for another."""
    round_key_ready = SAMPLES[6]
    assert isinstance(round_key_ready.payload, RoundKeyReady)
    for pairs in (
        (("kek_version", 3), ("kek_version", 3)),
        (("key_id", KID.raw), ("key_id", KID.raw)),
        (("kek_version", 3), ("key_id", KID.raw), ("key_id", KID.raw)),
    ):
        data = envelope(round_key_ready, raw_map(*pairs))
        assert codec._decode_canonical(data) is None
        with pytest.raises(MalformedEvent, match="repeated"):
            decode_event(data)


def test_a_repeated_key_anywhere_is_refused_before_any_other_defect() -> None:
    """As before the canonical path: the unpacker refuses a repeated key first, so the
    error does not depend on which other check would have failed."""
    sample = SAMPLES[3]  # round.stage_changed: one field, "stage"
    repeated = raw_map(("stage", "compute"), ("stage", "compute"))
    head = wire(sample)[:10]
    in_the_envelope = (  # a map with a repeated key where the source belongs
        b"\x9b"
        + b"".join(pack(item) for item in head[:7])
        + raw_map(("a", 1), ("a", 2))
        + b"".join(pack(item) for item in head[8:])
        + raw_map(("stage", "compute"))
    )
    for data in [
        envelope(sample, repeated),
        envelope(sample, repeated, version=2),
        envelope(sample, repeated, tag="round.exploded"),
        envelope(sample, repeated, schema=9),
        envelope(sample, repeated) + b"\x00",
        in_the_envelope,
    ]:
        assert codec._decode_canonical(data) is None
        with pytest.raises(MalformedEvent, match="repeated"):
            decode_event(data)


def malformed_inputs() -> list[bytes]:
    """Every malformed input built above, and truncated and extended samples."""
    inputs = [altered(SAMPLES[4], index, value) for index, value in ENVELOPE_WRONG]
    for sample, name, value in [*field_cases(), *length_cases()]:
        message = wire(sample)
        message[10][name] = value
        inputs.append(pack(message))
    for sample in SAMPLES:
        encoded = encode_event(sample)
        inputs += [encoded[:-1], encoded[: len(encoded) // 2], encoded + b"\xc0"]
        inputs.append(altered(sample, 10, {**wire(sample)[10], "surprise": 1}))
    inputs += corrupted_inputs()
    return inputs


def test_the_canonical_path_accepts_nothing_the_checked_path_refuses() -> None:
    """And decode_event reports exactly the checked path's error, message included."""
    for data in malformed_inputs():
        assert codec._decode_canonical(data) is None
        with pytest.raises(CodecError) as expected:
            checked(data)
        with pytest.raises(CodecError) as got:
            decode_event(data)
        assert type(got.value) is type(expected.value)
        assert str(got.value) == str(expected.value)
        # nothing chained from the canonical path's attempt
        assert type(got.value.__context__) is type(expected.value.__context__)
        assert type(got.value.__cause__) is type(expected.value.__cause__)


def test_compiled_readers_are_built_from_names_and_integer_bounds_only() -> None:
    for cls in EVENT_TYPES.values():
        type_codec = codec._codec_for_class(cls)
        source = type_codec.source
        assert source.startswith("def read_pairs(round_id, fields):\n")
        for name, _ in type_codec.fields:
            assert source.count(repr(name)) == 1  # in the key check, nowhere else
        compile(source, "<check>", "exec")
