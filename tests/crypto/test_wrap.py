"""The two key wraps (crypto/wrap.py): a round key under a storage epoch key (85 bytes, v2)
and an epoch key under a KEK (73 bytes, v1)."""

from __future__ import annotations

import copy
import ctypes
import mmap
import pickle
from collections.abc import Callable, Iterator

import pytest
from structlog.testing import capture_logs

from enclave_keys.crypto import (
    WRAPPED_EPOCH_SIZE,
    WRAPPED_EPOCH_VERSION,
    WRAPPED_KEY_SIZE,
    WRAPPED_KEY_VERSION,
    EpochKey,
    Kek,
    RoundCipher,
    SecretBytes,
    read_epoch_header,
    read_wrapped_header,
    unwrap_epoch_key,
    unwrap_round_key,
    wrap_epoch_key,
    wrap_round_key,
)
from enclave_keys.crypto import secret as secret_module
from enclave_keys.errors import InvalidKeyMaterial, SecretWiped, UnwrapFailed
from enclave_keys.ids import EpochNumber, KekVersion, KeyId, RoundId

ROUND = RoundId("e3:42")
ROUND_KEY = bytes(range(32))
KEY_ID = KeyId(bytes(range(0x10, 0x20)))
EPOCH_KEY = bytes(range(0x60, 0x80))
KEK_KEY = bytes(range(0x40, 0x60))
E5 = EpochNumber(5)
V7 = KekVersion(7)
ROUND_WRAP_NONCE = bytes(range(0xB0, 0xBC))
EPOCH_WRAP_NONCE = bytes(range(0xC0, 0xCC))

# Both computed independently with the bare AESGCM primitive and the layouts in
# docs/storage-format.md (each AAD field a 2-byte big-endian length, then the bytes):
#   round key: AAD = frame("enclave_keys/round-key-wrap/v2", header (25 bytes), "e3:42")
#   epoch key: AAD = frame("enclave_keys/epoch-key-wrap/v1", header (13 bytes))
KNOWN_ROUND_BLOB = bytes.fromhex(
    "020000000000000005101112131415161718191a1b1c1d1e1fb0b1b2b3b4b5b6b7b8b9babbe634e3960d"
    "94347bd95322bcd61987d074d611b70489a895d660bab9cb7e1e360c6b93ce3f9ca1f45e19cc0e42cfff4b"
)
KNOWN_EPOCH_BLOB = bytes.fromhex(
    "01000000070000000000000005c0c1c2c3c4c5c6c7c8c9cacb3f2552ad1eff5b8c1cd04e5dc7cecca2ef"
    "842c22aa5b587f84ca4917540704393123b3c655de912db202e9623509238d"
)


def fixed(nonce: bytes) -> Callable[[int], bytes]:
    """Deterministic entropy handing out ``nonce`` (for known-answer vectors only)."""

    def entropy(size: int) -> bytes:
        assert size == len(nonce)
        return nonce

    return entropy


def make_epoch(number: EpochNumber = E5, key: bytes = EPOCH_KEY) -> EpochKey:
    return EpochKey(number, SecretBytes.from_bytes(key))


def make_kek(version: KekVersion = V7, key: bytes = KEK_KEY) -> Kek:
    return Kek(version, SecretBytes.from_bytes(key))


def make_cipher(round_id: RoundId = ROUND) -> RoundCipher:
    return RoundCipher(round_id, KEY_ID, SecretBytes.from_bytes(ROUND_KEY))


@pytest.fixture
def epoch() -> Iterator[EpochKey]:
    with make_epoch() as fresh:
        yield fresh


@pytest.fixture
def kek() -> Iterator[Kek]:
    with make_kek() as fresh:
        yield fresh


@pytest.fixture
def blob(epoch: EpochKey) -> bytes:
    """A round key wrapped under the epoch key."""
    with make_cipher() as cipher:
        return wrap_round_key(epoch, cipher)


@pytest.fixture
def epoch_blob(kek: Kek, epoch: EpochKey) -> bytes:
    """The epoch key wrapped under the KEK."""
    return wrap_epoch_key(kek, epoch)


def assert_opaque(excinfo: pytest.ExceptionInfo[UnwrapFailed], blob: bytes) -> None:
    assert type(excinfo.value) is UnwrapFailed
    text = str(excinfo.value) + repr(excinfo.value)
    for start in range(0, max(len(blob) - 3, 0), 4):
        assert blob[start : start + 4].hex() not in text
    assert excinfo.value.__cause__ is None


