"""Passphrase unsealing: Argon2id with stored, floor-checked parameters.

``enroll_passphrase`` makes a :class:`PassphraseRecord` (parameters + verifier, safe to
store) and the 32-byte root key; ``unlock_passphrase`` re-derives the root key from the
passphrase and the record, checking the verifier first. The derivation::

    master   = Argon2id(NFC(passphrase) as UTF-8, salt, m, t, p, ad=_ARGON2_AD) -> 32 bytes
    root key = HKDF-Expand-SHA256(master, info=_ROOT_INFO, 32)
    verifier = HKDF-Expand-SHA256(master, info=_VERIFIER_INFO, 32)

Record layout, version 1 (all integers big-endian)::

    offset  size  field
    0       1     version, 0x01
    1       4     memory_kib
    5       4     iterations
    9       4     lanes
    13      1     salt length s (16..64)
    14      s     salt
    14+s    32    verifier
"""

from __future__ import annotations

import hmac
import struct
import unicodedata
from dataclasses import dataclass
from typing import ClassVar

import structlog
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from enclave_keys.crypto._common import random_bytes
from enclave_keys.crypto.secret import Entropy, SecretBytes
from enclave_keys.errors import CorruptRecord, InvalidPassphrase, WeakKdfParameters, WrongPassphrase

__all__ = ["KdfParams", "PassphraseRecord", "enroll_passphrase", "unlock_passphrase"]

_log = structlog.get_logger(__name__)

_KEY_SIZE = 32
_ARGON2_AD = b"enclave_keys/passphrase/v1"
_ROOT_INFO = b"enclave_keys/passphrase/root-key/v1"
_VERIFIER_INFO = b"enclave_keys/passphrase/verifier/v1"
_MAX_PASSPHRASE_BYTES = 1024
_RECORD_VERSION = 0x01
_RECORD_HEAD = struct.Struct(">BIIIB")


def _check_range(name: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise WeakKdfParameters(f"{name} must be an integer from {low} to {high}")


@dataclass(frozen=True, slots=True)
class KdfParams:
    """Argon2id parameters and salt. The floor (and a ceiling) is enforced on construction."""

    salt: bytes
    memory_kib: int
    iterations: int
    lanes: int

    MIN_MEMORY_KIB: ClassVar[int] = 19_456
    MAX_MEMORY_KIB: ClassVar[int] = 4 * 1024 * 1024
    MIN_ITERATIONS: ClassVar[int] = 2
    MAX_ITERATIONS: ClassVar[int] = 32
    MIN_LANES: ClassVar[int] = 1
    MAX_LANES: ClassVar[int] = 64
    MIN_SALT: ClassVar[int] = 16
    MAX_SALT: ClassVar[int] = 64

    def __post_init__(self) -> None:
        if not isinstance(self.salt, bytes) or not (
            self.MIN_SALT <= len(self.salt) <= self.MAX_SALT
        ):
            raise WeakKdfParameters(f"salt must be {self.MIN_SALT} to {self.MAX_SALT} bytes")
        _check_range("memory_kib", self.memory_kib, self.MIN_MEMORY_KIB, self.MAX_MEMORY_KIB)
        _check_range("iterations", self.iterations, self.MIN_ITERATIONS, self.MAX_ITERATIONS)
        _check_range("lanes", self.lanes, self.MIN_LANES, self.MAX_LANES)

    @classmethod
    def generate(
        cls,
        *,
        memory_kib: int = 65_536,
        iterations: int = 3,
        lanes: int = 4,
        entropy: Entropy | None = None,
    ) -> KdfParams:
        """Fresh 16-byte random salt; defaults are RFC 9106's second recommendation.

        ``entropy`` makes the salt deterministic: FOR SIMULATIONS ONLY.
        """
        salt = random_bytes(16, entropy)
        return cls(salt=salt, memory_kib=memory_kib, iterations=iterations, lanes=lanes)


@dataclass(frozen=True, slots=True)
class PassphraseRecord:
    """What is stored for a passphrase: the KDF parameters and a 32-byte verifier."""

    params: KdfParams
    verifier: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.verifier, bytes) or len(self.verifier) != _KEY_SIZE:
            raise CorruptRecord(f"passphrase verifier must be {_KEY_SIZE} bytes")

    def to_bytes(self) -> bytes:
        p = self.params
        head = _RECORD_HEAD.pack(_RECORD_VERSION, p.memory_kib, p.iterations, p.lanes, len(p.salt))
        return head + p.salt + self.verifier

    @classmethod
    def from_bytes(cls, raw: bytes) -> PassphraseRecord:
        """Decode a record: bad layout -> CorruptRecord; below-floor params -> WeakKdfParameters."""
        if not isinstance(raw, bytes) or len(raw) < _RECORD_HEAD.size:
            raise CorruptRecord("passphrase record is truncated")
        version, memory_kib, iterations, lanes, salt_len = _RECORD_HEAD.unpack_from(raw)
        if version != _RECORD_VERSION:
            raise CorruptRecord(f"passphrase record version {version} is not supported")
        if len(raw) != _RECORD_HEAD.size + salt_len + _KEY_SIZE:
            raise CorruptRecord("passphrase record has the wrong length")
        salt = raw[_RECORD_HEAD.size : _RECORD_HEAD.size + salt_len]
        params = KdfParams(salt=salt, memory_kib=memory_kib, iterations=iterations, lanes=lanes)
        return cls(params=params, verifier=raw[-_KEY_SIZE:])


