"""A data directory's claim held by another, real process (for the claim tests)."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_HOLDER = """
import sys
from pathlib import Path
from enclave_keys.store.claim import DirectoryClaim
claim = DirectoryClaim(Path(sys.argv[1]), sys.argv[2])
print("held", flush=True)
sys.stdin.read()
"""


@contextmanager
def claimed_elsewhere(data_dir: Path, role: str = "node") -> Iterator[subprocess.Popen[str]]:
    """A child process that holds ``data_dir``'s claim (as ``role``) for the block, then
    dies by SIGKILL, leaving its ``node.pid`` behind as a killed node would."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(data_dir), role],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "held\n", "the holder did not take the claim"
        yield holder
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=20.0)
        for stream in (holder.stdin, holder.stdout):
            if stream is not None:
                stream.close()
