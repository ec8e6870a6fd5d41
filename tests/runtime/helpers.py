"""Toy handlers and a store with injectable failures, shared by the runtime tests."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from enclave_keys.errors import StoreError
from enclave_keys.events import (
    Event,
    FailureReason,
    RoundFailed,
    RoundRequested,
    RoundStage,
    RoundStageChanged,
    StoredEvent,
)
from enclave_keys.ids import RoundId
from enclave_keys.store import MemoryStore
from enclave_keys.store.api import PreparedBatch, WriteBatch

WAIT = 5.0
"""Upper bound of every wait in these tests (they finish far sooner)."""

SECRET_MESSAGE = "the-secret-in-an-exception-message"


def requested(round_id: str = "e3:1", deadline: float = 1_700_000_600.0) -> RoundRequested:
    return RoundRequested(
        round_id=RoundId(round_id), deadline=deadline, threshold=2, committee_size=3
    )


def stage(round_id: str, to: RoundStage) -> RoundStageChanged:
    return RoundStageChanged(round_id=RoundId(round_id), stage=to)


class Boom(Exception):
    """What the exploding handlers raise (with a message that must never be logged)."""


class Recorder:
    """Records every event it is given (and the thread it ran on); publishes nothing."""

    def __init__(
        self, name: str = "recorder", subscriptions: tuple[type[Event], ...] | None = None
    ) -> None:
        self.name = name
        self.subscriptions = subscriptions
        self.seen: list[StoredEvent] = []
        self.threads: set[int] = set()

    @property
    def sequences(self) -> list[int]:
        return [stored.sequence for stored in self.seen]

    def handle(self, stored: StoredEvent) -> Sequence[Event]:
        self.seen.append(stored)
        self.threads.add(threading.get_ident())
        return []


class Answerer(Recorder):
    """Answers each RoundRequested with RoundStageChanged(committee_formation)."""

    def __init__(self, name: str = "answerer") -> None:
        super().__init__(name, (RoundRequested,))

    def handle(self, stored: StoredEvent) -> Sequence[Event]:
        super().handle(stored)
        assert isinstance(stored.payload, RoundRequested)
        return [stage(str(stored.payload.round_id), RoundStage.COMMITTEE_FORMATION)]


class Escalator(Recorder):
    """Answers committee_formation with key_generation: a second hop for causal chains."""

    def __init__(self, name: str = "escalator") -> None:
        super().__init__(name, (RoundStageChanged,))

    def handle(self, stored: StoredEvent) -> Sequence[Event]:
        super().handle(stored)
        payload = stored.payload
        assert isinstance(payload, RoundStageChanged)
        if payload.stage is RoundStage.COMMITTEE_FORMATION:
            return [stage(str(payload.round_id), RoundStage.KEY_GENERATION)]
        return []


class Runaway(Recorder):
    """Answers every stage change with another: never idle on its own."""

    def __init__(self, name: str = "runaway") -> None:
        super().__init__(name, (RoundRequested, RoundStageChanged))

    def handle(self, stored: StoredEvent) -> Sequence[Event]:
        super().handle(stored)
        round_id = stored.round_id
        assert round_id is not None
        return [stage(str(round_id), RoundStage.COMPUTE)]


class Exploder(Recorder):
    """Raises :class:`Boom` for events of the given rounds (every event if ``None``)."""

    def __init__(
        self,
        name: str = "exploder",
        subscriptions: tuple[type[Event], ...] | None = (RoundRequested,),
        rounds: frozenset[str] | None = None,
    ) -> None:
        super().__init__(name, subscriptions)
        self.rounds = rounds

    def handle(self, stored: StoredEvent) -> Sequence[Event]:
        super().handle(stored)
        if self.rounds is None or str(stored.round_id) in self.rounds:
            raise Boom(SECRET_MESSAGE)
        return []


class BadReturner(Recorder):
    """Returns something that is not a sequence of events."""

    def __init__(self) -> None:
        super().__init__("bad_returner", (RoundRequested,))

    def handle(self, stored: StoredEvent) -> Sequence[Event]:
        super().handle(stored)
        return ["not an event"]  # type: ignore[list-item]


class Ticker:
    """A ticking handler: on each tick, fails the given round with a timeout (or raises)."""

    def __init__(self, round_id: str = "e3:1", *, explode: bool = False) -> None:
        self.name = "ticker"
        self.subscriptions: tuple[type[Event], ...] = ()
        self.round_id = RoundId(round_id)
        self.explode = explode
        self.ticks: list[float] = []

    def handle(self, stored: StoredEvent) -> Sequence[Event]:
        raise AssertionError("subscribed to nothing")

    def tick(self, now: float) -> Sequence[Event]:
        self.ticks.append(now)
        if self.explode:
            raise Boom(SECRET_MESSAGE)
        return [
            RoundFailed(
                round_id=self.round_id,
                failed_at=RoundStage.REQUESTED,
                reason=FailureReason.DEADLINE_EXCEEDED,
            )
        ]


class FlakyStore(MemoryStore):
    """A MemoryStore that counts commits, can fail chosen ones, and can hold the first.

    ``fail_commits`` holds 1-based numbers of commit *attempts* that raise
    :class:`StoreError` (writing nothing). With ``hold_first`` set, the first attempt
    (or attempt number ``hold_at``) sets ``held`` and waits for ``release``.
    """

    def __init__(self, *, hold_first: bool = False, hold_at: int = 1) -> None:
        super().__init__()
        self.attempts = 0
        self.commits = 0
        self.fail_commits: set[int] = set()
        self.hold_first = hold_first
        self.hold_at = hold_at
        self.held = threading.Event()
        self.release = threading.Event()

    def fail_attempt(self, *numbers: int) -> None:
        """Make the given attempts (counted from the next one, 1-based) fail."""
        self.fail_commits.update(self.attempts + n for n in numbers)

    def _commit(self, batch: PreparedBatch) -> None:
        self.attempts += 1
        if self.hold_first and self.attempts == self.hold_at:
            self.held.set()
            assert self.release.wait(WAIT), "the test never released the held commit"
        if self.attempts in self.fail_commits:
            raise StoreError("injected store failure")
        super()._commit(batch)
        self.commits += 1


class SettledWrite:
    """A staged write that writes nothing and records how it was settled."""

    def __init__(self) -> None:
        self.settled: list[bool] = []

    def apply(self, batch: WriteBatch) -> None:
        pass

    def settle(self, committed: bool) -> None:
        self.settled.append(committed)


class Stager(Recorder):
    """A staging handler: for each ``RoundRequested``, a stage change and one staged write.

    It blocks on its first event (setting ``entered``) until ``release`` is set."""

    def __init__(self, name: str = "stager") -> None:
        super().__init__(name, (RoundRequested,))
        self.writes: list[SettledWrite] = []
        self._queued: list[SettledWrite] = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def stage_writes(self) -> None:
        pass

    def take_writes(self) -> tuple[SettledWrite, ...]:
        queued, self._queued = tuple(self._queued), []
        return queued

    def handle(self, stored: StoredEvent) -> Sequence[Event]:
        if not self.entered.is_set():
            self.entered.set()
            assert self.release.wait(WAIT), "the test never released the stager"
        super().handle(stored)
        write = SettledWrite()
        self.writes.append(write)
        self._queued.append(write)
        assert stored.round_id is not None
        return [stage(stored.round_id.value, RoundStage.COMMITTEE_FORMATION)]
