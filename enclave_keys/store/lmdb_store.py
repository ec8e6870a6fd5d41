"""The durable store: one LMDB environment (a directory) with four named databases.

See ``docs/storage-format.md`` for the layout byte by byte. In short:

* every write batch is one LMDB write transaction, committed with ``sync`` and
  ``metasync`` on, so when :meth:`~enclave_keys.store.api.Store.write` returns the batch
  is on disk — one durable commit per batch, the unit of group commit;
* when a batch does not fit the memory map, the transaction is aborted, the map is grown
  (doubled, up to ``max_map_size``) and the *whole* batch is retried: a write is never
  lost or half-applied;
* a directory that is not an enclave_keys store (a plain file, a garbage or truncated
  ``data.mdb``, a foreign LMDB environment, another format version) raises
  :class:`~enclave_keys.errors.StoreUnavailable` on open.

Thread-safety: one ``LmdbStore`` may be shared by many threads. Write batches are
serialized by a mutex (which :meth:`close` also takes, so it waits for a batch in
flight). Every read transaction holds a shared lock; growing the map and closing take
it exclusively, since LMDB forbids both while a transaction is active. One process per
store: LMDB would allow several, but the node is the only writer.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from itertools import islice
from pathlib import Path
from typing import Final, TypeVar

import lmdb
import structlog

from enclave_keys.errors import CorruptRecord, DirectoryInUse, StoreError, StoreUnavailable
from enclave_keys.store import records
from enclave_keys.store.api import (
    DeleteKey,
    DeleteMeta,
    PreparedBatch,
    PutKey,
    PutKeys,
    PutMeta,
    PutSnapshot,
    ReplaceKeys,
)
from enclave_keys.store.base import StoreBase
from enclave_keys.store.claim import DirectoryClaim, held_here
from enclave_keys.store.datafile import DATA_FILE, check_not_truncated, cover_the_map
from enclave_keys.store.locks import SharedExclusiveLock
from enclave_keys.store.scrub import finish_pending_scrub, scrub_pending
from enclave_keys.store.slots import SlotFile

_log = structlog.get_logger(__name__)

_T = TypeVar("_T")

DEFAULT_MAP_SIZE: Final = 64 * 2**20
"""Initial map size (64 MiB). Address space only: the file grows as pages are used."""

DEFAULT_MAX_MAP_SIZE: Final = 2**40
"""Map growth stops here (1 TiB); a batch that still does not fit raises StoreError."""

MAX_DBS: Final = 8  # four in use, room for later formats
_FILE_MODE: Final = 0o600
_DIR_MODE: Final = 0o700
_MAX_RETRIES_ON_RESIZE: Final = 3


def _check_size(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 4096:
        raise StoreError(f"{what} must be an int of at least 4096 bytes")
    return value


def _round_to_page(size: int) -> int:
    page = os.sysconf("SC_PAGE_SIZE")
    return -(-size // page) * page


class LmdbStore(StoreBase):
    """A :class:`~enclave_keys.store.api.Store` over one LMDB environment. Use :meth:`open`."""

    def __init__(
        self,
        env: lmdb.Environment,
        path: Path,
        dbs: dict[bytes, lmdb._Database],
        *,
        max_map_size: int,
        snapshot_retention: int,
    ) -> None:
        super().__init__(snapshot_retention=snapshot_retention)
        self._env = env
        self._path = path
        self._events = dbs[records.EVENTS_DB]
        self._round_keys = dbs[records.ROUND_KEYS_DB]
        self._snapshots = dbs[records.SNAPSHOTS_DB]
        self._meta = dbs[records.META_DB]
        self._max_map_size = max_map_size
        self._lock = SharedExclusiveLock()
        self._write_lock = threading.Lock()
        self._slots: SlotFile | None = None
        self._create_slots = True
        self._unusable: str | None = None  # why, once the memory map is lost

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        map_size: int = DEFAULT_MAP_SIZE,
        max_map_size: int = DEFAULT_MAX_MAP_SIZE,
        create: bool = True,
        snapshot_retention: int = records.DEFAULT_SNAPSHOT_RETENTION,
    ) -> LmdbStore:
        """Open the store in directory ``path``, creating it if ``create`` (the default).

        Raises :class:`StoreUnavailable` if ``path`` is not a usable store of this format.
        """
        map_size = _check_size(map_size, "map_size")
        max_map_size = max(_check_size(max_map_size, "max_map_size"), map_size)
        records.check_retention(snapshot_retention)
        where = Path(os.fspath(path))
        env = _open_environment(where, map_size, create=create)
        try:
            dbs, created = _initialise_or_verify(env, where, create=create)
        except BaseException:
            env.close()
            raise
        _log.info(
            "store_opened",
            path=str(where),
            created=created,
            format_version=records.FORMAT_VERSION,
            map_size=env.info()["map_size"],
        )
        store = cls(
            env,
            where,
            dbs,
            max_map_size=max_map_size,
            snapshot_retention=snapshot_retention,
        )
        store._create_slots = create
        return store

    # --- introspection ----------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self._path

    @property
    def map_size(self) -> int:
        """Current size of the memory map in bytes (grows on demand)."""
        return self._read(lambda _txn: self._env.info()["map_size"])

    @property
    def last_transaction_id(self) -> int:
        """LMDB's id of the last committed write transaction: +1 per committed batch."""
        return self._read(lambda _txn: self._env.info()["last_txnid"])

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"LmdbStore({str(self._path)!r}, {state})"

    def _check_open(self) -> None:
        """:class:`StoreClosed` after close(); :class:`StoreError` once the map is lost."""
        super()._check_open()
        if self._unusable is not None:
            raise StoreError(self._unusable)

    # --- transactions -----------------------------------------------------------------

    def _read(self, work: Callable[[lmdb.Transaction[bytes]], _T]) -> _T:
        """Run ``work`` in one short read transaction, translating LMDB errors."""
        for _ in range(_MAX_RETRIES_ON_RESIZE):
            try:
                with self._lock.shared():
                    self._check_open()
                    with self._env.begin() as txn:
                        return work(txn)
            except lmdb.MapResizedError:
                self._adopt_map_size()
            except (lmdb.CorruptedError, lmdb.PageNotFoundError) as exc:
                raise CorruptRecord(f"LMDB reports a damaged page: {exc}") from exc
            except lmdb.Error as exc:
                raise StoreError(f"LMDB read failed: {exc}") from exc
        raise StoreError("another process keeps resizing the map; read abandoned")

    def _commit(self, batch: PreparedBatch) -> None:
        with self._write_lock:  # one batch at a time; close() waits for it too
            # No other writer can move the log while we hold the write lock, so a conflict
            # is found here, without beginning (and aborting) a write transaction.
            batch.check_against(self._last_sequence())
            resizes = 0
            while True:
                self._check_open()
                try:
                    txn = self._env.begin(write=True)
                except lmdb.MapResizedError:
                    resizes += 1
                    if resizes > _MAX_RETRIES_ON_RESIZE:
                        raise StoreError(
                            "another process keeps resizing the map; nothing was written"
                        ) from None
                    self._adopt_map_size()
                    continue
                except lmdb.Error as exc:
                    raise StoreError(f"LMDB write failed, nothing was written: {exc}") from exc
                if self._attempt(txn, batch):
                    return

    def _attempt(self, txn: lmdb.Transaction[bytes], batch: PreparedBatch) -> bool:
        """Apply and commit ``batch`` in ``txn``: True if committed, False to retry after
        the map was grown. Any other failure aborts and raises; nothing is applied."""
        try:
            self._apply(txn, batch)
            txn.commit()  # with sync and metasync: the one durable flush of this batch
        except lmdb.MapFullError:
            # Abort and grow with every reader drained: py-lmdb serializes operations on an
            # environment-wide lock, and busy readers could otherwise starve the abort.
            with self._lock.exclusive():
                txn.abort()
                self._grow_locked()
            return False
        except BaseException as exc:
            with self._lock.exclusive():
                txn.abort()
            if isinstance(exc, (lmdb.CorruptedError, lmdb.PageNotFoundError)):
                raise CorruptRecord(f"LMDB reports a damaged page: {exc}") from exc
            if isinstance(exc, lmdb.Error):
                raise StoreError(f"LMDB write failed, nothing was written: {exc}") from exc
            raise
        return True

    def _apply(self, txn: lmdb.Transaction[bytes], batch: PreparedBatch) -> None:
        """Apply the batch inside ``txn``; any exception aborts the whole transaction."""
        events = txn.cursor(db=self._events)
        last = records.parse_sequence_key(events.key(), db="events") if events.last() else 0
        batch.check_against(last)
        if batch.events:
            assert batch.first_sequence is not None
            items = [
                (records.sequence_key(batch.first_sequence + i), raw)
                for i, raw in enumerate(batch.events)
            ]
            _, added = events.putmulti(items, append=True)
            if added != len(items):
                raise CorruptRecord("the events database refused an in-order append")
        snapshots_written = False
        for op in batch.operations:
            match op:
                case PutKey(key, blob):
                    txn.put(key, blob, db=self._round_keys)
                case PutKeys(pairs):
                    txn.cursor(db=self._round_keys).putmulti(pairs)
                case ReplaceKeys(triples):
                    cursor = txn.cursor(db=self._round_keys)
                    get = cursor.get
                    unchanged = [(key, blob) for key, old, blob in triples if get(key) == old]
                    cursor.putmulti(unchanged)
                case DeleteKey(key):
                    txn.delete(key, db=self._round_keys)
                case PutSnapshot(sequence, data):
                    txn.put(records.sequence_key(sequence), data, db=self._snapshots)
                    snapshots_written = True
                case PutMeta(key, value):
                    txn.put(key, value, db=self._meta)
                case DeleteMeta(key):
                    txn.delete(key, db=self._meta)
        if snapshots_written:
            self._prune_snapshots(txn)

    def _prune_snapshots(self, txn: lmdb.Transaction[bytes]) -> None:
        excess = txn.stat(self._snapshots)["entries"] - self._retention
        if excess <= 0:
            return
        cursor = txn.cursor(db=self._snapshots)
        cursor.first()
        for _ in range(excess):
            cursor.delete()  # deletes the oldest and moves to the next

    def _grow_locked(self) -> None:
        """Double the map (up to the maximum); the caller holds the exclusive lock and
        retries its whole batch."""
        self._check_open()
        old = self._env.info()["map_size"]
        if old >= self._max_map_size:
            raise StoreError(
                f"batch does not fit in the maximum map size ({self._max_map_size} bytes);"
                " nothing was written"
            )
        new = min(_round_to_page(old * 2), self._max_map_size)
        self._set_map_size_locked(new)
        try:
            cover_the_map(self._env, self._path / DATA_FILE)
        except OSError as exc:
            # A map past the end of the file could read there (SIGBUS): shrink it back.
            self._set_map_size_locked(old)
            raise StoreError(
                f"cannot extend {DATA_FILE} to the grown map ({exc}); nothing was written"
            ) from exc
        _log.info("store_map_grown", path=str(self._path), old_size=old, new_size=new)

    def _adopt_map_size(self) -> None:
        """Another process grew the map: adopt its size (``set_mapsize(0)``)."""
        with self._lock.exclusive():
            self._check_open()
            self._set_map_size_locked(0)

    def _set_map_size_locked(self, size: int) -> None:
        """Resize the map (0: to the size in the file); the caller holds the exclusive lock.

        LMDB unmaps the old map before mapping the new one, so when mapping fails (no
        address space: ``lmdb.MemoryError``) the environment is left with no map, and
        py-lmdb invalidates it. The store is then marked unusable: every later call
        raises :class:`StoreError` saying so, until it is closed and opened again (the
        file is intact: the failed batch was aborted first).
        """
        try:
            self._env.set_mapsize(size)
        except lmdb.Error as exc:
            self._unusable = (
                f"{self._path} lost its memory map when resizing it failed ({exc});"
                " close the store and open it again"
            )
            _log.error("store_map_lost", path=str(self._path), size=size, error=str(exc))
            raise StoreError(
                f"cannot resize the memory map of {self._path} ({exc}); nothing was written"
            ) from exc

    def _close(self) -> None:
        with self._write_lock, self._lock.exclusive():
            if self._closed:
                return
            self._closed = True
            self._env.close()
            if self._slots is not None:
                self._slots.close()
        _log.info("store_closed", path=str(self._path))

    # --- reads ------------------------------------------------------------------------

    def _slot_device(self) -> SlotFile:
        """``epoch.slots`` next to ``data.mdb``, opened on first use — and created if
        missing, unless the store was opened with ``create=False`` (then a missing file is
        :class:`StoreUnavailable`: a read-only look never writes one)."""
        with self._write_lock:
            if self._slots is None:
                self._slots = SlotFile.open(self._path, create=self._create_slots)
            return self._slots

    def _last_sequence(self) -> int:
        def work(txn: lmdb.Transaction[bytes]) -> int:
            cursor = txn.cursor(db=self._events)
            return records.parse_sequence_key(cursor.key(), db="events") if cursor.last() else 0

        return self._read(work)

    def _event_records(self, start: int, count: int) -> list[tuple[bytes, bytes]]:
        def work(txn: lmdb.Transaction[bytes]) -> list[tuple[bytes, bytes]]:
            cursor = txn.cursor(db=self._events)
            if not cursor.set_range(records.sequence_key(start)):
                return []
            return list(islice(cursor, count))  # iterated in C: no Python step per record

        return self._read(work)

    def _get_key(self, key: bytes) -> bytes | None:
        return self._read(lambda txn: txn.get(key, db=self._round_keys))

    def _key_records(self) -> list[tuple[bytes, bytes]]:
        return self._read(lambda txn: list(txn.cursor(db=self._round_keys)))

    def _key_count(self) -> int:
        return self._read(lambda txn: txn.stat(self._round_keys)["entries"])

    def _snapshot_keys(self) -> list[bytes]:
        return self._read(
            lambda txn: list(txn.cursor(db=self._snapshots).iternext(keys=True, values=False))
        )

    def _latest_snapshot_record(self) -> tuple[bytes, bytes] | None:
        def work(txn: lmdb.Transaction[bytes]) -> tuple[bytes, bytes] | None:
            cursor = txn.cursor(db=self._snapshots)
            return cursor.item() if cursor.last() else None

        return self._read(work)

    def _get_meta(self, key: bytes) -> bytes | None:
        return self._read(lambda txn: txn.get(key, db=self._meta))


