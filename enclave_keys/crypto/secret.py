"""Wipeable key memory: :class:`SecretBytes`.

Key bytes live in private anonymous memory (``mmap``), locked into RAM with ``mlock`` so
they are never written to swap, and marked ``MADV_DONTDUMP`` so they are left out of core
dumps:

* a secret of at most :data:`SLOT_SIZE` (64) bytes takes one slot of a process-wide
  *arena*: chunks of :data:`CHUNK_SIZE` (64 KiB, 1,024 slots), each mapped, marked and
  locked once. :meth:`SecretBytes.wipe` zeroes the whole slot, and the slot goes back to
  the free list (already zero, so every slot handed out is zero). Chunks are never
  unmapped: a node's key count rises and falls, and keeping the pages avoids re-paying
  ``mmap`` + ``mlock`` and holding locked pages that are half free;
* a larger secret keeps a page-aligned mapping of its own, which ``wipe`` zeroes, then
  unlocks and unmaps.

If ``mlock`` is refused (``RLIMIT_MEMLOCK`` too low, no ``CAP_IPC_LOCK``, a platform
without it) the secret still works, unlocked, and the process logs one structured
``secret_memory_not_locked`` warning.

**Fork.** A child process inherits no key bytes: every mapping is also marked
``MADV_WIPEONFORK`` (Linux 4.14+), so the kernel gives the child zero-filled pages in its
place; where that advice is refused, the child zeroes the mapping itself, first thing
after ``os.fork()`` (``os.register_at_fork``; a ``fork`` + ``exec`` such as
``subprocess`` runs no Python in the child, and the advice alone covers it). In the child
every secret made before the fork counts as wiped: ``borrow`` raises
:class:`~enclave_keys.errors.SecretWiped`, and new secrets come from fresh memory. What
this cannot cover: copies outside these mappings (below), which a forked child inherits
like any other heap memory. Open a new node in a child; never use an inherited one.

What this cannot do: Python and OpenSSL make copies we cannot reach. An immutable
``bytes`` a key came from, anything a caller copies out of a borrowed view, and the key
schedule inside an ``AESGCM`` object all live outside this buffer. ``docs/crypto.md``
lists them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hmac
import mmap
import os
import sys
import threading
import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any, NoReturn, Self

import structlog

from enclave_keys.errors import InvalidKeyMaterial, SecretWiped

__all__ = ["CHUNK_SIZE", "SLOT_SIZE", "Entropy", "NoCopy", "SecretBytes"]

_log = structlog.get_logger(__name__)

Entropy = Callable[[int], bytes]
"""An injectable entropy source: ``entropy(n)`` returns exactly ``n`` bytes.

FOR DETERMINISTIC SIMULATIONS AND TESTS ONLY. A seeded source makes every key and nonce
predictable; a production node must always leave it as ``None`` (the OS CSPRNG).
"""


def _load_libc() -> Any:
    """The C library (for mlock/munlock/getrandom), or None where it cannot be loaded."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except (OSError, TypeError):
        return None
    for name in ("mlock", "munlock"):
        if not hasattr(libc, name):
            return None
        func = getattr(libc, name)
        func.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        func.restype = ctypes.c_int
    if hasattr(libc, "getrandom"):
        libc.getrandom.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
        libc.getrandom.restype = ctypes.c_ssize_t
    return libc


_LIBC: Any = _load_libc()
_warn_lock = threading.Lock()
_warned_not_locked = False


def _warn_not_locked(size: int, mapped: int, err: int | None) -> None:
    """Log ``secret_memory_not_locked`` the first time only (once per process)."""
    global _warned_not_locked
    with _warn_lock:
        if _warned_not_locked:
            return
        _warned_not_locked = True
    _log.warning(
        "secret_memory_not_locked",
        size=size,
        mapped=mapped,
        errno=errno.errorcode.get(err, str(err)) if err is not None else "unsupported",
        hint="raise RLIMIT_MEMLOCK or grant CAP_IPC_LOCK; key memory may reach swap",
    )


_MADV_WIPEONFORK: int | None = getattr(
    mmap, "MADV_WIPEONFORK", 18 if sys.platform.startswith("linux") else None
)
"""``madvise`` advice: a forked child gets zero-filled pages here (Linux 4.14+; Python
names the constant from 3.12 on)."""

_generation = 0
"""Bumped in a forked child: secrets made in an earlier generation are unusable there."""

_UNWIPED_ON_FORK: set[mmap.mmap] = set()
"""Live mappings the kernel refused to wipe on fork: a forked child zeroes these itself."""


