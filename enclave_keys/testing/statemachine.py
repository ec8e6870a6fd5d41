"""A Hypothesis state machine over a whole node, for you to extend with your own actors.

:class:`NodeStateMachine` runs a real :class:`~enclave_keys.node.Node` (the deterministic,
seeded runtime; a real LMDB directory in a temporary directory; a
:class:`~enclave_keys.clock.ManualClock`) and drives it with rules: request rounds, change
stages, fail them for any :class:`~enclave_keys.events.FailureReason`, complete them,
publish duplicate, late and reordered terminal events, move the clock past deadlines and
tick, restart cleanly, crash (with and without events in the log that no actor has seen),
rotate the KEK, write garbage into stored round keys, and seal and open data with round
ciphers and keyshares. A simple model tracks which rounds are live and which have ended;
after every step the design's invariants (``design.md`` §7) are checked against it:

* the router's live rounds are exactly the model's;
* every live round has its stored key and a cipher in its context that seals and opens,
  and a keyshare that opens under it;
* an ended round has no stored key, no context and no cipher;
* every event in the log is well formed: no ``bytes`` field other than a ``ciphertext``,
  no ``HandlerFailed``.

Use it as is::

    TestMyNode = NodeStateMachine.TestCase

or subclass it: add ``@rule``/``@invariant`` methods of your own, give the node your own
actors with :meth:`NodeStateMachine.make_actors` (the machine delivers every new log
event to them after each step and publishes what they return), or change how the node is
built with the other hooks (:meth:`~NodeStateMachine.open_store`,
:meth:`~NodeStateMachine.make_unseal`, :meth:`~NodeStateMachine.open_node`,
:attr:`~NodeStateMachine.node_config`). Requires Hypothesis (the ``test`` extra).
"""

from __future__ import annotations

import random
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Final

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from enclave_keys.clock import ManualClock
from enclave_keys.errors import EnclaveKeysError, UnwrapFailed
from enclave_keys.events import (
    DecryptionShareCreated,
    DecryptionShareRequested,
    Event,
    FailureReason,
    FieldKind,
    HandlerFailed,
    RoundAlreadyCompleted,
    RoundComplete,
    RoundFailed,
    RoundRequested,
    RoundStage,
    RoundStageChanged,
    StoredEvent,
)
from enclave_keys.handler import Handler
from enclave_keys.ids import EventId, RoundId
from enclave_keys.keyshare import DECRYPTION_SHARE_PURPOSE, KEYSHARE_PURPOSE
from enclave_keys.node import NODE_SOURCE, Node, NodeConfig
from enclave_keys.round_cipher import ROUND_CIPHER, LeasedRoundCipher
from enclave_keys.store import LmdbStore, Store
from enclave_keys.testing.fakes import FixedKeyUnseal
from enclave_keys.testing.strategies import failure_reasons, round_stages, terminal_events
from enclave_keys.unseal import UnsealSource

__all__ = ["ModelRound", "NodeStateMachine", "machine_stats"]

T0: Final = 1_700_000_000.0
_PURPOSES: Final = ("keyshare", "decryption-share", "app.data")
_PICK: Final = st.integers(0, 255)  # an index into the machine's round_pool


@dataclass
class ModelRound:
    """What the model knows about one round id."""

    deadline: float
    live: bool = True
    corrupted: bool = False  # its stored key was overwritten with garbage


@dataclass
class _Stats:
    machines: int = 0
    steps: int = 0
    restarts: int = 0
    crashes: int = 0
    rotations: int = 0
    corruptions: int = 0


_STATS: dict[type, _Stats] = {}


def machine_stats(machine: type[NodeStateMachine] | None = None) -> dict[str, int]:
    """Counts of the runs of ``machine`` (a class; ``None``: every class) in this process:
    machines (= examples, shrinking included), steps, restarts, crashes, KEK rotations,
    corrupted blobs. For reports."""
    total = _Stats()
    for cls, stats in _STATS.items():
        if machine is None or cls is machine:
            for name, value in vars(stats).items():
                setattr(total, name, getattr(total, name) + value)
    return dict(vars(total))


