"""``scrub``: rewrite the LMDB file without its free pages, overwriting the old one in place.

Defence in depth for forward secrecy at rest: the epoch ratchet already makes every
leftover wrapped key useless, and a scrub removes the leftovers themselves (old event,
snapshot and keyring versions in free pages too). The node must be stopped.

Steps, each durable before the next, so a crash at any point loses nothing::

    1. compacting copy (``mdb_env_copyfd2`` with compaction) into  DIR/scrub.tmp/data.mdb
       (mode 0600), and the old file's used size into  DIR/scrub.tmp/used
    2. rename  DIR/scrub.tmp  ->  DIR/scrub.ready           (the copy is complete)
    3. overwrite the data of DIR/data.mdb (not its holes) with zeros, in place, fdatasync
    4. rename  DIR/scrub.ready/data.mdb  ->  DIR/data.mdb, remove scrub.ready

:func:`finish_pending_scrub` (run by :meth:`LmdbStore.open`) completes steps 3-4 when it
finds ``scrub.ready``, and discards a ``scrub.tmp`` left by a crash in step 1.
Failures are the store's typed errors: a damaged page :class:`CorruptRecord`, anything
else from LMDB or the OS :class:`StoreUnavailable`.
What the filesystem and the device do with overwritten blocks is outside our control
(``docs/threat-model.md``).
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import lmdb
import structlog

from enclave_keys.errors import CorruptRecord, StoreUnavailable
from enclave_keys.store.datafile import (
    DATA_FILE,
    check_not_truncated,
    cover_the_map,
    fsync_directory,
    used_bytes,
)

__all__ = ["ScrubReport", "finish_pending_scrub", "scrub", "scrub_pending"]

_log = structlog.get_logger(__name__)

TMP_DIR: Final = "scrub.tmp"
READY_DIR: Final = "scrub.ready"
USED_FILE: Final = "used"  # in scrub.ready: the old file's used bytes, ASCII decimal
_FILE_MODE: Final = 0o600
_CHUNK: Final = 1 << 20


@dataclass(frozen=True, slots=True)
class ScrubReport:
    """Sizes before and after, and how many old bytes were overwritten."""

    old_size: int
    new_size: int
    overwritten: int


@contextmanager
def _typed_errors(what: str) -> Iterator[None]:
    """LMDB's and the OS's failures as the store's typed errors, naming ``what`` failed."""
    try:
        yield
    except (lmdb.CorruptedError, lmdb.PageNotFoundError) as exc:
        raise CorruptRecord(f"{what}: LMDB reports a damaged page: {exc}") from exc
    except (lmdb.Error, OSError) as exc:
        raise StoreUnavailable(f"{what}: {exc}") from exc


def _data_regions(fd: int, end: int) -> Iterator[tuple[int, int]]:
    """The ``(start, stop)`` ranges below ``end`` that hold data, holes skipped: a hole
    holds nothing to erase, and writing zeros into it would take real disk space (a
    store's file is extended sparsely to its map size, up to 1 TiB). A filesystem that
    cannot tell holes reports everything as data."""
    offset = 0
    while offset < end:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
            stop = os.lseek(fd, start, os.SEEK_HOLE)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after offset
                return
            start, stop = offset, end
        if start >= end:
            return
        stop = min(stop, end)
        yield start, stop
        offset = stop


def _holes_known(fd: int, size: int) -> bool:
    """Whether zeroing every data region of the open file up to ``size`` allocates no new
    disk: the file has no holes, or the filesystem reports them (``SEEK_HOLE``)."""
    if os.fstat(fd).st_blocks * 512 >= size:
        return True  # not sparse
    try:
        return os.lseek(fd, 0, os.SEEK_HOLE) < size
    except OSError:
        return False


def _overwrite(path: Path, used: int | None = None) -> int:
    """Zero every byte of ``path`` that holds data, in place (same inode), then fdatasync.
    Returns how many bytes were zeroed.

    ``used`` = (last page + 1) x page size does not bound what LMDB wrote: a commit cut
    short (killed between writing its pages and its meta page, or failing there) leaves
    pages past the last committed one, which later commits may never reuse. So where the
    filesystem tells holes from data, every data region up to the end of the file is
    zeroed, and only the holes of the sparse, map-sized file are skipped. ``used`` bounds
    the overwrite only on a filesystem that reports a sparse file as all data, where
    zeroing it whole would allocate the whole map (up to 1 TiB).
    """
    fd = os.open(path, os.O_WRONLY)
    try:
        size = os.fstat(fd).st_size
        if used is not None and not _holes_known(fd, size):
            size = min(size, used)
        zeros = bytes(_CHUNK)
        zeroed = 0
        for start, stop in _data_regions(fd, size):
            offset = start
            while offset < stop:
                offset += os.pwrite(fd, zeros[: min(_CHUNK, stop - offset)], offset)
            zeroed += stop - start
        os.fdatasync(fd)
    finally:
        os.close(fd)
    return zeroed


