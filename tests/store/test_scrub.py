"""``scrub``: compacting copy, old file overwritten in place, crash at any step recovered."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from enclave_keys.cli import main
from enclave_keys.errors import StoreUnavailable
from enclave_keys.ids import RoundId
from enclave_keys.store import LmdbStore
from enclave_keys.store import scrub as scrub_module
from enclave_keys.store.claim import DirectoryClaim
from enclave_keys.store.scrub import READY_DIR, TMP_DIR, scrub
from tests.claims import claimed_elsewhere

DELETED = b"\x5a" * 85
KEPT = b"\xa5" * 85


class Crash(BaseException):
    """Stands for the process dying at this point."""


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    path = tmp_path / "node"
    with LmdbStore.open(path) as store:
        for i in range(50):
            store.put_key(RoundId(f"r{i}"), KEPT)
        store.put_key(RoundId("gone"), DELETED)
        store.delete_key(RoundId("gone"))
        store.put_meta("app.note", b"kept")
    assert DELETED in (path / "data.mdb").read_bytes(), "the deleted value lingers"
    return path


def contents(path: Path) -> tuple[list[tuple[RoundId, bytes]], bytes | None]:
    with LmdbStore.open(path, create=False) as store:
        return store.list_keys(), store.get_meta("app.note")


def test_scrub_removes_leftovers_and_keeps_every_record(store_dir: Path) -> None:
    before = contents(store_dir)
    old = os.open(store_dir / "data.mdb", os.O_RDONLY)  # the old file's blocks, kept open
    try:
        report = scrub(store_dir)
        assert report.overwritten == report.old_size > 0
        assert not any(os.pread(old, report.old_size, 0)), "the old file was zeroed in place"
    finally:
        os.close(old)
    assert DELETED not in (store_dir / "data.mdb").read_bytes()
    assert contents(store_dir) == before
    assert not (store_dir / READY_DIR).exists()
    assert not (store_dir / TMP_DIR).exists()


def test_a_crash_after_the_copy_is_finished_at_the_next_open(
    store_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = contents(store_dir)

    def die(directory: Path, used: int | None = None) -> int:
        raise Crash

    monkeypatch.setattr(scrub_module, "_install", die)
    with pytest.raises(Crash):
        scrub(store_dir)
    monkeypatch.undo()
    assert (store_dir / READY_DIR).exists()
    assert contents(store_dir) == before  # LmdbStore.open finishes the scrub
    assert DELETED not in (store_dir / "data.mdb").read_bytes()


def test_a_crash_after_the_old_file_was_zeroed_is_finished_at_the_next_open(
    store_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = contents(store_dir)
    real_replace = os.replace

    def die(src: object, dst: object) -> None:
        if str(src).endswith(f"{READY_DIR}/data.mdb"):
            raise Crash
        real_replace(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "replace", die)
    with pytest.raises(Crash):
        scrub(store_dir)
    monkeypatch.undo()
    assert not any((store_dir / "data.mdb").read_bytes()), "zeroed, not yet replaced"
    assert contents(store_dir) == before


def test_a_crash_during_the_copy_leaves_the_old_file(store_dir: Path) -> None:
    before = contents(store_dir)
    (store_dir / TMP_DIR).mkdir()
    (store_dir / TMP_DIR / "data.mdb").write_bytes(b"half a copy")
    assert contents(store_dir) == before
    assert not (store_dir / TMP_DIR).exists()


def test_scrub_needs_a_store(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailable):
        scrub(tmp_path)


def test_the_cli_scrubs_and_refuses_while_a_node_runs(store_dir: Path) -> None:
    lines: list[str] = []
    claim = DirectoryClaim(store_dir)  # as a running node holds it
    try:
        assert main(["scrub", "--data-dir", str(store_dir)], out=lines.append) != 0
    finally:
        claim.release()
    assert DELETED in (store_dir / "data.mdb").read_bytes()
    assert main(["scrub", "--data-dir", str(store_dir)], out=lines.append) == 0
    assert lines[-1].startswith(f"scrubbed {store_dir}:")
    assert DELETED not in (store_dir / "data.mdb").read_bytes()


def test_a_reader_leaves_a_running_scrub_alone(store_dir: Path) -> None:
    """A scrub runs holding the directory's claim: a read-only tool opening the store
    meanwhile (``status``, ``inspect``) must not "finish" it under the scrubbing process.
    Once the holder is gone (killed), the next open finishes it as after a crash."""
    (store_dir / TMP_DIR).mkdir()
    (store_dir / TMP_DIR / "data.mdb").write_bytes(b"a copy being written")
    with claimed_elsewhere(store_dir, "scrub"):
        before = contents(store_dir)  # a read-only open beside the scrub
        assert (store_dir / TMP_DIR / "data.mdb").read_bytes() == b"a copy being written"
    assert contents(store_dir) == before  # the scrubber died: this open cleans up
    assert not (store_dir / TMP_DIR).exists()
