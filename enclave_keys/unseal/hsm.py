"""HSM seal with auto-unseal over PKCS#11 (``python-pkcs11``; tested against SoftHSM2).

The root key is a random 32-byte key encrypted *inside the token* with an AES-256 key that
never leaves it (``CKA_SENSITIVE``, not ``CKA_EXTRACTABLE``, usable only to encrypt and
decrypt, ``CKA_PRIVATE`` so only a logged-in user can use it). At every start the node
logs in with the PIN and has the token decrypt the sealed root: no operator is needed.

Mechanism: ``CKM_AES_GCM`` with a fresh random 96-bit IV and a 128-bit tag, the associated
data binding the record header (version, mechanism, IV, key label). A token without
``CKM_AES_GCM`` is refused at enrolment with :class:`~enclave_keys.errors.HsmError`; the
mechanism byte leaves room for AES key wrap with padding (RFC 5649) should a token need it.

Record ``unseal.pkcs11.sealed_root``, version 1 (integers big-endian)::

    offset     size  field
    0          1     version, 0x01
    1          1     mechanism, 0x01 = CKM_AES_GCM (128-bit tag)
    2          1     IV length n (12)
    3          n     IV
    3+n        1     key label length L (1..255)
    4+n        L     key label, UTF-8
    4+n+L      1     ciphertext length C (48)
    5+n+L      C     AES-GCM(root key) || tag
    AAD = frame(b"enclave_keys/pkcs11-root/v1", bytes 0 .. 4+n+L)

Errors: a module that does not load, a missing token, a refused PIN, a missing or unfit key,
a token that cannot decrypt the record — all :class:`~enclave_keys.errors.HsmError` with a
message naming the module, token and key labels (never the PIN). A record that does not
decode is :class:`~enclave_keys.errors.CorruptRecord`.

PKCS#11 is initialised once per process by the module (``C_Initialize``). This source
initialises the module for each operation and finalises it afterwards (so a token's state,
and SoftHSM2's ``SOFTHSM2_CONF``, are read afresh), serialised by a process-wide lock; the
module is never unloaded (SoftHSM2 does not survive being ``dlclose``-d and loaded again).
Do not drive the same PKCS#11 module from elsewhere in the process.

Memory: python-pkcs11 takes and returns immutable ``bytes``; the copy of the root key
passed to the token at enrolment and the decrypted copy it returns cannot be wiped (the
latter is copied into :class:`SecretBytes` at once). The PIN ``str`` cannot be wiped either.
"""

from __future__ import annotations

import glob
import os
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import structlog

from enclave_keys.crypto import SecretBytes
from enclave_keys.errors import CorruptRecord, HsmError, UnsealMismatch
from enclave_keys.store import Store
from enclave_keys.unseal.api import (
    ROOT_KEY_SIZE,
    Enrolment,
    check_method,
    read_record,
)

if TYPE_CHECKING:
    from pkcs11 import Session
    from pkcs11._pkcs11 import lib as Pkcs11Lib  # noqa: N812 (a class, lower-case upstream)
    from pkcs11.types import Key

__all__ = [
    "DEFAULT_KEY_LABEL",
    "SEALED_ROOT_RECORD",
    "SOFTHSM_MODULE_CANDIDATES",
    "HsmUnseal",
    "SealedRoot",
    "find_softhsm_module",
]

_log = structlog.get_logger(__name__)

SEALED_ROOT_RECORD: Final = "unseal.pkcs11.sealed_root"
DEFAULT_KEY_LABEL: Final = "enclave-keys-root-wrap"
_RECORD_VERSION: Final = 0x01
MECHANISM_AES_GCM: Final = 0x01
_IV_SIZE: Final = 12
_TAG_BITS: Final = 128
_SEALED_SIZE: Final = ROOT_KEY_SIZE + _TAG_BITS // 8
_DOMAIN: Final = b"enclave_keys/pkcs11-root/v1"

SOFTHSM_MODULE_CANDIDATES: Final = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/lib64/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/opt/homebrew/lib/softhsm/libsofthsm2.so",
)


def find_softhsm_module() -> str | None:
    """The SoftHSM2 PKCS#11 module on this machine, or ``None`` (Debian: ``softhsm2``).

    ``SOFTHSM2_MODULE`` in the environment wins; then the usual install locations.
    """
    override = os.environ.get("SOFTHSM2_MODULE")
    if override:
        return override if os.path.isfile(override) else None
    for path in SOFTHSM_MODULE_CANDIDATES:
        if os.path.isfile(path):
            return path
    found = sorted(glob.glob("/usr/lib/*/softhsm/libsofthsm2.so"))
    return found[0] if found else None


