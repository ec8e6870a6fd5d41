"""Shrinking a failing run to the smallest scenario that still fails the same check.

Rounds draw from their own generators, so a scenario can be cut without changing what is
left: first the offending round alone; else the shortest prefix of rounds that still
fails (a binary search); then each kind of chaos switched off in turn (crashes, KEK
rotations, duplicated, late and reordered terminal events) where the failure survives it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from enclave_keys.invariants import Violation
from simulations.config import SimConfig
from simulations.runner import SimResult, Simulation

_CHAOS_OFF: tuple[dict[str, object], ...] = (
    {"crash_every": 0.0},
    {"rotate_every": 0.0},
    {"duplicate": 0.0},
    {"late": 0.0},
    {"reorder": 0.0},
)


def shrink(
    failing: SimResult,
    workdir: Path,
    *,
    budget: int = 12,
    log: Callable[[str], None] | None = None,
) -> SimResult:
    """The smallest failing run found within ``budget`` reruns (``failing`` if none is)."""
    first = failing.violations[0]
    attempts = 0
    best = failing

    def attempt(config: SimConfig) -> SimResult | None:
        nonlocal attempts
        if attempts >= budget:
            return None
        attempts += 1
        result = Simulation(config.with_(data_dir=workdir / f"shrink-{attempts}")).run()
        same = _same_failure(first, result.violations)
        if log is not None:
            log(
                f"shrink {attempts}: {' '.join(config.reproduce_args())} -> "
                + ("fails" if same else "passes")
            )
        return result if same else None

    cfg = failing.config
    plan = None
    if first.round_id is not None:
        plan = next((p for p in failing.scenario.plans if p.round_id.value == first.round_id), None)
    if plan is not None:
        alone = attempt(cfg.with_(rounds=plan.number + 1, only_rounds=(plan.number,)))
        if alone is not None:
            best = alone
    if best is failing:
        lo, hi = 1, cfg.rounds
        while lo < hi and attempts < budget:
            mid = (lo + hi) // 2
            found = attempt(cfg.with_(rounds=mid, only_rounds=None))
            if found is not None:
                best, hi = found, mid
            else:
                lo = mid + 1
    for change in _CHAOS_OFF:
        found = attempt(best.config.with_(**change))
        if found is not None:
            best = found
    return best


def _same_failure(first: Violation, found: list[Violation]) -> bool:
    return any(v.check == first.check for v in found)
