from __future__ import annotations

import threading

import pytest

from enclave_keys.clock import Clock, ManualClock, SystemClock


def test_both_clocks_satisfy_the_protocol() -> None:
    assert isinstance(SystemClock(), Clock)
    assert isinstance(ManualClock(), Clock)


def test_manual_clock_moves_only_when_told() -> None:
    clock = ManualClock(start=100.0)
    assert clock.now() == 100.0
    assert clock.now() == 100.0
    assert clock.advance(2.5) == 102.5
    clock.set(200.0)
    assert clock.now() == 200.0


def test_manual_clock_never_goes_backwards() -> None:
    clock = ManualClock(start=100.0)
    with pytest.raises(ValueError, match="backwards"):
        clock.advance(-1)
    with pytest.raises(ValueError, match="backwards"):
        clock.set(99.0)
    assert clock.now() == 100.0


def test_manual_clock_is_safe_across_threads() -> None:
    clock = ManualClock(start=0.0)

    def tick() -> None:
        for _ in range(1000):
            clock.advance(1.0)

    threads = [threading.Thread(target=tick) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert clock.now() == 4000.0


def test_system_clock_reads_a_plausible_wall_time() -> None:
    assert SystemClock().now() > 1_600_000_000
