"""Round contexts: what the actors of one round share, looked up by typed keys.

The round-cipher actor puts the round's cipher into the context; keyshare actors (and a
node's own actors) resolve it from there. A missing dependency is an error
(:class:`~enclave_keys.errors.MissingDependency`), never a reason to fall back to another
key. A context's snapshot lists which dependencies existed, never their values.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Generic, TypeVar, cast

from enclave_keys.errors import ContextClosed, MissingDependency
from enclave_keys.ids import RoundId

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class DependencyKey(Generic[T]):
    """A typed name for one dependency: ``context.require(ROUND_CIPHER)`` is typed."""

    name: str
    kind: type[T]

    def __repr__(self) -> str:
        return f"DependencyKey({self.name!r})"


class RoundContext:
    """The dependencies of one live round. Thread-safe."""

    __slots__ = ("_closed", "_lock", "_values", "round_id")

    def __init__(self, round_id: RoundId) -> None:
        self.round_id = round_id
        self._lock = threading.Lock()
        self._values: dict[str, object] = {}
        self._closed = False

    def put(self, key: DependencyKey[T], value: T) -> None:
        if not isinstance(value, key.kind):
            raise TypeError(f"dependency {key.name!r} must be a {key.kind.__name__}")
        with self._lock:
            if self._closed:
                raise ContextClosed(f"context of round {self.round_id} is closed")
            self._values[key.name] = value

    def get(self, key: DependencyKey[T]) -> T | None:
        with self._lock:
            return cast("T | None", self._values.get(key.name))

    def require(self, key: DependencyKey[T]) -> T:
        with self._lock:
            if self._closed:
                raise ContextClosed(f"context of round {self.round_id} is closed")
            value = self._values.get(key.name)
        if value is None:
            raise MissingDependency(f"round {self.round_id} has no {key.name}")
        return cast("T", value)

    def remove(self, key: DependencyKey[T]) -> T | None:
        with self._lock:
            return cast("T | None", self._values.pop(key.name, None))

    def dependency_names(self) -> tuple[str, ...]:
        """Which dependencies exist, sorted: what a snapshot records (never values)."""
        with self._lock:
            return tuple(sorted(self._values))

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Tear down: drop every dependency. Owners wipe their own secrets first."""
        with self._lock:
            self._closed = True
            self._values.clear()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"deps={list(self.dependency_names())}"
        return f"RoundContext({self.round_id}, {state})"


class ContextRegistry:
    """The open round contexts of a node, shared by its actors. Thread-safe."""

    __slots__ = ("_contexts", "_lock")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._contexts: dict[RoundId, RoundContext] = {}

    def open(self, round_id: RoundId) -> RoundContext:
        """The round's context, created if it is not open yet."""
        with self._lock:
            ctx = self._contexts.get(round_id)
            if ctx is None:
                ctx = self._contexts[round_id] = RoundContext(round_id)
            return ctx

    def get(self, round_id: RoundId) -> RoundContext | None:
        with self._lock:
            return self._contexts.get(round_id)

    def close(self, round_id: RoundId) -> RoundContext | None:
        """Remove and close the round's context; ``None`` when it was not open."""
        with self._lock:
            ctx = self._contexts.pop(round_id, None)
        if ctx is not None:
            ctx.close()
        return ctx

    def round_ids(self) -> list[RoundId]:
        with self._lock:
            return sorted(self._contexts)

    def snapshot(self) -> dict[str, tuple[str, ...]]:
        """Round id → names of its dependencies. Contains no dependency values."""
        with self._lock:
            contexts = list(self._contexts.values())
        return {str(c.round_id): c.dependency_names() for c in contexts}

    def __len__(self) -> int:
        with self._lock:
            return len(self._contexts)