# --- the record ---------------------------------------------------------------------------


def _frame(*fields: bytes) -> bytes:
    """Each field as a 2-byte big-endian length, then its bytes (as crypto's AAD framing)."""
    return b"".join(len(f).to_bytes(2, "big") + f for f in fields)


@dataclass(frozen=True, slots=True)
class SealedRoot:
    """The root key as sealed by the token: mechanism, IV, key label, ciphertext."""

    mechanism: int
    iv: bytes
    key_label: str
    ciphertext: bytes

    def __post_init__(self) -> None:
        if self.mechanism != MECHANISM_AES_GCM:
            raise CorruptRecord(f"sealed-root mechanism {self.mechanism} is not supported")
        if len(self.iv) != _IV_SIZE:
            raise CorruptRecord(f"sealed-root IV must be {_IV_SIZE} bytes")
        label = self.key_label.encode("utf-8")
        if not 1 <= len(label) <= 255:
            raise CorruptRecord("sealed-root key label must be 1 to 255 UTF-8 bytes")
        if len(self.ciphertext) != _SEALED_SIZE:
            raise CorruptRecord(f"sealed-root ciphertext must be {_SEALED_SIZE} bytes")

    def header(self) -> bytes:
        label = self.key_label.encode("utf-8")
        return (
            bytes([_RECORD_VERSION, self.mechanism, len(self.iv)])
            + self.iv
            + bytes([len(label)])
            + label
        )

    def aad(self) -> bytes:
        return _frame(_DOMAIN, self.header())

    def to_bytes(self) -> bytes:
        return self.header() + bytes([len(self.ciphertext)]) + self.ciphertext

    @classmethod
    def from_bytes(cls, raw: bytes) -> SealedRoot:
        if not isinstance(raw, bytes):
            raise CorruptRecord("sealed-root record must be bytes")
        try:
            version, mechanism, iv_len = struct.unpack_from(">BBB", raw, 0)
            if version != _RECORD_VERSION:
                raise CorruptRecord(f"sealed-root record version {version} is not supported")
            at = 3
            iv = raw[at : at + iv_len]
            at += iv_len
            (label_len,) = struct.unpack_from(">B", raw, at)
            at += 1
            label_bytes = raw[at : at + label_len]
            at += label_len
            (ct_len,) = struct.unpack_from(">B", raw, at)
            at += 1
            ciphertext = raw[at : at + ct_len]
        except struct.error:
            raise CorruptRecord("sealed-root record is truncated") from None
        if len(iv) != iv_len or len(label_bytes) != label_len or at + ct_len != len(raw):
            raise CorruptRecord("sealed-root record has the wrong length")
        try:
            label = label_bytes.decode("utf-8")
        except UnicodeDecodeError:
            raise CorruptRecord("sealed-root key label is not UTF-8") from None
        return cls(mechanism=mechanism, iv=iv, key_label=label, ciphertext=ciphertext)


# --- PKCS#11 sessions ---------------------------------------------------------------------

_PKCS11_LOCK = threading.Lock()


def _pkcs11_error_name(exc: BaseException) -> str:
    return type(exc).__name__


@contextmanager
def _session(module: str, token_label: str, pin: str, *, rw: bool) -> Iterator[Session]:
    """A logged-in session; the module is initialised for it and finalised afterwards."""
    try:
        import pkcs11
        from pkcs11 import exceptions as p11e
    except ImportError:
        raise HsmError(
            "python-pkcs11 is not installed: install enclave-keys with the 'hsm' extra"
        ) from None
    with _PKCS11_LOCK:
        failure: str | None = None
        try:
            lib = pkcs11.lib(module)  # cached by python-pkcs11; initialised if finalised
        except p11e.PKCS11Error as exc:
            failure = f"cannot load or initialise the PKCS#11 module {module!r} ({exc!r})"
        if failure is not None:
            raise HsmError(failure)
        try:
            session = _login(lib, module, token_label, pin, rw=rw)
            try:
                yield session
            finally:
                with suppress(p11e.PKCS11Error):
                    session.close()
        finally:
            with suppress(p11e.PKCS11Error):
                lib.finalize()


