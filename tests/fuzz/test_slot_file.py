"""Bad input in the epoch slot file: torn, random, bit-flipped, truncated, foreign.

A node must always start with a typed outcome — never a crash, never a wrong key: a
damaged *stale* slot is wiped and every live round comes back; a damaged *current* slot
loses the epoch key, so the live rounds are failed (``key_missing_after_restart``), the
node makes a new epoch and serves new rounds.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from enclave_keys.clock import ManualClock
from enclave_keys.epochs import slot_status
from enclave_keys.errors import StoreUnavailable
from enclave_keys.events import RoundRequested
from enclave_keys.ids import RoundId
from enclave_keys.node import Node
from enclave_keys.store import LmdbStore
from enclave_keys.store.slots import SLOT_FILE_NAME, SLOT_FILE_SIZE, SLOT_SIZE
from enclave_keys.testing.fakes import FixedKeyUnseal
from tests.fuzz.conftest import CONFIG, LIVE, T0
from tests.reports import report

CASES = int(os.environ.get("ENCLAVE_KEYS_SLOT_CASES", "24"))


def current_slot(node: Node) -> int:
    [slot] = [s for s in slot_status(node.store) if s.state == "epoch"]
    return slot.index


def reopen_and_check(node_dir: Path, unseal: FixedKeyUnseal, *, epoch_lost: bool) -> None:
    node = Node.open(node_dir, unseal, clock=ManualClock(T0), config=CONFIG)
    try:
        recovery = node.recovery
        if epoch_lost:
            assert set(recovery.failed) == set(LIVE)
            assert recovery.hydrated == ()
        else:
            assert set(recovery.hydrated) == set(LIVE)
        assert [s.state for s in slot_status(node.store)].count("epoch") == 1
        fresh = RoundId("after-damage")
        node.publish(
            RoundRequested(round_id=fresh, deadline=T0 + 3600, threshold=2, committee_size=3)
        )
        assert node.store.get_key(fresh) is not None, "the node serves new rounds"
    finally:
        node.stop()


def damage(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as handle:
        handle.seek(offset)
        handle.write(data)


@pytest.mark.parametrize("which", ["stale", "current"])
def test_damaged_slots_give_a_typed_outcome(
    node: Node, node_dir: Path, unseal: FixedKeyUnseal, which: str
) -> None:
    current = current_slot(node)
    node.stop()
    path = node_dir / SLOT_FILE_NAME
    pristine = path.read_bytes()
    store_files = {p.name: p.read_bytes() for p in node_dir.iterdir() if p.is_file()}
    rng = random.Random(f"slots/{which}")
    target = current if which == "current" else 1 - current
    tried = 0
    for case in range(CASES):
        for name, data in store_files.items():
            (node_dir / name).write_bytes(data)
        start = target * SLOT_SIZE
        kind = case % 3
        if kind == 0:  # bit flips inside the record
            for _ in range(rng.randint(1, 4)):
                at = start + rng.randrange(120)
                damage(path, at, bytes([pristine[at] ^ (1 << rng.randrange(8))]))
        elif kind == 1:  # random bytes over the slot
            damage(path, start, os.urandom(SLOT_SIZE))
        else:  # a torn write: the slot's beginning from another record, the rest zero
            cut = rng.randrange(1, 120)
            damage(path, start, os.urandom(cut) + bytes(SLOT_SIZE - cut))
        # A stale slot is empty: damage to it never matters. A flip in the current slot
        # always does (the checksum or the AEAD tag catches it).
        reopen_and_check(node_dir, unseal, epoch_lost=which == "current")
        tried += 1
    report("fuzz: epoch slot file", cases=tried)


@pytest.mark.parametrize("size", [0, 1, SLOT_SIZE, SLOT_FILE_SIZE - 1, SLOT_FILE_SIZE * 2])
def test_a_truncated_or_extended_slot_file_refuses_to_open(
    node: Node, node_dir: Path, unseal: FixedKeyUnseal, size: int
) -> None:
    node.stop()
    path = node_dir / SLOT_FILE_NAME
    data = path.read_bytes()
    path.write_bytes((data + os.urandom(SLOT_FILE_SIZE * 2))[:size])
    before = {p.name: p.read_bytes() for p in node_dir.iterdir() if p.name != "lock.mdb"}
    with pytest.raises(StoreUnavailable):
        Node.open(node_dir, unseal, clock=ManualClock(T0), config=CONFIG)
    after = {p.name: p.read_bytes() for p in node_dir.iterdir() if p.name != "lock.mdb"}
    assert after == before, "nothing written"
    report("fuzz: epoch slot file", cases=1)


def test_a_missing_slot_file_loses_the_epoch_but_the_node_starts(
    node: Node, node_dir: Path, unseal: FixedKeyUnseal
) -> None:
    node.stop()
    (node_dir / SLOT_FILE_NAME).unlink()
    with LmdbStore.open(node_dir, create=False) as store:
        assert [s.state for s in slot_status(store)] == ["missing", "missing"]
    reopen_and_check(node_dir, unseal, epoch_lost=True)
    report("fuzz: epoch slot file", cases=1)
