"""The store contract: every test here runs against both backends (LMDB and memory)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from structlog.testing import capture_logs

from enclave_keys.errors import (
    InvalidIdentifier,
    SequenceConflict,
    StoreClosed,
    StoreError,
)
from enclave_keys.events import StoredEvent
from enclave_keys.ids import RoundId
from enclave_keys.store import FORMAT_VERSION, Store, WriteBatch, base
from tests.store.conftest import Harness
from tests.store.helpers import make_event, make_events, run_batch

R1, R2, R3 = RoundId("r1"), RoundId("r2"), RoundId("r3")


def state(store: Store) -> dict[str, Any]:
    """Everything observable through the read API."""
    return {
        "last": store.last_sequence(),
        "events": list(store.read_events()),
        "keys": store.list_keys(),
        "key_count": store.key_count(),
        "snapshots": store.snapshot_sequences(),
        "latest": store.latest_snapshot(),
        "meta": {n: store.get_meta(n) for n in ("a", "b", "store.format_version")},
    }


class Boom(Exception):
    pass


def boom(_batch: WriteBatch) -> None:
    raise Boom


def populate(store: Store) -> None:
    store.append_events(make_events(1, 3))
    with store.write() as batch:
        batch.put_key(R1, b"wrapped-1")
        batch.put_snapshot(2, b"snap-2")
        batch.put_meta("a", b"alpha")


# --- basics -----------------------------------------------------------------------------


def test_both_backends_implement_the_protocol(store: Store) -> None:
    assert isinstance(store, Store)


def test_a_new_store_is_empty_with_a_format_record(store: Store) -> None:
    assert store.last_sequence() == 0
    assert list(store.read_events()) == []
    assert store.get_key(R1) is None
    assert store.list_keys() == []
    assert store.key_count() == 0
    assert store.latest_snapshot() is None
    assert store.snapshot_sequences() == []
    assert store.get_meta("a") is None
    assert store.get_meta("store.format_version") == FORMAT_VERSION.to_bytes(4, "big")


def test_appended_events_read_back_equal_and_in_order(store: Store) -> None:
    events = make_events(1, 5)
    store.append_events(events[:2])
    store.append_events(events[2:])
    assert store.last_sequence() == 5
    read = list(store.read_events())
    assert read == events
    assert all(isinstance(e, StoredEvent) for e in read)


def test_one_batch_may_append_several_times_consecutively(store: Store) -> None:
    with store.write() as batch:
        batch.append_events(make_events(1, 2))
        batch.append_events(make_events(3, 2))
        batch.append_events([])
    assert [e.sequence for e in store.read_events()] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("start", "limit", "expected"),
    [
        (1, None, list(range(1, 11))),
        (4, None, list(range(4, 11))),
        (4, 3, [4, 5, 6]),
        (9, 5, [9, 10]),
        (10, None, [10]),
        (11, None, []),
        (500, 2, []),
        (1, 0, []),
    ],
)
def test_read_from_the_middle_and_with_a_limit(
    store: Store, start: int, limit: int | None, expected: list[int]
) -> None:
    store.append_events(make_events(1, 10))
    assert [e.sequence for e in store.read_events(start, limit)] == expected


def test_reads_cross_chunk_boundaries(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base, "READ_CHUNK", 4)
    store.append_events(make_events(1, 23))
    assert [e.sequence for e in store.read_events()] == list(range(1, 24))
    assert [e.sequence for e in store.read_events(3, 8)] == list(range(3, 11))
    assert [e.sequence for e in store.read_events(5, 4)] == [5, 6, 7, 8]


def test_iteration_holds_nothing_open_between_chunks(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writing while a reader is mid-iteration works, and the reader sees the new events."""
    monkeypatch.setattr(base, "READ_CHUNK", 2)
    store.append_events(make_events(1, 3))
    seen = []
    for event in store.read_events():
        seen.append(event.sequence)
        if event.sequence == 1:
            store.append_events(make_events(4, 2))
    assert seen == [1, 2, 3, 4, 5]


