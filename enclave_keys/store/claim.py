"""One node per data directory: the claim a node process holds on it while it runs.

Two nodes on one directory — two processes, or two ``Node`` objects in one — would each
append to the log and each ratchet the storage epoch, destroying the epoch key the other
still wraps new round keys under: those keys would be lost at the next start. So a node
holds an exclusive ``flock`` on ``node.pid`` in its directory (the file also names its
pid) from open to stop, and a second one is refused with :class:`DirectoryInUse`.

The kernel drops the lock when the holder's file is closed or its process dies, even by
SIGKILL, so a claim is never stale; a ``node.pid`` left behind by a killed node is
reclaimed by the next one. Read-only tools (status, inspect, replay, export) take no
claim: LMDB lets them read beside a running node.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Final

from enclave_keys.errors import DirectoryInUse, StoreUnavailable

__all__ = ["CLAIM_FILE", "DirectoryClaim", "claimed_by"]

CLAIM_FILE: Final = "node.pid"
"""The file in a data directory that its node holds locked, and that names its pid."""


class DirectoryClaim:
    """An exclusive claim on a data directory; :meth:`release` gives it up (idempotent)."""

    __slots__ = ("_fd", "_path")

    def __init__(self, data_dir: Path) -> None:
        """Claim ``data_dir`` (which must exist), or raise :class:`DirectoryInUse` (held by
        another node) or :class:`StoreUnavailable` (``node.pid`` cannot be opened)."""
        self._path = Path(data_dir) / CLAIM_FILE
        self._fd: int | None = _lock(self._path, data_dir)
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        """Remove ``node.pid`` (while still holding it) and drop the lock."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if _same_file(fd, self._path):
                self._path.unlink(missing_ok=True)
        finally:
            os.close(fd)

    def __repr__(self) -> str:
        state = "released" if self._fd is None else "held"
        return f"DirectoryClaim({str(self._path.parent)!r}, {state})"


def _lock(path: Path, data_dir: Path) -> int:
    """An fd of ``path`` locked exclusively. A holder that releases unlinks the file
    while still holding it, so a lock won on a file that is no longer at ``path`` is
    worthless: then try again on the new file."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StoreUnavailable(f"cannot claim {data_dir}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _pid_in(fd)
            os.close(fd)
            holder = "another node" if pid is None else f"the node with pid {pid}"
            raise DirectoryInUse(f"{data_dir} is in use by {holder}") from None
        except BaseException:
            os.close(fd)
            raise
        if _same_file(fd, path):
            return fd
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        here = os.stat(path)
    except FileNotFoundError:
        return False
    there = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _pid_in(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def claimed_by(data_dir: Path) -> int | None:
    """The pid of the node holding ``data_dir``, or None if none does (a ``node.pid``
    nobody holds locked is left over from a node that died: it counts for nothing)."""
    try:
        fd = os.open(Path(data_dir) / CLAIM_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _pid_in(fd) or None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
