"""Properties of the crypto layer: round trips hold, and bad bytes only ever fail one way."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enclave_keys.crypto import (
    ENVELOPE_OVERHEAD,
    WRAPPED_EPOCH_SIZE,
    WRAPPED_KEY_SIZE,
    EpochKey,
    Kek,
    PassphraseRecord,
    RoundCipher,
    SecretBytes,
    read_epoch_header,
    read_wrapped_header,
    unwrap_epoch_key,
    unwrap_round_key,
    wrap_epoch_key,
    wrap_round_key,
)
from enclave_keys.crypto._common import frame
from enclave_keys.errors import CorruptRecord, UnwrapFailed, WeakKdfParameters
from enclave_keys.ids import EpochNumber, KekVersion, KeyId, RoundId

ROUND = RoundId("e3:prop")
CIPHER = RoundCipher.generate(ROUND)
KEK = Kek(KekVersion(3), SecretBytes.random(32))
EPOCH = EpochKey(EpochNumber(11), SecretBytes.random(32))
BLOB = wrap_round_key(EPOCH, CIPHER)  # a round key under the epoch key
EPOCH_BLOB = wrap_epoch_key(KEK, EPOCH)  # the epoch key under the KEK
KEY_HEADER = 1 + 8 + 16  # version | epoch | key id
EPOCH_HEADER = 1 + 4 + 8  # version | KEK version | epoch
HEADER = CIPHER.seal("keyshare", b"")[:17]

purposes = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:/\-]{0,63}", fullmatch=True)
round_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,40}", fullmatch=True).map(RoundId)
fast = settings(max_examples=200, deadline=None)


@fast
@given(purpose=purposes, plaintext=st.binary(max_size=4096))
def test_seal_then_open_round_trips(purpose: str, plaintext: bytes) -> None:
    envelope = CIPHER.seal(purpose, plaintext)
    assert len(envelope) == len(plaintext) + ENVELOPE_OVERHEAD
    assert CIPHER.open(purpose, envelope) == plaintext


@fast
@given(data=st.binary(max_size=200))
def test_arbitrary_bytes_only_fail_to_open(data: bytes) -> None:
    with pytest.raises(UnwrapFailed):
        CIPHER.open("keyshare", data)


@fast
@given(tail=st.binary(min_size=ENVELOPE_OVERHEAD - 17, max_size=200))
def test_arbitrary_bodies_under_the_right_header_only_fail_to_open(tail: bytes) -> None:
    with pytest.raises(UnwrapFailed):
        CIPHER.open("keyshare", HEADER + tail)


@fast
@given(
    plaintext=st.binary(max_size=64),
    position=st.integers(min_value=0),
    mask=st.integers(min_value=1, max_value=255),
)
def test_any_corrupted_byte_fails_to_open(plaintext: bytes, position: int, mask: int) -> None:
    envelope = bytearray(CIPHER.seal("keyshare", plaintext))
    envelope[position % len(envelope)] ^= mask
    with pytest.raises(UnwrapFailed):
        CIPHER.open("keyshare", bytes(envelope))


@fast
@given(seal_purpose=purposes, open_purpose=purposes)
def test_an_envelope_only_opens_for_its_own_purpose(seal_purpose: str, open_purpose: str) -> None:
    envelope = CIPHER.seal(seal_purpose, b"share")
    if seal_purpose == open_purpose:
        assert CIPHER.open(open_purpose, envelope) == b"share"
    else:
        with pytest.raises(UnwrapFailed):
            CIPHER.open(open_purpose, envelope)


# --- a round key wrapped under the storage epoch key --------------------------------------


@fast
@given(data=st.binary(max_size=2 * WRAPPED_KEY_SIZE))
def test_arbitrary_bytes_only_fail_to_unwrap(data: bytes) -> None:
    with pytest.raises(UnwrapFailed):
        unwrap_round_key(EPOCH, ROUND, data)


@fast
@given(
    body=st.binary(min_size=WRAPPED_KEY_SIZE - KEY_HEADER, max_size=WRAPPED_KEY_SIZE - KEY_HEADER)
)
def test_arbitrary_bodies_under_the_right_header_only_fail_to_unwrap(body: bytes) -> None:
    with pytest.raises(UnwrapFailed):
        unwrap_round_key(EPOCH, ROUND, BLOB[:KEY_HEADER] + body)


@fast
@given(position=st.integers(min_value=0), mask=st.integers(min_value=1, max_value=255))
def test_any_corrupted_byte_fails_to_unwrap(position: int, mask: int) -> None:
    blob = bytearray(BLOB)
    blob[position % len(blob)] ^= mask
    with pytest.raises(UnwrapFailed):
        unwrap_round_key(EPOCH, ROUND, bytes(blob))


@fast
@given(round_id=st.one_of(st.just(ROUND), round_ids))
def test_a_wrapped_key_only_unwraps_for_its_own_round(round_id: RoundId) -> None:
    if round_id == ROUND:
        assert unwrap_round_key(EPOCH, round_id, BLOB).key_id == CIPHER.key_id
    else:
        with pytest.raises(UnwrapFailed):
            unwrap_round_key(EPOCH, round_id, BLOB)


@fast
@given(number=st.one_of(st.just(EPOCH.number.number), st.integers(1, EpochNumber.MAX)))
def test_a_wrapped_key_only_unwraps_under_its_own_epoch(number: int) -> None:
    """Even with the right key bytes, an epoch key of another number opens nothing, and
    relabelling the blob's epoch does not help: the number is authenticated."""
    with EPOCH._borrow_key() as raw:
        same_bytes = EpochKey(EpochNumber(number), SecretBytes.from_bytes(bytes(raw)))
    relabelled = BLOB[:1] + EpochNumber(number).to_bytes() + BLOB[9:]
    with same_bytes:
        if number == EPOCH.number.number:
            assert unwrap_round_key(same_bytes, ROUND, BLOB).key_id == CIPHER.key_id
            return
        with pytest.raises(UnwrapFailed):
            unwrap_round_key(same_bytes, ROUND, BLOB)
        with pytest.raises(UnwrapFailed):
            unwrap_round_key(same_bytes, ROUND, relabelled)
        with pytest.raises(UnwrapFailed):
            unwrap_round_key(EPOCH, ROUND, relabelled)


