"""Every decoder fed truncated, bit-flipped, extended, spliced and random bytes: a typed
:class:`~enclave_keys.errors.EnclaveKeysError` or a value, never anything else."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enclave_keys.clock import ManualClock
from enclave_keys.codec import decode_event, encode_event
from enclave_keys.crypto import (
    KdfParams,
    Keyring,
    PassphraseRecord,
    RoundCipher,
    SecretBytes,
    read_wrapped_header,
)
from enclave_keys.crypto.verifier import RootVerifier
from enclave_keys.errors import EnclaveKeysError
from enclave_keys.events import RoundRequested, StoredEvent
from enclave_keys.ids import EventId, RoundId
from enclave_keys.node import Node, NodeConfig
from enclave_keys.snapshot import NodeSnapshot
from enclave_keys.store import records
from enclave_keys.store.base import decode_event_record
from enclave_keys.testing.fakes import FixedKeyUnseal
from enclave_keys.testing.strategies import stored_events
from enclave_keys.unseal import ShamirUnseal
from enclave_keys.unseal.shamir import SHARE_SET_RECORD, ShareSetRecord
from tests.fuzz.helpers import mutated, tried

RID = RoundId("fuzz:1")
Decoder = Callable[[bytes], Any]


class Samples:
    """A valid encoding of each format and the decoder that reads it back."""

    def __init__(self, wrapped: bytes) -> None:
        self.root = SecretBytes.random(32)
        self.ring = Keyring.create()
        self.cipher = RoundCipher.generate(RID)
        event = StoredEvent(
            sequence=7,
            event_id=EventId(bytes(range(16))),
            timestamp=1_700_000_000.0,
            source="node",
            payload=RoundRequested(round_id=RID, deadline=1.7e9, threshold=2, committee_size=3),
        )
        enrolment, _ = ShamirUnseal.enrol_shares(2, 3)
        with enrolment:
            share_set = enrolment.records[SHARE_SET_RECORD]
        params = KdfParams.generate(memory_kib=KdfParams.MIN_MEMORY_KIB, iterations=2, lanes=1)
        passphrase = PassphraseRecord(params=params, verifier=bytes(32))
        self.valid: dict[str, tuple[bytes, Decoder]] = {
            "event codec": (encode_event(event), decode_event),
            "stored event record": (
                encode_event(event),
                lambda raw: decode_event_record(records.sequence_key(7), raw),
            ),
            "round key record": (
                wrapped,
                lambda raw: records.parse_round_key_record(RID.to_bytes(), raw),
            ),
            "round key record id": (
                RID.to_bytes(),
                lambda raw: records.parse_round_key_record(raw, b"\x01" * 60),
            ),
            "format version record": (records.format_version_value(), records.parse_format_version),
            "snapshot record": (
                NodeSnapshot(sequence=3, cores={}).to_bytes(),
                NodeSnapshot.from_bytes,
            ),
            "wrapped key header": (wrapped, read_wrapped_header),
            "keyring blob": (
                self.ring.seal_to(self.root),
                lambda raw: Keyring.open(self.root, raw).seal(force=True),
            ),
            "round data envelope": (
                self.cipher.seal("fuzz", b"payload"),
                lambda raw: self.cipher.open("fuzz", raw),
            ),
            "root verifier record": (
                RootVerifier.create(self.root, b"fuzz").to_bytes(),
                RootVerifier.from_bytes,
            ),
            "passphrase record": (passphrase.to_bytes(), PassphraseRecord.from_bytes),
            "shamir share-set record": (share_set, ShareSetRecord.from_bytes),
        }

    def close(self) -> None:
        self.cipher.wipe()
        self.ring.seal(force=True)
        self.root.wipe()


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Samples]:
    """Samples, the wrapped round key taken from a real node's store."""
    with FixedKeyUnseal("decoders") as unseal:
        node = Node.open(
            tmp_path_factory.mktemp("decoders") / "node",
            unseal,
            clock=ManualClock(1.7e9),
            config=NodeConfig(runtime="deterministic", harden=False),
        )
        node.publish(RoundRequested(round_id=RID, deadline=2e9, threshold=1, committee_size=1))
        wrapped = node.store.get_key(RID)
        node.stop()
    assert wrapped is not None
    made = Samples(wrapped)
    yield made
    made.close()


FORMATS = [
    "event codec",
    "stored event record",
    "round key record",
    "round key record id",
    "format version record",
    "snapshot record",
    "wrapped key header",
    "keyring blob",
    "round data envelope",
    "root verifier record",
    "passphrase record",
    "shamir share-set record",
]


def decode_or_typed_error(decode: Decoder, data: bytes) -> bool:
    """True if ``data`` decoded, False for a typed error; anything else propagates."""
    try:
        decode(data)
    except EnclaveKeysError:
        return False
    return True


@pytest.mark.parametrize("name", FORMATS)
def test_the_valid_sample_decodes(samples: Samples, name: str) -> None:
    data, decode = samples.valid[name]
    assert decode_or_typed_error(decode, data)


@pytest.mark.parametrize("name", FORMATS)
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_mutated_bytes_give_a_typed_error(samples: Samples, name: str, data: st.DataObject) -> None:
    valid, decode = samples.valid[name]
    bad = data.draw(mutated(valid), label="bad bytes")
    decoded = decode_or_typed_error(decode, bad)
    tried(name)
    if name in ("keyring blob", "round data envelope"):
        assert not decoded, f"tampered {name} authenticated"


@settings(max_examples=150, deadline=None)
@given(stored=stored_events(), data=st.data())
def test_mutated_encodings_of_any_event_give_a_typed_error(
    stored: StoredEvent, data: st.DataObject
) -> None:
    bad = data.draw(mutated(encode_event(stored)), label="bad bytes")
    try:
        decoded = decode_event(bad)
    except EnclaveKeysError:
        decoded = None
    if decoded is not None:
        assert encode_event(decoded) == bad, "a non-canonical encoding decoded"
    tried("event codec (any type)")
