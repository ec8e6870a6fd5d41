"""Opening real nodes for the benchmarks: a raw-key unseal, a manual clock, no hardening.

Hardening (``RLIMIT_CORE=0``, ``PR_SET_DUMPABLE=0``) is process-wide and irrelevant to
speed, so benchmark nodes leave it off; everything else is the default configuration.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Final, Literal

from enclave_keys.clock import ManualClock
from enclave_keys.crypto import SecretBytes
from enclave_keys.events import Event, RoundComplete, RoundRequested
from enclave_keys.ids import RoundId
from enclave_keys.log import configure_logging
from enclave_keys.node import Node, NodeConfig
from enclave_keys.unseal import KeyUnseal

__all__ = ["FAR", "NodeOpener", "complete_all", "quiet_logs", "request_all", "round_ids"]

T0: Final = 1_700_000_000.0
FAR: Final = T0 + 10_000_000.0  # a deadline no benchmark reaches
PUBLISH_BATCH: Final = 256  # rounds requested or completed per publish
IDLE: Final = 900.0


def quiet_logs() -> None:
    """Errors only (a node logs several info lines per round), as a node process sets it up."""
    configure_logging(level=logging.ERROR)


class NodeOpener:
    """Opens nodes over data directories with one master key (wiped by :meth:`close`)."""

    def __init__(self, master: SecretBytes | None = None) -> None:
        self.master = SecretBytes.random(32) if master is None else master
        self.clock = ManualClock(T0)

    def open(
        self,
        path: Path,
        runtime: Literal["pykka", "deterministic"] = "pykka",
        *,
        snapshot_every: int | None = None,
    ) -> Node:
        config = NodeConfig(runtime=runtime, harden=False, idle_timeout=IDLE)
        if snapshot_every is not None:
            config = replace(config, snapshot_every=snapshot_every)
        return Node.open(path, KeyUnseal(self.master), clock=self.clock, config=config)

    def close(self) -> None:
        self.master.wipe()


def round_ids(start: int, stop: int, prefix: str = "bench") -> list[RoundId]:
    return [RoundId(f"{prefix}:{n}") for n in range(start, stop)]


def _publish_all(node: Node, events: Sequence[Event]) -> None:
    for i in range(0, len(events), PUBLISH_BATCH):
        node.publish(*events[i : i + PUBLISH_BATCH])
    node.wait_idle()


def request_all(node: Node, rids: Iterable[RoundId]) -> None:
    """Request every round (in publishes of 256) and wait until all are keyed."""
    _publish_all(
        node,
        [RoundRequested(round_id=r, deadline=FAR, threshold=2, committee_size=3) for r in rids],
    )


def complete_all(node: Node, rids: Iterable[RoundId]) -> None:
    """Complete every round and wait until all are purged."""
    _publish_all(node, [RoundComplete(round_id=r) for r in rids])
