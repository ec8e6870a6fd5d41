from __future__ import annotations

import copy
import mmap
import pickle
from collections.abc import Iterator

import pytest
from structlog.testing import capture_logs

from enclave_keys.crypto import (
    WRAPPED_KEY_SIZE,
    WRAPPED_KEY_VERSION,
    Kek,
    RoundCipher,
    SecretBytes,
    read_wrapped_header,
    unwrap_round_key,
    wrap_round_key,
)
from enclave_keys.crypto import secret as secret_module
from enclave_keys.errors import InvalidKeyMaterial, SecretWiped, UnwrapFailed
from enclave_keys.ids import KekVersion, KeyId, RoundId

ROUND = RoundId("e3:42")
ROUND_KEY = bytes(range(32))
KEY_ID = KeyId(bytes(range(0x10, 0x20)))
KEK_KEY = bytes(range(0x40, 0x60))
V7 = KekVersion(7)
WRAP_NONCE = bytes(range(0xB0, 0xBC))

# Computed independently with the bare AESGCM primitive and the layout in docs/crypto.md:
# AAD = len16|"enclave_keys/round-key-wrap/v1" len16|header(21 bytes) len16|"e3:42".
KNOWN_BLOB = bytes.fromhex(
    "0100000007101112131415161718191a1b1c1d1e1fb0b1b2b3b4b5b6b7b8b9babb03018286c54fed9e33"
    "e72df3e1fb42c4ae19963b5000c088ebdf7a2095adec8f02be9f388fdd6757ea0c5b57c250f590"
)


def make_kek(version: KekVersion = V7, key: bytes = KEK_KEY) -> Kek:
    return Kek(version, SecretBytes.from_bytes(key))


def make_cipher(round_id: RoundId = ROUND) -> RoundCipher:
    return RoundCipher(round_id, KEY_ID, SecretBytes.from_bytes(ROUND_KEY))


@pytest.fixture
def kek() -> Iterator[Kek]:
    with make_kek() as fresh:
        yield fresh


@pytest.fixture
def blob(kek: Kek) -> bytes:
    return wrap_round_key(kek, make_cipher())


def assert_rejected(kek: Kek, blob: bytes, round_id: RoundId = ROUND) -> None:
    with pytest.raises(UnwrapFailed) as excinfo:
        unwrap_round_key(kek, round_id, blob)
    assert type(excinfo.value) is UnwrapFailed
    text = str(excinfo.value) + repr(excinfo.value)
    for start in range(0, max(len(blob) - 3, 0), 4):
        assert blob[start : start + 4].hex() not in text
    assert excinfo.value.__cause__ is None


# --- format -------------------------------------------------------------------------------


def test_known_answer_blob() -> None:
    kek = Kek(V7, SecretBytes.from_bytes(KEK_KEY), entropy=lambda n: WRAP_NONCE[:n])
    assert wrap_round_key(kek, make_cipher()) == KNOWN_BLOB


def test_blob_layout(blob: bytes) -> None:
    assert WRAPPED_KEY_SIZE == 81
    assert len(blob) == WRAPPED_KEY_SIZE
    assert blob[0] == WRAPPED_KEY_VERSION == 1
    assert blob[1:5] == (7).to_bytes(4, "big")
    assert blob[5:21] == KEY_ID.raw
    assert ROUND_KEY not in blob
    assert read_wrapped_header(blob) == (V7, KEY_ID)


def test_wrapping_twice_uses_fresh_nonces(kek: Kek) -> None:
    cipher = make_cipher()
    first, second = wrap_round_key(kek, cipher), wrap_round_key(kek, cipher)
    assert first[21:33] != second[21:33]
    assert first[33:] != second[33:]


# --- round trip -----------------------------------------------------------------------


def test_unwrap_restores_a_cipher_that_opens_the_original_envelopes(kek: Kek) -> None:
    original = RoundCipher.generate(ROUND)
    envelope = original.seal("keyshare", b"share")
    restored = unwrap_round_key(kek, ROUND, wrap_round_key(kek, original))
    assert restored.round_id == ROUND
    assert restored.key_id == original.key_id
    assert restored.open("keyshare", envelope) == b"share"
    assert original.open("keyshare", restored.seal("keyshare", b"back")) == b"back"
    with restored._borrow_key() as restored_key, original._borrow_key() as original_key:
        assert restored_key == original_key


def test_known_blob_unwraps_to_the_known_key(kek: Kek) -> None:
    restored = unwrap_round_key(kek, ROUND, KNOWN_BLOB)
    with restored._borrow_key() as key:
        assert key == ROUND_KEY


def test_a_kek_cannot_open_round_data(kek: Kek, blob: bytes) -> None:
    envelope = make_cipher().seal("keyshare", b"share")
    kek_as_round_key = RoundCipher(ROUND, KEY_ID, SecretBytes.from_bytes(KEK_KEY))
    with pytest.raises(UnwrapFailed):
        kek_as_round_key.open("keyshare", envelope)


# --- everything wrong is UnwrapFailed ---------------------------------------------------


def test_every_single_bit_flip_is_rejected(kek: Kek, blob: bytes) -> None:
    for index in range(len(blob)):
        for bit in range(8):
            tampered = bytearray(blob)
            tampered[index] ^= 1 << bit
            assert_rejected(kek, bytes(tampered))


