"""HsmUnseal over PKCS#11, against SoftHSM2 in a private token directory per test.

SoftHSM2 missing: the tests that need it SKIP with the reason — unless
``ENCLAVE_KEYS_REQUIRE_SOFTHSM=1`` (CI sets it), in which case they FAIL.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest
from structlog.testing import capture_logs

from enclave_keys.crypto import SecretBytes
from enclave_keys.errors import CorruptRecord, HsmError, UnsealMismatch
from enclave_keys.store import MemoryStore, Store
from enclave_keys.unseal import METHOD_RECORD, Enrolment, HsmUnseal, UnsealSource
from enclave_keys.unseal.hsm import (
    DEFAULT_KEY_LABEL,
    MECHANISM_AES_GCM,
    SEALED_ROOT_RECORD,
    SealedRoot,
    _session,
    find_softhsm_module,
)
from tests.unseal.helpers import flatten_logs, initialised

REQUIRE_ENV = "ENCLAVE_KEYS_REQUIRE_SOFTHSM"
TOKEN = "enclave-test"
PIN = "user-pin-4821"
SO_PIN = "so-pin-9377"


def unavailable(reason: str) -> NoReturn:
    """Skip for want of SoftHSM2, or fail if the environment requires it."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason}, and {REQUIRE_ENV}=1 requires the HSM tests to run")
    pytest.skip(f"{reason} (set {REQUIRE_ENV}=1 to make this a failure)")


@dataclass(frozen=True)
class SoftHsm:
    """A SoftHSM2 installation confined to one test's directory."""

    module: str
    util: str
    conf: Path

    def init_token(self, label: str, pin: str = PIN) -> None:
        subprocess.run(
            [
                self.util,
                "--init-token",
                "--free",
                "--label",
                label,
                "--pin",
                pin,
                "--so-pin",
                SO_PIN,
            ],
            check=True,
            capture_output=True,
            timeout=60,
            env={**os.environ, "SOFTHSM2_CONF": str(self.conf)},
        )

    def source(self, token: str = TOKEN, pin: str = PIN, **kwargs: str) -> HsmUnseal:
        return HsmUnseal(self.module, token, pin, **kwargs)


@pytest.fixture
def softhsm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SoftHsm:
    """A fresh SoftHSM2 token ``TOKEN`` (user PIN ``PIN``) in a private token directory."""
    try:
        import pkcs11  # noqa: F401
    except ImportError:
        unavailable("python-pkcs11 is not installed (install enclave-keys[hsm])")
    util = shutil.which("softhsm2-util")
    module = find_softhsm_module()
    if util is None or module is None:
        unavailable("SoftHSM2 is not installed (Debian: apt-get install softhsm2)")
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
        "slots.removable = false\n"
    )
    # SoftHSM2 reads SOFTHSM2_CONF at C_Initialize, which HsmUnseal calls per operation.
    monkeypatch.setenv("SOFTHSM2_CONF", str(conf))
    hsm = SoftHsm(module=module, util=util, conf=conf)
    hsm.init_token(TOKEN)
    return hsm


def sealed(store: Store) -> SealedRoot:
    raw = store.get_meta(SEALED_ROOT_RECORD)
    assert raw is not None
    return SealedRoot.from_bytes(raw)


def enrolled(hsm: SoftHsm) -> tuple[Enrolment, Store]:
    enrolment = hsm.source().enrol()
    return enrolment, initialised(enrolment, "pkcs11")


# --- without a token ----------------------------------------------------------------------


def test_the_skip_or_fail_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="requires the HSM tests"):
        unavailable("SoftHSM2 is not installed")
    monkeypatch.delenv(REQUIRE_ENV)
    with pytest.raises(pytest.skip.Exception, match="SoftHSM2 is not installed"):
        unavailable("SoftHSM2 is not installed")


def test_sealed_root_record_round_trips_and_rejects_garbage() -> None:
    record = SealedRoot(MECHANISM_AES_GCM, bytes(12), "a-label", bytes(range(48)))
    raw = record.to_bytes()
    assert SealedRoot.from_bytes(raw) == record
    assert len(raw) == 3 + 12 + 1 + 7 + 1 + 48
    for bad in (
        raw[:-1],
        raw + b"\x00",
        b"\x02" + raw[1:],
        raw[:1] + b"\x02" + raw[2:],
        raw[:2] + b"\x0b" + raw[3:],
        raw[:15] + b"\x00" + raw[16:],
        b"",
        b"\x01",
    ):
        with pytest.raises(CorruptRecord):
            SealedRoot.from_bytes(bad)


