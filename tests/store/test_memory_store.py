"""MemoryStore-only behaviour: the backing outlives the store, so restarts can be simulated."""

from __future__ import annotations

import pytest

from enclave_keys.errors import StoreClosed
from enclave_keys.ids import RoundId
from enclave_keys.store import MemoryBacking, MemoryStore, WriteBatch
from tests.store.helpers import make_events, run_batch


def crash(_batch: WriteBatch) -> None:
    raise RuntimeError("crash")


def test_reopen_closes_and_sees_exactly_what_was_committed() -> None:
    store = MemoryStore(snapshot_retention=2)
    store.append_events(make_events(1, 3))
    with pytest.raises(RuntimeError):  # a "crash" mid-batch
        run_batch(store, lambda b: b.append_events(make_events(4, 2)), crash)
    again = store.reopen()
    assert store.closed
    with pytest.raises(StoreClosed):
        store.last_sequence()
    assert again.last_sequence() == 3
    assert again.snapshot_retention == 2
    assert again.backing is store.backing


def test_two_stores_over_one_backing_share_committed_data() -> None:
    backing = MemoryBacking()
    first, second = MemoryStore(backing), MemoryStore(backing)
    first.put_key(RoundId("r1"), b"k")
    assert second.get_key(RoundId("r1")) == b"k"
    second.append_events(make_events(1, 2))
    assert first.last_sequence() == 2


def test_repr_shows_counts_not_values() -> None:
    store = MemoryStore()
    store.put_key(RoundId("r1"), b"SECRET")
    assert "SECRET" not in repr(store)
    assert "round_keys=1" in repr(store)
