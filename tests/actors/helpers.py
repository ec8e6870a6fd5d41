"""Builders shared by the actor-core tests: stored events, KEKs, keyrings, epoch keepers,
stores."""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Callable
from pathlib import Path

from enclave_keys.clock import ManualClock
from enclave_keys.crypto import Entropy, Kek, KekSource, Keyring, SecretBytes
from enclave_keys.epochs import DEFAULT_EPOCH_WINDOW, EpochKeeper
from enclave_keys.events import Event, StoredEvent
from enclave_keys.ids import EventId, KekVersion
from enclave_keys.store import LmdbStore, MemoryBacking, MemoryStore, Store

T0 = 1_700_000_000.0
_sequence = itertools.count(1)


def stored(payload: Event, *, source: str = "test", timestamp: float = T0) -> StoredEvent:
    """``payload`` as a logged event with the next sequence number and a fresh id."""
    return StoredEvent(
        sequence=next(_sequence),
        event_id=EventId.random(),
        timestamp=timestamp,
        source=source,
        payload=payload,
    )


def make_kek(version: int = 1, key: bytes | None = None) -> Kek:
    """A KEK of ``version``: random, or from ``key`` (32 bytes) when a test needs them."""
    secret = SecretBytes.random(32) if key is None else SecretBytes.from_bytes(key)
    return Kek(KekVersion(version), secret)


def make_keyring(key: bytes | None = None) -> Keyring:
    """A one-version keyring (v1 active) — the in-memory KEK source of the actor tests.

    Its KEK is random, or ``key`` (32 bytes) when a test needs the bytes; nonces always
    come from the OS.
    """
    if key is None:
        return Keyring.create()
    pending = [key]

    def entropy(size: int) -> bytes:  # the key once, then OS randomness for every nonce
        if pending and size == len(pending[0]):
            return pending.pop()
        return os.urandom(size)

    return Keyring.create(entropy)


def open_keeper(
    store: Store,
    keks: KekSource,
    *,
    clock: ManualClock | None = None,
    window: float = DEFAULT_EPOCH_WINDOW,
    lease_timeout: float = 10.0,
    entropy: Entropy | None = None,
) -> EpochKeeper:
    """The storage epoch keeper of ``store``, its epoch key wrapped under ``keks``.

    On a :class:`ManualClock` (``T0`` unless given) that only a test moves, so no ratchet
    is ever due by itself. Close it when done (``keeper.close()``).
    """
    keeper, _ = EpochKeeper.open(
        store,
        keks,
        clock=ManualClock(T0) if clock is None else clock,
        window=window,
        lease_timeout=lease_timeout,
        entropy=entropy,
    )
    return keeper


class RecordingEntropy:
    """A seeded entropy source that remembers every chunk it handed out (tests only)."""

    def __init__(self, seed: int = 7) -> None:
        self._rng = random.Random(seed)
        self.chunks: list[bytes] = []

    def __call__(self, size: int) -> bytes:
        chunk = self._rng.randbytes(size)
        self.chunks.append(chunk)
        return chunk

    def secrets_of_size(self, size: int) -> list[bytes]:
        return [c for c in self.chunks if len(c) == size]


StoreOpener = Callable[[], Store]


def memory_opener() -> StoreOpener:
    """Opens stores over one shared in-memory backing (a "restart" sees committed data)."""
    backing = MemoryBacking()
    return lambda: MemoryStore(backing)


def lmdb_opener(path: Path) -> StoreOpener:
    return lambda: LmdbStore.open(path)
