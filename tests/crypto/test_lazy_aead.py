"""A key holder builds its ``AESGCM`` object (OpenSSL's copy of the key) on first use."""

from __future__ import annotations

import os
import threading

import pytest

from enclave_keys.crypto import RoundCipher, SecretBytes
from enclave_keys.errors import InvalidKeyMaterial, SecretWiped
from enclave_keys.ids import KeyId, RoundId
from tests.crypto.forking import in_forked_child

R = RoundId("lazy")


def test_no_aesgcm_until_the_key_is_used() -> None:
    cipher = RoundCipher(R, KeyId.random(), SecretBytes.random(32))
    assert cipher._aead is None, "a hydrated key costs no OpenSSL copy until used"
    sealed = cipher.seal("probe", b"data")
    assert cipher._aead is not None
    assert cipher.open("probe", sealed) == b"data"
    cipher.wipe()
    assert cipher._aead is None


def test_a_key_wiped_before_first_use_refuses_use() -> None:
    cipher = RoundCipher(R, KeyId.random(), SecretBytes.random(32))
    cipher.wipe()
    assert cipher.is_wiped
    with pytest.raises(SecretWiped):
        cipher.seal("probe", b"data")
    with pytest.raises(SecretWiped), cipher._borrow_key():
        pass


def test_bad_keys_are_still_refused_at_construction() -> None:
    short = SecretBytes.random(16)
    with pytest.raises(InvalidKeyMaterial):
        RoundCipher(R, KeyId.random(), short)
    assert short.is_wiped
    gone = SecretBytes.random(32)
    gone.wipe()
    with pytest.raises(SecretWiped):
        RoundCipher(R, KeyId.random(), gone)


def test_concurrent_first_uses_build_one_object() -> None:
    cipher = RoundCipher(R, KeyId.random(), SecretBytes.random(32))
    seen: list[object] = []
    start = threading.Barrier(8)

    def use() -> None:
        start.wait()
        seen.append(cipher._live_aead())

    threads = [threading.Thread(target=use) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({id(aead) for aead in seen}) == 1
    cipher.wipe()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_cannot_use_a_cipher_built_before_the_fork() -> None:
    """The child inherits the cached ``AESGCM`` (OpenSSL's copy of the key, which nothing
    can wipe), but may not use it: the key holder refuses, as if wiped."""
    cipher = RoundCipher(R, KeyId.random(), SecretBytes.random(32))
    sealed = cipher.seal("probe", b"data")  # builds and caches the AESGCM

    def probe() -> dict[str, object]:
        seen: dict[str, object] = {}
        try:
            cipher.seal("probe", b"x")
        except SecretWiped:
            seen["seal"] = "refused"
        try:
            cipher.open("probe", sealed)
        except SecretWiped:
            seen["open"] = "refused"
        cipher.wipe()  # no lock taken in the child
        seen["is_wiped"] = cipher.is_wiped
        return seen

    assert in_forked_child(probe) == {"seal": "refused", "open": "refused", "is_wiped": True}
    assert cipher.open("probe", sealed) == b"data"  # the parent's cipher still works
    cipher.wipe()
