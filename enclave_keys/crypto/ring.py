"""The keyring: the node's KEK versions, their states, leases, and the sealed keyring blob.

A :class:`Keyring` holds KEK versions, each *active* (wraps new round keys — exactly one
version is), *decrypt-only* (still unwraps, never wraps) or *retired* (its key is
destroyed; blobs naming it can no longer be unwrapped). The active version is always the
newest. A keyring never changes its versions in place: :meth:`Keyring.rotated` and
:meth:`Keyring.with_retired` return a *new* keyring holding its own copies of the keys,
so wiping (sealing) one keyring never touches a key another one uses.

Sealed keyring blob, format version 1 (``docs/key-hierarchy.md``)::

    offset  size  field
    0       1     version, 0x01
    1       12    nonce, random per seal
    13      n     AES-256-GCM encryption of the plaintext below, under the root key
    13+n    16    GCM tag

    AAD = frame(b"enclave_keys/keyring/v1", bytes 0..0 (the version byte))

    plaintext (n = 4 + 37 * count bytes):
    0       4     count of entries, u32 big-endian, >= 1
    then per entry, in strictly increasing version order:
    +0      4     KEK version, u32 big-endian (1 .. 2**32 - 1)
    +4      1     state: 1 active, 2 decrypt-only, 3 retired
    +5      32    the KEK (all zeros for a retired version)

Exactly one entry is active and it is the newest. The plaintext is built and parsed in
locked key memory (:class:`SecretBytes`), never in a Python ``bytes``.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType
from typing import Final, Protocol, Self

import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from enclave_keys.crypto._common import KEY_SIZE, NONCE_SIZE, TAG_SIZE, frame, random_bytes
from enclave_keys.crypto.keyring import Kek
from enclave_keys.crypto.lease import DEFAULT_LEASE_WAIT, LeaseGate
from enclave_keys.crypto.secret import Entropy, NoCopy, SecretBytes
from enclave_keys.errors import (
    CorruptRecord,
    InvalidKeyMaterial,
    KekRetired,
    MasterKeyError,
    Sealed,
    UnknownKekVersion,
    UnwrapFailed,
)
from enclave_keys.ids import KekVersion

__all__ = [
    "FIRST_KEK_VERSION",
    "KEYRING_BLOB_VERSION",
    "KEYRING_ENTRY_SIZE",
    "KekSource",
    "KekState",
    "Keyring",
    "root_cipher",
]

_log = structlog.get_logger(__name__)

KEYRING_BLOB_VERSION: Final = 0x01
FIRST_KEK_VERSION: Final = KekVersion(1)
_DOMAIN: Final = b"enclave_keys/keyring/v1"
_BODY_START: Final = 1 + NONCE_SIZE
_COUNT: Final = struct.Struct(">I")
_ENTRY_HEAD: Final = struct.Struct(">IB")  # KEK version, state code
KEYRING_ENTRY_SIZE: Final = _ENTRY_HEAD.size + KEY_SIZE  # 37
_WHAT: Final = "keyring"


class KekState(StrEnum):
    """What a KEK version may still do."""

    ACTIVE = "active"  # wraps new round keys and unwraps; exactly one version
    DECRYPT_ONLY = "decrypt_only"  # unwraps only
    RETIRED = "retired"  # key destroyed: unwraps nothing

    @property
    def code(self) -> int:
        """The state's byte in the sealed keyring plaintext."""
        return _CODE_OF_STATE[self]


_CODE_OF_STATE: Final = {KekState.ACTIVE: 1, KekState.DECRYPT_ONLY: 2, KekState.RETIRED: 3}
_STATE_OF_CODE: Final = {code: state for state, code in _CODE_OF_STATE.items()}


