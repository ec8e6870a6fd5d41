"""LMDB-only behaviour: files on disk, durability, map growth, damaged and foreign data."""

from __future__ import annotations

import errno
import os
import stat
import threading
from pathlib import Path

import lmdb
import pytest
from structlog.testing import capture_logs

from enclave_keys.codec import encode_event
from enclave_keys.errors import (
    CodecError,
    CorruptRecord,
    SequenceConflict,
    StoreError,
    StoreUnavailable,
)
from enclave_keys.ids import RoundId
from enclave_keys.store import LmdbStore, lmdb_store
from enclave_keys.store.records import sequence_key
from tests.store.helpers import make_event, make_events, run_python

KIB = 1024


def poke(path: Path, db: bytes | None, key: bytes, value: bytes | None) -> None:
    """Write (or delete, if ``value`` is None) one raw record, bypassing the store."""
    env = lmdb.open(str(path), max_dbs=8)
    try:
        with env.begin(write=True) as txn:
            handle = None if db is None else env.open_db(db, txn=txn)
            if value is None:
                txn.delete(key, db=handle)
            else:
                txn.put(key, value, db=handle)
    finally:
        env.close()


@pytest.fixture
def filled(lmdb_path: Path) -> Path:
    """A closed store holding events 1..5, one key and one snapshot."""
    with LmdbStore.open(lmdb_path) as store, store.write() as batch:
        batch.append_events(make_events(1, 5))
        batch.put_key(RoundId("r1"), b"wrapped")
        batch.put_snapshot(3, b"snap")
    return lmdb_path


# --- files and durability ---------------------------------------------------------------


def test_a_new_store_is_a_private_directory_with_durable_commits(lmdb_path: Path) -> None:
    with LmdbStore.open(lmdb_path) as store:
        flags = store._env.flags()
        assert flags["sync"]
        assert flags["metasync"]
        assert flags["subdir"]
        assert store.path == lmdb_path
    assert stat.S_IMODE(lmdb_path.stat().st_mode) & 0o077 == 0
    assert stat.S_IMODE((lmdb_path / "data.mdb").stat().st_mode) & 0o077 == 0


def test_each_batch_is_exactly_one_transaction(lmdb_path: Path) -> None:
    store = LmdbStore.open(lmdb_path)
    start = store.last_transaction_id
    with store.write() as batch:
        batch.append_events(make_events(1, 100))
        for i in range(20):
            batch.put_key(RoundId(f"r{i}"), b"k" * 60)
        batch.put_snapshot(100, b"snap")
        batch.put_meta("a", b"v")
    assert store.last_transaction_id == start + 1
    with store.write():
        pass
    with pytest.raises(SequenceConflict):
        store.append_events([make_event(500)])
    assert store.last_transaction_id == start + 1  # no commit for empty or failed batches
    store.close()


def test_a_batch_is_on_disk_when_write_returns(lmdb_path: Path) -> None:
    """The child process dies without closing, right after its batch returned."""
    script = (
        "import os, sys\n"
        "from enclave_keys.ids import RoundId\n"
        "from enclave_keys.store import LmdbStore\n"
        "from tests.store.helpers import make_events\n"
        "store = LmdbStore.open(sys.argv[1])\n"
        "with store.write() as batch:\n"
        "    batch.append_events(make_events(1, 50))\n"
        "    batch.put_key(RoundId('r1'), b'k')\n"
        "with store.write() as batch:\n"
        "    batch.append_events(make_events(51, 5))\n"
        "    os._exit(0)  # dies inside the second batch: it must leave no trace\n"
    )
    child = run_python(script, lmdb_path)
    assert child.returncode == 0, child.stderr[-2000:]
    with LmdbStore.open(lmdb_path) as store:
        assert store.last_sequence() == 50
        assert list(store.read_events()) == make_events(1, 50)
        assert store.get_key(RoundId("r1")) == b"k"


# --- map growth ---------------------------------------------------------------------------


