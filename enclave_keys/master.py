"""The node's master keys: the root key and the keyring it seals, as kept in the store.

Hierarchy (``docs/key-hierarchy.md``): an unseal source (passphrase, Shamir ceremony,
PKCS#11 token, environment key) produces the 32-byte **root key**; the root key decrypts
the **keyring** of KEK versions (``master.keyring``); the active KEK wraps each round key.

Metadata records:

* ``master.keyring`` — the sealed keyring blob (:meth:`Keyring.seal_to`);
* ``master.method`` — the ASCII name of the unseal method that produces the root key
  (``passphrase``, ``shamir``, ``pkcs11``, ``env``, ``raw``, ...);
* whatever records the unseal source needs (salt and KDF parameters, share-set digest,
  token label, ...), written in the same batch as the two above.

:class:`MasterKeys` is a :class:`~enclave_keys.crypto.KekSource` for the round-cipher
actor (operation-scoped leases) and offers the operator operations: :meth:`rotate_kek`
(new KEK; the storage epoch key rewrapped under it in the same commit), :meth:`rekey_root` (the same
keyring re-sealed under a new root, round keys untouched) and :meth:`seal`.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import MappingProxyType, TracebackType
from typing import Final, Protocol, Self

import structlog

from enclave_keys.crypto import (
    DEFAULT_LEASE_WAIT,
    Entropy,
    Kek,
    KekState,
    Keyring,
    LeaseGate,
    SecretBytes,
    check_timeout,
)
from enclave_keys.crypto.secret import NoCopy
from enclave_keys.errors import (
    AlreadyInitialised,
    CorruptRecord,
    InvalidIdentifier,
    MasterKeyError,
    StoreUnavailable,
    UnsealMismatch,
)
from enclave_keys.events import KekRotated
from enclave_keys.ids import KekVersion
from enclave_keys.store import Store, WriteBatch
from enclave_keys.store.slots import SLOT_COUNT, SLOT_SIZE

__all__ = ["KEYRING_RECORD", "METHOD_RECORD", "KekDependent", "KekRotation", "MasterKeys"]

_log = structlog.get_logger(__name__)

KEYRING_RECORD: Final = "master.keyring"
METHOD_RECORD: Final = "master.method"
_RESERVED_PREFIX: Final = "master."
_METHOD: Final = re.compile(r"[a-z][a-z0-9_]{0,31}")
_NO_RECORDS: Final[Mapping[str, bytes]] = MappingProxyType({})


def _check_method(method: object) -> str:
    """An unseal method name: 1-32 of ``[a-z0-9_]``, starting with a letter."""
    if not isinstance(method, str) or _METHOD.fullmatch(method) is None:
        raise InvalidIdentifier(
            "unseal method must be 1-32 characters of [a-z0-9_], starting with a letter"
        )
    return method


def _check_records(
    records: Mapping[str, bytes], drop: Iterable[str]
) -> tuple[list[tuple[str, bytes]], list[str]]:
    """The records to write and to delete; the store checks names and values further."""
    if not isinstance(records, Mapping):
        raise TypeError("records must be a mapping of name to bytes")
    puts = list(records.items())
    drops = list(drop)
    for name in [name for name, _ in puts] + drops:
        if not isinstance(name, str):
            raise InvalidIdentifier("record names must be str")
        if name.startswith(_RESERVED_PREFIX):
            raise InvalidIdentifier(f"record names starting with {_RESERVED_PREFIX!r} are reserved")
    both = sorted({name for name, _ in puts} & set(drops))
    if both:
        raise InvalidIdentifier(f"record {both[0]!r} is both written and dropped")
    return puts, drops


class KekDependent(Protocol):
    """What a KEK rotation must rewrap (the storage epoch key), staged for its commit.

    ``write(batch)`` adds records to the rotation's store batch and returns how many keys
    it rewrapped; then exactly one of ``committed()`` (the batch is durable) or
    ``aborted()`` (nothing was committed) is called.
    """

    def write(self, batch: WriteBatch) -> int: ...

    def committed(self) -> None: ...

    def aborted(self) -> None: ...


@dataclass(frozen=True, slots=True)
class KekRotation:
    """What :meth:`MasterKeys.rotate_kek` did (versions and a count, never key bytes)."""

    old_version: KekVersion
    new_version: KekVersion
    rewrapped: int

    def event(self) -> KekRotated:
        """The audit event to publish."""
        return KekRotated(
            old_version=self.old_version, new_version=self.new_version, rewrapped=self.rewrapped
        )


class MasterKeys(NoCopy):
    """The root key and the keyring of one store. Build with :meth:`initialise` or
    :meth:`open`.

    Owns the root key it is given (wiped by :meth:`seal`, or at once if the call that
    received it fails) and its keyring. As a ``KekSource``: ``with master.active_kek() as
    kek:`` (hold it across the wrap and the store of the blob), ``with
    master.kek_for(version) as kek:`` and ``with master.hold_rotation():``. Each waits up
    to ``lease_timeout`` seconds while a rotation, rekey or seal runs. Thread-safe.

    ``entropy`` (FOR SIMULATIONS ONLY) makes KEKs and nonces deterministic.
    """

    __slots__ = (
        "_gate",
        "_lease_timeout",
        "_lock",
        "_method",
        "_ring",
        "_root",
        "_store",
    )

    def __init__(
        self,
        store: Store,
        root: SecretBytes,
        ring: Keyring,
        method: str,
        *,
        lease_timeout: float,
    ) -> None:
        """Private: use :meth:`initialise` or :meth:`open`."""
        self._store = store
        self._root = root
        self._ring = ring
        self._method = method
        self._lease_timeout = lease_timeout
        self._gate = LeaseGate("keyring")
        self._lock = threading.Lock()  # guards the swap of _ring/_root against a forced seal

    # --- the store's state --------------------------------------------------------------

    @staticmethod
    def is_initialised(store: Store) -> bool:
        """True if the store holds a sealed keyring."""
        return store.get_meta(KEYRING_RECORD) is not None

    @classmethod
    def check_can_initialise(cls, store: Store) -> None:
        """Raise unless :meth:`initialise` may make a keyring in ``store``: not if it has
        one (:class:`AlreadyInitialised`), nor if it names an unseal method without one
        (:class:`CorruptRecord`: it was initialised and lost its keyring, and a new one
        would orphan every round key in it). Call it before enrolling a new root."""
        if cls.is_initialised(store):
            raise AlreadyInitialised("the store already has a keyring")
        if cls.missing_record(store) is not None:
            raise CorruptRecord(
                f"the store has {METHOD_RECORD} but no {KEYRING_RECORD}: it was"
                " initialised and its keyring is lost; refusing to make a new one over it"
            )

    @classmethod
    def missing_record(cls, store: Store) -> str | None:
        """The one master record a half-initialised store lacks (:data:`METHOD_RECORD` or
        :data:`KEYRING_RECORD`: the other was lost or damaged), or None when it has both
        or neither. Such a store must be restored, never unsealed nor initialised again."""
        has_method = store.get_meta(METHOD_RECORD) is not None
        if has_method == cls.is_initialised(store):
            return None
        return KEYRING_RECORD if has_method else METHOD_RECORD

    @staticmethod
    def method_of(store: Store) -> str | None:
        """The unseal method the store was initialised with, or None."""
        raw = store.get_meta(METHOD_RECORD)
        if raw is None:
            return None
        try:
            return _check_method(raw.decode("ascii"))
        except (UnicodeDecodeError, InvalidIdentifier):
            raise CorruptRecord(f"{METHOD_RECORD} is not an unseal method name") from None

    # --- construction ----------------------------------------------------------------

    @classmethod
    def initialise(
        cls,
        store: Store,
        root: SecretBytes,
        method: str,
        records: Mapping[str, bytes] = _NO_RECORDS,
        *,
        lease_timeout: float = DEFAULT_LEASE_WAIT,
        entropy: Entropy | None = None,
    ) -> MasterKeys:
        """Make a fresh keyring (KEK v1) sealed under ``root`` and store it.

        One batch writes the unseal source's ``records``, ``master.method`` and
        ``master.keyring``: all or nothing. Raises :class:`AlreadyInitialised` if the
        store already has a keyring (it is never overwritten), and :class:`CorruptRecord`
        if it names an unseal method but has no keyring: that store was initialised and
        has lost its keyring (the batch above never writes one without the other), and
        a new one would orphan every round key in it. Takes ownership of ``root``.
        """
        try:
            method = _check_method(method)
            puts, _ = _check_records(records, ())
            wait = check_timeout(lease_timeout, "lease_timeout")
            cls.check_can_initialise(store)
            ring = Keyring.create(entropy)
            try:
                blob = ring.seal_to(root)
                with store.write() as batch:
                    for name, value in puts:
                        batch.put_meta(name, value)
                    batch.put_meta(METHOD_RECORD, method.encode("ascii"))
                    batch.put_meta(KEYRING_RECORD, blob)
            except BaseException:
                ring.seal(0.0, force=True)
                raise
        except BaseException:
            if isinstance(root, SecretBytes):
                root.wipe()
            raise
        _log.info("master_keys_initialised", method=method, active_kek=ring.active_version.number)
        return cls(store, root, ring, method, lease_timeout=wait)

    @classmethod
    def open(
        cls,
        store: Store,
        root: SecretBytes,
        method: str,
        *,
        lease_timeout: float = DEFAULT_LEASE_WAIT,
        entropy: Entropy | None = None,
    ) -> MasterKeys:
        """Open the store's keyring with ``root``. Takes ownership of ``root``.

        Raises :class:`UnsealMismatch` if the store has no keyring or was initialised
        with another method, :class:`UnwrapFailed` for a wrong root or a tampered
        keyring (opaque), :class:`CorruptRecord` for a malformed one.
        """
        try:
            method = _check_method(method)
            wait = check_timeout(lease_timeout, "lease_timeout")
            blob = store.get_meta(KEYRING_RECORD)
            if blob is None:
                raise UnsealMismatch("the store is not initialised: it has no keyring")
            stored = cls.method_of(store)
            if stored != method:
                raise UnsealMismatch(
                    f"the store was initialised with unseal method {stored!r}, not {method!r}"
                )
            ring = Keyring.open(root, blob, entropy=entropy)
        except BaseException:
            if isinstance(root, SecretBytes):
                root.wipe()
            raise
        _log.info("master_keys_opened", method=method, active_kek=ring.active_version.number)
        return cls(store, root, ring, method, lease_timeout=wait)

    # --- status -------------------------------------------------------------------------

    @property
    def method(self) -> str:
        """The unseal method that produces the current root key."""
        return self._method

    @property
    def is_sealed(self) -> bool:
        return self._gate.closed

    @property
    def gate(self) -> LeaseGate:
        """The lease gate (to observe leases and waiting sections)."""
        return self._gate

    @property
    def active_version(self) -> KekVersion:
        """The active KEK version. Raises :class:`Sealed` after :meth:`seal`."""
        return self._ring.active_version

    def versions(self) -> list[tuple[KekVersion, KekState]]:
        """Every KEK version of the keyring and its state, oldest first."""
        return self._ring.versions()

    # --- KekSource ----------------------------------------------------------------------

    @contextmanager
    def active_kek(self) -> Iterator[Kek]:
        """The active KEK under a shared lease (hold it across wrap and store)."""
        with self._gate.shared(self._lease_timeout):
            yield self._ring.active

    @contextmanager
    def kek_for(self, version: KekVersion) -> Iterator[Kek]:
        """The KEK of ``version`` under a shared lease (:class:`UnknownKekVersion`,
        :class:`KekRetired`, :class:`Sealed`)."""
        with self._gate.shared(self._lease_timeout):
            yield self._ring.kek(version)

    @contextmanager
    def hold_rotation(self) -> Iterator[None]:
        """Keep rotation out while stored round keys are deleted (granted when sealed)."""
        with self._gate.shared(self._lease_timeout, allow_closed=True):
            yield

    # --- rotation -----------------------------------------------------------------------

    def rotate_kek(
        self,
        *,
        timeout: float = DEFAULT_LEASE_WAIT,
        rewrap: Callable[[Kek], KekDependent] | None = None,
    ) -> KekRotation:
        """Make a new active KEK, retire every other version, and commit the keyring.

        Waits (bounded by ``timeout``) for open leases, then holds the keyring
        exclusively. ``rewrap(new_kek)`` (the node's epoch keeper) stages what the new KEK
        must wrap; its :meth:`KekDependent.write` adds its records to the SAME store
        batch as the new keyring blob (the old versions already retired). Only after that
        commit does the in-memory keyring change and the old keys get wiped. Any failure
        before (a store error, :class:`LeaseTimeout`) leaves memory and disk as they were
        (``aborted()`` is called on the dependent).

        Without ``rewrap`` on a store whose slot file holds a storage epoch, this raises
        :class:`MasterKeyError` and changes nothing: retiring the KEK that wraps the epoch
        key would lose every stored round key. Rotate through the node
        (:meth:`enclave_keys.node.Node.rotate_kek`) or the epoch keeper.
        """
        with self._gate.exclusive(timeout):
            if rewrap is None and _holds_an_epoch(self._store):
                raise MasterKeyError(
                    "the store holds a storage epoch wrapped under the current KEK: rotate"
                    " through the epoch keeper (Node.rotate_kek), not MasterKeys alone"
                )
            old = self._ring
            old_version = old.active_version
            new = _next_keyring(old)
            dependent: KekDependent | None = None
            rewrapped = 0
            try:
                dependent = None if rewrap is None else rewrap(new.active)
                blob = new.seal_to(self._root)
                with self._store.write() as batch:
                    if dependent is not None:
                        rewrapped = dependent.write(batch)
                    batch.put_meta(KEYRING_RECORD, blob)
            except BaseException as exc:
                if dependent is not None:
                    dependent.aborted()
                new.seal(0.0, force=True)
                _log.error("kek_rotation_failed", error_type=type(exc).__qualname__)
                raise
            if dependent is not None:
                dependent.committed()
            new_version = new.active_version
            with self._lock:
                if self._gate.closed:  # a forced seal ran meanwhile: keep nothing
                    new.seal(0.0, force=True)
                else:
                    self._ring = new
            old.seal(0.0, force=True)
        _log.info(
            "kek_rotated",
            old_version=old_version.number,
            new_version=new_version.number,
            rewrapped=rewrapped,
        )
        return KekRotation(old_version, new_version, rewrapped)

    # --- rekey --------------------------------------------------------------------------

    def rekey_root(
        self,
        new_root: SecretBytes,
        new_method: str,
        records: Mapping[str, bytes] = _NO_RECORDS,
        drop_records: Iterable[str] = (),
        *,
        timeout: float = DEFAULT_LEASE_WAIT,
    ) -> None:
        """Re-seal the same keyring under ``new_root``; round keys are not touched.

        One batch deletes ``drop_records``, writes ``records``, ``master.method`` and the
        re-sealed ``master.keyring``. Then the held root is replaced and the old one
        wiped. Takes ownership of ``new_root`` (wiped if this fails; nothing changes then).
        """
        try:
            method = _check_method(new_method)
            puts, drops = _check_records(records, drop_records)
            with self._gate.exclusive(timeout):
                blob = self._ring.seal_to(new_root)
                with self._store.write() as batch:
                    for name in drops:
                        batch.delete_meta(name)
                    for name, value in puts:
                        batch.put_meta(name, value)
                    batch.put_meta(METHOD_RECORD, method.encode("ascii"))
                    batch.put_meta(KEYRING_RECORD, blob)
                with self._lock:
                    old_method, self._method = self._method, method
                    if self._gate.closed:  # a forced seal ran meanwhile: keep nothing
                        old_root = new_root
                    else:
                        old_root, self._root = self._root, new_root
        except BaseException:
            if isinstance(new_root, SecretBytes) and new_root is not self._root:
                new_root.wipe()
            raise
        old_root.wipe()
        _log.info("root_rekeyed", old_method=old_method, new_method=method)

    # --- seal ---------------------------------------------------------------------------

    def seal(self, timeout: float = DEFAULT_LEASE_WAIT, *, force: bool = False) -> None:
        """Wait (bounded) for open leases, then wipe the keyring and the root key.

        Afterwards every KEK access raises :class:`Sealed` (``hold_rotation`` still
        works). If leases are still open after ``timeout``: :class:`LeaseTimeout` and
        nothing is wiped — unless ``force`` (node stop, signals), which wipes anyway.
        Idempotent.
        """
        was_sealed = self._gate.closed
        drained = self._gate.close(timeout, force=force)
        with self._lock:
            ring, root = self._ring, self._root
        ring.seal(0.0, force=True)
        root.wipe()
        if not was_sealed:
            _log.info("master_keys_sealed", drained=drained)

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
            return f"MasterKeys(method={self._method!r}, sealed)"
        return f"MasterKeys(method={self._method!r}, {self._ring!r})"


def _holds_an_epoch(store: Store) -> bool:
    """True if any epoch slot is not empty (a torn one counts: be safe)."""
    try:
        device = store.epoch_slots()
    except StoreUnavailable:
        return False
    return any(device.read(index) != bytes(SLOT_SIZE) for index in range(SLOT_COUNT))


def _next_keyring(old: Keyring) -> Keyring:
    """``old`` rotated, with every version but the new active one retired."""
    rotated = old.rotated()
    try:
        previous = [v for v, state in rotated.versions() if state is KekState.DECRYPT_ONLY]
        return rotated.with_retired(previous)
    finally:
        rotated.seal(0.0, force=True)