def test_find_softhsm_module_honours_an_override(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "libsofthsm2.so"
    fake.write_bytes(b"")
    monkeypatch.setenv("SOFTHSM2_MODULE", str(fake))
    assert find_softhsm_module() == str(fake)
    monkeypatch.setenv("SOFTHSM2_MODULE", str(tmp_path / "missing.so"))
    assert find_softhsm_module() is None


def test_a_module_that_does_not_load_is_an_hsm_error(tmp_path: Path) -> None:
    source = HsmUnseal(str(tmp_path / "libnothing.so"), TOKEN, PIN)
    with pytest.raises(HsmError, match="cannot load") as caught:
        source.enrol()
    assert PIN not in str(caught.value)


def test_repr_hides_the_pin() -> None:
    source = HsmUnseal("/usr/lib/softhsm/libsofthsm2.so", TOKEN, PIN)
    assert PIN not in repr(source)
    assert TOKEN in repr(source)


# --- against SoftHSM2 ---------------------------------------------------------------------


def test_enrol_then_auto_unseal_round_trip(softhsm: SoftHsm) -> None:
    source: UnsealSource = softhsm.source()
    assert source.method == "pkcs11"
    with capture_logs() as logs:
        enrolment = source.enrol()
    with enrolment:
        assert set(enrolment.records) == {SEALED_ROOT_RECORD}
        store = initialised(enrolment, "pkcs11")
        for _ in range(3):  # every start: a fresh C_Initialize, login, decrypt in the token
            with softhsm.source().unlock_root(store) as root:
                assert root.equals(enrolment.root)
    assert [e["key_created"] for e in logs if e["event"] == "pkcs11_root_sealed"] == [True]
    assert PIN not in flatten_logs(logs)


def test_the_sealed_record_is_not_the_root(softhsm: SoftHsm) -> None:
    enrolment, store = enrolled(softhsm)
    with enrolment, enrolment.root.borrow() as view:
        root = bytes(view)
    record = sealed(store)
    assert record.mechanism == MECHANISM_AES_GCM
    assert record.key_label == DEFAULT_KEY_LABEL
    assert len(record.iv) == 12
    assert len(record.ciphertext) == 48
    raw = store.get_meta(SEALED_ROOT_RECORD)
    assert raw is not None
    assert root not in raw
    assert root[:16] not in raw
    assert root[16:] not in raw


def test_each_enrolment_reuses_the_key_with_a_new_root_and_iv(softhsm: SoftHsm) -> None:
    with capture_logs() as logs:
        one, store_one = enrolled(softhsm)
        two, store_two = enrolled(softhsm)
    with one, two:
        assert not one.root.equals(two.root)
        assert sealed(store_one).iv != sealed(store_two).iv
        with softhsm.source().unlock_root(store_one) as r1:
            assert r1.equals(one.root)
        with softhsm.source().unlock_root(store_two) as r2:
            assert r2.equals(two.root)
    created = [e["key_created"] for e in logs if e["event"] == "pkcs11_root_sealed"]
    assert created == [True, False]


def test_seal_moves_an_existing_root_into_the_token(softhsm: SoftHsm) -> None:
    with SecretBytes.random(32) as current:
        with softhsm.source().seal(current) as enrolment:
            assert enrolment.root.equals(current)
            store = initialised(enrolment, "pkcs11")
        assert not current.is_wiped
        with softhsm.source().unlock_root(store) as root:
            assert root.equals(current)


def test_the_wrapping_key_never_leaves_the_token(softhsm: SoftHsm) -> None:
    from pkcs11 import Attribute, KeyType, ObjectClass
    from pkcs11.exceptions import AttributeSensitive

    enrolled(softhsm)[0].wipe()
    with _session(softhsm.module, TOKEN, PIN, rw=False) as session:
        key = session.get_key(
            object_class=ObjectClass.SECRET_KEY, key_type=KeyType.AES, label=DEFAULT_KEY_LABEL
        )
        assert key[Attribute.VALUE_LEN] == 32
        assert key[Attribute.SENSITIVE] is True
        assert key[Attribute.EXTRACTABLE] is False
        assert key[Attribute.TOKEN] is True
        assert key[Attribute.PRIVATE] is True
        assert key[Attribute.WRAP] is False
        assert key[Attribute.SIGN] is False
        with pytest.raises(AttributeSensitive):
            key[Attribute.VALUE]


def test_a_wrong_pin_is_an_hsm_error(softhsm: SoftHsm) -> None:
    wrong = "not-the-pin-1234"
    with pytest.raises(HsmError, match="refused the PIN") as caught:
        softhsm.source(pin=wrong).enrol()
    assert wrong not in str(caught.value)
    enrolment, store = enrolled(softhsm)
    enrolment.wipe()
    with capture_logs() as logs, pytest.raises(HsmError, match="refused the PIN") as caught:
        softhsm.source(pin=wrong).unlock_root(store)
    assert wrong not in str(caught.value)
    assert wrong not in flatten_logs(logs)
    with softhsm.source().unlock_root(store) as root:  # the right PIN still works
        assert len(root) == 32


def test_a_missing_token_is_an_hsm_error(softhsm: SoftHsm) -> None:
    enrolment, store = enrolled(softhsm)
    enrolment.wipe()
    with pytest.raises(HsmError, match="no token labelled 'no-such-token'"):
        softhsm.source(token="no-such-token").unlock_root(store)
    with pytest.raises(HsmError, match="no token labelled"):
        softhsm.source(token="no-such-token").enrol()


def test_a_missing_key_is_an_hsm_error(softhsm: SoftHsm) -> None:
    enrolment, store = enrolled(softhsm)
    enrolment.wipe()
    softhsm.init_token("other-token")  # same module, a token without the key
    with pytest.raises(HsmError, match="no AES key labelled"):
        softhsm.source(token="other-token").unlock_root(store)
    with _session(softhsm.module, TOKEN, PIN, rw=True) as session:  # destroy the key
        from pkcs11 import KeyType, ObjectClass

        session.get_key(
            object_class=ObjectClass.SECRET_KEY, key_type=KeyType.AES, label=DEFAULT_KEY_LABEL
        ).destroy()
    with pytest.raises(HsmError, match="cannot be unsealed"):
        softhsm.source().unlock_root(store)


def test_another_key_with_the_same_label_cannot_unseal(softhsm: SoftHsm) -> None:
    enrolment, store = enrolled(softhsm)
    enrolment.wipe()
    softhsm.init_token("other-token")
    softhsm.source(token="other-token").enrol().wipe()  # its own key, same label
    with pytest.raises(HsmError, match="cannot decrypt"):
        softhsm.source(token="other-token").unlock_root(store)


@pytest.mark.parametrize("where", ["ciphertext", "tag", "iv"])
def test_a_tampered_record_does_not_unseal(softhsm: SoftHsm, where: str) -> None:
    enrolment, store = enrolled(softhsm)
    enrolment.wipe()
    record = sealed(store)
    if where == "iv":
        iv = bytes([record.iv[0] ^ 1]) + record.iv[1:]
        forged = SealedRoot(record.mechanism, iv, record.key_label, record.ciphertext)
    else:
        at = 3 if where == "ciphertext" else -1
        body = bytearray(record.ciphertext)
        body[at] ^= 0x80
        forged = SealedRoot(record.mechanism, record.iv, record.key_label, bytes(body))
    store.put_meta(SEALED_ROOT_RECORD, forged.to_bytes())
    with pytest.raises(HsmError, match="cannot decrypt"):
        softhsm.source().unlock_root(store)


def test_a_garbled_record_is_corrupt(softhsm: SoftHsm) -> None:
    enrolment, store = enrolled(softhsm)
    enrolment.wipe()
    raw = store.get_meta(SEALED_ROOT_RECORD)
    assert raw is not None
    store.put_meta(SEALED_ROOT_RECORD, raw[:-5])
    with pytest.raises(CorruptRecord):
        softhsm.source().unlock_root(store)


def test_a_configured_key_label_must_match_the_record(softhsm: SoftHsm) -> None:
    enrolment, store = enrolled(softhsm)
    enrolment.wipe()
    with pytest.raises(UnsealMismatch, match="sealed under the key"):
        softhsm.source(key_label="some-other-key").unlock_root(store)
    custom = softhsm.source(key_label="custom-wrap")
    with custom.enrol() as enrolment:
        other_store = initialised(enrolment, "pkcs11")
        assert sealed(other_store).key_label == "custom-wrap"
        with softhsm.source(key_label="custom-wrap").unlock_root(other_store) as root:
            assert root.equals(enrolment.root)


def test_an_extractable_key_under_our_label_is_refused(softhsm: SoftHsm) -> None:
    from pkcs11 import Attribute, KeyType, MechanismFlag

    with _session(softhsm.module, TOKEN, PIN, rw=True) as session:
        session.generate_key(
            KeyType.AES,
            256,
            label=DEFAULT_KEY_LABEL,
            store=True,
            capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
            template={Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True},
        )
    with pytest.raises(HsmError, match="extractable"):
        softhsm.source().enrol()


def test_store_sealed_with_another_method_or_not_at_all(softhsm: SoftHsm) -> None:
    with pytest.raises(UnsealMismatch, match="pkcs11"):
        softhsm.source().unlock_root(MemoryStore())
    enrolment, store = enrolled(softhsm)
    enrolment.wipe()
    store.put_meta(METHOD_RECORD, b"shamir")
    with pytest.raises(UnsealMismatch, match="'shamir'"):
        softhsm.source().unlock_root(store)
