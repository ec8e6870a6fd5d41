from __future__ import annotations

import copy
import pickle
import random
from collections.abc import Iterator

import pytest
from structlog.testing import capture_logs

from enclave_keys.crypto import ENVELOPE_OVERHEAD, ENVELOPE_VERSION, RoundCipher, SecretBytes
from enclave_keys.errors import InvalidIdentifier, InvalidKeyMaterial, SecretWiped, UnwrapFailed
from enclave_keys.ids import KeyId, RoundId

ROUND = RoundId("e3:42")
KEY = bytes(range(32))
KEY_ID = KeyId(bytes(range(0x10, 0x20)))
NONCE = bytes(range(0xA0, 0xAC))

# Computed independently with the bare AESGCM primitive and the layout in docs/crypto.md:
# AAD = len16|"enclave_keys/round-data/v1" len16|header len16|"e3:42" len16|"keyshare".
KNOWN_ENVELOPE = bytes.fromhex(
    "01101112131415161718191a1b1c1d1e1fa0a1a2a3a4a5a6a7a8a9aaab92700e4836a36dd30645f4bb66"
    "08a5b0b8c1a5286d19608f71a55db83e96f1"
)


def make_cipher(round_id: RoundId = ROUND, key: bytes = KEY, key_id: KeyId = KEY_ID) -> RoundCipher:
    return RoundCipher(round_id, key_id, SecretBytes.from_bytes(key))


@pytest.fixture
def cipher() -> Iterator[RoundCipher]:
    with RoundCipher.generate(ROUND) as fresh:
        yield fresh


def assert_opaque(excinfo: pytest.ExceptionInfo[UnwrapFailed], envelope: bytes) -> None:
    """The error says nothing about the input: no bytes, no chained cause."""
    text = str(excinfo.value) + repr(excinfo.value)
    assert all(not isinstance(arg, bytes | bytearray) for arg in excinfo.value.args)
    for start in range(0, max(len(envelope) - 3, 0), 4):
        assert envelope[start : start + 4].hex() not in text
    assert excinfo.value.__cause__ is None
    assert excinfo.value.__suppress_context__ or excinfo.value.__context__ is None


def assert_rejected(cipher: RoundCipher, envelope: bytes, purpose: str = "keyshare") -> None:
    with pytest.raises(UnwrapFailed) as excinfo:
        cipher.open(purpose, envelope)
    assert type(excinfo.value) is UnwrapFailed
    assert_opaque(excinfo, envelope)


# --- format -------------------------------------------------------------------------------


def test_known_answer_envelope() -> None:
    sealer = RoundCipher(ROUND, KEY_ID, SecretBytes.from_bytes(KEY), entropy=lambda n: NONCE[:n])
    assert sealer.seal("keyshare", b"threshold share") == KNOWN_ENVELOPE
    assert make_cipher().open("keyshare", KNOWN_ENVELOPE) == b"threshold share"


def test_envelope_layout(cipher: RoundCipher) -> None:
    envelope = cipher.seal("keyshare", b"abc")
    assert ENVELOPE_VERSION == 1
    assert ENVELOPE_OVERHEAD == 1 + 16 + 12 + 16
    assert len(envelope) == 3 + ENVELOPE_OVERHEAD
    assert envelope[0] == ENVELOPE_VERSION
    assert envelope[1:17] == cipher.key_id.raw


# --- round trips ----------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 1024, 1024 * 1024])
def test_round_trip(cipher: RoundCipher, size: int) -> None:
    plaintext = random.Random(size).randbytes(size)
    envelope = cipher.seal("keyshare", plaintext)
    assert len(envelope) == size + ENVELOPE_OVERHEAD
    assert cipher.open("keyshare", envelope) == plaintext


def test_mutable_and_view_inputs(cipher: RoundCipher) -> None:
    envelope = cipher.seal("keyshare", bytearray(b"share"))
    assert cipher.open("keyshare", memoryview(envelope)) == b"share"
    assert cipher.open("keyshare", bytearray(envelope)) == b"share"
    assert cipher.open("keyshare", cipher.seal("keyshare", memoryview(b"xy"))) == b"xy"


def test_nonces_differ_between_seals(cipher: RoundCipher) -> None:
    envelopes = [cipher.seal("keyshare", b"same") for _ in range(200)]
    assert len({e[17:29] for e in envelopes}) == 200