def _wipe_on_fork(mapping: mmap.mmap) -> bool:
    """Ask the kernel to hand a forked child zero pages for ``mapping``; False if refused."""
    if _MADV_WIPEONFORK is None:
        return False
    try:
        mapping.madvise(_MADV_WIPEONFORK)
    except OSError:  # EINVAL: a kernel older than 4.14
        return False
    return True


def _map(size: int) -> tuple[mmap.mmap, int]:
    """A private anonymous mapping of at least one page for ``size`` bytes, and its address.

    Dump-excluded, and wiped in a forked child (by the kernel, or by :func:`_in_child`)."""
    pages = max(1, -(-size // mmap.PAGESIZE))
    if hasattr(mmap, "MAP_PRIVATE"):
        mapping = mmap.mmap(
            -1,
            pages * mmap.PAGESIZE,
            flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
        )
    else:  # pragma: no cover - non-POSIX
        mapping = mmap.mmap(-1, pages * mmap.PAGESIZE)
    if hasattr(mmap, "MADV_DONTDUMP"):
        mapping.madvise(mmap.MADV_DONTDUMP)
    if not _wipe_on_fork(mapping):
        _UNWIPED_ON_FORK.add(mapping)
    # The ctypes array exports the buffer only for this one expression.
    address = ctypes.addressof((ctypes.c_char * len(mapping)).from_buffer(mapping))
    return mapping, address


def _lock_pages(address: int, length: int, size: int) -> bool:
    """mlock the mapping; on refusal warn (once per process) and report False."""
    if _LIBC is None:
        _warn_not_locked(size, length, None)
        return False
    if _LIBC.mlock(address, length) == 0:
        return True
    _warn_not_locked(size, length, ctypes.get_errno())
    return False


SLOT_SIZE = 64
"""Secrets of at most this many bytes share arena chunks, one slot each."""

CHUNK_SIZE = 64 * 1024
"""Bytes per arena chunk (a multiple of the page size): 1,024 slots."""

_SLOTS_PER_CHUNK = CHUNK_SIZE // SLOT_SIZE
_SLOT_ARRAYS = [ctypes.c_ubyte * n for n in range(SLOT_SIZE + 1)]
_ZERO_SLOT = bytes(SLOT_SIZE)


class _Chunk:
    """One mapping of the arena: mapped, dump-excluded and locked (if allowed) once."""

    __slots__ = ("address", "locked", "mapping", "view")

    def __init__(self, size: int) -> None:
        self.mapping, self.address = _map(CHUNK_SIZE)
        self.locked = _lock_pages(self.address, CHUNK_SIZE, size)
        self.view = memoryview(self.mapping)  # for good: a chunk is never unmapped


class _Arena:
    """Slots of :data:`SLOT_SIZE` bytes carved out of shared chunks; one lock for all.

    Slot ``n`` is at offset ``(n % 1024) * 64`` of chunk ``n // 1024``. A slot is handed
    out fresh (a new chunk is zero-filled by the kernel) or from the free list, where
    only zeroed slots are put. Chunks are never unmapped or unlocked.
    """

    __slots__ = ("_chunks", "_free", "_lock", "_next")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._chunks: list[_Chunk] = []
        self._free: list[int] = []  # zeroed slots given back; reused last in, first out
        self._next = 0  # the first slot never handed out

    def take(self, size: int) -> tuple[int, int, bool]:
        """A zeroed slot for a secret of ``size`` bytes: (slot, address, locked)."""
        with self._lock:
            if self._free:
                slot = self._free.pop()
            else:
                slot = self._next
                if slot == len(self._chunks) * _SLOTS_PER_CHUNK:
                    self._chunks.append(_Chunk(size))
                self._next = slot + 1
            chunk = self._chunks[slot // _SLOTS_PER_CHUNK]
        return slot, chunk.address + (slot % _SLOTS_PER_CHUNK) * SLOT_SIZE, chunk.locked

    def view(self, slot: int, size: int) -> memoryview:
        """A writable view of the first ``size`` bytes of ``slot`` (no lock needed)."""
        offset = (slot % _SLOTS_PER_CHUNK) * SLOT_SIZE
        return self._chunks[slot // _SLOTS_PER_CHUNK].view[offset : offset + size]

    def zero(self, slot: int) -> None:
        """Overwrite all :data:`SLOT_SIZE` bytes of ``slot`` with zeros (no lock needed)."""
        with self.view(slot, SLOT_SIZE) as whole_slot:
            whole_slot[:] = _ZERO_SLOT

    def give_back(self, slot: int) -> None:
        """Return a slot that has already been zeroed to the free list."""
        with self._lock:
            self._free.append(slot)


_ARENA = _Arena()


def _in_child() -> None:
    """Run first thing in a child after ``os.fork()``: the inherited secrets become unusable
    (a new generation), new ones come from a new arena, the warning below gets a new lock
    (the old locks may have been held by a thread that does not exist here), and mappings
    the kernel does not wipe on fork are zeroed now. Takes no lock: only this thread
    exists in the child."""
    global _ARENA, _generation, _warn_lock
    _generation += 1
    _ARENA = _Arena()
    _warn_lock = threading.Lock()
    for mapping in list(_UNWIPED_ON_FORK):
        with contextlib.suppress(ValueError):  # closed meanwhile
            mapping[:] = bytes(len(mapping))
    _UNWIPED_ON_FORK.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_in_child)


def _release(home: _Arena | mmap.mmap, address: int, length: int, slot: int, locked: bool) -> None:
    """Give back secret memory that has already been zeroed.

    An arena slot returns to the free list; an own mapping is unlocked and unmapped.
    """
    if isinstance(home, _Arena):
        home.give_back(slot)
        return
    if locked and _LIBC is not None:
        _LIBC.munlock(address, length)
    _UNWIPED_ON_FORK.discard(home)
    # If a view a caller kept alive still exports the buffer, close() refuses: the memory
    # is already zero, and the mapping is unmapped when that last view is collected.
    with contextlib.suppress(BufferError):
        home.close()


def _slot_view(address: int, size: int) -> tuple[memoryview, weakref.ref[Any]]:
    """A writable view of ``size`` bytes at ``address``, and a weak reference to its exporter.

    The exporter dies as soon as every view of it is released, so a live exporter after
    the release means a view escaped (a slice or export the caller kept).
    """
    array = _SLOT_ARRAYS[size].from_address(address)
    return memoryview(array).cast("B"), weakref.ref(array)


def _fill_from_os(view: memoryview) -> None:
    """Fill ``view`` from the OS CSPRNG without an intermediate ``bytes`` object."""
    if _LIBC is not None and hasattr(_LIBC, "getrandom") and len(view) > 0:
        target = (ctypes.c_char * len(view)).from_buffer(view)
        try:
            filled = 0
            while filled < len(view):
                got = _LIBC.getrandom(ctypes.addressof(target) + filled, len(view) - filled, 0)
                if got < 0:
                    err = ctypes.get_errno()
                    if err == errno.EINTR:
                        continue
                    raise OSError(err, "getrandom failed")
                filled += got
        finally:
            del target
        return
    with open("/dev/urandom", "rb", buffering=0) as source:
        filled = 0
        while filled < len(view):
            got = source.readinto(view[filled:])
            if not got:
                raise OSError("short read from /dev/urandom")
            filled += got


class NoCopy:
    """Mixin: refuse pickling and copying (an object that owns key memory must stay unique)."""

    __slots__ = ()

    def __reduce__(self) -> NoReturn:
        raise TypeError(f"{type(self).__name__} cannot be pickled")

    def __reduce_ex__(self, protocol: Any) -> NoReturn:
        raise TypeError(f"{type(self).__name__} cannot be pickled")

    def __copy__(self) -> NoReturn:
        raise TypeError(f"{type(self).__name__} cannot be copied")

    def __deepcopy__(self, memo: Any) -> NoReturn:
        raise TypeError(f"{type(self).__name__} cannot be copied")


class SecretBytes(NoCopy):
    """Key bytes in locked, dump-excluded, wipeable memory.

    Build one with :meth:`random`, :meth:`from_bytes` or :meth:`from_buffer`; read it only
    inside ``with secret.borrow() as view:``; destroy it with :meth:`wipe` (or by using
    the secret as a context manager). Equality, hashing and ``bytes()`` are deliberately
    not by value, and the repr shows the size and state only. Thread-safe.
    """

    __slots__ = (
        "_address",
        "_arena",
        "_borrows",
        "_escaped",
        "_generation",
        "_lock",
        "_locked",
        "_mapping",
        "_size",
        "_slot",
        "_wiped",
    )

    _address: int  # of the first byte: the slot, or the own mapping
    _arena: _Arena | None  # the arena holding the slot (None: own mapping, or given back)
    _borrows: int
    _escaped: bool  # a view of the slot outlived its borrow: never give the slot back
    _generation: int  # the fork generation it was made in (see _in_child)
    _lock: threading.Lock
    _locked: bool
    _mapping: mmap.mmap | None  # the own mapping (None: arena slot, or unmapped)
    _size: int
    _slot: int  # the arena slot number (-1: own mapping)
    _wiped: bool

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise TypeError("use SecretBytes.random(), .from_bytes() or .from_buffer()")

    # --- construction ------------------------------------------------------------------

    @classmethod
    def _allocate(cls, size: int) -> Self:
        """A zeroed, locked (where possible) secret of ``size`` bytes."""
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidKeyMaterial("secret size must be a non-negative integer")
        self = object.__new__(cls)
        self._generation = _generation
        self._lock = threading.Lock()
        self._borrows = 0
        self._escaped = False
        self._wiped = False
        self._size = size
        self._arena = self._mapping = None
        self._slot = -1
        if size <= SLOT_SIZE:
            arena = _ARENA
            self._slot, self._address, self._locked = arena.take(size)
            self._arena = arena
        else:
            self._mapping, self._address = _map(size)
            self._locked = _lock_pages(self._address, len(self._mapping), size)
        return self

    @classmethod
    def _filled_by(cls, size: int, writer: Callable[[memoryview], object]) -> Self:
        """A secret of ``size`` bytes written in place by ``writer(view)``.

        For the crypto package: lets a primitive (``decrypt_into``, ``derive_into``)
        write straight into key memory. If ``writer`` raises, the secret is wiped first.
        """
        self = cls._allocate(size)
        try:
            if self._mapping is not None:
                with memoryview(self._mapping) as whole, whole[:size] as view:
                    writer(view)
            else:
                # The writers are this package's own primitives, which keep no view: no
                # escape check here (borrow() has one).
                assert self._arena is not None
                with self._arena.view(self._slot, size) as view:
                    writer(view)
        except BaseException:
            self.wipe()
            raise
        return self

    @classmethod
    def random(cls, size: int, entropy: Entropy | None = None) -> Self:
        """``size`` fresh random bytes, read straight into the buffer from the OS CSPRNG.

        ``entropy`` is for DETERMINISTIC SIMULATIONS ONLY (see :data:`Entropy`); its
        output is an immutable ``bytes`` that cannot be wiped.
        """
        if entropy is None:
            return cls._filled_by(size, _fill_from_os)

        def copy_entropy(view: memoryview) -> None:
            chunk = entropy(size)
            if not isinstance(chunk, bytes) or len(chunk) != size:
                raise InvalidKeyMaterial(f"entropy source must return exactly {size} bytes")
            view[:] = chunk

        return cls._filled_by(size, copy_entropy)

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        """Copy ``data`` into secret memory.

        ``data`` itself is immutable and CANNOT be wiped: it stays in the Python heap
        until collected (and its memory reused). Prefer :meth:`random` or
        :meth:`from_buffer` for real keys.
        """
        with memoryview(data) as source:
            return cls._copy_of(source)

    @classmethod
    def from_buffer(cls, buffer: bytearray | memoryview, *, wipe_source: bool = True) -> Self:
        """Copy a mutable buffer into secret memory, then zero the source (by default).

        Earlier copies the buffer may have left behind (a ``bytearray`` that was resized,
        for instance) cannot be reached.
        """
        with memoryview(buffer) as source:
            if wipe_source and source.readonly:
                raise TypeError("cannot wipe a read-only source; pass wipe_source=False")
            secret = cls._copy_of(source)
            if wipe_source:
                with source.cast("B") as flat:
                    flat[:] = bytes(flat.nbytes)
            return secret

    @classmethod
    def _copy_of(cls, source: memoryview) -> Self:
        if not source.c_contiguous:
            raise TypeError("the source must be a contiguous buffer")
        with source.cast("B") as flat:

            def copy(view: memoryview) -> None:
                view[:] = flat

            return cls._filled_by(flat.nbytes, copy)

    # --- access ------------------------------------------------------------------------

    def borrow(self) -> AbstractContextManager[memoryview]:
        """A read-only view of the key bytes for a ``with`` block, released when it ends.

        Raises :class:`SecretWiped` (on entering the block) if the secret was wiped. A
        wipe during the block zeroes the memory at once; the unmap waits for the block
        to end.
        """
        return _Borrow(self)

    def _begin_borrow(self) -> tuple[memoryview, list[memoryview], weakref.ref[Any] | None]:
        """Start a borrow: (read-only view, views to release at its end, the exporter of
        an arena slot's view — alive after the release means the view escaped)."""
        if self._generation != _generation:
            raise SecretWiped(f"{self!r}: made before a fork, unusable in the child")
        with self._lock:
            if self._wiped or (self._mapping is None and self._arena is None):
                raise SecretWiped(f"{self!r} was used after it was wiped")
            self._borrows += 1
            mapping = self._mapping
        try:
            if mapping is None:  # an arena slot
                writable, exporter = _slot_view(self._address, self._size)
                view = writable.toreadonly()
                writable.release()
                return view, [view], exporter
            whole = memoryview(mapping)
            view = whole[: self._size].toreadonly()
            return view, [view, whole], None
        except BaseException:
            self._end_borrow(escaped=False)
            raise

    def _end_borrow(self, *, escaped: bool) -> None:
        with self._lock:
            self._borrows -= 1
            self._escaped = self._escaped or escaped
            if not self._wiped or self._borrows:
                return
            home = self._detach()
        if home is not None:
            self._give_back(home)

    def _detach(self) -> _Arena | mmap.mmap | None:
        """Under ``_lock``, once zeroed: take the memory away to give back (at most once).

        None if it was already given back, or if it is a slot a view escaped from: that
        slot stays zero and is never reused.
        """
        home: _Arena | mmap.mmap | None = self._arena if self._mapping is None else self._mapping
        self._mapping = self._arena = None
        if self._escaped and isinstance(home, _Arena):
            return None
        return home

    def _give_back(self, home: _Arena | mmap.mmap) -> None:
        length = SLOT_SIZE if isinstance(home, _Arena) else len(home)
        _release(home, self._address, length, self._slot, self._locked)

    def equals(self, other: SecretBytes | bytes | bytearray | memoryview) -> bool:
        """Constant-time comparison of contents (the lengths are not secret)."""
        if isinstance(other, SecretBytes):
            with self.borrow() as mine, other.borrow() as theirs:
                return hmac.compare_digest(mine, theirs)
        with self.borrow() as mine:
            return hmac.compare_digest(mine, other)

    def __len__(self) -> int:
        return self._size

    @property
    def is_wiped(self) -> bool:
        """True once wiped, and in a forked child for every secret made before the fork."""
        return self._wiped or self._generation != _generation

    @property
    def is_locked(self) -> bool:
        """True while the memory is mlocked (False if mlock was refused, or after wipe)."""
        return self._locked and not self.is_wiped

    # --- destruction -------------------------------------------------------------------

    def wipe(self) -> None:
        """Zero the memory at once, then give it back. Idempotent.

        An arena slot is zeroed whole (all 64 bytes) and returns to the free list; an own
        mapping is zeroed whole, then unlocked and unmapped. While a borrow is open, the
        memory is zeroed now and given back when the last borrow ends.

        In a forked child, a secret made before the fork is only marked wiped: its memory
        is already zero there, and its locks may have been held by a thread the child
        does not have.
        """
        if self._generation != _generation:
            self._wiped = True
            return
        with self._lock:
            if self._wiped or (self._mapping is None and self._arena is None):
                return
            self._wiped = True
            if self._mapping is not None:
                self._mapping[:] = bytes(len(self._mapping))
            elif self._arena is not None:
                self._arena.zero(self._slot)
            if self._borrows:
                return  # the last borrow to end gives the memory back
            home = self._detach()
        if home is not None:
            self._give_back(home)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.wipe()

    def __del__(self) -> None:
        try:
            if hasattr(self, "_lock"):
                self.wipe()
        except Exception:  # noqa: S110 - best effort, and nothing may escape __del__
            pass

    def __repr__(self) -> str:
        size = getattr(self, "_size", 0)
        if getattr(self, "_wiped", True) or self.is_wiped:
            return f"SecretBytes(size={size}, wiped)"
        return f"SecretBytes(size={size}, {'locked' if self._locked else 'not locked'})"

    __str__ = __repr__


class _Borrow:
    """One :meth:`SecretBytes.borrow` (a plain class: a generator-based context manager
    cost about three times as much, and a key is borrowed several times per round)."""

    __slots__ = ("_exporter", "_held", "_secret")

    def __init__(self, secret: SecretBytes) -> None:
        self._secret = secret

    def __enter__(self) -> memoryview:
        view, self._held, self._exporter = self._secret._begin_borrow()
        return view

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for held in self._held:
            with contextlib.suppress(BufferError):  # the caller exported the view
                held.release()
        # A slice or export of an arena slot's view still alive would see whatever
        # secret gets this slot next: then the slot is retired instead of reused.
        exporter = self._exporter
        del self._held, self._exporter
        self._secret._end_borrow(escaped=exporter is not None and exporter() is not None)
