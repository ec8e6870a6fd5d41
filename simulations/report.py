"""The run's report: a progress bar, a summary table, plots, and a Markdown file.

Plots (round-key lifetime distribution, live keys over time) are PNG files made with
matplotlib when it is installed (the ``plots`` extra); without it the report says so and
everything else is the same.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, TextIO

from simulations.config import OUTCOMES
from simulations.runner import SimResult
from simulations.scenario import CLOCK_START


class ProgressBar:
    """``[#####-----]  50%  1234/2468 steps`` on a stream, redrawn at most 10 times/s."""

    def __init__(self, stream: TextIO | None = None, width: int = 30) -> None:
        self._stream = sys.stderr if stream is None else stream
        self._width = width
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self._last < 0.1:
            return
        self._last = now
        filled = self._width * done // max(total, 1)
        bar = "#" * filled + "-" * (self._width - filled)
        end = "\n" if done >= total else ""
        percent = 100 * done // max(total, 1)
        self._stream.write(f"\r[{bar}] {percent:3d}%  {done}/{total} steps{end}")
        self._stream.flush()


def _live_series(result: SimResult) -> list[tuple[float, int]]:
    """Live round keys summed over every node, as (protocol seconds, count) steps."""
    changes: list[tuple[float, int]] = []
    for state in result.states:
        previous = 0
        for when, count in state.live_series:
            changes.append((when - CLOCK_START, count - previous))
            previous = count
    changes.sort()
    series: list[tuple[float, int]] = []
    total = 0
    for when, delta in changes:
        total += delta
        series.append((when, total))
    return series


def summary_rows(result: SimResult) -> list[tuple[str, str]]:
    """The summary table as (name, value) rows."""
    cfg = result.config
    planned = Counter(p.outcome for p in result.scenario.plans)
    outcomes: Counter[str] = Counter()
    lifetimes: list[float] = []
    purges = 0
    events = 0
    for state in result.states:
        outcomes.update(state.outcomes())
        lifetimes.extend(state.key_lifetimes())
        purges += state.purges
        events += state.events
    series = _live_series(result)
    rows = [
        ("seed", str(cfg.seed)),
        ("runtime", cfg.runtime),
        ("nodes / committee / threshold", f"{cfg.nodes} / {cfg.committee} / {cfg.threshold}"),
        ("rounds scheduled", str(len(result.scenario.plans))),
        ("planned mix", ", ".join(f"{o} {planned[o]}" for o in OUTCOMES)),
        ("protocol time", f"{result.scenario.end:.0f} s"),
        ("steps run", f"{result.steps} of {len(result.scenario.actions)}"),
        ("events logged", str(events)),
    ]
    rows += [(f"round-node outcome: {name}", str(n)) for name, n in sorted(outcomes.items())]
    rows += [
        ("crashes / restarts", f"{result.crashes} / {result.restarts}"),
        ("deliveries lost to a down node", str(result.dropped)),
        ("KEK rotations", str(result.rotations)),
        ("keys purged", str(purges)),
        (
            "max key lifetime",
            f"{max(lifetimes):.0f} s (bound: lifetime {cfg.lifetime:.0f} + grace "
            f"{cfg.reaper_grace:.0f} + tick {cfg.tick_interval:.0f} + downtime)"
            if lifetimes
            else "-",
        ),
        ("max live keys (all nodes)", str(max((n for _, n in series), default=0))),
        ("secrets scanned for", str(result.secrets_scanned)),
        ("wall time", f"{result.wall_seconds:.1f} s"),
        ("log hash", result.log_hash),
    ]
    return rows


def text_report(result: SimResult) -> list[str]:
    """What is printed at the end of a run."""
    rows = summary_rows(result)
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    lines.append("")
    lines.append("invariants")
    for check, count in result.invariant_summary().items():
        lines.append(f"  {check:<26} {'holds' if count == 0 else f'VIOLATED x{count}'}")
    verdict = "all hold" if result.ok else f"{len(result.violations)} violated"
    lines.append(f"invariants: {verdict}")
    return lines


def plots_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def make_plots(result: SimResult, directory: Path) -> list[Path]:
    """Write the PNG plots into ``directory``; nothing (empty list) without matplotlib."""
    if not plots_available():
        return []
    matplotlib: Any = importlib.import_module("matplotlib")
    matplotlib.use("Agg")
    plt: Any = importlib.import_module("matplotlib.pyplot")

    made: list[Path] = []
    lifetimes = [t for state in result.states for t in state.key_lifetimes()]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(lifetimes or [0.0], bins=40, color="#3465a4")
    ax.set_xlabel("round-key lifetime (protocol seconds)")
    ax.set_ylabel("keys")
    ax.set_title(f"Round-key lifetimes (seed {result.config.seed})")
    path = directory / "key-lifetimes.png"
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    made.append(path)

    series = _live_series(result)
    fig, ax = plt.subplots(figsize=(7, 4))
    if series:
        xs, ys = zip(*series, strict=True)
        ax.step(xs, ys, where="post", color="#4e9a06")
    ax.set_xlabel("protocol time (s)")
    ax.set_ylabel("live round keys (all nodes)")
    ax.set_title("Live round keys over time")
    path = directory / "live-keys.png"
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    made.append(path)
    return made


def markdown_report(
    result: SimResult, plots: list[Path], reproduce: list[str], trace: list[str]
) -> str:
    """The Markdown report file's text."""
    out = [f"# Simulation report — seed {result.config.seed}", ""]
    out += ["| | |", "| --- | --- |"]
    out += [f"| {name} | {value} |" for name, value in summary_rows(result)]
    out += ["", "## Invariants", "", "| check | result |", "| --- | --- |"]
    for check, count in result.invariant_summary().items():
        out.append(f"| {check} | {'holds' if count == 0 else f'**violated** x{count}'} |")
    out += ["", "## Per-node log hashes", ""]
    out += [f"- node-{i}: `{h}`" for i, h in enumerate(result.node_hashes)]
    out += ["", "## Plots", ""]
    if plots:
        out += [f"![{p.stem}]({p.name})" for p in plots]
    else:
        out.append("matplotlib is not installed (`pip install -e '.[plots]'`): no plots.")
    if result.violations:
        out += ["", "## Violations", ""]
        out += [f"- {v}" for v in result.violations]
        out += ["", "Reproduce with:", "", "```sh", " ".join(reproduce), "```"]
        out += ["", "Trace:", "", "```text", *trace, "```"]
    out.append("")
    return "\n".join(out)
