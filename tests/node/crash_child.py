"""The child process of the SIGKILL test: runs rounds on a real node until it is killed.

Usage::

    python -m tests.node.crash_child DATA_DIR KEY_FD SEED PREFIX
    python -m tests.node.crash_child --serve DATA_DIR KEY_FD

The second form is a fork server for long crash campaigns: it imports everything and
reads the key once, prints ``ready``, then for every ``run SEED PREFIX`` line on stdin
forks a worker that runs the load below (its first line is ``worker PID``, so the parent
knows what to SIGKILL), waits for it and prints ``reaped PID STATUS`` (STATUS: the exit
code, or minus the signal number). ``quit`` (or the end of stdin) ends it. A fork costs
milliseconds where a new interpreter costs a second, which is what makes hundreds of
crash points affordable in CI.

The 32-byte master key is read from the inherited file descriptor ``KEY_FD`` (a pipe the
parent wrote the key into and closed): it is never in argv, the environment or a file.
The node runs on Pykka actors over the LMDB directory ``DATA_DIR`` (recovering whatever
an earlier kill left there) on a ManualClock that never moves.

Progress goes to stdout, one flushed line per step, each written only after the publish
it reports has returned — that is, once its events are durable in the log:

* ``opened HYDRATED FAILED PURGED REANNOUNCED`` — the node started (recovery counts);
* ``requested ROUND`` — a ``RoundRequested`` was published;
* ``completed ROUND`` — a ``RoundComplete`` was published;
* ``failed ROUND REASON`` — a ``RoundFailed`` was published;
* ``idle N`` — the runtime settled after N rounds;
* ``done`` — the round budget ran out (the parent should have killed us before).

Logs go to stderr (warnings and errors only).
"""

from __future__ import annotations

import logging
import os
import random
import sys
import traceback

import structlog

from enclave_keys.clock import ManualClock
from enclave_keys.crypto import SecretBytes
from enclave_keys.events import (
    FailureReason,
    RoundComplete,
    RoundFailed,
    RoundRequested,
    RoundStage,
)
from enclave_keys.ids import RoundId
from enclave_keys.node import Node, NodeConfig
from enclave_keys.unseal import KeyUnseal

T0 = 1_700_000_000.0
DEADLINE = T0 + 3_600.0
MAX_ROUNDS = 5_000
KEY_SIZE = 32
TIMEOUTS = [reason for reason in FailureReason if reason.is_timeout]
MISBEHAVIOUR = [reason for reason in FailureReason if reason.is_misbehaviour]


def emit(*parts: object) -> None:
    sys.stdout.write(" ".join(str(p) for p in parts) + "\n")
    sys.stdout.flush()


def read_key(fd: int) -> SecretBytes:
    """Exactly 32 bytes from ``fd`` (then closed) into key memory; the buffer is wiped."""
    return SecretBytes.from_buffer(read_key_bytes(fd))


def read_key_bytes(fd: int) -> bytearray:
    """Exactly 32 bytes from ``fd`` (then closed)."""
    buffer = bytearray(KEY_SIZE)
    view = memoryview(buffer)
    filled = 0
    try:
        while filled < KEY_SIZE:
            got = os.readv(fd, [view[filled:]])
            if got == 0:
                raise SystemExit("crash_child: the key pipe closed before 32 bytes arrived")
            filled += got
    finally:
        os.close(fd)
    view.release()
    return buffer


def run(data_dir: str, master: SecretBytes, seed: int, prefix: str) -> None:
    clock = ManualClock(T0)
    config = NodeConfig(runtime="pykka", snapshot_every=50, idle_timeout=30.0)
    node = Node.open(data_dir, KeyUnseal(master), clock=clock, config=config)
    report = node.recovery
    emit(
        "opened",
        len(report.hydrated),
        len(report.failed),
        len(report.purged),
        len(report.reannounced),
    )
    rng = random.Random(seed)
    live: list[RoundId] = []
    for i in range(MAX_ROUNDS):
        round_id = RoundId(f"{prefix}-{i:05d}")
        node.publish(
            RoundRequested(round_id=round_id, deadline=DEADLINE, threshold=2, committee_size=3)
        )
        emit("requested", round_id)
        live.append(round_id)
        roll = rng.random()
        if roll < 0.6 and len(live) > 2:
            ended = live.pop(rng.randrange(len(live)))
            if roll < 0.35:
                node.publish(RoundComplete(round_id=ended))
                emit("completed", ended)
            else:
                reason = rng.choice(TIMEOUTS)
                node.publish(
                    RoundFailed(round_id=ended, failed_at=RoundStage.COMPUTE, reason=reason)
                )
                emit("failed", ended, reason)
        elif roll < 0.7 and live:
            accused = rng.choice(live)  # stays live: the accusation phase
            reason = rng.choice(MISBEHAVIOUR)
            node.publish(RoundFailed(round_id=accused, failed_at=RoundStage.COMPUTE, reason=reason))
            emit("failed", accused, reason)
        if i % 8 == 7:
            node.wait_idle()
            emit("idle", i + 1)
    node.stop()
    emit("done")


def serve(data_dir: str, key: bytearray) -> int:
    """The fork server (see the module doc). Single-threaded, so forking is safe."""
    emit("ready")
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            break
        _, seed, prefix = words
        pid = os.fork()
        if pid == 0:  # the worker
            code = 0
            try:
                emit("worker", os.getpid())
                with SecretBytes.from_buffer(bytearray(key)) as master:
                    run(data_dir, master, int(seed), prefix)
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        emit("reaped", pid, os.waitstatus_to_exitcode(status))
    key[:] = bytes(len(key))
    return 0


def main(argv: list[str]) -> int:
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    )
    if len(argv) == 3 and argv[0] == "--serve":
        return serve(argv[1], read_key_bytes(int(argv[2])))
    if len(argv) != 4:
        raise SystemExit(__doc__)
    data_dir, key_fd, seed, prefix = argv
    with read_key(int(key_fd)) as master:
        run(data_dir, master, int(seed), prefix)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
