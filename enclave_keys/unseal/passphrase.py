"""Passphrase unseal: Argon2id with a per-node random salt and stored parameters.

The derivation and the record format are :mod:`enclave_keys.crypto.kdf`'s
(``docs/crypto.md``): the root key is derived from the passphrase, so ``enrol()`` makes
no random key; changing the passphrase (``MasterKeys.rekey_root``) gives a new root.

Record ``unseal.passphrase.kdf``: a :class:`~enclave_keys.crypto.PassphraseRecord`
(version, Argon2id parameters, salt, 32-byte verifier).
"""

from __future__ import annotations

from typing import Final

from enclave_keys.crypto import (
    KdfParams,
    PassphraseRecord,
    SecretBytes,
    enroll_passphrase,
    unlock_passphrase,
)
from enclave_keys.store import Store
from enclave_keys.unseal.api import (
    Enrolment,
    check_method,
    read_record,
)

__all__ = ["PASSPHRASE_RECORD", "PassphraseUnseal"]

PASSPHRASE_RECORD: Final = "unseal.passphrase.kdf"  # noqa: S105 (a record name)


class PassphraseUnseal:
    """Derive the root key from a passphrase (Argon2id, then HKDF).

    A wrong passphrase raises :class:`~enclave_keys.errors.WrongPassphrase` (checked
    against the stored verifier) before anything is decrypted; an empty, NUL-containing or
    over-long one raises :class:`~enclave_keys.errors.InvalidPassphrase` before any
    derivation. The passphrase ``str`` cannot be wiped (Python strings are immutable): keep
    the source's lifetime short.
    """

    __slots__ = ("_params", "_passphrase")

    method: Final = "passphrase"
    RECORDS: Final = (PASSPHRASE_RECORD,)

    def __init__(self, passphrase: str, params: KdfParams | None = None) -> None:
        self._passphrase = passphrase
        self._params = params

    def enrol(self) -> Enrolment:
        """Derive a root key under fresh parameters (``params``, or a new random salt)."""
        record, root = enroll_passphrase(self._passphrase, self._params)
        return Enrolment(root, {PASSPHRASE_RECORD: record.to_bytes()})

    def unlock_root(self, store: Store) -> SecretBytes:
        check_method(store, self.method)
        raw = read_record(store, PASSPHRASE_RECORD, self.method)
        return unlock_passphrase(self._passphrase, PassphraseRecord.from_bytes(raw))

    def __repr__(self) -> str:
        return "PassphraseUnseal(<passphrase hidden>)"
