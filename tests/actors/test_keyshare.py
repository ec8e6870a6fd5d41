from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import msgpack
import pytest
from structlog.testing import capture_logs

from enclave_keys.context import ContextRegistry, RoundContext
from enclave_keys.crypto import Keyring, RoundCipher, SecretBytes
from enclave_keys.epochs import EpochKeeper
from enclave_keys.errors import CorruptRecord, InvalidKeyMaterial, UnwrapFailed
from enclave_keys.events import (
    DecryptionShareCreated,
    DecryptionShareFailed,
    DecryptionShareRequested,
    Event,
    FailureReason,
    KeyshareCreated,
    RoundComplete,
    RoundFailed,
    RoundKeyReady,
    RoundOpened,
    RoundPurged,
    RoundStage,
)
from enclave_keys.handler import Handler
from enclave_keys.ids import EventId, KekVersion, KeyId, RoundId
from enclave_keys.keyshare import (
    DECRYPTION_SHARE_PURPOSE,
    KEYSHARE_PURPOSE,
    MAX_SHARE_SIZE,
    KeyshareCore,
    derive_decryption_share,
)
from enclave_keys.round_cipher import ROUND_CIPHER, LeasedRoundCipher, RoundCipherCore
from enclave_keys.store import MemoryStore
from tests.actors.helpers import T0, RecordingEntropy, make_keyring, open_keeper, stored

R = RoundId("e3:1")
WAIT = 10.0
KEK_BYTES = os.urandom(32)


@dataclass
class Node:
    """A round-cipher core and a keyshare core sharing one registry, driven by hand."""

    registry: ContextRegistry
    store: MemoryStore
    ring: Keyring
    keeper: EpochKeeper
    epoch_entropy: RecordingEntropy  # made the epoch key: a test may look at its bytes
    ciphers: RoundCipherCore
    keyshare: KeyshareCore

    def key_round(self, round_id: RoundId = R) -> RoundKeyReady:
        self.registry.open(round_id)
        (ready,) = self.ciphers.handle(stored(RoundOpened(round_id=round_id, deadline=T0)))
        assert isinstance(ready, RoundKeyReady)
        return ready

    def keyshare_round(self, round_id: RoundId = R) -> KeyshareCreated:
        """Key the round, make its keyshare and let the core see its own event."""
        ready = self.key_round(round_id)
        (created,) = self.keyshare.handle(stored(ready))
        assert isinstance(created, KeyshareCreated)
        assert self.keyshare.handle(stored(created, source="keyshare")) == ()
        return created

    def cipher(self, round_id: RoundId = R) -> LeasedRoundCipher:
        context = self.registry.get(round_id)
        assert context is not None
        return context.require(ROUND_CIPHER)

    def request(self, round_id: RoundId = R) -> tuple[EventId, Event]:
        request_id = EventId.random()
        event = DecryptionShareRequested(round_id=round_id, request_id=request_id)
        (answer,) = self.keyshare.handle(stored(event))
        return request_id, answer

    def purge(self, round_id: RoundId = R) -> None:
        (purged,) = self.ciphers.handle(stored(RoundComplete(round_id=round_id)))
        self.keyshare.handle(stored(purged, source="round-cipher"))


def build(*, share_size: int = 32, entropy: RecordingEntropy | None = None) -> Node:
    registry = ContextRegistry()
    store = MemoryStore()
    ring = make_keyring(key=KEK_BYTES)
    epoch_entropy = RecordingEntropy(seed=99)
    keeper = open_keeper(store, ring, lease_timeout=1.0, entropy=epoch_entropy)
    ciphers = RoundCipherCore(store, keeper, registry, lease_timeout=1.0, entropy=entropy)
    keyshare = KeyshareCore(registry, share_size=share_size, entropy=entropy)
    return Node(registry, store, ring, keeper, epoch_entropy, ciphers, keyshare)


@pytest.fixture
def node() -> Iterator[Node]:
    made = build()
    yield made
    made.ciphers.wipe_all()
    made.keeper.close()
    made.ring.seal()


def test_keyshare_core_is_a_handler(node: Node) -> None:
    assert isinstance(node.keyshare, Handler)
    assert node.keyshare.name == "keyshare"
    assert RoundKeyReady in (node.keyshare.subscriptions or ())


