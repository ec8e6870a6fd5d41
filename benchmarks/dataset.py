"""The events the log benchmarks append and replay: the lifecycle of many rounds.

Each round contributes the six events a real node logs for it, each published by the
actor that publishes it in a node: requested (node), opened (router), key ready
(round cipher), keyshare created (keyshare actor, with a 77-byte sealed share), complete
(node), purged (round cipher). Handler events carry a cause, so their envelope has a
causation and a correlation id, as in a node's log.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Final

from enclave_keys.bus import PublishRequest
from enclave_keys.codec import encode_event
from enclave_keys.events import (
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

__all__ = ["EVENTS_PER_ROUND", "Published", "lifecycle_events", "requests_of", "stamped"]

EVENTS_PER_ROUND: Final = 6
T0: Final = 1_700_000_000.0
_SHARE_CIPHERTEXT: Final = 32 + 45  # a 32-byte share in the round-data envelope


@dataclass(frozen=True, slots=True)
class Published:
    """One payload event and the actor that publishes it."""

    event: Event
    source: str


def lifecycle_events(count: int, *, seed: int = 7) -> list[Published]:
    """``count`` events: whole round lifecycles, the last round cut short if need be."""
    rng = random.Random(seed)
    out: list[Published] = []
    number = 0
    while len(out) < count:
        rid = RoundId(f"bench:{number}")
        key_id = KeyId(rng.randbytes(KeyId.SIZE))
        deadline = T0 + 600.0
        out += [
            Published(
                RoundRequested(round_id=rid, deadline=deadline, threshold=2, committee_size=3),
                "node",
            ),
            Published(RoundOpened(round_id=rid, deadline=deadline), "router"),
            Published(
                RoundKeyReady(round_id=rid, key_id=key_id, kek_version=KekVersion(1)),
                "round-cipher",
            ),
            Published(
                KeyshareCreated(
                    round_id=rid, key_id=key_id, ciphertext=rng.randbytes(_SHARE_CIPHERTEXT)
                ),
                "keyshare",
            ),
            Published(RoundComplete(round_id=rid), "node"),
            Published(RoundPurged(round_id=rid, key_id=key_id), "round-cipher"),
        ]
        number += 1
    return out[:count]


def _cause() -> StoredEvent:
    first = RoundRequested(
        round_id=RoundId("bench:cause"), deadline=T0 + 600.0, threshold=2, committee_size=3
    )
    return StoredEvent(
        sequence=1, event_id=EventId.random(), timestamp=T0, source="node", payload=first
    )


def requests_of(events: list[Published]) -> list[PublishRequest]:
    """One publish request per event, as the actors make them (handlers with a cause)."""
    cause = _cause()
    return [
        PublishRequest((p.event,), p.source, None if p.source == "node" else cause) for p in events
    ]


def stamped(events: list[Published]) -> list[bytes]:
    """The events stamped as the bus would and encoded: the bytes the log holds."""
    cause = _cause()
    encoded = []
    for sequence, p in enumerate(events, start=1):
        handler = p.source != "node"
        stored = StoredEvent(
            sequence=sequence,
            event_id=EventId(os.urandom(EventId.SIZE)),
            timestamp=T0 + sequence,
            causation_id=cause.event_id if handler else None,
            correlation_id=cause.event_id if handler else None,
            source=p.source,
            payload=p.event,
        )
        encoded.append(encode_event(stored))
    return encoded