# --- sequence conflicts ---------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param([6], id="gap"),
        pytest.param([4], id="overlap-last"),
        pytest.param([2, 3], id="overlap-middle"),
        pytest.param([1], id="restart"),
    ],
)
def test_appends_that_do_not_continue_the_log_conflict(store: Store, bad: list[int]) -> None:
    store.append_events(make_events(1, 4))
    before = state(store)
    with pytest.raises(SequenceConflict):
        store.append_events([make_event(s) for s in bad])
    assert state(store) == before


def test_first_append_must_start_at_one(store: Store) -> None:
    with pytest.raises(SequenceConflict):
        store.append_events(make_events(2, 2))
    assert store.last_sequence() == 0


@pytest.mark.parametrize(
    "sequences",
    [[4, 6], [5, 4], [4, 4], [4, 5, 7]],
    ids=["gap", "reordered", "duplicate", "late-gap"],
)
def test_non_consecutive_events_in_a_batch_conflict_before_anything_is_written(
    store: Store, sequences: list[int]
) -> None:
    store.append_events(make_events(1, 3))
    before = state(store)
    with pytest.raises(SequenceConflict):
        run_batch(
            store,
            lambda b: b.put_key(R1, b"blob"),
            lambda b: b.append_events([make_event(s) for s in sequences]),
        )
    assert state(store) == before


def test_a_conflicting_mixed_batch_applies_nothing(store: Store) -> None:
    populate(store)
    before = state(store)
    with pytest.raises(SequenceConflict):
        run_batch(
            store,
            lambda b: b.put_key(R2, b"blob-2"),
            lambda b: b.delete_key(R1),
            lambda b: b.put_meta("b", b"beta"),
            lambda b: b.delete_meta("a"),
            lambda b: b.put_snapshot(3, b"snap-3"),
            lambda b: b.append_events(make_events(5, 2)),  # the log ends at 3: a gap
        )
    assert state(store) == before


def test_a_snapshot_past_the_end_of_the_log_conflicts(store: Store) -> None:
    store.append_events(make_events(1, 2))
    with pytest.raises(SequenceConflict):
        store.put_snapshot(3, b"too early")
    with store.write() as batch:  # fine once the same batch brings the log that far
        batch.put_snapshot(3, b"snap-3")
        batch.append_events([make_event(3)])
    assert store.latest_snapshot() == (3, b"snap-3")


