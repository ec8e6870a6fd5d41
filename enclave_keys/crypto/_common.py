"""Pieces shared by the envelope and the key wrap: sizes, nonces, AAD framing, key holders."""

from __future__ import annotations

import os
import threading
from contextlib import AbstractContextManager
from types import TracebackType
from typing import ClassVar, Self

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from enclave_keys.crypto import secret
from enclave_keys.crypto.secret import Entropy, NoCopy, SecretBytes
from enclave_keys.errors import InvalidKeyMaterial, SecretWiped

KEY_SIZE = 32
"""AES-256: every round key and KEK is 32 bytes."""

NONCE_SIZE = 12
TAG_SIZE = 16


def random_bytes(size: int, entropy: Entropy | None) -> bytes:
    """``size`` bytes from the OS CSPRNG, or from ``entropy`` in a simulation."""
    if entropy is None:
        return os.urandom(size)
    chunk = entropy(size)
    if not isinstance(chunk, bytes) or len(chunk) != size:
        raise InvalidKeyMaterial(f"entropy source must return exactly {size} bytes")
    return chunk


def frame(*fields: bytes) -> bytes:
    """Unambiguous concatenation: each field as a 2-byte big-endian length, then its bytes."""
    parts: list[bytes] = []
    for field in fields:
        if len(field) > 0xFFFF:
            raise ValueError("an associated-data field is longer than 65535 bytes")
        parts += (len(field).to_bytes(2, "big"), field)
    return b"".join(parts)


class AeadKeyHolder(NoCopy):
    """Owns one 32-byte key and the single ``AESGCM`` object built from it.

    Building an ``AESGCM`` costs more than sealing a kilobyte, so it is built once — on
    first use, not at construction: a node hydrating 100,000 round keys at start builds
    none until a round is used, which also keeps OpenSSL's copy of an unused key out of
    memory. ``AESGCM`` keeps its own copy of the key inside OpenSSL, which we cannot
    wipe: we can only drop the object (on :meth:`wipe`) so that OpenSSL frees it.
    """

    __slots__ = ("_aead", "_entropy", "_generation", "_holder_lock", "_key", "_wiped")

    KIND: ClassVar[str] = "key"

    def __init__(self, key: SecretBytes, entropy: Entropy | None) -> None:
        """Take ownership of ``key``; it is wiped if it is not a usable 32-byte key."""
        if not isinstance(key, SecretBytes):
            raise TypeError(f"a {self.KIND} must be given as SecretBytes")
        try:
            if key.is_wiped:
                raise SecretWiped(f"a {self.KIND} cannot be built from a wiped secret")
            if len(key) != KEY_SIZE:
                raise InvalidKeyMaterial(f"a {self.KIND} must be {KEY_SIZE} bytes, not {len(key)}")
        except BaseException:
            key.wipe()
            raise
        self._aead: AESGCM | None = None
        self._generation = secret._generation  # a forked child builds its AESGCM anew
        self._wiped = False
        self._key = key
        self._entropy = entropy
        self._holder_lock = threading.Lock()

    def _live_aead(self) -> AESGCM:
        aead = self._aead
        if aead is not None and self._generation == secret._generation:
            return aead
        if self._generation != secret._generation:  # in a forked child: the key is gone
            raise SecretWiped(f"{self!r}: made before a fork, unusable in the child")
        with self._holder_lock:
            if self._wiped:
                raise SecretWiped(f"{self!r} was used after it was wiped")
            if self._aead is None:
                with self._key.borrow() as view:
                    self._aead = AESGCM(view)
            return self._aead

    def _nonce(self) -> bytes:
        return random_bytes(NONCE_SIZE, self._entropy)

    def _borrow_key(self) -> AbstractContextManager[memoryview]:
        """The raw key, for the key wrap in this package only."""
        if self._wiped:
            raise SecretWiped(f"{self!r} was used after it was wiped")
        return self._key.borrow()

    @property
    def is_wiped(self) -> bool:
        return self._wiped or self._key.is_wiped

    def wipe(self) -> None:
        """Zero the key memory and drop the ``AESGCM`` object. Idempotent, thread-safe."""
        if self._generation != secret._generation:  # a forked child: take no lock
            self._wiped, self._aead = True, None
            self._key.wipe()
            return
        with self._holder_lock:
            self._wiped = True
            self._aead = None
            self._key.wipe()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.wipe()
