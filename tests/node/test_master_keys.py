"""The master-key operations of a node (design §5, issue 4), end to end on real LMDB.

* the key ceremony: a Shamir-initialised node starts sealed and unseals share by share;
  rejected shares leave it sealed and still accepting; any 3 of 5 shares unseal, 2 do not;
* :meth:`Node.seal` wipes every key and :meth:`Node.start` brings every live round back;
* :meth:`Node.rotate_kek` while another thread keeps creating and completing rounds;
* :meth:`Node.rekey_root`: a new passphrase, a migration off the environment key, a move
  from a passphrase to a share set — the rekey never touches a round key blob or the epoch
  slots (restarts do: each start ratchets the storage epoch, which rewraps every live
  round key, so across restarts the tests compare key ids and open the keyshares);
* HSM auto-unseal over SoftHSM2 (same skip-or-require rule as ``tests/unseal/test_hsm``);
* SIGTERM to a child process running a node with :meth:`Node.install_signal_handlers`;
* an audit: a run of all of the above, with every log line and every event of every log
  searched for root keys, KEKs, round keys, passphrases and share words.

Each scenario is a function over a :class:`Bench` (data directories under ``tmp_path``,
one ManualClock, the runtime, the nodes to stop at teardown, the secrets seen): its own
test runs it, and the audit test runs them all again under a log capture.
"""

from __future__ import annotations

import base64
import dataclasses
import itertools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from enclave_keys.clock import ManualClock
from enclave_keys.crypto import KekState, SecretBytes, read_wrapped_header
from enclave_keys.errors import (
    CeremonyError,
    DuplicateShare,
    EnclaveKeysError,
    HsmError,
    InvalidShare,
    LifecycleError,
    MismatchedShare,
    Sealed,
    UnsealMismatch,
    WrongPassphrase,
)
from enclave_keys.events import (
    KekRotated,
    NodeSealed,
    NodeUnsealed,
    RootRekeyed,
    RoundComplete,
    RoundKeyReady,
    UnsealProgress,
)
from enclave_keys.ids import KekVersion, KeyId, RoundId
from enclave_keys.master import KEYRING_RECORD, METHOD_RECORD, KekRotation, MasterKeys
from enclave_keys.node import Node, NodeConfig
from enclave_keys.store import LmdbStore, Store
from enclave_keys.store.slots import SLOT_COUNT
from enclave_keys.unseal import (
    CeremonyProgress,
    EnvKeyUnseal,
    KeyUnseal,
    PassphraseUnseal,
    ShamirUnseal,
    UnsealSource,
)
from enclave_keys.unseal.env import DEFAULT_ENV_VARIABLE, ENV_VERIFIER_RECORD
from enclave_keys.unseal.hsm import SEALED_ROOT_RECORD
from enclave_keys.unseal.passphrase import PASSPHRASE_RECORD
from enclave_keys.unseal.shamir import SHARE_SET_RECORD, ShareSetRecord
from tests.node.child import KEY_FD, ChildProcess
from tests.node.conftest import (
    WAIT,
    RuntimeName,
    assert_no_handler_failures,
    encoded_log,
    keyshare_ciphertexts,
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
)
from tests.unseal.helpers import fast_params, flatten_logs, windows
from tests.unseal.test_hsm import PIN, SoftHsm, softhsm  # noqa: F401 (the fixture, by name)
from tests.unseal.test_shamir import foreign_set

THRESHOLD, COUNT = 3, 5
OLD_PASSPHRASE = "correct horse battery staple, the old one"
NEW_PASSPHRASE = "a brand new passphrase for the rekeyed node"
SIGNAL_BOUND = 4.0
"""How long a child may take to stop and exit after SIGTERM (seconds)."""


# --- secrets seen, and where they must not be -----------------------------------------------


@dataclass
class Secrets:
    """Every secret a scenario saw, by label; the data directories it used."""

    keys: dict[str, bytes] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)
    shares: list[str] = field(default_factory=list)
    dirs: list[Path] = field(default_factory=list)

    def remember(self, node: Node, label: str) -> None:
        """The node's root key, active KEK, current storage epoch key and every live round
        key it holds."""
        master = node.master
        with master._root.borrow() as view:
            self.keys[f"{label}/root"] = bytes(view)
        with master.active_kek() as kek, kek._borrow_key() as view:
            self.keys[f"{label}/kek/{kek.version}"] = bytes(view)
        with node.epochs.active_epoch() as epoch, epoch._borrow_key() as view:
            self.keys[f"{label}/epoch/{epoch.number}"] = bytes(view)
        for round_id in node.registry.round_ids():
            leased = leased_cipher(node, round_id)
            if leased is not None and not leased.is_wiped:
                self.keys[f"round/{round_id}"] = raw_round_key(leased)

    def forms(self) -> list[tuple[str, bytes]]:
        """Every secret in every form it could be written in, as bytes to search for."""
        found: list[tuple[str, bytes]] = []
        for label, key in self.keys.items():
            found += [
                (label, key),
                (f"{label} (hex)", key.hex().encode()),
                (f"{label} (HEX)", key.hex().upper().encode()),
                (f"{label} (base64)", base64.b64encode(key).rstrip(b"=")),
            ]
        for label, text in self.texts.items():
            found.append((label, text.encode()))
        for n, share in enumerate(self.shares):
            found += [(f"share {n} words", w.encode()) for w in windows(share.split())]
        return found


