"""Unseal sources: how a node obtains its key-encryption key (KEK) at start.

This is the first step of the hierarchy in design §5: a source turns an operator secret
into the node's KEK. Two sources exist today:

* :class:`PassphraseUnseal` — Argon2id over a passphrase, with a per-node random salt and
  stored parameters (the record lives in the store's metadata; the first start enrols);
* :class:`KeyUnseal` — a master key the caller already holds (tests, simulations, embedding
  applications that manage the secret themselves).

The versioned keyring of KEKs (active / decrypt-only / retired), the Shamir ceremony and
the HSM seal build on this interface.
"""

from __future__ import annotations

from typing import Protocol

from enclave_keys.crypto import (
    KdfParams,
    Kek,
    PassphraseRecord,
    SecretBytes,
    enroll_passphrase,
)
from enclave_keys.crypto import unlock_passphrase as _unlock_passphrase
from enclave_keys.ids import KekVersion
from enclave_keys.store import Store

PASSPHRASE_RECORD = "unseal.passphrase"  # noqa: S105 (a metadata record name)
FIRST_KEK_VERSION = KekVersion(1)


class UnsealSource(Protocol):
    """Something that yields the node's active KEK from its store's metadata."""

    def unlock(self, store: Store) -> Kek:
        """Return the active KEK (the caller owns it and wipes it at stop)."""
        ...


class PassphraseUnseal:
    """Derive the KEK from a passphrase; the first start enrols (stores salt + verifier).

    A wrong passphrase raises :class:`~enclave_keys.errors.WrongPassphrase` before any
    key is unwrapped. The passphrase string itself cannot be wiped (Python strings are
    immutable): keep its lifetime short.
    """

    __slots__ = ("_params", "_passphrase")

    def __init__(self, passphrase: str, *, params: KdfParams | None = None) -> None:
        self._passphrase = passphrase
        self._params = params

    def unlock(self, store: Store) -> Kek:
        raw = store.get_meta(PASSPHRASE_RECORD)
        if raw is None:
            record, root = enroll_passphrase(self._passphrase, self._params)
            store.put_meta(PASSPHRASE_RECORD, record.to_bytes())
        else:
            root = _unlock_passphrase(self._passphrase, PassphraseRecord.from_bytes(raw))
        return Kek(FIRST_KEK_VERSION, root)

    def __repr__(self) -> str:
        return "PassphraseUnseal(<passphrase hidden>)"


class KeyUnseal:
    """Use a 32-byte master key the caller holds (tests, simulations, own secret stores).

    Every :meth:`unlock` gives a fresh :class:`Kek` over a copy in locked memory, which
    the node wipes at stop; the caller keeps, and eventually wipes, ``master``.
    """

    __slots__ = ("_master",)

    def __init__(self, master: SecretBytes) -> None:
        self._master = master

    def unlock(self, store: Store) -> Kek:
        with self._master.borrow() as view:
            return Kek(FIRST_KEK_VERSION, SecretBytes.from_buffer(view, wipe_source=False))

    def __repr__(self) -> str:
        return "KeyUnseal(<master key hidden>)"
