"""EnvKeyUnseal: strict validation, verifier, and refusal after migrating off the env key."""

from __future__ import annotations

import os

import pytest
from structlog.testing import capture_logs

from enclave_keys.errors import (
    CorruptRecord,
    InvalidKeyMaterial,
    UnsealMismatch,
    WrongPassphrase,
)
from enclave_keys.unseal import METHOD_RECORD, EnvKeyUnseal, PassphraseUnseal, UnsealSource
from enclave_keys.unseal.env import DEFAULT_ENV_VARIABLE, ENV_VERIFIER_RECORD
from tests.unseal.helpers import fast_params, flatten_logs, initialised

KEY = bytes(range(32))
KEY_HEX = KEY.hex()
OTHER_HEX = bytes(range(1, 33)).hex()


def env(value: str, variable: str = DEFAULT_ENV_VARIABLE) -> dict[str, str]:
    return {variable: value}


@pytest.mark.parametrize("value", [KEY_HEX, KEY_HEX.upper(), KEY_HEX[:20] + KEY_HEX[20:].upper()])
def test_64_hex_characters_in_either_case_are_the_root(value: str) -> None:
    source: UnsealSource = EnvKeyUnseal(env(value))
    assert source.method == "env"
    with source.enrol() as enrolment:
        assert enrolment.root.equals(KEY)
        assert set(enrolment.records) == {ENV_VERIFIER_RECORD}
        assert KEY not in enrolment.records[ENV_VERIFIER_RECORD]


BAD_VALUES = {
    "empty": "",
    "63 chars": KEY_HEX[:-1],
    "65 chars": KEY_HEX + "0",
    "128 chars": KEY_HEX * 2,
    "trailing newline": KEY_HEX + "\n",
    "trailing space": KEY_HEX + " ",
    "leading space": " " + KEY_HEX,
    "inner space": KEY_HEX[:32] + " " + KEY_HEX[32:],
    "0x prefix": "0x" + KEY_HEX[2:],
    "non-hex letter": "g" + KEY_HEX[1:],
    "unicode digit": "\u0661" + KEY_HEX[1:],
    "fullwidth digit": "\uff11" + KEY_HEX[1:],
}


@pytest.mark.parametrize("value", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_anything_but_exactly_64_hex_characters_is_invalid(value: str) -> None:
    store = initialised(EnvKeyUnseal(env(KEY_HEX)).enrol(), "env")
    for attempt in (
        EnvKeyUnseal(env(value)).enrol,
        lambda: EnvKeyUnseal(env(value)).unlock_root(store),
    ):
        with pytest.raises(InvalidKeyMaterial) as caught:
            attempt()
        message = str(caught.value)
        assert DEFAULT_ENV_VARIABLE in message
        if value.strip():
            assert value.strip() not in message
            assert KEY_HEX[8:24] not in message.lower()


def test_missing_variable_is_invalid() -> None:
    with pytest.raises(InvalidKeyMaterial, match="not set"):
        EnvKeyUnseal({}).enrol()


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DEFAULT_ENV_VARIABLE, KEY_HEX)
    with EnvKeyUnseal().enrol() as enrolment:
        assert enrolment.root.equals(KEY)
    monkeypatch.setenv("MY_KEY", OTHER_HEX)
    with EnvKeyUnseal(os.environ, variable="MY_KEY").enrol() as enrolment:
        assert enrolment.root.equals(bytes.fromhex(OTHER_HEX))


def test_unlock_recovers_the_root_and_refuses_another_key() -> None:
    with EnvKeyUnseal(env(KEY_HEX)).enrol() as enrolment:
        store = initialised(enrolment, "env")
    with EnvKeyUnseal(env(KEY_HEX.upper())).unlock_root(store) as root:
        assert root.equals(KEY)
    with capture_logs() as logs, pytest.raises(WrongPassphrase) as caught:
        EnvKeyUnseal(env(OTHER_HEX)).unlock_root(store)
    assert OTHER_HEX not in str(caught.value)
    assert OTHER_HEX not in flatten_logs(logs)


def test_unlock_needs_master_method_env() -> None:
    with EnvKeyUnseal(env(KEY_HEX)).enrol() as enrolment:
        store = initialised(enrolment, None)
    with pytest.raises(UnsealMismatch, match=r"master\.method"):
        EnvKeyUnseal(env(KEY_HEX)).unlock_root(store)


def test_env_key_is_refused_after_migrating_off_it() -> None:
    """Initialise with the env key, then do what MasterKeys.rekey_root does for a migration."""
    with EnvKeyUnseal(env(KEY_HEX)).enrol() as enrolment:
        store = initialised(enrolment, "env")
    with EnvKeyUnseal(env(KEY_HEX)).unlock_root(store) as root:
        assert root.equals(KEY)
    # rekey_root(new_root, "passphrase", records, drop_records=()) — env records even left behind:
    with PassphraseUnseal("a new passphrase", fast_params()).enrol() as new:
        with store.write() as batch:
            for name, value in new.records.items():
                batch.put_meta(name, value)
            batch.put_meta(METHOD_RECORD, b"passphrase")
        with PassphraseUnseal("a new passphrase").unlock_root(store) as root:
            assert root.equals(new.root)
    assert store.get_meta(ENV_VERIFIER_RECORD) is not None
    with pytest.raises(UnsealMismatch, match="migrated off the environment key"):
        EnvKeyUnseal(env(KEY_HEX)).unlock_root(store)
    # ... and with the env records dropped, as rekey_root(drop_records=...) does:
    store.delete_meta(ENV_VERIFIER_RECORD)
    with pytest.raises(UnsealMismatch, match="migrated off the environment key"):
        EnvKeyUnseal(env(KEY_HEX)).unlock_root(store)


def test_missing_or_garbled_verifier_record() -> None:
    store = initialised(EnvKeyUnseal(env(KEY_HEX)).enrol(), "env")
    raw = store.get_meta(ENV_VERIFIER_RECORD)
    assert raw is not None
    store.put_meta(ENV_VERIFIER_RECORD, raw[:-1])
    with pytest.raises(CorruptRecord):
        EnvKeyUnseal(env(KEY_HEX)).unlock_root(store)
    store.put_meta(ENV_VERIFIER_RECORD, b"\x02" + raw[1:])
    with pytest.raises(CorruptRecord):
        EnvKeyUnseal(env(KEY_HEX)).unlock_root(store)
    store.delete_meta(ENV_VERIFIER_RECORD)
    with pytest.raises(UnsealMismatch):
        EnvKeyUnseal(env(KEY_HEX)).unlock_root(store)


def test_repr_hides_the_key() -> None:
    source = EnvKeyUnseal(env(KEY_HEX))
    assert KEY_HEX not in repr(source)
    assert DEFAULT_ENV_VARIABLE in repr(source)
