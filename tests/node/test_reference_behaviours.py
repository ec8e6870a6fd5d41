"""The reference behaviours of the round lifecycle, each on a whole node (design §2, §3, §7).

Every test opens a real node over an LMDB directory and drives it only through its public
surface: ``publish``, ``tick``, ``wait_idle``, ``snapshot``, ``stop``, the store, the
context registry and the cores' queries. Each runs on both runtimes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import structlog
from structlog.testing import capture_logs

from enclave_keys.crypto import RoundCipher, SecretBytes, read_wrapped_header
from enclave_keys.errors import EnclaveKeysError, RoundCipherRetired, UnknownEpoch, UnwrapFailed
from enclave_keys.events import (
    DecryptionShareCreated,
    DecryptionShareFailed,
    DecryptionShareRequested,
    Event,
    FailureReason,
    KeyshareCreated,
    RoundAlreadyCompleted,
    RoundComplete,
    RoundFailed,
    RoundKeyReady,
    RoundOpened,
    RoundPurged,
    RoundStage,
    RoundStageChanged,
)
from enclave_keys.ids import EventId, RoundId
from enclave_keys.keyshare import (
    DECRYPTION_SHARE_PURPOSE,
    KEYSHARE_PURPOSE,
    derive_decryption_share,
)
from enclave_keys.node import Node
from enclave_keys.store import LmdbStore
from tests.node.conftest import (
    FAR,
    T0,
    NodeFactory,
    assert_no_handler_failures,
    copy_of,
    encoded_log,
    failures_of,
    key_id_of,
    leased_cipher,
    log_of,
    of_type,
    open_keyshare,
    publish,
    raw_round_key,
    request,
    require_cipher,
    rid,
    settle,
    tags_of,
)

TIMEOUTS = [reason for reason in FailureReason if reason.is_timeout]
MISBEHAVIOUR = [reason for reason in FailureReason if reason.is_misbehaviour]
OTHER = [r for r in FailureReason if not (r.is_timeout or r.is_misbehaviour)]


def keyshare_of(node: Node, round_id: RoundId) -> bytes:
    """The round's keyshare ciphertext as the log holds it (exactly one)."""
    shares = of_type(log_of(node.store), KeyshareCreated, round_id)
    assert len(shares) == 1, f"round {round_id} has {len(shares)} keyshares"
    return shares[0].ciphertext


def assert_purged(node: Node, round_id: RoundId) -> None:
    """The round ended and its key is gone everywhere a node keeps it."""
    assert node.store.get_key(round_id) is None
    assert node.registry.get(round_id) is None
    assert node.round_cipher.cipher_of(round_id) is None
    assert round_id not in node.router.open_rounds()
    assert node.router.is_completed(round_id)
    assert node.keyshare.keyshare_of(round_id) is None
    purged = of_type(log_of(node.store), RoundPurged, round_id)
    assert [p.key_id for p in purged] == [key_id_of(node.store, round_id)]


def assert_live(node: Node, round_id: RoundId) -> None:
    """The round is live: key stored, cipher in the context and usable, keyshare opens."""
    assert node.store.get_key(round_id) is not None
    assert round_id in node.router.open_rounds()
    leased = require_cipher(node, round_id)
    assert not leased.retired
    assert not leased.is_wiped
    assert leased.key_id == key_id_of(node.store, round_id)
    assert len(open_keyshare(node, round_id, keyshare_of(node, round_id))) == 32
    assert RoundPurged.TAG not in tags_of(node.store, round_id)


# --- create, store, load ----------------------------------------------------------------