def assert_rejected(epoch: EpochKey, blob: bytes, round_id: RoundId = ROUND) -> None:
    with pytest.raises(UnwrapFailed) as excinfo:
        unwrap_round_key(epoch, round_id, blob)
    assert_opaque(excinfo, blob)


def assert_epoch_rejected(kek: Kek, blob: bytes) -> None:
    with pytest.raises(UnwrapFailed) as excinfo:
        unwrap_epoch_key(kek, blob)
    assert_opaque(excinfo, blob)


def key_of(holder: EpochKey | RoundCipher) -> bytes:
    with holder._borrow_key() as raw:
        return bytes(raw)


# --- round key under epoch key: format ------------------------------------------------------


def test_known_answer_round_blob() -> None:
    with EpochKey(E5, SecretBytes.from_bytes(EPOCH_KEY), entropy=fixed(ROUND_WRAP_NONCE)) as e:
        assert wrap_round_key(e, make_cipher()) == KNOWN_ROUND_BLOB


def test_known_round_blob_unwraps_to_the_known_key(epoch: EpochKey) -> None:
    with unwrap_round_key(epoch, ROUND, KNOWN_ROUND_BLOB) as restored:
        assert (restored.round_id, restored.key_id) == (ROUND, KEY_ID)
        assert key_of(restored) == ROUND_KEY


def test_round_blob_layout(blob: bytes) -> None:
    assert WRAPPED_KEY_SIZE == 85
    assert len(blob) == WRAPPED_KEY_SIZE
    assert blob[0] == WRAPPED_KEY_VERSION == 2
    assert blob[1:9] == (5).to_bytes(8, "big")
    assert blob[9:25] == KEY_ID.raw
    assert ROUND_KEY not in blob
    assert EPOCH_KEY not in blob
    assert read_wrapped_header(blob) == (E5, KEY_ID)


def test_wrapping_a_round_key_twice_uses_fresh_nonces(epoch: EpochKey) -> None:
    cipher = make_cipher()
    first, second = wrap_round_key(epoch, cipher), wrap_round_key(epoch, cipher)
    assert first[:25] == second[:25]
    assert first[25:37] != second[25:37]
    assert first[37:] != second[37:]


# --- round key under epoch key: round trip ------------------------------------------------


def test_unwrap_restores_a_cipher_that_opens_the_original_envelopes(epoch: EpochKey) -> None:
    original = RoundCipher.generate(ROUND)
    envelope = original.seal("keyshare", b"share")
    restored = unwrap_round_key(epoch, ROUND, wrap_round_key(epoch, original))
    assert restored.round_id == ROUND
    assert restored.key_id == original.key_id
    assert restored.open("keyshare", envelope) == b"share"
    assert original.open("keyshare", restored.seal("keyshare", b"back")) == b"back"
    assert key_of(restored) == key_of(original)


def test_neither_the_epoch_key_nor_the_kek_opens_round_data() -> None:
    envelope = make_cipher().seal("keyshare", b"share")
    for wrong in (EPOCH_KEY, KEK_KEY):
        as_round_key = RoundCipher(ROUND, KEY_ID, SecretBytes.from_bytes(wrong))
        with as_round_key, pytest.raises(UnwrapFailed):
            as_round_key.open("keyshare", envelope)


# --- round key under epoch key: everything wrong is UnwrapFailed ------------------------------


def test_every_single_bit_flip_is_rejected(epoch: EpochKey, blob: bytes) -> None:
    for index in range(len(blob)):
        for bit in range(8):
            tampered = bytearray(blob)
            tampered[index] ^= 1 << bit
            assert_rejected(epoch, bytes(tampered))


def test_every_truncation_is_rejected(epoch: EpochKey, blob: bytes) -> None:
    for length in range(len(blob)):
        assert_rejected(epoch, blob[:length])


@pytest.mark.parametrize("extra", [b"\x00", bytes(16)])
def test_appended_bytes_are_rejected(epoch: EpochKey, blob: bytes, extra: bytes) -> None:
    assert_rejected(epoch, blob + extra)


def test_wrong_round_is_rejected(epoch: EpochKey, blob: bytes) -> None:
    assert_rejected(epoch, blob, round_id=RoundId("e3:43"))


def test_another_epoch_key_of_the_same_number_is_rejected(blob: bytes) -> None:
    with make_epoch(key=bytes(32)) as other:
        assert_rejected(other, blob)


