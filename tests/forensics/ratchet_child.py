"""The child process of the SIGKILL-mid-epoch-change test.

Usage::

    python -m tests.forensics.ratchet_child DATA_DIR KEY_FD MODE PHASE

Opens (or recovers) a node over ``DATA_DIR`` with the 32-byte master key read from the
inherited descriptor ``KEY_FD`` (see :mod:`tests.node.child`), requests rounds
``live-*`` and ``ended-*`` and completes the ``ended-*`` ones (their keys are purged),
prints ``ready``, then starts an epoch change — ``MODE`` is ``ratchet`` (a purge-driven
ratchet) or ``rotate`` (a KEK rotation) — and, on reaching step ``PHASE`` of it
(``slot_written``, ``keys_rewrapped`` or ``old_slot_wiped``), prints ``phase PHASE`` and
waits to be killed.
"""

from __future__ import annotations

import logging
import sys
import threading

import structlog

from enclave_keys.clock import ManualClock
from enclave_keys.events import RoundComplete, RoundRequested
from enclave_keys.ids import RoundId
from enclave_keys.node import Node, NodeConfig
from enclave_keys.unseal import KeyUnseal
from tests.node.crash_child import emit, read_key

T0 = 1_700_000_000.0
LIVE = [RoundId(f"live-{i:02d}") for i in range(8)]
ENDED = [RoundId(f"ended-{i:02d}") for i in range(8)]


def run(data_dir: str, key_fd: int, mode: str, phase: str) -> None:
    config = NodeConfig(runtime="deterministic", epoch_window=3600.0)
    with read_key(key_fd) as master:
        node = Node.open(data_dir, KeyUnseal(master), clock=ManualClock(T0), config=config)
    for rid in [*LIVE, *ENDED]:
        node.publish(
            RoundRequested(round_id=rid, deadline=T0 + 3600, threshold=2, committee_size=3)
        )
    for rid in ENDED:
        node.publish(RoundComplete(round_id=rid))
    emit("ready")

    def hook(name: str) -> None:
        if name == phase:
            emit("phase", name)
            threading.Event().wait()  # until SIGKILL

    node.epochs._phase_hook = hook
    if mode == "rotate":
        node.rotate_kek()
    else:
        node.epochs.ratchet("test")
    emit("finished")


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        raise SystemExit(__doc__)
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    )
    data_dir, key_fd, mode, phase = argv
    run(data_dir, int(key_fd), mode, phase)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
