"""Shamir M-of-N ceremony over SLIP-39, including interop with the reference ``shamir`` command."""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from shamir_mnemonic import (  # type: ignore[import-untyped]
    EncryptedMasterSecret,
    Share,
    generate_mnemonics,
    split_ems,
)
from structlog.testing import capture_logs

from enclave_keys.crypto import SecretBytes
from enclave_keys.errors import (
    CeremonyError,
    CorruptRecord,
    DuplicateShare,
    InvalidShare,
    MismatchedShare,
    UnsealMismatch,
)
from enclave_keys.events import UnsealProgress
from enclave_keys.store import MemoryStore, Store
from enclave_keys.unseal import (
    CeremonyProgress,
    ShamirCeremony,
    ShamirUnseal,
    UnsealSource,
)
from enclave_keys.unseal.shamir import SHARE_SET_RECORD, ShareSetRecord
from tests.unseal.helpers import flatten_logs, initialised, windows

THRESHOLD, COUNT = 3, 5


@pytest.fixture(scope="module")
def share_set() -> tuple[bytes, dict[str, bytes], list[str]]:
    """One 3-of-5 enrolment for the module: (root bytes, records, mnemonics)."""
    enrolment, mnemonics = ShamirUnseal.enrol_shares(THRESHOLD, COUNT)
    with enrolment, enrolment.root.borrow() as view:
        root = bytes(view)
    return root, dict(enrolment.records), mnemonics


@pytest.fixture
def store(share_set: tuple[bytes, dict[str, bytes], list[str]]) -> Store:
    _, records, _ = share_set
    store = MemoryStore()
    with store.write() as batch:
        for name, value in records.items():
            batch.put_meta(name, value)
        batch.put_meta("master.method", b"shamir")
    return store


def foreign_set(
    identifier: int, secret: bytes, threshold: int = THRESHOLD, count: int = COUNT
) -> list[str]:
    """A share set of another secret that claims ``identifier`` (and our parameters)."""
    ems = EncryptedMasterSecret.from_master_secret(secret, b"", identifier, True, 1)
    return [share.mnemonic() for share in split_ems(1, [(threshold, count)], ems)[0]]


def record_of(store: Store) -> ShareSetRecord:
    raw = store.get_meta(SHARE_SET_RECORD)
    assert raw is not None
    return ShareSetRecord.from_bytes(raw)


# --- enrolment and the record -----------------------------------------------------------


def test_enrol_shares_makes_n_shares_of_33_words_and_a_record(
    share_set: tuple[bytes, dict[str, bytes], list[str]],
) -> None:
    root, records, mnemonics = share_set
    assert len(root) == 32
    assert set(records) == {SHARE_SET_RECORD}
    assert len(mnemonics) == COUNT
    assert all(len(m.split()) == 33 for m in mnemonics)
    record = ShareSetRecord.from_bytes(records[SHARE_SET_RECORD])
    assert (record.threshold, record.count) == (THRESHOLD, COUNT)
    shares = [Share.from_mnemonic(m) for m in mnemonics]
    assert {s.identifier for s in shares} == {record.identifier}
    assert sorted(s.index for s in shares) == list(range(COUNT))


def test_record_round_trips_and_rejects_garbage(
    share_set: tuple[bytes, dict[str, bytes], list[str]],
) -> None:
    raw = share_set[1][SHARE_SET_RECORD]
    assert ShareSetRecord.from_bytes(raw).to_bytes() == raw
    for bad in (raw[:-1], raw + b"\x00", b"\x02" + raw[1:], raw[:3] + b"\x02" + raw[4:], b""):
        with pytest.raises(CorruptRecord):
            ShareSetRecord.from_bytes(bad)
    threshold_zero = raw[:5] + b"\x00" + raw[6:]
    with pytest.raises(CorruptRecord):
        ShareSetRecord.from_bytes(threshold_zero)


def test_shares_and_root_never_appear_in_records(
    share_set: tuple[bytes, dict[str, bytes], list[str]],
) -> None:
    root, records, mnemonics = share_set
    blob = b"".join(records.values())
    assert root not in blob
    for mnemonic in mnemonics:
        assert mnemonic.encode() not in blob
        value = Share.from_mnemonic(mnemonic).value
        assert value not in blob
        assert value[:8] not in blob


