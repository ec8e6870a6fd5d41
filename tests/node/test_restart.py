"""Restart and recovery (design §3): clean stops, in-process crashes and the states a crash
can leave in the store. Real SIGKILLs: tests/node/test_crash_campaign.py."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import lmdb
import msgpack
import pykka
import pytest
from structlog.testing import capture_logs

from enclave_keys.bus import Outcome, PublishRequest
from enclave_keys.errors import ActorsStopped, StoreError, UnknownEpoch
from enclave_keys.events import (
    DecryptionShareCreated,
    DecryptionShareRequested,
    Event,
    FailureReason,
    KeyshareCreated,
    RoundComplete,
    RoundFailed,
    RoundKeyReady,
    RoundOpened,
    RoundPurged,
    RoundRequested,
    RoundStage,
    RoundStageChanged,
    StoredEvent,
)
from enclave_keys.ids import EventId, RoundId
from enclave_keys.keyshare import DECRYPTION_SHARE_PURPOSE, KeyshareCore, derive_decryption_share
from enclave_keys.node import SNAPSHOT_BYTES_PER_EVENT, Node
from enclave_keys.store import LmdbStore
from enclave_keys.unseal import KeyUnseal
from tests.node.conftest import (
    FAR,
    T0,
    WAIT,
    NodeFactory,
    failures_of,
    keyshare_ciphertexts,
    log_of,
    of_type,
    open_keyshare,
    publish,
    request,
    require_cipher,
    rid,
    settle,
    tags_of,
)

GRACE = 30.0


@dataclass
class Scene:
    """Rounds left in every state a node can be stopped in."""

    live: list[RoundId]
    accused: RoundId
    staged: RoundId
    reapable: RoundId
    ended: list[RoundId]
    shares: dict[RoundId, bytes] = field(default_factory=dict)


def set_scene(node: Node) -> Scene:
    scene = Scene(
        live=[rid(f"e3:live{i}") for i in range(5)],
        accused=rid("e3:accused"),
        staged=rid("e3:staged"),
        reapable=rid("e3:reapable"),
        ended=[rid(f"e3:ended{i}") for i in range(4)],
    )
    scene.live += [scene.accused, scene.staged, scene.reapable]
    publish(
        node,
        *(request(r) for r in scene.live if r != scene.reapable),
        request(scene.reapable, deadline=T0 + 60),
        *(request(r) for r in scene.ended),
    )
    publish(
        node,
        RoundFailed(
            round_id=scene.accused,
            failed_at=RoundStage.KEY_GENERATION,
            reason=FailureReason.INVALID_DKG_SHARES,
        ),
        RoundStageChanged(round_id=scene.staged, stage=RoundStage.DECRYPTION),
        RoundComplete(round_id=scene.ended[0]),
        RoundFailed(
            round_id=scene.ended[1], failed_at=RoundStage.COMPUTE, reason=FailureReason.DKG_TIMEOUT
        ),
        RoundFailed(
            round_id=scene.ended[2],
            failed_at=RoundStage.COMPUTE,
            reason=FailureReason.REQUESTER_CANCELLED,
        ),
        RoundFailed(
            round_id=scene.ended[3],
            failed_at=RoundStage.COMPUTE,
            reason=FailureReason.VERIFICATION_FAILED,
        ),
        RoundComplete(round_id=scene.ended[3]),
    )
    scene.shares = keyshare_ciphertexts(log_of(node.store))
    return scene


def check_scene(node: Node, scene: Scene) -> None:
    """After a restart: every live round is back whole, no ended round's key exists."""
    assert node.recovery.hydrated == tuple(sorted(scene.live))
    assert node.recovery.failed == ()
    assert node.recovery.purged == ()
    assert sorted(node.router.open_rounds()) == sorted(scene.live)
    for r in scene.live:
        assert node.store.get_key(r) is not None
        assert len(open_keyshare(node, r, scene.shares[r])) == 32
        held = node.keyshare.keyshare_of(r)  # rebuilt from the snapshot and the log
        assert held is not None
        assert held[1] == scene.shares[r]
    for r in scene.ended:
        assert node.store.get_key(r) is None
        assert node.registry.get(r) is None
        assert node.router.is_completed(r)
    assert node.store.key_count() == len(scene.live)
    assert node.router.open_rounds()[scene.accused].accusation
    assert node.router.open_rounds()[scene.staged].stage is RoundStage.DECRYPTION


