"""Root-key verifiers: recognise a root key again without storing anything that reveals it.

An unseal source that recovers a random 32-byte root key (from Shamir shares, an
environment variable, a caller's key) stores a verifier next to its parameters, so that
a wrong key — a wrong combination of shares, another environment key — is refused with a
clear error *before* anything is decrypted with it::

    verifier = HKDF-SHA256(ikm=root, salt=salt, info=frame(_DOMAIN, purpose), 32 bytes)

``salt`` is 16 random bytes per record (two records of the same root do not match),
``purpose`` names the source (``b"unseal/shamir"``, ``b"unseal/env"``, ...), so a verifier
of one source is never a verifier of another. The root key is uniformly random and 256
bits long, so the verifier needs no slow KDF: HKDF is a PRF keyed by the root.

Record layout, version 1 (for sources that store a verifier on its own)::

    offset  size  field
    0       1     version, 0x01
    1       16    salt
    17      32    verifier
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from enclave_keys.crypto._common import KEY_SIZE, frame, random_bytes
from enclave_keys.crypto.secret import Entropy, SecretBytes
from enclave_keys.errors import CorruptRecord, InvalidKeyMaterial

__all__ = ["ROOT_VERIFIER_SIZE", "VERIFIER_SALT_SIZE", "RootVerifier"]

_DOMAIN = b"enclave_keys/root-verifier/v1"
_RECORD_VERSION = 0x01
ROOT_VERIFIER_SIZE = 32
VERIFIER_SALT_SIZE = 16
_RECORD_SIZE = 1 + VERIFIER_SALT_SIZE + ROOT_VERIFIER_SIZE


def _derive(root: SecretBytes, salt: bytes, purpose: bytes) -> bytes:
    if not isinstance(root, SecretBytes):
        raise TypeError("a root key must be given as SecretBytes")
    if len(root) != KEY_SIZE:
        raise InvalidKeyMaterial(f"a root key must be {KEY_SIZE} bytes, not {len(root)}")
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=ROOT_VERIFIER_SIZE,
        salt=salt,
        info=frame(_DOMAIN, purpose),
    )
    with root.borrow() as view:
        return hkdf.derive(view)


@dataclass(frozen=True, slots=True)
class RootVerifier:
    """A salt and the HKDF verifier of a root key for one ``purpose``; safe to store."""

    salt: bytes
    verifier: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.salt, bytes) or len(self.salt) != VERIFIER_SALT_SIZE:
            raise CorruptRecord(f"a root verifier salt must be {VERIFIER_SALT_SIZE} bytes")
        if not isinstance(self.verifier, bytes) or len(self.verifier) != ROOT_VERIFIER_SIZE:
            raise CorruptRecord(f"a root verifier must be {ROOT_VERIFIER_SIZE} bytes")

    @classmethod
    def create(
        cls, root: SecretBytes, purpose: bytes, *, entropy: Entropy | None = None
    ) -> RootVerifier:
        """A verifier of ``root`` under a fresh random salt.

        ``entropy`` makes the salt deterministic: FOR SIMULATIONS ONLY.
        """
        salt = random_bytes(VERIFIER_SALT_SIZE, entropy)
        return cls(salt=salt, verifier=_derive(root, salt, purpose))

    def matches(self, root: SecretBytes, purpose: bytes) -> bool:
        """Whether ``root`` is the key this verifier was made from (constant-time compare)."""
        return hmac.compare_digest(_derive(root, self.salt, purpose), self.verifier)

    def to_bytes(self) -> bytes:
        return bytes([_RECORD_VERSION]) + self.salt + self.verifier

    @classmethod
    def from_bytes(cls, raw: bytes) -> RootVerifier:
        """Decode a version-1 record; anything else raises :class:`CorruptRecord`."""
        if not isinstance(raw, bytes) or len(raw) != _RECORD_SIZE:
            raise CorruptRecord("root verifier record has the wrong length")
        if raw[0] != _RECORD_VERSION:
            raise CorruptRecord(f"root verifier record version {raw[0]} is not supported")
        return cls(salt=raw[1 : 1 + VERIFIER_SALT_SIZE], verifier=raw[1 + VERIFIER_SALT_SIZE :])
