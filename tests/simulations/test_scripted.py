from __future__ import annotations

import random
from pathlib import Path

import pytest

from enclave_keys.clock import ManualClock
from enclave_keys.crypto import SecretBytes
from enclave_keys.events import KeyshareCreated, RoundPurged
from enclave_keys.node import Node, NodeConfig
from enclave_keys.store import LmdbStore
from enclave_keys.unseal import KeyUnseal
from simulations.scripted import Plan, drive, main, verify


@pytest.mark.parametrize("runtime", ["deterministic", "pykka"])
def test_the_main_job_holds_its_invariants(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], runtime: str
) -> None:
    data = tmp_path / "node"
    argv = ["--data-dir", str(data), "--rounds", "60", "--seed", "3", "--runtime", runtime]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "invariants       all hold" in out

    with LmdbStore.open(data) as store:
        events = list(store.read_events())
        created = {e.payload.round_id for e in events if isinstance(e.payload, KeyshareCreated)}
        purged = {e.payload.round_id for e in events if isinstance(e.payload, RoundPurged)}
        stored = {round_id for round_id, _ in store.list_keys()}
    assert len(created) == 60
    assert stored == created - purged  # exactly the live rounds keep a key
    assert f"live round keys  {len(stored)} stored, {len(stored)} expected" in out


def test_the_checker_reports_a_lost_live_key_and_a_leftover_ended_key(tmp_path: Path) -> None:
    plan = Plan.draw(random.Random(9), 30, prefix="t")
    clock = ManualClock()
    config = NodeConfig(runtime="deterministic")
    master = SecretBytes.random(32)
    with master, Node.open(tmp_path, KeyUnseal(master), clock=clock, config=config) as node:
        drive(node, clock, plan)
        assert verify(node, plan) == []
        live = sorted(set(plan.outcomes) - plan.ended)
        ended = sorted(plan.ended)
        leftover = node.store.get_key(live[1])
        assert leftover is not None
        node.store.delete_key(live[0])
        node.store.put_key(ended[0], leftover)
        problems = verify(node, plan)
    assert f"live round {live[0]} lost its key or keyshare" in problems
    assert f"ended round {ended[0]} still has a stored key" in problems
    assert len(problems) == 2


def test_the_demo_refuses_to_clear_a_directory_that_is_not_a_store(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="not an enclave_keys store"):
        main(["--data-dir", str(tmp_path), "--rounds", "1"])
    assert (tmp_path / "precious.txt").read_text() == "keep me"
