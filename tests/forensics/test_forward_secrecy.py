"""Forward secrecy at rest, proven on raw bytes (issue 5, design §6).

The attacker of ``docs/threat-model.md``: a copy of the data directory taken after rounds
ended, and the master secret leaked later. :func:`scan_data_dir` reads every file as raw
bytes and tries every offset against the documented fixed-size formats. Every live round
must come back (so the search demonstrably works) and no round purged before the window
closed may.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from enclave_keys.clock import ManualClock
from enclave_keys.crypto import SecretBytes
from enclave_keys.events import (
    FailureReason,
    RoundComplete,
    RoundFailed,
    RoundRequested,
    RoundStage,
)
from enclave_keys.ids import KeyId, RoundId
from enclave_keys.node import Node, NodeConfig
from enclave_keys.round_cipher import ROUND_CIPHER
from enclave_keys.testing.forensics import ForensicReport, find_raw_keys, scan_data_dir
from enclave_keys.unseal import KeyUnseal

ROOT = bytes(range(0x20, 0x40))
T0 = 1_700_000_000.0
WINDOW = 1.0


class History:
    """A node on real LMDB files, and what the test knows of every round it made."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.clock = ManualClock(T0)
        self.live: set[RoundId] = set()
        self.ended: set[RoundId] = set()
        self.raw: dict[RoundId, bytes] = {}  # test-only copies, to look for in the files
        self.key_of: dict[KeyId, RoundId] = {}
        self.node = self.open()

    def open(self) -> Node:
        config = NodeConfig(runtime="deterministic", epoch_window=WINDOW, snapshot_every=40)
        with SecretBytes.from_bytes(ROOT) as master:
            return Node.open(self.path, KeyUnseal(master), clock=self.clock, config=config)

    def request(self, prefix: str, count: int) -> list[RoundId]:
        made = [RoundId(f"{prefix}-{i:03d}") for i in range(count)]
        for rid in made:
            self.node.publish(
                RoundRequested(round_id=rid, deadline=T0 + 86_400, threshold=2, committee_size=3)
            )
            context = self.node.registry.get(rid)
            assert context is not None
            leased = context.get(ROUND_CIPHER)
            assert leased is not None
            with leased.lease() as cipher, cipher._borrow_key() as view:
                self.raw[rid] = bytes(view)
            self.key_of[leased.key_id] = rid
            self.live.add(rid)
        return made

    def complete(self, rounds: Iterable[RoundId]) -> None:
        for rid in rounds:
            self.node.publish(RoundComplete(round_id=rid))
            self._ended(rid)

    def time_out(self, rounds: Iterable[RoundId]) -> None:
        for rid in rounds:
            self.node.publish(
                RoundFailed(
                    round_id=rid,
                    failed_at=RoundStage.COMPUTE,
                    reason=FailureReason.COMPUTE_TIMEOUT,
                )
            )
            self._ended(rid)

    def _ended(self, rid: RoundId) -> None:
        self.live.discard(rid)
        self.ended.add(rid)
        assert self.node.store.get_key(rid) is None, "the round's key is purged"

    def close_window(self) -> None:
        self.clock.advance(WINDOW)
        self.node.tick()

    def restart(self, *, crash: bool = False) -> None:
        if crash:
            self.node.crash()
        else:
            self.node.stop()
        self.node = self.open()
        assert set(self.node.recovery.hydrated) == self.live

    def scan(self, where: Path | None = None) -> ForensicReport:
        with SecretBytes.from_bytes(ROOT) as root:
            return scan_data_dir(
                where or self.path,
                root,
                round_of_key=self.key_of,
                round_ids=self.live | self.ended,
            )

    def image(self, where: Path) -> Path:
        """A copy of the data directory as it is on disk now (the node keeps running)."""
        shutil.copytree(self.path, where)
        return where


@pytest.fixture
def history(tmp_path: Path) -> Iterator[History]:
    made = History(tmp_path / "node")
    yield made
    made.node.stop()


def report_line(name: str, history: History, report: ForensicReport) -> str:
    recovered = report.recovered_rounds
    return json.dumps(
        {
            "test": name,
            "rounds_tested": len(history.live | history.ended),
            "live": len(history.live),
            "live_recovered": len(recovered & history.live),
            "ended": len(history.ended),
            "ended_recovered": len(recovered & history.ended),
            "bytes_scanned": sum(report.files.values()),
            "candidates": {
                "keyring": report.keyring_candidates,
                "epoch_key": report.epoch_candidates,
                "round_key": report.round_key_candidates,
            },
            "kek_versions_found": len(report.kek_versions),
            "epochs_found": len(report.epochs),
        },
        sort_keys=True,
    )


def test_purged_rounds_are_unrecoverable_after_restarts_rotation_and_a_crash(
    history: History,
) -> None:
    a = history.request("a", 30)
    history.complete(a[:10])
    history.time_out(a[10:15])
    history.close_window()
    history.restart()

    b = history.request("b", 30)
    history.complete([*b[:10], *a[15:20]])
    history.close_window()
    history.node.rotate_kek()
    c = history.request("c", 10)
    history.complete(c[:5])  # and the node dies before the window closes:
    history.restart(crash=True)  # the start ratchet covers these

    d = history.request("d", 20)
    history.complete(d[:10])
    history.time_out(d[10:15])
    history.close_window()
    history.node.snapshot()

    report = history.scan()
    print(report_line("history", history, report))
    assert report.kek_versions, "the attacker opened the keyring with the leaked root"
    assert report.recovered_rounds == history.live, "every live round is found: the search works"
    assert not report.recovered_rounds & history.ended
    assert find_raw_keys(history.path, history.raw.values()) == [], "no raw key in any file"

    history.node.stop()
    stopped = history.scan()
    assert stopped.recovered_rounds == history.live
    history.node = history.open()


def test_the_attack_does_find_purged_keys_until_the_window_closes(
    history: History, tmp_path: Path
) -> None:
    """The control: deletion alone leaves a recoverable key behind; the ratchet does not.

    Right after a purge commits, LMDB's freed page still holds the deleted blob.
    """
    rounds = history.request("r", 20)
    victim = rounds[0]
    blob = history.node.store.get_key(victim)
    assert blob is not None
    history.complete([victim])
    before = history.image(tmp_path / "before-window")
    assert blob in (before / "data.mdb").read_bytes(), "the deleted value lingers in the file"
    found = history.scan(before)
    print(report_line("before-window", history, found))
    assert found.recovered_rounds == history.live | {victim}, "the attack works on leftovers"

    history.close_window()
    after = history.image(tmp_path / "after-window")
    found = history.scan(after)
    print(report_line("after-window", history, found))
    assert found.recovered_rounds == history.live
    assert victim not in found.recovered_rounds


def test_a_clean_stop_closes_the_window_early(history: History, tmp_path: Path) -> None:
    rounds = history.request("s", 12)
    history.complete(rounds[:6])
    history.node.stop()  # the window has not passed: the stop ratchets what is pending
    report = history.scan()
    assert report.recovered_rounds == history.live
    history.node = history.open()
