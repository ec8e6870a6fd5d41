"""Bad input reaching a running node through its store, its key ceremony and its write
batches: a typed error or a clear recovery outcome, nothing half-written, and the node
keeps serving its other rounds."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enclave_keys.clock import ManualClock
from enclave_keys.errors import CeremonyError, EnclaveKeysError
from enclave_keys.events import FailureReason, RoundFailed
from enclave_keys.ids import RoundId
from enclave_keys.master import MasterKeys
from enclave_keys.node import Node
from enclave_keys.store import LmdbStore
from enclave_keys.store.api import WriteBatch
from enclave_keys.testing.fakes import FixedKeyUnseal
from enclave_keys.unseal import ShamirUnseal
from tests.fuzz.conftest import CONFIG, LIVE, T0
from tests.fuzz.helpers import Fingerprint, assert_serving, mutated, tried

NODE_SETTINGS = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@contextmanager
def fresh_dir() -> Iterator[Path]:
    where = Path(tempfile.mkdtemp(prefix="enclave-keys-fuzz-"))
    try:
        yield where / "node"
    finally:
        shutil.rmtree(where, ignore_errors=True)


def open_node(data_dir: Path, unseal: FixedKeyUnseal) -> Node:
    return Node.open(data_dir, unseal, clock=ManualClock(T0), config=CONFIG)


def with_live_rounds(data_dir: Path, unseal: FixedKeyUnseal) -> Node:
    from enclave_keys.events import RoundRequested

    node = open_node(data_dir, unseal)
    for rid in LIVE:
        node.publish(
            RoundRequested(round_id=rid, deadline=T0 + 3600, threshold=2, committee_size=3)
        )
    return node


@NODE_SETTINGS
@given(data=st.data())
def test_a_garbage_round_key_fails_that_round_only(
    unseal: FixedKeyUnseal, data: st.DataObject
) -> None:
    with fresh_dir() as data_dir:
        node = with_live_rounds(data_dir, unseal)
        victim = LIVE[0]
        blob = node.store.get_key(victim)
        assert blob is not None
        node.store.put_key(victim, data.draw(mutated(blob).filter(lambda b: 1 <= len(b) <= 4096)))
        tried("stored round key")
        assert_serving(node, "probe:before-restart")  # the held cipher still serves
        node.stop()
        node = open_node(data_dir, unseal)
        try:
            assert node.recovery.failed == (victim,)
            failures = [
                s.payload.reason
                for s in node.store.read_events()
                if isinstance(s.payload, RoundFailed) and s.round_id == victim
            ]
            assert failures == [FailureReason.KEY_MISSING_AFTER_RESTART]
            assert node.store.get_key(victim) is None
            assert set(node.router.open_rounds()) == set(LIVE[1:])
            assert_serving(node, "probe:after-restart")
        finally:
            node.stop()


@NODE_SETTINGS
@given(garbage=st.binary(min_size=1, max_size=512), data=st.data())
def test_a_garbage_snapshot_is_skipped_and_the_log_replayed(
    unseal: FixedKeyUnseal, garbage: bytes, data: st.DataObject
) -> None:
    with fresh_dir() as data_dir:
        node = with_live_rounds(data_dir, unseal)
        node.snapshot()
        latest = node.store.latest_snapshot()
        assert latest is not None
        bad = data.draw(st.sampled_from([garbage, *[data.draw(mutated(latest[1]))]]))
        if not bad:
            bad = b"\x00"
        node.store.put_snapshot(latest[0], bad)
        tried("stored snapshot")
        node.crash()
        node = open_node(data_dir, unseal)
        try:
            assert set(node.router.open_rounds()) == set(LIVE)
            assert_serving(node, "probe:snapshot")
        finally:
            node.stop()


@NODE_SETTINGS
@given(data=st.data())
def test_a_garbage_keyring_record_refuses_to_start_and_writes_nothing(
    unseal: FixedKeyUnseal, data: st.DataObject
) -> None:
    with fresh_dir() as data_dir:
        open_node(data_dir, unseal).stop()
        with LmdbStore.open(data_dir) as store:
            original = store.get_meta("master.keyring")
            assert original is not None
            store.put_meta("master.keyring", data.draw(mutated(original)))
            before = Fingerprint.of(store)
        tried("stored keyring blob")
        with pytest.raises(EnclaveKeysError):
            open_node(data_dir, unseal)
        with LmdbStore.open(data_dir) as store:
            assert Fingerprint.of(store) == before, "a failed start wrote to the store"
            store.put_meta("master.keyring", original)
        node = open_node(data_dir, unseal)
        try:
            assert_serving(node, "probe:keyring")
        finally:
            node.stop()


WORDS = st.sampled_from(["academic", "acid", "zero", "wolf", "", "ünïcode", "0", "\x00"])


@st.composite
def bad_mnemonics(draw: st.DrawFn, valid: str) -> str:
    words = valid.split()
    how = draw(st.sampled_from(["drop", "swap", "replace", "truncate", "chars", "random"]))
    if how == "drop":
        del words[draw(st.integers(0, len(words) - 1))]
    elif how == "swap":
        i, j = draw(st.integers(0, len(words) - 1)), draw(st.integers(0, len(words) - 1))
        words[i], words[j] = words[j], words[i]
    elif how == "replace":
        words[draw(st.integers(0, len(words) - 1))] = draw(WORDS)
    elif how == "truncate":
        return valid[: draw(st.integers(0, len(valid) - 1))]
    elif how == "chars":
        i = draw(st.integers(0, len(valid) - 1))
        return valid[:i] + draw(st.characters()) + valid[i + 1 :]
    else:
        return draw(st.text(max_size=300))
    return " ".join(words)


def test_bad_shares_are_refused_and_the_ceremony_still_completes(tmp_path: Path) -> None:
    data_dir = tmp_path / "node"
    enrolment, mnemonics = ShamirUnseal.enrol_shares(2, 3)
    with LmdbStore.open(data_dir) as store:
        MasterKeys.initialise(store, enrolment.root, "shamir", enrolment.records).seal(force=True)
    node = Node.open(data_dir, clock=ManualClock(T0), config=CONFIG)
    try:
        before = Fingerprint.of(node.store)
        refused = 0
        valid_words = [m.split() for m in mnemonics]
        share_words = {w for m in mnemonics for w in m.split()}

        @settings(max_examples=200, deadline=None, database=None)
        @given(bad=st.sampled_from(mnemonics).flatmap(bad_mnemonics))
        def submit(bad: str) -> None:
            nonlocal refused
            if [w.lower() for w in bad.split()] in valid_words:
                return  # the same share, spaced or cased differently: valid, not bad input
            with pytest.raises(CeremonyError) as caught:
                node.submit_share(bad)
            message = str(caught.value)
            # A share word may also be an ordinary English word of the message ("length",
            # "check"): what must never appear is the share itself, or any run of it.
            words = [w for w in bad.split() if w in share_words]
            runs = [" ".join(words[i : i + 2]) for i in range(len(words) - 1)]
            leaked = [run for run in runs if run in message]
            assert not leaked, "a refused share's words are in the error message"
            refused += 1
            tried("shamir share")
            assert node.sealed

        submit()
        assert refused > 100
        assert Fingerprint.of(node.store) == before, "a refused share wrote to the store"
        node.submit_share(mnemonics[0])
        node.submit_share(mnemonics[2])
        assert not node.sealed
        assert_serving(node, "probe:ceremony")
    finally:
        node.stop()


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    blob=st.one_of(st.just(b""), st.binary(min_size=4097, max_size=4200)),
    name=st.sampled_from(["", "store.format_version", "x" * 200]),
    where=st.integers(0, 3),
)
def test_a_batch_with_one_bad_operation_writes_nothing(
    node: Node, blob: bytes, name: str, where: int
) -> None:
    before = Fingerprint.of(node.store)

    def fill(batch: WriteBatch) -> None:
        ops: list[Callable[[], None]] = [
            lambda: batch.put_key(RoundId("ok"), b"\x01" * 60),
            lambda: batch.put_meta("app.ok", b"1"),
            lambda: batch.delete_key(LIVE[0]),
        ]
        bad: list[Callable[[], None]] = [
            lambda: batch.put_key(RoundId("bad"), blob),
            lambda: batch.put_meta(name, b""),
        ]
        ops.insert(where, bad[where % 2])
        for op in ops:
            op()

    with pytest.raises(EnclaveKeysError), node.store.write() as batch:
        fill(batch)
    tried("store write batch")
    assert Fingerprint.of(node.store) == before, "a failed batch was partly written"
    assert_serving(node, f"probe:batch:{where}")
