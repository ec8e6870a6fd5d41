"""The keyring of KEK versions: states, evolution, the sealed blob, leases and sealing."""

from __future__ import annotations

import copy
import pickle
import struct
import threading
from collections.abc import Callable, Iterator

import pytest
from structlog.testing import capture_logs

from enclave_keys.crypto import (
    KEYRING_BLOB_VERSION,
    KEYRING_ENTRY_SIZE,
    EpochKey,
    Kek,
    KekSource,
    KekState,
    Keyring,
    LeaseGate,
    RoundCipher,
    SecretBytes,
    unwrap_epoch_key,
    unwrap_round_key,
    wrap_epoch_key,
    wrap_round_key,
)
from enclave_keys.crypto import ring as ring_module
from enclave_keys.errors import (
    CorruptRecord,
    InvalidKeyMaterial,
    KekRetired,
    LeaseTimeout,
    MasterKeyError,
    Sealed,
    SecretWiped,
    UnknownEpoch,
    UnknownKekVersion,
    UnwrapFailed,
)
from enclave_keys.ids import EpochNumber, KekVersion, RoundId

WAIT = 10.0  # bound on every wait for another thread
R = RoundId("e3:ring")
V1, V2, V3, V4 = (KekVersion(n) for n in (1, 2, 3, 4))
ROOT = bytes(range(0x80, 0xA0))
K1, K2, K3 = bytes(range(0x00, 0x20)), bytes(range(0x20, 0x40)), bytes(range(0x40, 0x60))
NONCE = bytes(range(0xC0, 0xCC))

# Computed independently with the bare AESGCM primitive and the layout in
# docs/key-hierarchy.md: root ROOT, nonce NONCE, AAD = len16|"enclave_keys/keyring/v1"
# len16|0x01, plaintext = count 3 | v1 retired, zeros | v2 decrypt-only, K2 | v3 active, K3.
KNOWN_BLOB = bytes.fromhex(
    "01c0c1c2c3c4c5c6c7c8c9cacb643c8081bcade3c2012f374f42a1303029c10a41e200f25529eeacbd2f"
    "d76d830ef0c3e510316dc1d372bf7f227285e37bb4c4690d020a78d33b35921f3f08c87cdb7d4bb7f4eb"
    "23eef2cd8b4b0609d80873c8c45119f5c3bd42fe1b3a0d9a95269ab5c450b2e5a809e3ee1a4c42a5bd0d"
    "8481001641e9eca698371286e54bcf27c717"
)


def scripted(*chunks: bytes) -> Callable[[int], bytes]:
    """An entropy source handing out exactly ``chunks``, in order (tests only)."""
    queue = list(chunks)

    def entropy(size: int) -> bytes:
        chunk = queue.pop(0)
        assert len(chunk) == size
        return chunk

    return entropy


def root_key(raw: bytes = ROOT) -> SecretBytes:
    return SecretBytes.from_bytes(raw)


@pytest.fixture
def ring() -> Iterator[Keyring]:
    with Keyring.create() as made:
        yield made


@pytest.fixture
def root() -> Iterator[SecretBytes]:
    with root_key() as made:
        yield made


def three_versions(entropy: Callable[[int], bytes] | None = None) -> Keyring:
    """v1 retired, v2 decrypt-only, v3 active."""
    with (
        Keyring.create(entropy) as first,
        first.rotated() as second,
        second.rotated() as third,
    ):
        return third.with_retired([V1])


E1 = EpochNumber(1)


def wrapped(kek: Kek, round_id: RoundId = R) -> tuple[bytes, bytes]:
    """What a KEK guards: an epoch key wrapped under ``kek``, and a probe — a round key
    wrapped under that epoch key — that only the right epoch key unwraps."""
    with EpochKey.generate(E1) as epoch, RoundCipher.generate(round_id) as cipher:
        return wrap_epoch_key(kek, epoch), wrap_round_key(epoch, cipher)


def opens(kek: Kek, blob: bytes, probe: bytes, round_id: RoundId = R) -> bool:
    """``kek`` unwraps ``blob`` to the epoch key that wrapped ``probe``."""
    with unwrap_epoch_key(kek, blob) as epoch, unwrap_round_key(epoch, round_id, probe) as key:
        return key.round_id == round_id


# --- states and evolution -------------------------------------------------------------------


