"""Fixtures of the round-cipher tests: a store of each backend, a keyring, an epoch keeper."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from enclave_keys.clock import ManualClock
from enclave_keys.context import ContextRegistry
from enclave_keys.crypto import Kek, Keyring
from enclave_keys.epochs import EpochKeeper
from enclave_keys.round_cipher import RoundCipherCore
from enclave_keys.store import Store
from tests.actors.helpers import (
    T0,
    StoreOpener,
    lmdb_opener,
    make_keyring,
    memory_opener,
    open_keeper,
)

WAIT = 10.0  # bound on every wait for another thread


@pytest.fixture(params=["memory", "lmdb"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> StoreOpener:
    return memory_opener() if request.param == "memory" else lmdb_opener(tmp_path / "store")


@pytest.fixture
def store(opener: StoreOpener) -> Iterator[Store]:
    opened = opener()
    yield opened
    opened.close()


@pytest.fixture
def ring() -> Iterator[Keyring]:
    with make_keyring() as made:
        yield made


@pytest.fixture
def kek(ring: Keyring) -> Kek:
    return ring.active


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
def keeper(store: Store, ring: Keyring, clock: ManualClock) -> Iterator[EpochKeeper]:
    """The store's epoch keeper, its epoch key wrapped under ``ring``'s KEK."""
    made = open_keeper(store, ring, clock=clock, lease_timeout=WAIT)
    yield made
    made.close()


@pytest.fixture
def registry() -> ContextRegistry:
    return ContextRegistry()


@pytest.fixture
def core(store: Store, keeper: EpochKeeper, registry: ContextRegistry) -> Iterator[RoundCipherCore]:
    """A round-cipher core over ``store``, writing each key at once (no runtime)."""
    made = RoundCipherCore(store, keeper, registry, lease_timeout=WAIT)
    yield made
    made.wipe_all()
