"""Child process of the bit-flip test: opens a node over many bit-flipped copies of one
LMDB data file. Run in its own process because a damaged LMDB file could, in principle,
crash the interpreter; the parent then sees a signal instead of a summary.

    python -m tests.fuzz.lmdb_child SOURCE_DIR WORK_DIR SEED START CASES
    python -m tests.fuzz.lmdb_child SOURCE_DIR WORK_DIR flips OFFSET:BIT,OFFSET:BIT,...

Case ``i`` flips 1 to 8 bits chosen by ``random.Random(f"{SEED}/{i}")``. Cases START to
CASES - 1 run; for each the child prints ``case I`` before trying it and ``result I
OUTCOME`` after (OUTCOME: ``opened``, ``typed`` or ``untyped``), flushed, so a parent
whose child was killed by a signal knows which case did it and can go on after it. The
second form runs one case with the given flips (a reproducer).
"""

from __future__ import annotations

import logging
import random
import shutil
import sys
from pathlib import Path

import lmdb
import structlog

from enclave_keys.clock import ManualClock
from enclave_keys.errors import EnclaveKeysError
from enclave_keys.keyshare import KEYSHARE_PURPOSE
from enclave_keys.node import Node, NodeConfig
from enclave_keys.round_cipher import ROUND_CIPHER
from enclave_keys.testing.fakes import FixedKeyUnseal


def use(node: Node) -> None:
    """Touch everything a node serves: every live round's cipher and keyshare."""
    for rid in node.router.open_rounds():
        context = node.registry.get(rid)
        share = node.keyshare.keyshare_of(rid)
        if context is None or share is None:
            continue
        leased = context.get(ROUND_CIPHER)
        if leased is not None:
            with leased.lease() as cipher:
                cipher.open(KEYSHARE_PURPOSE, share[1])


def emit(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def used_bytes(data_dir: Path) -> bytes:
    """data.mdb up to LMDB's last page (the store extends the file, sparsely, to the map
    size: flips in that zero tail would test nothing)."""
    env = lmdb.open(str(data_dir), readonly=True, max_dbs=8, lock=False)
    try:
        used = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    finally:
        env.close()
    with (data_dir / "data.mdb").open("rb") as handle:
        return handle.read(used)


def flips_for(seed: str, case: int, size: int) -> list[tuple[int, int]]:
    rng = random.Random(f"{seed}/{case}")
    return [(rng.randrange(size), rng.randrange(8)) for _ in range(rng.randint(1, 8))]


def main(
    source: str, work: str, seed: str, start: int, cases: int, fixed: list[tuple[int, int]]
) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    original = used_bytes(Path(source))  # the pages LMDB wrote, not the sparse tail
    config = NodeConfig(runtime="deterministic", harden=False, idle_timeout=10.0)
    with FixedKeyUnseal("fuzz") as unseal:
        for case in range(start, cases):
            target = Path(work) / f"case-{case}"
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            data = bytearray(original)
            for i, bit in fixed or flips_for(seed, case, len(data)):
                data[i] ^= 1 << bit
            (target / "data.mdb").write_bytes(bytes(data))
            emit(f"case {case}")
            try:
                node = Node.open(target, unseal, clock=ManualClock(1.7e9), config=config)
                try:
                    use(node)
                finally:
                    node.stop()
                outcome = "opened"
            except EnclaveKeysError:
                outcome = "typed"
            except Exception as exc:
                outcome = "untyped"
                sys.stderr.write(f"case {case}: {type(exc).__qualname__}\n")
            emit(f"result {case} {outcome}")
            shutil.rmtree(target, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[3] == "flips":
        pairs = [tuple(map(int, f.split(":"))) for f in sys.argv[4].split(",")]
        main(sys.argv[1], sys.argv[2], "", 0, 1, [(p[0], p[1]) for p in pairs])
    else:
        main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), [])
