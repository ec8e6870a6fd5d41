"""Storage epoch keys: the keys that wrap round keys at rest, and where they come from.

An :class:`EpochKey` wraps every round key stored while its epoch is current. When rounds
are purged the node *ratchets*: it makes the next epoch key, rewraps the live round keys
under it and destroys the old one (``docs/key-hierarchy.md``), so a wrapped round key
left behind in a free page of the store can no longer be opened by anyone — not even
with the master secret.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol

from enclave_keys.crypto._common import KEY_SIZE, AeadKeyHolder
from enclave_keys.crypto.secret import Entropy, SecretBytes
from enclave_keys.ids import EpochNumber, KekVersion

__all__ = ["EpochKey", "EpochSource"]


class EpochKey(AeadKeyHolder):
    """The key of one storage epoch. Owns its key; wipe when done.

    ``entropy`` makes the key and wrap nonces deterministic: FOR SIMULATIONS ONLY.
    """

    __slots__ = ("_number",)

    KIND = "epoch key"

    def __init__(
        self, number: EpochNumber, key: SecretBytes, *, entropy: Entropy | None = None
    ) -> None:
        if not isinstance(number, EpochNumber):
            if isinstance(key, SecretBytes):
                key.wipe()
            raise TypeError("EpochKey needs an EpochNumber")
        super().__init__(key, entropy)
        self._number = number

    @classmethod
    def generate(cls, number: EpochNumber, *, entropy: Entropy | None = None) -> EpochKey:
        """A fresh random key for epoch ``number``."""
        return cls(number, SecretBytes.random(KEY_SIZE, entropy), entropy=entropy)

    @property
    def number(self) -> EpochNumber:
        return self._number

    def __repr__(self) -> str:
        return f"EpochKey(epoch={self._number.number}, {'wiped' if self.is_wiped else 'live'})"


class EpochSource(Protocol):
    """Where the round-cipher actor gets epoch keys: operation-scoped, never kept.

    * ``with source.active_epoch() as epoch:`` — the current epoch key under a shared
      lease; hold it across the wrap *and* the durable store of the blob, so no epoch
      switch can come in between and the ratchet's rewrap cannot miss the new blob;
    * ``with source.epoch_for(number) as epoch:`` — the key of a stored blob's epoch if
      it is the current one (raises :class:`~enclave_keys.errors.UnknownEpoch` for any
      other, including one being retired by an epoch change);
    * ``with source.hold_ratchet():`` — keeps an epoch switch (and a KEK rotation) out
      while a stored round key is deleted, so a rotation in flight cannot write the
      deleted key back (a ratchet writes back only keys that are unchanged);
    * ``source.purged()`` — a round key was deleted: ratchet within the window.
    * ``source.kek_version`` — the KEK version that wraps the current epoch key.

    Each waits (bounded) while an epoch switch or a KEK rotation runs and may raise
    :class:`~enclave_keys.errors.LeaseTimeout`. Do not nest them in one thread.
    """

    @property
    def kek_version(self) -> KekVersion: ...

    def active_epoch(self) -> AbstractContextManager[EpochKey]: ...

    def epoch_for(self, number: EpochNumber) -> AbstractContextManager[EpochKey]: ...

    def hold_ratchet(self) -> AbstractContextManager[None]: ...

    def purged(self) -> None: ...