@fast
@given(data=st.binary(max_size=2 * WRAPPED_KEY_SIZE))
def test_read_wrapped_header_parses_or_fails_opaquely(data: bytes) -> None:
    try:
        epoch, key_id = read_wrapped_header(data)
    except UnwrapFailed:
        return
    assert len(data) == WRAPPED_KEY_SIZE
    assert data[0] == 2
    assert epoch == EpochNumber.from_bytes(data[1:9])
    assert key_id == KeyId(data[9:25])


# --- the epoch key wrapped under a KEK ------------------------------------------------------


@fast
@given(data=st.binary(max_size=2 * WRAPPED_EPOCH_SIZE))
def test_arbitrary_bytes_only_fail_to_unwrap_as_an_epoch_key(data: bytes) -> None:
    with pytest.raises(UnwrapFailed):
        unwrap_epoch_key(KEK, data)


@fast
@given(
    body=st.binary(
        min_size=WRAPPED_EPOCH_SIZE - EPOCH_HEADER, max_size=WRAPPED_EPOCH_SIZE - EPOCH_HEADER
    )
)
def test_arbitrary_bodies_under_the_right_epoch_header_only_fail_to_unwrap(body: bytes) -> None:
    with pytest.raises(UnwrapFailed):
        unwrap_epoch_key(KEK, EPOCH_BLOB[:EPOCH_HEADER] + body)


@fast
@given(position=st.integers(min_value=0), mask=st.integers(min_value=1, max_value=255))
def test_any_corrupted_byte_fails_to_unwrap_the_epoch_key(position: int, mask: int) -> None:
    blob = bytearray(EPOCH_BLOB)
    blob[position % len(blob)] ^= mask
    with pytest.raises(UnwrapFailed):
        unwrap_epoch_key(KEK, bytes(blob))


def test_the_epoch_blob_unwraps_to_the_epoch_key_that_opens_the_round_blob() -> None:
    with unwrap_epoch_key(KEK, EPOCH_BLOB) as epoch:
        assert epoch.number == EPOCH.number
        with unwrap_round_key(epoch, ROUND, BLOB) as cipher:
            assert cipher.key_id == CIPHER.key_id
            assert cipher.open("probe", CIPHER.seal("probe", b"x")) == b"x"


@fast
@given(data=st.binary(max_size=2 * WRAPPED_EPOCH_SIZE))
def test_read_epoch_header_parses_or_fails_opaquely(data: bytes) -> None:
    try:
        kek_version, epoch = read_epoch_header(data)
    except UnwrapFailed:
        return
    assert len(data) == WRAPPED_EPOCH_SIZE
    assert data[0] == 1
    assert kek_version == KekVersion.from_bytes(data[1:5])
    assert epoch == EpochNumber.from_bytes(data[5:13])


@fast
@given(data=st.binary(max_size=160))
def test_arbitrary_record_bytes_decode_or_fail_with_a_typed_error(data: bytes) -> None:
    try:
        record = PassphraseRecord.from_bytes(data)
    except (CorruptRecord, WeakKdfParameters):
        return
    assert record.to_bytes() == data


@fast
@given(
    a=st.lists(st.binary(max_size=8), max_size=5),
    b=st.lists(st.binary(max_size=8), max_size=5),
)
def test_associated_data_framing_is_unambiguous(a: list[bytes], b: list[bytes]) -> None:
    assert (frame(*a) == frame(*b)) == (a == b)