@pytest.mark.parametrize(
    ("threshold", "count"), [(0, 3), (4, 3), (1, 3), (2, 17), (-1, 2), (True, 2)]
)
def test_bad_schemes_are_refused(threshold: int, count: int) -> None:
    with pytest.raises(CeremonyError):
        ShamirUnseal.enrol_shares(threshold, count)


def test_one_of_one_and_sixteen_of_sixteen_work() -> None:
    for threshold, count in ((1, 1), (16, 16)):
        enrolment, mnemonics = ShamirUnseal.enrol_shares(threshold, count)
        with enrolment, ShamirUnseal(mnemonics).unlock_root(initialised(enrolment, "shamir")) as r:
            assert r.equals(enrolment.root)


# --- the ceremony: any M recover, M - 1 do not ------------------------------------------


@pytest.mark.parametrize("subset", list(itertools.combinations(range(COUNT), THRESHOLD)))
def test_any_m_shares_recover_the_root(
    share_set: tuple[bytes, dict[str, bytes], list[str]], store: Store, subset: tuple[int, ...]
) -> None:
    root, _, mnemonics = share_set
    with ShamirCeremony(store) as ceremony:
        progress = [ceremony.submit(mnemonics[i]) for i in subset]
        assert progress == [
            CeremonyProgress(1, THRESHOLD, complete=False),
            CeremonyProgress(2, THRESHOLD, complete=False),
            CeremonyProgress(3, THRESHOLD, complete=True),
        ]
        with ceremony.root() as recovered:
            assert recovered.equals(root)
    with ShamirUnseal([mnemonics[i] for i in reversed(subset)]).unlock_root(store) as again:
        assert again.equals(root)


@pytest.mark.parametrize("subset", list(itertools.combinations(range(COUNT), THRESHOLD - 1)))
def test_m_minus_one_shares_do_not(
    share_set: tuple[bytes, dict[str, bytes], list[str]], store: Store, subset: tuple[int, ...]
) -> None:
    _, _, mnemonics = share_set
    with ShamirCeremony(store) as ceremony:
        for i in subset:
            progress = ceremony.submit(mnemonics[i])
        assert progress == CeremonyProgress(THRESHOLD - 1, THRESHOLD, complete=False)
        assert not ceremony.progress.complete
        with pytest.raises(CeremonyError, match="incomplete"):
            ceremony.root()
    with pytest.raises(CeremonyError, match="not enough"):
        ShamirUnseal([mnemonics[i] for i in subset]).unlock_root(store)


def test_progress_is_an_unseal_progress_event(
    share_set: tuple[bytes, dict[str, bytes], list[str]], store: Store
) -> None:
    with ShamirCeremony(store) as ceremony:
        progress = ceremony.submit(share_set[2][0])
    assert progress.to_event() == UnsealProgress(submitted=1, threshold=THRESHOLD)
    assert ceremony.threshold == THRESHOLD


def test_shares_are_normalised_for_case_and_spacing(
    share_set: tuple[bytes, dict[str, bytes], list[str]], store: Store
) -> None:
    root, _, mnemonics = share_set
    with ShamirCeremony(store) as ceremony:
        ceremony.submit("  " + mnemonics[0].upper() + "\n")
        ceremony.submit("\t".join(mnemonics[1].split()))
        ceremony.submit(mnemonics[2].title())
        with ceremony.root() as recovered:
            assert recovered.equals(root)


def test_root_hands_over_and_resets(
    share_set: tuple[bytes, dict[str, bytes], list[str]], store: Store
) -> None:
    root, _, mnemonics = share_set
    ceremony = ShamirCeremony(store)
    for mnemonic in mnemonics[:THRESHOLD]:
        ceremony.submit(mnemonic)
    with pytest.raises(CeremonyError, match="complete"):
        ceremony.submit(mnemonics[THRESHOLD])
    handed = ceremony.root()
    assert handed.equals(root)
    handed.wipe()
    assert ceremony.progress == CeremonyProgress(0, THRESHOLD, complete=False)
    with pytest.raises(CeremonyError):
        ceremony.root()
    # a second ceremony on the same object
    for mnemonic in mnemonics[2:]:
        ceremony.submit(mnemonic)
    with ceremony.root() as again:
        assert again.equals(root)


