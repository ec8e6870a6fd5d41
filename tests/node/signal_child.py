"""The child process of the signal tests: a node with signal handlers, waiting for SIGTERM.

Usage::

    python -m tests.node.signal_child DATA_DIR KEY_FD LIVE ENDED MODE

The 32-byte master key is read from the inherited file descriptor ``KEY_FD`` (a pipe the
parent wrote the key into and closed): it is never in argv, the environment or a file.
The node runs on Pykka actors over ``DATA_DIR`` on a ManualClock that never moves, with
``snapshot_every`` far above what the child publishes: any snapshot in the directory
afterwards was written by the stop that the signal handler ran.

The child calls :meth:`Node.install_signal_handlers`, requests ``LIVE`` rounds
(``sig:live0`` ...) and ``ENDED`` rounds (``sig:ended0`` ...), completes the ended ones,
waits until the runtime is idle and prints ``ready SNAPSHOTS`` (the number of snapshots
in the store at that point). Then, by ``MODE``:

* ``idle`` — it waits in ``signal.pause()`` for the parent's signal;
* ``tell`` — it publishes one more ``RoundRequested`` with the signal raised *inside* the
  runtime's hand-over of that publish to the bus actor (``pykka.ActorRef.tell``, reached
  while the runtime holds its gate lock): a signal that arrives at that instant of a
  publish, made deterministic.

When the handler's ``SystemExit`` comes through, the child prints ``wiped W TOTAL`` (how
many of the round ciphers it held references to are wiped) and exits with the handler's
code. Logs go to stderr (warnings and errors only); SIGUSR1 dumps every thread's stack
to stderr (``faulthandler``), so a parent can show where a child that does not exit hangs.
"""

from __future__ import annotations

import faulthandler
import logging
import signal
import sys
from typing import Any

import pykka
import structlog

from enclave_keys.clock import ManualClock
from enclave_keys.events import RoundComplete, RoundRequested
from enclave_keys.ids import RoundId
from enclave_keys.node import Node, NodeConfig
from enclave_keys.round_cipher import ROUND_CIPHER, LeasedRoundCipher
from enclave_keys.unseal import KeyUnseal
from tests.node.crash_child import emit, read_key

T0 = 1_700_000_000.0
DEADLINE = T0 + 3_600.0
IDLE_TIMEOUT = 10.0
MODES = ("idle", "tell")


def request(round_id: RoundId) -> RoundRequested:
    return RoundRequested(round_id=round_id, deadline=DEADLINE, threshold=2, committee_size=3)


def signal_inside_the_next_tell() -> None:
    """Raise SIGTERM from inside the next ``ActorRef.tell`` (the handler runs right there)."""
    original = pykka.ActorRef.tell
    armed = [True]

    def tell(self: pykka.ActorRef[Any], message: Any) -> None:
        if armed[0]:
            armed[0] = False
            signal.raise_signal(signal.SIGTERM)  # runs the Python handler before returning
        original(self, message)

    pykka.ActorRef.tell = tell  # type: ignore[method-assign]


def run(node: Node, live: int, ended: int, mode: str) -> None:
    node.install_signal_handlers()
    live_ids = [RoundId(f"sig:live{i}") for i in range(live)]
    ended_ids = [RoundId(f"sig:ended{i}") for i in range(ended)]
    node.publish(*(request(r) for r in live_ids + ended_ids))
    node.wait_idle()
    node.publish(*(RoundComplete(round_id=r) for r in ended_ids))
    node.wait_idle()
    held: list[LeasedRoundCipher] = []
    for r in live_ids:
        context = node.registry.get(r)
        leased = None if context is None else context.get(ROUND_CIPHER)
        if leased is None:
            raise SystemExit(f"signal_child: live round {r} has no round cipher")
        held.append(leased)
    emit("ready", len(node.store.snapshot_sequences()))
    try:
        if mode == "tell":
            signal_inside_the_next_tell()
            node.publish(request(RoundId("sig:extra")))
        while True:
            signal.pause()
    except SystemExit:
        emit("wiped", sum(1 for leased in held if leased.is_wiped), len(held))
        raise


def main(argv: list[str]) -> int:
    if len(argv) != 5 or argv[4] not in MODES:
        raise SystemExit(__doc__)
    data_dir, key_fd, live, ended, mode = argv
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    )
    config = NodeConfig(runtime="pykka", snapshot_every=100_000, idle_timeout=IDLE_TIMEOUT)
    with read_key(int(key_fd)) as master:
        node = Node.open(data_dir, KeyUnseal(master), clock=ManualClock(T0), config=config)
        run(node, int(live), int(ended), mode)
    return 0  # not reached: the signal handler ends the process


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
