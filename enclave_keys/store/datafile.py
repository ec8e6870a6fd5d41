"""The LMDB data file on disk, as both the store and scrub handle it: its name, how much
of it LMDB uses, the checks that keep a damaged file from killing the process, and the
directory fsync that makes a new or renamed file durable."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

import lmdb

from enclave_keys.errors import StoreUnavailable

__all__ = ["DATA_FILE", "check_not_truncated", "cover_the_map", "fsync_directory", "used_bytes"]

DATA_FILE: Final = "data.mdb"


def used_bytes(env: lmdb.Environment) -> int:
    """Bytes up to the end of the last committed page: (last page + 1) x page size."""
    used: int = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    return used


def check_not_truncated(env: lmdb.Environment, data_file: Path) -> None:
    """Refuse a data file shorter than its own meta page says (reading it would SIGBUS)."""
    needed = used_bytes(env)
    actual = data_file.stat().st_size
    if actual < needed:
        raise StoreUnavailable(
            f"{data_file} is truncated: {actual} bytes, but its pages need {needed}"
        )


def cover_the_map(env: lmdb.Environment, data_file: Path) -> None:
    """Extend ``data.mdb`` (sparsely) to the map size, as LMDB's own MDB_WRITEMAP mode does.

    A damaged page pointer or overflow size can make LMDB read past the end of the file;
    inside the map that is SIGBUS — the process dies — where a read of zeros gives LMDB's
    own error (a typed ``StoreUnavailable``/``CorruptRecord`` here). The extension takes
    no disk space.
    """
    size = env.info()["map_size"]
    if data_file.stat().st_size < size:
        os.truncate(data_file, size)


def fsync_directory(directory: Path) -> None:
    """Make the entries of ``directory`` (a file created, renamed or removed) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
