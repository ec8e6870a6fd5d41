from __future__ import annotations

import random
from pathlib import Path

import pytest

from enclave_keys.events import KeyshareCreated, RoundPurged
from enclave_keys.store import LmdbStore
from simulations.scripted import main, run_rounds, unlock, verify


def test_scripted_lifecycle_holds_its_invariants(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "node"
    assert main(["--data-dir", str(data), "--rounds", "24", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "invariants       all hold" in out

    with LmdbStore.open(data) as store:
        events = list(store.read_events())
        created = {e.payload.round_id for e in events if isinstance(e.payload, KeyshareCreated)}
        purged = {e.payload.round_id for e in events if isinstance(e.payload, RoundPurged)}
        stored = {round_id for round_id, _ in store.list_keys()}
    assert len(created) == 24
    assert stored == created - purged  # exactly the live rounds keep a key
    assert f"live round keys  {len(stored)} stored, {len(stored)} expected" in out


def test_the_checker_reports_a_lost_live_key_and_a_leftover_ended_key(tmp_path: Path) -> None:
    with LmdbStore.open(tmp_path / "node") as store:
        kek = unlock(store)
        run = run_rounds(store, kek, random.Random(9), 16, prefix="t")
        assert verify(store, kek, run) == []
        live = sorted(set(run.shares) - run.ended)
        ended = sorted(run.ended)
        assert live
        assert ended
        leftover = store.get_key(live[1])
        assert leftover is not None
        store.delete_key(live[0])
        store.put_key(ended[0], leftover)
        problems = verify(store, kek, run)
        kek.wipe()
    assert sorted(problems) == sorted(
        [f"live round {live[0]} lost its key", f"ended round {ended[0]} still has a stored key"]
    )


def test_the_demo_refuses_to_clear_a_directory_that_is_not_a_store(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="not an enclave_keys store"):
        main(["--data-dir", str(tmp_path), "--rounds", "1"])
    assert (tmp_path / "precious.txt").read_text() == "keep me"