def test_share_opens_under_the_round_key_and_not_under_the_kek(node: Node) -> None:
    created = node.keyshare_round()
    assert created.key_id == node.cipher().key_id
    with node.cipher().lease() as cipher:
        share = cipher.open(KEYSHARE_PURPOSE, created.ciphertext)
    assert len(share) == 32
    # the same envelope, tried with the master key's (and the storage epoch key's) bytes
    # as if either were the round key
    (epoch_key,) = node.epoch_entropy.secrets_of_size(32)
    for wrong in (KEK_BYTES, epoch_key):
        master = RoundCipher(R, created.key_id, SecretBytes.from_bytes(wrong))
        with master, pytest.raises(UnwrapFailed):
            master.open(KEYSHARE_PURPOSE, created.ciphertext)
    assert node.keyshare.keyshare_of(R) == (created.key_id, created.ciphertext)


def test_share_size_is_honoured_and_validated() -> None:
    big = build(share_size=4096)
    created = big.keyshare_round()
    with big.cipher().lease() as cipher:
        assert len(cipher.open(KEYSHARE_PURPOSE, created.ciphertext)) == 4096
    big.ciphers.wipe_all()
    KeyshareCore(ContextRegistry(), share_size=MAX_SHARE_SIZE)
    for bad in (31, MAX_SHARE_SIZE + 1, True, 32.0, "32"):
        with pytest.raises(InvalidKeyMaterial, match="share_size"):
            KeyshareCore(ContextRegistry(), share_size=bad)  # type: ignore[arg-type]


def test_missing_cipher_fails_the_round(node: Node) -> None:
    node.registry.open(R)  # a context, but no cipher in it
    ready = RoundKeyReady(round_id=R, key_id=KeyId.random(), kek_version=KekVersion(1))
    (failed,) = node.keyshare.handle(stored(ready))
    assert isinstance(failed, RoundFailed)
    assert (failed.failed_at, failed.reason) == (
        RoundStage.KEY_GENERATION,
        FailureReason.ROUND_CIPHER_MISSING,
    )


def test_a_cipher_for_another_key_is_not_used(node: Node) -> None:
    node.key_round()
    ready = RoundKeyReady(round_id=R, key_id=KeyId.random(), kek_version=KekVersion(1))
    (failed,) = node.keyshare.handle(stored(ready))
    assert isinstance(failed, RoundFailed)
    assert failed.reason is FailureReason.ROUND_CIPHER_MISSING


def test_no_keyshare_once_the_round_ended(node: Node) -> None:
    ready = node.key_round()
    node.cipher().retire(0.0)  # purged meanwhile
    assert node.keyshare.handle(stored(ready)) == ()
    node.registry.close(R)  # the context is gone
    assert node.keyshare.handle(stored(ready)) == ()


def test_duplicate_key_ready_makes_no_second_share(node: Node) -> None:
    created = node.keyshare_round()
    ready = RoundKeyReady(round_id=R, key_id=created.key_id, kek_version=KekVersion(1))
    assert node.keyshare.handle(stored(ready)) == ()


def test_decryption_share_is_sealed_under_the_round_key(node: Node) -> None:
    created = node.keyshare_round()
    request_id, answer = node.request()
    assert isinstance(answer, DecryptionShareCreated)
    assert answer.request_id == request_id
    with node.cipher().lease() as cipher:
        share = cipher.open(KEYSHARE_PURPOSE, created.ciphertext)
        derived = cipher.open(DECRYPTION_SHARE_PURPOSE, answer.ciphertext)
    assert derived == derive_decryption_share(share, R, request_id)
    _, again = node.request()
    assert isinstance(again, DecryptionShareCreated)
    assert again.ciphertext != answer.ciphertext


def test_decryption_share_after_purge_fails_cleanly(node: Node) -> None:
    node.keyshare_round()
    node.purge()
    request_id, answer = node.request()
    assert answer == DecryptionShareFailed(round_id=R, request_id=request_id, reason="round_purged")
    assert node.keyshare.keyshare_of(R) is None


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        ("unknown", "unknown_round"),
        ("no_keyshare", "no_keyshare"),
        ("retired", "round_cipher_retired"),
        ("removed", "round_cipher_missing"),
        ("closed", "round_purged"),
        ("garbled", "keyshare_unreadable"),
        ("other_key", "key_mismatch"),
    ],
)
def test_decryption_share_failures_have_short_reasons(node: Node, setup: str, reason: str) -> None:
    if setup == "no_keyshare":
        node.key_round()
    elif setup != "unknown":
        node.keyshare_round()
    context = node.registry.get(R)
    if setup == "retired":
        node.cipher().retire(0.0)
    elif setup == "removed" and context is not None:
        context.remove(ROUND_CIPHER)
    elif setup == "closed":
        node.registry.close(R)
    elif setup in ("garbled", "other_key"):
        key_id = node.cipher().key_id if setup == "garbled" else KeyId.random()
        garbled = KeyshareCreated(round_id=R, key_id=key_id, ciphertext=b"\x01" * 80)
        node.keyshare.handle(stored(garbled, source="keyshare"))
    request_id, answer = node.request()
    assert answer == DecryptionShareFailed(round_id=R, request_id=request_id, reason=reason)


