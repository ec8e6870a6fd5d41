"""Passphrase KDF tests. Every derivation uses the floor parameters (~40 ms each)."""

from __future__ import annotations

import os
import struct

import pytest
from structlog.testing import capture_logs

from enclave_keys.crypto import KdfParams, PassphraseRecord, enroll_passphrase, unlock_passphrase
from enclave_keys.crypto import kdf as kdf_module
from enclave_keys.crypto.secret import SecretBytes
from enclave_keys.errors import CorruptRecord, InvalidPassphrase, WeakKdfParameters, WrongPassphrase

PASSPHRASE = "correct horse battery staple"
SALT = bytes(range(16))

# Computed independently with bare Argon2id (ad=b"enclave_keys/passphrase/v1") and
# HKDF-Expand-SHA256 (info=b"enclave_keys/passphrase/root-key/v1" / ".../verifier/v1").
KNOWN_ROOT_KEY = bytes.fromhex("5a5ad428eb7affe7ebbbdb6dee89eb3c91f69461685e213beec8523c7cb2e37b")
KNOWN_RECORD = bytes.fromhex(
    "0100004c00000000020000000110000102030405060708090a0b0c0d0e0f34c6897e89fc63bf5b9f050e"
    "39877dcabd8db10fbd814f5b5b7083e1b65222d3"
)


def floor_params(salt: bytes | None = None) -> KdfParams:
    return KdfParams(salt=salt or os.urandom(16), memory_kib=19_456, iterations=2, lanes=1)


@pytest.fixture(scope="module")
def enrolled() -> tuple[PassphraseRecord, bytes]:
    record, root = enroll_passphrase(PASSPHRASE, floor_params())
    with root, root.borrow() as view:
        return record, bytes(view)


# --- derivation ---------------------------------------------------------------------------


def test_known_answer() -> None:
    record, root = enroll_passphrase(PASSPHRASE, floor_params(SALT))
    assert root.equals(KNOWN_ROOT_KEY)
    assert record.to_bytes() == KNOWN_RECORD
    assert unlock_passphrase(PASSPHRASE, PassphraseRecord.from_bytes(KNOWN_RECORD)).equals(
        KNOWN_ROOT_KEY
    )


def test_the_right_passphrase_gives_the_same_root_key(
    enrolled: tuple[PassphraseRecord, bytes],
) -> None:
    record, root = enrolled
    with unlock_passphrase(PASSPHRASE, record) as again:
        assert isinstance(again, SecretBytes)
        assert len(again) == 32
        assert again.equals(root)


def test_the_record_survives_a_byte_round_trip(enrolled: tuple[PassphraseRecord, bytes]) -> None:
    record, root = enrolled
    decoded = PassphraseRecord.from_bytes(record.to_bytes())
    assert decoded == record
    assert unlock_passphrase(PASSPHRASE, decoded).equals(root)


