from __future__ import annotations

import pickle
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from enclave_keys.errors import EnclaveKeysError, InvalidIdentifier
from enclave_keys.ids import EventId, KekVersion, KeyId, RoundId, by_round_id


@pytest.mark.parametrize("text", ["e3:1", "round-42", "A", "a" * 128, "chain.1:e3.9_x"])
def test_round_id_accepts_safe_names(text: str) -> None:
    rid = RoundId(text)
    assert str(rid) == text
    assert RoundId.from_bytes(rid.to_bytes()) == rid


@pytest.mark.parametrize(
    "text", ["", "a" * 129, "-leading-dash", "has space", "slash/no", "é", "nul\x00", "line\n"]
)
def test_round_id_rejects_unsafe_names(text: str) -> None:
    with pytest.raises(InvalidIdentifier):
        RoundId(text)


def test_round_id_rejects_non_ascii_bytes_and_non_str() -> None:
    with pytest.raises(InvalidIdentifier):
        RoundId.from_bytes(b"\xff\xfe")
    with pytest.raises(InvalidIdentifier):
        RoundId(42)  # type: ignore[arg-type]


def test_round_id_equality_and_hash_go_by_the_text() -> None:
    a, same, other = RoundId("e3:1"), RoundId("e3:1"), RoundId("e3:2")
    assert a == same
    assert hash(a) == hash(same)
    assert not a != same  # noqa: SIM202 - the != operator itself is under test
    assert a != other
    assert {a: 1}[same] == 1
    assert other not in {a}
    # never equal to the bare text, nor to another id type
    assert a != "e3:1"
    assert a.__eq__("e3:1") is NotImplemented
    assert a != KeyId(b"e3:1".ljust(16, b"\x00"))
    assert sorted([other, a]) == [a, other]


_ROUND_TEXT = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,20}", fullmatch=True)


@given(st.lists(_ROUND_TEXT, max_size=30), _ROUND_TEXT, _ROUND_TEXT)
def test_round_ids_order_as_their_text(texts: list[str], x: str, y: str) -> None:
    ids = [RoundId(t) for t in texts]
    assert [r.value for r in sorted(ids)] == sorted(texts)
    a, b = RoundId(x), RoundId(y)
    assert (a < b, a <= b, a > b, a >= b) == (x < y, x <= y, x > y, x >= y)
    pairs = {r: n for n, r in enumerate(ids)}
    assert sorted(pairs.items(), key=by_round_id) == sorted(pairs.items())


def test_round_ids_do_not_order_against_other_types() -> None:
    rid = RoundId("e3:1")
    for other in ("e3:1", KeyId(bytes(16)), 1):
        assert rid.__lt__(other) is NotImplemented
        with pytest.raises(TypeError):
            _ = rid < other
        with pytest.raises(TypeError):
            _ = rid >= other


def test_invalid_identifier_is_catchable_as_root_and_value_error() -> None:
    with pytest.raises(EnclaveKeysError):
        RoundId("")
    with pytest.raises(ValueError, match="round id"):
        RoundId("")


@pytest.mark.parametrize("cls", [KeyId, EventId])
def test_opaque_ids(cls: type[KeyId] | type[EventId]) -> None:
    a, b = cls.random(), cls.random()
    assert a != b
    assert len(a.raw) == 16
    assert cls.from_hex(a.hex()) == a
    assert type(cls.from_hex(a.hex())) is cls
    assert a.hex() in repr(a)
    with pytest.raises(InvalidIdentifier):
        cls(b"short")
    with pytest.raises(InvalidIdentifier):
        cls.from_hex("zz" * 16)


def test_seeded_ids_are_deterministic() -> None:
    assert KeyId.random(random.Random(7)) == KeyId.random(random.Random(7))
    assert EventId.random(random.Random(7)) != EventId.random(random.Random(8))


def test_key_id_and_event_id_never_compare_equal() -> None:
    key_id: object = KeyId(b"\x01" * 16)
    assert key_id != EventId(b"\x01" * 16)


@pytest.mark.parametrize("bad", [0, -1, 2**32, True, 1.0])
def test_kek_version_range(bad: object) -> None:
    with pytest.raises(InvalidIdentifier):
        KekVersion(bad)  # type: ignore[arg-type]


def test_kek_version_bytes_and_order() -> None:
    v = KekVersion(258)
    assert v.to_bytes() == b"\x00\x00\x01\x02"
    assert KekVersion.from_bytes(v.to_bytes()) == v
    assert v.next() == KekVersion(259) > v
    assert str(v) == "v258"
    with pytest.raises(InvalidIdentifier):
        KekVersion.from_bytes(b"\x00\x01")


def test_ids_are_hashable_values_that_pickle() -> None:
    rid = RoundId("e3:7")
    assert {rid: 1}[RoundId("e3:7")] == 1
    assert pickle.loads(pickle.dumps(rid)) == rid