def test_a_round_key_is_stored_wrapped_and_loads_back_to_the_same_key(nodes: NodeFactory) -> None:
    node = nodes.open()
    r = rid("e3:store")
    publish(node, request(r))

    blob = node.store.get_key(r)
    assert blob is not None
    ready = of_type(log_of(node.store), RoundKeyReady, r)
    assert len(ready) == 1
    epoch, key_id = read_wrapped_header(blob)
    assert key_id == ready[0].key_id
    assert ready[0].kek_version == node.epochs.kek_version
    with node.epochs.active_epoch() as current, current._borrow_key() as epoch_key:
        assert epoch == current.number, "wrapped under the current storage epoch key"
        assert bytes(epoch_key) not in blob
    leased = require_cipher(node, r)
    assert leased.key_id == key_id
    raw = raw_round_key(leased)
    assert raw not in blob, "the stored blob must be the wrapped key, not the key"
    with leased.lease() as cipher:
        probe = cipher.seal("probe", b"sealed before the restart")

    node.stop()
    assert leased.is_wiped, "stop must wipe every round key in memory"

    node = nodes.open()
    assert node.recovery.hydrated == (r,)
    assert node.recovery.failed == ()
    assert node.recovery.purged == ()
    # A clean stop with nothing purged: the start kept the epoch and the blob as stored.
    assert node.epochs.epoch == epoch
    assert node.store.get_key(r) == blob
    # A ratchet rewraps the same key under the new epoch key; the old epoch is gone.
    node.epochs.ratchet()
    rewrapped = node.store.get_key(r)
    assert rewrapped is not None
    assert read_wrapped_header(rewrapped) == (node.epochs.epoch, key_id)
    assert node.epochs.epoch > epoch
    with pytest.raises(UnknownEpoch), node.epochs.epoch_for(epoch):
        pass
    again = require_cipher(node, r)
    assert again is not leased
    assert again.key_id == key_id
    with again.lease() as cipher:
        assert cipher.open("probe", probe) == b"sealed before the restart"
    assert raw_round_key(again) == raw
    # The keyshare sealed before the restart opens too: the same key came back.
    assert len(open_keyshare(node, r, keyshare_of(node, r))) == 32


def test_loading_a_missing_key_gives_none(nodes: NodeFactory) -> None:
    node = nodes.open()
    live, ended = rid("e3:live"), rid("e3:ended")
    publish(node, request(live), request(ended))
    publish(node, RoundComplete(round_id=ended))

    assert node.store.get_key(rid("e3:never-requested")) is None
    assert node.store.get_key(ended) is None
    assert node.store.get_key(live) is not None
    assert [round_id for round_id, _ in node.store.list_keys()] == [live]
    assert node.store.key_count() == 1


def test_purge_deletes_the_key_wipes_the_cipher_and_closes_the_context(nodes: NodeFactory) -> None:
    node = nodes.open()
    r, other = rid("e3:purge"), rid("e3:bystander")
    publish(node, request(r), request(other))
    leased = require_cipher(node, r)
    context = node.registry.get(r)
    assert context is not None

    publish(node, RoundComplete(round_id=r))

    assert_purged(node, r)
    assert context.closed
    assert leased.retired
    assert leased.is_wiped
    with pytest.raises(RoundCipherRetired), leased.lease():
        pass
    assert tags_of(node.store, r)[-2:] == [RoundComplete.TAG, RoundPurged.TAG]
    assert_live(node, other)
    assert_no_handler_failures(node.store)


def test_a_different_master_cannot_unwrap_the_round_keys(
    nodes: NodeFactory, data_dir: Path
) -> None:
    node = nodes.open()
    rounds = [rid(f"e3:m{i}") for i in range(3)]
    publish(node, *(request(r) for r in rounds))
    shares = {r: keyshare_of(node, r) for r in rounds}
    key_ids = {r: key_id_of(node.store, r) for r in rounds}
    node.stop()

    # A different 32-byte master: the real one with every bit flipped is certainly not it.
    with nodes.master.borrow() as view:
        flipped = bytearray(b ^ 0xFF for b in view)
    wrong = SecretBytes.from_buffer(flipped)
    try:
        # Nothing under the wrong master opens a keyshare (a cipher over its bytes, with the
        # right key id and round id, still fails authentication).
        for r in rounds:
            with RoundCipher(r, key_ids[r], copy_of(wrong)) as guess, pytest.raises(UnwrapFailed):
                guess.open(KEYSHARE_PURPOSE, shares[r])

        try:
            node = nodes.open(master=wrong)
        except EnclaveKeysError:
            # Refused before anything was unwrapped (a verifier of the master): then the
            # right master must still find every live round intact.
            with LmdbStore.open(data_dir) as store:
                assert sorted(r for r, _ in store.list_keys()) == rounds
            node = nodes.open()
            assert node.recovery.hydrated == tuple(rounds)
            for r in rounds:
                assert_live(node, r)
            return
        # Accepted: every live round is failed, clearly, and nothing decrypts.
        assert node.recovery.hydrated == ()
        assert node.recovery.failed == tuple(rounds)
        for r in rounds:
            assert FailureReason.KEY_MISSING_AFTER_RESTART in failures_of(node.store, r)
            assert leased_cipher(node, r) is None
            assert node.round_cipher.cipher_of(r) is None
            assert r not in node.router.open_rounds()
        request_id = EventId.random()
        publish(node, DecryptionShareRequested(round_id=rounds[0], request_id=request_id))
        assert not of_type(log_of(node.store), DecryptionShareCreated)
    finally:
        wrong.wipe()


