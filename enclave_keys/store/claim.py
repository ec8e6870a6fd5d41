"""One node per data directory: the claim a node process holds on it while it runs.

Two nodes on one directory — two processes, or two ``Node`` objects in one — would each
append to the log and each ratchet the storage epoch, destroying the epoch key the other
still wraps new round keys under: those keys would be lost at the next start. So a node
holds an exclusive ``flock`` on ``node.pid`` in its directory from open to stop, and a
second one is refused with :class:`DirectoryInUse`. The file names the holder: its pid and
its role (``node`` for any ``Node.open``; the CLI marks ``run``, ``scrub`` and ``init``), as
``"<pid> <role>\\n"``.

The kernel drops the lock when the holder's file is closed or its process dies, even by
SIGKILL, so a claim is never stale; a ``node.pid`` left behind by a killed node is
reclaimed by the next one. Read-only tools (status, inspect, replay, export) take no
claim: LMDB lets them read beside a running node.
"""

from __future__ import annotations

import fcntl
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from enclave_keys.errors import DirectoryInUse, StoreUnavailable

__all__ = ["CLAIM_FILE", "ClaimHolder", "DirectoryClaim", "claim_holder", "held_here"]

CLAIM_FILE: Final = "node.pid"
"""The file in a data directory that its node holds locked, and that names it."""

_ATTEMPTS: Final = 20
_PAUSE: Final = 0.0025
"""A lock found taken is tried again for up to ~50 ms: :func:`claim_holder` holds it
shared for an instant to look, and that must not turn a node away."""

_held: set[Path] = set()  # the directories this process holds


@dataclass(frozen=True, slots=True)
class ClaimHolder:
    """Who holds a directory: ``pid`` and ``role`` as its ``node.pid`` names them (None
    while the holder has not written them yet)."""

    pid: int | None
    role: str | None


class DirectoryClaim:
    """An exclusive claim on a data directory; :meth:`release` gives it up (idempotent)."""

    __slots__ = ("_dir", "_fd", "_path")

    def __init__(self, data_dir: Path, role: str = "node") -> None:
        """Claim ``data_dir`` (which must exist), or raise :class:`DirectoryInUse` (held by
        another node) or :class:`StoreUnavailable` (``node.pid`` cannot be written)."""
        self._dir = Path(data_dir).resolve()
        self._path = self._dir / CLAIM_FILE
        fd = _lock(self._path, data_dir)
        self._fd: int | None = fd
        try:
            self.describe(role)
        except BaseException:
            self._fd = None
            os.close(fd)  # drops the lock: the claim was never had
            raise
        _held.add(self._dir)

    def describe(self, role: str) -> None:
        """Write ``"<pid> <role>"`` into ``node.pid`` (the CLI's ``run`` marks itself)."""
        fd = self._fd
        if fd is None:
            raise StoreUnavailable("the claim was released")
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {role}\n".encode("ascii"), 0)
        except OSError as exc:
            raise StoreUnavailable(f"cannot write {self._path}: {exc.strerror}") from None

    def release(self) -> None:
        """Remove ``node.pid`` (while still holding it) and drop the lock."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        _held.discard(self._dir)
        try:
            if _same_file(fd, self._path):
                self._path.unlink(missing_ok=True)
        finally:
            os.close(fd)

    def __repr__(self) -> str:
        state = "released" if self._fd is None else "held"
        return f"DirectoryClaim({str(self._dir)!r}, {state})"


def held_here(data_dir: Path) -> bool:
    """Whether this process holds ``data_dir``."""
    return Path(data_dir).resolve() in _held


def claim_holder(data_dir: Path) -> ClaimHolder | None:
    """Who holds ``data_dir``, or None if nobody does (a ``node.pid`` nobody holds locked
    is left over from a node that died: it counts for nothing)."""
    try:
        fd = os.open(Path(data_dir) / CLAIM_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder_in(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _lock(path: Path, data_dir: Path) -> int:
    """An fd of ``path`` locked exclusively. A holder that releases unlinks the file
    while still holding it, so a lock won on a file that is no longer at ``path`` is
    worthless: then try again on the new file."""
    attempts = 0
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StoreUnavailable(f"cannot claim {data_dir}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _same_file(fd, path):
                return fd
        except BlockingIOError:
            attempts += 1
            if attempts >= _ATTEMPTS:
                holder = _holder_in(fd)
                os.close(fd)
                who = "another node" if holder.pid is None else f"the node with pid {holder.pid}"
                raise DirectoryInUse(f"{data_dir} is in use by {who}") from None
            time.sleep(_PAUSE)
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        here = os.stat(path)
    except FileNotFoundError:
        return False
    there = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _holder_in(fd: int) -> ClaimHolder:
    """The pid and role a ``node.pid`` names (None for what it does not say)."""
    try:
        fields = os.pread(fd, 64, 0).decode("ascii").split()
    except (OSError, UnicodeDecodeError):
        return ClaimHolder(None, None)
    pid = int(fields[0]) if fields and fields[0].isdigit() else None
    role = fields[1] if len(fields) > 1 else None
    return ClaimHolder(pid or None, role)
