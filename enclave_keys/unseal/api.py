"""The unseal-source protocol, the :class:`Enrolment` it returns, and shared record helpers.

An unseal source turns an operator secret (a passphrase, Shamir shares, a key sealed in
an HSM, a legacy environment key, a caller's key) into the node's 32-byte **root key**,
which decrypts the keyring of KEK versions (design §5). Every source has:

* ``method`` — its name in the store's ``master.method`` record: ``"passphrase"``,
  ``"shamir"``, ``"pkcs11"``, ``"env"`` or ``"raw"``;
* ``enrol()`` — make a root key (random, or derived for a passphrase) and the metadata
  records that let :meth:`unlock_root` find it again. The source **never writes the
  store**: the caller (``MasterKeys``) writes the records atomically with the keyring;
* ``unlock_root(store)`` — read its own records (``store.get_meta``) and recover the
  root key. A store initialised with another method raises
  :class:`~enclave_keys.errors.UnsealMismatch`, a record that does not decode
  :class:`~enclave_keys.errors.CorruptRecord`, a wrong secret the source's own error.

Record names are ``unseal.<method>.<name>``; :data:`METHOD_RECORD` (``master.method``, the
ASCII method name) belongs to ``MasterKeys``. Sources never log, repr or put a secret
in an error message.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType
from typing import Final, Protocol

from enclave_keys.crypto import SecretBytes
from enclave_keys.errors import CorruptRecord, UnsealMismatch
from enclave_keys.store import Store

__all__ = [
    "METHOD_RECORD",
    "ROOT_KEY_SIZE",
    "Enrolment",
    "UnsealSource",
    "check_method",
    "read_record",
    "stored_method",
]

ROOT_KEY_SIZE: Final = 32
METHOD_RECORD: Final = "master.method"
"""Owned by ``MasterKeys``: the ASCII name of the method the root key is sealed with."""
RECORD_PREFIX: Final = "unseal."


@dataclass(frozen=True, slots=True, eq=False)
class Enrolment:
    """A new root key and the metadata records that let its source recover it.

    The caller owns ``root`` (wipe it when done; the enrolment is a context manager that
    wipes it) and writes ``records`` (``name -> value``, names ``unseal.<method>.*``)
    atomically with the keyring. The records never contain a secret.
    """

    root: SecretBytes
    records: Mapping[str, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.root, SecretBytes):
            raise TypeError("Enrolment.root must be SecretBytes")
        checked: dict[str, bytes] = {}
        for name, value in dict(self.records).items():
            if not isinstance(name, str) or not name.startswith(RECORD_PREFIX):
                raise ValueError(f"unseal record names start with {RECORD_PREFIX!r}: {name!r}")
            if not isinstance(value, bytes):
                raise TypeError(f"unseal record {name!r} must be bytes")
            checked[name] = value
        object.__setattr__(self, "records", MappingProxyType(checked))

    def wipe(self) -> None:
        """Wipe the root key (idempotent)."""
        self.root.wipe()

    def __enter__(self) -> Enrolment:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.wipe()

    def __repr__(self) -> str:
        return f"Enrolment(root={self.root!r}, records={sorted(self.records)})"


class UnsealSource(Protocol):
    """How a node obtains its root key; see the module docstring."""

    @property
    def method(self) -> str:
        """The method name stored in ``master.method``."""
        ...

    def enrol(self) -> Enrolment:
        """A new root key and the records to persist with the keyring (never written here)."""
        ...

    def unlock_root(self, store: Store) -> SecretBytes:
        """Recover the root key from this source's records in ``store`` (caller wipes it)."""
        ...


def stored_method(store: Store) -> str | None:
    """The method named by the store's ``master.method`` record, or ``None`` if absent."""
    raw = store.get_meta(METHOD_RECORD)
    if raw is None:
        return None
    try:
        method = raw.decode("ascii")
    except UnicodeDecodeError:
        raise CorruptRecord(f"the {METHOD_RECORD} record is not ASCII text") from None
    if not method or not method.isprintable():
        raise CorruptRecord(f"the {METHOD_RECORD} record is not a method name")
    return method


def check_method(store: Store, method: str) -> None:
    """:class:`UnsealMismatch` if ``master.method`` exists and names another method.

    A store without the record (not initialised yet, or written before ``MasterKeys``)
    passes: the source's own records decide.
    """
    stored = stored_method(store)
    if stored is not None and stored != method:
        raise UnsealMismatch(
            f"this store's root key is sealed with the {stored!r} method, not {method!r}"
        )


def read_record(store: Store, name: str, method: str) -> bytes:
    """The record ``name``, or :class:`UnsealMismatch` if the store lacks it."""
    raw = store.get_meta(name)
    if raw is None:
        raise UnsealMismatch(
            f"the store has no {name!r} record: it was not initialised with the {method!r} method"
        )
    return raw