class ExplodingRegistry(ContextRegistry):
    def get(self, round_id: RoundId) -> RoundContext | None:
        raise RuntimeError("boom")


def test_no_exception_escapes_a_decryption_share_request() -> None:
    core = KeyshareCore(ExplodingRegistry())
    request_id = EventId.random()
    (answer,) = core.handle(stored(DecryptionShareRequested(round_id=R, request_id=request_id)))
    assert answer == DecryptionShareFailed(
        round_id=R, request_id=request_id, reason="internal_error"
    )


def test_keyshares_of_other_publishers_are_not_adopted(node: Node) -> None:
    node.key_round()
    theirs = KeyshareCreated(round_id=R, key_id=node.cipher().key_id, ciphertext=b"\x01" * 80)
    node.keyshare.handle(stored(theirs, source="someone-else"))
    assert node.keyshare.keyshare_of(R) is None


def test_round_complete_forgets_the_keyshare(node: Node) -> None:
    node.keyshare_round()
    node.keyshare.handle(stored(RoundComplete(round_id=R)))
    assert node.keyshare.rounds_with_keyshare() == []


# --- replay and snapshots --------------------------------------------------------------


def test_replay_rebuilds_state_and_creates_nothing(node: Node) -> None:
    first = node.keyshare_round(RoundId("a"))
    second = node.keyshare_round(RoundId("b"))
    node.purge(RoundId("b"))
    replayed = KeyshareCore(node.registry)
    log = [
        stored(
            RoundKeyReady(round_id=RoundId("a"), key_id=first.key_id, kek_version=KekVersion(1))
        ),
        stored(first, source="keyshare"),
        stored(second, source="keyshare"),
        stored(DecryptionShareRequested(round_id=RoundId("a"), request_id=EventId.random())),
        stored(RoundPurged(round_id=RoundId("b"), key_id=second.key_id), source="round-cipher"),
    ]
    for event in log:
        replayed.replay(event)
    assert replayed.snapshot_state() == node.keyshare.snapshot_state()
    # the rebuilt core answers like the original
    request_id = EventId.random()
    request = DecryptionShareRequested(round_id=RoundId("a"), request_id=request_id)
    (answer,) = replayed.handle(stored(request))
    assert isinstance(answer, DecryptionShareCreated)


def test_snapshot_round_trips_through_msgpack(node: Node) -> None:
    created = node.keyshare_round(RoundId("a"))
    node.keyshare_round(RoundId("b"))
    node.purge(RoundId("b"))
    snapshot = node.keyshare.snapshot_state()
    assert snapshot == {
        "version": 1,
        "shares": [
            {"round_id": "a", "key_id": created.key_id.hex(), "ciphertext": created.ciphertext}
        ],
        "ended": ["b"],
    }
    restored = KeyshareCore(node.registry)
    restored.restore_state(msgpack.unpackb(msgpack.packb(snapshot), raw=False))
    assert restored.snapshot_state() == snapshot


@pytest.mark.parametrize(
    "bad",
    [
        None,
        {"version": 2, "shares": [], "ended": []},
        {"version": 1, "shares": None, "ended": []},
        {"version": 1, "shares": [], "ended": [3]},
        {"version": 1, "shares": ["a"], "ended": []},
        {
            "version": 1,
            "shares": [{"round_id": "a", "key_id": "zz", "ciphertext": b"x"}],
            "ended": [],
        },
        {
            "version": 1,
            "shares": [{"round_id": "a", "key_id": "00" * 16, "ciphertext": "x"}],
            "ended": [],
        },
        {
            "version": 1,
            "shares": [{"round_id": "a", "key_id": "00" * 16, "ciphertext": b""}],
            "ended": [],
        },
        {
            "version": 1,
            "shares": [{"round_id": "!", "key_id": "00" * 16, "ciphertext": b"x"}],
            "ended": [],
        },
        {
            "version": 1,
            "shares": [{"round_id": "a", "key_id": "00" * 16, "ciphertext": b"x"}] * 2,
            "ended": [],
        },
    ],
)
def test_malformed_snapshots_are_refused(node: Node, bad: object) -> None:
    node.keyshare_round()
    before = node.keyshare.snapshot_state()
    with pytest.raises(CorruptRecord):
        node.keyshare.restore_state(bad)
    assert node.keyshare.snapshot_state() == before


