"""The SIGKILL crash campaign (design §3, §7): a node runs rounds under load in a child
process, the test kills it with SIGKILL at random points, reopens the data directory and
checks that recovery made it right.

Workers come from a fork server (``python -m tests.node.crash_child --serve``) so a crash
point costs a fork, not a new interpreter. ``ENCLAVE_KEYS_CRASH_POINTS`` sets the number
of kills (default 150; soak runs use thousands), ``ENCLAVE_KEYS_CRASH_SEED`` the seed.

The report (printed in the terminal summary, written as JSON next to the test's files and
recorded as junit properties): crash points survived / total, live keys lost, ended
rounds' keys left after recovery — both must be 0.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest

from enclave_keys.crypto import SecretBytes
from enclave_keys.errors import EnclaveKeysError
from enclave_keys.events import (
    FailureReason,
    RoundComplete,
    RoundFailed,
    RoundKeyReady,
    RoundRequested,
    StoredEvent,
)
from enclave_keys.ids import RoundId
from enclave_keys.node import Node
from enclave_keys.store import LmdbStore, Store
from tests.node.child import KEY_FD, ChildProcess
from tests.node.conftest import (
    WAIT,
    NodeFactory,
    leased_cipher,
    of_type,
    open_keyshare,
    settle,
)
from tests.reports import replace

KILL_POINTS = int(os.environ.get("ENCLAVE_KEYS_CRASH_POINTS", "150"))
KILL_SEED = int(os.environ.get("ENCLAVE_KEYS_CRASH_SEED", "4711"))
MAX_LINES_BEFORE_KILL = 40
REAP_EVERY = 25  # kills between reaps of every round (keeps the data directory small)


@dataclass
class Claims:
    """What the workers reported as durable (each line follows a returned publish)."""

    requested: set[RoundId] = field(default_factory=set)
    completed: set[RoundId] = field(default_factory=set)
    failed: set[RoundId] = field(default_factory=set)

    def add(self, line: str) -> None:
        word, *rest = line.split()
        target = {"requested": self.requested, "completed": self.completed, "failed": self.failed}
        if word in target:
            target[word].add(RoundId(rest[0]))


@dataclass
class Report:
    crash_points_total: int = 0
    crash_points_survived: int = 0
    live_keys_lost: int = 0
    ended_keys_left: int = 0
    rounds_requested: int = 0
    hydrated: int = 0
    purged_at_recovery: int = 0
    failed_unkeyed: int = 0
    reannounced: int = 0
    problems: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {k: v for k, v in asdict(self).items() if isinstance(v, int)}


class ForkServer:
    """The ``crash_child --serve`` process: forks one worker per crash point."""

    def __init__(self, data_dir: Path, master: SecretBytes, err: Path) -> None:
        args = ["--serve", str(data_dir), KEY_FD]
        self.child = ChildProcess("tests.node.crash_child", args, master, err, interactive=True)
        self.worker: int | None = None
        assert self.child.next_line(time.monotonic() + WAIT) == "ready"

    def start_worker(self, seed: int, prefix: str) -> int:
        self.child.send(f"run {seed} {prefix}")
        word, pid = self.child.next_line(time.monotonic() + WAIT).split()
        assert word == "worker"
        self.worker = int(pid)
        return self.worker

    def kill_worker(self) -> list[str]:
        """SIGKILL the worker; the lines it wrote before dying."""
        assert self.worker is not None
        os.kill(self.worker, signal.SIGKILL)
        lines: list[str] = []
        deadline = time.monotonic() + WAIT
        while True:
            line = self.child.next_line(deadline)
            if line.startswith("reaped "):
                _, pid, status = line.split()
                assert int(pid) == self.worker
                assert int(status) == -signal.SIGKILL, f"worker ended with {status}"
                self.worker = None
                return lines
            lines.append(line)

    def close(self) -> None:
        if self.worker is not None:  # a failed test: do not leave the worker running
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.worker, signal.SIGKILL)
        self.child.close()


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    """In /dev/shm when there is one: a SIGKILL loses no page cache, so a RAM file system
    shows exactly what a disk would after a process crash, minus the fsync wait."""
    if not os.path.isdir("/dev/shm"):
        yield tmp_path / "node"
        return
    where = Path(tempfile.mkdtemp(prefix="enclave-keys-crash-", dir="/dev/shm"))
    yield where / "node"
    shutil.rmtree(where, ignore_errors=True)


@pytest.fixture
def fork_server(data_dir: Path, nodes: NodeFactory, tmp_path: Path) -> Iterator[ForkServer]:
    server = ForkServer(data_dir, nodes.master, tmp_path / "child-stderr.log")
    yield server
    server.close()


class LogCache:
    """The log as decoded so far: each inspection reads only what was appended since."""

    def __init__(self) -> None:
        self.events: list[StoredEvent] = []

    def refresh(self, store: Store) -> list[StoredEvent]:
        new = list(store.read_events(len(self.events) + 1))
        first = len(self.events) + 1
        assert [s.sequence for s in new] == list(range(first, first + len(new)))
        self.events.extend(new)
        return self.events

    def inspect(self, data_dir: Path) -> tuple[list[StoredEvent], set[RoundId]]:
        """The whole log (it must decode end to end) and the rounds with a stored key."""
        with LmdbStore.open(data_dir) as store:
            events = list(self.refresh(store))
            keyed = {r for r, _ in store.list_keys()}
        return events, keyed


def count_after_kill(
    node: Node, before: list[StoredEvent], keys_before: set[RoundId], report: Report
) -> tuple[int, int]:
    """(live keys lost, ended rounds' keys left) once recovery ran; asserts nothing."""
    requested = {p.round_id for p in of_type(before, RoundRequested)}
    ended = {p.round_id for p in of_type(before, RoundComplete)} | {
        p.round_id for p in of_type(before, RoundFailed) if not p.reason.is_misbehaviour
    }
    live_after = set(node.router.open_rounds())
    stored_after = {r for r, _ in node.store.list_keys()}
    lost = 0
    for r in (requested - ended) & keys_before:  # live and keyed when the kill came
        share = node.keyshare.keyshare_of(r)
        usable = r in live_after and r in stored_after and share is not None
        if usable and share is not None:
            try:
                usable = len(open_keyshare(node, r, share[1])) == node.config.share_size
            except (AssertionError, EnclaveKeysError):
                usable = False
        lost += not usable
    report.rounds_requested = len(requested)
    return lost, len(stored_after - live_after)


def check_after_kill(
    node: Node,
    before: list[StoredEvent],
    after: list[StoredEvent],
    keys_before: set[RoundId],
    claims: Claims,
) -> None:
    """What must hold once recovery has run on what a SIGKILL left behind (asserts)."""
    requested = {p.round_id for p in of_type(before, RoundRequested)}
    completed = {p.round_id for p in of_type(before, RoundComplete)}
    announced = {p.round_id for p in of_type(before, RoundKeyReady)}
    # A round whose end was decided (a timeout or other failure logged) but whose
    # RoundComplete the kill pre-empted: recovery completes it.
    ending = {
        p.round_id for p in of_type(before, RoundFailed) if not p.reason.is_misbehaviour
    } - completed
    # Durability: whatever a worker saw published is in the log.
    assert claims.requested <= requested
    assert claims.completed <= completed
    assert claims.failed <= {p.round_id for p in of_type(before, RoundFailed)}

    report = node.recovery
    failed = set(report.failed)
    open_rounds = node.router.open_rounds()
    live = set(open_rounds) - failed
    # Recovery failed only rounds the log shows live that were killed between opening
    # and keying: no stored key, never announced; clearly, with key_missing_after_restart.
    assert failed <= requested - completed - keys_before - announced
    reasons: dict[RoundId, set[FailureReason]] = {}
    for f in of_type(after, RoundFailed):
        reasons.setdefault(f.round_id, set()).add(f.reason)
    for r in failed:
        assert FailureReason.KEY_MISSING_AFTER_RESTART in reasons.get(r, set())
        assert node.store.get_key(r) is None
        assert leased_cipher(node, r) is None
    # Every other round the log shows live is live, with its key, cipher and keyshare.
    assert live == requested - completed - ending - failed
    for r in live:
        assert node.store.get_key(r) is not None, f"live round {r} lost its key"
        share = node.keyshare.keyshare_of(r)
        assert share is not None, f"live round {r} has no keyshare"
        assert len(open_keyshare(node, r, share[1])) == 32
    # No key of a completed (or otherwise not live) round exists: leftovers were purged.
    assert {r for r, _ in node.store.list_keys()} == live
    assert set(report.purged) == keys_before - live - ending
    assert not completed & set(open_rounds)
    # A round whose end was decided before the kill (a timeout logged, its RoundComplete
    # not yet) is finished by recovery: none may stay "ending" after a restart.
    stuck = {r for r, state in open_rounds.items() if state.ending}
    assert not stuck, f"rounds left ending after recovery: {sorted(stuck)[:5]}"


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["deterministic"])  # the parent's node; workers: Pykka
def test_sigkill_at_random_points_loses_no_live_key_and_keeps_no_ended_one(
    nodes: NodeFactory,
    data_dir: Path,
    fork_server: ForkServer,
    tmp_path: Path,
    record_testsuite_property: Callable[[str, object], None],
) -> None:
    rng = random.Random(KILL_SEED)
    log = LogCache()
    claims = Claims()
    report = Report()
    for kill in range(KILL_POINTS):
        fork_server.start_worker(rng.randrange(2**32), f"k{kill}")
        deadline = time.monotonic() + WAIT
        for _ in range(rng.randint(1, MAX_LINES_BEFORE_KILL)):
            line = fork_server.child.next_line(deadline)
            assert line != "done", "the worker ran out of rounds before the kill"
            claims.add(line)
        if rng.random() < 0.5:  # not only right after a publish returned
            time.sleep(rng.random() * 0.004)
        for line in fork_server.kill_worker():
            claims.add(line)
        report.crash_points_total += 1

        before, keys_before = log.inspect(data_dir)
        node = nodes.open()
        after = log.refresh(node.store)
        lost, left = count_after_kill(node, before, keys_before, report)
        report.live_keys_lost += lost
        report.ended_keys_left += left
        recovery = node.recovery
        report.hydrated += len(recovery.hydrated)
        report.purged_at_recovery += len(recovery.purged)
        report.failed_unkeyed += len(recovery.failed)
        report.reannounced += len(recovery.reannounced)
        try:
            check_after_kill(node, before, after, keys_before, claims)
        except AssertionError as exc:
            report.problems.append(f"crash point {kill}: {exc}")
        else:
            report.crash_points_survived += lost == 0 and left == 0
        if kill % REAP_EVERY == REAP_EVERY - 1:  # past every deadline: the reaper ends all
            nodes.clock.advance(10_000)
            node.tick()
            settle(node)
            assert node.router.open_rounds() == {}
        node.stop()

    # The last state, once more: past every deadline the reaper ends every round.
    node = nodes.open()
    nodes.clock.advance(10_000)
    node.tick()
    settle(node)
    assert node.router.open_rounds() == {}
    assert node.store.list_keys() == []

    counts = report.counts()
    replace("SIGKILL crash campaign", **counts)
    (tmp_path / "crash-campaign.json").write_text(
        json.dumps({**counts, "problems": report.problems}, indent=2)
    )
    for name, value in counts.items():
        record_testsuite_property(f"sigkill_{name}", value)
    assert report.problems == []
    assert report.live_keys_lost == 0
    assert report.ended_keys_left == 0
    assert report.crash_points_survived == report.crash_points_total == KILL_POINTS
