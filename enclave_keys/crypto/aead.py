"""The round-data envelope and :class:`RoundCipher`, which seals and opens it.

Envelope, format version 1 (``ENVELOPE_OVERHEAD`` = 45 bytes around the plaintext)::

    offset  size  field
    0       1     version, 0x01
    1       16    key id of the round key (KeyId.raw)
    17      12    nonce, random per seal
    29      n     AES-256-GCM ciphertext
    29+n    16    GCM tag

The associated data is never stored; both sides rebuild it from what the bytes belong
to. It is a sequence of fields, each a 2-byte big-endian length then the bytes::

    frame(b"enclave_keys/round-data/v1", header (bytes 0..16), round id, purpose)

so an envelope moved to another round, another purpose or another key fails to open.
"""

from __future__ import annotations

import re

import structlog
from cryptography.exceptions import InvalidTag

from enclave_keys.crypto._common import (
    KEY_SIZE,
    NONCE_SIZE,
    TAG_SIZE,
    AeadKeyHolder,
    frame,
    random_bytes,
)
from enclave_keys.crypto.secret import Entropy, SecretBytes
from enclave_keys.errors import InvalidIdentifier, UnwrapFailed
from enclave_keys.ids import KeyId, RoundId

__all__ = ["ENVELOPE_OVERHEAD", "ENVELOPE_VERSION", "RoundCipher", "validate_purpose"]

_log = structlog.get_logger(__name__)

ENVELOPE_VERSION = 0x01
_HEADER_SIZE = 1 + KeyId.SIZE
_BODY_START = _HEADER_SIZE + NONCE_SIZE
ENVELOPE_OVERHEAD = _BODY_START + TAG_SIZE
_DOMAIN = b"enclave_keys/round-data/v1"
_PURPOSE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/\-]{0,63}")


def validate_purpose(purpose: str) -> bytes:
    """The purpose's ASCII bytes: 1-64 of ``[A-Za-z0-9._:/-]``, starting alphanumeric."""
    if not isinstance(purpose, str) or _PURPOSE.fullmatch(purpose) is None:
        raise InvalidIdentifier(
            "purpose must be 1-64 characters of [A-Za-z0-9._:/-], starting alphanumeric"
        )
    return purpose.encode("ascii")


class RoundCipher(AeadKeyHolder):
    """Seals and opens one round's data under that round's 32-byte key.

    Owns its key: :meth:`wipe` (or leaving a ``with`` block) zeroes it, after which every
    operation raises :class:`SecretWiped`. Nonces are made inside, never passed in.
    Safe to share between threads; an operation that races a wipe may still complete.
    """

    __slots__ = ("_aad_prefix", "_header", "_key_id", "_round_id")

    KIND = "round key"

    def __init__(
        self, round_id: RoundId, key_id: KeyId, key: SecretBytes, *, entropy: Entropy | None = None
    ) -> None:
        """Take ownership of ``key`` (wiped even if construction fails).

        ``entropy`` makes nonces deterministic: FOR SIMULATIONS ONLY.
        """
        if not isinstance(round_id, RoundId) or not isinstance(key_id, KeyId):
            if isinstance(key, SecretBytes):
                key.wipe()
            raise TypeError("RoundCipher needs a RoundId and a KeyId")
        super().__init__(key, entropy)
        self._round_id = round_id
        self._key_id = key_id
        self._header = bytes([ENVELOPE_VERSION]) + key_id.raw
        self._aad_prefix = frame(_DOMAIN, self._header, round_id.to_bytes())

    @classmethod
    def generate(cls, round_id: RoundId, *, entropy: Entropy | None = None) -> RoundCipher:
        """A cipher with a fresh random key and a fresh random key id."""
        key = SecretBytes.random(KEY_SIZE, entropy)  # first: a seeded run draws in this order
        try:
            key_id = KeyId(random_bytes(KeyId.SIZE, entropy))
            cipher = cls(round_id, key_id, key, entropy=entropy)
        except BaseException:
            key.wipe()
            raise
        _log.debug("round_key_generated", round_id=str(round_id), key_id=key_id.hex())
        return cipher

    @property
    def round_id(self) -> RoundId:
        return self._round_id

    @property
    def key_id(self) -> KeyId:
        return self._key_id

    def seal(self, purpose: str, plaintext: bytes | bytearray | memoryview) -> bytes:
        """Encrypt ``plaintext`` for ``purpose`` into a new envelope."""
        aad = self._aad_prefix + frame(validate_purpose(purpose))
        aead = self._live_aead()
        nonce = self._nonce()
        return self._header + nonce + aead.encrypt(nonce, plaintext, aad)

    def open(self, purpose: str, envelope: bytes | bytearray | memoryview) -> bytes:
        """Decrypt an envelope sealed by this round key for ``purpose``.

        Raises :class:`UnwrapFailed` for every kind of bad input, without saying which;
        :class:`SecretWiped` after :meth:`wipe`.
        """
        aad = self._aad_prefix + frame(validate_purpose(purpose))
        aead = self._live_aead()
        with memoryview(envelope) as raw, raw.cast("B") as data:
            if len(data) < ENVELOPE_OVERHEAD or data[:_HEADER_SIZE] != self._header:
                raise UnwrapFailed("round-data envelope")
            try:
                return aead.decrypt(data[_HEADER_SIZE:_BODY_START], data[_BODY_START:], aad)
            except InvalidTag:
                raise UnwrapFailed("round-data envelope") from None

    def wipe(self) -> None:
        """Zero the key and drop the AESGCM object. Idempotent."""
        was_wiped = self.is_wiped
        super().wipe()
        if not was_wiped:
            _log.debug(
                "round_cipher_wiped", round_id=str(self._round_id), key_id=self._key_id.hex()
            )

    def __repr__(self) -> str:
        state = "wiped" if self.is_wiped else "live"
        return (
            f"RoundCipher(round_id={self._round_id.value!r}, "
            f"key_id={self._key_id.hex()!r}, {state})"
        )
