"""``rewrap_round_keys``: the ratchet's bulk rewrap, against the one-key wrap functions."""

from __future__ import annotations

import pytest

from enclave_keys.crypto import (
    EpochKey,
    RoundCipher,
    read_wrapped_header,
    rewrap_round_keys,
    unwrap_round_key,
    wrap_round_key,
)
from enclave_keys.errors import SecretWiped
from enclave_keys.ids import EpochNumber, RoundId

OLD, NEW = EpochNumber(4), EpochNumber(5)
ROUNDS = [RoundId(f"r{i}") for i in range(5)]


@pytest.fixture
def epochs() -> tuple[EpochKey, EpochKey]:
    return EpochKey.generate(OLD), EpochKey.generate(NEW)


def test_every_key_comes_out_the_same_key_under_the_new_epoch(
    epochs: tuple[EpochKey, EpochKey],
) -> None:
    old, new = epochs
    ciphers = {rid: RoundCipher.generate(rid) for rid in ROUNDS}
    blobs = [(rid, wrap_round_key(old, c)) for rid, c in ciphers.items()]
    out = rewrap_round_keys(old, new, [(rid.to_bytes(), blob) for rid, blob in blobs])
    assert [raw for raw, _ in out] == [rid.to_bytes() for rid in ROUNDS]
    for (rid, before), (_, after) in zip(blobs, out, strict=True):
        assert after is not None
        assert read_wrapped_header(after) == (NEW, ciphers[rid].key_id)
        assert after[25:37] != before[25:37], "a fresh nonce"
        sealed = ciphers[rid].seal("probe", b"same key")
        with unwrap_round_key(new, rid, after) as back:
            assert back.open("probe", sealed) == b"same key"


def test_blobs_that_do_not_open_give_none_and_the_rest_go_on(
    epochs: tuple[EpochKey, EpochKey],
) -> None:
    old, new = epochs
    with RoundCipher.generate(ROUNDS[0]) as cipher:
        good = wrap_round_key(old, cipher)
    with EpochKey.generate(EpochNumber(9)) as stranger, RoundCipher.generate(ROUNDS[1]) as c:
        other_epoch = wrap_round_key(stranger, c)
    tampered = good[:-1] + bytes([good[-1] ^ 1])
    items = [
        (ROUNDS[0], good),
        (ROUNDS[1], other_epoch),
        (ROUNDS[0], tampered),
        (ROUNDS[2], good),  # moved to another round
        (ROUNDS[3], good[:-1]),
        (ROUNDS[4], b"\x01" + good[1:]),
        (ROUNDS[0], good),
    ]
    out = rewrap_round_keys(old, new, [(rid.to_bytes(), blob) for rid, blob in items])
    assert [blob is not None for _, blob in out] == [True, False, False, False, False, False, True]


def test_a_wiped_epoch_key_is_refused(epochs: tuple[EpochKey, EpochKey]) -> None:
    old, new = epochs
    old.wipe()
    with pytest.raises(SecretWiped):
        rewrap_round_keys(old, new, [])
