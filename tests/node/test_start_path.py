"""The start path's shortcuts: one round-id table for the whole snapshot restore, and the
cyclic collector paused while the live state is built. Neither may change what a start
accepts or what it leaves behind."""

from __future__ import annotations

import gc
import os
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import pytest
from structlog.testing import capture_logs

from enclave_keys.collector import _CollectorPause
from enclave_keys.errors import DirectoryInUse
from enclave_keys.store import LmdbStore
from tests.node.conftest import NodeFactory, publish, request, rid

LIVE = [rid(f"e3:live{i}") for i in range(4)]


def _stopped_with_live_rounds(nodes: NodeFactory) -> None:
    node = nodes.open()
    publish(node, *(request(r) for r in LIVE))
    node.stop()  # a clean stop: the newest snapshot holds every core's state


def _rewrite_snapshot(nodes: NodeFactory, change: Callable[[dict[str, Any]], None]) -> None:
    """Decode the newest snapshot, let ``change`` edit its cores, store it back."""
    with LmdbStore.open(nodes.data_dir) as store:
        latest = store.latest_snapshot()
        assert latest is not None
        record = msgpack.unpackb(latest[1], raw=False)
        change(record["cores"])
        store.put_snapshot(latest[0], msgpack.packb(record, use_bin_type=True))


def _first_round_id(cores: dict[str, Any], core: str) -> None:
    """Spoil the id of the first live round in ``core`` (the others still name it well)."""
    if core == "router":
        cores["router"]["open"][0]["round_id"] = "not a round id!"
    elif core == "reaper":
        cores["reaper"]["rounds"][0]["round_id"] = "not a round id!"
    else:
        cores["keyshare"]["shares"][0]["round_id"] = "not a round id!"


@pytest.mark.parametrize("core", ["router", "reaper", "keyshare"])
def test_a_malformed_round_id_in_any_core_makes_the_snapshot_unreadable(
    nodes: NodeFactory, core: str
) -> None:
    # The router is restored first: the ids it read are in the shared table by the time
    # the reaper and the keyshare core read theirs. A bad one is refused all the same.
    _stopped_with_live_rounds(nodes)
    _rewrite_snapshot(nodes, lambda cores: _first_round_id(cores, core))
    with capture_logs() as logs:
        node = nodes.open()
    assert "snapshot_unreadable" in [entry["event"] for entry in logs]
    assert node.recovery.snapshot_sequence is None  # the whole log was replayed instead
    assert node.recovery.hydrated == tuple(sorted(LIVE))
    assert set(node.router.open_rounds()) == set(LIVE)


def test_a_round_id_that_is_not_text_in_a_later_core_is_refused(nodes: NodeFactory) -> None:
    _stopped_with_live_rounds(nodes)

    def spoil(cores: dict[str, Any]) -> None:
        cores["reaper"]["requested"][0] = 7

    _rewrite_snapshot(nodes, spoil)
    node = nodes.open()
    assert node.recovery.snapshot_sequence is None
    assert set(node.router.open_rounds()) == set(LIVE)


def test_restored_cores_share_one_round_id_object_per_round(nodes: NodeFactory) -> None:
    _stopped_with_live_rounds(nodes)
    node = nodes.open()
    assert node.recovery.snapshot_sequence is not None
    by_router = {r.value: r for r in node.router.open_rounds()}
    by_reaper = {r.value: r for r in node._started().reaper.tracked()}
    by_keyshare = {r.value: r for r in node.keyshare.rounds_with_keyshare()}
    assert set(by_router) == set(by_reaper) == set(by_keyshare) == {r.value for r in LIVE}
    for text, round_id in by_router.items():
        assert by_reaper[text] is round_id
        assert by_keyshare[text] is round_id


# --- the collector pause ------------------------------------------------------------------


@pytest.fixture
def collector_on() -> Iterator[None]:
    was = gc.isenabled()
    gc.enable()
    yield
    if not was:
        gc.disable()


@pytest.mark.usefixtures("collector_on")
def test_the_collector_is_off_inside_and_on_again_after() -> None:
    pause = _CollectorPause()
    with pause.paused():
        assert not gc.isenabled()
        with pause.paused():  # a start overlapping another
            assert not gc.isenabled()
        assert not gc.isenabled()  # still paused for the outer one
    assert gc.isenabled()


@pytest.mark.usefixtures("collector_on")
def test_the_collector_comes_back_after_a_failed_start() -> None:
    pause = _CollectorPause()
    with pytest.raises(RuntimeError), pause.paused():
        raise RuntimeError("start failed")
    assert gc.isenabled()


def test_a_collector_the_application_turned_off_stays_off() -> None:
    was = gc.isenabled()
    gc.disable()
    try:
        with _CollectorPause().paused():
            pass
        assert not gc.isenabled()
    finally:
        if was:
            gc.enable()


@pytest.mark.usefixtures("collector_on")
def test_objects_the_application_froze_stay_frozen() -> None:
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        with _CollectorPause().paused():
            kept = [[n] for n in range(100)]
        assert gc.get_freeze_count() == frozen
        assert gc.isenabled()
        del kept
    finally:
        gc.unfreeze()


class _Cyclic:
    """An object in a reference cycle: only the cyclic collector frees it."""

    def __init__(self) -> None:
        self.me = self


@pytest.mark.usefixtures("collector_on")
def test_a_cycle_made_during_the_pause_is_still_collected() -> None:
    with _CollectorPause().paused():
        made = _Cyclic()
        gone = weakref.ref(made)
        del made
    assert gone() is not None  # nothing collected it during the pause
    gc.collect()
    assert gone() is None


@pytest.mark.usefixtures("collector_on")
def test_a_node_start_leaves_the_collector_on_and_nothing_frozen(nodes: NodeFactory) -> None:
    _stopped_with_live_rounds(nodes)
    node = nodes.open()
    assert gc.isenabled()
    assert gc.get_freeze_count() == 0
    assert node.recovery.hydrated == tuple(sorted(LIVE))


def test_a_second_node_on_the_same_directory_is_refused(nodes: NodeFactory) -> None:
    """Two nodes on one directory would each ratchet the storage epoch under the other's
    keys: the second is refused, and leaves the first (and the store) as they were."""
    first = nodes.open()
    publish(first, request(rid("claimed:1")))

    with pytest.raises(DirectoryInUse, match=f"pid {os.getpid()}"):
        nodes.open()

    publish(first, request(rid("claimed:2")))  # the first node is undisturbed
    assert first.store.key_count() == 2
    first.stop()
    second = nodes.open()  # free again once the first has stopped
    assert second.store.key_count() == 2
