"""A node whose commits fail now and then still ends every round, and stops and seals.

A group commit can fail (a full disk, an I/O error) after a core has decided what to
publish: the reaper's deadline failure, or the router's ``RoundComplete``. Nothing
retries the publish itself, so the cores must not rely on it: the reaper fails a round
again while it stays open, and the router asks again for the completion of an ending
round the reaper fails. Stop and seal must still cover the purges and wipe the keys
when such a failure is waiting to be reported. Both runtimes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import cast

import pytest
from structlog.testing import capture_logs

from enclave_keys.clock import ManualClock
from enclave_keys.crypto import SecretBytes
from enclave_keys.errors import LifecycleError, Sealed, StoreError
from enclave_keys.events import (
    FailureReason,
    NodeSealed,
    RoundComplete,
    RoundFailed,
    RoundPurged,
    RoundRequested,
    RoundStage,
)
from enclave_keys.ids import RoundId
from enclave_keys.invariants import check_log
from enclave_keys.node import Node, NodeConfig
from enclave_keys.replay import replay
from enclave_keys.runtime import PykkaRuntime
from enclave_keys.store import LmdbStore, MemoryBacking, MemoryStore, WriteBatch
from enclave_keys.testing.fakes import FaultyStore, FixedKeyUnseal, InjectedFault
from enclave_keys.testing.forensics import scan_data_dir
from enclave_keys.unseal import KeyUnseal
from tests.node.conftest import RUNTIMES, T0, RuntimeName

R = RoundId("e3:lost")
DEADLINE = T0 + 10.0


def request(round_id: RoundId = R, deadline: float = DEADLINE) -> RoundRequested:
    return RoundRequested(round_id=round_id, deadline=deadline, threshold=2, committee_size=3)


@pytest.fixture(params=RUNTIMES)
def config(request: pytest.FixtureRequest) -> NodeConfig:
    runtime: RuntimeName = request.param
    return NodeConfig(runtime=runtime, harden=False, reaper_grace=0.0, idle_timeout=20.0)


class Nodes:
    """Opens nodes over one in-memory backing (through a FaultyStore); stops them all."""

    def __init__(self, config: NodeConfig) -> None:
        self.backing = MemoryBacking()
        self.clock = ManualClock(T0)
        self.config = config
        self.opened: list[Node] = []

    def open(self, **changes: object) -> tuple[Node, FaultyStore]:
        store = FaultyStore(MemoryStore(self.backing))
        config = replace(self.config, **changes)  # type: ignore[arg-type]
        node = Node(store, FixedKeyUnseal(1), clock=self.clock, config=config)
        node.start()
        self.opened.append(node)
        return node, store

    def tick(self, node: Node, seconds: float) -> None:
        self.clock.advance(seconds)
        node.tick()
        node.wait_idle(20.0)


@pytest.fixture
def nodes(config: NodeConfig) -> Iterator[Nodes]:
    made = Nodes(config)
    yield made
    for node in made.opened:
        node.crash()


def payloads(node: Node, kind: type[object]) -> list[object]:
    return [s.payload for s in node.store.read_events() if isinstance(s.payload, kind)]


def test_a_deadline_failure_whose_commit_failed_is_made_again(nodes: Nodes) -> None:
    node, store = nodes.open()
    node.publish(request())
    node.wait_idle(20.0)
    store.fail_writes = 1  # the reaper's RoundFailed is not committed
    nodes.clock.advance(100)
    node.tick()
    with pytest.raises(StoreError):
        node.wait_idle(20.0)  # the failed publish is reported
    assert payloads(node, RoundFailed) == []
    assert node.store.get_key(R) is not None

    nodes.tick(node, node.reaper.refire_interval)

    assert [f.reason for f in payloads(node, RoundFailed)] == [  # type: ignore[attr-defined]
        FailureReason.DEADLINE_EXCEEDED
    ]
    assert len(payloads(node, RoundPurged)) == 1
    assert node.store.get_key(R) is None


def test_a_round_failed_before_a_snapshot_and_still_open_is_failed_again_after_restart(
    nodes: Nodes,
) -> None:
    """The snapshot remembers that the reaper failed the round, not that the failure
    never reached the log: after a restart the round is failed again at once."""
    node, store = nodes.open()
    node.publish(request())
    node.wait_idle(20.0)
    store.fail_writes = 1
    nodes.clock.advance(100)
    node.tick()
    with pytest.raises(StoreError):
        node.wait_idle(20.0)
    node.snapshot()  # fired, but open
    node.crash()

    restarted, _ = nodes.open()
    nodes.tick(restarted, 0.001)
    assert restarted.store.get_key(R) is None
    assert R in restarted.router.completed_rounds()


def test_an_ending_round_whose_complete_was_lost_ends_at_its_deadline(nodes: Nodes) -> None:
    node, store = nodes.open()
    node.publish(request())
    node.wait_idle(20.0)
    # The external failure commits; the router's RoundComplete, the next write, does not.
    store.pass_writes, store.fail_writes = 1, 1
    node.publish(
        RoundFailed(round_id=R, failed_at=RoundStage.COMPUTE, reason=FailureReason.COMPUTE_TIMEOUT)
    )
    with pytest.raises(StoreError):
        node.wait_idle(20.0)
    assert payloads(node, RoundComplete) == []
    assert node.router.open_rounds()[R].ending

    nodes.tick(node, 100)  # the reaper fails it past its deadline: completed at last

    assert len(payloads(node, RoundComplete)) == 1
    assert node.store.get_key(R) is None
    assert R not in node.router.open_rounds()


def fail_one_handler_publish(nodes: Nodes, node: Node, store: FaultyStore) -> None:
    """A round purged (its epoch change pending: the node's epoch window is long), then
    a handler publish that fails and is not yet reported."""
    node.publish(request(RoundId("e3:purged"), deadline=T0 + 10_000), request())
    node.wait_idle(20.0)  # keyed
    node.publish(RoundComplete(round_id=RoundId("e3:purged")))
    node.wait_idle(20.0)
    assert node.epochs.pending_since is not None
    store.fail_writes = 1
    nodes.clock.advance(100)
    node.tick()  # the reaper's failure of R is not committed
    runtime = node._runtime
    if isinstance(runtime, PykkaRuntime):  # settled, without taking the report
        assert runtime._in_flight.wait_until(lambda n: n == 0, 20.0)
    assert store.fail_writes == 0


def test_stop_covers_the_purges_when_a_handler_publish_failed(nodes: Nodes) -> None:
    node, store = nodes.open(epoch_window=10_000.0)
    fail_one_handler_publish(nodes, node, store)
    epochs = node.epochs
    changes = epochs.changes

    with capture_logs() as logs:
        node.stop()  # settles, reports nothing: the stop goes on

    assert epochs.changes == changes + 1
    assert epochs.pending_since is None
    [skipped] = [e for e in logs if e["event"] == "node_stopping_without_snapshot"]
    assert skipped["error_type"] == "StoreError"
    assert node.sealed


def test_seal_seals_when_a_handler_publish_failed(nodes: Nodes) -> None:
    node, store = nodes.open(epoch_window=10_000.0)
    fail_one_handler_publish(nodes, node, store)
    epochs = node.epochs
    changes = epochs.changes

    node.seal()

    assert node.sealed
    assert epochs.changes == changes + 1
    with pytest.raises(Sealed):
        node.publish(request(RoundId("e3:after")))


def test_stop_wipes_every_key_even_if_the_actors_do_not_stop(nodes: Nodes) -> None:
    """A runtime whose stop fails (an actor stuck past its timeout): the keys, the epoch
    and the keyring are wiped all the same, the store is closed, then the error is
    raised."""
    node, _ = nodes.open()
    node.publish(request(deadline=T0 + 10_000))
    node.wait_idle(20.0)
    held = node.round_cipher.cipher_of(R)
    assert held is not None
    runtime = node._runtime
    assert runtime is not None
    real_stop = runtime.stop

    def stuck() -> None:
        real_stop()
        raise LifecycleError("1 actor(s) did not stop within 10.0 s")

    runtime.stop = stuck  # type: ignore[method-assign]
    master = node.master
    with pytest.raises(LifecycleError, match="did not stop"):
        node.stop()
    assert held.is_wiped
    assert master.is_sealed
    assert node.sealed


def test_the_completed_horizon_reaches_every_core(nodes: Nodes) -> None:
    """With a horizon of one, a round completed two rounds ago is forgotten by every core
    alike: requested again, it is opened, keyed and reaped like a new one."""
    node, _ = nodes.open(completed_horizon=1)
    for name in ("a", "b"):
        node.publish(request(RoundId(name), deadline=T0 + 10_000))
        node.publish(RoundComplete(round_id=RoundId(name)))
        node.wait_idle(20.0)
    node.publish(request(RoundId("a")))
    node.wait_idle(20.0)
    assert node.round_cipher.cipher_of(RoundId("a")) is not None
    assert RoundId("a") in node.reaper.tracked()
    nodes.tick(node, 100)
    assert node.store.get_key(RoundId("a")) is None


class _NoticingDeletes:
    """A write batch that counts the round-key deletes made through it."""

    def __init__(self, batch: WriteBatch) -> None:
        self._batch = batch
        self.deletes = 0

    def delete_key(self, round_id: RoundId) -> None:
        self.deletes += 1
        self._batch.delete_key(round_id)

    def __getattr__(self, name: str) -> object:
        return getattr(self._batch, name)


class RefusingDeletes(FaultyStore):
    """Refuses every write that deletes a round key while ``refuse`` is set (a disk that
    is full for a while): the batch, or the single delete, fails and nothing is written."""

    refuse = False

    def write(self) -> AbstractContextManager[WriteBatch]:
        return self._refusing_write()

    @contextmanager
    def _refusing_write(self) -> Iterator[WriteBatch]:
        with self.inner.write() as batch:
            noticing = _NoticingDeletes(batch)
            yield cast(WriteBatch, noticing)
            if self.refuse and noticing.deletes:
                raise InjectedFault("no space left on device")

    def delete_key(self, round_id: RoundId) -> None:
        with self.write() as batch:
            batch.delete_key(round_id)


def test_a_key_whose_delete_failed_is_deleted_by_a_later_tick(tmp_path: Path) -> None:
    """The group commit of a purge fails, and so does the delete retried alone: the key
    stays on disk, and every epoch change rewraps it. Once the disk is fine again the
    next tick deletes it and the next ratchet destroys its epoch: it is unrecoverable
    from the files, the master secret at hand."""
    path = tmp_path / "node"
    store = RefusingDeletes(LmdbStore.open(path))
    clock = ManualClock(T0)
    config = NodeConfig(runtime="deterministic", harden=False, epoch_window=1.0)
    with SecretBytes.random(32) as master:
        node = Node(store, KeyUnseal(master), clock=clock, config=config, owns_store=True)
        try:
            node.start()
            node.publish(request(deadline=T0 + 10_000))
            key_id = node.round_cipher.cipher_of(R)
            assert key_id is not None
            key = {key_id.key_id: R}
            store.refuse = True
            with capture_logs() as logs:
                node.publish(RoundComplete(round_id=R))
            assert any(e["event"] == "round_key_delete_failed" for e in logs)
            assert node.epochs.pending_since is None  # no epoch change can help yet
            node.epochs.ratchet()
            assert scan_data_dir(path, master, round_of_key=key).recovered_rounds == {R}

            store.refuse = False
            clock.advance(1.0)
            node.tick()  # deletes the key, reports the purge; the next ratchet covers it
            assert node.epochs.pending_since is not None
            node.epochs.ratchet_pending()

            assert node.store.get_key(R) is None
            assert scan_data_dir(path, master, round_of_key=key).recovered_rounds == set()
        finally:
            node.crash()


def test_a_repeated_round_complete_purges_the_key_once(nodes: Nodes) -> None:
    """An application's timeout failure and the reaper's land together: the router asks
    twice for the completion of the ending round, and the round cipher gets the second
    RoundComplete before the first one's delete is committed. One purge, not two."""
    node, _ = nodes.open()
    node.publish(request())
    node.wait_idle(20.0)
    nodes.clock.advance(100)
    node.publish(
        RoundFailed(round_id=R, failed_at=RoundStage.COMPUTE, reason=FailureReason.COMPUTE_TIMEOUT),
        RoundFailed(
            round_id=R, failed_at=RoundStage.COMPUTE, reason=FailureReason.DEADLINE_EXCEEDED
        ),
    )
    node.wait_idle(20.0)
    assert len(payloads(node, RoundPurged)) == 1
    assert check_log(replay(list(node.store.read_events()))) == []
    assert node.store.get_key(R) is None


def test_seal_wipes_the_keys_when_its_event_cannot_be_written(nodes: Nodes) -> None:
    node, store = nodes.open()
    node.publish(request(deadline=T0 + 10_000))
    node.wait_idle(20.0)
    held = node.round_cipher.cipher_of(R)
    assert held is not None
    store.fail_writes = 1  # NodeSealed is not committed (a full disk)
    with capture_logs() as logs:
        node.seal()
    assert node.sealed
    assert held.is_wiped
    [missed] = [e for e in logs if e["event"] == "audit_event_not_logged"]
    assert missed["tag"] == NodeSealed.TAG


def test_a_round_whose_opening_was_lost_still_ends_at_its_deadline(nodes: Nodes) -> None:
    """The request commits; the router's RoundOpened does not. The router holds the
    round open (and its context) but nothing keys it: the reaper, tracking it from the
    request, fails it past its deadline and the round is torn down."""
    node, store = nodes.open()
    store.pass_writes, store.fail_writes = 1, 1
    node.publish(request())
    with pytest.raises(StoreError):
        node.wait_idle(20.0)
    assert R in node.router.open_rounds()
    assert node.round_cipher.cipher_of(R) is None

    nodes.tick(node, 100)

    assert R not in node.router.open_rounds()
    assert node.registry.get(R) is None
    assert [f.reason for f in payloads(node, RoundFailed)] == [  # type: ignore[attr-defined]
        FailureReason.DEADLINE_EXCEEDED
    ]


def test_a_late_duplicate_completion_keeps_the_cores_horizons_in_step(nodes: Nodes) -> None:
    """A late duplicate RoundComplete for A: the router ignores it. If the reaper and the
    round cipher took it as a new completion, they would forget other rounds than the
    router at the horizon: a late request for B (still completed in the router) would be
    tracked and failed for ever, and A reused would be opened but never keyed nor reaped."""
    node, _ = nodes.open(completed_horizon=2)
    a, b, c = RoundId("e3:a"), RoundId("e3:b"), RoundId("e3:c")
    node.publish(request(a, T0 + 1_000), request(b, T0 + 1_000))
    node.wait_idle(20.0)
    for rid in (a, b, a, c):  # the second `a` is the late duplicate
        if rid == c:
            node.publish(request(c, T0 + 1_000))
            node.wait_idle(20.0)
        node.publish(RoundComplete(round_id=rid))
        node.wait_idle(20.0)
    assert node.router.completed_rounds() == [b, c]

    node.publish(request(b, T0 + 10))  # completed in the router: rejected
    node.publish(request(a, T0 + 10))  # forgotten everywhere: a new round
    node.wait_idle(20.0)
    assert node.round_cipher.cipher_of(a) is not None
    for _ in range(3):
        nodes.tick(node, 60.0)
    assert b not in node.reaper.tracked()
    failed = [f.round_id for f in payloads(node, RoundFailed)]  # type: ignore[attr-defined]
    assert failed == [a]  # reaped once; b never
    assert a not in node.router.open_rounds()
