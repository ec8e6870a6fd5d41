"""Hardening is process-wide and irreversible, so each check runs in a child process."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent(
    """
    import resource, ctypes, ctypes.util
    from enclave_keys.crypto.hardening import harden_process
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    before = (resource.getrlimit(resource.RLIMIT_CORE), libc.prctl(3, 0, 0, 0, 0))
    report = harden_process()
    after = (resource.getrlimit(resource.RLIMIT_CORE), libc.prctl(3, 0, 0, 0, 0))
    print(before[1], after[0][0], after[0][1], after[1], report.core_limit_zero,
          report.not_dumpable)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux-only")
def test_harden_process_disables_core_dumps_and_dumpability() -> None:
    out = (
        subprocess.run(
            [sys.executable, "-c", CHILD],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        .stdout.splitlines()[-1]
        .split()
    )  # the last line: structlog may print before it
    dumpable_before, core_soft, core_hard, dumpable_after, core_ok, dump_ok = out
    assert dumpable_before == "1"  # an ordinary process is dumpable ...
    assert (core_soft, core_hard) == ("0", "0")  # ... and afterwards writes no core
    assert dumpable_after == "0"
    assert (core_ok, dump_ok) == ("True", "True")