def _login(lib: Pkcs11Lib, module: str, token_label: str, pin: str, *, rw: bool) -> Session:
    from pkcs11 import exceptions as p11e

    failure: str | None = None
    try:
        token = lib.get_token(token_label=token_label)
    except p11e.NoSuchToken:
        failure = f"no token labelled {token_label!r} in the PKCS#11 module {module!r}"
    except p11e.MultipleTokensReturned:
        failure = f"more than one token is labelled {token_label!r} in {module!r}"
    except p11e.PKCS11Error as exc:
        failure = f"cannot list the tokens of {module!r}: {_pkcs11_error_name(exc)}"
    if failure is not None:
        raise HsmError(failure)
    try:
        return token.open(rw=rw, user_pin=pin)
    except (p11e.PinIncorrect, p11e.PinInvalid, p11e.PinLenRange):
        failure = f"the token {token_label!r} refused the PIN"
    except p11e.PinLocked:
        failure = f"the PIN of token {token_label!r} is locked"
    except p11e.PinExpired:
        failure = f"the PIN of token {token_label!r} has expired"
    except p11e.UserPinNotInitialized:
        failure = f"the token {token_label!r} has no user PIN set"
    except p11e.PKCS11Error as exc:
        failure = f"cannot log in to token {token_label!r}: {_pkcs11_error_name(exc)}"
    raise HsmError(failure)


def _find_key(session: Session, token_label: str, key_label: str) -> Key | None:
    from pkcs11 import KeyType, ObjectClass
    from pkcs11 import exceptions as p11e

    failure: str | None = None
    try:
        return session.get_key(
            object_class=ObjectClass.SECRET_KEY, key_type=KeyType.AES, label=key_label
        )
    except p11e.NoSuchKey:
        return None
    except p11e.MultipleObjectsReturned:
        failure = f"more than one AES key is labelled {key_label!r} in token {token_label!r}"
    except p11e.PKCS11Error as exc:
        failure = f"cannot search token {token_label!r} for keys: {_pkcs11_error_name(exc)}"
    raise HsmError(failure)


def _check_key(key: Key, token_label: str, key_label: str) -> None:
    """Refuse a key that is not AES-256, or that could leave the token, or cannot encrypt."""
    from pkcs11 import Attribute
    from pkcs11 import exceptions as p11e

    where = f"key {key_label!r} in token {token_label!r}"
    try:
        attrs = key.get_attributes(
            [
                Attribute.VALUE_LEN,
                Attribute.SENSITIVE,
                Attribute.EXTRACTABLE,
                Attribute.ENCRYPT,
                Attribute.DECRYPT,
            ]
        )
    except p11e.PKCS11Error as exc:
        raise HsmError(f"cannot read the attributes of {where}: {type(exc).__name__}") from None
    if attrs.get(Attribute.VALUE_LEN) != ROOT_KEY_SIZE:
        raise HsmError(f"{where} is not an AES-256 key")
    if not attrs.get(Attribute.SENSITIVE) or attrs.get(Attribute.EXTRACTABLE):
        raise HsmError(f"refusing {where}: it is extractable or not sensitive")
    if not (attrs.get(Attribute.ENCRYPT) and attrs.get(Attribute.DECRYPT)):
        raise HsmError(f"{where} is not allowed to encrypt and decrypt")


def _generate_key(session: Session, token_label: str, key_label: str) -> Key:
    from pkcs11 import Attribute, KeyType, MechanismFlag
    from pkcs11 import exceptions as p11e

    try:
        return session.generate_key(
            KeyType.AES,
            ROOT_KEY_SIZE * 8,
            label=key_label,
            store=True,
            capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
            template={
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                Attribute.PRIVATE: True,
                Attribute.MODIFIABLE: False,
            },
        )
    except p11e.PKCS11Error as exc:
        raise HsmError(
            f"cannot generate the AES-256 key {key_label!r} in token {token_label!r}:"
            f" {type(exc).__name__}"
        ) from None


# --- the source ---------------------------------------------------------------------------