def test_the_map_grows_and_the_batch_is_retried_whole(lmdb_path: Path) -> None:
    store = LmdbStore.open(lmdb_path, map_size=64 * KIB)
    start = store.last_transaction_id
    events = make_events(1, 2000, payload_size=300)
    keys = [(RoundId(f"r{i}"), os.urandom(4096)) for i in range(100)]
    with capture_logs() as logs, store.write() as batch:
        batch.append_events(events)
        for round_id, blob in keys:
            batch.put_key(round_id, blob)
    grown = [entry for entry in logs if entry["event"] == "store_map_grown"]
    assert len(grown) >= 3
    assert all(entry["new_size"] > entry["old_size"] for entry in grown)
    assert store.map_size >= grown[-1]["new_size"] > 64 * KIB
    assert store.last_transaction_id == start + 1
    store.close()
    with LmdbStore.open(lmdb_path, map_size=64 * KIB) as again:  # the file keeps its size
        assert list(again.read_events()) == events
        assert again.list_keys() == sorted(keys)


def test_a_batch_beyond_the_maximum_map_size_writes_nothing(lmdb_path: Path) -> None:
    store = LmdbStore.open(lmdb_path, map_size=64 * KIB, max_map_size=256 * KIB)
    store.append_events(make_events(1, 3))
    with pytest.raises(StoreError) as caught:
        store.append_events(make_events(4, 400, payload_size=2000))
    assert type(caught.value) is StoreError
    assert "maximum map size" in str(caught.value)
    assert store.last_sequence() == 3
    store.append_events([make_event(4)])  # still usable
    assert [e.sequence for e in store.read_events()] == [1, 2, 3, 4]
    store.close()


MAP_LOST_CHILD = """
import os, resource, sys
from enclave_keys.errors import StoreError
from enclave_keys.store import LmdbStore

store = LmdbStore.open(sys.argv[1], map_size=1 << 20)
store.put_meta("small", b"kept")
blob = bytes(40 << 20)  # needs a 64 MiB map: growing it must map more than allowed below
status = [line for line in open("/proc/self/status") if line.startswith("VmSize")]
room = int(status[0].split()[1]) * 1024 + (24 << 20)
resource.setrlimit(resource.RLIMIT_AS, (room, resource.RLIM_INFINITY))
for call in (lambda: store.put_meta("big", blob), lambda: store.get_meta("small")):
    try:
        call()
        print("> ok")
    except StoreError as exc:
        print(">", type(exc).__name__, exc)
resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
store.close()
with LmdbStore.open(sys.argv[1]) as again:
    print("> reopened", again.get_meta("small"), again.get_meta("big"))
"""


def test_a_map_that_cannot_grow_is_a_store_error_and_the_store_says_so(
    lmdb_path: Path,
) -> None:
    """The map cannot be mapped larger (no address space): LMDB has already unmapped the
    old one and py-lmdb drops the environment, so the write fails with StoreError and
    every later call says the store must be reopened; the file is intact."""
    child = run_python(MAP_LOST_CHILD, lmdb_path)
    assert child.returncode == 0, child.stderr[-2000:]
    results = [line for line in child.stdout.splitlines() if line.startswith("> ")]
    write, read, reopened = (line[2:] for line in results)
    assert write.startswith("StoreError cannot resize the memory map")
    assert write.endswith("nothing was written")
    assert read.startswith("StoreError")
    assert "close the store and open it again" in read
    assert reopened == "reopened b'kept' None"