def test_a_blob_naming_another_epoch_is_rejected(blob: bytes) -> None:
    with make_epoch(number=EpochNumber(6)) as same_key_e6:
        assert_rejected(same_key_e6, blob)  # the header names e5
        relabelled = bytearray(blob)
        relabelled[1:9] = (6).to_bytes(8, "big")
        assert_rejected(same_key_e6, bytes(relabelled))  # the header is authenticated


def test_a_round_blob_does_not_unwrap_under_the_kek_bytes(blob: bytes) -> None:
    # the KEK's key, used as if it were the epoch key: the hierarchy has two distinct levels
    with make_epoch(key=KEK_KEY) as kek_as_epoch:
        assert_rejected(kek_as_epoch, blob)


def test_changed_key_id_is_rejected(epoch: EpochKey, blob: bytes) -> None:
    relabelled = bytearray(blob)
    relabelled[9:25] = bytes(16)
    assert_rejected(epoch, bytes(relabelled))


@pytest.fixture
def released(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The contents of every key buffer at the moment it is released."""
    seen: list[bytes] = []
    original = secret_module._release

    def spy(
        home: secret_module._Arena | mmap.mmap, address: int, length: int, slot: int, locked: bool
    ) -> None:
        seen.append(ctypes.string_at(address, length))  # an arena slot or an own mapping
        original(home, address, length, slot, locked)

    monkeypatch.setattr(secret_module, "_release", spy)
    return seen


def test_a_failed_round_unwrap_leaves_no_key_in_memory(
    epoch: EpochKey, blob: bytes, released: list[bytes]
) -> None:
    # AES-GCM decrypt_into writes the plaintext before it checks the tag; flipping a tag
    # bit means the right key was written into the buffer. It must be zeroed.
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    assert_rejected(epoch, tampered)
    [memory] = released
    assert memory == bytes(len(memory))


@pytest.mark.parametrize(
    "bad",
    [
        b"",
        bytes(84),
        bytes(86),
        b"\x01" + bytes(84),  # another format version
        b"\x02" + bytes(84),  # epoch 0
        b"\x01" + bytes(80),  # a v1 blob (81 bytes, wrapped under a KEK) is no longer read
    ],
    ids=["empty", "short", "long", "version", "epoch-0", "v1-format"],
)
def test_read_wrapped_header_rejects_malformed_blobs(bad: bytes) -> None:
    with pytest.raises(UnwrapFailed):
        read_wrapped_header(bad)


def test_read_wrapped_header_needs_bytes(blob: bytes) -> None:
    with pytest.raises(UnwrapFailed):
        read_wrapped_header(bytearray(blob))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "bad",
    [b"", bytes(84), bytes(86), b"\x01" + bytes(84), b"\x02" + bytes(84), b"\x01" + bytes(80)],
    ids=["empty", "short", "long", "version", "epoch-0", "v1-format"],
)
def test_unwrap_rejects_what_read_wrapped_header_rejects(epoch: EpochKey, bad: bytes) -> None:
    # unwrap checks the header itself (without parsing it): the same blobs fail there too
    assert_rejected(epoch, bad)


def test_unwrap_needs_bytes(epoch: EpochKey, blob: bytes) -> None:
    with pytest.raises(UnwrapFailed):
        unwrap_round_key(epoch, ROUND, bytearray(blob))  # type: ignore[arg-type]


def test_a_wiped_epoch_key_or_cipher_refuses_to_wrap_or_unwrap(blob: bytes) -> None:
    epoch, cipher = make_epoch(), make_cipher()
    cipher.wipe()
    with pytest.raises(SecretWiped):
        wrap_round_key(epoch, cipher)
    epoch.wipe()
    with pytest.raises(SecretWiped):
        wrap_round_key(epoch, make_cipher())
    with pytest.raises(SecretWiped):
        unwrap_round_key(epoch, ROUND, blob)


# --- epoch key under KEK: format --------------------------------------------------------------


def test_known_answer_epoch_blob(epoch: EpochKey) -> None:
    with Kek(V7, SecretBytes.from_bytes(KEK_KEY), entropy=fixed(EPOCH_WRAP_NONCE)) as kek:
        assert wrap_epoch_key(kek, epoch) == KNOWN_EPOCH_BLOB


def test_known_epoch_blob_unwraps_to_the_known_key(kek: Kek) -> None:
    with unwrap_epoch_key(kek, KNOWN_EPOCH_BLOB) as restored:
        assert restored.number == E5
        assert key_of(restored) == EPOCH_KEY
        # and it opens the known round blob: the whole chain, KEK to round key
        with unwrap_round_key(restored, ROUND, KNOWN_ROUND_BLOB) as cipher:
            assert key_of(cipher) == ROUND_KEY


def test_epoch_blob_layout(epoch_blob: bytes) -> None:
    assert WRAPPED_EPOCH_SIZE == 73
    assert len(epoch_blob) == WRAPPED_EPOCH_SIZE
    assert epoch_blob[0] == WRAPPED_EPOCH_VERSION == 1
    assert epoch_blob[1:5] == (7).to_bytes(4, "big")
    assert epoch_blob[5:13] == (5).to_bytes(8, "big")
    assert EPOCH_KEY not in epoch_blob
    assert KEK_KEY not in epoch_blob
    assert read_epoch_header(epoch_blob) == (V7, E5)


def test_wrapping_an_epoch_key_twice_uses_fresh_nonces(kek: Kek, epoch: EpochKey) -> None:
    first, second = wrap_epoch_key(kek, epoch), wrap_epoch_key(kek, epoch)
    assert first[:13] == second[:13]
    assert first[13:25] != second[13:25]
    assert first[25:] != second[25:]


def test_the_two_blobs_cannot_be_mistaken_for_each_other(blob: bytes, epoch_blob: bytes) -> None:
    with pytest.raises(UnwrapFailed):
        read_epoch_header(blob)
    with pytest.raises(UnwrapFailed):
        read_wrapped_header(epoch_blob)


# --- epoch key under KEK: round trip ----------------------------------------------------------


def test_an_unwrapped_epoch_key_opens_what_the_original_wrapped(kek: Kek) -> None:
    original = EpochKey.generate(EpochNumber(9))
    with RoundCipher.generate(ROUND) as cipher:
        round_blob = wrap_round_key(original, cipher)
        envelope = cipher.seal("keyshare", b"share")
    with unwrap_epoch_key(kek, wrap_epoch_key(kek, original)) as restored:
        assert restored.number == EpochNumber(9)
        assert key_of(restored) == key_of(original)
        with unwrap_round_key(restored, ROUND, round_blob) as again:
            assert again.open("keyshare", envelope) == b"share"
    original.wipe()


# --- epoch key under KEK: everything wrong is UnwrapFailed ------------------------------------


def test_every_single_bit_flip_of_an_epoch_blob_is_rejected(kek: Kek, epoch_blob: bytes) -> None:
    for index in range(len(epoch_blob)):
        for bit in range(8):
            tampered = bytearray(epoch_blob)
            tampered[index] ^= 1 << bit
            assert_epoch_rejected(kek, bytes(tampered))


def test_every_truncation_of_an_epoch_blob_is_rejected(kek: Kek, epoch_blob: bytes) -> None:
    for length in range(len(epoch_blob)):
        assert_epoch_rejected(kek, epoch_blob[:length])


@pytest.mark.parametrize("extra", [b"\x00", bytes(16)])
def test_bytes_appended_to_an_epoch_blob_are_rejected(
    kek: Kek, epoch_blob: bytes, extra: bytes
) -> None:
    assert_epoch_rejected(kek, epoch_blob + extra)


def test_another_kek_of_the_same_version_is_rejected(epoch_blob: bytes) -> None:
    with make_kek(key=bytes(32)) as other:
        assert_epoch_rejected(other, epoch_blob)


def test_an_epoch_blob_naming_another_kek_version_is_rejected(epoch_blob: bytes) -> None:
    with make_kek(version=KekVersion(8)) as same_key_v8:
        assert_epoch_rejected(same_key_v8, epoch_blob)  # the header names v7
        relabelled = bytearray(epoch_blob)
        relabelled[1:5] = (8).to_bytes(4, "big")
        assert_epoch_rejected(same_key_v8, bytes(relabelled))  # the header is authenticated


def test_a_relabelled_epoch_number_is_rejected(kek: Kek, epoch_blob: bytes) -> None:
    relabelled = bytearray(epoch_blob)
    relabelled[5:13] = (6).to_bytes(8, "big")
    assert_epoch_rejected(kek, bytes(relabelled))


def test_a_failed_epoch_unwrap_leaves_no_key_in_memory(
    kek: Kek, epoch_blob: bytes, released: list[bytes]
) -> None:
    tampered = epoch_blob[:-1] + bytes([epoch_blob[-1] ^ 1])
    assert_epoch_rejected(kek, tampered)
    [memory] = released
    assert memory == bytes(len(memory))


@pytest.mark.parametrize(
    "bad",
    [
        b"",
        bytes(72),
        bytes(74),
        b"\x02" + bytes(4) + (1).to_bytes(8, "big") + bytes(60),  # another format version
        b"\x01" + bytes(4) + (1).to_bytes(8, "big") + bytes(60),  # KEK v0
        b"\x01" + (1).to_bytes(4, "big") + bytes(8) + bytes(60),  # epoch 0
    ],
    ids=["empty", "short", "long", "version", "kek-v0", "epoch-0"],
)
def test_read_epoch_header_rejects_malformed_blobs(bad: bytes) -> None:
    with pytest.raises(UnwrapFailed):
        read_epoch_header(bad)


def test_read_epoch_header_needs_bytes(epoch_blob: bytes) -> None:
    with pytest.raises(UnwrapFailed):
        read_epoch_header(bytearray(epoch_blob))  # type: ignore[arg-type]


def test_a_wiped_kek_or_epoch_key_refuses_to_wrap_or_unwrap(epoch_blob: bytes) -> None:
    kek, epoch = make_kek(), make_epoch()
    epoch.wipe()
    with pytest.raises(SecretWiped):
        wrap_epoch_key(kek, epoch)
    kek.wipe()
    with pytest.raises(SecretWiped):
        wrap_epoch_key(kek, make_epoch())
    with pytest.raises(SecretWiped):
        unwrap_epoch_key(kek, epoch_blob)


# --- EpochKey ---------------------------------------------------------------------------------


def test_epoch_key_owns_and_wipes_its_key() -> None:
    key = SecretBytes.from_bytes(EPOCH_KEY)
    with EpochKey(E5, key) as epoch:
        assert epoch.number == E5
        assert not epoch.is_wiped
    assert epoch.is_wiped
    assert key.is_wiped


def test_epoch_key_must_be_32_bytes_and_numbered() -> None:
    short = SecretBytes.from_bytes(EPOCH_KEY[:31])
    with pytest.raises(InvalidKeyMaterial):
        EpochKey(E5, short)
    assert short.is_wiped
    unnumbered = SecretBytes.from_bytes(EPOCH_KEY)
    with pytest.raises(TypeError):
        EpochKey(5, unnumbered)  # type: ignore[arg-type]
    assert unnumbered.is_wiped


def test_generated_epoch_keys_are_fresh_unless_entropy_is_given() -> None:
    with EpochKey.generate(E5) as first, EpochKey.generate(E5) as second:
        assert key_of(first) != key_of(second)
    with EpochKey.generate(E5, entropy=fixed(EPOCH_KEY)) as made:
        assert key_of(made) == EPOCH_KEY


def test_epoch_key_repr_has_no_key(epoch: EpochKey) -> None:
    assert repr(epoch) == "EpochKey(epoch=5, live)"
    epoch.wipe()
    assert repr(epoch) == "EpochKey(epoch=5, wiped)"


@pytest.mark.parametrize("how", [copy.copy, copy.deepcopy, pickle.dumps])
def test_epoch_key_cannot_be_copied_or_pickled(epoch: EpochKey, how: object) -> None:
    with pytest.raises(TypeError):
        how(epoch)  # type: ignore[operator]


# --- logs ---------------------------------------------------------------------------------------


def test_logs_never_carry_key_or_blob_bytes(kek: Kek, epoch: EpochKey) -> None:
    with capture_logs() as logs:
        blob = wrap_round_key(epoch, make_cipher())
        unwrap_round_key(epoch, ROUND, blob).wipe()
        with pytest.raises(UnwrapFailed):
            unwrap_round_key(epoch, RoundId("e3:43"), blob)
        epoch_blob = wrap_epoch_key(kek, epoch)
        unwrap_epoch_key(kek, epoch_blob).wipe()
        with make_kek(key=bytes(32)) as other, pytest.raises(UnwrapFailed):
            unwrap_epoch_key(other, epoch_blob)
    failures = [entry for entry in logs if entry["log_level"] != "debug"]
    assert [(e["event"], e["log_level"]) for e in failures] == [
        ("round_key_unwrap_failed", "warning"),
        ("epoch_key_unwrap_failed", "warning"),
    ]
    assert failures[0]["epoch"] == 5
    assert (failures[1]["epoch"], failures[1]["kek_version"]) == (5, 7)
    text = repr(logs)
    for secret in (ROUND_KEY, EPOCH_KEY, KEK_KEY, blob[25:], epoch_blob[13:]):
        assert secret.hex()[:16] not in text
    assert not any(isinstance(v, bytes) for entry in logs for v in entry.values())