def _encode_passphrase(passphrase: str) -> bytes:
    """NFC-normalised UTF-8, validated. (The str and these bytes cannot be wiped.)"""
    if not isinstance(passphrase, str):
        raise InvalidPassphrase("passphrase must be a str")
    text = unicodedata.normalize("NFC", passphrase)
    if not text:
        raise InvalidPassphrase("passphrase is empty")
    if "\x00" in text:
        raise InvalidPassphrase("passphrase contains a NUL character")
    try:
        encoded = text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidPassphrase("passphrase is not valid Unicode text") from None
    if len(encoded) > _MAX_PASSPHRASE_BYTES:
        raise InvalidPassphrase(f"passphrase is longer than {_MAX_PASSPHRASE_BYTES} UTF-8 bytes")
    return encoded


def _master_key(passphrase: str, params: KdfParams) -> SecretBytes:
    encoded = _encode_passphrase(passphrase)
    argon = Argon2id(
        salt=params.salt,
        length=_KEY_SIZE,
        iterations=params.iterations,
        lanes=params.lanes,
        memory_cost=params.memory_kib,
        ad=_ARGON2_AD,
    )
    return SecretBytes._filled_by(_KEY_SIZE, lambda out: argon.derive_into(encoded, out))


def _expand(master: SecretBytes, info: bytes) -> SecretBytes:
    expand = HKDFExpand(algorithm=hashes.SHA256(), length=_KEY_SIZE, info=info)
    with master.borrow() as prk:
        return SecretBytes._filled_by(_KEY_SIZE, lambda out: expand.derive_into(prk, out))


def _verifier(master: SecretBytes) -> bytes:
    with _expand(master, _VERIFIER_INFO) as verifier, verifier.borrow() as view:
        return bytes(view)


def enroll_passphrase(
    passphrase: str, params: KdfParams | None = None
) -> tuple[PassphraseRecord, SecretBytes]:
    """Derive a root key from a new passphrase; return the record to store and the key."""
    params = params if params is not None else KdfParams.generate()
    with _master_key(passphrase, params) as master:
        record = PassphraseRecord(params=params, verifier=_verifier(master))
        root = _expand(master, _ROOT_INFO)
    _log.info(
        "passphrase_enrolled",
        memory_kib=params.memory_kib,
        iterations=params.iterations,
        lanes=params.lanes,
    )
    return record, root


def unlock_passphrase(passphrase: str, record: PassphraseRecord) -> SecretBytes:
    """Re-derive the root key; :class:`WrongPassphrase` if the verifier does not match."""
    with _master_key(passphrase, record.params) as master:
        if not hmac.compare_digest(_verifier(master), record.verifier):
            _log.warning("passphrase_rejected")
            raise WrongPassphrase("the passphrase does not match the stored verifier")
        return _expand(master, _ROOT_INFO)
