"""Checks that need a running node (memory, not just log and store).

* ``live_keys_usable`` — every live keyed round's cipher is in its context under the key
  id the log announced, and its keyshare (if made) opens under it;
* ``ended_keys_wiped`` — no cipher is held for a round that is not live;
* ``replay_agrees`` — the log's projection (:mod:`enclave_keys.replay`) and the node's
  router agree on which rounds are live;
* ``ended_keys_unrecoverable`` — forward secrecy at rest, on raw bytes: with the node's
  master key, :func:`enclave_keys.testing.forensics.scan_data_dir` recovers no ended
  round's key from any file of its data directory (and every live round's, which shows
  the search works).
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Final

from enclave_keys.crypto import SecretBytes
from enclave_keys.errors import EnclaveKeysError
from enclave_keys.ids import KeyId, RoundId
from enclave_keys.invariants import Violation
from enclave_keys.keyshare import KEYSHARE_PURPOSE
from enclave_keys.node import Node
from enclave_keys.replay import LogState
from enclave_keys.round_cipher import ROUND_CIPHER
from enclave_keys.testing.forensics import scan_data_dir

NODE_CHECKS: Final = (
    "live_keys_usable",
    "ended_keys_wiped",
    "replay_agrees",
    "ended_keys_unrecoverable",
)


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


def check_forensics(
    state: LogState, data_dir: Path, master: SecretBytes, *, kek_versions: int
) -> list[Violation]:
    """Attack ``data_dir``'s raw files with the master key (call after an epoch change).

    ``kek_versions``: how many KEK versions the node ever had (keyrings of up to that
    many entries are tried at every offset)."""
    round_of_key = {
        KeyId.from_hex(key): rid for rid, view in state.rounds.items() for key in view.keys
    }
    report = scan_data_dir(
        data_dir, master, round_of_key=round_of_key, max_kek_versions=kek_versions
    )
    found: list[Violation] = []
    for rid in sorted(report.recovered_rounds):
        view = state.rounds.get(rid)
        if view is None or not view.is_live:
            found.append(
                Violation(
                    "ended_keys_unrecoverable",
                    "an ended round's key is recoverable from the data directory",
                    rid.value,
                )
            )
    for rid in sorted(set(state.live_rounds()) - report.recovered_rounds):
        if state.rounds[rid].current_key is not None:
            found.append(
                Violation(
                    "ended_keys_unrecoverable",
                    "the forensic scan missed a live round's key (the search is broken)",
                    rid.value,
                )
            )
    return found
