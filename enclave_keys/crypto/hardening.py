"""Process hardening for a node that holds keys: no core dumps, not ptrace-dumpable.

:func:`harden_process` is called once at node start. It sets ``RLIMIT_CORE`` to 0 (a
crash writes no core file containing key memory) and, on Linux,
``prctl(PR_SET_DUMPABLE, 0)`` (no core dumps at all, and other processes of the same
user can no longer ptrace this one or read ``/proc/<pid>/mem``). Key buffers are also
excluded from dumps one by one (``MADV_DONTDUMP`` in :mod:`enclave_keys.crypto.secret`);
this is the process-wide belt to those braces.

Neither step can be undone by an attacker who does not already control the process, and
neither is a defence against one who does (see docs/threat-model.md when it lands).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
import sys
from dataclasses import dataclass

import structlog

_log = structlog.get_logger(__name__)

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3


@dataclass(frozen=True, slots=True)
class HardeningReport:
    """What :func:`harden_process` achieved (a node logs it; tests assert it)."""

    core_limit_zero: bool
    not_dumpable: bool


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name, use_errno=True)
    except OSError:
        return None


def _set_core_limit_zero() -> bool:
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError):
        return False
    return resource.getrlimit(resource.RLIMIT_CORE) == (0, 0)


def _set_not_dumpable() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    libc = _libc()
    if libc is None:
        return False
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        return False
    return bool(libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) == 0)


def harden_process() -> HardeningReport:
    """Disable core dumps and make the process non-dumpable; report what took effect."""
    report = HardeningReport(
        core_limit_zero=_set_core_limit_zero(), not_dumpable=_set_not_dumpable()
    )
    if report.core_limit_zero and report.not_dumpable:
        _log.info("process_hardened")
    else:
        _log.warning(
            "process_hardening_incomplete",
            core_limit_zero=report.core_limit_zero,
            not_dumpable=report.not_dumpable,
        )
    return report
