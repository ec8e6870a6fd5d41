"""Subprocess of the memory benchmark: resident memory before and after N live rounds.

``python -m benchmarks.memory_child node DATA_DIR N EMPTY_DIR`` (master key as hex on
stdin): start and stop a node over an empty directory first (so that code, caches and
actor machinery are already resident), read the resident set size, start a node over
``DATA_DIR`` (hydrating its ``N`` live rounds), read it again.

``python -m benchmarks.memory_child bare N``: the same around a dict holding, per round,
its id, 32 key bytes and an ``AESGCM`` object — the least a node could keep.

Prints one JSON object: ``before``, ``after`` (bytes) and ``per_round``.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

__all__ = ["resident_bytes"]


def resident_bytes() -> int:
    """This process's resident set size, from ``/proc/self/statm``."""
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def _settled() -> int:
    gc.collect()
    return resident_bytes()


def _node(data_dir: Path, count: int, empty: Path, secret_hex: str) -> tuple[int, int]:
    from benchmarks.nodes import NodeOpener, quiet_logs
    from enclave_keys.crypto import SecretBytes

    quiet_logs()
    raw = bytearray.fromhex(secret_hex)
    opener = NodeOpener(SecretBytes.from_buffer(raw, wipe_source=True))
    try:
        opener.open(empty).stop()
        before = _settled()
        node = opener.open(data_dir)
        try:
            after = _settled()
            hydrated = len(node.recovery.hydrated)
        finally:
            node.stop()
    finally:
        opener.close()
    if hydrated != count:
        raise SystemExit(f"hydrated {hydrated} rounds, expected {count}")
    return before, after


def _bare(count: int) -> tuple[int, int]:
    from benchmarks.raw import generate_key, new_aead

    before = _settled()
    held = {}
    for n in range(count):
        key = generate_key()
        held[f"bench:{n}"] = (key, new_aead(key))
    after = _settled()
    if len(held) != count:
        raise SystemExit("lost a round")
    return before, after


def main(argv: list[str]) -> int:
    mode, rest = argv[0], argv[1:]
    if mode == "node":
        count = int(rest[1])
        before, after = _node(Path(rest[0]), count, Path(rest[2]), sys.stdin.read().strip())
    elif mode == "bare":
        count = int(rest[0])
        before, after = _bare(count)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    per_round = (after - before) / max(count, 1)
    print(json.dumps({"before": before, "after": after, "per_round": per_round}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
