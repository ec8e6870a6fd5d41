"""Counts that failure-testing runs report at the end of the session.

Tests add to :data:`REPORTS` (``report("fuzz", cases=12)``); ``tests/conftest.py``
prints everything in pytest's terminal summary.
"""

from __future__ import annotations

REPORTS: dict[str, dict[str, int]] = {}


def report(name: str, **counts: int) -> None:
    """Add ``counts`` to the report ``name`` (summing with what is there)."""
    entry = REPORTS.setdefault(name, {})
    for key, value in counts.items():
        entry[key] = entry.get(key, 0) + value


def replace(name: str, **counts: int) -> None:
    """Set the report ``name`` to ``counts``."""
    REPORTS[name] = dict(counts)