def test_no_share_bytes_in_logs_events_or_reprs() -> None:
    entropy = RecordingEntropy(seed=11)
    node = build(share_size=64, entropy=entropy)
    with capture_logs() as logs:
        created = node.keyshare_round()
        _, answer = node.request()
        node.purge()
    (share,) = entropy.secrets_of_size(64)
    (round_key,) = entropy.secrets_of_size(32)
    text = repr(logs) + repr([created, answer]) + repr(node.keyshare)
    for secret in (share, round_key):
        assert secret.hex() not in text
        assert repr(secret) not in text
    assert share not in created.ciphertext


def test_a_keyshare_logged_after_its_rounds_purge_is_not_kept(node: Node) -> None:
    """The seal happened under the cipher's lease, before the purge; the purge's
    RoundPurged reached the log first all the same. The ended round keeps no share."""
    ready = node.key_round(R)
    (created,) = node.keyshare.handle(stored(ready))
    assert isinstance(created, KeyshareCreated)
    (purged,) = node.ciphers.handle(stored(RoundComplete(round_id=R)))
    node.keyshare.handle(stored(RoundComplete(round_id=R)))
    node.keyshare.handle(stored(purged, source="round-cipher"))
    node.registry.close(R)
    node.keyshare.handle(stored(created, source="keyshare"))
    assert node.keyshare.keyshare_of(R) is None
    assert node.keyshare.snapshot_state()["shares"] == []


def retire_during_the_next_seal(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> tuple[LeasedRoundCipher, list[threading.Thread]]:
    """R's cipher, and (once started) the thread that retires it: the next seal under it
    starts that retirement and returns only once it has begun (the purge waits for the
    seal's lease, then wipes)."""
    context = node.registry.get(R)
    assert context is not None
    leased = context.require(ROUND_CIPHER)
    seal = RoundCipher.seal
    retiring: list[threading.Thread] = []

    def purged_meanwhile(self: RoundCipher, purpose: str, plaintext: bytes) -> bytes:
        sealed = seal(self, purpose, plaintext)
        thread = threading.Thread(target=leased.retire, args=(WAIT,))
        thread.start()
        retiring.append(thread)
        while not leased.retired:  # the retirement has begun (it sets this first)
            pass
        return sealed

    monkeypatch.setattr(RoundCipher, "seal", purged_meanwhile)
    return leased, retiring


def test_no_keyshare_is_published_for_a_cipher_retired_during_its_seal(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A purge that begins while the share is sealed waits for the seal's lease, then
    publishes RoundPurged: a KeyshareCreated published after that seal would be logged
    after the purge. The share is dropped instead."""
    ready = node.key_round(R)
    leased, retiring = retire_during_the_next_seal(node, monkeypatch)
    with capture_logs() as logs:
        assert node.keyshare.handle(stored(ready)) == ()
    retiring[0].join(WAIT)
    assert leased.is_wiped
    assert [e["why"] for e in logs if e["event"] == "keyshare_not_created"] == [
        "round_cipher_retired"
    ]


def test_no_decryption_share_is_published_for_a_cipher_retired_during_its_seal(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As for a keyshare: a share sealed just before the purge would be logged after it."""
    node.keyshare_round(R)
    _, retiring = retire_during_the_next_seal(node, monkeypatch)
    request_id = EventId.random()
    (answer,) = node.keyshare.handle(
        stored(DecryptionShareRequested(round_id=R, request_id=request_id))
    )
    retiring[0].join(WAIT)
    assert answer == DecryptionShareFailed(
        round_id=R, request_id=request_id, reason="round_cipher_retired"
    )


def test_a_late_duplicate_purge_does_not_reorder_the_ended_rounds() -> None:
    """As the router remembers completions (first only), so does this core: the two
    forget the same rounds at the horizon."""
    core = KeyshareCore(ContextRegistry(), horizon=2)
    a, b, c = RoundId("e3:a"), RoundId("e3:b"), RoundId("e3:c")
    for rid in (a, b, a, c):  # the second `a` is a late duplicate
        core.handle(stored(RoundPurged(round_id=rid, key_id=KeyId(b"\x01" * 16))))
    assert core.snapshot_state()["ended"] == [b.value, c.value]
