"""The epoch slot file: record layout, bad input, in-place overwrite, both devices."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from enclave_keys.errors import CorruptSlot, StoreClosed, StoreError, StoreUnavailable
from enclave_keys.store import LmdbStore
from enclave_keys.store.slots import (
    SLOT_FILE_NAME,
    SLOT_FILE_SIZE,
    SLOT_SIZE,
    SlotFile,
    SlotRecord,
    decode_slot,
    encode_slot,
)
from tests.store.conftest import Harness
from tests.store.helpers import run_python

RECORD = SlotRecord(7, b"\x01" + bytes(range(72)))
RAW = encode_slot(RECORD)


def test_a_record_round_trips_and_has_the_documented_layout() -> None:
    raw = encode_slot(RECORD)
    assert len(raw) == SLOT_SIZE
    assert raw[:8] == b"EKSLOT\x00\x01"
    assert int.from_bytes(raw[8:16], "big") == 7
    assert int.from_bytes(raw[16:18], "big") == len(RECORD.payload)
    end = 18 + len(RECORD.payload)
    assert raw[18:end] == RECORD.payload
    assert raw[end : end + 32] == hashlib.sha256(raw[:end]).digest()
    assert not any(raw[end + 32 :])
    assert decode_slot(raw) == RECORD


def test_an_all_zero_slot_is_empty() -> None:
    assert decode_slot(bytes(SLOT_SIZE)) is None


def test_the_repr_never_shows_the_payload() -> None:
    assert "payload=<73 bytes>" in repr(RECORD)
    assert RECORD.payload.hex() not in repr(RECORD)


@pytest.mark.parametrize(
    "record",
    [SlotRecord(0, b"x"), SlotRecord(2**64, b"x"), SlotRecord(1, b""), SlotRecord(1, bytes(257))],
)
def test_out_of_range_records_are_refused(record: SlotRecord) -> None:
    with pytest.raises(StoreError):
        encode_slot(record)


@given(st.integers(0, SLOT_SIZE * 8 - 1))
def test_any_bit_flip_is_detected(bit: int) -> None:
    raw = bytearray(encode_slot(RECORD))
    raw[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(CorruptSlot):
        decode_slot(bytes(raw))


@given(st.binary(min_size=1, max_size=300), st.binary(max_size=8))
def test_random_bytes_are_empty_or_corrupt_never_a_crash(noise: bytes, prefix: bytes) -> None:
    """Random headers (with and without the right magic), padded to a slot."""
    raw = ((b"EKSLOT\x00\x01" if prefix else b"") + noise)[:SLOT_SIZE]
    raw += bytes(SLOT_SIZE - len(raw))
    with contextlib.suppress(CorruptSlot):
        assert decode_slot(raw) is None


@given(st.integers(0, SLOT_SIZE - 1))
def test_a_torn_write_is_detected(cut: int) -> None:
    """A write that stopped part way: the new prefix over an empty slot."""
    raw = encode_slot(RECORD)
    torn = raw[:cut] + bytes(SLOT_SIZE - cut)
    if torn == raw:
        return  # the cut fell in the zero padding: the write did complete
    with contextlib.suppress(CorruptSlot):
        assert decode_slot(torn) is None  # cut == 0


def test_a_slot_of_the_wrong_size_is_corrupt() -> None:
    with pytest.raises(CorruptSlot):
        decode_slot(encode_slot(RECORD)[:-1])


# --- the devices: one contract for both ---------------------------------------------------


def test_device_contract(harness: Harness) -> None:
    device = harness.store.epoch_slots()
    assert device.read(0) == device.read(1) == bytes(SLOT_SIZE)
    device.write(1, encode_slot(RECORD))
    assert decode_slot(device.read(1)) == RECORD
    assert device.read(0) == bytes(SLOT_SIZE), "a write touches its own slot only"
    for bad in (-1, 2, True):
        with pytest.raises(StoreError):
            device.read(bad)
    with pytest.raises(StoreError):
        device.write(0, b"short")
    reopened = harness.reopen().epoch_slots()
    assert decode_slot(reopened.read(1)) == RECORD, "slots outlive the store object"


def test_a_closed_store_refuses_its_slots(harness: Harness) -> None:
    harness.store.close()
    with pytest.raises(StoreClosed):
        harness.store.epoch_slots()


def test_the_slot_device_is_closed_with_its_store(harness: Harness) -> None:
    """A device taken before close() refuses reads and writes after it, on both
    backends; the slots themselves outlive the store (a reopen sees them)."""
    device = harness.store.epoch_slots()
    device.write(0, encode_slot(RECORD))
    harness.store.close()
    with pytest.raises(StoreClosed):
        device.read(0)
    with pytest.raises(StoreClosed):
        device.write(0, bytes(SLOT_SIZE))
    assert decode_slot(harness.reopen().epoch_slots().read(0)) == RECORD


def test_the_slot_file_is_overwritten_in_place(tmp_path: Path) -> None:
    """Same inode, same size, old bytes gone: nothing is appended or copied."""
    with LmdbStore.open(tmp_path) as store:
        device = store.epoch_slots()
        path = tmp_path / SLOT_FILE_NAME
        inode = path.stat().st_ino
        old = encode_slot(SlotRecord(1, b"\xaa" * 73))
        device.write(0, old)
        device.write(0, bytes(SLOT_SIZE))
        data = path.read_bytes()
        assert path.stat().st_ino == inode
        assert len(data) == SLOT_FILE_SIZE
        assert b"\xaa" * 73 not in data
        assert oct(path.stat().st_mode & 0o777) == oct(0o600)


@pytest.mark.parametrize("size", [0, 100, SLOT_FILE_SIZE - 1, SLOT_FILE_SIZE + 1])
def test_a_truncated_or_foreign_slot_file_is_refused(tmp_path: Path, size: int) -> None:
    (tmp_path / SLOT_FILE_NAME).write_bytes(os.urandom(size))
    with pytest.raises(StoreUnavailable):
        SlotFile.open(tmp_path)


def test_a_missing_slot_file_is_created_unless_told_not_to(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailable):
        SlotFile.open(tmp_path, create=False)
    device = SlotFile.open(tmp_path)
    try:
        assert (tmp_path / SLOT_FILE_NAME).stat().st_size == SLOT_FILE_SIZE
    finally:
        device.close()
    with pytest.raises(StoreClosed):
        device.read(0)


def test_a_directory_in_place_of_the_slot_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / SLOT_FILE_NAME).mkdir()
    with pytest.raises(StoreUnavailable):
        SlotFile.open(tmp_path)


def _fail(code: int) -> Callable[..., None]:
    def fail(*_args: object) -> None:
        raise OSError(code, os.strerror(code))

    return fail


@pytest.mark.parametrize(
    ("call", "code"),
    [("pread", errno.EIO), ("pwrite", errno.ENOSPC), ("fdatasync", errno.EIO)],
)
def test_a_failing_device_is_a_store_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call: str, code: int
) -> None:
    """EIO or ENOSPC is the store's typed error, never a raw OSError (which a node's
    tick, catching only the library's errors, would not survive)."""
    device = SlotFile.open(tmp_path)
    use = (lambda: device.read(0)) if call == "pread" else lambda: device.write(0, RAW)
    try:
        monkeypatch.setattr(os, call, _fail(code))
        with pytest.raises(StoreError, match=os.strerror(code)) as caught:
            use()
        assert isinstance(caught.value.__cause__, OSError)
        assert RECORD.payload.hex() not in str(caught.value)
    finally:
        monkeypatch.undo()
        device.close()


