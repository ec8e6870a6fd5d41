"""Key-encryption keys (:class:`Kek`) and the wrapped round-key blob.

A wrapped round key is always ``WRAPPED_KEY_SIZE`` = 81 bytes::

    offset  size  field
    0       1     version, 0x01
    1       4     KEK version, big-endian
    5       16    key id of the round key
    21      12    nonce, random per wrap
    33      32    AES-256-GCM encryption of the 32-byte round key
    65      16    GCM tag

Associated data (each field a 2-byte big-endian length, then the bytes)::

    frame(b"enclave_keys/round-key-wrap/v1", header (bytes 0..20), round id)

so a blob only unwraps under the KEK version it names and for the round it was made for.
"""

from __future__ import annotations

import structlog
from cryptography.exceptions import InvalidTag

from enclave_keys.crypto._common import KEY_SIZE, NONCE_SIZE, TAG_SIZE, AeadKeyHolder, frame
from enclave_keys.crypto.aead import RoundCipher
from enclave_keys.crypto.secret import Entropy, SecretBytes
from enclave_keys.errors import InvalidIdentifier, UnwrapFailed
from enclave_keys.ids import KekVersion, KeyId, RoundId

__all__ = [
    "WRAPPED_KEY_SIZE",
    "WRAPPED_KEY_VERSION",
    "Kek",
    "read_wrapped_header",
    "unwrap_round_key",
    "wrap_round_key",
]

_log = structlog.get_logger(__name__)

WRAPPED_KEY_VERSION = 0x01
_HEADER_SIZE = 1 + 4 + KeyId.SIZE
_BODY_START = _HEADER_SIZE + NONCE_SIZE
WRAPPED_KEY_SIZE = _BODY_START + KEY_SIZE + TAG_SIZE
_DOMAIN = b"enclave_keys/round-key-wrap/v1"
_WHAT = "wrapped round key"


class Kek(AeadKeyHolder):
    """One version of the node's key-encryption key. Owns its key; wipe when done.

    ``entropy`` makes wrap nonces deterministic: FOR SIMULATIONS ONLY.
    """

    __slots__ = ("_version",)

    KIND = "KEK"

    def __init__(
        self, version: KekVersion, key: SecretBytes, *, entropy: Entropy | None = None
    ) -> None:
        if not isinstance(version, KekVersion):
            if isinstance(key, SecretBytes):
                key.wipe()
            raise TypeError("Kek needs a KekVersion")
        super().__init__(key, entropy)
        self._version = version

    @property
    def version(self) -> KekVersion:
        return self._version

    def __repr__(self) -> str:
        return f"Kek(version={self._version.number}, {'wiped' if self.is_wiped else 'live'})"


def _header(kek_version: KekVersion, key_id: KeyId) -> bytes:
    return bytes([WRAPPED_KEY_VERSION]) + kek_version.to_bytes() + key_id.raw


def wrap_round_key(kek: Kek, cipher: RoundCipher) -> bytes:
    """Encrypt ``cipher``'s key under ``kek``, bound to its round id and key id."""
    aead = kek._live_aead()
    header = _header(kek.version, cipher.key_id)
    aad = frame(_DOMAIN, header, cipher.round_id.to_bytes())
    nonce = kek._nonce()
    with cipher._borrow_key() as key:
        sealed = aead.encrypt(nonce, key, aad)
    _log.debug(
        "round_key_wrapped",
        round_id=str(cipher.round_id),
        key_id=cipher.key_id.hex(),
        kek_version=kek.version.number,
    )
    return header + nonce + sealed


def read_wrapped_header(blob: bytes) -> tuple[KekVersion, KeyId]:
    """The KEK version and key id a blob names, read without decrypting anything."""
    if not isinstance(blob, bytes) or len(blob) != WRAPPED_KEY_SIZE:
        raise UnwrapFailed(_WHAT)
    if blob[0] != WRAPPED_KEY_VERSION:
        raise UnwrapFailed(_WHAT)
    try:
        kek_version = KekVersion.from_bytes(blob[1:5])
    except InvalidIdentifier:
        raise UnwrapFailed(_WHAT) from None
    return kek_version, KeyId(blob[5:_HEADER_SIZE])


def unwrap_round_key(
    kek: Kek, round_id: RoundId, blob: bytes, *, entropy: Entropy | None = None
) -> RoundCipher:
    """Decrypt a wrapped round key straight into key memory and return its cipher.

    Raises :class:`UnwrapFailed` for any malformed or tampered blob, a blob naming another
    KEK version than ``kek.version``, or one made for another round. ``entropy`` is passed
    to the new cipher (simulations only).
    """
    aead = kek._live_aead()
    kek_version, key_id = read_wrapped_header(blob)
    if kek_version != kek.version:
        raise UnwrapFailed(_WHAT)
    aad = frame(_DOMAIN, blob[:_HEADER_SIZE], round_id.to_bytes())
    nonce, sealed = blob[_HEADER_SIZE:_BODY_START], blob[_BODY_START:]

    def decrypt(buffer: memoryview) -> None:
        aead.decrypt_into(nonce, sealed, aad, buffer)

    try:
        key = SecretBytes._filled_by(KEY_SIZE, decrypt)
    except InvalidTag:
        _log.warning(
            "round_key_unwrap_failed", round_id=str(round_id), kek_version=kek.version.number
        )
        raise UnwrapFailed(_WHAT) from None
    return RoundCipher(round_id, key_id, key, entropy=entropy)