def test_batches_from_threads_are_serialized(harness: Harness) -> None:
    store = harness.store
    per_thread, threads = 15, 4
    conflicts = 0
    lock = threading.Lock()

    def writer(index: int) -> None:
        nonlocal conflicts
        done = 0
        while done < per_thread:
            try:
                with store.write() as batch:
                    batch.append_events([make_event(store.last_sequence() + 1)])
                    batch.put_key(RoundId(f"t{index}-{done}"), b"k")
                done += 1
            except SequenceConflict:
                with lock:
                    conflicts += 1

    workers = [threading.Thread(target=writer, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=30)
    assert not any(w.is_alive() for w in workers)
    total = per_thread * threads
    assert [e.sequence for e in store.read_events()] == list(range(1, total + 1))
    assert store.key_count() == total


# --- atomicity ------------------------------------------------------------------------


def test_a_mixed_batch_is_applied_whole(store: Store) -> None:
    populate(store)
    with store.write() as batch:
        batch.append_events(make_events(4, 2))
        batch.put_key(R2, b"wrapped-2")
        batch.delete_key(R1)
        batch.put_snapshot(5, b"snap-5")
        batch.put_meta("b", b"beta")
        batch.delete_meta("a")
    assert store.last_sequence() == 5
    assert store.list_keys() == [(R2, b"wrapped-2")]
    assert store.latest_snapshot() == (5, b"snap-5")
    assert store.get_meta("a") is None
    assert store.get_meta("b") == b"beta"


def test_operations_in_a_batch_apply_in_order(store: Store) -> None:
    with store.write() as batch:
        batch.put_key(R1, b"first")
        batch.delete_key(R1)
        batch.put_key(R2, b"first")
        batch.put_key(R2, b"second")
        batch.put_meta("a", b"x")
        batch.delete_meta("a")
    assert store.list_keys() == [(R2, b"second")]
    assert store.get_meta("a") is None


def test_a_body_that_raises_writes_nothing(store: Store) -> None:
    populate(store)
    before = state(store)
    with pytest.raises(Boom):
        run_batch(
            store,
            lambda b: b.append_events(make_events(4, 3)),
            lambda b: b.put_key(R2, b"blob"),
            lambda b: b.put_snapshot(4, b"snap"),
            lambda b: b.put_meta("b", b"beta"),
            boom,
        )
    assert state(store) == before


def test_a_batch_cannot_be_used_after_its_block(store: Store) -> None:
    with store.write() as batch:
        batch.put_key(R1, b"blob")
    with pytest.raises(StoreError):
        batch.put_key(R2, b"late")
    with pytest.raises(Boom), store.write() as failed:
        boom(failed)
    with pytest.raises(StoreError):
        failed.append_events([make_event(1)])
    assert store.list_keys() == [(R1, b"blob")]


def test_an_empty_batch_is_a_no_op(store: Store) -> None:
    with store.write() as batch:
        assert isinstance(batch, WriteBatch)
    store.append_events([])
    assert state(store)["last"] == 0


# --- keys, snapshots, meta ------------------------------------------------------------


def test_round_keys(store: Store) -> None:
    store.put_key(R2, b"two")
    store.put_key(R1, b"one")
    store.put_key(R3, b"x" * 4096)
    assert store.get_key(R1) == b"one"
    assert store.get_key(RoundId("absent")) is None
    assert store.list_keys() == [(R1, b"one"), (R2, b"two"), (R3, b"x" * 4096)]
    assert store.key_count() == 3
    store.put_key(R1, b"replaced")
    assert store.get_key(R1) == b"replaced"
    store.delete_key(R2)
    store.delete_key(R2)  # deleting a missing key is not an error
    store.delete_key(RoundId("never-there"))
    assert store.get_key(R2) is None
    assert [rid for rid, _ in store.list_keys()] == [R1, R3]
    assert store.key_count() == 2


def test_round_key_records_are_the_keys_as_stored(store: Store) -> None:
    store.put_key(R2, b"two")
    store.put_key(R1, b"one")
    records = store.list_key_records()
    assert records == [(rid.to_bytes(), blob) for rid, blob in store.list_keys()]
    with store.write() as batch:  # all at once, as an epoch change writes them back
        batch.put_key_records([(raw, blob + b"?") for raw, blob in records])
        batch.delete_key(R2)  # operations stay in order around the bulk one
    assert store.list_keys() == [(R1, b"one?")]


def test_replaced_key_records_change_only_keys_still_as_expected(store: Store) -> None:
    """What a ratchet writes back beside live traffic: a key deleted or rewritten since it
    was read keeps what it has now (a deleted key never comes back)."""
    store.put_key(R1, b"one")
    store.put_key(R2, b"two")
    store.put_key(R3, b"three")
    records = dict(store.list_key_records())
    store.put_key(R2, b"two, rewritten")
    store.delete_key(R3)
    with store.write() as batch:
        batch.delete_key(R1)  # earlier in the same batch: seen by the replace
        batch.put_key(R1, b"one, again")
        batch.replace_key_records(
            [(raw, blob, blob + b" rewrapped") for raw, blob in sorted(records.items())]
            + [(b"never-stored", b"x", b"y")]
        )
    assert store.list_keys() == [(R1, b"one, again"), (R2, b"two, rewritten")]
    with store.write() as batch:
        batch.replace_key_records([(R2.to_bytes(), b"two, rewritten", b"two, rewrapped")])
    assert store.get_key(R2) == b"two, rewrapped"


def test_snapshots_keep_the_newest_three_by_default(store: Store) -> None:
    store.append_events(make_events(1, 10))
    for sequence in (2, 4, 6, 8):
        store.put_snapshot(sequence, f"snap-{sequence}".encode())
    assert store.snapshot_sequences() == [4, 6, 8]
    assert store.latest_snapshot() == (8, b"snap-8")
    with store.write() as batch:  # several in one batch, pruned in the same transaction
        batch.put_snapshot(9, b"snap-9")
        batch.put_snapshot(10, b"snap-10")
    assert store.snapshot_sequences() == [8, 9, 10]
    store.put_snapshot(10, b"snap-10-again")
    assert store.latest_snapshot() == (10, b"snap-10-again")
    assert store.snapshot_sequences() == [8, 9, 10]


def test_snapshot_retention_is_configurable(harness: Harness) -> None:
    store = harness.reopen(snapshot_retention=1)
    store.append_events(make_events(1, 3))
    store.put_snapshot(0, b"empty-state")
    store.put_snapshot(2, b"snap-2")
    assert store.snapshot_sequences() == [2]
    store = harness.reopen(snapshot_retention=5)
    for sequence in (1, 3):
        store.put_snapshot(sequence, b"s")
    assert store.snapshot_sequences() == [1, 2, 3]


def test_snapshots_are_pruned_only_by_a_batch_that_writes_one(harness: Harness) -> None:
    """Reopened with a smaller retention, a store keeps its older snapshots until a
    batch writes a snapshot (the documented rule, on both backends)."""
    harness.reopen(snapshot_retention=5)
    harness.store.append_events(make_events(1, 6))
    for sequence in range(1, 6):
        harness.store.put_snapshot(sequence, b"snap")
    store = harness.reopen(snapshot_retention=2)
    store.append_events(make_events(7, 1))
    store.put_key(R1, b"k")
    assert store.snapshot_sequences() == [1, 2, 3, 4, 5]
    store.put_snapshot(6, b"snap")
    assert store.snapshot_sequences() == [5, 6]


def test_a_snapshot_of_the_empty_log_is_allowed(store: Store) -> None:
    store.put_snapshot(0, b"genesis")
    assert store.latest_snapshot() == (0, b"genesis")


def test_meta(store: Store) -> None:
    store.put_meta("a", b"alpha")
    store.put_meta("b", b"")
    store.put_meta("ünïcode", b"u")
    assert store.get_meta("a") == b"alpha"
    assert store.get_meta("b") == b""
    assert store.get_meta("ünïcode") == b"u"
    store.put_meta("a", b"again")
    store.delete_meta("b")
    store.delete_meta("missing")
    assert store.get_meta("a") == b"again"
    assert store.get_meta("b") is None


# --- durability across reopen ----------------------------------------------------------


def test_everything_survives_close_and_reopen(harness: Harness) -> None:
    populate(harness.store)
    with harness.store.write() as batch:
        batch.put_key(R2, b"wrapped-2")
        batch.append_events([make_event(4)])
    before = state(harness.store)
    store = harness.reopen()
    assert state(store) == before
    store.append_events([make_event(5)])  # the log continues after a restart
    assert harness.reopen().last_sequence() == 5


# --- closed store -----------------------------------------------------------------------

CALLS: dict[str, Callable[[Store], object]] = {
    "write": lambda s: s.write().__enter__(),
    "append_events": lambda s: s.append_events([make_event(1)]),
    "put_key": lambda s: s.put_key(R1, b"k"),
    "delete_key": lambda s: s.delete_key(R1),
    "put_snapshot": lambda s: s.put_snapshot(0, b"s"),
    "put_meta": lambda s: s.put_meta("a", b"v"),
    "delete_meta": lambda s: s.delete_meta("a"),
    "last_sequence": lambda s: s.last_sequence(),
    "read_events": lambda s: s.read_events(),
    "get_key": lambda s: s.get_key(R1),
    "list_keys": lambda s: s.list_keys(),
    "list_key_records": lambda s: s.list_key_records(),
    "key_count": lambda s: s.key_count(),
    "latest_snapshot": lambda s: s.latest_snapshot(),
    "snapshot_sequences": lambda s: s.snapshot_sequences(),
    "get_meta": lambda s: s.get_meta("a"),
    "enter": lambda s: s.__enter__(),
}


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
def test_a_closed_store_raises_store_closed(store: Store, call: Callable[[Store], object]) -> None:
    store.close()
    store.close()  # idempotent
    assert store.closed
    with pytest.raises(StoreClosed):
        call(store)


def test_the_context_manager_closes(harness: Harness) -> None:
    with harness.store as store:
        store.put_key(R1, b"k")
    assert store.closed
    assert harness.reopen().get_key(R1) == b"k"


def test_a_batch_open_when_the_store_closes_writes_nothing(harness: Harness) -> None:
    store = harness.store
    with pytest.raises(StoreClosed):
        run_batch(store, lambda b: b.put_key(R1, b"k"), lambda b: store.close())
    assert harness.reopen().get_key(R1) is None


def test_an_iteration_running_when_the_store_closes_stops(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(base, "READ_CHUNK", 2)
    store.append_events(make_events(1, 5))
    events = store.read_events()
    assert next(events).sequence == 1
    assert next(events).sequence == 2
    store.close()
    with pytest.raises(StoreClosed):
        next(events)


# --- invalid input ------------------------------------------------------------------------

INVALID: list[Any] = [
    # (operation on a batch, expected error)
    ("put_key", (("r1",), b"k"), InvalidIdentifier),
    ("put_key", ("r1", b"k"), InvalidIdentifier),
    ("put_key", (R1, b""), StoreError),
    ("put_key", (R1, b"x" * 4097), StoreError),
    ("put_key", (R1, bytearray(b"k")), StoreError),
    ("put_key", (R1, "k"), StoreError),
    ("put_key_records", ([(R1, b"k")],), InvalidIdentifier),
    ("put_key_records", ([("r1", b"k")],), InvalidIdentifier),
    ("put_key_records", ([(b"", b"k")],), InvalidIdentifier),
    ("put_key_records", ([(b"-r1", b"k")],), InvalidIdentifier),
    ("put_key_records", ([(b"r" * 129, b"k")],), InvalidIdentifier),
    ("put_key_records", ([(b"r1\n", b"k")],), InvalidIdentifier),
    ("put_key_records", ([(b"r1", b"")],), StoreError),
    ("put_key_records", ([(b"r1", b"k"), (b"-r1", b"k")],), InvalidIdentifier),
    ("put_key_records", ([(b"r1", b"k"), (b"r2", b"")],), StoreError),
    ("put_key_records", ([(b"r1", b"k"), (b"r2",)],), StoreError),
    ("put_key_records", ([b"r1"],), StoreError),
    ("put_key_records", (None,), StoreError),
    ("replace_key_records", ([(R1, b"k", b"l")],), InvalidIdentifier),
    ("replace_key_records", ([(b"-r1", b"k", b"l")],), InvalidIdentifier),
    ("replace_key_records", ([(b"r1", b"", b"l")],), StoreError),
    ("replace_key_records", ([(b"r1", b"k", b"")],), StoreError),
    ("replace_key_records", ([(b"r1", b"k", "l")],), StoreError),
    ("replace_key_records", ([(b"r1", b"k", b"l"), (b"r2", b"k")],), StoreError),
    ("replace_key_records", ([[b"r1", b"k", b"l"]],), StoreError),
    ("replace_key_records", (None,), StoreError),
    ("delete_key", (None,), InvalidIdentifier),
    ("put_snapshot", (-1, b"s"), InvalidIdentifier),
    ("put_snapshot", (2**64, b"s"), InvalidIdentifier),
    ("put_snapshot", ("1", b"s"), InvalidIdentifier),
    ("put_snapshot", (True, b"s"), InvalidIdentifier),
    ("put_snapshot", (0, b""), StoreError),
    ("put_snapshot", (0, "s"), StoreError),
    ("put_meta", ("", b"v"), InvalidIdentifier),
    ("put_meta", ("x" * 129, b"v"), InvalidIdentifier),
    ("put_meta", ("\ud800", b"v"), InvalidIdentifier),
    ("put_meta", (b"a", b"v"), InvalidIdentifier),
    ("put_meta", ("store.format_version", b"v"), InvalidIdentifier),
    ("put_meta", ("a", "v"), StoreError),
    ("put_meta", ("a", None), StoreError),
    ("delete_meta", ("store.format_version",), InvalidIdentifier),
    ("append_events", ([object()],), StoreError),
    ("append_events", ([make_event(5), "event"],), StoreError),
    ("append_events", (make_event(1),), StoreError),
    ("append_events", (b"bytes",), StoreError),
]


@pytest.mark.parametrize(
    ("method", "args", "error"),
    INVALID,
    ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(INVALID)],
)
def test_invalid_input_raises_a_typed_error_and_writes_nothing(
    harness: Harness, method: str, args: tuple[Any, ...], error: type[Exception]
) -> None:
    store = harness.store
    populate(store)
    before = state(store)
    with pytest.raises(error) as caught:
        run_batch(
            store,
            lambda b: b.put_key(R2, b"valid, but in a failing batch"),
            lambda b: b.append_events([make_event(4)]),
            lambda b: getattr(b, method)(*args),
        )
    if error is StoreError:
        assert type(caught.value) is StoreError
    assert state(store) == before
    assert state(harness.reopen()) == before


def test_invalid_input_to_the_single_operation_methods(store: Store) -> None:
    with pytest.raises(StoreError):
        store.put_key(R1, b"")
    with pytest.raises(InvalidIdentifier):
        store.put_meta("store.anything", b"v")
    assert store.key_count() == 0


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda s: s.read_events(0), InvalidIdentifier),
        (lambda s: s.read_events(-3), InvalidIdentifier),
        (lambda s: s.read_events("1"), InvalidIdentifier),
        (lambda s: s.read_events(1, -1), StoreError),
        (lambda s: s.read_events(1, 2.5), StoreError),
        (lambda s: s.get_key("r1"), InvalidIdentifier),
        (lambda s: s.get_meta(""), InvalidIdentifier),
        (lambda s: s.get_meta(7), InvalidIdentifier),
    ],
)
def test_invalid_read_arguments_raise_at_the_call(
    store: Store, call: Callable[[Any], object], error: type[Exception]
) -> None:
    with pytest.raises(error):
        call(store)  # read_events is checked eagerly, before iteration starts


# --- logging ------------------------------------------------------------------------------


def test_logs_never_contain_values(harness: Harness) -> None:
    secret = b"\x13\x37SECRET-WRAPPED-KEY\x00\xff"
    with capture_logs() as logs:
        store = harness.reopen()
        store.put_key(R1, secret)
        store.put_meta("a", secret)
        store.put_snapshot(0, secret)
        harness.reopen()
    rendered = repr(logs) + repr(harness.store)
    assert "SECRET" not in rendered
    assert secret.hex() not in rendered
    if harness.kind == "lmdb":
        assert [entry["event"] for entry in logs] == [
            "store_closed",
            "store_opened",
            "store_closed",
            "store_opened",
        ]
