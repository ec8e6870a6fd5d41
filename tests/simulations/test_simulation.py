from __future__ import annotations

import io
from pathlib import Path

import pytest

from enclave_keys.clock import ManualClock
from enclave_keys.errors import ScenarioError
from enclave_keys.logfile import read_log_file, write_log_file
from enclave_keys.node import NodeConfig
from enclave_keys.replay import replay
from enclave_keys.round_cipher import ROUND_CIPHER
from enclave_keys.store import LmdbStore
from simulations import report
from simulations.cli import main
from simulations.config import SimConfig, parse_mix
from simulations.runner import MARKER, SimResult, Simulation, prepare_data_dir
from simulations.scenario import CLOCK_START, build
from simulations.shrink import shrink
from simulations.simnode import SecretLedger, open_node

SMALL = {"nodes": 3, "rounds": 14, "crash_every": 150.0, "rotate_every": 150.0}


def run(tmp_path: Path, name: str, **changes: object) -> SimResult:
    config = SimConfig(data_dir=tmp_path / name).with_(**{**SMALL, **changes})
    return Simulation(config).run()


def test_same_seed_same_hash_and_a_different_seed_a_different_one(tmp_path: Path) -> None:
    first = run(tmp_path, "a", seed=7)
    again = run(tmp_path, "b", seed=7)
    other = run(tmp_path, "c", seed=8)
    for result in (first, again, other):
        assert result.ok, result.violations
    assert first.crashes > 0
    assert first.rotations > 0
    assert first.log_hash == again.log_hash
    assert first.node_hashes == again.node_hashes
    assert other.log_hash != first.log_hash
    # Byte for byte: the exported logs are identical files.
    for i in range(3):
        exported = []
        for name in ("a", "b"):
            with LmdbStore.open(tmp_path / name / f"node-{i}", create=False) as store:
                target = tmp_path / f"{name}-{i}.eklog"
                write_log_file(store.read_events(), target)
                exported.append(target.read_bytes())
        assert exported[0] == exported[1]


@pytest.mark.parametrize(
    ("fault", "checks"),
    [
        ("forgetful-cipher", {"ended_keys_purged", "ended_keys_absent", "ended_keys_wiped"}),
        ("deaf-router", {"failures_end_rounds"}),
    ],
)
def test_a_broken_component_is_caught_with_a_reproducing_seed(
    tmp_path: Path, fault: str, checks: set[str]
) -> None:
    failing = run(tmp_path, "run", seed=3, fault=fault, rounds=20)
    assert not failing.ok
    assert {v.check for v in failing.violations} <= checks
    first = failing.violations[0]
    assert first.round_id is not None
    assert first.node is not None
    assert failing.trace
    assert all(first.round_id in line for line in failing.trace)

    small = shrink(failing, tmp_path / "shrink")
    assert small.config.only_rounds is not None
    assert len(small.scenario.plans) == 1
    assert small.violations[0].check == first.check
    # The printed reproduction really reproduces: rerun it from its arguments alone.
    again = Simulation(small.config.with_(data_dir=tmp_path / "again")).run()
    assert [v.check for v in again.violations] == [v.check for v in small.violations]
    assert again.log_hash == small.log_hash


def test_a_violation_exits_non_zero_with_the_seed_and_the_trace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--data-dir", str(tmp_path / "d"), "--seed", "5", "--rounds", "12", "--nodes", "3"]
    assert main([*argv, "--fault", "forgetful-cipher"]) == 1
    out = capsys.readouterr().out
    assert "VIOLATION with seed 5" in out
    assert "python -m simulations --seed=5" in out
    assert "--only-rounds=" in out
    assert "RoundComplete(round_id=" in out  # the offending round's events
    assert "ciphertext=<" in out or "KeyshareCreated" not in out  # sizes, never bytes
    report_text = (tmp_path / "d" / "report.md").read_text()
    assert "## Violations" in report_text
    assert "Reproduce with" in report_text


