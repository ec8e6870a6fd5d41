"""The two key wraps: a round key under a storage epoch key, an epoch key under a KEK.

Both blobs are fixed-size, so they can be found in raw bytes (``docs/storage-format.md``).

A **wrapped round key** is ``WRAPPED_KEY_SIZE`` = 85 bytes::

    offset  size  field
    0       1     version, 0x02
    1       8     storage epoch number, big-endian
    9       16    key id of the round key
    25      12    nonce, random per wrap
    37      32    AES-256-GCM encryption of the 32-byte round key
    69      16    GCM tag

    AAD = frame(b"enclave_keys/round-key-wrap/v2", header (bytes 0..24), round id)

A **wrapped epoch key** is ``WRAPPED_EPOCH_SIZE`` = 73 bytes::

    offset  size  field
    0       1     version, 0x01
    1       4     KEK version, big-endian
    5       8     storage epoch number, big-endian
    13      12    nonce, random per wrap
    25      32    AES-256-GCM encryption of the 32-byte epoch key
    57      16    GCM tag

    AAD = frame(b"enclave_keys/epoch-key-wrap/v1", header (bytes 0..12))

(each AAD field is a 2-byte big-endian length, then the bytes), so a blob only unwraps
under the key it names, and a round key only for the round it was made for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Final, TypeVar

import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from enclave_keys.crypto._common import (
    KEY_SIZE,
    NONCE_SIZE,
    TAG_SIZE,
    AeadKeyHolder,
    frame,
    random_bytes,
)
from enclave_keys.crypto.aead import RoundCipher
from enclave_keys.crypto.epoch import EpochKey
from enclave_keys.crypto.keyring import Kek
from enclave_keys.crypto.secret import Entropy, SecretBytes
from enclave_keys.errors import InvalidIdentifier, UnwrapFailed
from enclave_keys.ids import EpochNumber, KekVersion, KeyId, RoundId

__all__ = [
    "WRAPPED_EPOCH_SIZE",
    "WRAPPED_EPOCH_VERSION",
    "WRAPPED_KEY_SIZE",
    "WRAPPED_KEY_VERSION",
    "read_epoch_header",
    "read_wrapped_header",
    "rewrap_round_keys",
    "unwrap_epoch_key",
    "unwrap_round_key",
    "wrap_epoch_key",
    "wrap_round_key",
]

_log = structlog.get_logger(__name__)

_T = TypeVar("_T")

WRAPPED_KEY_VERSION: Final = 0x02
_KEY_HEADER: Final = 1 + 8 + KeyId.SIZE
_KEY_BODY: Final = _KEY_HEADER + NONCE_SIZE
WRAPPED_KEY_SIZE: Final = _KEY_HEADER + NONCE_SIZE + KEY_SIZE + TAG_SIZE
_KEY_DOMAIN: Final = b"enclave_keys/round-key-wrap/v2"
# frame(_KEY_DOMAIN, header, round id) starts with these bytes (the header is always
# _KEY_HEADER long): built once, so a key's AAD is one concatenation (see _key_aad).
_KEY_AAD_HEAD: Final = frame(_KEY_DOMAIN) + _KEY_HEADER.to_bytes(2, "big")

WRAPPED_EPOCH_VERSION: Final = 0x01
_EPOCH_HEADER: Final = 1 + 4 + 8
WRAPPED_EPOCH_SIZE: Final = _EPOCH_HEADER + NONCE_SIZE + KEY_SIZE + TAG_SIZE
_EPOCH_DOMAIN: Final = b"enclave_keys/epoch-key-wrap/v1"


# --- the common shape: header | nonce | sealed 32-byte key ----------------------------------


def _seal_key(holder: AeadKeyHolder, header: bytes, aad: bytes, key: AeadKeyHolder) -> bytes:
    aead = holder._live_aead()
    nonce = holder._nonce()
    with key._borrow_key() as raw:
        sealed = aead.encrypt(nonce, raw, aad)
    return header + nonce + sealed


def _open_key(aead: AESGCM, blob: bytes, header_size: int, aad: bytes) -> SecretBytes:
    """Decrypt the key in ``blob`` straight into key memory (``InvalidTag`` on failure)."""
    nonce = blob[header_size : header_size + NONCE_SIZE]
    sealed = blob[header_size + NONCE_SIZE :]

    def decrypt(buffer: memoryview) -> None:
        aead.decrypt_into(nonce, sealed, aad, buffer)

    return SecretBytes._filled_by(KEY_SIZE, decrypt)


def _check_blob(blob: object, size: int, version: int, what: str) -> bytes:
    if not isinstance(blob, bytes) or len(blob) != size or blob[0] != version:
        raise UnwrapFailed(what)
    return blob


def _parse(parse: Callable[[bytes], _T], raw: bytes, what: str) -> _T:
    try:
        return parse(raw)
    except InvalidIdentifier:
        raise UnwrapFailed(what) from None


# --- round key under epoch key ----------------------------------------------------------------


def _round_field(round_id: RoundId) -> bytes:
    """The round id as the last AAD field of a wrapped round key."""
    return _round_field_of(round_id.to_bytes())


def _round_field_of(raw: bytes) -> bytes:
    """A round id's bytes as that field (a round id is at most 128 bytes, so its length
    always fits the 2-byte prefix)."""
    return len(raw).to_bytes(2, "big") + raw


def _key_aad(header: bytes, round_field: bytes) -> bytes:
    """``frame(_KEY_DOMAIN, header, round id)`` for a ``_KEY_HEADER``-byte header."""
    return _KEY_AAD_HEAD + header + round_field


def wrap_round_key(epoch: EpochKey, cipher: RoundCipher) -> bytes:
    """Encrypt ``cipher``'s key under ``epoch``, bound to its round id and key id."""
    header = bytes([WRAPPED_KEY_VERSION]) + epoch.number.to_bytes() + cipher.key_id.raw
    aad = _key_aad(header, _round_field(cipher.round_id))
    return _seal_key(epoch, header, aad, cipher)


