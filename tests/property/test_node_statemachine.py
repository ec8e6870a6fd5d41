"""The node state machine (enclave_keys.testing.statemachine) run on the real node.

Example counts come from the Hypothesis profile (ENCLAVE_KEYS_HYPOTHESIS_PROFILE): "ci"
runs 300 derandomised examples, "soak" many more (ENCLAVE_KEYS_SOAK_EXAMPLES, default
3000) with random seeds.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import invariant, rule, run_state_machine_as_test

from enclave_keys.events import (
    Event,
    RoundComplete,
    RoundKeyReady,
    RoundRequested,
    RoundStage,
    RoundStageChanged,
    StoredEvent,
)
from enclave_keys.handler import Handler
from enclave_keys.ids import RoundId
from enclave_keys.node import Node, NodeConfig
from enclave_keys.round_cipher import ROUND_CIPHER
from enclave_keys.store import LmdbStore, Store
from enclave_keys.testing.fakes import FaultyStore, FixedKeyUnseal, ManualClock
from enclave_keys.testing.statemachine import NodeStateMachine, machine_stats
from tests.conftest import PROFILE_ENV
from tests.reports import replace

T0 = 1_700_000_000.0
PROFILE = os.environ.get(PROFILE_ENV, "ci")
SOAK = PROFILE == "soak"
EXAMPLES = int(os.environ.get("ENCLAVE_KEYS_SOAK_EXAMPLES", "3000")) if SOAK else 300
STEPS = 40 if SOAK else 25

MACHINE_SETTINGS = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    derandomize=not SOAK,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


class NodeMachine(NodeStateMachine):
    temp_root = "/dev/shm" if os.path.isdir("/dev/shm") else None  # fast fsync, real LMDB

    def teardown(self) -> None:
        super().teardown()
        replace("node state machine", **machine_stats(NodeMachine))


TestNodeStateMachine = NodeMachine.TestCase
TestNodeStateMachine.settings = MACHINE_SETTINGS


# --- a planted fault is found and shrunk --------------------------------------------------

FAULT_SETTINGS = settings(
    max_examples=200,
    report_multiple_bugs=False,
    stateful_step_count=12,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


class PurgeSkippedAfterRestart(NodeStateMachine):
    """The planted fault: once the node has restarted, deleting a round key is lost."""

    temp_root = NodeMachine.temp_root

    def open_store(self, data_dir: Path) -> Store:
        return FaultyStore(LmdbStore.open(data_dir), drop_key_deletes=self.restarts > 0)


def failing_steps(exc: BaseException) -> list[str]:
    """The rule calls of Hypothesis's shrunk failing example (from the exception notes)."""
    text = "\n".join(getattr(exc, "__notes__", []))
    calls = re.findall(r"^\s*state\.(\w+)\(", text, flags=re.MULTILINE)
    return [c for c in calls if c not in ("node_matches_model", "teardown")]


def test_a_planted_purge_fault_is_found_and_shrunk_to_a_short_example() -> None:
    with pytest.raises(AssertionError) as caught:
        run_state_machine_as_test(PurgeSkippedAfterRestart, settings=FAULT_SETTINGS)
    steps = failing_steps(caught.value)
    assert "ended rounds' keys left in the store" in str(caught.value)
    # The shortest story: restart, request a round, end it (or request, restart, end).
    assert 3 <= len(steps) <= 4, steps
    assert any(s.startswith(("restart", "crash")) for s in steps), steps
    replace("planted fault", shrunk_steps=len(steps))


# --- a bug the machine found (fixed): a stray RoundComplete poisoned the round id ------------


def test_a_stray_complete_before_the_request_does_not_leave_a_live_round_without_key(
    tmp_path: Path,
) -> None:
    clock = ManualClock(T0)
    config = NodeConfig(runtime="deterministic", reaper_grace=0.0, harden=False)
    with FixedKeyUnseal("stray") as unseal:
        node = Node.open(tmp_path / "node", unseal, clock=clock, config=config)
        try:
            rid = RoundId("stray")
            node.publish(RoundComplete(round_id=rid))  # ignored: the round is unknown
            node.publish(
                RoundRequested(round_id=rid, deadline=T0 + 10, threshold=1, committee_size=1)
            )
            clock.advance(100)
            node.tick()  # past the deadline: the reaper must end the round if nothing else
            live = set(node.router.open_rounds())
            keyed = {r for r, _ in node.store.list_keys()}
            assert live <= keyed, "a live round has no key"
            assert not live, "a round outlived its deadline"
        finally:
            node.stop()


class StrayCompletes(NodeStateMachine):
    temp_root = NodeMachine.temp_root
    stray_complete_before_request = True


def test_the_machine_with_stray_completes_enabled() -> None:
    run_state_machine_as_test(
        StrayCompletes,
        settings=settings(FAULT_SETTINGS, max_examples=100, phases=[Phase.generate]),
    )


# --- users extend the machine with their own actors and rules -------------------------------


class DkgStarter:
    """A user's actor: when a round is keyed it seals its own material under the round
    cipher (resolved from the context) and moves the round to key generation."""

    name = "dkg-starter"
    subscriptions: tuple[type[Event], ...] = (RoundKeyReady,)

    def __init__(self, node: Node) -> None:
        self.node = node
        self.sealed: dict[RoundId, bytes] = {}

    def handle(self, stored: StoredEvent) -> Sequence[Event]:
        event = stored.payload
        assert isinstance(event, RoundKeyReady)
        context = self.node.registry.get(event.round_id)
        if context is None:
            return ()
        with context.require(ROUND_CIPHER).lease() as cipher:
            self.sealed[event.round_id] = cipher.seal("dkg.secret", b"polynomial")
        return (RoundStageChanged(round_id=event.round_id, stage=RoundStage.KEY_GENERATION),)


class MyNodeMachine(NodeStateMachine):
    temp_root = NodeMachine.temp_root
    round_pool = ("e3:1", "e3:2", "e3:3")
    user_rules_run = 0

    def make_actors(self, node: Node) -> Sequence[Handler]:
        self.dkg = DkgStarter(node)
        return (self.dkg,)

    @rule()
    def my_rule(self) -> None:
        type(self).user_rules_run += 1

    @invariant()
    def my_material_opens_while_the_round_lives(self) -> None:
        for rid, sealed in self.dkg.sealed.items():
            if rid in self.live_rounds():
                with self._cipher(rid).lease() as cipher:
                    assert cipher.open("dkg.secret", sealed) == b"polynomial"
            else:
                assert self.node.registry.get(rid) is None


def test_a_subclass_adds_its_actors_rules_and_invariants() -> None:
    run_state_machine_as_test(
        MyNodeMachine,
        settings=settings(max_examples=15, stateful_step_count=15, deadline=None, database=None),
    )
    stats = machine_stats(MyNodeMachine)
    assert stats["machines"] >= 15
    assert MyNodeMachine.user_rules_run > 0


def test_the_example_in_docs_testing_md_runs() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "testing.md").read_text()
    [block] = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    namespace: dict[str, object] = {"__name__": "docs_testing_example"}
    exec(compile(block, "docs/testing.md", "exec"), namespace)
    machine = namespace["MyNodeMachine"]
    assert isinstance(machine, type)
    assert issubclass(machine, NodeStateMachine)
    run_state_machine_as_test(
        machine, settings=settings(max_examples=5, stateful_step_count=10, deadline=None)
    )
