"""Every runtime test must leave no Pykka actor running (each test stops exactly its own)."""

from __future__ import annotations

from collections.abc import Iterator

import pykka
import pytest


@pytest.fixture(autouse=True)
def no_leaked_actors() -> Iterator[None]:
    before = set(pykka.ActorRegistry.get_all())
    yield
    leaked = [ref for ref in pykka.ActorRegistry.get_all() if ref not in before]
    for ref in leaked:
        ref.stop(block=True, timeout=5.0)
    assert not leaked, f"actors left running: {leaked}"
