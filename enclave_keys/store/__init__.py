"""Storage: the event log, wrapped round keys, snapshots and metadata.

``LmdbStore.open(path)`` is the durable store (one LMDB environment); ``MemoryStore()``
is its in-memory twin for tests and simulations. Both implement :class:`Store`; every
write goes through ``with store.write() as batch:`` and is applied atomically.
Values such as wrapped keys and snapshots are opaque bytes to this layer.
"""

from enclave_keys.store.api import Store, WriteBatch
from enclave_keys.store.lmdb_store import LmdbStore
from enclave_keys.store.memory import MemoryBacking, MemoryStore
from enclave_keys.store.records import FORMAT_VERSION

__all__ = [
    "FORMAT_VERSION",
    "LmdbStore",
    "MemoryBacking",
    "MemoryStore",
    "Store",
    "WriteBatch",
]
