"""Node.rekey_root and Node.rotate_kek at their edges: the new root is the node's from the
call on (wiped whatever fails), and a change that committed stands even if its audit
event cannot be logged."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

import pytest
from structlog.testing import capture_logs

from enclave_keys.clock import ManualClock
from enclave_keys.crypto import SecretBytes
from enclave_keys.errors import Sealed
from enclave_keys.events import KekRotated, RootRekeyed
from enclave_keys.ids import KekVersion
from enclave_keys.node import Node, NodeConfig
from enclave_keys.store import MemoryBacking, MemoryStore
from enclave_keys.testing.fakes import FaultyStore
from enclave_keys.unseal import Enrolment, KeyUnseal
from tests.node.conftest import T0

CONFIG: Final = NodeConfig(runtime="deterministic", harden=False)


class AppUnseal(KeyUnseal):
    """An application's own unseal source: a method name this library does not know."""

    method: Final = "vault"  # type: ignore[misc]


@pytest.fixture
def key() -> Iterator[SecretBytes]:
    with SecretBytes.random(32) as secret:
        yield secret


def open_node(store: FaultyStore, source: KeyUnseal) -> Node:
    node = Node(store, source, clock=ManualClock(T0), config=CONFIG)
    node.start()
    return node


def test_a_rekey_of_a_sealed_node_wipes_the_new_root(key: SecretBytes) -> None:
    node = open_node(FaultyStore(MemoryStore()), KeyUnseal(key))
    node.seal()
    new_root = SecretBytes.random(32)
    try:
        with pytest.raises(Sealed):
            node.rekey_root(Enrolment(new_root, {}), "raw")
        assert new_root.is_wiped
    finally:
        node.stop()


def test_a_rekey_from_an_applications_own_method_drops_none_of_its_records(
    key: SecretBytes,
) -> None:
    store = FaultyStore(MemoryStore())
    node = open_node(store, AppUnseal(key))
    with store.write() as batch:
        batch.put_meta("unseal.vault", b"the application's own record")
    try:
        with SecretBytes.random(32) as new:
            node.rekey_root(KeyUnseal(new).enrol(), "raw")
            assert node.master.method == "raw"
    finally:
        node.stop()
    assert store.get_meta("unseal.vault") == b"the application's own record"


def test_a_rekey_stands_when_its_audit_event_cannot_be_logged(key: SecretBytes) -> None:
    backing = MemoryBacking()
    store = FaultyStore(MemoryStore(backing))
    node = open_node(store, KeyUnseal(key))
    with SecretBytes.random(32) as new:
        try:
            store.pass_writes, store.fail_writes = 1, 1  # the rekey commits; its event not
            with capture_logs() as logs:
                node.rekey_root(KeyUnseal(new).enrol(), "raw")
            [missed] = [e for e in logs if e["event"] == "audit_event_not_logged"]
            assert missed["tag"] == RootRekeyed.TAG
            rotation = node.rotate_kek()  # the node goes on under the new root
            assert rotation.new_version == KekVersion(2)
        finally:
            node.stop()
        events = [s.payload for s in MemoryStore(backing).read_events()]
        assert not any(isinstance(e, RootRekeyed) for e in events)
        assert any(isinstance(e, KekRotated) for e in events)
        reopened = open_node(FaultyStore(MemoryStore(backing)), KeyUnseal(new))
        reopened.stop()


def test_a_kek_rotation_stands_when_its_audit_event_cannot_be_logged(key: SecretBytes) -> None:
    store = FaultyStore(MemoryStore())
    node = open_node(store, KeyUnseal(key))
    try:
        store.pass_writes, store.fail_writes = 1, 1  # the rotation commits; its event not
        with capture_logs() as logs:
            rotation = node.rotate_kek()
        assert rotation.new_version == KekVersion(2)
        assert node.master.active_version == KekVersion(2)
        assert [e["tag"] for e in logs if e["event"] == "audit_event_not_logged"] == [
            KekRotated.TAG
        ]
    finally:
        node.stop()
