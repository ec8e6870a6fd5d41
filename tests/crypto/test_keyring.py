"""Key-encryption keys (crypto/keyring.py). The wraps they make are tested in test_wrap.py."""

from __future__ import annotations

import copy
import pickle
from collections.abc import Iterator

import pytest

from enclave_keys.crypto import Kek, SecretBytes
from enclave_keys.errors import InvalidKeyMaterial
from enclave_keys.ids import KekVersion

KEK_KEY = bytes(range(0x40, 0x60))
V7 = KekVersion(7)


def make_kek(version: KekVersion = V7, key: bytes = KEK_KEY) -> Kek:
    return Kek(version, SecretBytes.from_bytes(key))


@pytest.fixture
def kek() -> Iterator[Kek]:
    with make_kek() as fresh:
        yield fresh


def test_kek_owns_and_wipes_its_key() -> None:
    key = SecretBytes.from_bytes(KEK_KEY)
    with Kek(V7, key) as kek:
        assert kek.version == V7
        assert not kek.is_wiped
    assert kek.is_wiped
    assert key.is_wiped


def test_kek_key_must_be_32_bytes() -> None:
    key = SecretBytes.from_bytes(KEK_KEY[:31])
    with pytest.raises(InvalidKeyMaterial):
        Kek(V7, key)
    assert key.is_wiped


def test_kek_needs_a_version() -> None:
    key = SecretBytes.from_bytes(KEK_KEY)
    with pytest.raises(TypeError):
        Kek(7, key)  # type: ignore[arg-type]
    assert key.is_wiped


def test_kek_repr_has_no_key(kek: Kek) -> None:
    assert repr(kek) == "Kek(version=7, live)"
    kek.wipe()
    assert repr(kek) == "Kek(version=7, wiped)"


@pytest.mark.parametrize("how", [copy.copy, copy.deepcopy, pickle.dumps])
def test_kek_cannot_be_copied_or_pickled(kek: Kek, how: object) -> None:
    with pytest.raises(TypeError):
        how(kek)  # type: ignore[operator]
