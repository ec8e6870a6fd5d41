"""Key-encryption keys (:class:`Kek`): the versions kept in the keyring.

A KEK wraps the storage epoch key (:func:`enclave_keys.crypto.wrap.wrap_epoch_key`),
which in turn wraps the round keys.
"""

from __future__ import annotations

from enclave_keys.crypto._common import AeadKeyHolder
from enclave_keys.crypto.secret import Entropy, SecretBytes
from enclave_keys.ids import KekVersion

__all__ = ["Kek"]


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