def test_create_has_one_active_version(ring: Keyring) -> None:
    assert ring.versions() == [(V1, KekState.ACTIVE)]
    assert ring.active_version == V1
    assert ring.active.version == V1
    assert ring.kek(V1) is ring.active
    assert not ring.is_sealed
    with pytest.raises(UnknownKekVersion):
        ring.kek(V2)
    with pytest.raises(TypeError):
        ring.kek(1)  # type: ignore[arg-type]


def test_create_with_entropy_is_deterministic() -> None:
    with Keyring.create(scripted(K1, NONCE)) as ring:
        blob, probe = wrapped(ring.active)
        assert blob[13:25] == NONCE
        with Kek(V1, SecretBytes.from_bytes(K1)) as same:
            assert opens(same, blob, probe)


def test_rotated_is_a_new_keyring_and_leaves_this_one_alone(ring: Keyring) -> None:
    blob, envelope = wrapped(ring.active)
    with ring.rotated() as rotated:
        assert rotated.versions() == [(V1, KekState.DECRYPT_ONLY), (V2, KekState.ACTIVE)]
        assert rotated.active_version == V2
        assert ring.versions() == [(V1, KekState.ACTIVE)]  # unchanged
        assert opens(rotated.kek(V1), blob, envelope)  # decrypt-only still unwraps
        assert rotated.kek(V1) is not ring.kek(V1)  # its own copy
        new_blob, new_envelope = wrapped(rotated.active)
        assert new_blob[1:5] == V2.to_bytes()
        with pytest.raises(UnknownKekVersion):
            ring.kek(V2)
        with rotated.rotated() as again:
            assert again.versions() == [
                (V1, KekState.DECRYPT_ONLY),
                (V2, KekState.DECRYPT_ONLY),
                (V3, KekState.ACTIVE),
            ]
            assert opens(again.kek(V2), new_blob, new_envelope)


def test_with_retired_retires_and_refuses_the_active_or_unknown(ring: Keyring) -> None:
    with ring.rotated() as rotated, rotated.with_retired([V1]) as retired:
        assert retired.versions() == [(V1, KekState.RETIRED), (V2, KekState.ACTIVE)]
        with pytest.raises(KekRetired):
            retired.kek(V1)
        assert rotated.kek(V1).version == V1  # the source keyring is unchanged
        with retired.with_retired([V1]) as same:  # retiring twice changes nothing
            assert same.versions() == retired.versions()
        with retired.rotated() as third:
            assert third.versions() == [
                (V1, KekState.RETIRED),
                (V2, KekState.DECRYPT_ONLY),
                (V3, KekState.ACTIVE),
            ]
        with pytest.raises(MasterKeyError, match="active"):
            retired.with_retired([V2])
        with pytest.raises(UnknownKekVersion):
            retired.with_retired([V4])
        with pytest.raises(TypeError):
            retired.with_retired([2])  # type: ignore[list-item]
    with pytest.raises(MasterKeyError):
        ring.with_retired([V1])


def test_wiping_one_keyring_never_breaks_another() -> None:
    first = Keyring.create()
    blob, envelope = wrapped(first.active)
    second = first.rotated()
    first.seal()
    assert first.is_sealed
    assert opens(second.kek(V1), blob, envelope)  # the copy in the derived keyring lives
    third = second.with_retired([])
    second.seal()
    assert opens(third.kek(V1), blob, envelope)
    # and the other way round: sealing the derived keyring leaves its source alone
    fourth = third.rotated()
    fourth.seal()
    assert opens(third.kek(V1), blob, envelope)
    third.seal()


def test_keyring_is_a_kek_source(ring: Keyring) -> None:
    source: KekSource = ring
    with source.active_kek() as kek:
        assert kek is ring.active
        assert ring.gate.open_leases == 1
    with source.kek_for(V1) as kek:
        assert kek.version == V1
    with pytest.raises(UnknownKekVersion), source.kek_for(V2):
        pass
    with source.hold_rotation():
        assert ring.gate.open_leases == 1
    assert ring.gate.open_leases == 0
    with three_versions() as three, pytest.raises(KekRetired), three.kek_for(V1):
        pass


# --- the sealed blob ---------------------------------------------------------------------


def test_known_answer_blob() -> None:
    with (
        three_versions(scripted(K1, K2, K3, NONCE)) as ring,
        root_key() as root,
    ):
        assert ring.seal_to(root) == KNOWN_BLOB


