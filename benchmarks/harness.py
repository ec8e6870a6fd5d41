"""Timing, result rows and targets shared by every benchmark family."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["Row", "Target", "format_number", "median_seconds", "timed"]

Bound = Literal["at_least", "at_most"]
On = Literal["measured", "ratio"]


@dataclass(frozen=True, slots=True)
class Target:
    """A target from the issue: a bound on the measured median, or on the ratio."""

    bound: float
    kind: Bound = "at_least"
    on: On = "measured"

    def met(self, row: Row) -> bool | None:
        value = row.measured if self.on == "measured" else row.ratio
        if value is None:
            return None
        return value >= self.bound if self.kind == "at_least" else value <= self.bound

    def describe(self, unit: str) -> str:
        sign = ">=" if self.kind == "at_least" else "<="
        if self.on == "ratio":
            return f"{sign} {self.bound:g}x"
        return f"{sign} {_number(self.bound)} {unit}"


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the report.

    ``measured`` and ``baseline`` are medians in ``unit``; ``ratio`` is measured divided
    by baseline (for a rate, the fraction of the baseline's speed; for seconds or bytes,
    how many times the baseline's cost).
    """

    family: str
    name: str
    size: int
    unit: str
    measured: float
    baseline_name: str = ""
    baseline: float | None = None
    target: Target | None = None
    notes: dict[str, float] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or self.baseline == 0:
            return None
        return self.measured / self.baseline

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.target.met(self)

    def to_json(self) -> dict[str, object]:
        return {
            "family": self.family,
            "name": self.name,
            "size": self.size,
            "unit": self.unit,
            "measured": self.measured,
            "baseline_name": self.baseline_name,
            "baseline": self.baseline,
            "ratio": self.ratio,
            "target": None if self.target is None else self.target.describe(self.unit),
            "met": self.met,
            "notes": dict(self.notes),
        }


def timed(work: Callable[[], object]) -> float:
    """Seconds ``work()`` takes, after a full collection (the collector stays on while it
    runs, for our code and the baselines alike, as it would in a node)."""
    gc.collect()
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def median_seconds(run: Callable[[], float], repeats: int) -> float:
    """The median of ``repeats`` calls of ``run``, each returning the seconds it measured."""
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    return statistics.median(run() for _ in range(repeats))


def _number(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 1:
        return f"{value:,.2f}"
    return f"{value:.3g}"


def format_number(value: float | None) -> str:
    """A median as the table shows it."""
    return "-" if value is None else _number(value)