def test_reset_wipes_an_unclaimed_root(
    share_set: tuple[bytes, dict[str, bytes], list[str]], store: Store
) -> None:
    ceremony = ShamirCeremony(store)
    for mnemonic in share_set[2][:THRESHOLD]:
        ceremony.submit(mnemonic)
    held = ceremony._root
    assert held is not None
    ceremony.reset()
    assert held.is_wiped
    assert ceremony.progress.submitted == 0


# --- rejected shares ---------------------------------------------------------------------


def mutate_word(mnemonic: str, position: int) -> str:
    words = mnemonic.split()
    words[position] = "academic" if words[position] != "academic" else "acid"
    return " ".join(words)


def swap_words(mnemonic: str, a: int, b: int) -> str:
    words = mnemonic.split()
    words[a], words[b] = words[b], words[a]
    return " ".join(words)


def invalid_variants(mnemonic: str) -> dict[str, str]:
    words = mnemonic.split()
    swapped = swap_words(mnemonic, 10, 20) if words[10] != words[20] else mutate_word(mnemonic, 9)
    return {
        "unknown word": " ".join([*words[:7], "notaword", *words[8:]]),
        "mistyped word (checksum)": mutate_word(mnemonic, 12),
        "swapped words (checksum)": swapped,
        "last word changed": mutate_word(mnemonic, 32),
        "one word missing": " ".join(words[:-1]),
        "one word too many": mnemonic + " academic",
        "too short": " ".join(words[:10]),
        "empty": "   ",
        "far too long": " ".join(words * 3),
    }


def test_invalid_shares_are_rejected_without_quoting_them(
    share_set: tuple[bytes, dict[str, bytes], list[str]], store: Store
) -> None:
    root, _, mnemonics = share_set
    with ShamirCeremony(store) as ceremony, capture_logs() as logs:
        ceremony.submit(mnemonics[0])
        for name, bad in invalid_variants(mnemonics[1]).items():
            with pytest.raises(InvalidShare) as caught:
                ceremony.submit(bad)
            message = str(caught.value)
            assert caught.value.__cause__ is None, name
            assert caught.value.__context__ is None, name
            for window in windows(bad.split()):
                assert window not in message, name
        with pytest.raises(InvalidShare):
            ceremony.submit(12345)  # type: ignore[arg-type]
        assert ceremony.progress.submitted == 1  # the accepted share is kept
        ceremony.submit(mnemonics[1])
        ceremony.submit(mnemonics[2])
        with ceremony.root() as recovered:
            assert recovered.equals(root)
    assert_no_share_text(flatten_logs(logs), mnemonics)


def test_a_duplicate_member_index_is_rejected(
    share_set: tuple[bytes, dict[str, bytes], list[str]], store: Store
) -> None:
    _, _, mnemonics = share_set
    with ShamirCeremony(store) as ceremony:
        ceremony.submit(mnemonics[3])
        with pytest.raises(DuplicateShare):
            ceremony.submit(mnemonics[3])
        with pytest.raises(DuplicateShare):
            ceremony.submit(mnemonics[3].upper())
        assert ceremony.progress.submitted == 1
        ceremony.submit(mnemonics[4])
        assert ceremony.progress.submitted == 2