def test_a_data_file_that_cannot_follow_the_map_writes_nothing(
    lmdb_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The map grew but data.mdb cannot be extended to it: the map is put back and the
    batch fails whole, typed; the store stays usable."""
    store = LmdbStore.open(lmdb_path, map_size=64 * KIB)
    store.append_events(make_events(1, 3))
    map_size = store.map_size

    def no_space(env: object, data_file: Path) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(lmdb_store, "cover_the_map", no_space)
        with pytest.raises(StoreError, match="nothing was written"):
            store.append_events(make_events(4, 400, payload_size=2000))
    assert store.map_size == map_size
    assert store.last_sequence() == 3
    store.append_events(make_events(4, 400, payload_size=2000))  # grows now
    assert store.last_sequence() == 403
    store.close()


def test_a_data_file_that_cannot_cover_the_map_at_open_is_unavailable(
    filled: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def io_error(env: object, data_file: Path) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(lmdb_store, "cover_the_map", io_error)
    with pytest.raises(StoreUnavailable, match="Input/output error"):
        LmdbStore.open(filled)
    monkeypatch.undo()
    with LmdbStore.open(filled) as store:  # the failed open left it closed
        assert store.last_sequence() == 5


def test_readers_run_while_other_threads_grow_the_map(lmdb_path: Path) -> None:
    store = LmdbStore.open(lmdb_path, map_size=64 * KIB)
    stop = threading.Event()
    failures: list[BaseException] = []

    def reader() -> None:
        try:
            while not stop.is_set():
                last = store.last_sequence()
                start = max(1, last - 20)  # a short tail: readers must not starve the writer
                sequences = [e.sequence for e in store.read_events(start)]
                assert sequences[: last - start + 1] == list(range(start, last + 1))
                store.key_count()
        except BaseException as exc:  # reported below
            failures.append(exc)

    readers = [threading.Thread(target=reader) for _ in range(3)]
    for thread in readers:
        thread.start()
    try:
        for first in range(1, 1201, 200):
            store.append_events(make_events(first, 200, payload_size=400))
    finally:
        stop.set()
        for thread in readers:
            thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in readers)
    assert failures == []
    assert store.last_sequence() == 1200
    assert store.map_size > 64 * KIB
    store.close()


# --- damaged records ----------------------------------------------------------------------


def test_an_undecodable_event_raises_corrupt_record(filled: Path) -> None:
    poke(filled, b"events", sequence_key(3), b"\xc1 not msgpack")
    with LmdbStore.open(filled) as store:
        events = store.read_events()
        assert [next(events).sequence, next(events).sequence] == [1, 2]
        with pytest.raises(CorruptRecord) as caught:
            next(events)
        assert isinstance(caught.value.__cause__, CodecError)
        assert store.last_sequence() == 5  # other reads still work
        assert list(store.read_events(4)) == make_events(4, 2)


def test_an_event_stored_under_the_wrong_sequence_is_corrupt(filled: Path) -> None:
    poke(filled, b"events", sequence_key(2), encode_event(make_event(7)))
    with LmdbStore.open(filled) as store, pytest.raises(CorruptRecord):
        list(store.read_events())


def test_a_gap_in_the_log_is_corrupt(filled: Path) -> None:
    poke(filled, b"events", sequence_key(3), None)
    with LmdbStore.open(filled) as store, pytest.raises(CorruptRecord):
        list(store.read_events())


def test_a_malformed_event_key_is_corrupt_and_blocks_appends(filled: Path) -> None:
    poke(filled, b"events", b"\x01", encode_event(make_event(6)))  # sorts last
    with LmdbStore.open(filled) as store:
        with pytest.raises(CorruptRecord):
            store.last_sequence()
        with pytest.raises(CorruptRecord):
            store.append_events([make_event(6)])
        assert store.get_key(RoundId("r1")) == b"wrapped"


@pytest.mark.parametrize(
    ("db", "key", "value", "read"),
    [
        (b"round_keys", b"r1", b"", "get_key"),
        (b"round_keys", b"r2", b"x" * 4097, "list_keys"),
        (b"round_keys", b"\xffbad", b"blob", "list_keys"),
        (b"round_keys", b"-starts-badly", b"blob", "list_keys"),
        (b"snapshots", b"\x00\x01", b"snap", "snapshot_sequences"),
        (b"snapshots", sequence_key(4), b"", "latest_snapshot"),
    ],
)
def test_malformed_key_and_snapshot_records_are_corrupt(
    filled: Path, db: bytes, key: bytes, value: bytes, read: str
) -> None:
    poke(filled, db, key, value)
    with LmdbStore.open(filled) as store, pytest.raises(CorruptRecord):
        getattr(store, read)() if read != "get_key" else store.get_key(RoundId("r1"))


# --- what is not a store --------------------------------------------------------------------


def test_a_plain_file_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_bytes(b"hello")
    with pytest.raises(StoreUnavailable, match="not a directory"):
        LmdbStore.open(path)


@pytest.mark.parametrize("size", [100, 4096, 64 * KIB])
def test_a_garbage_data_file_is_unavailable(lmdb_path: Path, size: int) -> None:
    lmdb_path.mkdir()
    (lmdb_path / "data.mdb").write_bytes(os.urandom(size))
    with pytest.raises(StoreUnavailable, match="LMDB"):
        LmdbStore.open(lmdb_path)


def test_an_empty_data_file_is_unavailable_not_a_new_store(filled: Path) -> None:
    (filled / "data.mdb").write_bytes(b"")
    with pytest.raises(StoreUnavailable, match="empty"):
        LmdbStore.open(filled)
    assert (filled / "data.mdb").stat().st_size == 0


def test_a_truncated_data_file_is_unavailable(lmdb_path: Path) -> None:
    with LmdbStore.open(lmdb_path) as store:
        store.append_events(make_events(1, 300, payload_size=1000))
        used = (store._env.info()["last_pgno"] + 1) * store._env.stat()["psize"]
    data = lmdb_path / "data.mdb"
    assert data.stat().st_size >= used  # extended (sparsely) to the map size
    with data.open("r+b") as handle:
        handle.truncate(used // 2)
    with pytest.raises(StoreUnavailable, match="truncated"):
        LmdbStore.open(lmdb_path)


def test_the_data_file_covers_the_map_so_damage_cannot_read_past_its_end(
    lmdb_path: Path,
) -> None:
    """A damaged page pointer inside the map reads zeros (a typed LMDB error), never the
    SIGBUS of a read past the end of the file; the extension is a sparse hole."""
    with LmdbStore.open(lmdb_path) as store:
        map_size = store.map_size
        store.append_events(make_events(1, 10))
    data = lmdb_path / "data.mdb"
    assert data.stat().st_size == map_size
    assert data.stat().st_blocks * 512 < map_size // 4, "the tail takes no disk space"
    with LmdbStore.open(lmdb_path) as store:
        assert store.last_sequence() == 10


@pytest.mark.parametrize("make_dir", [False, True], ids=["missing-dir", "empty-dir"])
def test_create_false_never_creates(lmdb_path: Path, make_dir: bool) -> None:
    if make_dir:
        lmdb_path.mkdir()
    with pytest.raises(StoreUnavailable, match="no store"):
        LmdbStore.open(lmdb_path, create=False)
    assert lmdb_path.exists() == make_dir
    assert not (lmdb_path / "data.mdb").exists()


def test_a_store_already_open_in_this_process_is_unavailable(filled: Path) -> None:
    with LmdbStore.open(filled) as store:
        with pytest.raises(StoreUnavailable, match="already open"):
            LmdbStore.open(filled)
        assert store.last_sequence() == 5


def test_create_false_opens_an_existing_store(filled: Path) -> None:
    with LmdbStore.open(filled, create=False) as store:
        assert store.last_sequence() == 5


@pytest.mark.parametrize(
    ("db", "key"),
    [(None, b"plain-key"), (b"other", b"k")],
    ids=["data-in-main-db", "other-named-db"],
)
def test_a_foreign_lmdb_environment_is_unavailable(
    lmdb_path: Path, db: bytes | None, key: bytes
) -> None:
    lmdb_path.mkdir()
    poke(lmdb_path, db, key, b"value")
    with pytest.raises(StoreUnavailable, match="not an enclave_keys store"):
        LmdbStore.open(lmdb_path)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ((2).to_bytes(4, "big"), "format version 2"),
        ((0).to_bytes(4, "big"), "format version 0"),
        (b"\x00\x01", "malformed format version"),
        (None, "no format version"),
    ],
)
def test_a_format_version_mismatch_is_unavailable(
    filled: Path, value: bytes | None, message: str
) -> None:
    poke(filled, b"meta", b"store.format_version", value)
    with pytest.raises(StoreUnavailable, match=message):
        LmdbStore.open(filled)
    poke(filled, b"meta", b"store.format_version", (1).to_bytes(4, "big"))
    with LmdbStore.open(filled) as store:  # the failed open left nothing behind
        assert store.last_sequence() == 5


@pytest.mark.parametrize(
    "options",
    [{"map_size": 100}, {"map_size": "big"}, {"max_map_size": 0}, {"snapshot_retention": 0}],
)
def test_bad_options_raise_before_touching_the_disk(
    lmdb_path: Path, options: dict[str, object]
) -> None:
    with pytest.raises(StoreError):
        LmdbStore.open(lmdb_path, **options)  # type: ignore[arg-type]
    assert not lmdb_path.exists()


def test_repr_names_the_path_only(lmdb_path: Path) -> None:
    store = LmdbStore.open(lmdb_path)
    store.put_key(RoundId("r1"), b"SECRET")
    assert repr(store) == f"LmdbStore({str(lmdb_path)!r}, open)"
    store.close()
    assert "closed" in repr(store)
