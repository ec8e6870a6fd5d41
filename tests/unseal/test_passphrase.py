"""PassphraseUnseal: enrol, unlock, wrong and invalid passphrases, records."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from enclave_keys.crypto import PassphraseRecord
from enclave_keys.errors import (
    CorruptRecord,
    InvalidPassphrase,
    UnsealMismatch,
    WrongPassphrase,
)
from enclave_keys.store import MemoryStore
from enclave_keys.unseal import METHOD_RECORD, PassphraseUnseal, UnsealSource
from enclave_keys.unseal.passphrase import PASSPHRASE_RECORD
from tests.unseal.helpers import fast_params, flatten_logs, initialised

PASSPHRASE = "correct horse battery staple"


def test_enrol_then_unlock_gives_the_same_root() -> None:
    source: UnsealSource = PassphraseUnseal(PASSPHRASE, fast_params())
    assert source.method == "passphrase"
    with source.enrol() as enrolment:
        assert set(enrolment.records) == {PASSPHRASE_RECORD}
        assert len(enrolment.root) == 32
        store = initialised(enrolment, "passphrase")
        with PassphraseUnseal(PASSPHRASE).unlock_root(store) as root:
            assert root.equals(enrolment.root)


def test_each_enrolment_has_its_own_salt_and_root() -> None:
    with (
        PassphraseUnseal(PASSPHRASE, fast_params()).enrol() as one,
        PassphraseUnseal(PASSPHRASE, fast_params()).enrol() as two,
    ):
        assert not one.root.equals(two.root)
        assert one.records[PASSPHRASE_RECORD] != two.records[PASSPHRASE_RECORD]


def test_wrong_passphrase_is_refused_by_the_verifier() -> None:
    with PassphraseUnseal(PASSPHRASE, fast_params()).enrol() as enrolment:
        store = initialised(enrolment, "passphrase")
    with capture_logs() as logs, pytest.raises(WrongPassphrase):
        PassphraseUnseal(PASSPHRASE + "!").unlock_root(store)
    assert PASSPHRASE not in flatten_logs(logs)


@pytest.mark.parametrize("bad", ["", "nul\x00inside", "x" * 1025])
def test_invalid_passphrases_are_refused_before_any_derivation(bad: str) -> None:
    with pytest.raises(InvalidPassphrase):
        PassphraseUnseal(bad, fast_params()).enrol()
    with PassphraseUnseal(PASSPHRASE, fast_params()).enrol() as enrolment:
        store = initialised(enrolment, "passphrase")
    with pytest.raises(InvalidPassphrase):
        PassphraseUnseal(bad).unlock_root(store)


def test_record_holds_parameters_and_verifier_only() -> None:
    params = fast_params()
    with PassphraseUnseal(PASSPHRASE, params).enrol() as enrolment:
        raw = enrolment.records[PASSPHRASE_RECORD]
        record = PassphraseRecord.from_bytes(raw)
        assert record.params == params
        assert PASSPHRASE.encode() not in raw
        with enrolment.root.borrow() as view:
            assert bytes(view) not in raw


def test_unlock_without_a_record_is_an_unseal_mismatch() -> None:
    with pytest.raises(UnsealMismatch, match="passphrase"):
        PassphraseUnseal(PASSPHRASE).unlock_root(MemoryStore())


def test_unlock_of_a_store_sealed_with_another_method_is_refused() -> None:
    with PassphraseUnseal(PASSPHRASE, fast_params()).enrol() as enrolment:
        store = initialised(enrolment, "shamir")
    with pytest.raises(UnsealMismatch, match="'shamir'"):
        PassphraseUnseal(PASSPHRASE).unlock_root(store)


@pytest.mark.parametrize("damage", [lambda r: r[:-1], lambda r: b"\x09" + r[1:], lambda r: b""])
def test_a_garbled_record_is_corrupt(damage: object) -> None:
    with PassphraseUnseal(PASSPHRASE, fast_params()).enrol() as enrolment:
        store = initialised(enrolment, "passphrase")
        raw = enrolment.records[PASSPHRASE_RECORD]
    assert callable(damage)
    store.put_meta(PASSPHRASE_RECORD, damage(raw) or b"\x01")
    with pytest.raises(CorruptRecord):
        PassphraseUnseal(PASSPHRASE).unlock_root(store)


def test_a_garbled_method_record_is_corrupt() -> None:
    with PassphraseUnseal(PASSPHRASE, fast_params()).enrol() as enrolment:
        store = initialised(enrolment, None)
    store.put_meta(METHOD_RECORD, b"\xff\xfe")
    with pytest.raises(CorruptRecord):
        PassphraseUnseal(PASSPHRASE).unlock_root(store)


def test_repr_hides_the_passphrase() -> None:
    assert PASSPHRASE not in repr(PassphraseUnseal(PASSPHRASE))


def test_repeated_unlocks_give_the_same_root_and_another_passphrase_is_refused() -> None:
    with PassphraseUnseal(PASSPHRASE, fast_params()).enrol() as enrolment:
        store = initialised(enrolment, "passphrase")
        source = PassphraseUnseal(PASSPHRASE)
        with source.unlock_root(store) as first, source.unlock_root(store) as again:
            assert first.equals(enrolment.root)
            assert again.equals(enrolment.root)
    with pytest.raises(WrongPassphrase):
        PassphraseUnseal("other").unlock_root(store)
