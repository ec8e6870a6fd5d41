"""Checks that need a running node (memory, not just log and store).

* ``live_keys_usable`` — every live keyed round's cipher is in its context under the key
  id the log announced, and its keyshare (if made) opens under it;
* ``ended_keys_wiped`` — no cipher is held for a round that is not live;
* ``replay_agrees`` — the log's projection (:mod:`enclave_keys.replay`) and the node's
  router agree on which rounds are live.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Final

from enclave_keys.errors import EnclaveKeysError
from enclave_keys.ids import RoundId
from enclave_keys.invariants import Violation
from enclave_keys.keyshare import KEYSHARE_PURPOSE
from enclave_keys.node import Node
from enclave_keys.replay import LogState
from enclave_keys.round_cipher import ROUND_CIPHER

NODE_CHECKS: Final = ("live_keys_usable", "ended_keys_wiped", "replay_agrees")


def check_node(
    state: LogState,
    node: Node,
    *,
    rounds: Collection[RoundId] | None = None,
    open_keyshares: bool = False,
) -> list[Violation]:
    """The in-memory checks for ``rounds`` (default: every round the log or node knows)."""
    found: list[Violation] = []
    held = set(node.round_cipher.held_rounds())
    chosen = sorted(set(state.rounds) | held) if rounds is None else sorted(rounds)
    for rid in chosen:
        view = state.rounds.get(rid)
        live_key = None if view is None or not view.is_live else view.current_key
        if (view is None or not view.is_live) and node.round_cipher.cipher_of(rid) is not None:
            found.append(
                Violation("ended_keys_wiped", "ended round's cipher still held", rid.value)
            )
            continue
        if live_key is None:
            continue
        context = node.registry.get(rid)
        leased = None if context is None else context.get(ROUND_CIPHER)
        if leased is None or leased.key_id.hex() != live_key:
            found.append(
                Violation(
                    "live_keys_usable", "live round's cipher is not in its context", rid.value
                )
            )
            continue
        share = node.keyshare.keyshare_of(rid) if open_keyshares else None
        if share is not None:
            try:
                with leased.lease() as cipher:
                    cipher.open(KEYSHARE_PURPOSE, share[1])
            except EnclaveKeysError as exc:
                found.append(
                    Violation(
                        "live_keys_usable",
                        f"keyshare does not open ({type(exc).__name__})",
                        rid.value,
                    )
                )
    if rounds is None:
        logged = set(state.live_rounds())
        routed = set(node.router.open_rounds())
        for rid in sorted(logged ^ routed):
            side = "the log" if rid in logged else "the router"
            found.append(Violation("replay_agrees", f"live only according to {side}", rid.value))
    return found