class KekSource(Protocol):
    """Where the round-cipher actor gets KEKs: operation-scoped, never kept.

    * ``with source.active_kek() as kek:`` — the active KEK under a shared lease; hold it
      across the wrap *and* the durable store of the blob, so no rotation can miss it;
    * ``with source.kek_for(version) as kek:`` — a KEK that may unwrap (raises
      :class:`UnknownKekVersion`, :class:`KekRetired`, :class:`Sealed`);
    * ``with source.hold_rotation():`` — keeps rotation out while stored round keys are
      deleted (so a rotation in flight cannot write a deleted key back); granted even
      when sealed, since it touches no key.

    Every one waits (bounded) while a rotation runs and may raise
    :class:`~enclave_keys.errors.LeaseTimeout`. Do not nest them in one thread.
    Implemented by :class:`Keyring` and :class:`enclave_keys.master.MasterKeys`.
    """

    def active_kek(self) -> AbstractContextManager[Kek]: ...

    def kek_for(self, version: KekVersion) -> AbstractContextManager[Kek]: ...

    def hold_rotation(self) -> AbstractContextManager[None]: ...


@dataclass(frozen=True, slots=True)
class _Entry:
    version: KekVersion
    state: KekState
    kek: Kek | None  # None exactly when retired


def root_cipher(root: SecretBytes) -> AESGCM:
    """An AES-256-GCM object over the 32-byte root key (it keeps its own OpenSSL copy)."""
    if not isinstance(root, SecretBytes):
        raise TypeError("the root key must be given as SecretBytes")
    if len(root) != KEY_SIZE:
        raise InvalidKeyMaterial(f"the root key must be {KEY_SIZE} bytes, not {len(root)}")
    with root.borrow() as view:
        return AESGCM(view)


def _copy_kek(kek: Kek, entropy: Entropy | None) -> Kek:
    """A new :class:`Kek` of the same version over its own copy of the key memory."""
    with kek._borrow_key() as view:
        return Kek(kek.version, SecretBytes.from_buffer(view, wipe_source=False), entropy=entropy)


def _wipe(entries: Iterable[_Entry]) -> None:
    for entry in entries:
        if entry.kek is not None:
            entry.kek.wipe()


def _problem(entries: Sequence[_Entry]) -> str | None:
    """What is wrong with a list of entries, or None if it is a valid keyring."""
    if not entries:
        return "keyring has no KEK version"
    numbers = [e.version.number for e in entries]
    if any(a >= b for a, b in itertools.pairwise(numbers)):
        return "keyring versions are not strictly increasing"
    actives = [e for e in entries if e.state is KekState.ACTIVE]
    if len(actives) != 1:
        return f"keyring has {len(actives)} active KEK versions, not exactly one"
    if actives[0] is not entries[-1]:
        return "keyring's active KEK is not its newest version"
    if any((e.kek is None) != (e.state is KekState.RETIRED) for e in entries):
        return "keyring holds a key for a retired version or none for a usable one"
    return None