def scan_logs(logs: Sequence[MutableMapping[str, Any]], secrets: Secrets) -> None:
    """No secret in any captured log entry: rendered, or as a bytes value."""
    rendered = flatten_logs(logs).encode()
    forms = secrets.forms()
    for label, form in forms:
        assert form not in rendered, f"{label} appears in a log entry"
    for entry in logs:
        for value in entry.values():
            if isinstance(value, bytes | bytearray | memoryview):
                raw = bytes(value)
                for label, key in secrets.keys.items():
                    assert key not in raw, f"{label} is a bytes value of a log entry"


def scan_stores(secrets: Secrets) -> int:
    """No secret in any stored event of any data directory; returns the events searched."""
    searched = 0
    forms = secrets.forms()
    for data_dir in secrets.dirs:
        with LmdbStore.open(data_dir, create=False) as store:
            records = encoded_log(store)
            latest = store.latest_snapshot()
        if latest is not None:
            records.append(latest[1])
        for record in records:
            for label, form in forms:
                assert form not in record, f"{label} appears in the log of {data_dir.name}"
        searched += len(records)
    return searched


# --- the bench ------------------------------------------------------------------------------


class Bench:
    """Data directories, the clock, the runtime, and every node opened (stopped at the end)."""

    def __init__(self, base: Path, clock: ManualClock, runtime: RuntimeName) -> None:
        self.base = base
        self.clock = clock
        self.runtime: RuntimeName = runtime
        self.secrets = Secrets()
        self._opened: list[Node] = []

    def new_dir(self, name: str) -> Path:
        path = self.base / f"{name}-{len(self.secrets.dirs)}"
        self.secrets.dirs.append(path)
        return path

    def config(self) -> NodeConfig:
        return NodeConfig(runtime=self.runtime, idle_timeout=WAIT)

    def open(self, data_dir: Path, source: UnsealSource | None = None) -> Node:
        node = Node.open(data_dir, source, clock=self.clock, config=self.config())
        self._opened.append(node)
        return node

    def close_all(self) -> None:
        for node in self._opened:
            try:
                node.stop()
            except EnclaveKeysError:
                node.crash()


@pytest.fixture
def bench(tmp_path: Path, clock: ManualClock, runtime: RuntimeName) -> Iterator[Bench]:
    made = Bench(tmp_path, clock, runtime)
    yield made
    made.close_all()


@dataclass
class Rounds:
    """Rounds a scenario left live (with their keyshare ciphertexts) and ended."""

    live: list[RoundId]
    ended: list[RoundId]
    keyshares: dict[RoundId, bytes]


def make_rounds(node: Node, prefix: str, live: int = 4, ended: int = 2) -> Rounds:
    live_ids = [rid(f"{prefix}:live{i}") for i in range(live)]
    ended_ids = [rid(f"{prefix}:ended{i}") for i in range(ended)]
    publish(node, *(request(r) for r in live_ids + ended_ids))
    publish(node, *(RoundComplete(round_id=r) for r in ended_ids))
    shares = keyshare_ciphertexts(log_of(node.store))
    return Rounds(live_ids, ended_ids, {r: shares[r] for r in live_ids})


def check_live(node: Node, rounds: Rounds, *, hydrated: bool = True) -> None:
    """Every live round is back with its key (its keyshare opens), stored under the
    current epoch; no ended round is."""
    assert not node.sealed
    if hydrated:
        assert node.recovery.hydrated == tuple(sorted(rounds.live))
        assert node.recovery.failed == ()
        assert node.recovery.purged == ()
    assert sorted(node.router.open_rounds()) == sorted(rounds.live)
    check_epoch(node)
    for r in rounds.live:
        assert len(open_keyshare(node, r, rounds.keyshares[r])) == 32
    for r in rounds.ended:
        assert node.store.get_key(r) is None
        assert leased_cipher(node, r) is None
    assert_no_handler_failures(node.store)


def blobs_of(node: Node) -> dict[RoundId, bytes]:
    return dict(node.store.list_keys())


def key_ids_of(node: Node) -> dict[RoundId, KeyId]:
    """Each stored round key's key id, read from its blob's header.

    A blob's bytes change with every epoch change (each start, a seal or stop with purges
    pending, a rotation, the window after a purge); the key inside does not: compare these
    ids, and open the keyshares (:func:`check_live`), across such steps.
    """
    return {r: read_wrapped_header(blob)[1] for r, blob in node.store.list_keys()}