class NodeStateMachine(RuleBasedStateMachine):
    """A whole node under random operations, checked against a model. See the module doc.

    Class attributes to tune in a subclass: :attr:`round_pool` (round ids the rules draw
    from; a small pool makes duplicates and late events common), :attr:`node_config`,
    :attr:`start_time`, :attr:`unseal_seed`, :attr:`temp_root`.
    """

    round_pool: ClassVar[tuple[str, ...]] = ("r0", "r1", "r2", "r3", "r4")
    node_config: ClassVar[NodeConfig] = NodeConfig(
        runtime="deterministic",
        seed=7,
        snapshot_every=11,
        reaper_grace=5.0,
        lease_timeout=1.0,
        idle_timeout=5.0,
        harden=False,
    )
    start_time: ClassVar[float] = T0
    unseal_seed: ClassVar[int | str | bytes] = "node-state-machine"
    temp_root: ClassVar[str | None] = None  # where the data directory goes (None: $TMPDIR)
    stray_complete_before_request: ClassVar[bool] = True
    """Whether rules may publish ``RoundComplete`` for a round id never requested before
    (a late or misrouted terminal event). Turn it off to keep a machine's examples to
    in-order lives."""

    def __init__(self) -> None:
        super().__init__()
        self.stats = _STATS.setdefault(type(self), _Stats())
        self.stats.machines += 1
        self.data_dir = Path(tempfile.mkdtemp(prefix="enclave-keys-sm-", dir=self.temp_root))
        self.clock = ManualClock(self.start_time)
        self.unseal = self.make_unseal()
        self.rounds: dict[RoundId, ModelRound] = {}
        self.requested_ever: set[RoundId] = set()
        self.orphans: set[RoundId] = set()  # garbage planted under ended rounds' ids
        self.restarts = 0
        self._checked = 0  # log sequence up to which events were checked
        self._pumped = 0  # log sequence up to which actors have been fed
        self.actors: list[Handler] = []
        self.node = self._open()

    # --- hooks ------------------------------------------------------------------------

    def make_unseal(self) -> UnsealSource:
        """The node's unseal source (default: a :class:`FixedKeyUnseal`)."""
        return FixedKeyUnseal(self.unseal_seed)

    def open_store(self, data_dir: Path) -> Store:
        """The store the node runs on (default: LMDB in ``data_dir``). Wrap it to inject
        faults (:class:`~enclave_keys.testing.fakes.FaultyStore`)."""
        return LmdbStore.open(data_dir)

    def open_node(self, store: Store) -> Node:
        """Build and start the node over ``store`` (the node owns and closes it)."""
        node = Node(store, self.unseal, clock=self.clock, config=self.node_config, owns_store=True)
        try:
            node.start()
        except BaseException:
            node.crash()
            raise
        return node

    def make_actors(self, node: Node) -> Sequence[Handler]:
        """Your actors, made afresh at every (re)start of the node (default: none).

        After every step each new log event is delivered to those that subscribe to it
        (in log order) and what they return is published, until nothing new happens. At
        a restart, an actor with a ``replay(stored)`` method is first fed the whole log.
        Resolve round ciphers from ``node.registry``.
        """
        return ()

    # --- the node ---------------------------------------------------------------------

    def _open(self) -> Node:
        node = self.open_node(self.open_store(self.data_dir))
        self.node = node
        self.actors = list(self.make_actors(node))
        for actor in self.actors:
            replay = getattr(actor, "replay", None)
            if callable(replay):
                for stored in node.store.read_events():
                    replay(stored)
        self._pumped = node.store.last_sequence()
        self.settle()
        return node

    def settle(self) -> None:
        """Deliver new log events to the user's actors until nothing new happens."""
        if not self.actors:
            return
        store = self.node.store
        for _ in range(1000):
            new = list(store.read_events(self._pumped + 1))
            if not new:
                return
            self._pumped = new[-1].sequence
            out: list[Event] = []
            for stored in new:
                for actor in self.actors:
                    wanted = actor.subscriptions
                    if wanted is None or isinstance(stored.payload, wanted):
                        out.extend(actor.handle(stored))
            if out:
                self.node.publish(*out)
        raise AssertionError("the actors keep publishing: runaway")

    def publish(self, *events: Event) -> list[StoredEvent]:
        """Publish on the node, then let the user's actors react."""
        stored = self.node.publish(*events)
        self.settle()
        return stored

    def teardown(self) -> None:
        try:
            self.node.stop()
        except EnclaveKeysError:
            self.node.crash()
        finally:
            wipe = getattr(self.unseal, "wipe", None)
            if callable(wipe):
                wipe()
            shutil.rmtree(self.data_dir, ignore_errors=True)

    # --- the model ----------------------------------------------------------------------

    def live_rounds(self) -> set[RoundId]:
        return {rid for rid, r in self.rounds.items() if r.live}

    def ended_rounds(self) -> set[RoundId]:
        return {rid for rid, r in self.rounds.items() if not r.live}

    def _end(self, rid: RoundId) -> None:
        state = self.rounds.get(rid)
        if state is not None:
            state.live = False

    def model_apply(self, event: Event) -> None:
        """What the node should do with one event the rules publish (design §2)."""
        rid = event.round_id_or_none
        if rid is None:
            return
        state = self.rounds.get(rid)
        if isinstance(event, RoundRequested):
            self.requested_ever.add(rid)
            if state is None:
                self.rounds[rid] = ModelRound(deadline=event.deadline)
            return
        if state is None or not state.live:
            return  # unknown round: ignored; ended round: late or reported, no change
        if isinstance(event, RoundComplete) or (
            isinstance(event, RoundFailed) and not event.reason.is_misbehaviour
        ):
            state.live = False

    def model_restart(self) -> set[RoundId]:
        """A restart: live rounds whose key is garbage fail; planted orphans are purged."""
        broken = {rid for rid in self.live_rounds() if self.rounds[rid].corrupted}
        for rid in broken:
            self._end(rid)
        self.orphans.clear()
        return broken

    # --- strategies -----------------------------------------------------------------------

    def round_id(self, pick: int) -> RoundId:
        """The round id a rule's ``pick`` (any int >= 0) names in :attr:`round_pool`."""
        return RoundId(self.round_pool[pick % len(self.round_pool)])

    def round_ids(self) -> st.SearchStrategy[RoundId]:
        return st.sampled_from(self.round_pool).map(RoundId)

    def _allowed(self, event: Event) -> bool:
        if self.stray_complete_before_request or not isinstance(event, RoundComplete):
            return True
        return event.round_id in self.requested_ever

    # --- rules: the round lifecycle ----------------------------------------------------

    @rule(pick=_PICK, lifetime=st.integers(1, 600))
    def request_round(self, pick: int, lifetime: int) -> None:
        rid = self.round_id(pick)
        deadline = self.clock.now() + lifetime
        event = RoundRequested(round_id=rid, deadline=deadline, threshold=2, committee_size=3)
        self.publish(event)
        self.model_apply(event)

    @rule(pick=_PICK, stage=round_stages())
    def change_stage(self, pick: int, stage: RoundStage) -> None:
        rid = self.round_id(pick)
        event = RoundStageChanged(round_id=rid, stage=stage)
        self.publish(event)
        self.model_apply(event)

    @rule(
        pick=_PICK,
        reason=failure_reasons(),
        stage=round_stages(),
    )
    def fail_round(self, pick: int, reason: FailureReason, stage: RoundStage) -> None:
        rid = self.round_id(pick)
        event = RoundFailed(round_id=rid, failed_at=stage, reason=reason)
        self.publish(event)
        self.model_apply(event)

    @rule(pick=_PICK)
    def complete_round(self, pick: int) -> None:
        rid = self.round_id(pick)
        event = RoundComplete(round_id=rid)
        if self._allowed(event):
            self.publish(event)
            self.model_apply(event)

    @rule(data=st.data())
    def burst_of_terminal_events(self, data: st.DataObject) -> None:
        """Duplicate, late and reordered terminal events (and requests) in one publish."""
        ids = self.round_ids()
        one = st.one_of(
            ids.flatmap(terminal_events),
            ids.map(
                lambda rid: RoundRequested(
                    round_id=rid, deadline=self.clock.now() + 60, threshold=1, committee_size=1
                )
            ),
        )
        events = [e for e in data.draw(st.lists(one, min_size=2, max_size=5)) if self._allowed(e)]
        if not events:
            return
        for event in events:  # the model first: a request may make a later complete allowed
            self.model_apply(event)
        self.publish(*events)

    @rule(seconds=st.sampled_from([1.0, 30.0, 120.0, 400.0, 900.0]))
    def advance_clock_and_tick(self, seconds: float) -> None:
        now = self.clock.advance(seconds)
        self.node.tick()
        self.settle()
        grace = self.node_config.reaper_grace
        for rid in self.live_rounds():
            if self.rounds[rid].deadline + grace < now:
                self._end(rid)

    # --- rules: restarts, crashes, keys -------------------------------------------------

    def _after_start(self, broken: set[RoundId]) -> None:
        report = self.node.recovery
        assert set(report.failed) == broken, (
            f"recovery failed {sorted(report.failed)}, expected {sorted(broken)}"
        )
        for rid in report.failed:
            assert self.node.store.get_key(rid) is None, (
                f"ended rounds' keys left in the store: [{rid!r}] (failed at recovery)"
            )

    @rule()
    def restart(self) -> None:
        self.node.stop()
        self.restarts += 1
        self.stats.restarts += 1
        broken = self.model_restart()
        self._open()
        self._after_start(broken)

    @rule()
    def crash(self) -> None:
        self.node.crash()
        self.restarts += 1
        self.stats.crashes += 1
        broken = self.model_restart()
        self._open()
        self._after_start(broken)

    @rule(
        pick=_PICK,
        kind=st.sampled_from(["request", "complete", "fail"]),
        reason=failure_reasons(),
        event_id=st.binary(min_size=16, max_size=16),
    )
    def crash_with_unhandled_event(
        self, pick: int, kind: str, reason: FailureReason, event_id: bytes
    ) -> None:
        """An event reaches the log, then the process dies before any actor sees it."""
        rid = self.round_id(pick)
        payload: Event
        if kind == "request":
            payload = RoundRequested(
                round_id=rid, deadline=self.clock.now() + 60, threshold=1, committee_size=1
            )
        elif kind == "complete":
            payload = RoundComplete(round_id=rid)
        else:
            payload = RoundFailed(round_id=rid, failed_at=RoundStage.COMPUTE, reason=reason)
        if not self._allowed(payload):
            return
        store = self.node.store
        stored = StoredEvent(
            sequence=store.last_sequence() + 1,
            event_id=EventId(event_id),
            timestamp=self.clock.now(),
            source=NODE_SOURCE,
            payload=payload,
        )
        store.append_events([stored])
        was_unknown = rid not in self.rounds
        self.model_apply(payload)
        self.node.crash()
        self.restarts += 1
        self.stats.crashes += 1
        broken = self.model_restart()
        if was_unknown and rid in self.rounds:
            # Requested, never keyed: recovery fails it (key missing after restart).
            self._end(rid)
            broken.add(rid)
        self._open()
        self._after_start(broken)

    @rule()
    def rotate_kek(self) -> None:
        """Rotate the KEK. Garbage under a round's key may block it: then a typed error
        and nothing changed; with no garbage stored it must succeed."""
        store = self.node.store
        keys_before = store.list_keys()
        garbage = self.orphans or any(self.rounds[r].corrupted for r in self.live_rounds())
        before = self.node.master.active_version
        try:
            self.node.rotate_kek()
        except EnclaveKeysError:
            if not garbage:
                raise
            assert store.list_keys() == keys_before, "a failed rotation changed the store"
            assert self.node.master.active_version == before
            return
        self.settle()
        self.stats.rotations += 1
        assert self.node.master.active_version != before

    @rule(
        pick=_PICK,
        how=st.sampled_from(["random", "truncate", "bitflip", "extend"]),
        seed=st.integers(0, 2**32 - 1),
    )
    def corrupt_stored_key(self, pick: int, how: str, seed: int) -> None:
        """Overwrite a round's stored key with garbage (through the store API)."""
        rid = self.round_id(pick)
        state = self.rounds.get(rid)
        if state is None:
            return  # planting a key under an unknown id would pre-empt its keying
        store = self.node.store
        rng = random.Random(seed)  # noqa: S311 -- reproducible garbage, not a secret
        blob = store.get_key(rid) or rng.randbytes(60)
        if how == "random":
            garbage = rng.randbytes(rng.randint(1, 200))
        elif how == "truncate":
            garbage = blob[: rng.randrange(1, len(blob))] if len(blob) > 1 else b"\x00"
        elif how == "extend":
            garbage = blob + rng.randbytes(rng.randint(1, 16))
        else:
            flipped = bytearray(blob)
            flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
            garbage = bytes(flipped)
        store.put_key(rid, garbage)
        self.stats.corruptions += 1
        if state.live:
            state.corrupted = True
        else:
            self.orphans.add(rid)

    # --- rules: using the keys ------------------------------------------------------------

    def _cipher(self, rid: RoundId) -> LeasedRoundCipher:
        context = self.node.registry.get(rid)
        assert context is not None, f"live round {rid} has no context"
        leased = context.get(ROUND_CIPHER)
        assert leased is not None, f"live round {rid} has no round cipher in its context"
        return leased

    @precondition(lambda self: bool(self.live_rounds()))
    @rule(
        data=st.data(),
        purpose=st.sampled_from(_PURPOSES),
        plaintext=st.binary(max_size=64),
    )
    def seal_and_open(self, data: st.DataObject, purpose: str, plaintext: bytes) -> None:
        rid = data.draw(st.sampled_from(sorted(self.live_rounds())), label="round")
        leased = self._cipher(rid)
        with leased.lease() as cipher:
            sealed = cipher.seal(purpose, plaintext)
            assert cipher.open(purpose, sealed) == plaintext
            tampered = bytearray(sealed)
            tampered[-1] ^= 0x01
            for bad in (bytes(tampered), sealed[:-1]):
                try:
                    cipher.open(purpose, bad)
                except UnwrapFailed:
                    pass
                else:
                    raise AssertionError("a tampered envelope opened")
        others = sorted(self.live_rounds() - {rid})
        if others:
            with self._cipher(others[0]).lease() as other:
                try:
                    other.open(purpose, sealed)
                except UnwrapFailed:
                    pass
                else:
                    raise AssertionError("another round's cipher opened the envelope")

    @rule(
        pick=_PICK,
        request=st.binary(min_size=16, max_size=16),
    )
    def request_decryption_share(self, pick: int, request: bytes) -> None:
        rid = self.round_id(pick)
        request_id = EventId(request)
        before = self.node.store.last_sequence()
        self.publish(DecryptionShareRequested(round_id=rid, request_id=request_id))
        new = [s.payload for s in self.node.store.read_events(before + 1)]
        created = [
            e for e in new if isinstance(e, DecryptionShareCreated) and e.request_id == request_id
        ]
        state = self.rounds.get(rid)
        if state is not None and state.live:
            assert len(created) == 1, f"live round {rid}: no decryption share"
            with self._cipher(rid).lease() as cipher:
                assert len(cipher.open(DECRYPTION_SHARE_PURPOSE, created[0].ciphertext)) == 32
        else:
            assert not created, f"a decryption share was made for non-live round {rid}"
            if state is not None:
                assert any(isinstance(e, RoundAlreadyCompleted) for e in new)

    # --- invariants ---------------------------------------------------------------------

    @invariant()
    def node_matches_model(self) -> None:
        self.stats.steps += 1
        self.check_model()

    def check_model(self) -> None:
        """Design §7 against the model; extend it (call ``super()``) or add invariants."""
        node = self.node
        live = self.live_rounds()
        open_rounds = node.router.open_rounds()
        assert set(open_rounds) == live, (
            f"router live {sorted(open_rounds)} != model live {sorted(live)}"
        )
        stored = {rid for rid, _ in node.store.list_keys()}
        assert live <= stored, f"live rounds lost their key: {sorted(live - stored)}"
        leftover = stored - live - self.orphans
        assert not leftover, f"ended rounds' keys left in the store: {sorted(leftover)}"
        for rid in sorted(live):
            leased = self._cipher(rid)
            with leased.lease() as cipher:
                probe = cipher.seal("invariant.probe", rid.to_bytes())
                assert cipher.open("invariant.probe", probe) == rid.to_bytes()
                share = node.keyshare.keyshare_of(rid)
                assert share is not None, f"live round {rid} has no keyshare"
                assert share[0] == leased.key_id
                assert len(cipher.open(KEYSHARE_PURPOSE, share[1])) == node.config.share_size
        for rid in sorted(self.ended_rounds()):
            assert node.registry.get(rid) is None, f"ended round {rid} still has a context"
            assert node.round_cipher.cipher_of(rid) is None, f"ended round {rid} has a cipher"
        for event in self._new_events():
            self.check_event(event)

    def _new_events(self) -> Iterator[StoredEvent]:
        for stored in self.node.store.read_events(self._checked + 1):
            self._checked = stored.sequence
            yield stored

    def check_event(self, stored: StoredEvent) -> None:
        """Every logged event: no bytes field but a ciphertext, no handler failure."""
        payload = stored.payload
        assert not isinstance(payload, HandlerFailed), f"a handler failed: {payload}"
        for spec in payload.FIELDS:
            value = getattr(payload, spec.name)
            if spec.kind is FieldKind.BYTES or isinstance(value, bytes | bytearray | memoryview):
                assert spec.name == "ciphertext", (
                    f"{payload.TAG} has a bytes field {spec.name!r}: only ciphertexts may"
                )
