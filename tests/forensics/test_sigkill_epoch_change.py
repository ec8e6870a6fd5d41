"""SIGKILL in the middle of an epoch change: no live round lost, no purged round recoverable.

A real child process (:mod:`tests.forensics.ratchet_child`) is killed at each step of a
purge-driven ratchet and of a KEK rotation. The parent then attacks the directory as the
kill left it, restarts a node on it (recovery finishes or rolls back the change), and
attacks it again.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from enclave_keys.clock import ManualClock
from enclave_keys.crypto import SecretBytes
from enclave_keys.epochs import SlotStatus, slot_status
from enclave_keys.node import Node, NodeConfig
from enclave_keys.store import LmdbStore
from enclave_keys.testing.forensics import scan_data_dir
from enclave_keys.unseal import KeyUnseal
from tests.forensics.ratchet_child import ENDED, LIVE, T0
from tests.node.child import KEY_FD, ChildProcess
from tests.node.conftest import WAIT

ROOT = bytes(range(0x60, 0x80))


def scan(path: Path) -> set[str]:
    with SecretBytes.from_bytes(ROOT) as root:
        report = scan_data_dir(path, root, round_ids=[*LIVE, *ENDED], max_kek_versions=4)
    return {rid.value for rid in report.recovered_rounds}


@pytest.mark.parametrize("phase", ["slot_written", "keys_rewrapped", "old_slot_wiped"])
@pytest.mark.parametrize("mode", ["ratchet", "rotate"])
def test_a_sigkill_mid_epoch_change(tmp_path: Path, mode: str, phase: str) -> None:
    data = tmp_path / "node"
    with SecretBytes.from_bytes(ROOT) as master:
        child = ChildProcess(
            "tests.forensics.ratchet_child",
            [str(data), KEY_FD, mode, phase],
            master,
            tmp_path / "child.err",
        )
    try:
        deadline = time.monotonic() + WAIT * 3
        assert child.next_line(deadline) == "ready", child.stderr_tail()
        assert child.next_line(deadline) == f"phase {phase}", child.stderr_tail()
        assert child.kill() == -9
    finally:
        child.close()

    live = {rid.value for rid in LIVE}
    ended = {rid.value for rid in ENDED}
    valid = [s for s in _slots(data) if s.state == "epoch"]
    if phase != "old_slot_wiped":
        assert len(valid) == 2, "both slots are valid during the change"
    crashed = scan(data)
    assert crashed >= live, "the kill lost no live round key"

    config = NodeConfig(runtime="deterministic", epoch_window=3600.0)
    with SecretBytes.from_bytes(ROOT) as master:
        node = Node.open(data, KeyUnseal(master), clock=ManualClock(T0), config=config)
    try:
        recovery = node.recovery
        assert {rid.value for rid in recovery.hydrated} == live
        assert not recovery.failed
        assert node.epochs.kek_version.number == (
            2 if mode == "rotate" and phase != "slot_written" else 1
        ), "a rotation commits or rolls back whole"
        current = [s for s in slot_status(node.store) if s.state == "epoch"]
        assert len(current) == 1, "the stale slot is wiped"
    finally:
        node.stop()
    recovered = scan(data)
    print(
        json.dumps(
            {
                "mode": mode,
                "phase": phase,
                "live": len(live),
                "live_recovered": len(recovered & live),
                "ended": len(ended),
                "ended_recovered_at_kill": len(crashed & ended),
                "ended_recovered_after_restart": len(recovered & ended),
            }
        )
    )
    assert recovered == live


def _slots(data: Path) -> list[SlotStatus]:
    with LmdbStore.open(data, create=False) as store:
        return slot_status(store)
