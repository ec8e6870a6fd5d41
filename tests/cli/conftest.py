"""Fixtures and helpers of the operator-CLI tests (``enclave_keys.cli``).

* :class:`Cli` runs ``enclave_keys.cli.main`` in this process and captures what it prints
  (``capsys``); secrets go in through a real ``os.pipe()`` and ``--secret-fd``, one per
  line, exactly as an operator's secret manager would feed them.
* :class:`NodeProcess` runs ``enclave-keys run`` as a real child process (passphrase or
  shares on its standard input) and reads its output lines through reader threads, so
  every wait for a line is bounded.
* The SoftHSM2 fixture is the one of ``tests/unseal/test_hsm.py`` (imported, not copied):
  it skips without SoftHSM2, or fails if ``ENCLAVE_KEYS_REQUIRE_SOFTHSM=1``.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest

from enclave_keys.cli import main
from enclave_keys.crypto import read_wrapped_header
from enclave_keys.events import RoundRequested
from enclave_keys.ids import EpochNumber, KeyId, RoundId
from enclave_keys.node import Node, NodeConfig
from enclave_keys.store import LmdbStore
from enclave_keys.store.slots import SLOT_FILE_NAME
from enclave_keys.unseal import UnsealSource
from tests.unseal.test_hsm import PIN, TOKEN, SoftHsm, softhsm

__all__ = [
    "NEW_PASSPHRASE",
    "PASSPHRASE",
    "PIN",
    "TOKEN",
    "WAIT",
    "Cli",
    "NodeProcess",
    "OutputTimeout",
    "Result",
    "SoftHsm",
    "StoreView",
    "make_rounds",
    "read_store",
    "shares_of",
    "softhsm",
]

PASSPHRASE = "correct horse battery staple"
NEW_PASSPHRASE = " tr0ub4dor & 3: spaces are part of it "
WAIT = 20.0
"""Bound of every wait for a child process (seconds); a passing test never waits it out."""


# --- the CLI in this process ------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    """One ``main`` call: its exit code and what it wrote to stdout and stderr."""

    code: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return self.out.splitlines()

    def everything(self) -> str:
        return self.out + self.err


class Cli:
    """Runs ``main(argv)`` in-process; ``secrets`` (if given) arrive through a pipe."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self._capsys = capsys
        self.history: list[Result] = []

    def __call__(self, *argv: str | Path, secrets: Sequence[str] | None = None) -> Result:
        args = [str(arg) for arg in argv]
        self._capsys.readouterr()  # drop anything printed before this call
        if secrets is None:
            code = main(args)
        else:
            read_end, write_end = os.pipe()
            try:
                os.write(write_end, "".join(f"{s}\n" for s in secrets).encode("utf-8"))
                os.close(write_end)
                write_end = -1
                code = main([*args, "--secret-fd", str(read_end)])
            finally:
                os.close(read_end)
                if write_end >= 0:
                    os.close(write_end)
        captured = self._capsys.readouterr()
        result = Result(code, captured.out, captured.err)
        self.history.append(result)
        return result

    def status(self, data_dir: Path) -> dict[str, Any]:
        result = self("status", "--data-dir", data_dir, "--json")
        assert result.code == 0, result.err
        status: dict[str, Any] = json.loads(result.out)
        return status


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(capsys)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "node"


@pytest.fixture
def passphrase_dir(cli: Cli, data_dir: Path) -> Path:
    """A data directory initialised with :data:`PASSPHRASE`."""
    result = cli("init", "passphrase", "--data-dir", data_dir, secrets=[PASSPHRASE])
    assert result.code == 0, result.err
    return data_dir


def shares_of(result: Result) -> list[str]:
    """The shares an ``init shares`` or ``rekey --to shares`` printed (``share N: words``)."""
    shares = []
    for line in result.lines:
        head, sep, words = line.partition(": ")
        if sep and head.startswith("share ") and head[6:].isdigit():
            shares.append(words)
    return shares


# --- reading a data directory -----------------------------------------------------------


@dataclass(frozen=True)
class StoreView:
    """What a data directory holds, read directly from the store and the epoch slot file
    (``slots``: its raw bytes, ``None`` before a node first started there)."""

    meta: dict[str, bytes | None]
    keys: dict[RoundId, bytes]
    last_sequence: int
    slots: bytes | None

    @property
    def key_ids(self) -> dict[RoundId, KeyId]:
        """The key id each stored blob names. The blob bytes change with every epoch
        change (each node start ratchets the storage epoch); the round keys inside, and
        so these ids, do not."""
        return {r: read_wrapped_header(blob)[1] for r, blob in self.keys.items()}

    @property
    def epochs(self) -> set[EpochNumber]:
        """The storage epochs the stored blobs name."""
        return {read_wrapped_header(blob)[0] for blob in self.keys.values()}


META_RECORDS = (
    "master.method",
    "master.keyring",
    "unseal.passphrase.kdf",
    "unseal.shamir.share_set",
    "unseal.pkcs11.sealed_root",
    "unseal.env.verifier",
)