def test_blob_layout(root: SecretBytes) -> None:
    with three_versions() as ring:
        blob = ring.seal_to(root)
    assert KEYRING_BLOB_VERSION == 1
    assert KEYRING_ENTRY_SIZE == 37
    assert blob[0] == KEYRING_BLOB_VERSION
    assert len(blob) == 1 + 12 + (4 + 3 * KEYRING_ENTRY_SIZE) + 16
    with three_versions() as ring:
        assert ring.seal_to(root)[1:13] != ring.seal_to(root)[1:13]  # a fresh nonce each


def test_open_restores_versions_states_and_keys(ring: Keyring, root: SecretBytes) -> None:
    with ring.rotated() as rotated:
        blob, envelope = wrapped(rotated.kek(V1))
        blob2, envelope2 = wrapped(rotated.active)
        sealed = rotated.seal_to(root)
    with Keyring.open(root, sealed) as opened:
        assert opened.versions() == [(V1, KekState.DECRYPT_ONLY), (V2, KekState.ACTIVE)]
        assert opens(opened.kek(V1), blob, envelope)
        assert opens(opened.active, blob2, envelope2)
    with Keyring.open(root, KNOWN_BLOB) as known:
        assert known.versions() == [
            (V1, KekState.RETIRED),
            (V2, KekState.DECRYPT_ONLY),
            (V3, KekState.ACTIVE),
        ]
        with Kek(V3, SecretBytes.from_bytes(K3)) as k3:
            blob3, envelope3 = wrapped(k3)
        assert opens(known.active, blob3, envelope3)
    assert not root.is_wiped  # the root stays the caller's


def assert_opaque(excinfo: pytest.ExceptionInfo[UnwrapFailed], blob: bytes) -> None:
    assert type(excinfo.value) is UnwrapFailed
    text = str(excinfo.value) + repr(excinfo.value)
    for start in range(0, max(len(blob) - 3, 0), 4):
        assert blob[start : start + 4].hex() not in text
    assert excinfo.value.__cause__ is None


def test_wrong_root_fails_opaquely(ring: Keyring, root: SecretBytes) -> None:
    blob = ring.seal_to(root)
    with (
        root_key(bytes(32)) as wrong,
        capture_logs() as logs,
        pytest.raises(UnwrapFailed) as excinfo,
    ):
        Keyring.open(wrong, blob)
    assert_opaque(excinfo, blob)
    assert [e["event"] for e in logs] == ["keyring_unwrap_failed"]


def test_every_bit_flip_fails(root: SecretBytes) -> None:
    with three_versions() as ring:
        blob = ring.seal_to(root)
    for index in range(len(blob)):
        for bit in range(8):
            tampered = bytearray(blob)
            tampered[index] ^= 1 << bit
            with pytest.raises(UnwrapFailed) as excinfo:
                Keyring.open(root, bytes(tampered))
            assert_opaque(excinfo, bytes(tampered))


def test_truncated_extended_or_foreign_blobs_fail(ring: Keyring, root: SecretBytes) -> None:
    blob = ring.seal_to(root)
    for bad in (b"", blob[:1], blob[:28], blob[:-1], blob + b"\x00", bytes(len(blob))):
        with pytest.raises(UnwrapFailed):
            Keyring.open(root, bad)
    with pytest.raises(UnwrapFailed):
        Keyring.open(root, bytearray(blob))  # type: ignore[arg-type]
    # an epoch-key blob under the same bytes is no keyring (domain separation)
    with Kek(V1, SecretBytes.from_bytes(ROOT)) as same_bytes:
        foreign, _ = wrapped(same_bytes)
    with pytest.raises(UnwrapFailed):
        Keyring.open(root, foreign)


def entry(version: int, code: int, key: bytes = K1) -> bytes:
    return struct.pack(">IB", version, code) + key


def plaintext(*entries: bytes, count: int | None = None) -> bytes:
    return struct.pack(">I", len(entries) if count is None else count) + b"".join(entries)


