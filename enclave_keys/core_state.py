"""Validating the plain msgpack-able state a core's ``snapshot_state()`` returns, when a
node restores it.

:class:`StateReader` checks the outer map and its version, then reads fields one by one;
every check that fails raises :class:`~enclave_keys.errors.CorruptRecord` with a message
prefixed by what is being read (``"router snapshot: unknown stage"``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from enclave_keys.errors import CorruptRecord, InvalidIdentifier
from enclave_keys.events import MAX_CIPHERTEXT_LEN, RoundStage
from enclave_keys.ids import KeyId, RoundId

__all__ = ["StateReader"]

_T = TypeVar("_T")


class StateReader:
    """Reads a core's snapshot ``state``: a map whose ``"version"`` is ``version``.

    ``what`` names it in error messages (``"keyshare snapshot"``).
    """

    __slots__ = ("_data", "_what")

    def __init__(self, what: str, state: object, *, version: int) -> None:
        self._what = what
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
        if not isinstance(value, Mapping):
            raise self.corrupt("expected a map")
        return value

    def round_id(self, value: object) -> RoundId:
        if not isinstance(value, str):
            raise self.corrupt("round id must be text")
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
        if not isinstance(value, str) or value not in RoundStage._value2member_map_:
            raise self.corrupt("unknown stage")
        return RoundStage(value)

    def finite(self, value: object, name: str) -> float:
        """An int or float (not a bool) that is finite."""
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
