from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enclave_keys.core_state import KnownRoundIds, RecentRounds, StateReader
from enclave_keys.errors import CorruptRecord
from enclave_keys.events import MAX_CIPHERTEXT_LEN, RoundStage
from enclave_keys.ids import KeyId, RoundId


def reader(**fields: Any) -> StateReader:
    return StateReader("test snapshot", {"version": 1, **fields}, version=1)


# --- the outer map ------------------------------------------------------------------------


@pytest.mark.parametrize("state", [{"version": 1}, OrderedDict(version=1), {"version": 1.0}])
def test_a_map_of_the_expected_version_is_accepted(state: object) -> None:
    StateReader("test snapshot", state, version=1)


@pytest.mark.parametrize("state", [None, [], "version", 1, b"", [("version", 1)]])
def test_a_state_that_is_not_a_map_is_refused(state: object) -> None:
    with pytest.raises(CorruptRecord, match=r"^test snapshot: expected a map$"):
        StateReader("test snapshot", state, version=1)


@pytest.mark.parametrize("state", [{}, {"version": 2}, {"version": "1"}, {"version": None}])
def test_a_missing_or_other_version_is_refused(state: object) -> None:
    with pytest.raises(CorruptRecord, match=r"^test snapshot: unknown version$"):
        StateReader("test snapshot", state, version=1)


def test_corrupt_prefixes_the_problem_with_what_is_read() -> None:
    error = reader().corrupt("something is off")
    assert isinstance(error, CorruptRecord)
    assert str(error) == "test snapshot: something is off"


# --- fields ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [[], [1, "a"], (1, 2), ()])
def test_items_accepts_lists_and_tuples(value: list[object] | tuple[object, ...]) -> None:
    assert reader(rounds=value).items("rounds") == list(value)


@pytest.mark.parametrize("value", [None, "ab", {"a": 1}, {1, 2}, 3])
def test_items_refuses_anything_else(value: object) -> None:
    with pytest.raises(CorruptRecord, match=r"^test snapshot: 'rounds' must be a list$"):
        reader(rounds=value).items("rounds")


def test_items_refuses_a_missing_field() -> None:
    with pytest.raises(CorruptRecord, match="'rounds' must be a list"):
        reader().items("rounds")


def test_map_accepts_any_mapping_and_refuses_the_rest() -> None:
    assert reader().map({"a": 1}) == {"a": 1}
    assert reader().map(OrderedDict(a=1)) == {"a": 1}
    for bad in (None, [("a", 1)], "a", 1):
        with pytest.raises(CorruptRecord, match=r"^test snapshot: expected a map$"):
            reader().map(bad)


def test_round_id_accepts_valid_text() -> None:
    assert reader().round_id("e3:1") == RoundId("e3:1")


@pytest.mark.parametrize("value", [None, 1, b"e3:1", RoundId("e3:1")])
def test_round_id_refuses_what_is_not_text(value: object) -> None:
    with pytest.raises(CorruptRecord, match=r"^test snapshot: round id must be text$"):
        reader().round_id(value)


@pytest.mark.parametrize("value", ["", "!", "-a", "a" * 129])
def test_round_id_refuses_malformed_text(value: str) -> None:
    with pytest.raises(CorruptRecord, match=r"^test snapshot: malformed round id$"):
        reader().round_id(value)


def test_key_id_accepts_hex_text() -> None:
    assert reader().key_id("ab" * 16) == KeyId(b"\xab" * 16)


@pytest.mark.parametrize("value", [None, b"\x00" * 16, "zz" * 16, "00" * 15, "00" * 17, ""])
def test_key_id_refuses_anything_else(value: object) -> None:
    with pytest.raises(CorruptRecord, match=r"^test snapshot: malformed key id$"):
        reader().key_id(value)


@pytest.mark.parametrize("value", [b"x", b"x" * MAX_CIPHERTEXT_LEN])
def test_ciphertext_accepts_non_empty_bytes_up_to_the_limit(value: bytes) -> None:
    assert reader().ciphertext(value) == value


@pytest.mark.parametrize("value", [b"", b"x" * (MAX_CIPHERTEXT_LEN + 1), "x", bytearray(b"x")])
def test_ciphertext_refuses_anything_else(value: object) -> None:
    with pytest.raises(CorruptRecord, match=r"^test snapshot: ciphertext must be bytes$"):
        reader().ciphertext(value)


@pytest.mark.parametrize("stage", list(RoundStage))
def test_stage_accepts_every_wire_value(stage: RoundStage) -> None:
    assert reader().stage(stage.value) is stage


@pytest.mark.parametrize("value", [None, "done", "COMPUTE", 1, b"compute"])
def test_stage_refuses_anything_else(value: object) -> None:
    with pytest.raises(CorruptRecord, match=r"^test snapshot: unknown stage$"):
        reader().stage(value)


@pytest.mark.parametrize("value", [0, 7, -1.5, 1e300])
def test_finite_accepts_ints_and_floats_as_float(value: float) -> None:
    got = reader().finite(value, "deadline")
    assert got == value
    assert type(got) is float


