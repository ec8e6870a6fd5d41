"""Fixtures of the bad-input tests: a running node with live rounds, quiet logs."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from enclave_keys.clock import ManualClock
from enclave_keys.events import RoundRequested
from enclave_keys.ids import RoundId
from enclave_keys.node import Node, NodeConfig
from enclave_keys.testing.fakes import FixedKeyUnseal

T0 = 1_700_000_000.0
LIVE = tuple(RoundId(f"live-{i}") for i in range(3))
CONFIG = NodeConfig(runtime="deterministic", harden=False, idle_timeout=10.0)


@pytest.fixture(autouse=True)
def _quiet_structlog() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))


@pytest.fixture
def unseal() -> Iterator[FixedKeyUnseal]:
    with FixedKeyUnseal("fuzz") as source:
        yield source


@pytest.fixture
def node_dir(tmp_path: Path) -> Path:
    return tmp_path / "node"


@pytest.fixture
def node(node_dir: Path, unseal: FixedKeyUnseal) -> Iterator[Node]:
    """A running node over LMDB with three live rounds."""
    running = Node.open(node_dir, unseal, clock=ManualClock(T0), config=CONFIG)
    for rid in LIVE:
        running.publish(
            RoundRequested(round_id=rid, deadline=T0 + 3600, threshold=2, committee_size=3)
        )
    yield running
    running.stop()
