"""Validating the plain msgpack-able state a core's ``snapshot_state()`` returns, when a
node restores it.

:class:`StateReader` checks the outer map and its version, then reads fields one by one;
every check that fails raises :class:`~enclave_keys.errors.CorruptRecord` with a message
prefixed by what is being read (``"router snapshot: unknown stage"``).

A snapshot names every live round several times (router, reaper, keyshare). The readers
of one restore can share a :data:`KnownRoundIds` table: each distinct round id text is
then validated and built into a :class:`~enclave_keys.ids.RoundId` once, and the cores
share that one object.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Final, TypeAlias, TypeVar

from enclave_keys.errors import CorruptRecord, InvalidIdentifier
from enclave_keys.events import MAX_CIPHERTEXT_LEN, RoundStage
from enclave_keys.ids import KeyId, RoundId

__all__ = ["DEFAULT_HORIZON", "KnownRoundIds", "RecentRounds", "StateReader"]

_T = TypeVar("_T")

KnownRoundIds: TypeAlias = dict[str, RoundId]
"""Round ids already validated, by their text (see the module docstring)."""

_STAGES: Final[dict[str, RoundStage]] = {stage.value: stage for stage in RoundStage}


class StateReader:
    """Reads a core's snapshot ``state``: a map whose ``"version"`` is ``version``.

    ``what`` names it in error messages (``"keyshare snapshot"``). ``round_ids``: a table
    shared with the other readers of the same restore (a fresh one by default).
    """

    __slots__ = ("_data", "_round_ids", "_what")

    def __init__(
        self,
        what: str,
        state: object,
        *,
        version: int,
        round_ids: KnownRoundIds | None = None,
    ) -> None:
        self._what = what
        self._round_ids: KnownRoundIds = {} if round_ids is None else round_ids
        self._data = self.map(state)
        if self._data.get("version") != version:
            raise self.corrupt("unknown version")

    def corrupt(self, problem: str) -> CorruptRecord:
        """The error for ``problem``, to raise."""
        return CorruptRecord(f"{self._what}: {problem}")

    def items(self, name: str) -> list[object]:
        """The field ``name`` of the state, which must be a list (or tuple)."""
        value = self._data.get(name)
        if not isinstance(value, list | tuple):
            raise self.corrupt(f"{name!r} must be a list")
        return list(value)

    def map(self, value: object) -> Mapping[str, Any]:
        if type(value) is dict:  # what msgpack gives: skip the slower ABC check
            return value
        if not isinstance(value, Mapping):
            raise self.corrupt("expected a map")
        return value

    def round_id(self, value: object) -> RoundId:
        if type(value) is str:  # what msgpack gives; a str subclass is never a table key
            known = self._round_ids.get(value)
            if known is None:
                known = self._round_ids[value] = self._new_round_id(value)
            return known
        if not isinstance(value, str):
            raise self.corrupt("round id must be text")
        return self._new_round_id(value)

    def _new_round_id(self, value: str) -> RoundId:
        try:
            return RoundId(value)
        except InvalidIdentifier:
            raise self.corrupt("malformed round id") from None

    def key_id(self, value: object) -> KeyId:
        """A key id written as hex text."""
        try:
            if isinstance(value, str):
                return KeyId.from_hex(value)
        except InvalidIdentifier:
            pass
        raise self.corrupt("malformed key id")

    def ciphertext(self, value: object) -> bytes:
        """Non-empty bytes, at most :data:`~enclave_keys.events.MAX_CIPHERTEXT_LEN` long."""
        if not isinstance(value, bytes) or not 1 <= len(value) <= MAX_CIPHERTEXT_LEN:
            raise self.corrupt("ciphertext must be bytes")
        return value

    def stage(self, value: object) -> RoundStage:
        stage = _STAGES.get(value) if isinstance(value, str) else None
        if stage is None:
            raise self.corrupt("unknown stage")
        return stage

    def finite(self, value: object, name: str) -> float:
        """An int or float (not a bool) that is finite."""
        if type(value) is float and math.isfinite(value):  # the common case, first
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.corrupt(f"{name} must be a number")
        if not math.isfinite(value):
            raise self.corrupt(f"{name} must be finite")
        return float(value)

    def flag(self, value: object, name: str) -> bool:
        if not isinstance(value, bool):
            raise self.corrupt(f"{name!r} must be a boolean")
        return value

    def unique(self, entries: Iterable[tuple[RoundId, _T]]) -> dict[RoundId, _T]:
        """``entries`` as a dict, in order; fails if a round is listed twice."""
        found: dict[RoundId, _T] = {}
        for rid, value in entries:
            if rid in found:
                raise self.corrupt("a round is listed twice")
            found[rid] = value
        return found


DEFAULT_HORIZON: Final = 100_000
"""How many of the most recently ended rounds a core remembers (for late events)."""


class RecentRounds:
    """An insertion-ordered set of the ``horizon`` most recently added round ids.

    Cores use it to remember which rounds ended, so that events arriving late (or, on
    threaded runtimes, in a different order across actors) are recognised. Adding an id
    again moves it to the newest end; the oldest is forgotten past the horizon.
    """

    __slots__ = ("_horizon", "_ids")

    def __init__(self, horizon: int = DEFAULT_HORIZON, rounds: Iterable[RoundId] = ()) -> None:
        """``rounds`` are added in order, as by :meth:`add` one by one."""
        if not isinstance(horizon, int) or isinstance(horizon, bool) or horizon < 1:
            raise ValueError("horizon must be a positive int")
        self._horizon = horizon
        ids: OrderedDict[RoundId, None] = OrderedDict()
        for rid in rounds:
            ids.pop(rid, None)
            ids[rid] = None
        # Trimming once at the end keeps the same ids as trimming after each add: the
        # ``horizon`` most recently added.
        while len(ids) > horizon:
            ids.popitem(last=False)
        self._ids = ids

    @property
    def horizon(self) -> int:
        return self._horizon

    def add(self, round_id: RoundId) -> None:
        # An OrderedDict forgets its oldest entry in O(1). A plain dict did not: finding
        # its first live entry walks past every entry deleted since its last resize, which
        # at the default horizon cost ~40 µs per add once a node had seen 100,000 rounds.
        ids = self._ids
        if round_id in ids:
            ids.move_to_end(round_id)
            return
        ids[round_id] = None
        if len(ids) > self._horizon:
            ids.popitem(last=False)

    def add_first(self, round_id: RoundId) -> None:
        """:meth:`add`, unless ``round_id`` is remembered already: it keeps the place of
        its first addition. For a round's end, which a late duplicate must not make newer
        here than in the router (the cores would forget different rounds at the horizon)."""
        if round_id not in self._ids:
            self.add(round_id)

    def discard(self, round_id: RoundId) -> None:
        """Forget ``round_id`` (if remembered): its id is in use again."""
        self._ids.pop(round_id, None)

    def __contains__(self, round_id: object) -> bool:
        return round_id in self._ids

    def __iter__(self) -> Iterator[RoundId]:
        """Oldest first."""
        return iter(list(self._ids))

    def __len__(self) -> int:
        return len(self._ids)

    def __repr__(self) -> str:
        return f"RecentRounds({len(self._ids)} of {self._horizon})"