def test_a_share_of_another_set_is_rejected_and_accepted_shares_are_kept(
    share_set: tuple[bytes, dict[str, bytes], list[str]], store: Store
) -> None:
    root, _, mnemonics = share_set
    with SecretBytes.random(32) as other_root:  # ``previous``: never our identifier
        other, other_mnemonics = ShamirUnseal.resplit(other_root, THRESHOLD, COUNT, previous=store)
    other.wipe()
    two_of_three, two_of_three_mnemonics = ShamirUnseal.enrol_shares(2, 3)
    two_of_three.wipe()
    small = generate_mnemonics(1, [(THRESHOLD, COUNT)], os.urandom(16))[0]
    with ShamirCeremony(store) as ceremony:
        ceremony.submit(mnemonics[0])
        for foreign in (other_mnemonics[1], two_of_three_mnemonics[1], small[1]):
            with pytest.raises(MismatchedShare) as caught:
                ceremony.submit(foreign)
            for window in windows(foreign.split()):
                assert window not in str(caught.value)
        assert ceremony.progress.submitted == 1
        ceremony.submit(mnemonics[1])
        ceremony.submit(mnemonics[2])
        with ceremony.root() as recovered:
            assert recovered.equals(root)


def test_a_share_claiming_our_identifier_fails_the_digest_and_resets(
    share_set: tuple[bytes, dict[str, bytes], list[str]], store: Store
) -> None:
    root, _, mnemonics = share_set
    impostor = foreign_set(record_of(store).identifier, os.urandom(32))
    with ShamirCeremony(store) as ceremony, capture_logs() as logs:
        ceremony.submit(mnemonics[0])
        ceremony.submit(mnemonics[1])
        with pytest.raises(MismatchedShare, match="reset"):
            ceremony.submit(impostor[2])
        assert ceremony.progress == CeremonyProgress(0, THRESHOLD, complete=False)
        for mnemonic in mnemonics[2:]:
            ceremony.submit(mnemonic)
        with ceremony.root() as recovered:
            assert recovered.equals(root)
    assert any(entry["event"] == "shamir_ceremony_reset" for entry in logs)


def test_a_whole_set_of_another_secret_with_our_identifier_fails_the_verifier(
    share_set: tuple[bytes, dict[str, bytes], list[str]], store: Store
) -> None:
    impostor = foreign_set(record_of(store).identifier, os.urandom(32))
    with ShamirCeremony(store) as ceremony:
        ceremony.submit(impostor[0])
        ceremony.submit(impostor[1])
        with pytest.raises(MismatchedShare, match="not this node's root key"):
            ceremony.submit(impostor[2])
        assert ceremony.progress.submitted == 0
        with pytest.raises(CeremonyError):
            ceremony.root()


def test_a_ceremony_needs_a_shamir_store(
    share_set: tuple[bytes, dict[str, bytes], list[str]],
) -> None:
    with pytest.raises(UnsealMismatch):
        ShamirCeremony(MemoryStore())
    store = MemoryStore()
    store.put_meta(SHARE_SET_RECORD, share_set[1][SHARE_SET_RECORD])
    store.put_meta("master.method", b"passphrase")
    with pytest.raises(UnsealMismatch, match="'passphrase'"):
        ShamirCeremony(store)
    store.put_meta("master.method", b"shamir")
    store.put_meta(SHARE_SET_RECORD, b"\x01\x02")
    with pytest.raises(CorruptRecord):
        ShamirCeremony(store)


def test_the_ceremony_is_thread_safe(
    share_set: tuple[bytes, dict[str, bytes], list[str]], store: Store
) -> None:
    import threading

    root, _, mnemonics = share_set
    ceremony = ShamirCeremony(store)
    errors: list[BaseException] = []

    def submit(mnemonic: str) -> None:
        try:
            ceremony.submit(mnemonic)
        except CeremonyError as exc:  # "complete" for the shares that come after the third
            errors.append(exc)

    threads = [threading.Thread(target=submit, args=(m,)) for m in mnemonics]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(errors) == COUNT - THRESHOLD
    with ceremony.root() as recovered:
        assert recovered.equals(root)


# --- logs --------------------------------------------------------------------------------


def assert_no_share_text(text: str, mnemonics: list[str]) -> None:
    for mnemonic in mnemonics:
        for window in windows(mnemonic.split()):
            assert window not in text
        assert Share.from_mnemonic(mnemonic).value.hex() not in text


