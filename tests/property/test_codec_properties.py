"""Properties of the codec over generated events and hostile bytes."""

import dataclasses
from typing import Any

import msgpack
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from enclave_keys import codec
from enclave_keys.codec import decode_event, encode_event
from enclave_keys.errors import CodecError, TrailingBytes, TruncatedData
from enclave_keys.events import EVENT_TYPES, Event, FieldKind, StoredEvent
from enclave_keys.testing.strategies import events_of, stored_events

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ANY_FINITE = st.floats(allow_nan=False, allow_infinity=False)


def decode_or_codec_error(data: bytes) -> StoredEvent | None:
    """Decode ``data``; the only acceptable failure is a CodecError subclass."""
    try:
        return decode_event(data)
    except CodecError:
        return None


@FAST
@given(stored_events(times=ANY_FINITE))
def test_every_generated_event_round_trips_byte_for_byte(stored: StoredEvent) -> None:
    encoded = encode_event(stored)
    decoded = decode_event(encoded)
    assert decoded == stored
    assert encode_event(decoded) == encoded


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_every_registered_type_is_generated_and_round_trips(data: st.DataObject) -> None:
    for cls in EVENT_TYPES.values():
        stored = data.draw(stored_events(payloads=events_of(cls)))
        assert type(stored.payload) is cls
        assert decode_event(encode_event(stored)) == stored


def rebuilt(payload: Event) -> Event:
    """An equal payload built afresh, with maps given in reversed insertion order."""
    values: dict[str, Any] = {}
    for spec in payload.FIELDS:
        value = getattr(payload, spec.name)
        values[spec.name] = (
            dict(reversed(list(value.items()))) if spec.kind is FieldKind.STR_MAP else value
        )
    return type(payload)(**values)


@FAST
@given(stored_events())
def test_encoding_is_deterministic(stored: StoredEvent) -> None:
    again = dataclasses.replace(stored, payload=rebuilt(stored.payload))
    assert again == stored
    assert encode_event(again) == encode_event(stored)


@FAST
@given(st.binary(max_size=512))
@example(b"")
@example(b"\x9b")
@example(b"\xc1")
@example(b"\x91" * 10_000)
def test_arbitrary_bytes_raise_only_codec_errors(data: bytes) -> None:
    decode_or_codec_error(data)


@FAST
@given(stored_events(), st.lists(st.integers(min_value=0), min_size=1, max_size=4))
def test_bit_flips_decode_or_raise_codec_errors(stored: StoredEvent, positions: list[int]) -> None:
    encoded = bytearray(encode_event(stored))
    for position in positions:
        bit = position % (len(encoded) * 8)
        encoded[bit // 8] ^= 1 << (bit % 8)
    decoded = decode_or_codec_error(bytes(encoded))
    if decoded is not None:  # whatever decodes is a valid event that round-trips
        assert decode_event(encode_event(decoded)) == decoded


@FAST
@given(stored_events(), st.data())
def test_every_proper_prefix_is_truncated(stored: StoredEvent, data: st.DataObject) -> None:
    encoded = encode_event(stored)
    length = data.draw(st.integers(0, len(encoded) - 1))
    try:
        decode_event(encoded[:length])
    except TruncatedData:
        pass
    else:
        raise AssertionError("a proper prefix decoded")


@FAST
@given(stored_events(), st.binary(min_size=1, max_size=64))
def test_any_suffix_is_trailing_bytes(stored: StoredEvent, tail: bytes) -> None:
    try:
        decode_event(encode_event(stored) + tail)
    except TrailingBytes:
        pass
    else:
        raise AssertionError("trailing bytes were accepted")


MSGPACK_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=8,
)


def mutated(stored: StoredEvent, data: st.DataObject) -> bytes:
    """``stored`` encoded with one envelope element or field replaced by any msgpack value."""
    message = msgpack.unpackb(encode_event(stored), raw=False)
    fields = message[10]
    target = data.draw(st.sampled_from([*range(11), *(f"field:{name}" for name in fields)]))
    value = data.draw(MSGPACK_VALUES)
    if isinstance(target, int):
        message[target] = value
    else:
        fields[target.removeprefix("field:")] = value
    packed: bytes = msgpack.packb(message, use_bin_type=True)
    return packed


@FAST
@given(stored_events(), st.data())
def test_structured_mutations_decode_or_raise_codec_errors(
    stored: StoredEvent, data: st.DataObject
) -> None:
    """Replace one envelope element or field with any msgpack value."""
    decoded = decode_or_codec_error(mutated(stored, data))
    if decoded is not None:
        assert decode_event(encode_event(decoded)) == decoded


# --- the canonical path agrees with the checked path ------------------------------------------


def checked_or_none(data: bytes) -> StoredEvent | None:
    """The checked path alone (decode_event before the canonical path), or None."""
    try:
        return codec._decode_message(codec._unpack(data), canonical=False)
    except CodecError:
        return None


def assert_paths_agree(data: bytes) -> None:
    """The canonical path accepts only what the checked path accepts, as an equal event."""
    fast = codec._decode_canonical(data)
    if fast is not None:
        slow = checked_or_none(data)
        assert slow is not None, "the canonical path accepted input the checked path refuses"
        assert fast == slow
        assert type(fast.payload) is type(slow.payload)
        assert encode_event(fast) == encode_event(slow)


@FAST
@given(stored_events(times=ANY_FINITE))
def test_canonical_encodings_take_the_canonical_path(stored: StoredEvent) -> None:
    assert codec._decode_canonical(encode_event(stored)) == stored


@FAST
@given(stored_events(), st.lists(st.integers(min_value=0), min_size=1, max_size=4))
def test_the_paths_agree_on_bit_flipped_input(stored: StoredEvent, positions: list[int]) -> None:
    encoded = bytearray(encode_event(stored))
    for position in positions:
        bit = position % (len(encoded) * 8)
        encoded[bit // 8] ^= 1 << (bit % 8)
    assert_paths_agree(bytes(encoded))


@FAST
@given(stored_events(), st.data())
def test_the_paths_agree_on_structured_mutations(stored: StoredEvent, data: st.DataObject) -> None:
    assert_paths_agree(mutated(stored, data))


@FAST
@given(st.binary(max_size=512))
def test_the_paths_agree_on_arbitrary_bytes(data: bytes) -> None:
    assert_paths_agree(data)