def test_a_crash_while_the_slot_file_is_created_leaves_none(tmp_path: Path) -> None:
    """Killed after the file is made, before its zeros are written: the next open must
    find no slot file (and create it), never a short one it would refuse for good."""
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from enclave_keys.store.slots import SlotFile\n"
        "os.pwrite = lambda *args: os.kill(os.getpid(), signal.SIGKILL)\n"
        "SlotFile.open(Path(sys.argv[1]))\n"
    )
    child = run_python(script, tmp_path)
    assert child.returncode == -signal.SIGKILL
    assert not (tmp_path / SLOT_FILE_NAME).exists()
    device = SlotFile.open(tmp_path)
    try:
        assert device.read(0) == device.read(1) == bytes(SLOT_SIZE)
    finally:
        device.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [SLOT_FILE_NAME]


@pytest.mark.parametrize("slot_file", ["missing", "present"])
def test_temporary_files_left_by_crashes_are_removed(tmp_path: Path, slot_file: str) -> None:
    """Killed after the link, before the temporary name was removed (or before the link):
    the next open removes what is left, whether it creates the slot file or finds it."""
    if slot_file == "present":
        SlotFile.open(tmp_path).close()
    for name in ("a1b2c3", "d4e5f6"):
        (tmp_path / f"{SLOT_FILE_NAME}.tmp.{name}").write_bytes(bytes(SLOT_FILE_SIZE))
    device = SlotFile.open(tmp_path)
    device.close()
    assert (tmp_path / SLOT_FILE_NAME).read_bytes() == bytes(SLOT_FILE_SIZE)
    assert sorted(p.name for p in tmp_path.iterdir()) == [SLOT_FILE_NAME]


@pytest.mark.parametrize("removes_ours", [False, True])
def test_creating_never_replaces_a_slot_file_made_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, removes_ours: bool
) -> None:
    """Another creator wins the race (its file may already hold an epoch key): kept. An
    opener racing without the directory's claim may also remove this creator's
    temporary file as stale just before its link (before, both shared one temporary
    name, and one could link the other's empty file): the file that exists is used."""
    theirs = encode_slot(RECORD) + bytes(SLOT_SIZE)
    real_link = os.link

    def link_after_them(src: str, dst: str) -> None:
        Path(dst).write_bytes(theirs)
        if removes_ours:
            Path(src).unlink()  # what their open does to temporary files it finds
        real_link(src, dst)

    monkeypatch.setattr(os, "link", link_after_them)
    device = SlotFile.open(tmp_path)
    try:
        assert decode_slot(device.read(0)) == RECORD
    finally:
        device.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [SLOT_FILE_NAME]


def test_a_temporary_file_that_cannot_be_removed_does_not_stop_the_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    SlotFile.open(tmp_path).close()
    (tmp_path / f"{SLOT_FILE_NAME}.tmp.a1b2c3").write_bytes(bytes(SLOT_FILE_SIZE))

    def refuse(self: Path, missing_ok: bool = False) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "unlink", refuse)
    with capture_logs() as logs:
        device = SlotFile.open(tmp_path)
    try:
        assert device.read(0) == bytes(SLOT_SIZE)
    finally:
        device.close()
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == [
        "epoch_slot_temporary_not_removed"
    ]


def test_a_failed_close_is_a_store_error_and_closes_the_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    device = SlotFile.open(tmp_path)
    real_close = os.close

    def failing(fd: int) -> None:
        real_close(fd)
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "close", failing)
    with pytest.raises(StoreError, match="cannot close"):
        device.close()
    monkeypatch.undo()
    device.close()  # closed already: nothing more to do
    with pytest.raises(StoreClosed):
        device.read(0)
