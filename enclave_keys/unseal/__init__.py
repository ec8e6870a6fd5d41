"""Unseal sources: how a node obtains its root key (design §5, ``docs/unseal.md``).

Each source (:class:`~enclave_keys.unseal.api.UnsealSource`) has a ``method`` name, an
``enrol()`` that makes a root key and the metadata records to persist (written by the
caller, atomically with the keyring), and an ``unlock_root(store)`` that recovers the
root key from those records:

=====================  ============  ===================================================
source                 method        root key
=====================  ============  ===================================================
:class:`PassphraseUnseal`  passphrase    Argon2id + HKDF of the passphrase
:class:`ShamirUnseal`  shamir        SLIP-39 master secret of an M-of-N share set;
                                     :class:`ShamirCeremony` collects shares one by one
:class:`HsmUnseal`     pkcs11        random, sealed by an AES key inside a PKCS#11 token
:class:`EnvKeyUnseal`  env           64 hex characters in an environment variable
                                     (legacy bootstrap; refused after migration)
:class:`KeyUnseal`     raw           a key the caller holds (tests, embedding apps)
=====================  ============  ===================================================

:func:`read_secret` reads a passphrase, PIN or share from a prompt or a file descriptor
for the CLI (never from argv).
"""

from __future__ import annotations

from typing import Final

from enclave_keys.unseal.api import METHOD_RECORD, ROOT_KEY_SIZE, Enrolment, UnsealSource
from enclave_keys.unseal.env import EnvKeyUnseal
from enclave_keys.unseal.hsm import HsmUnseal, find_softhsm_module
from enclave_keys.unseal.passphrase import PassphraseUnseal
from enclave_keys.unseal.prompt import read_secret
from enclave_keys.unseal.raw import KeyUnseal
from enclave_keys.unseal.shamir import CeremonyProgress, ShamirCeremony, ShamirUnseal

__all__ = [
    "METHOD_RECORD",
    "RECORD_NAMES",
    "ROOT_KEY_SIZE",
    "CeremonyProgress",
    "Enrolment",
    "EnvKeyUnseal",
    "HsmUnseal",
    "KeyUnseal",
    "PassphraseUnseal",
    "ShamirCeremony",
    "ShamirUnseal",
    "UnsealSource",
    "find_softhsm_module",
    "read_secret",
    "record_names",
]

RECORD_NAMES: Final[dict[str, tuple[str, ...]]] = {
    PassphraseUnseal.method: PassphraseUnseal.RECORDS,
    ShamirUnseal.method: ShamirUnseal.RECORDS,
    HsmUnseal.method: HsmUnseal.RECORDS,
    EnvKeyUnseal.method: EnvKeyUnseal.RECORDS,
    KeyUnseal.method: KeyUnseal.RECORDS,
}


def record_names(method: str) -> tuple[str, ...]:
    """Every record a method's ``enrol()`` can write: what ``rekey_root`` drops when leaving it.

    :class:`KeyError` for an unknown method.
    """
    return RECORD_NAMES[method]