def check_epoch(node: Node) -> None:
    """Every stored round key is under the node's current storage epoch, whose key is kept
    under the active KEK. Read under an epoch lease: no ratchet (the Pykka node's timer
    thread) runs in between."""
    with node.epochs.active_epoch() as epoch:
        assert node.epochs.kek_version == node.master.active_version
        for r, blob in node.store.list_keys():
            assert read_wrapped_header(blob)[0] == epoch.number, f"{r} is not under {epoch}"


def slot_bytes(store: Store) -> list[bytes]:
    """The raw epoch slots (the wrapped epoch key and its sequence number)."""
    slots = store.epoch_slots()
    return [slots.read(index) for index in range(SLOT_COUNT)]


def shamir_store(data_dir: Path, threshold: int, count: int) -> tuple[list[str], bytes]:
    """Initialise ``data_dir`` for a ceremony as ``enclave-keys init --shares`` does.

    Returns the share mnemonics and the root key (for the leak scans).
    """
    enrolment, mnemonics = ShamirUnseal.enrol_shares(threshold, count)
    with enrolment.root.borrow() as view:
        root = bytes(view)
    with LmdbStore.open(data_dir) as store:
        master = MasterKeys.initialise(store, enrolment.root, "shamir", enrolment.records)
        master.seal(force=True)
    return mnemonics, root


def mistyped(mnemonic: str) -> str:
    """The share with one word replaced by another word of the list: the checksum fails."""
    words = mnemonic.split()
    words[7] = "academic" if words[7] != "academic" else "acid"
    return " ".join(words)


def no_share_text(message: str, mnemonics: Sequence[str]) -> None:
    for mnemonic in mnemonics:
        for window in windows(mnemonic.split()):
            assert window not in message


# --- 1. the key ceremony --------------------------------------------------------------------


def ceremony_scenario(bench: Bench) -> None:
    data_dir = bench.new_dir("ceremony")
    mnemonics, root = shamir_store(data_dir, THRESHOLD, COUNT)
    bench.secrets.shares += mnemonics
    bench.secrets.keys["ceremony/root"] = root

    # First ceremony: the node starts sealed, unseals at the third share, makes rounds.
    node = bench.open(data_dir)
    assert node.sealed
    with pytest.raises(Sealed):
        node.publish(request(rid("ceremony:too-early")))
    with pytest.raises(Sealed):
        _ = node.master
    with pytest.raises(Sealed):
        node.start()  # no source: only shares unseal this node
    assert node.submit_share(mnemonics[0]) == CeremonyProgress(1, THRESHOLD, complete=False)
    assert node.sealed
    assert node.submit_share(mnemonics[1]) == CeremonyProgress(2, THRESHOLD, complete=False)
    assert node.sealed
    assert node.submit_share(mnemonics[2]) == CeremonyProgress(3, THRESHOLD, complete=True)
    assert not node.sealed
    assert node.master.method == "shamir"
    with pytest.raises(LifecycleError):
        node.submit_share(mnemonics[3])
    rounds = make_rounds(node, "ceremony")
    bench.secrets.remember(node, "ceremony/1")
    node.stop()

    # Second ceremony, after a restart, with every kind of rejected share along the way.
    other, other_mnemonics = ShamirUnseal.enrol_shares(THRESHOLD, COUNT)
    other.wipe()
    bench.secrets.shares += other_mnemonics
    with LmdbStore.open(data_dir) as store:
        record = store.get_meta(SHARE_SET_RECORD)
        assert record is not None
        identifier = ShareSetRecord.from_bytes(record).identifier
        before = len(log_of(store))
    impostor = foreign_set(identifier, os.urandom(32))  # our set id, another secret
    bench.secrets.shares += impostor
    node = bench.open(data_dir)
    assert node.sealed
    rejected: list[str] = []
    progress = node.submit_share(mnemonics[4])
    assert progress == CeremonyProgress(1, THRESHOLD, complete=False)
    bad: list[tuple[str, type[CeremonyError]]] = [
        (mistyped(mnemonics[3]), InvalidShare),
        ("not a share at all", InvalidShare),
        (mnemonics[4], DuplicateShare),
        (mnemonics[4].upper(), DuplicateShare),
        (other_mnemonics[3], MismatchedShare),
    ]
    for share, error in bad:
        with pytest.raises(error) as caught:
            node.submit_share(share)
        rejected.append(str(caught.value))
        assert node.sealed
        with pytest.raises(Sealed):
            node.publish(request(rid("ceremony:sealed")))
    # The accepted share was kept through all of that: the next one makes two.
    assert node.submit_share(mnemonics[1]) == CeremonyProgress(2, THRESHOLD, complete=False)
    # A third share of our set id but another secret: the digest fails, the ceremony resets.
    with pytest.raises(MismatchedShare, match="reset") as caught:
        node.submit_share(impostor[2])
    rejected.append(str(caught.value))
    assert node.sealed
    assert node.submit_share(mnemonics[3]) == CeremonyProgress(1, THRESHOLD, complete=False)
    assert node.submit_share(mnemonics[0]) == CeremonyProgress(2, THRESHOLD, complete=False)
    assert node.submit_share(mnemonics[2]) == CeremonyProgress(3, THRESHOLD, complete=True)
    check_live(node, rounds)
    for message in rejected:
        no_share_text(message, mnemonics + other_mnemonics + impostor)

    # The audit trail of the second ceremony: counts only, then the unseal.
    events = log_of(node.store)[before:]
    progress_events = of_type(events, UnsealProgress)
    assert [(p.submitted, p.threshold) for p in progress_events] == [
        (1, 3),
        (2, 3),
        (1, 3),
        (2, 3),
        (3, 3),
    ]
    assert [f.name for f in dataclasses.fields(UnsealProgress)] == ["submitted", "threshold"]
    unsealed = of_type(events, NodeUnsealed)
    assert unsealed == [NodeUnsealed(method="shamir", active_kek=KekVersion(1))]
    tags = [s.tag for s in events]
    assert tags.index(NodeUnsealed.TAG) > max(
        i for i, t in enumerate(tags) if t == UnsealProgress.TAG
    )
    assert all(s.round_id is None for s in events if isinstance(s.payload, UnsealProgress))

    # Sealed again, the node takes a fresh ceremony (any three shares) and comes back.
    node.seal()
    assert node.sealed
    assert node.submit_share(mnemonics[2]).submitted == 1
    assert node.submit_share(mnemonics[4]).submitted == 2
    assert node.submit_share(mnemonics[3]).complete
    check_live(node, rounds)
    node.stop()