def test_no_share_or_root_reaches_the_logs() -> None:
    with capture_logs() as logs:
        enrolment, mnemonics = ShamirUnseal.enrol_shares(THRESHOLD, COUNT)
        with enrolment:
            store = initialised(enrolment, "shamir")
            with enrolment.root.borrow() as view:
                root_hex = bytes(view).hex()
            with ShamirCeremony(store) as ceremony:
                for bad in (mutate_word(mnemonics[0], 5), mnemonics[0], mnemonics[0]):
                    with contextlib.suppress(CeremonyError):
                        ceremony.submit(bad)
                ceremony.submit(mnemonics[1])
                ceremony.submit(mnemonics[2])
                ceremony.root().wipe()
            ShamirUnseal.enrol_from_shares(mnemonics[:THRESHOLD]).wipe()
    text = flatten_logs(logs)
    assert {e["event"] for e in logs} >= {
        "shamir_share_set_created",
        "shamir_share_accepted",
        "shamir_share_rejected",
        "shamir_ceremony_complete",
        "shamir_share_set_imported",
    }
    assert root_hex not in text
    assert_no_share_text(text, mnemonics)
    assert repr(ShamirUnseal(mnemonics[:3])) == "ShamirUnseal(<3 shares hidden>)"


# --- initialising from shares, re-splitting ------------------------------------------------


def test_enrol_from_shares_initialises_from_existing_shares(
    share_set: tuple[bytes, dict[str, bytes], list[str]],
) -> None:
    root, records, mnemonics = share_set
    source: UnsealSource = ShamirUnseal(mnemonics[1:4])
    assert source.method == "shamir"
    with source.enrol() as enrolment:
        assert enrolment.root.equals(root)
        record = ShareSetRecord.from_bytes(enrolment.records[SHARE_SET_RECORD])
        original = ShareSetRecord.from_bytes(records[SHARE_SET_RECORD])
        assert record.identifier == original.identifier
        assert (record.threshold, record.count) == (THRESHOLD, 0)  # N is not in the shares
        store = initialised(enrolment, "shamir")
    with ShamirUnseal([mnemonics[0], mnemonics[4], mnemonics[2]]).unlock_root(store) as again:
        assert again.equals(root)
    with ShamirUnseal.enrol_from_shares(mnemonics) as all_five:  # more than M: all must agree
        assert all_five.root.equals(root)


def test_enrol_from_shares_refuses_bad_input(
    share_set: tuple[bytes, dict[str, bytes], list[str]],
) -> None:
    _, _, mnemonics = share_set
    other, other_mnemonics = ShamirUnseal.enrol_shares(THRESHOLD, COUNT)
    other.wipe()
    impostor = foreign_set(Share.from_mnemonic(mnemonics[0]).identifier, os.urandom(32))
    with pytest.raises(CeremonyError, match="not enough"):
        ShamirUnseal.enrol_from_shares(mnemonics[:2])
    with pytest.raises(CeremonyError, match="no shares"):
        ShamirUnseal.enrol_from_shares([])
    with pytest.raises(DuplicateShare):
        ShamirUnseal.enrol_from_shares([mnemonics[0], mnemonics[1], mnemonics[0]])
    with pytest.raises(MismatchedShare):
        ShamirUnseal.enrol_from_shares([mnemonics[0], mnemonics[1], other_mnemonics[2]])
    with pytest.raises(MismatchedShare):
        ShamirUnseal.enrol_from_shares([mnemonics[0], mnemonics[1], impostor[2]])
    with pytest.raises(MismatchedShare):  # first three fine, the extra ones disagree
        ShamirUnseal.enrol_from_shares([*mnemonics[:3], impostor[3], impostor[4]])
    with pytest.raises(InvalidShare):
        ShamirUnseal.enrol_from_shares([mnemonics[0], mutate_word(mnemonics[1], 3), mnemonics[2]])
    small = generate_mnemonics(1, [(2, 3)], os.urandom(16))[0]
    with pytest.raises(CeremonyError, match="16-byte"):
        ShamirUnseal.enrol_from_shares(small[:2])
    groups = generate_mnemonics(2, [(2, 3), (2, 3)], os.urandom(32))
    with pytest.raises(MismatchedShare, match="multi-group"):
        ShamirUnseal.enrol_from_shares(groups[0][:2] + groups[1][:2])