def read_store(data_dir: Path) -> StoreView:
    slot_file = data_dir / SLOT_FILE_NAME  # read as a file: the store would create it
    with LmdbStore.open(data_dir, create=False) as store:
        return StoreView(
            meta={name: store.get_meta(name) for name in META_RECORDS},
            keys=dict(store.list_keys()),
            last_sequence=store.last_sequence(),
            slots=slot_file.read_bytes() if slot_file.exists() else None,
        )


def make_rounds(data_dir: Path, source: UnsealSource, count: int) -> list[RoundId]:
    """Open a node in this process with ``source``, request ``count`` rounds (each gets a
    stored round key), stop it. The deadlines are an hour away: the rounds stay live."""
    deadline = time.time() + 3600.0
    rounds = [RoundId(f"cli-round-{n}") for n in range(count)]
    node = Node.open(data_dir, source, config=NodeConfig(runtime="deterministic"))
    try:
        node.publish(
            *(
                RoundRequested(round_id=r, deadline=deadline, threshold=2, committee_size=3)
                for r in rounds
            )
        )
        node.wait_idle(WAIT)
        assert node.store.key_count() == count
    finally:
        node.stop()
    return rounds


# --- `enclave-keys run` in a child process ----------------------------------------------


class OutputTimeout(AssertionError):
    """An expected line did not arrive in time while the child was still running."""


class _Lines:
    """The lines of one pipe, read by a daemon thread; ``None`` marks end of file."""

    def __init__(self, pipe: IO[bytes]) -> None:
        self.seen: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def _read(self, pipe: IO[bytes]) -> None:
        try:
            for raw in pipe:
                self._queue.put(raw.decode("utf-8", "replace").rstrip("\n"))
        finally:
            self._queue.put(None)

    def expect(self, text: str, timeout: float, alive: NodeProcess) -> str:
        """The first unread line containing ``text``; lines before it are kept in ``seen``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise OutputTimeout(
                    f"no line with {text!r} within {timeout} s; seen so far: {self.seen}"
                ) from None
            if line is None:
                self._queue.put(None)  # stay at end of file for later calls
                raise AssertionError(
                    f"the child exited (code {alive.proc.poll()}) before printing {text!r};"
                    f" stdout {alive.stdout.seen}, stderr {alive.stderr.seen}"
                )
            self.seen.append(line)
            if text in line:
                return line

    def drain(self, timeout: float) -> list[str]:
        """Every remaining line up to end of file (the child has exited)."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the pipe stayed open after the child exited"
        while (line := self._queue.get_nowait()) is not None:
            self.seen.append(line)
        self._queue.put(None)
        return self.seen


class NodeProcess:
    """``python -m enclave_keys.cli run --data-dir D --secret-fd 0 --tick 0.05``.

    ``secrets`` are written to its standard input (then closed). ``unbuffered`` sets
    ``PYTHONUNBUFFERED=1`` in its environment (and clears it otherwise); see
    ``test_run_reports_readiness_through_a_pipe`` for why the suite needs it.
    """

    def __init__(
        self,
        data_dir: Path,
        secrets: Sequence[str],
        *,
        unbuffered: bool = True,
        verbose: bool = False,
    ) -> None:
        env = dict(os.environ)
        env.pop("PYTHONUNBUFFERED", None)
        if unbuffered:
            env["PYTHONUNBUFFERED"] = "1"
        argv = [sys.executable, "-m", "enclave_keys.cli"]
        if verbose:
            argv.append("-v")
        argv += ["run", "--data-dir", str(data_dir), "--secret-fd", "0", "--tick", "0.05"]
        self.data_dir = data_dir
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        assert self.proc.stderr is not None
        self.stdout = _Lines(self.proc.stdout)
        self.stderr = _Lines(self.proc.stderr)
        with self.proc.stdin as stdin:
            stdin.write("".join(f"{s}\n" for s in secrets).encode("utf-8"))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def expect(self, text: str, timeout: float = WAIT) -> str:
        """Wait (bounded) for a stdout line containing ``text``."""
        return self.stdout.expect(text, timeout, self)

    def expect_err(self, text: str, timeout: float = WAIT) -> str:
        """Wait (bounded) for a stderr line containing ``text``."""
        return self.stderr.expect(text, timeout, self)

    def signal(self, signum: signal.Signals) -> None:
        assert self.proc.poll() is None, "the child is not running"
        self.proc.send_signal(signum)

    def wait(self, timeout: float = WAIT) -> tuple[int, list[str], list[str]]:
        """Its exit code and all its stdout and stderr lines, once it has exited."""
        code = self.proc.wait(timeout=timeout)
        return code, self.stdout.drain(timeout), self.stderr.drain(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=WAIT)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def spawn() -> Iterator[type[NodeProcess]]:
    """Start ``run`` children with ``spawn(data_dir, secrets)``; all are killed at teardown."""
    started: list[NodeProcess] = []

    class Tracked(NodeProcess):
        def __init__(
            self,
            data_dir: Path,
            secrets: Sequence[str],
            *,
            unbuffered: bool = True,
            verbose: bool = False,
        ) -> None:
            super().__init__(data_dir, secrets, unbuffered=unbuffered, verbose=verbose)
            started.append(self)

    yield Tracked
    for child in started:
        child.close()