# --- opening ----------------------------------------------------------------------------


def _finish_scrub_if_ours(path: Path) -> None:
    """Finish a scrub a crash interrupted — but never one that is still running. A scrub
    runs holding the directory's claim, so the scrub is finished only by a process that
    holds the claim already (a node opening its store) or can take it for the moment
    (a read-only tool after a crash); otherwise it is left to its owner."""
    if not scrub_pending(path):
        return
    if held_here(path):
        finish_pending_scrub(path)
        return
    try:
        claim = DirectoryClaim(path, "scrub")
    except DirectoryInUse:
        _log.info("scrub_left_to_its_owner", path=str(path))
        return
    try:
        finish_pending_scrub(path)
    finally:
        claim.release()


def _open_environment(path: Path, map_size: int, *, create: bool) -> lmdb.Environment:
    """Check the directory, then open it as an LMDB environment, durability on."""
    data_file = path / DATA_FILE
    if path.is_dir():
        _finish_scrub_if_ours(path)
    if path.exists() and not path.is_dir():
        raise StoreUnavailable(f"{path} is not a directory, so not an enclave_keys store")
    if not path.exists():
        if not create:
            raise StoreUnavailable(f"no store at {path}: the directory does not exist")
        try:
            path.mkdir(mode=_DIR_MODE, parents=True)
        except OSError as exc:
            raise StoreUnavailable(f"cannot create store directory {path}: {exc}") from exc
    elif data_file.exists():
        if not data_file.is_file():
            raise StoreUnavailable(f"{data_file} is not a regular file")
        if data_file.stat().st_size == 0:
            # LMDB would silently start a new, empty environment over it: refuse, since an
            # existing store truncated to nothing would lose every live round key.
            raise StoreUnavailable(f"{data_file} is empty: truncated, or never initialised")
    elif not create:
        raise StoreUnavailable(f"no store at {path}: {DATA_FILE} does not exist")
    try:
        env = lmdb.open(
            str(path),
            map_size=_round_to_page(map_size),
            subdir=True,
            create=False,  # the directory exists by now
            max_dbs=MAX_DBS,
            sync=True,
            metasync=True,
            meminit=True,
            mode=_FILE_MODE,
            max_spare_txns=0,
            lock=True,
        )
    except (lmdb.Error, OSError) as exc:
        raise StoreUnavailable(f"{path} cannot be opened as an LMDB environment: {exc}") from exc
    try:
        check_not_truncated(env, data_file)
        cover_the_map(env, data_file)
    except OSError as exc:
        env.close()
        raise StoreUnavailable(f"cannot check or extend {data_file}: {exc}") from exc
    except BaseException:
        env.close()
        raise
    return env


