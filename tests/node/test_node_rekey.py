"""The node's master keys at their edges: a rekey's new root is the node's from the call
on (wiped whatever fails); a rekey or KEK rotation that committed stands even if its
audit event cannot be logged; a store that lost its keyring is never initialised again."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

import pytest
from structlog.testing import capture_logs

from enclave_keys.clock import ManualClock
from enclave_keys.crypto import SecretBytes
from enclave_keys.errors import CorruptRecord, Sealed, StoreError
from enclave_keys.events import KekRotated, RootRekeyed, RoundRequested
from enclave_keys.ids import KekVersion, RoundId
from enclave_keys.master import KEYRING_RECORD
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


class CountingUnseal(KeyUnseal):
    """A KeyUnseal that counts its enrolments (an HSM's enrol makes a key in the token)."""

    enrolled = 0

    def enrol(self) -> Enrolment:
        self.enrolled += 1
        return super().enrol()


def test_a_store_that_lost_its_keyring_is_never_initialised_again(key: SecretBytes) -> None:
    """Its round keys are wrapped under the lost keyring's KEKs: a fresh keyring over
    them, with whatever root the operator gives, would orphan every one of them."""
    backing = MemoryBacking()
    node = open_node(FaultyStore(MemoryStore(backing)), KeyUnseal(key))
    node.stop()
    store = MemoryStore(backing)
    with store.write() as batch:
        batch.delete_meta(KEYRING_RECORD)
    source = CountingUnseal(key)
    node = Node(store, source, clock=ManualClock(T0), config=CONFIG)
    with pytest.raises(CorruptRecord, match="keyring is lost"):
        node.start()
    assert source.enrolled == 0  # refused before a new root was made
    assert store.get_meta(KEYRING_RECORD) is None
    node.stop()


def test_an_audit_event_leaves_other_failures_to_be_reported(key: SecretBytes) -> None:
    """A handler's publish fails (the reaper's, on a tick); then a rotation commits, and
    its event. The failure is still reported by the next wait_idle, not taken for the
    audit event's (a snapshot due at the event would have raised it there)."""
    store = FaultyStore(MemoryStore())
    clock = ManualClock(T0)
    config = NodeConfig(runtime="deterministic", harden=False, snapshot_every=1, reaper_grace=0.0)
    node = Node(store, KeyUnseal(key), clock=clock, config=config)
    node.start()
    try:
        rid = RoundId("e3:a")
        node.publish(RoundRequested(round_id=rid, deadline=T0 + 10, threshold=2, committee_size=3))
        store.fail_writes = 1
        clock.advance(100)
        node.tick()  # the reaper's failure of the round is not committed
        with capture_logs() as logs:
            node.rotate_kek()
        assert not [e for e in logs if e["event"] == "audit_event_not_logged"]
        assert any(isinstance(s.payload, KekRotated) for s in store.read_events())
        with pytest.raises(StoreError, match="handler publish"):
            node.wait_idle(5.0)
    finally:
        node.stop()