def test_a_key_ceremony_unseals_a_sealed_node_share_by_share(bench: Bench) -> None:
    ceremony_scenario(bench)


def subsets_scenario(bench: Bench) -> None:
    """Every 3 of the 5 shares unseal (with the live round intact); no 2 of them do."""
    data_dir = bench.new_dir("subsets")
    mnemonics, root = shamir_store(data_dir, THRESHOLD, COUNT)
    bench.secrets.shares += mnemonics
    bench.secrets.keys["subsets/root"] = root
    node = bench.open(data_dir)
    for share in mnemonics[:THRESHOLD]:
        node.submit_share(share)
    rounds = make_rounds(node, "subsets", live=1, ended=0)
    node.stop()

    unsealed = 0
    for subset in itertools.combinations(range(COUNT), THRESHOLD):
        node = bench.open(data_dir)
        for index in subset:
            progress = node.submit_share(mnemonics[index])
        assert progress.complete, subset
        assert not node.sealed, subset
        check_live(node, rounds)
        node.stop()
        unsealed += 1
    assert unsealed == 10

    refused = 0
    for pair in itertools.combinations(range(COUNT), THRESHOLD - 1):
        node = bench.open(data_dir)
        for index in pair:
            progress = node.submit_share(mnemonics[index])
        assert progress == CeremonyProgress(2, THRESHOLD, complete=False), pair
        assert node.sealed, pair
        with pytest.raises(Sealed):
            node.publish(request(rid("subsets:sealed")))
        with pytest.raises(Sealed):
            _ = node.router
        node.stop()
        refused += 1
    assert refused == 10
    with LmdbStore.open(data_dir) as store:
        assert dict(store.list_keys()).keys() == set(rounds.live)


def test_any_three_of_five_shares_unseal_and_no_two_do(bench: Bench) -> None:
    subsets_scenario(bench)


# --- 2. seal and unseal again ------------------------------------------------------------------


def seal_scenario(bench: Bench, master: SecretBytes) -> None:
    data_dir = bench.new_dir("seal")
    node = bench.open(data_dir, KeyUnseal(master))
    rounds = make_rounds(node, "seal")
    bench.secrets.remember(node, "seal")
    held = {r: require_cipher(node, r) for r in rounds.live}
    key_ids = key_ids_of(node)
    assert key_ids.keys() == set(rounds.live)

    node.seal()
    assert node.sealed
    for r, leased in held.items():
        assert leased.is_wiped, f"seal left the round key of {r} in memory"
    assert len(node.registry) == 0
    with pytest.raises(Sealed):
        _ = node.master
    with pytest.raises(Sealed):
        node.publish(request(rid("seal:sealed")))
    with pytest.raises(Sealed):
        node.rotate_kek()
    with (
        PassphraseUnseal(NEW_PASSPHRASE, fast_params()).enrol() as enrolment,
        pytest.raises(Sealed),
    ):
        node.rekey_root(enrolment, "passphrase")
    assert key_ids_of(node) == key_ids, "seal must keep the wrapped round keys in the store"
    assert len(of_type(log_of(node.store), NodeSealed)) == 1

    node.start(KeyUnseal(master))
    check_live(node, rounds)
    for r, leased in held.items():
        again = require_cipher(node, r)
        assert again is not leased
        assert not again.is_wiped
    events = log_of(node.store)
    tags = [s.tag for s in events]
    assert tags.count(NodeUnsealed.TAG) == 2
    assert tags.index(NodeSealed.TAG) < len(tags) - 1 - tags[::-1].index(NodeUnsealed.TAG)
    assert key_ids_of(node) == key_ids
    # The unsealed node works as before: a new round is keyed under the same keyring.
    fresh = rid("seal:after")
    publish(node, request(fresh))
    assert require_cipher(node, fresh) is not None
    node.stop()


