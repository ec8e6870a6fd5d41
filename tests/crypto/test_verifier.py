"""RootVerifier: recognise a root key again from a stored salt and HKDF verifier."""

from __future__ import annotations

import pytest

from enclave_keys.crypto import SecretBytes
from enclave_keys.crypto.verifier import ROOT_VERIFIER_SIZE, VERIFIER_SALT_SIZE, RootVerifier
from enclave_keys.errors import CorruptRecord, InvalidKeyMaterial

PURPOSE = b"unseal/test"


def test_matches_its_root_only() -> None:
    with SecretBytes.random(32) as root, SecretBytes.random(32) as other:
        verifier = RootVerifier.create(root, PURPOSE)
        assert verifier.matches(root, PURPOSE)
        assert not verifier.matches(other, PURPOSE)


def test_purposes_are_separated() -> None:
    with SecretBytes.random(32) as root:
        verifier = RootVerifier.create(root, PURPOSE)
        assert not verifier.matches(root, b"unseal/other")


def test_each_verifier_has_its_own_salt() -> None:
    with SecretBytes.random(32) as root:
        one, two = RootVerifier.create(root, PURPOSE), RootVerifier.create(root, PURPOSE)
    assert one.salt != two.salt
    assert one.verifier != two.verifier


def test_deterministic_with_an_entropy_source_and_does_not_contain_the_root() -> None:
    with SecretBytes.from_bytes(bytes(range(32))) as root:
        one = RootVerifier.create(root, PURPOSE, entropy=lambda n: b"\x07" * n)
        two = RootVerifier.create(root, PURPOSE, entropy=lambda n: b"\x07" * n)
        assert one == two
        assert bytes(range(32)) not in one.to_bytes()
        assert bytes(range(16)) not in one.to_bytes()


def test_record_round_trip_and_garbage() -> None:
    with SecretBytes.random(32) as root:
        verifier = RootVerifier.create(root, PURPOSE)
    raw = verifier.to_bytes()
    assert len(raw) == 1 + VERIFIER_SALT_SIZE + ROOT_VERIFIER_SIZE
    assert RootVerifier.from_bytes(raw) == verifier
    for bad in (raw[:-1], raw + b"\x00", b"\x02" + raw[1:], b""):
        with pytest.raises(CorruptRecord):
            RootVerifier.from_bytes(bad)
    with pytest.raises(CorruptRecord):
        RootVerifier(salt=b"short", verifier=bytes(32))


def test_only_32_byte_secret_roots() -> None:
    with SecretBytes.random(16) as short, pytest.raises(InvalidKeyMaterial):
        RootVerifier.create(short, PURPOSE)
    with pytest.raises(TypeError):
        RootVerifier.create(bytes(32), PURPOSE)  # type: ignore[arg-type]