def read_wrapped_header(blob: bytes) -> tuple[EpochNumber, KeyId]:
    """The epoch and key id a wrapped round key names, read without decrypting."""
    blob = _check_blob(blob, WRAPPED_KEY_SIZE, WRAPPED_KEY_VERSION, "wrapped round key")
    number = _parse(EpochNumber.from_bytes, blob[1:9], "wrapped round key")
    return number, KeyId(blob[9:_KEY_HEADER])


def unwrap_round_key(
    epoch: EpochKey, round_id: RoundId, blob: bytes, *, entropy: Entropy | None = None
) -> RoundCipher:
    """Decrypt a wrapped round key straight into key memory and return its cipher.

    Raises :class:`UnwrapFailed` for a malformed or tampered blob, one naming another
    epoch than ``epoch``, or one made for another round. ``entropy``: simulations only.
    """
    aead = epoch._live_aead()
    blob = _check_blob(blob, WRAPPED_KEY_SIZE, WRAPPED_KEY_VERSION, "wrapped round key")
    # The epoch field must be ``epoch``'s number: comparing the 8 bytes is the whole
    # header check (a valid number is never 0), without parsing them into a number.
    if blob[1:9] != epoch.number.to_bytes():
        raise UnwrapFailed("wrapped round key")
    aad = _key_aad(blob[:_KEY_HEADER], _round_field(round_id))
    try:
        key = _open_key(aead, blob, _KEY_HEADER, aad)
    except InvalidTag:
        _log.warning("round_key_unwrap_failed", round_id=str(round_id), epoch=epoch.number.number)
        raise UnwrapFailed("wrapped round key") from None
    return RoundCipher(round_id, KeyId(blob[9:_KEY_HEADER]), key, entropy=entropy)