def test_every_truncation_is_rejected(kek: Kek, blob: bytes) -> None:
    for length in range(len(blob)):
        assert_rejected(kek, blob[:length])


@pytest.mark.parametrize("extra", [b"\x00", bytes(16)])
def test_appended_bytes_are_rejected(kek: Kek, blob: bytes, extra: bytes) -> None:
    assert_rejected(kek, blob + extra)


def test_wrong_round_is_rejected(kek: Kek, blob: bytes) -> None:
    assert_rejected(kek, blob, round_id=RoundId("e3:43"))


def test_another_kek_of_the_same_version_is_rejected(blob: bytes) -> None:
    assert_rejected(make_kek(key=bytes(32)), blob)


def test_a_blob_naming_another_kek_version_is_rejected(blob: bytes) -> None:
    same_key_v8 = make_kek(version=KekVersion(8))
    assert_rejected(same_key_v8, blob)  # the header names v7
    relabelled = bytearray(blob)
    relabelled[1:5] = (8).to_bytes(4, "big")
    assert_rejected(same_key_v8, bytes(relabelled))  # the header is authenticated


def test_changed_key_id_is_rejected(kek: Kek, blob: bytes) -> None:
    relabelled = bytearray(blob)
    relabelled[5:21] = bytes(16)
    assert_rejected(kek, bytes(relabelled))


def test_a_failed_unwrap_leaves_no_key_in_memory(
    kek: Kek, blob: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    # AES-GCM decrypt_into writes the plaintext before it checks the tag; flipping a tag
    # bit means the right key was written into the buffer. It must be zeroed.
    seen: list[bytes] = []
    original = secret_module._release

    def spy(mapping: mmap.mmap, address: int, locked: bool) -> None:
        seen.append(bytes(mapping))
        original(mapping, address, locked)

    monkeypatch.setattr(secret_module, "_release", spy)
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    assert_rejected(kek, tampered)
    [memory] = seen
    assert memory == bytes(len(memory))


@pytest.mark.parametrize(
    "bad",
    [b"", bytes(80), bytes(82), b"\x02" + bytes(80), b"\x01" + bytes(80)],  # last: KEK v0
    ids=["empty", "short", "long", "version", "kek-v0"],
)
def test_read_wrapped_header_rejects_malformed_blobs(bad: bytes) -> None:
    with pytest.raises(UnwrapFailed):
        read_wrapped_header(bad)


def test_read_wrapped_header_needs_bytes(blob: bytes) -> None:
    with pytest.raises(UnwrapFailed):
        read_wrapped_header(bytearray(blob))  # type: ignore[arg-type]


# --- Kek --------------------------------------------------------------------------------


def test_kek_owns_and_wipes_its_key() -> None:
    key = SecretBytes.from_bytes(KEK_KEY)
    with Kek(V7, key) as kek:
        assert kek.version == V7
        assert not kek.is_wiped
    assert kek.is_wiped
    assert key.is_wiped


def test_a_wiped_kek_or_cipher_refuses_to_wrap_or_unwrap(blob: bytes) -> None:
    kek, cipher = make_kek(), make_cipher()
    cipher.wipe()
    with pytest.raises(SecretWiped):
        wrap_round_key(kek, cipher)
    kek.wipe()
    with pytest.raises(SecretWiped):
        wrap_round_key(kek, make_cipher())
    with pytest.raises(SecretWiped):
        unwrap_round_key(kek, ROUND, blob)


def test_kek_key_must_be_32_bytes() -> None:
    key = SecretBytes.from_bytes(KEK_KEY[:31])
    with pytest.raises(InvalidKeyMaterial):
        Kek(V7, key)
    assert key.is_wiped


def test_kek_needs_a_version() -> None:
    with pytest.raises(TypeError):
        Kek(7, SecretBytes.from_bytes(KEK_KEY))  # type: ignore[arg-type]


def test_kek_repr_has_no_key(kek: Kek) -> None:
    assert repr(kek) == "Kek(version=7, live)"
    kek.wipe()
    assert repr(kek) == "Kek(version=7, wiped)"


@pytest.mark.parametrize("how", [copy.copy, copy.deepcopy, pickle.dumps])
def test_kek_cannot_be_copied_or_pickled(kek: Kek, how: object) -> None:
    with pytest.raises(TypeError):
        how(kek)  # type: ignore[operator]


def test_logs_never_carry_key_or_blob_bytes(kek: Kek) -> None:
    with capture_logs() as logs:
        blob = wrap_round_key(kek, make_cipher())
        unwrap_round_key(kek, ROUND, blob)
        with pytest.raises(UnwrapFailed):
            unwrap_round_key(kek, RoundId("e3:43"), blob)
    events = [entry["event"] for entry in logs]
    assert events == ["round_key_wrapped", "round_key_unwrap_failed"]
    assert logs[1]["log_level"] == "warning"
    text = repr(logs)
    for secret in (ROUND_KEY, KEK_KEY, blob[21:]):
        assert secret.hex()[:16] not in text
    assert not any(isinstance(v, bytes) for entry in logs for v in entry.values())