def test_seal_wipes_every_key_and_start_brings_every_live_round_back(
    bench: Bench, master: SecretBytes
) -> None:
    seal_scenario(bench, master)


# --- 3. KEK rotation under load --------------------------------------------------------------


@dataclass
class Load:
    """What the publishing thread did: rounds requested, rounds completed, errors."""

    requested: list[RoundId] = field(default_factory=list)
    completed: list[RoundId] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)
    stop: threading.Event = field(default_factory=threading.Event)

    def made_at_least(self, count: int) -> bool:
        with self.cond:
            return self.cond.wait_for(
                lambda: len(self.requested) >= count or bool(self.errors), WAIT
            )


def publisher(node: Node, load: Load, limit: int) -> None:
    """Request rounds and complete every other one (oldest live first) until told to stop."""
    live: list[RoundId] = []
    try:
        for i in range(limit):
            if load.stop.is_set():
                break
            r = rid(f"load:{i:05d}")
            node.publish(request(r))
            live.append(r)
            ended: RoundId | None = None
            if i % 2 == 1:
                ended = live.pop(0)
                node.publish(RoundComplete(round_id=ended))
            with load.cond:
                load.requested.append(r)
                if ended is not None:
                    load.completed.append(ended)
                load.cond.notify_all()
    except BaseException as exc:
        with load.cond:
            load.errors.append(exc)
            load.cond.notify_all()


def rotation_scenario(
    bench: Bench, master: SecretBytes, *, rotations: int = 4, per_rotation: int = 12
) -> None:
    assert bench.runtime == "pykka", "rotation under load needs concurrent actors"
    data_dir = bench.new_dir("rotation")
    node = bench.open(data_dir, KeyUnseal(master))
    bench.secrets.remember(node, "rotation/0")
    load = Load()
    worker = threading.Thread(target=publisher, args=(node, load, 10_000), daemon=True)
    worker.start()
    done: list[KekRotation] = []
    try:
        for turn in range(rotations):
            assert load.made_at_least((turn + 1) * per_rotation), "the publisher stalled"
            assert not load.errors
            done.append(node.rotate_kek(timeout=WAIT))
            bench.secrets.remember(node, f"rotation/{turn + 1}")
        # The load goes on under the newest KEK for a while before it stops.
        assert load.made_at_least((rotations + 1) * per_rotation)
    finally:
        load.stop.set()
        worker.join(WAIT)
    assert not worker.is_alive()
    assert load.errors == []
    settle(node)
    assert_no_handler_failures(node.store)

    newest = KekVersion(1 + rotations)
    assert [(r.old_version, r.new_version) for r in done] == [
        (KekVersion(n), KekVersion(n + 1)) for n in range(1, rotations + 1)
    ]
    assert node.master.active_version == newest
    assert node.master.versions()[-1] == (newest, KekState.ACTIVE)
    assert all(state is KekState.RETIRED for _, state in node.master.versions()[:-1])
    # No live round lost: each has its key, under the newest KEK, and its keyshare opens.
    completed = set(load.completed)
    live = [r for r in load.requested if r not in completed]
    rounds = Rounds(live, sorted(completed), keyshare_ciphertexts(log_of(node.store)))
    assert blobs_of(node).keys() == set(live)
    assert node.epochs.kek_version == newest  # the epoch key is kept under the newest KEK
    check_live(node, rounds, hydrated=False)  # each key under the current epoch, and works
    # The audit trail: one KekRotated per rotation, as returned, with a count that fits
    # the log. Rotation k rewrapped every key stored under a version <= its old one that
    # is still live now (nothing deletes a live round's key) and no key stored later. A
    # round completed as it was being keyed may have had a key for a moment and never a
    # RoundKeyReady (round_cipher: ContextClosed, then _undo): those widen the upper bound.
    events = log_of(node.store)
    assert of_type(events, KekRotated) == [r.event() for r in done]
    keyed_under = {k.round_id: k.kek_version.number for k in of_type(events, RoundKeyReady)}
    assert set(live) <= set(keyed_under)
    never_announced = set(load.requested) - set(keyed_under)
    assert never_announced <= completed
    assert len(set(keyed_under.values())) >= 2, "no round was keyed while rotations ran"
    for rotation in done:
        before = {r for r, v in keyed_under.items() if v <= rotation.old_version.number}
        lowest = len(before & set(live))
        assert lowest <= rotation.rewrapped <= len(before) + len(never_announced), rotation
    assert done[-1].rewrapped > 0

    # With the load stopped the count is exact: every stored round key, rewrapped once.
    quiet = node.rotate_kek(timeout=WAIT)
    assert quiet.rewrapped == len(live) == node.store.key_count()
    assert of_type(log_of(node.store), KekRotated)[-1] == quiet.event()
    newest = quiet.new_version
    bench.secrets.remember(node, "rotation/quiet")
    node.stop()

    node = bench.open(data_dir, KeyUnseal(master))
    check_live(node, rounds)
    assert node.master.active_version == newest
    assert of_type(log_of(node.store), NodeUnsealed)[-1].active_kek == newest
    assert node.epochs.kek_version == newest
    node.stop()


