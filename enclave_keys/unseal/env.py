"""Legacy bootstrap: a raw root key in an environment variable, strictly validated.

The variable (``ENCLAVE_KEYS_MASTER_KEY`` by default) must hold **exactly 64 hexadecimal
characters** (upper or lower case): no ``0x`` prefix, no spaces, no trailing newline —
anything else raises :class:`~enclave_keys.errors.InvalidKeyMaterial`, whose message
never echoes the value. (A shell's ``$(cat keyfile)`` already drops the newline; being
strict means a truncated or padded key is refused instead of silently "fixed".)

``enrol()`` uses the 32 decoded bytes as the root key and records a verifier of it
(``unseal.env.verifier``, a :class:`~enclave_keys.crypto.verifier.RootVerifier`), so a
different environment key is refused with :class:`~enclave_keys.errors.WrongPassphrase`
(the closest existing error: a secret that does not match its stored verifier).

Migration: ``MasterKeys.rekey_root`` to another method (passphrase, ceremony, HSM)
rewrites ``master.method``; from then on :meth:`EnvKeyUnseal.unlock_root` refuses with
:class:`~enclave_keys.errors.UnsealMismatch` even if the key and old records are still
there. Unlike the other sources, an env unlock *requires* ``master.method == "env"``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Final

from enclave_keys.crypto import SecretBytes
from enclave_keys.crypto.verifier import RootVerifier
from enclave_keys.errors import InvalidKeyMaterial, UnsealMismatch, WrongPassphrase
from enclave_keys.store import Store
from enclave_keys.unseal.api import (
    METHOD_RECORD,
    ROOT_KEY_SIZE,
    Enrolment,
    read_record,
    stored_method,
)

__all__ = ["DEFAULT_ENV_VARIABLE", "ENV_VERIFIER_RECORD", "EnvKeyUnseal"]

DEFAULT_ENV_VARIABLE: Final = "ENCLAVE_KEYS_MASTER_KEY"
ENV_VERIFIER_RECORD: Final = "unseal.env.verifier"
_PURPOSE: Final = b"unseal/env"
_HEX_KEY = re.compile(r"[0-9A-Fa-f]{64}")


class EnvKeyUnseal:
    """Read the root key from ``environ[variable]`` (64 hex characters, nothing else)."""

    __slots__ = ("_environ", "_variable")

    method: Final = "env"
    RECORDS: Final = (ENV_VERIFIER_RECORD,)

    def __init__(
        self, environ: Mapping[str, str] = os.environ, variable: str = DEFAULT_ENV_VARIABLE
    ) -> None:
        self._environ = environ
        self._variable = variable

    def _key(self) -> SecretBytes:
        value = self._environ.get(self._variable)
        if value is None:
            raise InvalidKeyMaterial(f"the environment variable {self._variable} is not set")
        if not isinstance(value, str) or _HEX_KEY.fullmatch(value) is None:
            # fullmatch, not match: "$" would accept a trailing newline.
            length = len(value) if isinstance(value, str) else 0
            raise InvalidKeyMaterial(
                f"{self._variable} must be exactly {2 * ROOT_KEY_SIZE} hexadecimal characters"
                f" (it has {length} characters)"
            )
        buffer = bytearray.fromhex(value)
        return SecretBytes.from_buffer(buffer)  # zeroes ``buffer``; ``value`` cannot be

    def enrol(self) -> Enrolment:
        """The environment key as the root key, with a verifier record."""
        root = self._key()
        try:
            verifier = RootVerifier.create(root, _PURPOSE)
        except BaseException:
            root.wipe()
            raise
        return Enrolment(root, {ENV_VERIFIER_RECORD: verifier.to_bytes()})

    def unlock_root(self, store: Store) -> SecretBytes:
        """The root key, if ``master.method`` is ``env`` and the key matches its verifier."""
        method = stored_method(store)
        if method is None:
            raise UnsealMismatch(
                f"the store has no {METHOD_RECORD} record: it was not initialised"
                " with the environment key"
            )
        if method != self.method:
            raise UnsealMismatch(
                f"this node migrated off the environment key (its root key is now sealed"
                f" with the {method!r} method): unset {self._variable} and unseal with {method!r}"
            )
        verifier = RootVerifier.from_bytes(read_record(store, ENV_VERIFIER_RECORD, self.method))
        root = self._key()
        if not verifier.matches(root, _PURPOSE):
            root.wipe()
            raise WrongPassphrase(
                f"{self._variable} does not hold the key this node was initialised with"
            )
        return root

    def __repr__(self) -> str:
        return f"EnvKeyUnseal(variable={self._variable!r}, <key hidden>)"