def test_the_main_job_prints_a_report_and_every_invariant_holds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "demo"
    assert main(["--data-dir", str(data), "--rounds", "10", "--nodes", "3", "--progress"]) == 0
    captured = capsys.readouterr()
    assert "invariants: all hold" in captured.out
    assert "log hash" in captured.out
    assert "max key lifetime" in captured.out
    assert "100%" in captured.err  # the progress bar, on stderr
    text = (data / "report.md").read_text()
    assert "| reaper_bound | holds |" in text
    pngs = sorted(p.name for p in data.glob("*.png"))
    assert pngs == (["key-lifetimes.png", "live-keys.png"] if report.plots_available() else [])


def test_without_matplotlib_the_report_has_no_plots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(report, "plots_available", lambda: False)
    result = run(tmp_path, "np", rounds=3, crash_every=0.0)
    assert report.make_plots(result, tmp_path) == []
    assert "no plots" in report.markdown_report(result, [], [], [])


def test_a_pykka_run_replays_to_the_live_nodes_final_state(tmp_path: Path) -> None:
    result = run(tmp_path, "pykka", runtime="pykka", rounds=10, nodes=2, committee=2)
    assert result.ok, result.violations
    path = tmp_path / "pykka" / "node-0"
    with LmdbStore.open(path, create=False) as store:
        write_log_file(store.read_events(), tmp_path / "node-0.eklog")
    state = replay(read_log_file(tmp_path / "node-0.eklog"))

    clock = ManualClock(CLOCK_START + result.scenario.end + 3600)
    node = open_node(
        path,
        seed=result.config.seed,
        index=0,
        clock=clock,
        config=NodeConfig(runtime="pykka", harden=False),
        ledger=SecretLedger(),
        deterministic_entropy=False,
        hook=None,
    )
    try:
        node.wait_idle()
        live = set(state.live_rounds())
        assert live == set(node.router.open_rounds())
        assert live == set(node.round_cipher.held_rounds())
        assert {rid for rid, _ in node.store.list_keys()} == live
        for rid in live:
            context = node.registry.get(rid)
            assert context is not None
            leased = context.get(ROUND_CIPHER)
            assert leased is not None
            assert leased.key_id.hex() == state.rounds[rid].current_key
        assert set(state.ended_rounds()) <= set(node.router.completed_rounds())
    finally:
        node.stop()


def test_the_scenario_is_pure_and_cutting_it_keeps_the_rest(tmp_path: Path) -> None:
    config = SimConfig(seed=11, rounds=30, data_dir=tmp_path)
    whole = build(config)
    assert build(config) == whole
    prefix = build(config.with_(rounds=12))
    assert prefix.plans == whole.plans[:12]
    alone = build(config.with_(rounds=8, only_rounds=(7,)))
    assert alone.plans == (whole.plans[7],)
    crashes = [a for a in whole.actions if a.kind == "crash" and a.time <= prefix.end]
    assert crashes == [a for a in prefix.actions if a.kind == "crash"]


def test_malformed_scenarios_are_refused(tmp_path: Path) -> None:
    assert parse_mix("complete=1,lost=2") == {
        "complete": 1,
        "timeout": 0,
        "misbehaviour": 0,
        "lost": 2,
    }
    for bad in ("complete", "nonsense=1", "complete=-1", "complete=0", "complete=x"):
        with pytest.raises(ScenarioError):
            parse_mix(bad)
    with pytest.raises(ScenarioError):
        SimConfig(nodes=2, committee=3)
    with pytest.raises(ScenarioError, match="unknown fault"):
        Simulation(SimConfig(data_dir=tmp_path, fault="nope"))


def test_the_data_dir_is_cleared_only_when_it_is_a_simulation_dir(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(ScenarioError, match="not clearing"):
        prepare_data_dir(tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep me"
    sim = tmp_path / "sim"
    prepare_data_dir(sim)
    (sim / "node-0").mkdir()
    prepare_data_dir(sim)
    assert sorted(p.name for p in sim.iterdir()) == [MARKER]


def test_the_progress_bar_draws_on_its_stream() -> None:
    stream = io.StringIO()
    bar = report.ProgressBar(stream, width=10)
    bar(1, 4)
    bar(4, 4)
    assert stream.getvalue().endswith("[##########] 100%  4/4 steps\n")
