"""Shared pieces of the bad-input tests: mutations, counting, store fingerprints and the
check that a node keeps serving its other rounds."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from hypothesis import strategies as st

from enclave_keys.events import RoundComplete, RoundRequested
from enclave_keys.ids import RoundId
from enclave_keys.keyshare import KEYSHARE_PURPOSE
from enclave_keys.node import Node
from enclave_keys.round_cipher import ROUND_CIPHER
from enclave_keys.store import Store
from tests.reports import report

REPORT = "bad-input fuzz cases"
_PROBES = itertools.count()
META_NAMES = ("master.keyring", "master.method", "unseal.raw.verifier", "store.format_version")


def tried(category: str, n: int = 1) -> None:
    """Count ``n`` bad inputs of ``category`` (printed in the terminal summary)."""
    report(REPORT, **{category: n, "total": n})


@st.composite
def mutated(draw: st.DrawFn, original: bytes) -> bytes:
    """``original`` truncated, bit-flipped, extended, spliced — or replaced by random bytes.

    Never ``original`` itself."""
    how = draw(st.sampled_from(["truncate", "bitflip", "extend", "splice", "random"]))
    data = bytearray(original)
    if how == "truncate" and data:
        out = bytes(data[: draw(st.integers(0, len(data) - 1))])
    elif how == "bitflip" and data:
        for _ in range(draw(st.integers(1, 3))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        out = bytes(data)
    elif how == "extend":
        out = bytes(data) + draw(st.binary(min_size=1, max_size=32))
    elif how == "splice" and data:
        i = draw(st.integers(0, len(data) - 1))
        out = bytes(data[:i]) + draw(st.binary(min_size=1, max_size=16)) + bytes(data[i + 1 :])
    else:
        out = draw(st.binary(max_size=max(64, 2 * len(data))))
    if out == original:
        out = original + b"\x00"
    return out


@dataclass(frozen=True)
class Fingerprint:
    """Everything a store holds that a failed operation must leave unchanged."""

    last_sequence: int
    keys: tuple[tuple[RoundId, bytes], ...]
    snapshots: tuple[int, ...]
    meta: tuple[bytes | None, ...]

    @classmethod
    def of(cls, store: Store) -> Fingerprint:
        return cls(
            store.last_sequence(),
            tuple(store.list_keys()),
            tuple(store.snapshot_sequences()),
            tuple(store.get_meta(name) for name in META_NAMES),
        )


def assert_serving(node: Node, probe: str) -> None:
    """Every live round's keyshare still opens, and a new round lives and ends."""
    for rid in node.router.open_rounds():
        context = node.registry.get(rid)
        assert context is not None
        share = node.keyshare.keyshare_of(rid)
        assert share is not None, f"live round {rid} lost its keyshare"
        with context.require(ROUND_CIPHER).lease() as cipher:
            assert len(cipher.open(KEYSHARE_PURPOSE, share[1])) == node.config.share_size
    rid = RoundId(f"{probe}:{next(_PROBES)}")
    node.publish(RoundRequested(round_id=rid, deadline=2e9, threshold=1, committee_size=1))
    node.wait_idle()
    assert node.store.get_key(rid) is not None, "a new round was not keyed"
    node.publish(RoundComplete(round_id=rid))
    node.wait_idle()
    assert node.store.get_key(rid) is None, "a completed round kept its key"
