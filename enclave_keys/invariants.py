"""The invariant checker: the properties of design §7, checked on a log and a store.

Used by the simulator (during and after a run) and by ``enclave-keys replay``. Checks are
named; each finding is a :class:`Violation` naming the check, the node, the round and the
log sequences involved — never bytes.

On a :class:`~enclave_keys.replay.LogState` (the log alone):

* ``opened_once`` — a round is opened at most once;
* ``one_outcome`` — an ended round ended exactly once, with exactly one outcome;
* ``failures_end_rounds`` — a timeout (or other non-misbehaviour) failure of a live round
  is followed by its ``RoundComplete``;
* ``ended_keys_purged`` — every key announced for an ended round was purged;
* ``purged_once`` — no key is purged twice;
* ``no_use_after_purge`` — nothing is sealed under a key after its purge;
* ``keyshare_under_round_key`` — a keyshare names its round's own key;
* ``log_contiguous`` — sequences run 1, 2, 3, … without a gap;
* ``reaper_bound`` (only when ``now`` and ``grace`` are given) — no round is still live
  past ``deadline + grace`` at ``now`` (the time of the last reaper tick);
* ``no_key_material`` — the only bytes in any event are fields named ``ciphertext``; with
  ``secrets`` (the raw keys and keyshares a simulation's entropy source handed out), none
  of them occurs anywhere in the encoded log.

With the node's :class:`~enclave_keys.store.Store` as well (:func:`check_store`):

* ``live_keys_stored`` — every live keyed round has its key in ``round_keys``, under the
  key id the log announced (a live round's key is never lost);
* ``ended_keys_absent`` — no ``round_keys`` record for a round that is not live (ended
  round keys are purged);
* ``no_key_material`` — with ``secrets``: none occurs in a snapshot or in a stored blob.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import dataclass, fields
from typing import Any, Final

from enclave_keys.codec import encode_event
from enclave_keys.crypto import read_wrapped_header
from enclave_keys.errors import EnclaveKeysError
from enclave_keys.events import StoredEvent
from enclave_keys.ids import RoundId
from enclave_keys.replay import LogState, RoundView
from enclave_keys.store import Store

__all__ = [
    "LOG_CHECKS",
    "STORE_CHECKS",
    "SecretScanner",
    "Violation",
    "check_events",
    "check_log",
    "check_round",
    "check_store",
    "key_id_of_blob",
    "summarise",
]

LOG_CHECKS: Final = (
    "opened_once",
    "one_outcome",
    "failures_end_rounds",
    "ended_keys_purged",
    "purged_once",
    "no_use_after_purge",
    "keyshare_under_round_key",
    "log_contiguous",
    "reaper_bound",
    "no_key_material",
)
STORE_CHECKS: Final = ("live_keys_stored", "ended_keys_absent")


@dataclass(frozen=True, slots=True)
class Violation:
    """One property that does not hold. Ids and sequences only."""

    check: str
    message: str
    round_id: str | None = None
    node: str | None = None
    sequences: tuple[int, ...] = ()

    def with_node(self, node: str) -> Violation:
        return Violation(self.check, self.message, self.round_id, node, self.sequences)

    def __str__(self) -> str:
        where = " ".join(
            part
            for part in (
                f"node {self.node}" if self.node else "",
                f"round {self.round_id}" if self.round_id else "",
            )
            if part
        )
        return f"[{self.check}] {where + ': ' if where else ''}{self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "check": self.check,
            "message": self.message,
            "round_id": self.round_id,
            "node": self.node,
            "sequences": list(self.sequences),
        }


# --- the log ----------------------------------------------------------------------------


def check_round(
    view: RoundView, *, now: float | None = None, grace: float | None = None
) -> list[Violation]:
    """The log checks that concern one round."""
    found: list[Violation] = []
    rid = view.round_id.value

    def bad(check: str, message: str, sequences: Iterable[int] = ()) -> None:
        found.append(Violation(check, message, rid, None, tuple(sequences)))

    if view.opened > 1:
        bad("opened_once", f"opened {view.opened} times", view.sequences)
    if view.ended > 1 or (view.ended == 1) != (view.outcome is not None):
        bad("one_outcome", f"ended {view.ended} times (outcome {view.outcome})", view.sequences)
    if view.is_live and view.ending_reason is not None:
        seq = () if view.ending_sequence is None else (view.ending_sequence,)
        bad("failures_end_rounds", f"failure {view.ending_reason} did not end the round", seq)
    if view.ended:
        left = view.unpurged_keys
        if left:
            seqs = [view.key_sequence[k] for k in left]
            bad("ended_keys_purged", f"ended, but {len(left)} key(s) never purged", seqs)
    twice = [k for k, n in view.purged.items() if n > 1]
    if twice:
        bad("purged_once", f"{len(twice)} key(s) purged more than once", view.sequences)
    if view.used_after_purge:
        bad("no_use_after_purge", "a keyshare was sealed under a purged key", view.sequences)
    if view.mismatched_keyshares:
        bad("keyshare_under_round_key", "a keyshare names a key the round never had")
    if (
        now is not None
        and grace is not None
        and view.is_live
        and view.deadline is not None
        and view.deadline + grace < now
    ):
        bad("reaper_bound", f"still live {now - view.deadline - grace:.0f} s past deadline + grace")
    return found


def check_log(
    state: LogState,
    *,
    now: float | None = None,
    grace: float | None = None,
    rounds: Collection[RoundId] | None = None,
) -> list[Violation]:
    """The log checks over every round (or only ``rounds``)."""
    found: list[Violation] = []
    if state.out_of_order:
        found.append(
            Violation(
                "log_contiguous",
                f"{len(state.out_of_order)} sequence gap(s)",
                sequences=tuple(state.out_of_order[:10]),
            )
        )
    chosen = sorted(state.rounds) if rounds is None else sorted(rounds)
    for rid in chosen:
        view = state.rounds.get(rid)
        if view is not None:
            found.extend(check_round(view, now=now, grace=grace))
    return found


class SecretScanner:
    """Finds any of a set of secrets (all ``width`` bytes long) inside larger bytes."""

    def __init__(self, secrets: Iterable[bytes], width: int = 32) -> None:
        self._width = width
        self._secrets = frozenset(s for s in secrets if len(s) == width)

    def __len__(self) -> int:
        return len(self._secrets)

    def found_in(self, data: bytes) -> bool:
        width, secrets = self._width, self._secrets
        if not secrets or len(data) < width:
            return False
        view = memoryview(data)
        return any(bytes(view[i : i + width]) in secrets for i in range(len(data) - width + 1))


def check_events(
    events: Iterable[StoredEvent], scanner: SecretScanner | None = None
) -> list[Violation]:
    """``no_key_material`` over stored events (structure, and the secrets if given)."""
    found: list[Violation] = []
    for stored in events:
        payload: Any = stored.payload
        rid = None if stored.round_id is None else stored.round_id.value
        for spec in fields(payload):
            value = getattr(payload, spec.name)
            if isinstance(value, bytes | bytearray | memoryview) and spec.name != "ciphertext":
                found.append(
                    Violation(
                        "no_key_material",
                        f"{stored.tag} carries bytes in field {spec.name!r}",
                        rid,
                        sequences=(stored.sequence,),
                    )
                )
        if scanner is not None and scanner.found_in(encode_event(stored)):
            found.append(
                Violation(
                    "no_key_material",
                    f"{stored.tag} contains raw key material",
                    rid,
                    sequences=(stored.sequence,),
                )
            )
    return found


# --- the store --------------------------------------------------------------------------


def key_id_of_blob(blob: bytes) -> str | None:
    """The key id a wrapped round key names (hex), or ``None`` if the header is unreadable."""
    try:
        return read_wrapped_header(blob)[1].hex()
    except (EnclaveKeysError, ValueError, IndexError):
        return None


def check_store(
    state: LogState,
    store: Store,
    *,
    rounds: Collection[RoundId] | None = None,
    scanner: SecretScanner | None = None,
) -> list[Violation]:
    """The store checks for every round (or only ``rounds``): keys present and absent."""
    found: list[Violation] = []
    if rounds is None:
        stored = dict(store.list_keys())
        chosen = sorted(set(stored) | set(state.rounds))
    else:
        chosen = sorted(rounds)
        stored = {}
        for rid in chosen:
            blob = store.get_key(rid)
            if blob is not None:
                stored[rid] = blob
    for rid in chosen:
        view = state.rounds.get(rid)
        blob = stored.get(rid)
        live_key = None if view is None or not view.is_live else view.current_key
        if blob is not None and (view is None or not view.is_live):
            why = "ended" if view is not None and view.ended else "not live"
            found.append(
                Violation(
                    "ended_keys_absent",
                    f"round is {why} but its key is still stored",
                    rid.value,
                    sequences=() if view is None else tuple(view.sequences[-3:]),
                )
            )
        elif live_key is not None and blob is None:
            found.append(Violation("live_keys_stored", "live round's key is missing", rid.value))
        elif live_key is not None and blob is not None:
            named = key_id_of_blob(blob)
            if named is None:  # garbage: the round's key is lost as surely as if missing
                found.append(
                    Violation("live_keys_stored", "stored key record is unreadable", rid.value)
                )
            elif named != live_key:
                found.append(
                    Violation("live_keys_stored", "stored key is not the announced key", rid.value)
                )
        if scanner is not None and blob is not None and scanner.found_in(blob):
            found.append(Violation("no_key_material", "a stored blob holds a raw key", rid.value))
    if scanner is not None and rounds is None:
        latest = store.latest_snapshot()
        if latest is not None and scanner.found_in(latest[1]):
            found.append(Violation("no_key_material", "a snapshot holds raw key material"))
    return found


def summarise(violations: Iterable[Violation], checks: Iterable[str]) -> dict[str, int]:
    """Violations per check, every named check listed (0 = holds)."""
    counts = Counter(v.check for v in violations)
    result = {name: counts.get(name, 0) for name in checks}
    for name, count in counts.items():
        result.setdefault(name, count)
    return result
