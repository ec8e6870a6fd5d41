"""``enclave-keys replay``, ``inspect``, ``export-log`` and ``simulate``."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from enclave_keys.cli import main
from enclave_keys.errors import LogFileError
from enclave_keys.events import KeyshareCreated, StoredEvent
from enclave_keys.ids import EventId, KeyId, RoundId
from enclave_keys.invariants import SecretScanner, check_events
from enclave_keys.logfile import encode_log, read_log_file
from enclave_keys.store import LmdbStore
from simulations.config import SimConfig
from simulations.runner import Simulation


@pytest.fixture(scope="module")
def sim_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("sim")
    config = SimConfig(data_dir=data, nodes=2, committee=2, rounds=12, rotate_every=100.0)
    result = Simulation(config).run()
    assert result.ok, result.violations
    return data


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv), out=print)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_replay_of_a_directory_and_of_its_export_agree(
    sim_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    node = sim_dir / "node-0"
    code, out = run(capsys, "replay", str(node))
    assert code == 0
    assert "invariants: all hold" in out
    assert "live_keys_stored" in out

    logfile = tmp_path / "node-0.eklog"
    code, out = run(capsys, "export-log", str(node), "-o", str(logfile))
    assert code == 0
    assert out.startswith("exported ")

    code, from_dir = run(capsys, "replay", str(node), "--json", "--reaper-grace", "30")
    assert code == 0
    code, from_file = run(capsys, "replay", str(logfile), "--json", "--rounds")
    assert code == 0
    a, b = json.loads(from_dir), json.loads(from_file)
    for key in ("log_hash", "events", "outcomes", "live_rounds", "purges", "kek_rotations"):
        assert a[key] == b[key]
    assert a["kek_rotations"] >= 1
    assert set(a["invariants"]) > set(b["invariants"])  # a directory adds the store checks
    assert len(b["round_states"]) == b["rounds"]


def test_inspect_shows_rounds_keys_keks_and_epochs_but_no_key_bytes(
    sim_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    node = sim_dir / "node-1"
    code, text = run(capsys, "inspect", str(node))
    assert code == 0
    assert "KEK                active v" in text
    assert "epoch slot 0" in text
    code, raw = run(capsys, "inspect", str(node), "--json")
    assert code == 0
    view = json.loads(raw)
    assert view["rounds"]["live"] == len(view["live_rounds"]) == view["stored_keys"]
    for entry in view["live_rounds"]:
        assert re.fullmatch(r"[0-9a-f]{32}", entry["key_id"])
        assert entry["stored"]["key_id"] == entry["key_id"]
    # Nothing longer than a key id: no 32-byte value (64 hex digits) anywhere.
    assert not re.search(r"[0-9a-f]{64}", raw + text)


def test_replay_reports_a_violation_with_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = SimConfig(data_dir=tmp_path / "bad", nodes=3, rounds=12, fault="forgetful-cipher")
    result = Simulation(config).run()
    node = tmp_path / "bad" / str(result.violations[0].node)
    code, out = run(capsys, "replay", str(node))
    assert code == 1
    assert "VIOLATION: [ended_keys_purged]" in out
    assert "invariants: 2 violated" in out


def test_a_damaged_log_file_is_refused(
    sim_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    logfile = tmp_path / "log.eklog"
    assert run(capsys, "export-log", str(sim_dir / "node-0"), "-o", str(logfile))[0] == 0
    data = logfile.read_bytes()
    assert sum(1 for _ in read_log_file(logfile)) > 0
    for damaged in (
        data[:-1],  # truncated trailer
        data[:40],  # truncated record
        b"NOTALOG!" + data[8:],  # magic
        data[:8] + b"\x00\x02" + data[10:],  # version
        data[:100] + bytes([data[100] ^ 1]) + data[101:],  # a flipped bit
    ):
        logfile.write_bytes(damaged)
        with pytest.raises(LogFileError):
            list(read_log_file(logfile))
        code, out = run(capsys, "replay", str(logfile))
        assert code == 2
        assert "LogFileError" in out


def test_the_secret_scanner_finds_a_leaked_key() -> None:
    secret = bytes(range(32))
    leaky = StoredEvent(
        sequence=1,
        event_id=EventId(bytes(16)),
        timestamp=1.0,
        source="test",
        payload=KeyshareCreated(
            round_id=RoundId("r1"), key_id=KeyId(bytes(16)), ciphertext=b"xx" + secret + b"yy"
        ),
    )
    scanner = SecretScanner([secret, bytes(32)[:31]])
    assert len(scanner) == 1
    assert [v.check for v in check_events([leaky], scanner)] == ["no_key_material"]
    assert check_events([leaky]) == []  # structurally fine: only a ciphertext holds bytes
    assert encode_log([leaky]) == encode_log([leaky])


def test_simulate_is_python_m_simulations(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["simulate", "--data-dir", str(tmp_path / "s"), "--rounds", "4", "--nodes", "2"]
    code, out = run(capsys, *argv, "--committee", "2")
    assert code == 0
    assert "invariants: all hold" in out
    assert "log hash" in out
    with pytest.raises(SystemExit) as exit_:
        main(["simulate", "--help"])
    assert exit_.value.code == 0
    assert "usage: enclave-keys simulate" in capsys.readouterr().out


def test_a_log_file_that_cannot_be_read_or_written_is_a_clean_error(
    sim_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = run(capsys, "replay", str(tmp_path / "no-such.eklog"))
    assert code == 2
    assert "LogFileError" in out
    assert "Traceback" not in out
    target = tmp_path / "missing" / "x.eklog"
    code, out = run(capsys, "export-log", str(sim_dir / "node-0"), "-o", str(target))
    assert code == 2
    assert "LogFileError" in out
    assert not (tmp_path / "missing").exists()


def test_replay_flags_a_live_round_whose_stored_key_is_garbage(
    sim_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "node"
    shutil.copytree(sim_dir / "node-0", copy)
    with LmdbStore.open(copy) as store:
        live = [rid for rid, _ in store.list_keys()]
        assert live, "the simulation leaves live rounds"
        store.put_key(live[0], b"\x02" + b"\xff" * 200)  # a record that is no wrapped key
    code, out = run(capsys, "replay", str(copy))
    assert code == 1
    assert f"[live_keys_stored] round {live[0].value}: stored key record is unreadable" in out