def test_creating_a_round_key_is_idempotent(nodes: NodeFactory) -> None:
    node = nodes.open()
    apart, together = rid("e3:apart"), rid("e3:together")
    publish(node, request(apart))
    first = require_cipher(node, apart)
    publish(node, request(apart))
    publish(node, request(together), request(together))
    publish(node, request(apart), request(together))

    events = log_of(node.store)
    for r in (apart, together):
        assert len(of_type(events, RoundOpened, r)) == 1
        assert len(of_type(events, RoundKeyReady, r)) == 1
        assert len(of_type(events, KeyshareCreated, r)) == 1
        assert_live(node, r)
    assert require_cipher(node, apart) is first
    assert node.store.key_count() == 2
    assert not of_type(events, RoundAlreadyCompleted)


# --- snapshots and restart ----------------------------------------------------------------


def test_hydrating_from_a_snapshot_restores_the_same_key(nodes: NodeFactory) -> None:
    node = nodes.open()
    before, after = rid("e3:before"), rid("e3:after")
    publish(node, request(before))
    sequence = node.snapshot()
    publish(node, request(after))  # in the log after the snapshot: replayed at start
    shares = {r: keyshare_of(node, r) for r in (before, after)}
    raws = {r: raw_round_key(require_cipher(node, r)) for r in (before, after)}
    tail = node.store.last_sequence() - sequence
    node.crash()  # no snapshot at stop: the start must use the one taken above

    node = nodes.open()
    assert node.recovery.snapshot_sequence == sequence
    assert node.recovery.replayed == tail > 0
    assert node.recovery.hydrated == (after, before)
    assert node.recovery.reannounced == ()  # both keyshares were found (snapshot + replay)
    for r in (before, after):
        assert len(open_keyshare(node, r, shares[r])) == 32
        assert raw_round_key(require_cipher(node, r)) == raws[r]
    # The snapshot itself holds no key material.
    latest = node.store.latest_snapshot()
    assert latest is not None
    assert all(raw not in latest[1] for raw in raws.values())


def test_a_round_whose_key_is_gone_at_restart_fails_clearly(
    nodes: NodeFactory, data_dir: Path
) -> None:
    node = nodes.open()
    gone, kept = rid("e3:gone"), rid("e3:kept")
    publish(node, request(gone), request(kept))
    kept_share = keyshare_of(node, kept)
    node.stop()  # writes a snapshot listing both rounds as live
    with LmdbStore.open(data_dir) as store:
        store.delete_key(gone)

    node = nodes.open()
    assert node.recovery.snapshot_sequence is not None
    assert node.recovery.failed == (gone,)
    assert node.recovery.hydrated == (kept,)
    failed = of_type(log_of(node.store), RoundFailed, gone)
    assert [f.reason for f in failed] == [FailureReason.KEY_MISSING_AFTER_RESTART]
    assert tags_of(node.store, gone)[-2:] == [RoundFailed.TAG, RoundComplete.TAG]
    assert node.router.is_completed(gone)
    assert gone not in node.router.open_rounds()
    assert node.registry.get(gone) is None
    assert node.store.get_key(gone) is None
    publish(node, DecryptionShareRequested(round_id=gone, request_id=EventId.random()))
    assert [f.round_id for f in of_type(log_of(node.store), DecryptionShareFailed)] == [gone]
    assert len(open_keyshare(node, kept, kept_share)) == 32


# --- how rounds end -------------------------------------------------------------------------


@pytest.mark.parametrize("reason", TIMEOUTS, ids=str)
def test_a_timeout_failure_completes_the_round_and_purges_its_key(
    nodes: NodeFactory, reason: FailureReason
) -> None:
    node = nodes.open()
    r = rid("e3:timeout")
    publish(node, request(r))
    leased = require_cipher(node, r)

    publish(node, RoundFailed(round_id=r, failed_at=RoundStage.COMPUTE, reason=reason))

    assert_purged(node, r)
    assert leased.is_wiped
    completes = [s for s in log_of(node.store) if isinstance(s.payload, RoundComplete)]
    assert [s.source for s in completes] == ["router"]
    assert_no_handler_failures(node.store)


@pytest.mark.parametrize("reason", OTHER, ids=str)
def test_any_other_failure_ends_the_round_too(nodes: NodeFactory, reason: FailureReason) -> None:
    node = nodes.open()
    r = rid("e3:other")
    publish(node, request(r))
    publish(node, RoundFailed(round_id=r, failed_at=RoundStage.COMPUTE, reason=reason))
    assert_purged(node, r)


