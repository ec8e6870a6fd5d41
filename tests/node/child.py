"""A node in a child Python process, for the tests that signal or kill one.

The master key goes through an inherited pipe (never argv, the environment or a file): the
child gets the pipe's read end as a file descriptor number in its argv (:data:`KEY_FD`
marks where), the parent writes the key and closes its end. The child's stdout lines
arrive on a daemon thread through a queue, so every wait for one is bounded.
"""

from __future__ import annotations

import contextlib
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from enclave_keys.crypto import SecretBytes
from tests.node.conftest import WAIT

REPO = Path(__file__).resolve().parents[2]

KEY_FD = "<key-fd>"
"""Stands, in a child's arguments, for the number of the descriptor to read the key from."""


class ChildProcess:
    """``python -m module args``, fed the master key through a pipe, stdout lines queued.

    The child's stderr is appended to ``stderr``; ``env`` (if given) replaces the environment.
    With ``interactive`` the child's stdin is a pipe: write lines to it with :meth:`send`.
    """

    def __init__(
        self,
        module: str,
        args: Sequence[str],
        master: SecretBytes,
        stderr: Path,
        env: Mapping[str, str] | None = None,
        *,
        interactive: bool = False,
    ) -> None:
        self.stderr_path = stderr
        read_end, write_end = os.pipe()
        argv = [str(read_end) if a == KEY_FD else a for a in args]
        with stderr.open("ab") as err:
            try:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", module, *argv],
                    cwd=REPO,
                    env=env,
                    stdin=subprocess.PIPE if interactive else subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=err,
                    pass_fds=(read_end,),
                )
            finally:
                os.close(read_end)
        with os.fdopen(write_end, "wb") as pipe, master.borrow() as key:
            pipe.write(key)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put(raw.decode().strip())
        self.lines.put(None)

    def next_line(self, deadline: float) -> str:
        """The next stdout line, waiting until ``deadline`` (``time.monotonic()``) at most."""
        try:
            line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError("the child printed nothing in time") from None
        assert line is not None, "the child's output ended early"
        return line

    def rest(self, timeout: float = WAIT) -> list[str]:
        """The lines not read yet, up to the end of the output (within ``timeout`` seconds)."""
        found: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError("the child's output did not end in time") from None
            if line is None:
                break
            found.append(line)
        self._reader.join(WAIT)
        return found

    def send(self, line: str) -> None:
        """Write one line to the child's stdin (an ``interactive`` child only)."""
        assert self.proc.stdin is not None, "not an interactive child"
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def wait(self, timeout: float) -> int | None:
        """The exit code, or None if the child did not exit within ``timeout`` seconds."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> int:
        """SIGKILL now; return the exit code."""
        self.proc.kill()
        return self.proc.wait(timeout=WAIT)

    def stderr_tail(self, chars: int = 4000) -> str:
        return self.stderr_path.read_text()[-chars:]

    def close(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=WAIT)
        self._reader.join(WAIT)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
