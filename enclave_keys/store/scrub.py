"""``scrub``: rewrite the LMDB file without its free pages, overwriting the old one in place.

Defence in depth for forward secrecy at rest: the epoch ratchet already makes every
leftover wrapped key useless, and a scrub removes the leftovers themselves (old event,
snapshot and keyring versions in free pages too). The node must be stopped.

Steps, each durable before the next, so a crash at any point loses nothing::

    1. compacting copy (``mdb_env_copy2`` with compaction) into  DIR/scrub.tmp/data.mdb
    2. rename  DIR/scrub.tmp  ->  DIR/scrub.ready           (the copy is complete)
    3. overwrite every byte of DIR/data.mdb with zeros, in place, fdatasync
    4. rename  DIR/scrub.ready/data.mdb  ->  DIR/data.mdb, remove scrub.ready

:func:`finish_pending_scrub` (run by :meth:`LmdbStore.open`) completes steps 3-4 when it
finds ``scrub.ready``, and discards a ``scrub.tmp`` left by a crash in step 1.
What the filesystem and the device do with overwritten blocks is outside our control
(``docs/threat-model.md``).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import lmdb
import structlog

from enclave_keys.errors import StoreUnavailable

__all__ = ["ScrubReport", "finish_pending_scrub", "scrub", "scrub_pending"]

_log = structlog.get_logger(__name__)

DATA_FILE: Final = "data.mdb"
TMP_DIR: Final = "scrub.tmp"
READY_DIR: Final = "scrub.ready"
_CHUNK: Final = 1 << 20


@dataclass(frozen=True, slots=True)
class ScrubReport:
    """Sizes before and after, and how many old bytes were overwritten."""

    old_size: int
    new_size: int
    overwritten: int


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _overwrite(path: Path, used: int | None = None) -> int:
    """Zero the first ``used`` bytes of ``path`` (all of it if ``None``) in place (same
    inode), then fdatasync. Returns how many bytes were zeroed.

    LMDB never writes past its last page, so ``used`` = (last page + 1) x page size
    covers every byte it ever wrote; the rest of a map-sized file is a sparse hole.
    """
    fd = os.open(path, os.O_WRONLY)
    try:
        size = os.fstat(fd).st_size
        if used is not None:
            size = min(size, used)
        zeros = bytes(_CHUNK)
        offset = 0
        while offset < size:
            offset += os.pwrite(fd, zeros[: min(_CHUNK, size - offset)], offset)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    return size


def _install(directory: Path, used: int | None = None) -> int:
    """Steps 3-4: overwrite the old file, move the compacted one into place."""
    ready = directory / READY_DIR
    old = directory / DATA_FILE
    overwritten = _overwrite(old, used) if old.exists() else 0
    os.replace(ready / DATA_FILE, directory / DATA_FILE)
    shutil.rmtree(ready)
    _fsync_dir(directory)
    return overwritten


def scrub_pending(directory: Path) -> bool:
    """Whether a scrub left its working directories in ``directory`` (running, or cut
    short by a crash)."""
    return (directory / TMP_DIR).exists() or (directory / READY_DIR).exists()


def finish_pending_scrub(directory: Path) -> bool:
    """Complete a scrub a crash interrupted; True if there was one to finish."""
    tmp = directory / TMP_DIR
    if tmp.exists():
        shutil.rmtree(tmp)  # step 1 never completed: the old file is intact
        _fsync_dir(directory)
    if not (directory / READY_DIR / DATA_FILE).is_file():
        return False
    overwritten = _install(directory)
    _log.warning("scrub_finished_after_crash", path=str(directory), overwritten=overwritten)
    return True


def scrub(directory: Path) -> ScrubReport:
    """Compact the store in ``directory`` and overwrite the old file (node stopped).

    :class:`StoreUnavailable` if ``directory`` holds no LMDB data file.
    """
    data = directory / DATA_FILE
    if not data.is_file():
        raise StoreUnavailable(f"no store at {directory}: {DATA_FILE} does not exist")
    finish_pending_scrub(directory)
    tmp = directory / TMP_DIR
    tmp.mkdir(mode=0o700)
    try:
        env = lmdb.open(str(directory), subdir=True, readonly=True, max_dbs=16, lock=True)
    except lmdb.Error as exc:
        shutil.rmtree(tmp)
        raise StoreUnavailable(f"{directory} cannot be opened as an LMDB environment") from exc
    try:
        used = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
        env.copy(str(tmp), compact=True)
    except BaseException:
        shutil.rmtree(tmp)
        raise
    finally:
        env.close()
    fd = os.open(tmp / DATA_FILE, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_dir(tmp)
    os.replace(tmp, directory / READY_DIR)
    _fsync_dir(directory)
    new_size = (directory / READY_DIR / DATA_FILE).stat().st_size
    overwritten = _install(directory, used)
    report = ScrubReport(old_size=overwritten, new_size=new_size, overwritten=overwritten)
    _log.info("store_scrubbed", path=str(directory), old_size=overwritten, new_size=new_size)
    return report