@pytest.mark.parametrize("runtime", ["pykka"])
def test_kek_rotation_under_load_loses_no_live_round(bench: Bench, master: SecretBytes) -> None:
    rotation_scenario(bench, master)


# --- 4. rekey the root ------------------------------------------------------------------------


def passphrase_rekey_scenario(bench: Bench) -> None:
    data_dir = bench.new_dir("rekey-passphrase")
    bench.secrets.texts["old passphrase"] = OLD_PASSPHRASE
    bench.secrets.texts["new passphrase"] = NEW_PASSPHRASE
    node = bench.open(data_dir, PassphraseUnseal(OLD_PASSPHRASE, fast_params()))
    rounds = make_rounds(node, "rekey-pp")
    bench.secrets.remember(node, "rekey-pp/old")
    key_ids = key_ids_of(node)
    old_record = node.store.get_meta(PASSPHRASE_RECORD)

    with node.epochs.active_epoch():  # no ratchet meanwhile: only the rekey could write
        blobs, slots = blobs_of(node), slot_bytes(node.store)
        node.rekey_root(PassphraseUnseal(NEW_PASSPHRASE, fast_params()).enrol(), "passphrase")
        assert blobs_of(node) == blobs, "a rekey must not touch the round key blobs"
        assert slot_bytes(node.store) == slots, "a rekey must not touch the epoch key"
    bench.secrets.remember(node, "rekey-pp/new")
    assert node.store.get_meta(PASSPHRASE_RECORD) not in (None, old_record)
    assert of_type(log_of(node.store), RootRekeyed) == [
        RootRekeyed(old_method="passphrase", new_method="passphrase")
    ]
    check_live(node, rounds, hydrated=False)  # the running node goes on with the same keys
    node.stop()

    with pytest.raises(WrongPassphrase):
        bench.open(data_dir, PassphraseUnseal(OLD_PASSPHRASE))
    node = bench.open(data_dir, PassphraseUnseal(NEW_PASSPHRASE))
    check_live(node, rounds)
    assert key_ids_of(node) == key_ids
    node.stop()


def test_a_new_passphrase_refuses_the_old_one_and_keeps_the_round_keys(bench: Bench) -> None:
    passphrase_rekey_scenario(bench)


def env_migration_scenario(bench: Bench) -> None:
    data_dir = bench.new_dir("rekey-env")
    hex_key = os.urandom(32).hex()
    environ = {DEFAULT_ENV_VARIABLE: hex_key}
    bench.secrets.texts["env key"] = hex_key
    bench.secrets.keys["env key"] = bytes.fromhex(hex_key)
    bench.secrets.texts["new passphrase"] = NEW_PASSPHRASE
    node = bench.open(data_dir, EnvKeyUnseal(environ=environ))
    assert node.master.method == "env"
    rounds = make_rounds(node, "rekey-env")
    bench.secrets.remember(node, "rekey-env/old")
    key_ids = key_ids_of(node)
    assert node.store.get_meta(ENV_VERIFIER_RECORD) is not None

    with node.epochs.active_epoch():  # no ratchet meanwhile: only the rekey could write
        blobs, slots = blobs_of(node), slot_bytes(node.store)
        node.rekey_root(PassphraseUnseal(NEW_PASSPHRASE, fast_params()).enrol(), "passphrase")
        assert blobs_of(node) == blobs
        assert slot_bytes(node.store) == slots
    bench.secrets.remember(node, "rekey-env/new")
    assert node.store.get_meta(METHOD_RECORD) == b"passphrase"
    assert node.store.get_meta(ENV_VERIFIER_RECORD) is None, "the env verifier must be dropped"
    assert of_type(log_of(node.store), RootRekeyed) == [
        RootRekeyed(old_method="env", new_method="passphrase")
    ]
    node.stop()

    with pytest.raises(UnsealMismatch, match="migrated"):
        bench.open(data_dir, EnvKeyUnseal(environ=environ))
    node = bench.open(data_dir, PassphraseUnseal(NEW_PASSPHRASE))
    assert node.master.method == "passphrase"
    check_live(node, rounds)
    assert key_ids_of(node) == key_ids
    node.stop()


def test_a_migration_off_the_environment_key_refuses_it_afterwards(bench: Bench) -> None:
    env_migration_scenario(bench)


