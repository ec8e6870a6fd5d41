"""The seeded script of a run: every delivery, tick, crash, restart and KEK rotation.

A scenario is drawn from the seed alone, before anything runs, so it can be printed,
shrunk and replayed. Each round draws from its own generator (``seed/round/N``), and
arrivals, crashes and rotations from theirs: running fewer rounds, or only some of them,
leaves every remaining round's script — and the crash and rotation times — unchanged.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Final, Literal

from enclave_keys.events import (
    Event,
    FailureReason,
    RoundComplete,
    RoundFailed,
    RoundRequested,
    RoundStage,
    RoundStageChanged,
)
from enclave_keys.ids import RoundId
from simulations.config import OUTCOMES, SimConfig

CLOCK_START: Final = 1_700_000_000.0
STAGES: Final = (
    RoundStage.COMMITTEE_FORMATION,
    RoundStage.KEY_GENERATION,
    RoundStage.COMPUTE,
    RoundStage.DECRYPTION,
)
MISBEHAVIOUR: Final = {
    RoundStage.KEY_GENERATION: FailureReason.INVALID_DKG_SHARES,
    RoundStage.COMPUTE: FailureReason.VERIFICATION_FAILED,
    RoundStage.DECRYPTION: FailureReason.INVALID_DECRYPTION_SHARES,
}

Kind = Literal["deliver", "tick", "crash", "restart", "rotate"]


@dataclass(frozen=True, slots=True)
class Action:
    """One step: at ``time`` (seconds after the start), do ``kind`` on ``node``.

    ``node`` is -1 for a tick of every node. ``note`` says why a delivery is unusual
    (``duplicate``, ``late``, ``reordered``).
    """

    time: float
    order: int
    kind: Kind
    node: int
    event: Event | None = None
    round_no: int | None = None
    note: str = ""

    def describe(self) -> str:
        what = self.kind if self.event is None else f"{self.kind} {self.event!r}"
        extra = f" ({self.note})" if self.note else ""
        return f"t+{self.time:8.1f}s node {self.node}: {what}{extra}"


@dataclass(frozen=True, slots=True)
class RoundPlan:
    """What a round is meant to do (the chaos may change what actually happens)."""

    number: int
    round_id: RoundId
    start: float
    committee: tuple[int, ...]
    outcome: str
    stage: RoundStage  # where it fails, or where its events stop (lost)


@dataclass(frozen=True, slots=True)
class Scenario:
    config: SimConfig
    plans: tuple[RoundPlan, ...]
    actions: tuple[Action, ...]
    end: float

    def plan_of(self, round_id: RoundId) -> RoundPlan | None:
        return next((p for p in self.plans if p.round_id == round_id), None)


def round_id(number: int) -> RoundId:
    return RoundId(f"r{number:05d}")


class _Builder:
    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.actions: list[Action] = []

    def add(self, time: float, kind: Kind, node: int, **extra: object) -> None:
        self.actions.append(Action(time, len(self.actions), kind, node, **extra))  # type: ignore[arg-type]


def build(config: SimConfig) -> Scenario:
    """The scenario of ``config`` (pure: the same config gives the same scenario)."""
    b = _Builder(config)
    arrivals = random.Random(f"{config.seed}/arrivals")
    starts: list[float] = []
    t = 0.0
    for _ in range(config.rounds):
        t += arrivals.expovariate(1 / config.interarrival)
        starts.append(t)
    end = (starts[-1] if starts else 0.0) + config.lifetime * 0.5
    wanted = set(range(config.rounds) if config.only_rounds is None else config.only_rounds)
    plans = []
    for number, start in enumerate(starts):
        if number in wanted:
            plans.append(_round(b, number, start))
    tick = config.tick_interval
    for n in range(1, int(end // tick) + 1):
        b.add(n * tick, "tick", -1)
    _crashes(b, end)
    _rotations(b, end)
    actions = sorted((a for a in b.actions if a.time <= end), key=lambda a: (a.time, a.order))
    return Scenario(config, tuple(plans), tuple(actions), end)


def _round(b: _Builder, number: int, start: float) -> RoundPlan:
    cfg = b.config
    rng = random.Random(f"{cfg.seed}/round/{number}")
    rid = round_id(number)
    committee = tuple(sorted(rng.sample(range(cfg.nodes), cfg.committee)))
    weights = [cfg.mix.get(name, 0) for name in OUTCOMES]
    outcome = rng.choices(OUTCOMES, weights)[0]
    stages = list(MISBEHAVIOUR) if outcome == "misbehaviour" else list(STAGES)
    stage = rng.choice(stages)
    deadline = CLOCK_START + start + cfg.lifetime
    # The round's script, as offsets from its start (the same for every member).
    script: list[tuple[float, Event, bool]] = []  # (offset, event, terminal)
    offset = 0.0
    script.append(
        (
            offset,
            RoundRequested(
                round_id=rid,
                deadline=deadline,
                threshold=cfg.threshold,
                committee_size=cfg.committee,
                parameters={"scenario": f"{cfg.seed}/{number}"},
            ),
            False,
        )
    )
    for s in STAGES[: STAGES.index(stage) + 1]:
        offset += rng.uniform(5, 50)
        script.append((offset, RoundStageChanged(round_id=rid, stage=s), False))
    offset += rng.uniform(5, 40)
    if outcome == "complete":
        script.append((offset, RoundComplete(round_id=rid), True))
    elif outcome == "timeout":
        failed = RoundFailed(round_id=rid, failed_at=stage, reason=FailureReason.timeout_for(stage))
        script.append((offset, failed, True))
    elif outcome == "misbehaviour":
        accused = RoundFailed(round_id=rid, failed_at=stage, reason=MISBEHAVIOUR[stage])
        script.append((offset, accused, True))
        script.append((offset + rng.uniform(20, 120), RoundComplete(round_id=rid), True))
    # "lost": the terminal events never arrive; the deadline reaper must end the round.
    late_at = cfg.lifetime + cfg.reaper_grace + cfg.tick_interval
    for node in committee:
        jitter = rng.uniform(0, 3)
        timeline = [(start + off + jitter, ev, term) for off, ev, term in script]
        notes = [""] * len(timeline)
        if len(timeline) >= 2 and timeline[-1][2] and rng.random() < cfg.reorder:
            (t1, e1, x1), (t2, e2, x2) = timeline[-2], timeline[-1]
            timeline[-2], timeline[-1] = (t1, e2, x2), (t2, e1, x1)
            notes[-2] = notes[-1] = "reordered"
        for i, (when, event, terminal) in enumerate(timeline):
            if terminal and rng.random() < cfg.late:
                when = start + late_at + rng.uniform(10, 200)
                notes[i] = "late"
            b.add(when, "deliver", node, event=event, round_no=number, note=notes[i])
            if terminal and rng.random() < cfg.duplicate:
                again = when + rng.uniform(1, 300)
                b.add(again, "deliver", node, event=event, round_no=number, note="duplicate")
    return RoundPlan(number, rid, start, committee, outcome, stage)


def _crashes(b: _Builder, end: float) -> None:
    cfg = b.config
    if cfg.crash_every <= 0:
        return
    rng = random.Random(f"{cfg.seed}/crashes")
    down_until = [0.0] * cfg.nodes
    t = 0.0
    while True:
        t += rng.expovariate(1 / cfg.crash_every)
        node = rng.randrange(cfg.nodes)
        downtime = rng.uniform(5, cfg.max_downtime)
        if t > end:
            return
        if down_until[node] > t:
            continue
        down_until[node] = t + downtime
        b.add(t, "crash", node)
        b.add(t + downtime, "restart", node)


def _rotations(b: _Builder, end: float) -> None:
    cfg = b.config
    if cfg.rotate_every <= 0:
        return
    rng = random.Random(f"{cfg.seed}/rotations")
    t = 0.0
    while True:
        t += rng.expovariate(1 / cfg.rotate_every)
        node = rng.randrange(cfg.nodes)
        if t > end:
            return
        b.add(t, "rotate", node)
