"""Fixtures shared by the whole suite, Hypothesis profiles and the run's count reports."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import structlog
from hypothesis import HealthCheck, settings

from enclave_keys import log
from tests.reports import REPORTS

# --- Hypothesis profiles --------------------------------------------------------------
# ENCLAVE_KEYS_HYPOTHESIS_PROFILE picks one: "ci" (the default: derandomised, so every
# run tries the same examples) or "soak" (random, many more examples; the node state
# machine reads its own counts from tests/property/test_node_statemachine.py).
PROFILE_ENV = "ENCLAVE_KEYS_HYPOTHESIS_PROFILE"
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile(
    "soak",
    max_examples=2_000,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get(PROFILE_ENV, "ci"))


@pytest.fixture(autouse=True, scope="session")
def _uncached_loggers() -> Iterator[None]:
    """No cached loggers in tests: a logger cached while one test had configured structlog
    (by running the CLI, say) would keep that configuration in every later test."""
    cached, log.CACHE_LOGGERS_DEFAULT = log.CACHE_LOGGERS_DEFAULT, False
    yield
    log.CACHE_LOGGERS_DEFAULT = cached


@pytest.fixture(autouse=True)
def _isolated_structlog() -> Iterator[None]:
    """A test that configures structlog (e.g. by running a CLI) must not leak into others."""
    yield
    structlog.reset_defaults()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the counts that failure-testing runs recorded (tests/reports.py)."""
    if not REPORTS:
        return
    terminalreporter.section("enclave_keys failure-testing counts")
    for name, counts in sorted(REPORTS.items()):
        shown = ", ".join(f"{key}={value}" for key, value in counts.items())
        terminalreporter.write_line(f"{name}: {shown}")
