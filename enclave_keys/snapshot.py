"""The node snapshot record: which core had what state at which log sequence.

A snapshot is one msgpack map ``{"version": 2, "sequence": N, "cores": {name: state}}``.
Core states are the plain values the cores' ``snapshot_state()`` return; none contains
key material (round keys are rebuilt from the key store at start, never from a
snapshot). Version 1 also held ``"contexts": {round id: [dependency names]}``, which
nothing read (the router reopens the contexts of its open rounds): it is still read,
and ignored, and no longer written. Snapshots are an optimisation: a node whose
snapshot is unreadable replays the whole log instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from enclave_keys.errors import CorruptRecord

SNAPSHOT_VERSION = 2
_READABLE_VERSIONS = (1, 2)  # 1: with the unused "contexts" map
_MAX_SNAPSHOT = 1 << 30


@dataclass(frozen=True, slots=True)
class NodeSnapshot:
    sequence: int
    cores: dict[str, Any]

    def to_bytes(self) -> bytes:
        record = {"version": SNAPSHOT_VERSION, "sequence": self.sequence, "cores": self.cores}
        return bytes(msgpack.packb(record, use_bin_type=True))

    @classmethod
    def from_bytes(cls, raw: bytes) -> NodeSnapshot:
        try:
            record = msgpack.unpackb(raw, raw=False, strict_map_key=True, max_bin_len=_MAX_SNAPSHOT)
        except Exception as exc:  # msgpack raises several unrelated types
            raise CorruptRecord("snapshot is not a valid msgpack record") from exc
        if not isinstance(record, dict) or record.get("version") not in _READABLE_VERSIONS:
            raise CorruptRecord("snapshot has an unknown layout or version")
        sequence, cores = record.get("sequence"), record.get("cores")
        if type(sequence) is not int or sequence < 0:
            raise CorruptRecord("snapshot sequence is not a non-negative integer")
        if not isinstance(cores, dict):
            raise CorruptRecord("snapshot cores are not a map")
        if record["version"] == 1 and not isinstance(record.get("contexts"), dict):
            raise CorruptRecord("snapshot contexts are not a map")
        return cls(sequence=sequence, cores=cores)