def _install(directory: Path, used: int | None = None) -> int:
    """Steps 3-4: overwrite the old file, move the compacted one into place."""
    ready = directory / READY_DIR
    old = directory / DATA_FILE
    overwritten = _overwrite(old, used) if old.exists() else 0
    os.replace(ready / DATA_FILE, directory / DATA_FILE)
    shutil.rmtree(ready)
    fsync_directory(directory)
    return overwritten


def _recorded_used(ready: Path) -> int | None:
    """The used size step 1 recorded; ``None`` for a marker from before it was recorded
    (then only the holes bound the overwrite)."""
    try:
        raw = (ready / USED_FILE).read_bytes()
    except FileNotFoundError:
        return None
    if raw.strip().isdigit():
        return int(raw)
    _log.warning("scrub_used_size_unreadable", path=str(ready))
    return None


def scrub_pending(directory: Path) -> bool:
    """Whether a scrub left its working directories in ``directory`` (running, or cut
    short by a crash)."""
    return (directory / TMP_DIR).exists() or (directory / READY_DIR).exists()


def finish_pending_scrub(directory: Path) -> bool:
    """Complete a scrub a crash interrupted; True if there was one to finish.

    :class:`StoreUnavailable` (or :class:`CorruptRecord`) if it cannot be finished now;
    every step may be repeated, so the next open tries again.
    """
    with _typed_errors(f"cannot finish the scrub interrupted in {directory}"):
        tmp = directory / TMP_DIR
        ready = directory / READY_DIR
        if tmp.exists():
            shutil.rmtree(tmp)  # step 1 never completed: the old file is intact
            fsync_directory(directory)
        if not (ready / DATA_FILE).is_file():
            if ready.exists():  # step 4 moved the copy, then the crash came
                shutil.rmtree(ready)
                fsync_directory(directory)
            return False
        overwritten = _install(directory, _recorded_used(ready))
    _log.warning("scrub_finished_after_crash", path=str(directory), overwritten=overwritten)
    return True


def scrub(directory: Path) -> ScrubReport:
    """Compact the store in ``directory`` and overwrite the old file (node stopped).

    :class:`StoreUnavailable` if ``directory`` holds no usable LMDB data file (missing,
    truncated, unreadable), :class:`CorruptRecord` if LMDB finds a damaged page while
    copying; either way the store is left as it was.
    """
    data = directory / DATA_FILE
    if not data.is_file():
        raise StoreUnavailable(f"no store at {directory}: {DATA_FILE} does not exist")
    finish_pending_scrub(directory)
    tmp = directory / TMP_DIR
    with _typed_errors(f"cannot scrub {directory}, the store is unchanged"):
        tmp.mkdir(mode=0o700)
        try:
            used = _compacting_copy(directory, tmp)
        except BaseException:
            shutil.rmtree(tmp)
            raise
        fsync_directory(tmp)
        os.replace(tmp, directory / READY_DIR)
        fsync_directory(directory)
    with _typed_errors(f"scrub of {directory} cut short; the next open finishes it"):
        new_size = (directory / READY_DIR / DATA_FILE).stat().st_size
        overwritten = _install(directory, used)
    report = ScrubReport(old_size=overwritten, new_size=new_size, overwritten=overwritten)
    _log.info("store_scrubbed", path=str(directory), old_size=overwritten, new_size=new_size)
    return report


def _compacting_copy(directory: Path, tmp: Path) -> int:
    """Step 1: the compacted copy (mode 0600, durable) and the old file's used size,
    recorded beside it for step 3. Returns the used size.

    The environment is checked as :meth:`LmdbStore.open` checks it: a data file shorter
    than its pages is refused, and a short one is extended to the map, since reading past
    the end of the file would kill the process (SIGBUS) instead of raising.
    """
    data = directory / DATA_FILE
    env = lmdb.open(str(directory), subdir=True, readonly=True, max_dbs=16, lock=True)
    try:
        check_not_truncated(env, data)
        cover_the_map(env, data)
        used = used_bytes(env)
        fd = os.open(tmp / DATA_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE)
        try:
            env.copyfd(fd, compact=True)
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        env.close()
    fd = os.open(tmp / USED_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE)
    try:
        os.write(fd, b"%d\n" % used)
        os.fsync(fd)
    finally:
        os.close(fd)
    return used