def rewrap_round_keys(
    old: EpochKey, new: EpochKey, blobs: Iterable[tuple[bytes, bytes]]
) -> list[tuple[bytes, bytes | None]]:
    """Each ``(round id bytes, blob)`` under ``old`` rewrapped under ``new`` — ``None``
    for a blob that does not open under ``old`` (another epoch, tampered, malformed).

    The epoch ratchet's inner loop: every key passes through ONE locked scratch buffer
    (wiped at the end), with no cipher object built per key, so a ratchet over 100,000
    live keys costs little more than the AES-GCM work itself. Round ids come as the
    bytes a store record holds (``Store.list_key_records``), which is what the wrap's
    associated data binds: no ``RoundId`` is built per key either.
    """
    old_aead, new_aead = old._live_aead(), new._live_aead()
    old_prefix = bytes([WRAPPED_KEY_VERSION]) + old.number.to_bytes()
    new_prefix = bytes([WRAPPED_KEY_VERSION]) + new.number.to_bytes()
    items = list(blobs)
    nonces = random_bytes(NONCE_SIZE * len(items), new._entropy) if items else b""
    out: list[tuple[bytes, bytes | None]] = []

    def run(key: memoryview) -> None:
        decrypt_into, encrypt, append = old_aead.decrypt_into, new_aead.encrypt, out.append
        for index, (round_id, blob) in enumerate(items):
            if not isinstance(blob, bytes) or len(blob) != WRAPPED_KEY_SIZE:
                append((round_id, None))
                continue
            if blob[:9] != old_prefix:
                append((round_id, None))
                continue
            round_field = _round_field_of(round_id)
            try:
                decrypt_into(
                    blob[_KEY_HEADER:_KEY_BODY],
                    blob[_KEY_BODY:],
                    _key_aad(blob[:_KEY_HEADER], round_field),
                    key,
                )
            except InvalidTag:
                key[:] = bytes(KEY_SIZE)
                append((round_id, None))
                continue
            header = new_prefix + blob[9:_KEY_HEADER]
            fresh = nonces[index * NONCE_SIZE : (index + 1) * NONCE_SIZE]
            append((round_id, header + fresh + encrypt(fresh, key, _key_aad(header, round_field))))

    with SecretBytes._filled_by(KEY_SIZE, run):
        pass
    return out


# --- epoch key under KEK ---------------------------------------------------------------------


def wrap_epoch_key(kek: Kek, epoch: EpochKey) -> bytes:
    """Encrypt ``epoch``'s key under ``kek``, bound to the KEK version and epoch number."""
    header = bytes([WRAPPED_EPOCH_VERSION]) + kek.version.to_bytes() + epoch.number.to_bytes()
    return _seal_key(kek, header, frame(_EPOCH_DOMAIN, header), epoch)


def read_epoch_header(blob: bytes) -> tuple[KekVersion, EpochNumber]:
    """The KEK version and epoch number a wrapped epoch key names, without decrypting."""
    blob = _check_blob(blob, WRAPPED_EPOCH_SIZE, WRAPPED_EPOCH_VERSION, "wrapped epoch key")
    _parse(KekVersion.from_bytes, blob[1:5], "wrapped epoch key")
    _parse(EpochNumber.from_bytes, blob[5:13], "wrapped epoch key")
    return KekVersion.from_bytes(blob[1:5]), EpochNumber.from_bytes(blob[5:13])


def unwrap_epoch_key(kek: Kek, blob: bytes, *, entropy: Entropy | None = None) -> EpochKey:
    """Decrypt a wrapped epoch key into key memory (:class:`UnwrapFailed` if it does not
    open under ``kek``). ``entropy``: simulations only."""
    aead = kek._live_aead()
    version, number = read_epoch_header(blob)
    if version != kek.version:
        raise UnwrapFailed("wrapped epoch key")
    try:
        key = _open_key(aead, blob, _EPOCH_HEADER, frame(_EPOCH_DOMAIN, blob[:_EPOCH_HEADER]))
    except InvalidTag:
        _log.warning("epoch_key_unwrap_failed", epoch=number.number, kek_version=version.number)
        raise UnwrapFailed("wrapped epoch key") from None
    return EpochKey(number, key, entropy=entropy)