def test_injected_entropy_makes_sealing_deterministic() -> None:
    a = RoundCipher.generate(ROUND, entropy=random.Random(9).randbytes)
    b = RoundCipher.generate(ROUND, entropy=random.Random(9).randbytes)
    assert a.key_id == b.key_id
    assert a.seal("keyshare", b"x") == b.seal("keyshare", b"x")


def test_generated_ciphers_have_fresh_keys_and_ids(cipher: RoundCipher) -> None:
    other = RoundCipher.generate(ROUND)
    assert other.key_id != cipher.key_id
    assert_rejected(other, cipher.seal("keyshare", b"x"))
    relabelled = bytearray(cipher.seal("keyshare", b"x"))
    relabelled[1:17] = other.key_id.raw
    assert_rejected(other, bytes(relabelled))


# --- everything wrong is UnwrapFailed ---------------------------------------------------


def test_every_single_bit_flip_is_rejected() -> None:
    cipher = make_cipher()
    envelope = cipher.seal("keyshare", b"eight by")
    for index in range(len(envelope)):
        for bit in range(8):
            tampered = bytearray(envelope)
            tampered[index] ^= 1 << bit
            assert_rejected(cipher, bytes(tampered))


def test_every_truncation_is_rejected(cipher: RoundCipher) -> None:
    envelope = cipher.seal("keyshare", b"some share")
    for length in range(len(envelope)):
        assert_rejected(cipher, envelope[:length])


@pytest.mark.parametrize("extra", [b"\x00", b"\x01" * 16, bytes(100)])
def test_appended_bytes_are_rejected(cipher: RoundCipher, extra: bytes) -> None:
    assert_rejected(cipher, cipher.seal("keyshare", b"share") + extra)


@pytest.mark.parametrize("version", [0x00, 0x02, 0x80, 0xFF])
def test_unknown_versions_are_rejected(cipher: RoundCipher, version: int) -> None:
    envelope = bytearray(cipher.seal("keyshare", b"share"))
    envelope[0] = version
    assert_rejected(cipher, bytes(envelope))


def test_changed_key_id_is_rejected_even_by_a_cipher_of_that_id() -> None:
    cipher = make_cipher()
    other_id = KeyId(bytes(16))
    same_key_other_id = make_cipher(key_id=other_id)
    envelope = bytearray(cipher.seal("keyshare", b"share"))
    envelope[1:17] = other_id.raw
    assert_rejected(cipher, bytes(envelope))
    assert_rejected(same_key_other_id, bytes(envelope))  # the header is authenticated


def test_wrong_purpose_is_rejected(cipher: RoundCipher) -> None:
    envelope = cipher.seal("keyshare", b"share")
    assert_rejected(cipher, envelope, purpose="decryption-share")
    assert_rejected(cipher, envelope, purpose="keyshar")


def test_wrong_round_is_rejected_even_with_the_same_key_and_id() -> None:
    envelope = make_cipher().seal("keyshare", b"share")
    assert_rejected(make_cipher(round_id=RoundId("e3:43")), envelope)


def test_another_key_cannot_open_even_with_the_same_id() -> None:
    envelope = make_cipher().seal("keyshare", b"share")
    kek_like = bytes(range(0x40, 0x60))
    assert_rejected(make_cipher(key=kek_like), envelope)


def test_empty_input_is_rejected(cipher: RoundCipher) -> None:
    assert_rejected(cipher, b"")


# --- purposes ---------------------------------------------------------------------------


@pytest.mark.parametrize("purpose", ["", " ", "-x", "a b", "é", "x" * 65, "a\x00", "share\n"])
def test_invalid_purposes_are_rejected_on_seal_and_open(cipher: RoundCipher, purpose: str) -> None:
    with pytest.raises(InvalidIdentifier):
        cipher.seal(purpose, b"x")
    with pytest.raises(InvalidIdentifier):
        cipher.open(purpose, cipher.seal("keyshare", b"x"))


def test_purpose_must_be_a_string(cipher: RoundCipher) -> None:
    with pytest.raises(InvalidIdentifier):
        cipher.seal(b"keyshare", b"x")  # type: ignore[arg-type]


@pytest.mark.parametrize("purpose", ["k", "keyshare", "share/decryption:1", "a." + "b" * 62])
def test_valid_purposes(cipher: RoundCipher, purpose: str) -> None:
    assert cipher.open(purpose, cipher.seal(purpose, b"x")) == b"x"


