"""The log checks on hand-built logs: each check that must fail does, on the log that
breaks it (a check that cannot fail would report "holds" for nothing)."""

from __future__ import annotations

from enclave_keys.events import (
    DecryptionShareCreated,
    Event,
    KeyshareCreated,
    RoundComplete,
    RoundKeyReady,
    RoundOpened,
    RoundPurged,
    RoundRequested,
    StoredEvent,
)
from enclave_keys.ids import EventId, KekVersion, KeyId, RoundId
from enclave_keys.invariants import check_log
from enclave_keys.replay import replay

T0 = 1_700_000_000.0
R = RoundId("e3:inv")
K1 = KeyId(b"\x01" * 16)
K2 = KeyId(b"\x02" * 16)


def log(*events: Event) -> list[StoredEvent]:
    return [
        StoredEvent(
            sequence=n,
            event_id=EventId.random(),
            timestamp=T0 + n,
            source="test",
            payload=event,
        )
        for n, event in enumerate(events, 1)
    ]


def keyed(key: KeyId) -> tuple[Event, ...]:
    return (
        RoundRequested(round_id=R, deadline=T0 + 600, threshold=1, committee_size=1),
        RoundOpened(round_id=R, deadline=T0 + 600),
        RoundKeyReady(round_id=R, key_id=key, kek_version=KekVersion(1)),
    )


def checks_failed(*events: Event) -> set[str]:
    return {violation.check for violation in check_log(replay(log(*events)))}


def test_a_round_that_ends_once_holds() -> None:
    assert (
        checks_failed(*keyed(K1), RoundComplete(round_id=R), RoundPurged(round_id=R, key_id=K1))
        == set()
    )


def test_a_round_that_ends_twice_breaks_one_outcome() -> None:
    failed = checks_failed(
        *keyed(K1),
        RoundComplete(round_id=R),
        RoundPurged(round_id=R, key_id=K1),
        RoundOpened(round_id=R, deadline=T0 + 900),  # opened again (past the horizon)
        RoundKeyReady(round_id=R, key_id=K2, kek_version=KekVersion(1)),
        RoundComplete(round_id=R),  # and ended again
        RoundPurged(round_id=R, key_id=K2),
    )
    assert failed == {"opened_once", "one_outcome"}


def test_a_decryption_share_after_the_purge_breaks_no_use_after_purge() -> None:
    share = DecryptionShareCreated(
        round_id=R, request_id=EventId(b"\x09" * 16), ciphertext=b"\x00" * 60
    )
    keyshare = KeyshareCreated(round_id=R, key_id=K1, ciphertext=b"\x00" * 60)
    before = (*keyed(K1), keyshare, share, RoundComplete(round_id=R))
    assert checks_failed(*before, RoundPurged(round_id=R, key_id=K1)) == set()
    assert checks_failed(*before, RoundPurged(round_id=R, key_id=K1), share) == {
        "no_use_after_purge"
    }
