"""The protocol and its helpers: Enrolment, record names, KeyUnseal, read_secret."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from enclave_keys.crypto import SecretBytes
from enclave_keys.errors import (
    CorruptRecord,
    InvalidKeyMaterial,
    InvalidPassphrase,
    UnsealMismatch,
    WrongPassphrase,
)
from enclave_keys.store import MemoryStore
from enclave_keys.unseal import (
    METHOD_RECORD,
    RECORD_NAMES,
    Enrolment,
    EnvKeyUnseal,
    HsmUnseal,
    KeyUnseal,
    PassphraseUnseal,
    ShamirUnseal,
    UnsealSource,
    read_secret,
    record_names,
)
from enclave_keys.unseal.api import check_method, stored_method
from enclave_keys.unseal.prompt import MAX_SECRET_BYTES
from enclave_keys.unseal.raw import RAW_VERIFIER_RECORD
from tests.unseal.helpers import fast_params, initialised

# --- the protocol ---------------------------------------------------------------------------


def test_every_source_is_an_unseal_source_with_a_distinct_method() -> None:
    with SecretBytes.random(32) as key:
        sources: list[UnsealSource] = [
            PassphraseUnseal("pw"),
            ShamirUnseal(),
            HsmUnseal("/nonexistent.so", "token", "pin"),
            EnvKeyUnseal({}),
            KeyUnseal(key),
        ]
        methods = [source.method for source in sources]
    assert methods == ["passphrase", "shamir", "pkcs11", "env", "raw"]
    assert set(RECORD_NAMES) == set(methods)


def test_record_names_are_prefixed_by_their_method() -> None:
    for method, names in RECORD_NAMES.items():
        assert names
        assert all(name.startswith(f"unseal.{method}.") for name in names)
        assert record_names(method) == names
    with pytest.raises(KeyError):
        record_names("carrier-pigeon")


def test_every_enrolment_writes_only_its_declared_records() -> None:
    with SecretBytes.random(32) as key:
        enrolments = [
            (PassphraseUnseal("pw", fast_params()).enrol(), "passphrase"),
            (ShamirUnseal.enrol_shares(2, 3)[0], "shamir"),
            (EnvKeyUnseal({"ENCLAVE_KEYS_MASTER_KEY": "ab" * 32}).enrol(), "env"),
            (KeyUnseal(key).enrol(), "raw"),
        ]
    for enrolment, method in enrolments:
        with enrolment:
            assert set(enrolment.records) == set(record_names(method))


# --- Enrolment ------------------------------------------------------------------------------


def test_enrolment_validates_and_freezes_its_records() -> None:
    with SecretBytes.random(32) as root:
        with pytest.raises(ValueError, match=r"unseal\."):
            Enrolment(root, {"master.method": b"x"})
        with pytest.raises(TypeError):
            Enrolment(root, {"unseal.raw.x": "text"})  # type: ignore[dict-item]
        records = {"unseal.raw.x": b"value"}
        enrolment = Enrolment(root, records)
        records["unseal.raw.y"] = b"later"
        assert dict(enrolment.records) == {"unseal.raw.x": b"value"}
        with pytest.raises(TypeError):
            enrolment.records["unseal.raw.z"] = b"no"  # type: ignore[index]
        assert "value" not in repr(enrolment)
    with pytest.raises(TypeError):
        Enrolment(bytes(32), {})  # type: ignore[arg-type]


def test_enrolment_context_wipes_the_root() -> None:
    with Enrolment(SecretBytes.random(32), {}) as enrolment:
        root = enrolment.root
        assert not root.is_wiped
    assert root.is_wiped


# --- master.method ------------------------------------------------------------------------


def test_check_method() -> None:
    store = MemoryStore()
    check_method(store, "raw")  # no record: passes
    assert stored_method(store) is None
    store.put_meta(METHOD_RECORD, b"raw")
    check_method(store, "raw")
    with pytest.raises(UnsealMismatch, match="'raw'"):
        check_method(store, "passphrase")
    for bad in (b"\xff", b"bad\x00name"):
        store.put_meta(METHOD_RECORD, bad)
        with pytest.raises(CorruptRecord):
            stored_method(store)


# --- KeyUnseal (raw) ---------------------------------------------------------------------


def test_key_unseal_round_trip_and_wrong_key() -> None:
    with SecretBytes.random(32) as key, SecretBytes.random(32) as other:
        with KeyUnseal(key).enrol() as enrolment:
            assert enrolment.root.equals(key)
            assert enrolment.root is not key
            store = initialised(enrolment, "raw")
        with KeyUnseal(key).unlock_root(store) as root:
            assert root.equals(key)
        with pytest.raises(WrongPassphrase):
            KeyUnseal(other).unlock_root(store)
        assert not key.is_wiped  # the caller keeps its key


def test_key_unseal_refuses_bad_keys_and_missing_records() -> None:
    with SecretBytes.random(32) as key, KeyUnseal(key).enrol() as enrolment:
        store = initialised(enrolment, "raw")
    with SecretBytes.random(16) as short:
        with pytest.raises(InvalidKeyMaterial):
            KeyUnseal(short).enrol()
        with pytest.raises(InvalidKeyMaterial):
            KeyUnseal(short).unlock_root(store)
    with pytest.raises(TypeError):
        KeyUnseal(bytes(32))  # type: ignore[arg-type]
    with SecretBytes.random(32) as key:
        with pytest.raises(UnsealMismatch, match=RAW_VERIFIER_RECORD):
            KeyUnseal(key).unlock_root(MemoryStore())
        assert "hidden" in repr(KeyUnseal(key))


# --- read_secret ----------------------------------------------------------------------------


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read_end, write_end = os.pipe()
    yield read_end, write_end
    for fd in (read_end, write_end):
        with contextlib.suppress(OSError):
            os.close(fd)


def feed(pipe: tuple[int, int], data: bytes) -> int:
    read_end, write_end = pipe
    os.write(write_end, data)
    os.close(write_end)
    return read_end


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"secret\n", "secret"),
        (b"secret", "secret"),
        (b"secret\r\n", "secret"),
        (b"  spaced out  \n", "  spaced out  "),
        (b"two newlines\n\n", "two newlines"),
        (b"\n", ""),
        ("caf\u00e9 \u2603\n".encode(), "caf\u00e9 \u2603"),
    ],
)
def test_read_secret_from_a_descriptor(pipe: tuple[int, int], data: bytes, expected: str) -> None:
    assert read_secret("unused: ", fd=feed(pipe, data)) == expected


def test_read_secret_reads_one_line_at_a_time(pipe: tuple[int, int]) -> None:
    fd = feed(pipe, b"first share\nsecond share\nthird")
    assert [read_secret("", fd=fd) for _ in range(3)] == ["first share", "second share", "third"]
    with pytest.raises(EOFError):
        read_secret("", fd=fd)


def test_read_secret_refuses_non_utf8_and_huge_input(pipe: tuple[int, int], tmp_path: Path) -> None:
    with pytest.raises(InvalidPassphrase, match="UTF-8"):
        read_secret("", fd=feed(pipe, b"\xff\xfe\n"))
    huge = tmp_path / "huge"
    huge.write_bytes(b"x" * (MAX_SECRET_BYTES + 10) + b"\n")
    fd = os.open(huge, os.O_RDONLY)
    try:
        with pytest.raises(InvalidPassphrase, match="longer"):
            read_secret("", fd=fd)
    finally:
        os.close(fd)


def test_read_secret_prompts_with_getpass(monkeypatch: pytest.MonkeyPatch) -> None:
    prompts: list[str] = []

    def fake_getpass(prompt: str = "Password: ") -> str:
        prompts.append(prompt)
        return "typed"

    monkeypatch.setattr("getpass.getpass", fake_getpass)
    assert read_secret("Passphrase: ") == "typed"
    assert prompts == ["Passphrase: "]