def _initialise_or_verify(
    env: lmdb.Environment, path: Path, *, create: bool
) -> tuple[dict[bytes, lmdb._Database], bool]:
    """Create the databases and the format record in a new environment, or check them.

    Returns the database handles and whether the store was created now.
    """
    try:
        with env.begin() as txn:
            names = set(txn.cursor().iternext(keys=True, values=False))
        if not names:
            if not create:
                raise StoreUnavailable(f"{path} is an empty LMDB environment, not a store")
            with env.begin(write=True) as txn:
                dbs = {name: env.open_db(name, txn=txn) for name in records.DATABASES}
                key = records.FORMAT_VERSION_NAME.encode()
                txn.put(key, records.format_version_value(), db=dbs[records.META_DB])
            return dbs, True
        missing = [name.decode() for name in records.DATABASES if name not in names]
        if missing:
            raise StoreUnavailable(
                f"{path} is an LMDB environment but not an enclave_keys store"
                f" (no {', '.join(missing)} database)"
            )
        # Handles opened in a read-only transaction die with it: use a write transaction
        # (it changes nothing, so its commit writes nothing).
        with env.begin(write=True) as txn:
            dbs = {name: env.open_db(name, txn=txn, create=False) for name in records.DATABASES}
            raw = txn.get(records.FORMAT_VERSION_NAME.encode(), db=dbs[records.META_DB])
    except lmdb.Error as exc:
        raise StoreUnavailable(f"{path} is not a usable enclave_keys store: {exc}") from exc
    if raw is None:
        raise StoreUnavailable(f"{path} has no format version record")
    try:
        version = records.parse_format_version(raw)
    except CorruptRecord as exc:
        raise StoreUnavailable(f"{path} has a malformed format version record") from exc
    if version != records.FORMAT_VERSION:
        raise StoreUnavailable(
            f"{path} holds store format version {version};"
            f" this library reads version {records.FORMAT_VERSION}"
        )
    return dbs, False
