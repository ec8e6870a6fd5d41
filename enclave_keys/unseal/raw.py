"""Raw-key unseal: the caller already holds the 32-byte root key.

For tests, simulations and applications that keep the secret in their own secret store.
``enrol()`` uses a copy of the caller's key as the root and records a verifier of it
(``unseal.raw.verifier``: a :class:`~enclave_keys.crypto.verifier.RootVerifier`), so a
different key is refused by :meth:`KeyUnseal.unlock_root` before anything is decrypted.
"""

from __future__ import annotations

from typing import Final

from enclave_keys.crypto import SecretBytes
from enclave_keys.crypto.verifier import RootVerifier
from enclave_keys.errors import InvalidKeyMaterial, WrongPassphrase
from enclave_keys.store import Store
from enclave_keys.unseal.api import (
    ROOT_KEY_SIZE,
    Enrolment,
    check_method,
    read_record,
)

__all__ = ["RAW_VERIFIER_RECORD", "KeyUnseal"]

RAW_VERIFIER_RECORD: Final = "unseal.raw.verifier"
_PURPOSE: Final = b"unseal/raw"


class KeyUnseal:
    """Use a 32-byte key the caller holds as the root key.

    Every call returns a fresh copy in locked memory which the receiver wipes; the caller
    keeps, and eventually wipes, ``master``.
    """

    __slots__ = ("_master",)

    method: Final = "raw"
    RECORDS: Final = (RAW_VERIFIER_RECORD,)

    def __init__(self, master: SecretBytes) -> None:
        if not isinstance(master, SecretBytes):
            raise TypeError("KeyUnseal needs the key as SecretBytes")
        self._master = master

    def _copy(self) -> SecretBytes:
        if len(self._master) != ROOT_KEY_SIZE:
            raise InvalidKeyMaterial(
                f"a root key must be {ROOT_KEY_SIZE} bytes, not {len(self._master)}"
            )
        with self._master.borrow() as view:
            return SecretBytes.from_buffer(view, wipe_source=False)

    def enrol(self) -> Enrolment:
        root = self._copy()
        try:
            verifier = RootVerifier.create(root, _PURPOSE)
        except BaseException:
            root.wipe()
            raise
        return Enrolment(root, {RAW_VERIFIER_RECORD: verifier.to_bytes()})

    def unlock_root(self, store: Store) -> SecretBytes:
        check_method(store, self.method)
        verifier = RootVerifier.from_bytes(read_record(store, RAW_VERIFIER_RECORD, self.method))
        root = self._copy()
        if not verifier.matches(root, _PURPOSE):
            root.wipe()
            raise WrongPassphrase("the key does not match the one this node was initialised with")
        return root

    def __repr__(self) -> str:
        return "KeyUnseal(<master key hidden>)"