@pytest.mark.parametrize("reason", MISBEHAVIOUR, ids=str)
def test_a_misbehaviour_failure_keeps_the_round_until_it_completes(
    nodes: NodeFactory, reason: FailureReason
) -> None:
    node = nodes.open()
    r = rid("e3:accused")
    publish(node, request(r))
    leased = require_cipher(node, r)

    publish(node, RoundFailed(round_id=r, failed_at=RoundStage.KEY_GENERATION, reason=reason))
    publish(node, RoundStageChanged(round_id=r, stage=RoundStage.DECRYPTION))
    publish(node, RoundFailed(round_id=r, failed_at=RoundStage.DECRYPTION, reason=reason))

    assert_live(node, r)
    assert require_cipher(node, r) is leased
    assert node.router.open_rounds()[r].accusation
    assert RoundComplete.TAG not in tags_of(node.store, r)
    request_id = EventId.random()
    publish(node, DecryptionShareRequested(round_id=r, request_id=request_id))
    assert [d.request_id for d in of_type(log_of(node.store), DecryptionShareCreated, r)] == [
        request_id
    ]

    publish(node, RoundComplete(round_id=r))
    assert_purged(node, r)
    assert leased.is_wiped


def test_late_terminal_events_are_ignored_and_others_reported(nodes: NodeFactory) -> None:
    node = nodes.open()
    r = rid("e3:late")
    publish(node, request(r))
    publish(node, RoundComplete(round_id=r))
    assert_purged(node, r)
    length = node.store.last_sequence()

    late: list[Event] = [
        RoundComplete(round_id=r),
        RoundStageChanged(round_id=r, stage=RoundStage.COMPLETE),
        RoundStageChanged(round_id=r, stage=RoundStage.FAILED),
        *(RoundFailed(round_id=r, failed_at=RoundStage.COMPUTE, reason=t) for t in TIMEOUTS),
    ]
    for event in late:
        publish(node, event)
    # Only the late events themselves were logged: no report, no purge, no failure.
    assert node.store.last_sequence() == length + len(late)
    assert not of_type(log_of(node.store), RoundAlreadyCompleted)

    reported: list[Event] = [
        request(r),
        RoundStageChanged(round_id=r, stage=RoundStage.COMPUTE),
        RoundFailed(
            round_id=r, failed_at=RoundStage.COMPUTE, reason=FailureReason.INVALID_DKG_SHARES
        ),
        RoundFailed(
            round_id=r, failed_at=RoundStage.COMPUTE, reason=FailureReason.INSUFFICIENT_COMMITTEE
        ),
        DecryptionShareRequested(round_id=r, request_id=EventId.random()),
    ]
    for count, event in enumerate(reported, start=1):
        publish(node, event)
        reports = of_type(log_of(node.store), RoundAlreadyCompleted, r)
        assert len(reports) == count
        assert reports[-1].rejected_tag == event.TAG
    # A repeated request for a completed round never keys it again.
    assert len(of_type(log_of(node.store), RoundOpened, r)) == 1
    assert len(of_type(log_of(node.store), RoundKeyReady, r)) == 1
    assert node.store.key_count() == 0
    assert_no_handler_failures(node.store)


# --- what the round key protects --------------------------------------------------------------


def test_a_keyshare_opens_under_its_round_key_and_not_under_the_master(
    nodes: NodeFactory,
) -> None:
    node = nodes.open()
    r, other = rid("e3:share"), rid("e3:neighbour")
    publish(node, request(r), request(other))
    ciphertext = keyshare_of(node, r)
    key_id = key_id_of(node.store, r)

    assert len(open_keyshare(node, r, ciphertext)) == 32
    # Not under the master (nor the KEK it gives), with the same key id and round id:
    master_cipher = RoundCipher(r, key_id, copy_of(nodes.master))
    with master_cipher, pytest.raises(UnwrapFailed):
        master_cipher.open(KEYSHARE_PURPOSE, ciphertext)
    # Not under another round's key, nor for another purpose.
    with require_cipher(node, other).lease() as neighbour, pytest.raises(UnwrapFailed):
        neighbour.open(KEYSHARE_PURPOSE, ciphertext)
    with require_cipher(node, r).lease() as own, pytest.raises(UnwrapFailed):
        own.open(DECRYPTION_SHARE_PURPOSE, ciphertext)


