"""Run sizes: how many events, rounds and bytes each benchmark uses, and how often."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = ["SIZES", "Sizes"]


@dataclass(frozen=True, slots=True)
class Sizes:
    """One run size. Each tuple lists the sizes a family is measured at (its growth)."""

    name: str
    events: tuple[int, ...]  # append and replay: events in the log
    rounds: tuple[int, ...]  # lifecycle: rounds driven from requested to purged
    live: tuple[int, ...]  # restart and memory: live rounds hydrated
    payloads: tuple[int, ...]  # seal/open: plaintext bytes
    seal_bytes: int  # bytes sealed per repeat at each payload size
    primitive_ops: int  # operations per repeat for the per-round bare primitives
    repeats: int  # repeats of each measurement (the median is reported)
    batch: int = 256  # events per group commit in the append benchmark

    def repeats_for(self, count: int, budget: int) -> int:
        """Fewer repeats for big sizes: at most ``budget`` items over all repeats."""
        return max(1, min(self.repeats, budget // max(count, 1)))


KIB: Final = 1024

SIZES: Final[dict[str, Sizes]] = {
    "tiny": Sizes(
        name="tiny",
        events=(300,),
        rounds=(40,),
        live=(40,),
        payloads=(KIB, 64 * KIB),
        seal_bytes=256 * KIB,
        primitive_ops=20,
        repeats=2,
    ),
    "small": Sizes(
        name="small",
        events=(1_000, 10_000),
        rounds=(1_000,),
        live=(1_000, 10_000),
        payloads=(KIB, 64 * KIB, 1024 * KIB),
        seal_bytes=16 * 1024 * KIB,
        primitive_ops=300,
        repeats=3,
    ),
    "full": Sizes(
        name="full",
        events=(1_000, 10_000, 100_000),
        rounds=(1_000, 10_000),
        live=(1_000, 10_000, 100_000),
        payloads=(KIB, 64 * KIB, 1024 * KIB),
        seal_bytes=64 * 1024 * KIB,
        primitive_ops=1_000,
        repeats=5,
    ),
}
