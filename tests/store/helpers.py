"""Event builders for the store tests (the store treats events as opaque records), and a
child Python process for the tests that need one to die or be limited."""

from __future__ import annotations

import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from enclave_keys.events import KeyshareCreated, RoundComplete, StoredEvent
from enclave_keys.ids import EventId, KeyId, RoundId
from enclave_keys.store import Store, WriteBatch


def make_event(sequence: int, *, payload_size: int = 16) -> StoredEvent:
    """A valid stored event numbered ``sequence``, deterministic in ``sequence``.

    Even sequences carry a ``payload_size``-byte ciphertext, odd ones an empty payload.
    """
    rng = random.Random(sequence)
    round_id = RoundId(f"round-{sequence % 7}")
    payload = (
        KeyshareCreated(
            round_id=round_id, key_id=KeyId.random(rng), ciphertext=rng.randbytes(payload_size)
        )
        if sequence % 2 == 0
        else RoundComplete(round_id=round_id)
    )
    return StoredEvent(
        sequence=sequence,
        event_id=EventId.random(rng),
        timestamp=1_700_000_000.0 + sequence,
        correlation_id=EventId.random(rng),
        source="test",
        payload=payload,
    )


def make_events(first: int, count: int, *, payload_size: int = 16) -> list[StoredEvent]:
    """``count`` consecutive events starting at ``first``."""
    return [make_event(first + i, payload_size=payload_size) for i in range(count)]


def run_batch(store: Store, *steps: Callable[[WriteBatch], object]) -> None:
    """Run ``steps`` on one batch (so a test can expect the whole batch to raise)."""
    with store.write() as batch:
        for step in steps:
            step(batch)


REPO = Path(__file__).resolve().parents[2]


def run_python(script: str, *args: object) -> subprocess.CompletedProcess[str]:
    """``script`` run by a child Python in the repository (``sys.argv[1:]`` = ``args``),
    its output captured; never raises for its exit status."""
    return subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