def test_a_decryption_share_is_made_while_live_and_refused_after_purge(
    nodes: NodeFactory,
) -> None:
    node = nodes.open()
    r = rid("e3:decrypt")
    publish(node, request(r))
    keyshare = open_keyshare(node, r, keyshare_of(node, r))

    live_request = EventId.random()
    publish(node, DecryptionShareRequested(round_id=r, request_id=live_request))
    created = of_type(log_of(node.store), DecryptionShareCreated, r)
    assert [c.request_id for c in created] == [live_request]
    with require_cipher(node, r).lease() as cipher:
        share = cipher.open(DECRYPTION_SHARE_PURPOSE, created[0].ciphertext)
    assert share == derive_decryption_share(keyshare, r, live_request)

    publish(node, RoundComplete(round_id=r))
    late_request = EventId.random()
    publish(node, DecryptionShareRequested(round_id=r, request_id=late_request))
    failed = of_type(log_of(node.store), DecryptionShareFailed, r)
    assert [(f.request_id, f.reason) for f in failed] == [(late_request, "round_purged")]
    assert len(of_type(log_of(node.store), DecryptionShareCreated, r)) == 1


def test_the_deadline_reaper_fails_and_purges_a_round_nobody_ends(nodes: NodeFactory) -> None:
    node = nodes.open(reaper_grace=30.0)
    forgotten, patient = rid("e3:forgotten"), rid("e3:patient")
    publish(node, request(forgotten, deadline=T0 + 60), request(patient, deadline=FAR))
    leased = require_cipher(node, forgotten)

    nodes.clock.set(T0 + 60 + 30)  # exactly deadline + grace: not yet past it
    node.tick()
    settle(node)
    assert_live(node, forgotten)

    nodes.clock.advance(0.5)
    node.tick()
    settle(node)
    failed = [s for s in log_of(node.store) if isinstance(s.payload, RoundFailed)]
    assert [(s.source, s.round_id) for s in failed] == [("reaper", forgotten)]
    assert failures_of(node.store, forgotten) == [FailureReason.DEADLINE_EXCEEDED]
    assert_purged(node, forgotten)
    assert leased.is_wiped
    assert_live(node, patient)

    node.tick()  # fires once only
    settle(node)
    assert failures_of(node.store, forgotten) == [FailureReason.DEADLINE_EXCEEDED]


def test_no_key_bytes_reach_the_log_the_snapshots_the_files_or_the_logs(
    nodes: NodeFactory, data_dir: Path
) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    with capture_logs() as logs:
        node = nodes.open(snapshot_every=5)
        live = [rid(f"e3:live{i}") for i in range(4)]
        ended = [rid(f"e3:ended{i}") for i in range(4)]
        publish(node, *(request(r) for r in live + ended))
        keys = [raw_round_key(require_cipher(node, r)) for r in live + ended]
        keyshares = [open_keyshare(node, r, keyshare_of(node, r)) for r in live + ended]
        wrapped = [node.store.get_key(r) or b"" for r in live + ended]
        assert all(wrapped)
        for r in live:
            publish(node, DecryptionShareRequested(round_id=r, request_id=EventId.random()))
        publish(node, *(RoundComplete(round_id=r) for r in ended))
        node.snapshot()
        assert len(node.store.snapshot_sequences()) >= 2

        encoded = encoded_log(node.store)
        snapshot = node.store.latest_snapshot()
        assert snapshot is not None
        # Not a round key, a keyshare, nor even a wrapped key in any event or the snapshot.
        for secret in keys + keyshares + wrapped:
            assert not any(secret in record for record in encoded)
            assert secret not in snapshot[1]
        # No raw round key or keyshare anywhere in the data directory's files.
        files = b"".join(p.read_bytes() for p in sorted(data_dir.iterdir()) if p.is_file())
        for secret in keys + keyshares:
            assert secret not in files
        node.stop()

    assert logs, "the node logged nothing: the capture did not work"
    rendered = repr(logs)
    for secret in keys + keyshares + wrapped:
        assert secret.hex() not in rendered
        assert repr(secret) not in rendered


# --- bugs -------------------------------------------------------------------------------------


def test_a_round_completed_before_it_was_opened_is_never_reaped(nodes: NodeFactory) -> None:
    node = nodes.open(reaper_grace=30.0)
    r = rid("e3:cancelled")
    publish(node, request(r, deadline=T0 + 60), RoundComplete(round_id=r))
    assert node.router.is_completed(r)
    assert node.store.key_count() == 0

    nodes.clock.advance(1_000)
    node.tick()
    settle(node)
    assert failures_of(node.store, r) == [], "a completed round was failed by the reaper"