def check_scene_goes_on(node: Node, nodes: NodeFactory, scene: Scene) -> None:
    """The restarted node carries on: shares, the accusation's end, the reaper."""
    r = scene.live[0]
    keyshare = open_keyshare(node, r, scene.shares[r])
    request_id = EventId.random()
    publish(node, DecryptionShareRequested(round_id=r, request_id=request_id))
    created = of_type(log_of(node.store), DecryptionShareCreated, r)
    assert [c.request_id for c in created] == [request_id]
    with require_cipher(node, r).lease() as cipher:
        share = cipher.open(DECRYPTION_SHARE_PURPOSE, created[0].ciphertext)
    assert share == derive_decryption_share(keyshare, r, request_id)

    publish(node, RoundComplete(round_id=scene.accused))
    assert node.store.get_key(scene.accused) is None

    nodes.clock.set(T0 + 60 + GRACE + 1)  # the deadline survived the restart
    node.tick()
    settle(node)
    assert failures_of(node.store, scene.reapable) == [FailureReason.DEADLINE_EXCEEDED]
    assert node.store.get_key(scene.reapable) is None


@pytest.mark.parametrize("snapshot_every", [1, 7, 1000])
def test_a_clean_stop_mid_round_then_reopen(nodes: NodeFactory, snapshot_every: int) -> None:
    node = nodes.open(snapshot_every=snapshot_every, reaper_grace=GRACE)
    scene = set_scene(node)
    node.stop()
    assert node.store.closed

    node = nodes.open(snapshot_every=snapshot_every, reaper_grace=GRACE)
    assert node.recovery.snapshot_sequence is not None  # the one written at stop
    assert node.recovery.replayed == 0  # covers the whole log: nothing to replay
    check_scene(node, scene)
    check_scene_goes_on(node, nodes, scene)


# 20 events: more than the scene's 12 live rounds, which would otherwise set the spacing.
@pytest.mark.parametrize("snapshot_every", [20, 1000])
def test_an_in_process_crash_then_reopen_replays_the_log(
    nodes: NodeFactory, snapshot_every: int
) -> None:
    node = nodes.open(snapshot_every=snapshot_every, reaper_grace=GRACE)
    scene = set_scene(node)
    publish(node, RoundStageChanged(round_id=scene.live[1], stage=RoundStage.COMPUTE))
    length = node.store.last_sequence()
    node.crash()

    node = nodes.open(snapshot_every=snapshot_every, reaper_grace=GRACE)
    replay_from = node.recovery.snapshot_sequence or 0
    assert node.recovery.replayed == length - replay_from > 0
    check_scene(node, scene)
    check_scene_goes_on(node, nodes, scene)


def test_a_key_left_behind_by_a_completed_round_is_purged_at_start(
    nodes: NodeFactory, data_dir: Path
) -> None:
    """A crash after ``RoundComplete`` was logged but before the key's delete committed."""
    node = nodes.open()
    r, live = rid("e3:done"), rid("e3:live")
    publish(node, request(r), request(live))
    blob = node.store.get_key(r)
    assert blob is not None
    publish(node, RoundComplete(round_id=r))
    node.stop()
    with LmdbStore.open(data_dir) as store:
        store.put_key(r, blob)

    node = nodes.open()
    assert node.recovery.purged == (r,)
    assert node.recovery.hydrated == (live,)
    assert node.store.get_key(r) is None
    assert tags_of(node.store, r).count(RoundPurged.TAG) == 2
    assert node.registry.get(r) is None


def append_raw(data_dir: Path, *payloads: RoundRequested | RoundOpened | RoundFailed) -> None:
    """Append events straight to the log, as a node killed mid-flight leaves them."""
    with LmdbStore.open(data_dir) as store:
        first = store.last_sequence() + 1
        store.append_events(
            [
                StoredEvent(
                    sequence=first + i,
                    event_id=EventId.random(),
                    timestamp=T0,
                    source="node" if isinstance(p, RoundRequested | RoundFailed) else "router",
                    payload=p,
                )
                for i, p in enumerate(payloads)
            ]
        )


@pytest.mark.parametrize("opened", [True, False], ids=["opened", "requested-only"])
def test_a_round_not_keyed_at_the_crash_fails_with_key_missing(
    nodes: NodeFactory, data_dir: Path, opened: bool
) -> None:
    node = nodes.open()
    keyed = rid("e3:keyed")
    publish(node, request(keyed))
    node.crash()
    r = rid("e3:unkeyed")
    events: list[RoundRequested | RoundOpened | RoundFailed] = [request(r, deadline=FAR)]
    if opened:
        events.append(RoundOpened(round_id=r, deadline=FAR))
    append_raw(data_dir, *events)

    node = nodes.open()
    assert node.recovery.failed == (r,)
    assert node.recovery.hydrated == (keyed,)
    assert failures_of(node.store, r) == [FailureReason.KEY_MISSING_AFTER_RESTART]
    assert node.router.is_completed(r)
    assert node.registry.get(r) is None
    assert node.store.key_count() == 1


