"""Shared helpers for the unseal-source tests."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from typing import Any

from enclave_keys.crypto import KdfParams
from enclave_keys.store import MemoryStore, Store
from enclave_keys.unseal import METHOD_RECORD, Enrolment


def fast_params() -> KdfParams:
    """The floor of the Argon2id parameters: fast enough for tests."""
    return KdfParams.generate(memory_kib=KdfParams.MIN_MEMORY_KIB, iterations=2, lanes=1)


def persist(store: Store, enrolment: Enrolment, method: str | None) -> None:
    """What MasterKeys.initialise does with an enrolment: its records and master.method."""
    with store.write() as batch:
        for name, value in enrolment.records.items():
            batch.put_meta(name, value)
        if method is not None:
            batch.put_meta(METHOD_RECORD, method.encode("ascii"))


def initialised(enrolment: Enrolment, method: str | None) -> MemoryStore:
    store = MemoryStore()
    persist(store, enrolment, method)
    return store


def record_bytes(records: Mapping[str, bytes]) -> bytes:
    return b"".join(records.values())


def windows(words: list[str], size: int = 3) -> Iterable[str]:
    """Every run of ``size`` consecutive words (to look for share text in messages)."""
    for start in range(len(words) - size + 1):
        yield " ".join(words[start : start + size])


def flatten_logs(logs: Sequence[MutableMapping[str, Any]]) -> str:
    return "\n".join(repr(sorted(entry.items())) for entry in logs)