class Keyring(NoCopy):
    """KEK versions with states, leases and a sealed persistent form. See the module doc.

    Build one with :meth:`create` or :meth:`open`; evolve it with :meth:`rotated` and
    :meth:`with_retired` (new keyrings; this one is unchanged). The :class:`Kek` objects
    it hands out belong to it: use them inside a lease, never wipe them, never keep them.
    :meth:`seal` (or leaving a ``with`` block) wipes every key; any use afterwards raises
    :class:`Sealed`. The repr shows versions and states, never key bytes. Thread-safe.

    ``entropy`` (FOR SIMULATIONS ONLY) makes new keys and every nonce deterministic.
    """

    __slots__ = ("_entries", "_entropy", "_gate")

    def __init__(self, entries: Sequence[_Entry], *, entropy: Entropy | None = None) -> None:
        """Private: use :meth:`create`, :meth:`open`, :meth:`rotated`, :meth:`with_retired`.

        Takes ownership of the entries' keys (wiped if they do not form a valid keyring).
        """
        problem = _problem(entries)
        if problem is not None:
            _wipe(entries)
            raise CorruptRecord(problem)
        self._entries: tuple[_Entry, ...] = tuple(entries)
        self._entropy = entropy
        self._gate = LeaseGate(_WHAT)

    # --- construction ------------------------------------------------------------------

    @classmethod
    def create(cls, entropy: Entropy | None = None) -> Keyring:
        """A new keyring: version 1, active, a fresh random 32-byte key."""
        kek = Kek(FIRST_KEK_VERSION, SecretBytes.random(KEY_SIZE, entropy), entropy=entropy)
        ring = cls([_Entry(FIRST_KEK_VERSION, KekState.ACTIVE, kek)], entropy=entropy)
        _log.debug("keyring_created", active_kek=FIRST_KEK_VERSION.number)
        return ring

    @classmethod
    def open(cls, root: SecretBytes, blob: bytes, *, entropy: Entropy | None = None) -> Keyring:
        """Decrypt a :meth:`seal_to` blob with ``root`` (which stays the caller's).

        Raises :class:`UnwrapFailed` for a wrong root or any tampered, truncated,
        extended or unknown-version blob (opaque), and :class:`CorruptRecord` for a blob
        that authenticates but whose plaintext breaks the layout or the invariants.
        """
        ring = cls._open_with(root_cipher(root), blob, entropy)
        if ring is None:
            _log.warning("keyring_unwrap_failed")
            raise UnwrapFailed(_WHAT)
        return ring

    @classmethod
    def _open_with(cls, aead: AESGCM, blob: object, entropy: Entropy | None) -> Keyring | None:
        """The keyring in ``blob`` under the root cipher ``aead``; None if it does not
        authenticate (:class:`CorruptRecord` if it does but its plaintext is malformed)."""
        if (
            not isinstance(blob, bytes)
            or len(blob) < _BODY_START + TAG_SIZE
            or blob[0] != KEYRING_BLOB_VERSION
        ):
            return None
        aad = frame(_DOMAIN, blob[:1])
        nonce, sealed = blob[1:_BODY_START], blob[_BODY_START:]

        def decrypt(buffer: memoryview) -> None:
            aead.decrypt_into(nonce, sealed, aad, buffer)

        try:
            plain = SecretBytes._filled_by(len(sealed) - TAG_SIZE, decrypt)
        except InvalidTag:
            return None
        with plain, plain.borrow() as data:
            entries = _parse(data, entropy)
        return cls(entries, entropy=entropy)

    @classmethod
    def probe(cls, root: SecretBytes) -> Callable[[bytes], Keyring | None]:
        """A quiet, fast :meth:`open` for forensic scans of many candidate blobs: the
        returned function gives the keyring, or None (no log, no exception) for a blob
        that does not open. ``root`` stays the caller's."""
        aead = root_cipher(root)

        def try_open(blob: bytes) -> Keyring | None:
            try:
                return cls._open_with(aead, blob, None)
            except CorruptRecord:
                return None

        return try_open

    # --- queries -----------------------------------------------------------------------

    def _live_entries(self) -> tuple[_Entry, ...]:
        if self._gate.closed:
            raise Sealed("the keyring is sealed")
        return self._entries

    @property
    def is_sealed(self) -> bool:
        return self._gate.closed

    @property
    def gate(self) -> LeaseGate:
        """The lease gate (to observe leases and waiting sections; prefer :meth:`lease`)."""
        return self._gate

    @property
    def active(self) -> Kek:
        """The active KEK. Use it under a lease; it belongs to this keyring."""
        kek = self._live_entries()[-1].kek
        assert kek is not None
        return kek

    @property
    def active_version(self) -> KekVersion:
        return self._live_entries()[-1].version

    def kek(self, version: KekVersion) -> Kek:
        """The KEK of ``version`` if it may unwrap (active or decrypt-only).

        Raises :class:`UnknownKekVersion` if the keyring never had it, :class:`KekRetired`
        if it is retired, :class:`Sealed` after :meth:`seal`.
        """
        if not isinstance(version, KekVersion):
            raise TypeError("a KEK version must be a KekVersion")
        for entry in self._live_entries():
            if entry.version == version:
                if entry.kek is None:
                    raise KekRetired(f"KEK {version} is retired")
                return entry.kek
        raise UnknownKekVersion(f"KEK {version} is not in the keyring")

    def versions(self) -> list[tuple[KekVersion, KekState]]:
        """Every version and its state, oldest first."""
        return [(e.version, e.state) for e in self._live_entries()]

    # --- evolution (new keyrings) ------------------------------------------------------

    def _derive(self, states: Callable[[_Entry], KekState], extra: Kek | None) -> Keyring:
        """A new keyring over copies of the keys this one keeps, states per ``states``."""
        made: list[_Entry] = []
        try:
            for entry in self._live_entries():
                state = states(entry)
                kek = None
                if state is not KekState.RETIRED and entry.kek is not None:
                    kek = _copy_kek(entry.kek, self._entropy)
                made.append(_Entry(entry.version, state, kek))
            if extra is not None:
                made.append(_Entry(extra.version, KekState.ACTIVE, extra))
                extra = None
        except BaseException:
            _wipe(made)
            if extra is not None:
                extra.wipe()
            raise
        return Keyring(made, entropy=self._entropy)

    def rotated(self, entropy: Entropy | None = None) -> Keyring:
        """A new keyring with a fresh active version (newest + 1); the current active
        version becomes decrypt-only there. This keyring is unchanged.

        ``entropy`` (simulations only) makes the new key deterministic; by default the
        keyring's own entropy source (the OS CSPRNG in production) is used.
        """
        source = self._entropy if entropy is None else entropy
        version = self._live_entries()[-1].version.next()
        fresh = Kek(version, SecretBytes.random(KEY_SIZE, source), entropy=self._entropy)

        def demote(entry: _Entry) -> KekState:
            return KekState.DECRYPT_ONLY if entry.state is KekState.ACTIVE else entry.state

        ring = self._derive(demote, fresh)
        _log.debug("keyring_rotated", active_kek=version.number)
        return ring

    def with_retired(self, versions: Iterable[KekVersion]) -> Keyring:
        """A new keyring in which ``versions`` are retired (their keys not copied).

        Raises :class:`UnknownKekVersion` for a version the keyring does not have and
        :class:`MasterKeyError` for the active version (rotate first). Retiring an
        already retired version changes nothing. This keyring is unchanged.
        """
        targets = set(versions)
        if not all(isinstance(v, KekVersion) for v in targets):
            raise TypeError("versions must be KekVersion values")
        entries = self._live_entries()
        known = {e.version for e in entries}
        unknown = sorted(v.number for v in targets - known)
        if unknown:
            raise UnknownKekVersion(f"KEK v{unknown[0]} is not in the keyring")
        if entries[-1].version in targets:
            raise MasterKeyError(f"KEK {entries[-1].version} is active and cannot be retired")

        def retire(entry: _Entry) -> KekState:
            return KekState.RETIRED if entry.version in targets else entry.state

        return self._derive(retire, None)

    # --- persistence -------------------------------------------------------------------

    def seal_to(self, root: SecretBytes) -> bytes:
        """This keyring encrypted under ``root`` (which stays the caller's): see the module
        doc for the layout. Call it under a lease or the exclusive section.
        """
        entries = self._live_entries()

        def write(view: memoryview) -> None:
            _COUNT.pack_into(view, 0, len(entries))
            for index, entry in enumerate(entries):
                at = _COUNT.size + index * KEYRING_ENTRY_SIZE
                _ENTRY_HEAD.pack_into(view, at, entry.version.number, entry.state.code)
                if entry.kek is not None:  # a retired key stays all zeros
                    with entry.kek._borrow_key() as key:
                        view[at + _ENTRY_HEAD.size : at + KEYRING_ENTRY_SIZE] = key

        size = _COUNT.size + len(entries) * KEYRING_ENTRY_SIZE
        with SecretBytes._filled_by(size, write) as plain, plain.borrow() as data:
            return _encrypt(root, data, self._entropy)

    # --- leases ------------------------------------------------------------------------

    @contextmanager
    def lease(self, timeout: float = DEFAULT_LEASE_WAIT) -> Iterator[Self]:
        """``with ring.lease() as ring:`` — a shared lease for one operation.

        Waits (bounded) while an exclusive section runs or waits: :class:`LeaseTimeout`;
        :class:`Sealed` once sealed.
        """
        with self._gate.shared(timeout):
            yield self

    @contextmanager
    def exclusive(self, timeout: float = DEFAULT_LEASE_WAIT) -> Iterator[Self]:
        """``with ring.exclusive(timeout):`` — no lease is open for the block.

        Waits (bounded) for open leases to end, blocking new ones meanwhile; raises
        :class:`LeaseTimeout` if they do not end in time.
        """
        with self._gate.exclusive(timeout):
            yield self

    def seal(self, timeout: float = DEFAULT_LEASE_WAIT, *, force: bool = False) -> None:
        """Wait (bounded) for open leases, then wipe every key; later use raises Sealed.

        If leases are still open after ``timeout``, raises :class:`LeaseTimeout` and
        wipes nothing — unless ``force``, which wipes anyway (an operation under a lease
        then fails with ``SecretWiped``). Idempotent.
        """
        drained = self._gate.close(timeout, force=force)
        _wipe(self._entries)
        if not drained:
            _log.warning("keyring_sealed_under_open_leases", timeout=timeout)

    # --- KekSource ---------------------------------------------------------------------

    @contextmanager
    def active_kek(self) -> Iterator[Kek]:
        with self._gate.shared(DEFAULT_LEASE_WAIT):
            yield self.active

    @contextmanager
    def kek_for(self, version: KekVersion) -> Iterator[Kek]:
        with self._gate.shared(DEFAULT_LEASE_WAIT):
            yield self.kek(version)

    @contextmanager
    def hold_rotation(self) -> Iterator[None]:
        with self._gate.shared(DEFAULT_LEASE_WAIT, allow_closed=True):
            yield

    # --- misc --------------------------------------------------------------------------

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.seal(0.0, force=True)

    def __repr__(self) -> str:
        if self._gate.closed:
            return "Keyring(sealed)"
        states = ", ".join(f"{e.version}:{e.state.value}" for e in self._entries)
        return f"Keyring(active={self._entries[-1].version}, versions=[{states}])"


