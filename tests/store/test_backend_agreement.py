"""Property: random batches (valid or not) leave the LMDB store and the memory twin in the
same observable state, with the same outcome for every batch, across reopens."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enclave_keys.ids import RoundId
from enclave_keys.store import LmdbStore, MemoryBacking, MemoryStore, Store, WriteBatch
from tests.store.helpers import make_events

ROUNDS = [RoundId(f"round-{i}") for i in range(4)]
NAMES = ["a", "b", "store.format_version"]

operations = st.one_of(
    st.tuples(st.just("append"), st.sampled_from([0, 0, 0, -1, 1]), st.integers(0, 4)),
    st.tuples(st.just("put_key"), st.integers(0, 3), st.sampled_from([0, 1, 32, 4096, 4097])),
    st.tuples(st.just("delete_key"), st.integers(0, 3)),
    st.tuples(st.just("put_snapshot"), st.integers(-2, 1), st.binary(max_size=3)),
    st.tuples(st.just("put_meta"), st.integers(0, 2), st.binary(max_size=3)),
    st.tuples(st.just("delete_meta"), st.integers(0, 2)),
    st.tuples(st.just("raise")),
)
batches = st.lists(
    st.one_of(st.lists(operations, max_size=5), st.just("reopen")), min_size=1, max_size=10
)


class Raised(Exception):
    pass


def record(batch: WriteBatch, op: tuple[Any, ...], last: int) -> None:
    """Record one generated operation; sequences are relative to the log's end."""
    match op:
        case ("append", delta, count):
            first = max(1, (batch.next_sequence or last + 1) + delta)
            batch.append_events(make_events(first, count))
        case ("put_key", index, size):
            batch.put_key(ROUNDS[index], bytes([index]) * size)
        case ("delete_key", index):
            batch.delete_key(ROUNDS[index])
        case ("put_snapshot", delta, data):
            batch.put_snapshot(max(0, last + delta), data)
        case ("put_meta", index, value):
            batch.put_meta(NAMES[index], value)
        case ("delete_meta", index):
            batch.delete_meta(NAMES[index])
        case ("raise",):
            raise Raised


def apply(store: Store, ops: list[tuple[Any, ...]], last: int) -> str | None:
    try:
        with store.write() as batch:
            for op in ops:
                record(batch, op, last)
    except Exception as exc:
        return type(exc).__name__
    return None


def observe(store: Store) -> dict[str, Any]:
    return {
        "events": list(store.read_events()),
        "last": store.last_sequence(),
        "keys": store.list_keys(),
        "count": store.key_count(),
        "snapshots": store.snapshot_sequences(),
        "latest": store.latest_snapshot(),
        "meta": [store.get_meta(name) for name in NAMES],
    }


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=batches)
def test_backends_agree_on_random_batches(plan: list[Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store"
        backing = MemoryBacking()
        lmdb_store: Store = LmdbStore.open(path, snapshot_retention=2)
        memory: Store = MemoryStore(backing, snapshot_retention=2)
        try:
            for step in plan:
                if step == "reopen":
                    lmdb_store.close()
                    memory.close()
                    lmdb_store = LmdbStore.open(path, snapshot_retention=2)
                    memory = MemoryStore(backing, snapshot_retention=2)
                    continue
                last = memory.last_sequence()
                assert apply(lmdb_store, step, last) == apply(memory, step, last)
                assert observe(lmdb_store) == observe(memory)
        finally:
            lmdb_store.close()
            memory.close()