def test_a_wrong_passphrase_is_rejected_before_the_root_key_is_derived(
    enrolled: tuple[PassphraseRecord, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    record, _ = enrolled
    expanded: list[bytes] = []
    original = kdf_module._expand

    def spy(master: SecretBytes, info: bytes) -> SecretBytes:
        expanded.append(info)
        return original(master, info)

    monkeypatch.setattr(kdf_module, "_expand", spy)
    with capture_logs() as logs, pytest.raises(WrongPassphrase) as excinfo:
        unlock_passphrase(PASSPHRASE + "!", record)
    assert expanded == [kdf_module._VERIFIER_INFO]
    assert PASSPHRASE not in str(excinfo.value)
    assert [entry["event"] for entry in logs] == ["passphrase_rejected"]


def test_a_different_salt_gives_a_different_root_key(
    enrolled: tuple[PassphraseRecord, bytes],
) -> None:
    _, root = enrolled
    _, other = enroll_passphrase(PASSPHRASE, floor_params())
    assert not other.equals(root)


def test_passphrases_are_nfc_normalised() -> None:
    record, root = enroll_passphrase("caf\u00e9 au lait", floor_params())
    assert unlock_passphrase("cafe\u0301 au lait", record).equals(root)


def test_a_passphrase_of_exactly_1024_utf8_bytes_is_accepted() -> None:
    record, root = enroll_passphrase("\u00e9" * 512, floor_params())
    assert unlock_passphrase("\u00e9" * 512, record).equals(root)


@pytest.mark.parametrize(
    "passphrase",
    ["", "a\x00b", "\x00", "x" * 1025, "\u00e9" * 513, "bad \ud800 surrogate", b"bytes", None],
    ids=["empty", "nul", "only-nul", "too-long", "too-long-utf8", "surrogate", "bytes", "none"],
)
def test_invalid_passphrases_are_rejected(
    passphrase: object, enrolled: tuple[PassphraseRecord, bytes]
) -> None:
    with pytest.raises(InvalidPassphrase):
        enroll_passphrase(passphrase, floor_params())  # type: ignore[arg-type]
    with pytest.raises(InvalidPassphrase):
        unlock_passphrase(passphrase, enrolled[0])  # type: ignore[arg-type]


def test_logs_carry_parameters_but_no_passphrase_or_key() -> None:
    with capture_logs() as logs:
        _, root = enroll_passphrase(PASSPHRASE, floor_params())
    assert logs == [
        {
            "event": "passphrase_enrolled",
            "log_level": "info",
            "memory_kib": 19_456,
            "iterations": 2,
            "lanes": 1,
        }
    ]
    with root.borrow() as view:
        assert bytes(view).hex()[:16] not in repr(logs)
    assert PASSPHRASE not in repr(logs)


# --- parameters ---------------------------------------------------------------------------


def test_generate_uses_rfc9106_second_recommendation_and_a_random_salt() -> None:
    a, b = KdfParams.generate(), KdfParams.generate()
    assert (a.memory_kib, a.iterations, a.lanes) == (65_536, 3, 4)
    assert len(a.salt) == 16
    assert a.salt != b.salt


@pytest.mark.parametrize(
    "change",
    [
        {"memory_kib": 19_455},
        {"memory_kib": 4 * 1024 * 1024 + 1},
        {"iterations": 1},
        {"iterations": 33},
        {"lanes": 0},
        {"lanes": 65},
        {"salt": bytes(15)},
        {"salt": bytes(65)},
        {"salt": "a string salt!!!"},
        {"lanes": True},
        {"memory_kib": 65_536.0},
    ],
)
def test_parameters_outside_the_floor_or_ceiling_are_rejected(change: dict[str, object]) -> None:
    fields: dict[str, object] = {
        "salt": SALT,
        "memory_kib": 19_456,
        "iterations": 2,
        "lanes": 1,
        **change,
    }
    with pytest.raises(WeakKdfParameters):
        KdfParams(**fields)  # type: ignore[arg-type]


def test_the_floor_and_the_ceiling_themselves_are_accepted() -> None:
    KdfParams(salt=bytes(64), memory_kib=4 * 1024 * 1024, iterations=32, lanes=64)
    floor_params()


# --- record decoding ----------------------------------------------------------------------


def test_record_layout() -> None:
    version, memory, iterations, lanes, salt_len = struct.unpack_from(">BIIIB", KNOWN_RECORD)
    assert (version, memory, iterations, lanes, salt_len) == (1, 19_456, 2, 1, 16)
    assert KNOWN_RECORD[14:30] == SALT
    assert len(KNOWN_RECORD) == 14 + 16 + 32


def test_every_truncation_is_a_corrupt_record() -> None:
    for length in range(len(KNOWN_RECORD)):
        with pytest.raises(CorruptRecord):
            PassphraseRecord.from_bytes(KNOWN_RECORD[:length])


@pytest.mark.parametrize(
    "garble",
    [
        lambda r: r + b"\x00",
        lambda r: b"\x02" + r[1:],
        lambda r: b"\x00" + r[1:],
        lambda r: r[:13] + b"\x11" + r[14:],  # salt length no longer matches
        lambda r: r[:13] + b"\x00" + r[14:],
        bytearray,
    ],
    ids=["extended", "version-2", "version-0", "salt-len-17", "salt-len-0", "not-bytes"],
)
def test_garbled_records_are_corrupt(garble: object) -> None:
    with pytest.raises(CorruptRecord):
        PassphraseRecord.from_bytes(garble(KNOWN_RECORD))  # type: ignore[operator]


def test_a_weakened_record_is_refused_on_decode() -> None:
    weakened = KNOWN_RECORD[:1] + (1024).to_bytes(4, "big") + KNOWN_RECORD[5:]
    with pytest.raises(WeakKdfParameters):
        PassphraseRecord.from_bytes(weakened)
    huge = KNOWN_RECORD[:1] + (2**32 - 1).to_bytes(4, "big") + KNOWN_RECORD[5:]
    with pytest.raises(WeakKdfParameters):
        PassphraseRecord.from_bytes(huge)


def test_a_record_needs_a_32_byte_verifier() -> None:
    with pytest.raises(CorruptRecord):
        PassphraseRecord(params=floor_params(), verifier=bytes(31))
