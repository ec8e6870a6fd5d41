"""Deliberately broken components, to show the invariant checker catches real bugs.

Each fault is a :data:`~simulations.simnode.CoreHook`: given a node's freshly built cores,
it swaps one core's class for a broken subclass (same state, one behaviour wrong). Use
``--fault NAME`` (or ``SimConfig(fault=NAME)``); never in a real node.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from enclave_keys.errors import ScenarioError
from enclave_keys.events import Event, RoundComplete, RoundFailed, StoredEvent
from enclave_keys.node import _Cores
from enclave_keys.round_cipher import RoundCipherCore
from enclave_keys.router import RouterCore
from simulations.simnode import CoreHook


class ForgetfulRoundCipher(RoundCipherCore):
    """Forgets to purge: ``RoundComplete`` leaves the key stored and held."""

    def handle(self, stored: StoredEvent) -> Sequence[Event]:
        if isinstance(stored.payload, RoundComplete):
            return ()
        return super().handle(stored)


class DeafRouter(RouterCore):
    """Ignores timeouts: a timed-out round (even the reaper's) is never completed."""

    def handle(self, stored: StoredEvent) -> Sequence[Event]:
        event = stored.payload
        if isinstance(event, RoundFailed) and event.reason.is_timeout:
            return ()
        return super().handle(stored)


def _forgetful_cipher(cores: _Cores) -> None:
    cores.round_cipher.__class__ = ForgetfulRoundCipher


def _deaf_router(cores: _Cores) -> None:
    cores.router.__class__ = DeafRouter


FAULTS: Final[dict[str, CoreHook]] = {
    "forgetful-cipher": _forgetful_cipher,
    "deaf-router": _deaf_router,
}


def fault_hook(name: str | None) -> CoreHook | None:
    if name is None:
        return None
    try:
        return FAULTS[name]
    except KeyError:
        raise ScenarioError(f"unknown fault {name!r}; known: {', '.join(FAULTS)}") from None