@pytest.mark.parametrize("value", [None, "1", True, False, b"1"])
def test_finite_refuses_what_is_not_a_number(value: object) -> None:
    with pytest.raises(CorruptRecord, match=r"^test snapshot: deadline must be a number$"):
        reader().finite(value, "deadline")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_finite_refuses_nan_and_infinities(value: float) -> None:
    with pytest.raises(CorruptRecord, match=r"^test snapshot: deadline must be finite$"):
        reader().finite(value, "deadline")


def test_flag_accepts_booleans_only() -> None:
    assert reader().flag(True, "fired") is True
    assert reader().flag(False, "fired") is False
    for bad in (None, 0, 1, "true"):
        with pytest.raises(CorruptRecord, match=r"^test snapshot: 'fired' must be a boolean$"):
            reader().flag(bad, "fired")


# --- unique ---------------------------------------------------------------------------------


def test_unique_keeps_the_order_of_distinct_rounds() -> None:
    a, b = RoundId("a"), RoundId("b")
    found = reader().unique([(b, 2), (a, 1)])
    assert list(found.items()) == [(b, 2), (a, 1)]
    assert reader().unique([]) == {}


def test_unique_refuses_a_round_listed_twice() -> None:
    a = RoundId("a")
    with pytest.raises(CorruptRecord, match=r"^test snapshot: a round is listed twice$"):
        reader().unique([(a, 1), (RoundId("b"), 2), (a, 1)])


def test_unique_stops_at_the_first_repeat() -> None:
    a = RoundId("a")
    read: list[int] = []

    def entries() -> Iterator[tuple[RoundId, int]]:
        for n in range(5):
            read.append(n)
            yield a, n

    with pytest.raises(CorruptRecord):
        reader().unique(entries())
    assert read == [0, 1]


# --- a round trip ---------------------------------------------------------------------------


def test_reads_what_msgpack_gives_back() -> None:
    state = {
        "version": 3,
        "rounds": [{"round_id": "e3:1", "key_id": "01" * 16, "deadline": 5, "fired": True}],
    }
    unpacked = msgpack.unpackb(msgpack.packb(state), raw=False)
    read = StateReader("test snapshot", unpacked, version=3)
    (entry,) = [read.map(item) for item in read.items("rounds")]
    assert read.round_id(entry["round_id"]) == RoundId("e3:1")
    assert read.key_id(entry["key_id"]) == KeyId(b"\x01" * 16)
    assert read.finite(entry["deadline"], "deadline") == 5.0
    assert read.flag(entry["fired"], "fired") is True


# --- one round-id table for the readers of one restore ------------------------------------


def test_readers_sharing_a_table_hand_out_one_round_id_per_text() -> None:
    table: KnownRoundIds = {}
    first = StateReader("router snapshot", {"version": 1}, version=1, round_ids=table)
    second = StateReader("reaper snapshot", {"version": 1}, version=1, round_ids=table)
    rid = first.round_id("e3:1")
    assert second.round_id("e3:1") is rid
    assert table == {"e3:1": rid}
    assert reader().round_id("e3:1") is not rid  # a reader without a table has its own


@pytest.mark.parametrize("bad", ["not a round id!", "", "a" * 129])
def test_a_shared_table_never_lets_a_malformed_id_through(bad: str) -> None:
    table: KnownRoundIds = {}
    readers = [
        StateReader(f"{n} snapshot", {"version": 1}, version=1, round_ids=table) for n in "ab"
    ]
    readers[0].round_id("e3:1")
    for read in readers:  # refused by each reader: a refused text is never remembered
        with pytest.raises(CorruptRecord, match=r"malformed round id$"):
            read.round_id(bad)
    assert list(table) == ["e3:1"]


def test_a_str_subclass_is_checked_but_never_remembered() -> None:
    class Text(str):
        __slots__ = ()

    table: KnownRoundIds = {}
    read = StateReader("test snapshot", {"version": 1}, version=1, round_ids=table)
    assert read.round_id(Text("e3:1")) == RoundId("e3:1")
    assert table == {}
    with pytest.raises(CorruptRecord, match=r"malformed round id$"):
        read.round_id(Text("no way"))


# --- RecentRounds built from a list -------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    names=st.lists(st.sampled_from("abcdefg"), max_size=30),
    horizon=st.integers(min_value=1, max_value=8),
)
def test_recent_rounds_from_a_list_equal_the_same_adds_one_by_one(
    names: list[str], horizon: int
) -> None:
    rounds = [RoundId(n) for n in names]
    added = RecentRounds(horizon)
    for rid in rounds:
        added.add(rid)
    built = RecentRounds(horizon, rounds)
    assert list(built) == list(added)
    assert len(built) == len(added) <= horizon


@settings(max_examples=200, deadline=None)
@given(
    names=st.lists(st.sampled_from("abcdefghij"), max_size=60),
    horizon=st.integers(min_value=1, max_value=6),
)
def test_recent_rounds_keep_the_horizon_most_recently_added(names: list[str], horizon: int) -> None:
    recent = RecentRounds(horizon)
    model: list[str] = []  # oldest first; adding again moves a name to the newest end
    for name in names:
        recent.add(RoundId(name))
        model = [*(n for n in model if n != name), name][-horizon:]
        assert [rid.value for rid in recent] == model
        assert all((RoundId(n) in recent) == (n in model) for n in "abcdefghij")
