"""The bare primitives every ratio is taken against: raw LMDB, raw msgpack, raw AESGCM.

Only this module and :mod:`benchmarks.seal` import ``cryptography`` directly; the LMDB
environment here is opened with the same durability as the store's (``sync`` and
``metasync`` on: every write transaction is flushed to disk when it commits).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import lmdb
import msgpack
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "RawLog",
    "generate_key",
    "new_aead",
    "unwrap_key",
    "wrap_key",
]

_MAP_SIZE: Final = 2**32
_NONCE: Final = 12


class RawLog:
    """An LMDB environment with an ``events`` and a ``keys`` database, nothing else."""

    def __init__(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.env: Any = lmdb.open(
            str(path), map_size=_MAP_SIZE, max_dbs=2, sync=True, metasync=True, lock=True
        )
        self.events: Any = self.env.open_db(b"events")
        self.keys: Any = self.env.open_db(b"keys")
        self._next = 1

    def append(self, encoded: Sequence[bytes]) -> None:
        """One durable transaction putting ``encoded`` under consecutive 8-byte keys."""
        first = self._next
        items = [((first + i).to_bytes(8, "big"), raw) for i, raw in enumerate(encoded)]
        with self.env.begin(write=True) as txn:
            txn.cursor(db=self.events).putmulti(items, append=True)
        self._next = first + len(items)

    def scan(self) -> int:
        """Read every event with a cursor and unpack it with msgpack; the count."""
        count = 0
        unpack = msgpack.unpackb
        with self.env.begin() as txn:
            for _, value in txn.cursor(db=self.events):
                unpack(value, raw=False)
                count += 1
        return count

    def put_key(self, key: bytes, blob: bytes) -> None:
        """One durable transaction storing one blob."""
        with self.env.begin(write=True) as txn:
            txn.put(key, blob, db=self.keys)

    def put_keys(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        """One durable transaction storing many blobs."""
        with self.env.begin(write=True) as txn:
            for key, blob in items:
                txn.put(key, blob, db=self.keys)

    def read_keys(self) -> list[tuple[bytes, bytes]]:
        """Every stored (key, blob), with a cursor."""
        with self.env.begin() as txn:
            return list(txn.cursor(db=self.keys))

    def delete_key(self, key: bytes) -> None:
        """One durable transaction deleting one blob."""
        with self.env.begin(write=True) as txn:
            txn.delete(key, db=self.keys)

    def delete_keys(self, keys: Sequence[bytes]) -> None:
        """One durable transaction deleting many blobs."""
        with self.env.begin(write=True) as txn:
            for key in keys:
                txn.delete(key, db=self.keys)

    def close(self) -> None:
        self.env.close()


def generate_key() -> bytes:
    """A fresh AES-256 key, as ``AESGCM.generate_key`` makes it."""
    key: bytes = AESGCM.generate_key(256)
    return key


def new_aead(key: bytes) -> AESGCM:
    return AESGCM(key)


def unwrap_key(kek: AESGCM, blob: bytes, aad: bytes) -> AESGCM:
    """The bare unwrap at hydration: decrypt the key, build its cipher object."""
    return AESGCM(kek.decrypt(blob[:_NONCE], blob[_NONCE:], aad))


def wrap_key(kek: AESGCM, key: bytes, aad: bytes) -> bytes:
    """The bare wrap: a random nonce and one AES-GCM encryption of the 32-byte key."""
    nonce = os.urandom(_NONCE)
    return nonce + kek.encrypt(nonce, key, aad)
