"""The byte layouts of store records, and decoding of damaged ones."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from enclave_keys.codec import encode_event
from enclave_keys.errors import CorruptRecord, InvalidIdentifier
from enclave_keys.store import records
from enclave_keys.store.base import decode_event_record
from tests.store.helpers import make_event


def test_sequence_keys_are_u64_big_endian() -> None:
    assert records.sequence_key(1) == b"\x00\x00\x00\x00\x00\x00\x00\x01"
    assert records.sequence_key(2**64 - 1) == b"\xff" * 8
    assert records.parse_sequence_key(records.sequence_key(258), db="events") == 258


@given(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1))
def test_sequence_key_order_is_numeric_order(a: int, b: int) -> None:
    assert (records.sequence_key(a) < records.sequence_key(b)) == (a < b)


@pytest.mark.parametrize("raw", [b"", b"\x01", b"\x00" * 9])
def test_a_sequence_key_of_the_wrong_length_is_corrupt(raw: bytes) -> None:
    with pytest.raises(CorruptRecord):
        records.parse_sequence_key(raw, db="events")


def test_the_format_version_record_is_a_u32() -> None:
    assert records.format_version_value() == b"\x00\x00\x00\x01"
    assert records.parse_format_version(b"\x00\x00\x01\x00") == 256
    with pytest.raises(CorruptRecord):
        records.parse_format_version(b"\x01")


def test_an_event_record_round_trips() -> None:
    event = make_event(9)
    assert decode_event_record(records.sequence_key(9), encode_event(event)) == event


@given(st.binary(max_size=200))
def test_any_damaged_event_bytes_raise_corrupt_record_only(raw: bytes) -> None:
    """Whatever the bytes, reading them raises CorruptRecord — never a codec error."""
    with contextlib.suppress(CorruptRecord):
        decode_event_record(records.sequence_key(1), raw)


@given(st.data())
def test_a_flipped_or_cut_event_is_corrupt_or_still_numbered_right(data: st.DataObject) -> None:
    encoded = bytearray(encode_event(make_event(4)))
    index = data.draw(st.integers(0, len(encoded) - 1))
    if data.draw(st.booleans()):
        encoded[index] ^= data.draw(st.integers(1, 255))
    else:
        del encoded[index:]
    try:
        stored = decode_event_record(records.sequence_key(4), bytes(encoded))
    except CorruptRecord:
        return
    assert stored.sequence == 4


@pytest.mark.parametrize("name", ["store.format_version", "store.other"])
def test_store_names_are_reserved_for_writes_only(name: str) -> None:
    assert records.meta_key(name) == name.encode()
    with pytest.raises(InvalidIdentifier):
        records.writable_meta_key(name)
