"""What a simulation run is: its seed, its size, its outcome mix and its chaos knobs."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Final, Literal

from enclave_keys.errors import ScenarioError

OUTCOMES: Final = ("complete", "timeout", "misbehaviour", "lost")
"""Planned outcomes: completion; a timeout at a random stage; misbehaviour then
completion; terminal events lost, so only the deadline reaper ends the round."""

DEFAULT_MIX: Final = {"complete": 4, "timeout": 2, "misbehaviour": 2, "lost": 1}


def parse_mix(text: str) -> dict[str, int]:
    """``"complete=4,timeout=2,misbehaviour=2,lost=1"`` -> weights (missing ones are 0)."""
    mix = dict.fromkeys(OUTCOMES, 0)
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, weight = part.partition("=")
        if not sep or name not in mix:
            raise ScenarioError(f"mix entries are OUTCOME=WEIGHT with OUTCOME in {OUTCOMES}")
        try:
            mix[name] = int(weight)
        except ValueError:
            raise ScenarioError(f"weight of {name!r} must be an integer") from None
        if mix[name] < 0:
            raise ScenarioError(f"weight of {name!r} must be >= 0")
    if not any(mix.values()):
        raise ScenarioError("at least one outcome needs a positive weight")
    return mix


@dataclass(frozen=True, slots=True)
class SimConfig:
    """One run. Times are protocol seconds on the manual clock."""

    seed: int = 1
    nodes: int = 4
    rounds: int = 200
    committee: int = 3
    threshold: int = 2
    mix: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_MIX))
    runtime: Literal["deterministic", "pykka"] = "deterministic"
    data_dir: Path = Path("sim-data")
    interarrival: float = 4.0  # mean seconds between round requests
    lifetime: float = 600.0  # deadline = request time + lifetime
    reaper_grace: float = 30.0
    tick_interval: float = 15.0  # every node's reaper ticks this often
    crash_every: float = 400.0  # mean seconds between node crashes (0: no crashes)
    max_downtime: float = 90.0
    rotate_every: float = 500.0  # mean seconds between KEK rotations (0: none)
    duplicate: float = 0.1  # probability a terminal event is delivered twice
    late: float = 0.05  # probability a terminal event arrives after the reaper ended it
    reorder: float = 0.1  # probability a round's last two events swap order
    only_rounds: tuple[int, ...] | None = None  # shrinking: schedule just these rounds
    fault: str | None = None  # a deliberately broken component (simulations.faults)
    check_every_step: bool = True  # invariants after every step (else at restarts and end)
    scan_secrets: bool = True  # look for raw keys and keyshares in log, snapshots, blobs

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.rounds < 0:
            raise ScenarioError("need at least one node and a non-negative round count")
        if not 1 <= self.threshold <= self.committee <= self.nodes:
            raise ScenarioError("need 1 <= threshold <= committee <= nodes")
        if self.lifetime <= 300 or self.tick_interval <= 0 or self.interarrival <= 0:
            raise ScenarioError("lifetime must exceed 300 s; intervals must be positive")
        for name in ("duplicate", "late", "reorder"):
            if not 0 <= getattr(self, name) <= 1:
                raise ScenarioError(f"{name} is a probability")

    def with_(self, **changes: object) -> SimConfig:
        return replace(self, **changes)  # type: ignore[arg-type]

    def reproduce_args(self) -> list[str]:
        """Command-line arguments that rerun exactly this scenario."""
        args = [
            f"--seed={self.seed}",
            f"--nodes={self.nodes}",
            f"--rounds={self.rounds}",
            f"--committee={self.committee}",
            f"--threshold={self.threshold}",
            "--mix=" + ",".join(f"{k}={v}" for k, v in self.mix.items()),
            f"--runtime={self.runtime}",
            f"--crash-every={self.crash_every:g}",
            f"--rotate-every={self.rotate_every:g}",
            f"--duplicate={self.duplicate:g}",
            f"--late={self.late:g}",
            f"--reorder={self.reorder:g}",
        ]
        if self.only_rounds is not None:
            args.append("--only-rounds=" + ",".join(map(str, self.only_rounds)))
        if self.fault is not None:
            args.append(f"--fault={self.fault}")
        return args