def test_resplit_keeps_the_root_and_retires_the_old_shares(
    share_set: tuple[bytes, dict[str, bytes], list[str]], store: Store
) -> None:
    root, _, old_mnemonics = share_set
    with ShamirUnseal(old_mnemonics[:THRESHOLD]).unlock_root(store) as current:
        enrolment, mnemonics = ShamirUnseal.resplit(current, 2, 4, previous=store)
        assert not current.is_wiped  # copied, not taken
    with enrolment:
        assert enrolment.root.equals(root)
        new_store = initialised(enrolment, "shamir")
    assert record_of(new_store).identifier != record_of(store).identifier
    assert (record_of(new_store).threshold, record_of(new_store).count) == (2, 4)
    for pair in itertools.combinations(mnemonics, 2):
        with ShamirUnseal(pair).unlock_root(new_store) as again:
            assert again.equals(root)
    with ShamirCeremony(new_store) as ceremony, pytest.raises(MismatchedShare):
        ceremony.submit(old_mnemonics[0])


def test_resplit_refuses_a_bad_root() -> None:
    with SecretBytes.random(16) as short, pytest.raises(CeremonyError):
        ShamirUnseal.resplit(short, 2, 3)


# --- interop with the reference `shamir` command --------------------------------------------


def shamir_command() -> list[str]:
    """The reference CLI: ``shamir`` next to this interpreter, else ``python -m``."""
    try:
        import click  # noqa: F401
    except ImportError:
        pytest.fail(
            "the reference `shamir` command needs click: install shamir-mnemonic[cli]"
            " (the test extra must list it)"
        )
    script = Path(sys.executable).with_name("shamir")
    if script.exists():
        return [str(script)]
    found = shutil.which("shamir")
    if found:
        return [found]
    return [sys.executable, "-m", "shamir_mnemonic.cli"]


def run_shamir(args: list[str], stdin: str = "") -> str:
    result = subprocess.run(
        [*shamir_command(), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "NO_COLOR": "1", "TERM": "dumb"},
    )
    assert result.returncode == 0, f"shamir {args[0]} failed: {result.stdout}{result.stderr}"
    return result.stdout


def strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def test_interop_our_shares_are_recovered_by_shamir_recover(
    share_set: tuple[bytes, dict[str, bytes], list[str]],
) -> None:
    root, _, mnemonics = share_set
    chosen = [mnemonics[4], mnemonics[0], mnemonics[2]]
    output = strip_ansi(run_shamir(["recover"], stdin="".join(m + "\n" for m in chosen)))
    assert "SUCCESS!" in output
    match = re.search(r"Your master secret is: ([0-9a-f]{64})", output)
    assert match is not None, output
    assert bytes.fromhex(match.group(1)) == root


def test_interop_shares_from_shamir_create_unseal_our_node() -> None:
    master = os.urandom(32)
    output = strip_ansi(run_shamir(["create", "3of5", "--master-secret", master.hex()]))
    lines = [line.strip() for line in output.splitlines()]
    mnemonics = [line for line in lines if len(line.split()) == 33]
    assert len(mnemonics) == 5, output
    # Initialise a node from three of them (combined once, to build the records) ...
    with ShamirUnseal.enrol_from_shares(mnemonics[:3]) as enrolment:
        assert enrolment.root.equals(master)
        store = initialised(enrolment, "shamir")
    # ... and unseal it in a ceremony with another three.
    with ShamirCeremony(store) as ceremony:
        for mnemonic in (mnemonics[4], mnemonics[1], mnemonics[3]):
            progress = ceremony.submit(mnemonic)
        assert progress.complete
        with ceremony.root() as root:
            assert root.equals(master)
    # A share of another `shamir create` set for the same secret is another set's.
    again = strip_ansi(run_shamir(["create", "3of5", "--master-secret", master.hex()]))
    other = [line.strip() for line in again.splitlines() if len(line.split()) == 33]
    if Share.from_mnemonic(other[0]).identifier != record_of(store).identifier:  # 1 in 2**15
        with ShamirCeremony(store) as ceremony, pytest.raises(MismatchedShare):
            ceremony.submit(other[0])
