"""Fakes for testing a node: a clock, stores, an unseal source that needs no secret.

* :class:`ManualClock` -- time that moves only when a test says so (re-exported from
  :mod:`enclave_keys.clock`);
* :class:`MemoryStore` -- the in-memory twin of the LMDB store, run by the same contract
  tests (re-exported from :mod:`enclave_keys.store`);
* :class:`FixedKeyUnseal` -- an unseal source over a fixed, *public* root key (derived from
  a seed): a node can be closed and reopened without any secret handling in the test;
* :class:`FaultyStore` -- wraps any store and injects faults on command: failing writes,
  and round-key deletes that are silently lost (the classic forward-secrecy bug).

These are fakes, not mocks: each is a working implementation of the interface it stands
in for, so the code under test runs its real paths.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from types import TracebackType
from typing import Final

from enclave_keys.clock import ManualClock
from enclave_keys.crypto import SecretBytes
from enclave_keys.errors import StoreError
from enclave_keys.events import StoredEvent
from enclave_keys.ids import RoundId
from enclave_keys.store import MemoryStore, Store
from enclave_keys.store.api import SingleWrites, WriteBatch
from enclave_keys.store.slots import SlotDevice
from enclave_keys.unseal import Enrolment, KeyUnseal

__all__ = ["FaultyStore", "FixedKeyUnseal", "InjectedFault", "ManualClock", "MemoryStore"]

_DOMAIN: Final = b"enclave_keys.testing/fixed-key/v1"


class FixedKeyUnseal:
    """An unseal source whose root key is fixed and derived from ``seed`` (NOT secret).

    Behaves exactly like :class:`~enclave_keys.unseal.KeyUnseal` (method ``"raw"``): the
    first start enrols the key, later starts must present the same one. Two instances
    with the same seed open the same node. For tests and simulations only.
    """

    __slots__ = ("_key", "_source", "seed")

    method: Final = KeyUnseal.method

    def __init__(self, seed: int | str | bytes = 0) -> None:
        raw = seed if isinstance(seed, bytes) else str(seed).encode("utf-8")
        self.seed = seed
        self._key = SecretBytes.from_bytes(hashlib.sha256(_DOMAIN + raw).digest())
        self._source = KeyUnseal(self._key)

    def enrol(self) -> Enrolment:
        return self._source.enrol()

    def unlock_root(self, store: Store) -> SecretBytes:
        return self._source.unlock_root(store)

    def wipe(self) -> None:
        """Wipe the key memory (the seed can always make it again)."""
        self._key.wipe()

    def __enter__(self) -> FixedKeyUnseal:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.wipe()

    def __repr__(self) -> str:
        return f"FixedKeyUnseal(seed={self.seed!r})"


class InjectedFault(StoreError):
    """The error a :class:`FaultyStore` raises for an injected write failure."""


class FaultyStore(SingleWrites):
    """A :class:`~enclave_keys.store.Store` that delegates to ``inner`` and injects faults.

    Faults are plain attributes a test flips at any time:

    * ``fail_writes``: the next N writes (batches or single operations) raise
      :class:`InjectedFault` before anything reaches ``inner`` (so nothing is written);
    * ``pass_writes``: that many writes go through first (fail the third write from now:
      ``pass_writes=2, fail_writes=1``);
    * ``drop_key_deletes``: deleting a round key appears to succeed but the record stays
      (in a batch the rest of the batch is applied). Counted in ``dropped_deletes``.

    Closing the wrapper closes ``inner``.
    """

    def __init__(
        self, inner: Store, *, fail_writes: int = 0, drop_key_deletes: bool = False
    ) -> None:
        self.inner = inner
        self.fail_writes = fail_writes
        self.pass_writes = 0
        self.drop_key_deletes = drop_key_deletes
        self.dropped_deletes = 0

    def _maybe_fail(self) -> None:
        if self.pass_writes > 0:
            self.pass_writes -= 1
            return
        if self.fail_writes > 0:
            self.fail_writes -= 1
            raise InjectedFault("injected write failure")

    @property
    def closed(self) -> bool:
        return self.inner.closed

    def write(self) -> AbstractContextManager[WriteBatch]:
        return self._write()

    @contextmanager
    def _write(self) -> Iterator[WriteBatch]:
        self._maybe_fail()
        before = dict(self.inner.list_keys()) if self.drop_key_deletes else {}
        with self.inner.write() as batch:
            yield batch
        if self.drop_key_deletes:
            lost = {rid: blob for rid, blob in before.items() if self.inner.get_key(rid) is None}
            if lost:
                with self.inner.write() as restore:
                    for rid, blob in lost.items():
                        restore.put_key(rid, blob)
                self.dropped_deletes += len(lost)

    def last_sequence(self) -> int:
        return self.inner.last_sequence()

    def read_events(
        self, from_sequence: int = 1, limit: int | None = None
    ) -> Iterator[StoredEvent]:
        return self.inner.read_events(from_sequence, limit)

    def get_key(self, round_id: RoundId) -> bytes | None:
        return self.inner.get_key(round_id)

    def list_keys(self) -> list[tuple[RoundId, bytes]]:
        return self.inner.list_keys()

    def list_key_records(self) -> list[tuple[bytes, bytes]]:
        return self.inner.list_key_records()

    def key_count(self) -> int:
        return self.inner.key_count()

    def latest_snapshot(self) -> tuple[int, bytes] | None:
        return self.inner.latest_snapshot()

    def snapshot_sequences(self) -> list[int]:
        return self.inner.snapshot_sequences()

    def get_meta(self, name: str) -> bytes | None:
        return self.inner.get_meta(name)

    def epoch_slots(self) -> SlotDevice:
        return self.inner.epoch_slots()

    def close(self) -> None:
        self.inner.close()

    def __enter__(self) -> FaultyStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"FaultyStore({self.inner!r}, fail_writes={self.fail_writes},"
            f" drop_key_deletes={self.drop_key_deletes})"
        )