# --- key ownership and wiping -----------------------------------------------------------


def test_wipe_makes_every_operation_raise_secret_wiped() -> None:
    key = SecretBytes.from_bytes(KEY)
    cipher = RoundCipher(ROUND, KEY_ID, key)
    envelope = cipher.seal("keyshare", b"x")
    cipher.wipe()
    cipher.wipe()
    assert cipher.is_wiped
    assert key.is_wiped  # the cipher owned the key
    with pytest.raises(SecretWiped):
        cipher.seal("keyshare", b"x")
    with pytest.raises(SecretWiped):
        cipher.open("keyshare", envelope)


def test_context_manager_wipes() -> None:
    with RoundCipher.generate(ROUND) as cipher:
        assert not cipher.is_wiped
    assert cipher.is_wiped


def test_wrong_key_length_is_rejected_and_the_key_wiped() -> None:
    key = SecretBytes.from_bytes(KEY[:16])
    with pytest.raises(InvalidKeyMaterial):
        RoundCipher(ROUND, KEY_ID, key)
    assert key.is_wiped


def test_a_wiped_key_is_refused() -> None:
    key = SecretBytes.from_bytes(KEY)
    key.wipe()
    with pytest.raises(SecretWiped):
        RoundCipher(ROUND, KEY_ID, key)


def test_wrong_argument_types_are_refused() -> None:
    key = SecretBytes.from_bytes(KEY)
    with pytest.raises(TypeError):
        RoundCipher("e3:42", KEY_ID, key)  # type: ignore[arg-type]
    assert key.is_wiped
    with pytest.raises(TypeError):
        RoundCipher(ROUND, KEY_ID, KEY)  # type: ignore[arg-type]


def test_repr_shows_ids_and_state_but_never_the_key() -> None:
    cipher = make_cipher()
    assert repr(cipher) == f"RoundCipher(round_id='e3:42', key_id='{KEY_ID.hex()}', live)"
    assert KEY.hex()[:8] not in repr(cipher)
    cipher.wipe()
    assert repr(cipher).endswith("wiped)")


@pytest.mark.parametrize("how", [copy.copy, copy.deepcopy, pickle.dumps])
def test_ciphers_cannot_be_copied_or_pickled(cipher: RoundCipher, how: object) -> None:
    with pytest.raises(TypeError):
        how(cipher)  # type: ignore[operator]


def test_properties(cipher: RoundCipher) -> None:
    assert cipher.round_id == ROUND
    assert isinstance(cipher.key_id, KeyId)


def test_logs_name_ids_and_never_key_bytes() -> None:
    fixed = random.Random(3)
    with capture_logs() as logs:
        cipher = RoundCipher.generate(ROUND, entropy=fixed.randbytes)
        cipher.wipe()
    key = random.Random(3).randbytes(32)
    assert [entry["event"] for entry in logs] == ["round_key_generated", "round_cipher_wiped"]
    assert logs[0]["round_id"] == "e3:42"
    assert logs[0]["key_id"] == cipher.key_id.hex()
    assert key.hex()[:16] not in repr(logs)


def test_generate_wipes_the_new_key_if_the_cipher_cannot_be_made(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made: list[SecretBytes] = []

    def failing_init(
        self: RoundCipher, round_id: RoundId, key_id: KeyId, key: SecretBytes, **_: object
    ) -> None:
        made.append(key)
        raise MemoryError("no memory for the AEAD context")

    monkeypatch.setattr(RoundCipher, "__init__", failing_init)
    with pytest.raises(MemoryError):
        RoundCipher.generate(RoundId("e3:1"))
    [key] = made
    assert key.is_wiped


def test_generate_wipes_the_new_key_if_its_key_id_cannot_be_drawn() -> None:
    keys: list[SecretBytes] = []
    real_random = SecretBytes.random

    def recording(size: int, entropy: object = None) -> SecretBytes:
        key = real_random(size, entropy)  # type: ignore[arg-type]
        keys.append(key)
        return key

    def entropy(n: int) -> bytes:
        if n == KeyId.SIZE:
            raise OSError("no entropy")
        return bytes(n)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SecretBytes, "random", recording)
        with pytest.raises(OSError, match="no entropy"):
            RoundCipher.generate(RoundId("e3:1"), entropy=entropy)
    [key] = keys
    assert key.is_wiped
