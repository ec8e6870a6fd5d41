"""Identifier value types: round ids, key ids, event ids, KEK versions and storage epochs.

Each is a small frozen value that validates itself on construction, so a malformed id
is rejected at the edge (with :class:`~enclave_keys.errors.InvalidIdentifier`) instead
of deep inside a transaction. Each has one canonical byte form used in associated data
and storage keys.
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from typing import ClassVar, Final, Self

from enclave_keys.errors import InvalidIdentifier

ROUND_ID_FORM: Final = r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}"
"""What a round id's text must match in full (its bytes are that text, ASCII)."""
_ROUND_ID_PATTERN = re.compile(ROUND_ID_FORM)


@dataclass(frozen=True, slots=True)
class RoundId:
    """Names one protocol round (an E3, a signing session, ...).

    1 to 128 ASCII characters from ``[A-Za-z0-9._:-]``, starting alphanumeric, so it is
    safe in file names, log fields and storage keys.
    """

    value: str

    MAX_LENGTH: ClassVar[int] = 128

    def __post_init__(self) -> None:
        if not isinstance(self.value, str) or _ROUND_ID_PATTERN.fullmatch(self.value) is None:
            raise InvalidIdentifier(
                "round id must be 1-128 characters of [A-Za-z0-9._:-], starting alphanumeric"
            )

    # Round ids key most of a node's maps, so these two are spelled out: the same
    # results as the generated ones, without building a 1-tuple per call.
    def __eq__(self, other: object) -> bool:
        if other.__class__ is self.__class__:
            return self.value == other.value
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.value)

    # Ordered by value. Snapshots sort every live round id; the generated comparisons
    # built two 1-tuples per comparison, which made that sort ~10x slower.
    def __lt__(self, other: object) -> bool:
        if other.__class__ is self.__class__:
            return self.value < other.value
        return NotImplemented

    def __le__(self, other: object) -> bool:
        if other.__class__ is self.__class__:
            return self.value <= other.value
        return NotImplemented

    def __gt__(self, other: object) -> bool:
        if other.__class__ is self.__class__:
            return self.value > other.value
        return NotImplemented

    def __ge__(self, other: object) -> bool:
        if other.__class__ is self.__class__:
            return self.value >= other.value
        return NotImplemented

    def to_bytes(self) -> bytes:
        """The canonical encoding (ASCII), used in storage keys and associated data."""
        return self.value.encode("ascii")

    @classmethod
    def from_bytes(cls, raw: bytes) -> RoundId:
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            raise InvalidIdentifier("round id bytes are not ASCII") from None
        return cls(text)

    def __str__(self) -> str:
        return self.value


def by_round_id(item: tuple[RoundId, object]) -> str:
    """Sort key of a ``(round id, value)`` pair: the id's text, so that sorting a map's
    items is a plain string sort (what snapshots of many live rounds do)."""
    return item[0].value


@dataclass(frozen=True, slots=True, order=True)
class _Opaque16:
    """Base for 16-byte opaque identifiers."""

    raw: bytes

    SIZE: ClassVar[int] = 16
    KIND: ClassVar[str] = "identifier"

    def __post_init__(self) -> None:
        if not isinstance(self.raw, bytes) or len(self.raw) != self.SIZE:
            raise InvalidIdentifier(f"{self.KIND} must be exactly {self.SIZE} bytes")

    @classmethod
    def random(cls, rng: random.Random | None = None) -> Self:
        """A fresh id: from the OS CSPRNG, or from ``rng`` for deterministic simulations."""
        raw = os.urandom(cls.SIZE) if rng is None else rng.randbytes(cls.SIZE)
        return cls(raw)

    @classmethod
    def from_hex(cls, text: str) -> Self:
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            raise InvalidIdentifier(f"{cls.KIND} is not hexadecimal") from None
        return cls(raw)

    def hex(self) -> str:
        return self.raw.hex()

    def __str__(self) -> str:
        return self.raw.hex()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.raw.hex()!r})"


@dataclass(frozen=True, slots=True, order=True, repr=False)
class KeyId(_Opaque16):
    """Names one round key (a DEK). Random, not derived from the key; safe to log."""

    KIND: ClassVar[str] = "key id"


@dataclass(frozen=True, slots=True, order=True, repr=False)
class EventId(_Opaque16):
    """Names one event in the log (also used as causation and correlation id)."""

    KIND: ClassVar[str] = "event id"


@dataclass(frozen=True, slots=True, order=True)
class KekVersion:
    """Version number of a key-encryption key in the keyring: 1 to 2**32 - 1."""

    number: int

    MAX: ClassVar[int] = 2**32 - 1

    def __post_init__(self) -> None:
        if (
            not isinstance(self.number, int)
            or isinstance(self.number, bool)
            or not 1 <= self.number <= self.MAX
        ):
            raise InvalidIdentifier("KEK version must be an integer from 1 to 2**32 - 1")

    def to_bytes(self) -> bytes:
        """Four bytes, big-endian: the form used in envelopes and associated data."""
        return self.number.to_bytes(4, "big")

    @classmethod
    def from_bytes(cls, raw: bytes) -> KekVersion:
        if len(raw) != 4:
            raise InvalidIdentifier("KEK version must be encoded in exactly 4 bytes")
        return cls(int.from_bytes(raw, "big"))

    def next(self) -> KekVersion:
        return KekVersion(self.number + 1)

    def __str__(self) -> str:
        return f"v{self.number}"


@dataclass(frozen=True, slots=True, order=True)
class EpochNumber:
    """Number of a storage epoch (the key that wraps round keys at rest): 1 to 2**64 - 1.

    Each ratchet makes the next number; a number is never reused.
    """

    number: int

    MAX: ClassVar[int] = 2**64 - 1

    def __post_init__(self) -> None:
        if (
            not isinstance(self.number, int)
            or isinstance(self.number, bool)
            or not 1 <= self.number <= self.MAX
        ):
            raise InvalidIdentifier("epoch number must be an integer from 1 to 2**64 - 1")

    def to_bytes(self) -> bytes:
        """Eight bytes, big-endian: the form used in wrapped keys and the slot file."""
        return self.number.to_bytes(8, "big")

    @classmethod
    def from_bytes(cls, raw: bytes) -> EpochNumber:
        if len(raw) != 8:
            raise InvalidIdentifier("epoch number must be encoded in exactly 8 bytes")
        return cls(int.from_bytes(raw, "big"))

    def next(self) -> EpochNumber:
        return EpochNumber(self.number + 1)

    def __str__(self) -> str:
        return f"e{self.number}"
