"""Fixtures and helpers of the node-level (end-to-end) lifecycle tests.

Every test here runs a real :class:`~enclave_keys.node.Node` over a real LMDB directory in
``tmp_path``, on a :class:`~enclave_keys.clock.ManualClock`; most run on both runtimes.
Nodes opened through :class:`NodeFactory` are stopped when the test ends, whatever
happened, so no Pykka actor outlives its test.

The helpers are imported by the test modules (``from tests.node.conftest import ...``):
they read the log, resolve a round's cipher from its context and open ciphertexts.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Literal, TypeVar

import pykka
import pytest
import structlog

from enclave_keys.clock import ManualClock
from enclave_keys.codec import encode_event
from enclave_keys.crypto import SecretBytes
from enclave_keys.errors import EnclaveKeysError
from enclave_keys.events import (
    Event,
    FailureReason,
    HandlerFailed,
    KeyshareCreated,
    RoundFailed,
    RoundKeyReady,
    RoundRequested,
    StoredEvent,
)
from enclave_keys.ids import KeyId, RoundId
from enclave_keys.keyshare import KEYSHARE_PURPOSE
from enclave_keys.node import Node, NodeConfig
from enclave_keys.round_cipher import ROUND_CIPHER, LeasedRoundCipher
from enclave_keys.store import Store
from enclave_keys.unseal import KeyUnseal

RuntimeName = Literal["deterministic", "pykka"]
RUNTIMES: tuple[RuntimeName, ...] = ("deterministic", "pykka")

T0 = 1_700_000_000.0
"""Start of every test's ManualClock (POSIX seconds)."""
FAR = T0 + 1_000_000.0
"""A deadline no test reaches unless it means to."""
WAIT = 20.0
"""Bound of every wait for the runtime to settle (seconds)."""

E = TypeVar("E", bound=Event)


# --- fixtures -------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _quiet_structlog() -> None:
    """Warnings and errors only: thousands of info lines would dominate the runtime.

    ``tests/conftest.py`` resets structlog after every test.
    """
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


@pytest.fixture(autouse=True)
def _no_leaked_actors() -> Iterator[None]:
    """A node test must leave no Pykka actor running (its nodes are stopped at teardown)."""
    before = set(pykka.ActorRegistry.get_all())
    yield
    leaked = [ref for ref in pykka.ActorRegistry.get_all() if ref not in before]
    for ref in leaked:
        ref.stop(block=True, timeout=5.0)
    assert not leaked, f"actors left running: {leaked}"


@pytest.fixture
def master() -> Iterator[SecretBytes]:
    """The node's 32-byte master key (wiped when the test ends)."""
    with SecretBytes.random(32) as key:
        yield key


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "node"


@pytest.fixture(params=RUNTIMES)
def runtime(request: pytest.FixtureRequest) -> RuntimeName:
    name: RuntimeName = request.param
    return name


@pytest.fixture
def nodes(
    data_dir: Path, master: SecretBytes, clock: ManualClock, runtime: RuntimeName
) -> Iterator[NodeFactory]:
    factory = NodeFactory(data_dir, master, clock, runtime)
    yield factory
    factory.close_all()


class NodeFactory:
    """Opens nodes over one data directory and stops every one of them at teardown."""

    def __init__(
        self, data_dir: Path, master: SecretBytes, clock: ManualClock, runtime: RuntimeName
    ) -> None:
        self.data_dir = data_dir
        self.master = master
        self.clock = clock
        self.runtime: RuntimeName = runtime
        self._opened: list[Node] = []

    def config(
        self,
        *,
        snapshot_every: int | None = None,
        reaper_grace: float | None = None,
        idle_timeout: float = WAIT,
    ) -> NodeConfig:
        base = NodeConfig(runtime=self.runtime, idle_timeout=idle_timeout)
        return replace(
            base,
            snapshot_every=base.snapshot_every if snapshot_every is None else snapshot_every,
            reaper_grace=base.reaper_grace if reaper_grace is None else reaper_grace,
        )

    def open(
        self,
        *,
        master: SecretBytes | None = None,
        snapshot_every: int | None = None,
        reaper_grace: float | None = None,
        idle_timeout: float = WAIT,
    ) -> Node:
        """A started node over the data directory (``master`` defaults to the fixture's)."""
        key = self.master if master is None else master
        config = self.config(
            snapshot_every=snapshot_every, reaper_grace=reaper_grace, idle_timeout=idle_timeout
        )
        node = Node.open(self.data_dir, KeyUnseal(key), clock=self.clock, config=config)
        self._opened.append(node)
        return node

    def close_all(self) -> None:
        for node in self._opened:
            try:
                node.stop()
            except EnclaveKeysError:
                node.crash()