def shares_rekey_scenario(bench: Bench) -> None:
    data_dir = bench.new_dir("rekey-shares")
    bench.secrets.texts["old passphrase"] = OLD_PASSPHRASE
    node = bench.open(data_dir, PassphraseUnseal(OLD_PASSPHRASE, fast_params()))
    rounds = make_rounds(node, "rekey-sh")
    bench.secrets.remember(node, "rekey-sh/old")
    key_ids = key_ids_of(node)

    enrolment, mnemonics = ShamirUnseal.enrol_shares(THRESHOLD, COUNT)
    bench.secrets.shares += mnemonics
    with node.epochs.active_epoch():  # no ratchet meanwhile: only the rekey could write
        blobs, slots = blobs_of(node), slot_bytes(node.store)
        node.rekey_root(enrolment, "shamir")
        assert blobs_of(node) == blobs
        assert slot_bytes(node.store) == slots
    bench.secrets.remember(node, "rekey-sh/new")
    assert node.store.get_meta(PASSPHRASE_RECORD) is None, "the passphrase record must go"
    assert node.store.get_meta(SHARE_SET_RECORD) is not None
    assert of_type(log_of(node.store), RootRekeyed) == [
        RootRekeyed(old_method="passphrase", new_method="shamir")
    ]
    node.stop()

    with pytest.raises(UnsealMismatch):
        bench.open(data_dir, PassphraseUnseal(OLD_PASSPHRASE))
    node = bench.open(data_dir)
    assert node.sealed
    assert node.submit_share(mnemonics[4]).submitted == 1
    assert node.submit_share(mnemonics[0]).submitted == 2
    assert node.submit_share(mnemonics[2]).complete
    assert node.master.method == "shamir"
    check_live(node, rounds)
    assert key_ids_of(node) == key_ids
    assert of_type(log_of(node.store), NodeUnsealed)[-1].method == "shamir"
    node.stop()


def test_a_move_from_a_passphrase_to_shares_reopens_by_ceremony(bench: Bench) -> None:
    shares_rekey_scenario(bench)


# --- 5. HSM auto-unseal --------------------------------------------------------------------


def hsm_scenario(bench: Bench, hsm: SoftHsm) -> None:
    data_dir = bench.new_dir("hsm")
    bench.secrets.texts["token PIN"] = PIN
    node = bench.open(data_dir, hsm.source())
    assert not node.sealed
    assert node.master.method == "pkcs11"
    assert of_type(log_of(node.store), NodeUnsealed) == [
        NodeUnsealed(method="pkcs11", active_kek=KekVersion(1))
    ]
    rounds = make_rounds(node, "hsm")
    bench.secrets.remember(node, "hsm")
    node.stop()

    # Restart with the same source: unsealed by the token, no operator.
    node = bench.open(data_dir, hsm.source())
    assert not node.sealed
    check_live(node, rounds)
    node.stop()

    def state() -> tuple[object, ...]:
        with LmdbStore.open(data_dir, create=False) as store:
            return (
                store.last_sequence(),
                store.list_keys(),
                store.get_meta(KEYRING_RECORD),
                store.get_meta(METHOD_RECORD),
                store.get_meta(SEALED_ROOT_RECORD),
                store.snapshot_sequences(),
            )

    before = state()
    with pytest.raises(HsmError) as caught:
        bench.open(data_dir, hsm.source(pin="0000-wrong"))
    assert PIN not in str(caught.value)
    assert "0000-wrong" not in str(caught.value)
    assert state() == before, "a refused PIN must change nothing"

    node = bench.open(data_dir, hsm.source())
    check_live(node, rounds)
    node.stop()


def test_hsm_auto_unseal_end_to_end(bench: Bench, request: pytest.FixtureRequest) -> None:
    hsm: SoftHsm = request.getfixturevalue("softhsm")  # skips, or fails where required
    hsm_scenario(bench, hsm)


# --- 6. signals --------------------------------------------------------------------------


class SignalChild(ChildProcess):
    """A ``signal_child`` process: it prints ``ready N``, waits for SIGTERM (or, in ``tell``
    mode, signals itself mid-publish) and prints ``wiped W TOTAL`` on its way out."""

    def __init__(self, data_dir: Path, master: SecretBytes, live: int, ended: int, mode: str):
        args = [str(data_dir), KEY_FD, str(live), str(ended), mode]
        err = data_dir.parent / f"{data_dir.name}.err"
        super().__init__("tests.node.signal_child", args, master, err)

    def ready(self) -> int:
        """Wait for ``ready N``; return N (snapshots in the store before the signal)."""
        try:
            line = self.next_line(time.monotonic() + WAIT).split()
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {self.stderr_tail()}") from None
        assert line[:1] == ["ready"], f"child said {line}: {self.stderr_tail()}"
        return int(line[1])

    def exit_code(self, bound: float) -> int | None:
        """The exit code, or None if the child did not exit within ``bound`` seconds.

        A child that does not exit gets SIGUSR1 (its stacks go to its stderr), then SIGKILL.
        """
        code = self.wait(bound)
        if code is None:
            self.proc.send_signal(signal.SIGUSR1)
            if self.wait(1.0) is None:
                self.kill()
        return code


