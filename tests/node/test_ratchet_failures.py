"""A node whose epoch ratchet fails (a full disk under the slot file, say) keeps its word:
a tick logs the failure and the node keeps running, the next tick ratchets; a seal
still seals (as the ``NodeSealed`` in the log says) and leaves no clean mark, so the
next start ratchets. On the deterministic runtime: the Pykka node's real-time timer
would race the ticks."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from enclave_keys.clock import ManualClock
from enclave_keys.epochs import CLEAN_RECORD, DEFAULT_EPOCH_WINDOW
from enclave_keys.errors import StoreError
from enclave_keys.events import NodeSealed, RoundComplete
from enclave_keys.node import Node
from enclave_keys.store.slots import SlotDevice
from tests.node.conftest import NodeFactory, log_of, publish, request, rid


class RefusingSlots:
    """The node's slot device, refusing writes while ``refuse`` is set."""

    def __init__(self, device: SlotDevice) -> None:
        self.device = device
        self.refuse = False

    def read(self, index: int) -> bytes:
        return self.device.read(index)

    def write(self, index: int, raw: bytes) -> None:
        if self.refuse:
            raise StoreError("no space left for the slot file")
        self.device.write(index, raw)

    def close(self) -> None:
        self.device.close()


@pytest.fixture
def runtime() -> str:
    return "deterministic"


@pytest.fixture
def node(nodes: NodeFactory) -> Node:
    return nodes.open()


def refusing(node: Node) -> RefusingSlots:
    slots = RefusingSlots(node.epochs._slots)
    node.epochs._slots = slots
    return slots


def purge_one(node: Node, name: str) -> None:
    publish(node, request(rid(name)))
    publish(node, RoundComplete(round_id=rid(name)))
    assert node.epochs.pending_since is not None


def test_a_tick_whose_ratchet_fails_is_logged_and_the_node_goes_on(
    node: Node, clock: ManualClock
) -> None:
    purge_one(node, "a")
    slots = refusing(node)
    slots.refuse = True
    clock.advance(DEFAULT_EPOCH_WINDOW)
    epoch = node.epochs.epoch
    with capture_logs() as logs:
        node.tick()  # does not raise
    assert [e["error_type"] for e in logs if e["event"] == "epoch_ratchet_failed"] == ["StoreError"]
    assert node.epochs.epoch == epoch
    purge_one(node, "b")  # the node goes on

    slots.refuse = False
    node.tick()
    assert node.epochs.pending_since is None
    assert node.epochs.epoch.number == epoch.number + 2, "epoch numbers are never reused"


def test_a_seal_whose_ratchet_fails_still_seals(node: Node) -> None:
    purge_one(node, "a")
    slots = refusing(node)
    slots.refuse = True
    with pytest.raises(StoreError):
        node.seal()
    assert node.sealed, "the keys left memory"
    assert isinstance(log_of(node.store)[-1].payload, NodeSealed)
    assert node.store.get_meta(CLEAN_RECORD) is None, "the next start ratchets"