def _encrypt(root: SecretBytes, plaintext: memoryview | bytes, entropy: Entropy | None) -> bytes:
    """A keyring blob around ``plaintext`` (whatever it holds) under ``root``."""
    aead = root_cipher(root)
    header = bytes([KEYRING_BLOB_VERSION])
    nonce = random_bytes(NONCE_SIZE, entropy)
    return header + nonce + aead.encrypt(nonce, plaintext, frame(_DOMAIN, header))


def _parse(data: memoryview, entropy: Entropy | None) -> list[_Entry]:
    """The entries of a decrypted keyring plaintext; :class:`CorruptRecord` if malformed."""
    if len(data) < _COUNT.size:
        raise CorruptRecord(f"keyring plaintext of {len(data)} bytes has no entry count")
    (count,) = _COUNT.unpack_from(data, 0)
    if count == 0 or len(data) != _COUNT.size + count * KEYRING_ENTRY_SIZE:
        raise CorruptRecord(f"keyring plaintext of {len(data)} bytes does not hold {count} entries")
    entries: list[_Entry] = []
    try:
        previous = 0
        for index in range(count):
            at = _COUNT.size + index * KEYRING_ENTRY_SIZE
            number, code = _ENTRY_HEAD.unpack_from(data, at)
            if number <= previous:
                raise CorruptRecord("keyring versions are not strictly increasing from 1")
            previous = number
            state = _STATE_OF_CODE.get(code)
            if state is None:
                raise CorruptRecord(f"keyring entry v{number} has unknown state code {code}")
            version = KekVersion(number)
            with data[at + _ENTRY_HEAD.size : at + KEYRING_ENTRY_SIZE] as key:
                if state is KekState.RETIRED:
                    if any(key):
                        raise CorruptRecord(f"retired KEK {version} still has key bytes")
                    entries.append(_Entry(version, state, None))
                else:
                    secret = SecretBytes.from_buffer(key, wipe_source=False)
                    entries.append(_Entry(version, state, Kek(version, secret, entropy=entropy)))
        problem = _problem(entries)
        if problem is not None:
            raise CorruptRecord(problem)
    except BaseException:
        _wipe(entries)
        raise
    return entries
