"""A tiny run of every benchmark: each family runs end to end and reports every row.

Speed is never asserted (design §8): only that each benchmark measured something, that
every baseline was measured in the same run, and that the report shows every row.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import peer
from benchmarks.__main__ import main
from benchmarks.config import SIZES
from benchmarks.harness import Row, Target
from benchmarks.report import table, to_json
from benchmarks.runner import FAMILIES, run


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> list[Row]:
    produced, meta = run(SIZES["tiny"], FAMILIES, tmp_path_factory.mktemp("bench"))
    assert meta["size"] == "tiny"
    return produced


def test_every_family_reports_positive_medians(rows: list[Row]) -> None:
    assert {row.family for row in rows} == set(FAMILIES)
    for row in rows:
        assert row.measured > 0, row
        if row.baseline_name:
            assert row.baseline is not None
            assert row.baseline > 0, row
            assert row.ratio is not None
            assert row.ratio > 0


def test_every_target_of_the_issue_is_checked(rows: list[Row]) -> None:
    targeted = {(row.family, row.unit) for row in rows if row.target is not None}
    assert targeted >= {
        ("append", "ev/s"),
        ("replay", "ev/s"),
        ("lifecycle", "rounds/s"),
        ("seal", "MiB/s"),
        ("memory", "B/round"),
    }
    for row in rows:
        if row.target is not None:
            assert row.met in (True, False)


def test_the_peer_is_compared_in_the_same_run(rows: list[Row]) -> None:
    if not peer.AVAILABLE:
        pytest.skip("eventsourcing is not installed")
    names = {(row.family, row.baseline_name) for row in rows}
    assert ("append", "eventsourcing SQLite+AES") in names
    assert ("replay", "eventsourcing notification log") in names


def test_the_report_shows_every_row(rows: list[Row]) -> None:
    text = table(rows)
    for row in rows:
        assert row.name in text
    assert len(text.splitlines()) == len(rows) + 2
    markdown = table(rows, markdown=True)
    assert len(markdown.splitlines()) == len(rows) + 2
    decoded = json.loads(to_json(rows, {"size": "tiny"}))
    assert len(decoded["rows"]) == len(rows)
    assert {r["family"] for r in decoded["rows"]} == set(FAMILIES)


def test_targets_read_the_right_side() -> None:
    rate = Row("x", "rate", 1, "ev/s", 100.0, "raw", 400.0, Target(50))
    assert rate.ratio == 0.25
    assert rate.met is True
    assert Row("x", "r", 1, "ev/s", 100.0, "raw", 400.0, Target(0.8, on="ratio")).met is False
    cost = Row("x", "t", 1, "s", 0.4, "raw", 0.1, Target(0.5, kind="at_most"))
    assert cost.met is True
    assert Target(0.5, kind="at_most").describe("s") == "<= 0.5 s"
    assert Row("x", "n", 1, "s", 1.0).met is None


def test_the_command_line_runs_one_family(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report.json"
    code = main(
        ["--size", "tiny", "--only", "seal", "--workdir", str(tmp_path), "--json-out", str(out)]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "keyshare seal 64 KiB" in printed
    assert {row["family"] for row in json.loads(out.read_text())["rows"]} == {"seal"}