# --- building events --------------------------------------------------------------------


def rid(name: str) -> RoundId:
    return RoundId(name)


def request(round_id: RoundId, deadline: float = FAR) -> RoundRequested:
    return RoundRequested(round_id=round_id, deadline=deadline, threshold=2, committee_size=3)


def settle(node: Node) -> None:
    """Wait (bounded) until everything published so far, and all it caused, is handled."""
    node.wait_idle(WAIT)


def publish(node: Node, *events: Event) -> list[StoredEvent]:
    stored = node.publish(*events)
    settle(node)
    return stored


# --- reading the log --------------------------------------------------------------------


def log_of(store: Store) -> list[StoredEvent]:
    """The whole log, decoded (raises if any record does not decode)."""
    return list(store.read_events())


def of_type(events: list[StoredEvent], kind: type[E], round_id: RoundId | None = None) -> list[E]:
    """The payloads of type ``kind`` (of round ``round_id``, if given), in log order."""
    return [
        s.payload
        for s in events
        if isinstance(s.payload, kind) and (round_id is None or s.round_id == round_id)
    ]


def tags_of(store: Store, round_id: RoundId) -> list[str]:
    return [s.tag for s in store.read_events() if s.round_id == round_id]


def failures_of(store: Store, round_id: RoundId) -> list[FailureReason]:
    return [f.reason for f in of_type(log_of(store), RoundFailed, round_id)]


def key_id_of(store: Store, round_id: RoundId) -> KeyId:
    """The key id of the round's (only) ``RoundKeyReady``."""
    ready = of_type(log_of(store), RoundKeyReady, round_id)
    assert len(ready) >= 1, f"round {round_id} was never keyed"
    assert len({r.key_id for r in ready}) == 1, f"round {round_id} was keyed twice"
    return ready[0].key_id


def keyshare_ciphertexts(events: list[StoredEvent]) -> dict[RoundId, bytes]:
    """Each round's keyshare ciphertext, from the ``KeyshareCreated`` events of the log."""
    found: dict[RoundId, bytes] = {}
    for share in of_type(events, KeyshareCreated):
        assert share.round_id not in found, f"round {share.round_id} has two keyshares"
        found[share.round_id] = share.ciphertext
    return found


def assert_no_handler_failures(store: Store) -> None:
    failed = of_type(log_of(store), HandlerFailed)
    assert not failed, f"handlers failed: {failed}"


def encoded_log(store: Store) -> list[bytes]:
    """Every stored event's wire encoding (canonical, so equal to the stored bytes)."""
    return [encode_event(s) for s in store.read_events()]


# --- round ciphers ----------------------------------------------------------------------


def leased_cipher(node: Node, round_id: RoundId) -> LeasedRoundCipher | None:
    """The round's cipher as resolved from its context (``None``: no context or no cipher)."""
    context = node.registry.get(round_id)
    return None if context is None else context.get(ROUND_CIPHER)


def require_cipher(node: Node, round_id: RoundId) -> LeasedRoundCipher:
    leased = leased_cipher(node, round_id)
    assert leased is not None, f"round {round_id} has no round cipher in its context"
    return leased


def open_keyshare(node: Node, round_id: RoundId, ciphertext: bytes) -> bytes:
    """Open a keyshare ciphertext with the round's cipher from its context."""
    with require_cipher(node, round_id).lease() as cipher:
        return cipher.open(KEYSHARE_PURPOSE, ciphertext)


def raw_round_key(leased: LeasedRoundCipher) -> bytes:
    """The round key's bytes (through the cipher's own key borrow): for leak scans only."""
    with leased.lease() as cipher, cipher._borrow_key() as view:
        return bytes(view)


def copy_of(secret: SecretBytes) -> SecretBytes:
    """A copy of ``secret`` in fresh key memory (the original stays untouched)."""
    with secret.borrow() as view:
        return SecretBytes.from_buffer(view, wipe_source=False)