def check_after_signal(
    bench: Bench, data_dir: Path, master: SecretBytes, live: int, ended: int
) -> None:
    """The directory a signalled child left reopens with every live round, from a snapshot.

    ``sig:extra`` (the ``tell`` mode's last publish) counts as live if it reached the log.
    """
    with LmdbStore.open(data_dir, create=False) as store:
        assert store.latest_snapshot() is not None, "the signal handler wrote no snapshot"
        events = log_of(store)
    keyshares = keyshare_ciphertexts(events)
    live_ids = [RoundId(f"sig:live{i}") for i in range(live)]
    extra = RoundId("sig:extra")
    if any(s.round_id == extra for s in events):
        live_ids.append(extra)
    ended_ids = [RoundId(f"sig:ended{i}") for i in range(ended)]
    rounds = Rounds(live_ids, ended_ids, {r: keyshares[r] for r in live_ids})
    node = bench.open(data_dir, KeyUnseal(master))
    assert node.recovery.snapshot_sequence is not None
    assert node.recovery.replayed == 0, "the snapshot was written at the very end of the log"
    check_live(node, rounds)
    node.stop()


@pytest.mark.parametrize("runtime", ["pykka"])
def test_sigterm_stops_the_node_wiping_its_keys_and_exits_143(
    bench: Bench, master: SecretBytes
) -> None:
    data_dir = bench.new_dir("signal")
    child = SignalChild(data_dir, master, live=5, ended=2, mode="idle")
    try:
        assert child.ready() == 0
        child.proc.send_signal(signal.SIGTERM)
        code = child.exit_code(SIGNAL_BOUND)
        assert code == 128 + signal.SIGTERM, f"exit code {code}: {child.stderr_tail()}"
        assert "wiped 5 5" in child.rest()
    finally:
        child.close()
    check_after_signal(bench, data_dir, master, live=5, ended=2)


@pytest.mark.parametrize("runtime", ["pykka"])
def test_sigterm_in_the_middle_of_a_publish_still_exits_143(
    bench: Bench, master: SecretBytes
) -> None:
    data_dir = bench.new_dir("signal-busy")
    child = SignalChild(data_dir, master, live=3, ended=2, mode="tell")
    try:
        child.ready()
        code = child.exit_code(SIGNAL_BOUND)
        assert code == 128 + signal.SIGTERM, f"exit code {code}: {child.stderr_tail()}"
    finally:
        child.close()
    check_after_signal(bench, data_dir, master, live=3, ended=2)


# --- 7. the audit: no secret in any log line or any logged event -------------------------------


def hsm_or_none(request: pytest.FixtureRequest) -> SoftHsm | None:
    """The SoftHSM2 fixture; ``None`` where it skips (it fails where it is required)."""
    try:
        hsm: SoftHsm = request.getfixturevalue("softhsm")
    except pytest.skip.Exception:
        return None
    return hsm


@pytest.mark.parametrize("runtime", ["pykka"])
def test_no_secret_reaches_the_logs_or_the_event_logs(
    bench: Bench, master: SecretBytes, request: pytest.FixtureRequest
) -> None:
    hsm = hsm_or_none(request)
    with master.borrow() as view:
        bench.secrets.keys["raw master"] = bytes(view)
    scenarios: list[Callable[[], None]] = [
        lambda: ceremony_scenario(bench),
        lambda: subsets_scenario(bench),
        lambda: seal_scenario(bench, master),
        lambda: rotation_scenario(bench, master, rotations=2, per_rotation=6),
        lambda: passphrase_rekey_scenario(bench),
        lambda: env_migration_scenario(bench),
        lambda: shares_rekey_scenario(bench),
    ]
    if hsm is not None:
        scenarios.append(lambda: hsm_scenario(bench, hsm))
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    with capture_logs() as logs:
        for scenario in scenarios:
            scenario()
    assert len(logs) > 100, "the capture saw almost nothing"
    events = {str(entry.get("event")) for entry in logs}
    for expected in ("shamir_share_accepted", "shamir_share_rejected", "kek_rotated"):
        assert expected in events
    assert "root_rekeyed" in events
    assert "node_sealed" in events

    secrets = bench.secrets
    rounds_seen = sum(1 for label in secrets.keys if label.startswith("round/"))
    keks_seen = sum(1 for label in secrets.keys if "/kek/" in label)
    epochs_seen = sum(1 for label in secrets.keys if "/epoch/" in label)
    assert rounds_seen >= 20
    assert keks_seen >= 8
    assert epochs_seen >= 8
    assert len(secrets.shares) >= 20
    scan_logs(logs, secrets)
    assert scan_stores(secrets) > 200
    # The scan is not blind: a planted root key, KEK, epoch key or share is found.
    root, kek = secrets.keys["seal/root"], secrets.keys["seal/kek/v1"]
    (epoch,) = [key for label, key in secrets.keys.items() if label.startswith("seal/epoch/")]
    for planted in (
        {"event": "x", "v": root.hex()},
        {"event": "x", "v": kek},
        {"event": "x", "v": base64.b64encode(epoch).decode()},
    ):
        with pytest.raises(AssertionError):
            scan_logs([planted], secrets)
    with pytest.raises(AssertionError):
        scan_logs([{"event": "x", "v": secrets.shares[0]}], secrets)
