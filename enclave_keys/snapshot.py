"""The node snapshot record: which core had what state at which log sequence.

A snapshot is one msgpack map ``{"version": 1, "sequence": N, "cores": {name: state},
"contexts": {round id: [dependency names]}}``. Core states are the plain values the
cores' ``snapshot_state()`` return; none contains key material (round keys are
rebuilt from the key store at start, never from a snapshot). Snapshots are an
optimisation: a node whose snapshot is unreadable replays the whole log instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from enclave_keys.errors import CorruptRecord

SNAPSHOT_VERSION = 1
_MAX_SNAPSHOT = 1 << 30


@dataclass(frozen=True, slots=True)
class NodeSnapshot:
    sequence: int
    cores: dict[str, Any]
    contexts: dict[str, list[str]]

    def to_bytes(self) -> bytes:
        record = {
            "version": SNAPSHOT_VERSION,
            "sequence": self.sequence,
            "cores": self.cores,
            "contexts": self.contexts,
        }
        return bytes(msgpack.packb(record, use_bin_type=True))

    @classmethod
    def from_bytes(cls, raw: bytes) -> NodeSnapshot:
        try:
            record = msgpack.unpackb(raw, raw=False, strict_map_key=True, max_bin_len=_MAX_SNAPSHOT)
        except Exception as exc:  # msgpack raises several unrelated types
            raise CorruptRecord("snapshot is not a valid msgpack record") from exc
        if not isinstance(record, dict) or record.get("version") != SNAPSHOT_VERSION:
            raise CorruptRecord("snapshot has an unknown layout or version")
        sequence, cores, contexts = (record.get(k) for k in ("sequence", "cores", "contexts"))
        if type(sequence) is not int or sequence < 0:
            raise CorruptRecord("snapshot sequence is not a non-negative integer")
        if not isinstance(cores, dict) or not isinstance(contexts, dict):
            raise CorruptRecord("snapshot cores or contexts are not maps")
        return cls(sequence=sequence, cores=cores, contexts=contexts)
