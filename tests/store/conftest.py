"""Fixtures for the store tests: one harness per backend, each able to reopen its store."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from enclave_keys.store import LmdbStore, MemoryBacking, MemoryStore, Store


class Harness:
    """A store under test plus a way to close it and open the same data again."""

    def __init__(self, kind: str, opener: Callable[..., Store]) -> None:
        self.kind = kind
        self._opener = opener
        self.store: Store = opener()

    def reopen(self, **options: Any) -> Store:
        """Close the current store (idempotent) and open a new one over the same data."""
        self.store.close()
        self.store = self._opener(**options)
        return self.store


def _memory_harness() -> Harness:
    backing = MemoryBacking()
    return Harness("memory", lambda **options: MemoryStore(backing, **options))


def _lmdb_harness(path: Path) -> Harness:
    return Harness("lmdb", lambda **options: LmdbStore.open(path, **options))


@pytest.fixture(params=["memory", "lmdb"])
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    made = _memory_harness() if request.param == "memory" else _lmdb_harness(tmp_path / "store")
    yield made
    made.store.close()


@pytest.fixture
def store(harness: Harness) -> Store:
    return harness.store


@pytest.fixture
def lmdb_path(tmp_path: Path) -> Path:
    return tmp_path / "store"