MALFORMED = {
    "empty": b"",
    "short count": b"\x00\x00\x01",
    "no entries": plaintext(),
    "count too high": plaintext(entry(1, 1), count=2),
    "count too low": plaintext(entry(1, 2), entry(2, 1), count=1),
    "trailing byte": plaintext(entry(1, 1)) + b"\x00",
    "version zero": plaintext(entry(0, 1)),
    "versions decreasing": plaintext(entry(2, 2), entry(1, 1)),
    "versions repeated": plaintext(entry(1, 2), entry(1, 1)),
    "state zero": plaintext(entry(1, 0)),
    "state four": plaintext(entry(1, 4)),
    "no active": plaintext(entry(1, 2)),
    "two active": plaintext(entry(1, 1), entry(2, 1)),
    "active not newest": plaintext(entry(1, 1), entry(2, 2)),
    "retired with a key": plaintext(entry(1, 3), entry(2, 1)),
    "all retired": plaintext(entry(1, 3, bytes(32))),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_an_authentic_but_malformed_plaintext_is_a_corrupt_record(
    name: str, root: SecretBytes
) -> None:
    blob = ring_module._encrypt(root, MALFORMED[name], None)
    with pytest.raises(CorruptRecord) as excinfo:
        Keyring.open(root, blob)
    assert K1.hex() not in str(excinfo.value)


def test_a_well_formed_handmade_plaintext_opens(root: SecretBytes) -> None:
    blob = ring_module._encrypt(root, plaintext(entry(1, 3, bytes(32)), entry(5, 1, K2)), None)
    with Keyring.open(root, blob) as opened:
        assert opened.versions() == [(V1, KekState.RETIRED), (KekVersion(5), KekState.ACTIVE)]
        with opened.rotated() as rotated:
            assert rotated.active_version == KekVersion(6)


def test_root_must_be_a_32_byte_secret(ring: Keyring) -> None:
    with pytest.raises(TypeError):
        ring.seal_to(ROOT)  # type: ignore[arg-type]
    with SecretBytes.from_bytes(bytes(16)) as short, pytest.raises(InvalidKeyMaterial):
        ring.seal_to(short)
    with SecretBytes.from_bytes(bytes(16)) as short, pytest.raises(InvalidKeyMaterial):
        Keyring.open(short, b"\x01" * 64)


# --- leases and the exclusive section --------------------------------------------------------


def run(target: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    """Run ``target`` in a thread; the list gets its result or the exception it raised."""
    outcome: list[object] = []

    def body() -> None:
        try:
            outcome.append(target())
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, outcome


def wait_for(gate: LeaseGate, predicate: Callable[[LeaseGate], bool]) -> None:
    assert gate.wait_until(predicate, WAIT), f"gate never reached the state: {gate!r}"


def test_exclusive_waits_for_open_leases_and_blocks_new_ones(ring: Keyring) -> None:
    entered = threading.Event()

    def exclusive() -> str:
        with ring.exclusive(WAIT):
            entered.set()
            assert ring.gate.open_leases == 0
            return "exclusive"

    with ring.lease() as leased:
        assert leased is ring
        assert ring.gate.open_leases == 1
        thread, outcome = run(exclusive)
        wait_for(ring.gate, lambda g: g.exclusive_waiting == 1)
        assert not entered.is_set()
        with pytest.raises(LeaseTimeout), ring.lease(0.0):  # a waiting section goes first
            pass
        assert ring.active.version == V1  # the open lease still works
    thread.join(WAIT)
    assert outcome == ["exclusive"]
    with ring.lease(0.0):  # and leases are granted again afterwards
        pass


def test_leases_wait_for_the_exclusive_section(ring: Keyring) -> None:
    release = threading.Event()
    inside = threading.Event()

    def exclusive() -> None:
        with ring.exclusive(WAIT):
            inside.set()
            assert release.wait(WAIT)

    holder, _ = run(exclusive)
    assert inside.wait(WAIT)
    with pytest.raises(LeaseTimeout, match="exclusive section"), ring.lease(0.0):
        pass

    def lease() -> KekVersion:
        with ring.lease(WAIT) as leased:
            return leased.active_version

    waiter, outcome = run(lease)
    wait_for(ring.gate, lambda g: g.leases_waiting == 1)
    assert outcome == []
    release.set()
    waiter.join(WAIT)
    holder.join(WAIT)
    assert outcome == [V1]


def test_exclusive_times_out_and_holds_nothing(ring: Keyring) -> None:
    with ring.lease():
        with pytest.raises(LeaseTimeout, match="1 lease"), ring.exclusive(0.0):
            pass
        assert ring.gate.exclusive_waiting == 0
        with ring.lease(0.0):  # the timed-out section no longer blocks leases
            pass
    with ring.exclusive(0.0):
        pass


def test_a_leased_value_is_read_under_the_lease_and_a_failing_one_ends_it() -> None:
    gate = LeaseGate("thing")
    with gate.leased(WAIT, lambda: gate.open_leases) as seen:
        assert seen == 1  # the value is read once the lease is held
        assert gate.open_leases == 1

    def broken() -> int:
        raise UnknownEpoch("gone")

    with pytest.raises(UnknownEpoch), gate.leased(WAIT, broken):
        pass
    assert gate.open_leases == 0
    with pytest.raises(RuntimeError), gate.shared(WAIT):
        raise RuntimeError("the block failed")
    assert gate.open_leases == 0
    with gate.exclusive(0.0):  # nothing leaked: a section gets in at once
        pass


def test_a_closed_gate_refuses_leases_unless_allowed() -> None:
    gate = LeaseGate("thing")
    assert gate.close(WAIT)
    with pytest.raises(Sealed), gate.shared(WAIT):
        pass
    with pytest.raises(Sealed), gate.leased(WAIT, lambda: 1):
        pass
    with gate.shared(WAIT, allow_closed=True):
        assert gate.open_leases == 1
    assert gate.open_leases == 0


def test_seal_waits_for_leases_then_wipes(ring: Keyring) -> None:
    kek = ring.active
    with ring.lease():
        sealer, outcome = run(lambda: ring.seal(WAIT))
        wait_for(ring.gate, lambda g: g.exclusive_waiting == 1)
        assert not ring.is_sealed
        assert not kek.is_wiped
        waiter, waited = run(lambda: ring.lease(WAIT).__enter__())
        wait_for(ring.gate, lambda g: g.leases_waiting == 1)
    sealer.join(WAIT)
    waiter.join(WAIT)
    assert outcome == [None]
    assert len(waited) == 1
    assert isinstance(waited[0], Sealed)  # the waiting lease is refused
    assert ring.is_sealed
    assert kek.is_wiped


def test_seal_times_out_without_wiping_unless_forced(ring: Keyring) -> None:
    with ring.lease() as leased:
        kek = leased.active
        with pytest.raises(LeaseTimeout):
            ring.seal(0.0)
        assert not ring.is_sealed
        assert not kek.is_wiped
        with capture_logs() as logs:
            ring.seal(0.0, force=True)
        assert kek.is_wiped
        with EpochKey.generate(E1) as epoch, pytest.raises(SecretWiped):
            wrap_epoch_key(kek, epoch)  # an operation under the lease fails, never leaks
    assert [e["event"] for e in logs] == ["keyring_sealed_under_open_leases"]


def test_everything_is_sealed_after_seal(ring: Keyring, root: SecretBytes) -> None:
    ring.seal()
    ring.seal()  # idempotent
    assert repr(ring) == "Keyring(sealed)"
    for use in (
        lambda: ring.active,
        lambda: ring.active_version,
        lambda: ring.kek(V1),
        ring.versions,
        ring.rotated,
        lambda: ring.with_retired([]),
        lambda: ring.seal_to(root),
        lambda: ring.lease().__enter__(),
        lambda: ring.exclusive().__enter__(),
        lambda: ring.active_kek().__enter__(),
        lambda: ring.kek_for(V1).__enter__(),
    ):
        with pytest.raises(Sealed):
            use()
    with ring.hold_rotation():  # needs no key: still granted
        pass


def test_timeouts_are_validated(ring: Keyring) -> None:
    for bad in (-1.0, float("inf"), float("nan"), True, "1"):
        with pytest.raises(ValueError, match="timeout"), ring.lease(bad):  # type: ignore[arg-type]
            pass
        with pytest.raises(ValueError, match="timeout"):
            ring.seal(bad)  # type: ignore[arg-type]
    assert not ring.is_sealed


# --- no key material anywhere ----------------------------------------------------------------


def test_repr_logs_and_errors_show_no_key_bytes(root: SecretBytes) -> None:
    with capture_logs() as logs:
        ring = three_versions(scripted(K1, K2, K3, NONCE))
        blob = ring.seal_to(root)
        text = repr(ring) + repr(ring.gate) + repr(ring.versions())
        with pytest.raises(UnwrapFailed) as excinfo:
            Keyring.open(root, blob[:-1] + bytes([blob[-1] ^ 1]))
    assert repr(ring) == "Keyring(active=v3, versions=[v1:retired, v2:decrypt_only, v3:active])"
    text += repr(logs) + str(excinfo.value)
    for key in (K1, K2, K3, ROOT):
        assert key.hex() not in text
        assert repr(key) not in text
    ring.seal()


def test_keyring_cannot_be_copied_or_pickled(ring: Keyring) -> None:
    for attempt in (copy.copy, copy.deepcopy, pickle.dumps):
        with pytest.raises(TypeError):
            attempt(ring)