def test_a_hydrated_round_without_a_keyshare_is_announced_again(
    nodes: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node killed after the key was stored (and announced) but before the keyshare."""
    handle = KeyshareCore.handle

    def dies_before_sealing(self: KeyshareCore, stored: StoredEvent) -> Sequence[Event]:
        if isinstance(stored.payload, RoundKeyReady):
            return ()
        return handle(self, stored)

    monkeypatch.setattr(KeyshareCore, "handle", dies_before_sealing)
    node = nodes.open()
    r = rid("e3:no-share")
    publish(node, request(r))
    assert not of_type(log_of(node.store), KeyshareCreated)
    node.crash()
    monkeypatch.undo()

    node = nodes.open()
    assert node.recovery.reannounced == (r,)
    assert node.recovery.hydrated == (r,)
    shares = keyshare_ciphertexts(log_of(node.store))
    assert len(open_keyshare(node, r, shares[r])) == 32
    assert len(of_type(log_of(node.store), RoundKeyReady, r)) == 2


# --- bugs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "keyed"),
    [
        (FailureReason.DKG_TIMEOUT, True),
        (FailureReason.DEADLINE_EXCEEDED, True),
        (FailureReason.DKG_TIMEOUT, False),
    ],
    ids=["timeout-keyed", "reaper-keyed", "timeout-before-keying"],
)
def test_a_timeout_logged_just_before_a_crash_still_ends_the_round(
    nodes: NodeFactory, data_dir: Path, reason: FailureReason, keyed: bool
) -> None:
    """The log ends with the failure: the router's RoundComplete was never committed."""
    node = nodes.open(reaper_grace=GRACE)
    r, other = rid("e3:timed-out"), rid("e3:other")
    publish(node, request(other), *([request(r, deadline=T0 + 60)] if keyed else []))
    node.crash()
    failure = RoundFailed(round_id=r, failed_at=RoundStage.COMPUTE, reason=reason)
    if keyed:
        append_raw(data_dir, failure)
    else:  # killed before the router even opened the round
        append_raw(data_dir, request(r, deadline=T0 + 60), failure)

    node = nodes.open(reaper_grace=GRACE)
    nodes.clock.set(T0 + 1_000)  # well past the deadline: not even the reaper ends it
    node.tick()
    settle(node)
    assert r not in node.router.open_rounds(), "the failed round never ends"
    assert node.router.is_completed(r)
    assert node.store.get_key(r) is None
    assert node.store.get_key(other) is not None


@pytest.mark.parametrize(
    "runtime",
    ["deterministic", "pykka"],
)
def test_event_ids_stay_unique_across_restarts(nodes: NodeFactory) -> None:
    for i in range(3):
        node = nodes.open()
        publish(node, request(rid(f"e3:r{i}")))
        node.stop()
    node = nodes.open()
    ids = [s.event_id for s in log_of(node.store)]
    assert len(ids) == len(set(ids)), "event ids repeat in the log"


# The SIGKILL crash campaign (a node in a child process, killed at random points) is in
# tests/node/test_crash_campaign.py.


def test_snapshots_are_spaced_by_the_live_rounds_once_they_outnumber_snapshot_every(
    nodes: NodeFactory,
) -> None:
    node = nodes.open(snapshot_every=4)
    live = [RoundId(f"e3:spaced{i}") for i in range(10)]
    publish(node, *(request(r) for r in live))  # dozens of events: one snapshot is due
    (first,) = node.store.snapshot_sequences()

    unsnapshotted = 0  # most events seen since the snapshot without a new one
    for _ in range(20):  # each request and its share: events, and no new live round
        publish(node, DecryptionShareRequested(round_id=live[0], request_id=EventId.random()))
        settle(node)
        taken = node.store.snapshot_sequences()
        if len(taken) == 2:
            break
        unsnapshotted = node.store.last_sequence() - first
    assert unsnapshotted >= 4  # snapshot_every alone would have taken one by then
    (_, second) = node.store.snapshot_sequences()
    assert second - first >= len(live)
    node.stop()


def test_snapshots_are_spaced_by_the_size_of_the_last_one(nodes: NodeFactory) -> None:
    """Ended rounds the cores remember make a snapshot big with few rounds live."""
    node = nodes.open(snapshot_every=4)
    for n in range(60):
        ended = RoundId(f"e3:ended{n}")
        publish(node, request(ended))
        settle(node)
        publish(node, RoundComplete(round_id=ended))
        settle(node)
    live = RoundId("e3:still-live")
    publish(node, request(live))
    settle(node)
    first, size = _latest_snapshot(node)
    spacing = size // SNAPSHOT_BYTES_PER_EVENT
    assert spacing > 4  # more than snapshot_every: the size rules
    assert set(node.router.open_rounds()) == {live}  # and not the live rounds

    while node.store.snapshot_sequences()[-1] == first:
        publish(node, DecryptionShareRequested(round_id=live, request_id=EventId.random()))
        settle(node)
        assert node.store.last_sequence() - first <= spacing + 4, "no snapshot came due"
    second, _ = _latest_snapshot(node)
    assert second - first >= spacing
    node.stop()


def _latest_snapshot(node: Node) -> tuple[int, int]:
    latest = node.store.latest_snapshot()
    assert latest is not None
    return latest[0], len(latest[1])


def test_a_start_after_a_clean_stop_needs_no_ratchet_but_one_after_a_crash_does(
    nodes: NodeFactory,
) -> None:
    node = nodes.open()
    ended, live = rid("clean-ended"), rid("clean-live")
    publish(node, request(ended), request(live))
    settle(node)
    purged_epoch = node.epochs.epoch  # the ended round's key is wrapped under it
    publish(node, RoundComplete(round_id=ended))
    settle(node)
    node.stop()  # ratchets the pending purge, then marks the store clean

    node = nodes.open()
    assert node.epochs.changes == 0  # no start ratchet
    assert node.epochs.epoch != purged_epoch  # the purged key's epoch is still gone
    with pytest.raises(UnknownEpoch), node.epochs.epoch_for(purged_epoch):
        pass
    require_cipher(node, live)  # the live round's key opens
    node.crash()

    node = nodes.open()
    assert node.epochs.changes == 1  # after a crash the start ratchets
    node.stop()


def test_a_snapshot_the_store_refuses_does_not_fail_the_publish_before_it(
    nodes: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A publish is durable before its node snapshots: if the snapshot fails, the publish
    still returns (its caller would otherwise publish it again), and the next one that is
    due is written."""
    node = nodes.open(snapshot_every=1)

    def refuse(sequence: int, data: bytes) -> None:
        raise StoreError("injected snapshot failure")

    monkeypatch.setattr(node.store, "put_snapshot", refuse)
    with capture_logs() as logs:
        [stored] = node.publish(request(rid("deferred:1")))
    settle(node)
    assert [entry["error_type"] for entry in logs if entry["event"] == "snapshot_deferred"]
    assert node.store.get_key(rid("deferred:1")) is not None

    monkeypatch.undo()
    node.publish(request(rid("deferred:2")))
    settle(node)
    latest = node.store.latest_snapshot()
    assert latest is not None
    assert latest[0] > stored.sequence


@pytest.mark.parametrize("runtime", ["pykka"])
def test_a_due_snapshot_does_not_swallow_the_report_of_a_failed_handler_publish(
    nodes: NodeFactory,
) -> None:
    """Failed handler publishes are reported once, by the next ``wait_idle``: the one a due
    snapshot runs inside ``publish`` raises the report, as before, instead of deferring."""
    node = nodes.open(snapshot_every=1)
    lost = PublishRequest.of([request(rid("lost:1"))], source="round_cipher")
    node._runtime_or_raise()._failures.record(  # type: ignore[attr-defined]
        Outcome(lost, error=StoreError("injected handler commit failure"))
    )

    with capture_logs() as logs, pytest.raises(StoreError, match="could not be committed"):
        node.publish(request(rid("lost:2")))

    assert not [entry for entry in logs if entry["event"] == "snapshot_deferred"]
    settle(node)  # reported once: nothing left to raise


@pytest.mark.parametrize("runtime", ["pykka"])
def test_a_snapshot_that_waits_in_vain_for_the_runtime_does_not_fail_the_publish(
    nodes: NodeFactory,
) -> None:
    """The runtime is not idle within ``idle_timeout`` (the round cipher waits for the
    storage epoch, held as a ratchet holds it): the snapshot is put off, the publish
    returns, and the round is keyed once the epoch is free."""
    node = nodes.open(snapshot_every=1, idle_timeout=0.3)
    held, release = threading.Event(), threading.Event()

    def hold_the_epoch() -> None:
        with node.epochs._gate.exclusive(WAIT):
            held.set()
            release.wait(WAIT)

    holder = threading.Thread(target=hold_the_epoch)
    holder.start()
    try:
        assert held.wait(WAIT)
        with capture_logs() as logs:
            node.publish(request(rid("busy:1")))
    finally:
        release.set()
        holder.join(WAIT)
    assert [entry["error_type"] for entry in logs if entry["event"] == "snapshot_deferred"] == [
        "LifecycleError"
    ]
    settle(node)
    require_cipher(node, rid("busy:1"))


@pytest.mark.parametrize("runtime", ["pykka"])
def test_a_node_whose_actors_are_stopped_from_outside_stops_then_recovers(
    nodes: NodeFactory,
) -> None:
    """``ActorRegistry.stop_all()`` (a Pykka program's usual shutdown) while purges are
    under way: the node refuses work at once (no wait for a timeout), ``stop`` neither
    waits nor raises, and the next start recovers it as after a crash. (That a write
    queued behind the stop releases its lease is tested on the runtime itself.)"""
    node = nodes.open()
    rounds = [rid(f"outside:{n}") for n in range(300)]
    publish(node, *(request(r) for r in rounds))
    ended, live = rounds[:150], rounds[150:]
    node.publish(*(RoundComplete(round_id=r) for r in ended))  # durable; purges under way

    pykka.ActorRegistry.stop_all()

    with pytest.raises(ActorsStopped):
        node.wait_idle()
    with pytest.raises(ActorsStopped):
        node.publish(request(rid("outside:late")))
    node.stop()

    node = nodes.open()
    assert node.epochs.changes == 1  # no clean record: the start ratchets
    assert sorted(node.router.open_rounds()) == sorted(live)
    assert node.store.key_count() == len(live)
    for r in live:
        require_cipher(node, r)
    assert all(node.store.get_key(r) is None for r in ended)


def test_a_version_1_snapshot_with_its_contexts_map_still_restores(
    nodes: NodeFactory, data_dir: Path
) -> None:
    node = nodes.open()
    live = rid("e3:v1-live")
    publish(node, request(live))
    settle(node)
    node.stop()
    with LmdbStore.open(data_dir) as store:
        latest = store.latest_snapshot()
        assert latest is not None
        record = msgpack.unpackb(latest[1])
        assert record["version"] == 2
        assert "contexts" not in record  # no longer written
        record.update(version=1, contexts={live.value: ["round_cipher"]})
        store.put_snapshot(latest[0], msgpack.packb(record, use_bin_type=True))

    node = nodes.open()
    assert node.recovery.snapshot_sequence == latest[0]  # read, not replayed from scratch
    assert node.recovery.hydrated == (live,)
    require_cipher(node, live)
    node.stop()


def test_a_snapshot_record_the_store_cannot_read_falls_back_to_the_log(
    nodes: NodeFactory,
) -> None:
    """The store reads the newest snapshot record as CorruptRecord (an empty value): the
    node starts from the whole log, as for a snapshot it cannot decode."""
    live = rid("e3:live")
    node = nodes.open()
    publish(node, request(live))
    node.stop()
    with LmdbStore.open(nodes.data_dir) as store:
        latest = store.latest_snapshot()
        assert latest is not None
    env = lmdb.open(str(nodes.data_dir), max_dbs=8, subdir=True)
    try:
        with env.begin(write=True, db=env.open_db(b"snapshots", create=False)) as txn:
            txn.put(latest[0].to_bytes(8, "big"), b"")
    finally:
        env.close()

    with capture_logs() as logs:
        node = nodes.open()
    assert node.recovery.snapshot_sequence is None
    assert node.recovery.hydrated == (live,)
    assert any(e["event"] == "snapshot_unreadable" for e in logs)


def test_a_round_id_opened_again_keeps_its_new_keyshare_across_restarts(
    nodes: NodeFactory,
) -> None:
    """An id the router forgot (past its horizon) is opened, keyed and shared afresh: the
    keyshare core keeps the new share (it had the id among its ended rounds), so no
    restart finds the live round without one and announces it again."""

    def opened() -> Node:
        config = replace(nodes.config(), completed_horizon=1)
        node = Node.open(nodes.data_dir, KeyUnseal(nodes.master), clock=nodes.clock, config=config)
        nodes._opened.append(node)
        return node

    a, x = rid("e3:a"), rid("e3:x")
    node = opened()
    publish(node, request(a))
    publish(node, RoundComplete(round_id=a))
    publish(node, request(x), RoundComplete(round_id=x))  # ends unkeyed: a is forgotten
    publish(node, request(a))  # opened afresh
    assert a in node.router.open_rounds()
    assert node.keyshare.keyshare_of(a) is not None
    node.stop()
    for _ in range(2):
        node = opened()
        assert node.recovery.reannounced == ()
        assert node.keyshare.keyshare_of(a) is not None
        node.stop()