class HsmUnseal:
    """Seal the root key under an AES key in a PKCS#11 token; unseal without an operator.

    ``module`` is the path of the PKCS#11 library (SoftHSM2:
    :func:`find_softhsm_module`), ``token_label`` the token's label, ``pin`` the user
    PIN, ``key_label`` the label of the AES-256 wrapping key (generated at first
    enrolment if the token has none).
    """

    __slots__ = ("_key_label", "_module", "_pin", "_token_label")

    method: Final = "pkcs11"
    RECORDS: Final = (SEALED_ROOT_RECORD,)

    def __init__(
        self, module: str, token_label: str, pin: str, key_label: str = DEFAULT_KEY_LABEL
    ) -> None:
        if not key_label or len(key_label.encode("utf-8")) > 255:
            raise HsmError("the key label must be 1 to 255 UTF-8 bytes")
        self._module = module
        self._token_label = token_label
        self._pin = pin
        self._key_label = key_label

    @property
    def key_label(self) -> str:
        return self._key_label

    def enrol(self) -> Enrolment:
        """A fresh random root key, sealed by the token (the key is made if missing)."""
        root = SecretBytes.random(ROOT_KEY_SIZE)
        try:
            return self.seal(root)
        finally:
            root.wipe()

    def seal(self, root: SecretBytes) -> Enrolment:
        """Seal a copy of ``root`` (e.g. the current root, to move it into the token)."""
        from pkcs11 import Mechanism
        from pkcs11 import exceptions as p11e
        from pkcs11.mechanisms import GCMParams
        from pkcs11.types import EncryptMixin

        if not isinstance(root, SecretBytes) or len(root) != ROOT_KEY_SIZE:
            raise HsmError(f"the root key must be {ROOT_KEY_SIZE} bytes of SecretBytes")
        iv = os.urandom(_IV_SIZE)
        header = SealedRoot(MECHANISM_AES_GCM, iv, self._key_label, bytes(_SEALED_SIZE))
        created = False
        with _session(self._module, self._token_label, self._pin, rw=True) as session:
            if Mechanism.AES_GCM not in session.token.slot.get_mechanisms():
                raise HsmError(f"the token {self._token_label!r} does not offer CKM_AES_GCM")
            key = _find_key(session, self._token_label, self._key_label)
            if key is None:
                key = _generate_key(session, self._token_label, self._key_label)
                created = True
            _check_key(key, self._token_label, self._key_label)
            if not isinstance(key, EncryptMixin):
                raise HsmError(f"the key {self._key_label!r} cannot encrypt")
            failure: str | None = None
            sealed: bytes | None = None
            with root.borrow() as view:
                plain = bytes(view)  # python-pkcs11 takes only bytes: this copy cannot be wiped
                try:
                    out = key.encrypt(
                        plain,
                        mechanism=Mechanism.AES_GCM,
                        mechanism_param=GCMParams(iv, header.aad(), _TAG_BITS),
                    )
                    sealed = out if isinstance(out, bytes) else None
                except p11e.PKCS11Error as exc:
                    failure = f"the token could not encrypt the root key: {type(exc).__name__}"
                del plain
            if failure is not None or sealed is None:
                raise HsmError(failure or "the token returned no ciphertext")
        record = SealedRoot(MECHANISM_AES_GCM, iv, self._key_label, sealed)
        _log.info(
            "pkcs11_root_sealed",
            token=self._token_label,
            key_label=self._key_label,
            key_created=created,
        )
        with root.borrow() as view:
            copy = SecretBytes.from_buffer(view, wipe_source=False)
        return Enrolment(copy, {SEALED_ROOT_RECORD: record.to_bytes()})

    def unlock_root(self, store: Store) -> SecretBytes:
        """Log in, have the token decrypt the sealed root, return it (caller wipes it)."""
        from pkcs11 import Mechanism
        from pkcs11 import exceptions as p11e
        from pkcs11.mechanisms import GCMParams
        from pkcs11.types import DecryptMixin

        check_method(store, self.method)
        record = SealedRoot.from_bytes(read_record(store, SEALED_ROOT_RECORD, self.method))
        if record.key_label != self._key_label:
            raise UnsealMismatch(
                f"the root key is sealed under the key {record.key_label!r},"
                f" but this source is configured with {self._key_label!r}"
            )
        plain: bytes | None = None
        failure: str | None = None
        with _session(self._module, self._token_label, self._pin, rw=False) as session:
            key = _find_key(session, self._token_label, self._key_label)
            if key is None:
                raise HsmError(
                    f"the token {self._token_label!r} has no AES key labelled"
                    f" {self._key_label!r}: the root key cannot be unsealed"
                )
            if not isinstance(key, DecryptMixin):
                raise HsmError(f"the key {self._key_label!r} cannot decrypt")
            try:
                out = key.decrypt(
                    record.ciphertext,
                    mechanism=Mechanism.AES_GCM,
                    mechanism_param=GCMParams(record.iv, record.aad(), _TAG_BITS),
                )
                plain = out if isinstance(out, bytes) else None
            except p11e.PKCS11Error:
                failure = (
                    f"the token's key {self._key_label!r} cannot decrypt the sealed root key"
                    " (another key with that label, or a damaged record)"
                )
        if failure is not None:
            raise HsmError(failure)
        if plain is None or len(plain) != ROOT_KEY_SIZE:
            raise HsmError("the token returned a root key of the wrong size")
        buffer = bytearray(plain)  # ``plain`` (from python-pkcs11) cannot be wiped
        del plain
        _log.info("pkcs11_root_unsealed", token=self._token_label, key_label=self._key_label)
        return SecretBytes.from_buffer(buffer)

    def __repr__(self) -> str:
        return (
            f"HsmUnseal(module={self._module!r}, token={self._token_label!r},"
            f" key_label={self._key_label!r}, <PIN hidden>)"
        )
