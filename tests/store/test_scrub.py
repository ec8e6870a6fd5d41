"""``scrub``: compacting copy, old file overwritten in place, crash at any step recovered."""

from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from enclave_keys.cli import main
from enclave_keys.errors import CorruptRecord, StoreUnavailable
from enclave_keys.ids import RoundId
from enclave_keys.store import LmdbStore
from enclave_keys.store import scrub as scrub_module
from enclave_keys.store.claim import DirectoryClaim
from enclave_keys.store.scrub import READY_DIR, TMP_DIR, USED_FILE, scrub
from tests.claims import claimed_elsewhere
from tests.store.helpers import make_events, run_python

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


def scrub_cut_short(directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A scrub that dies once its copy is complete (``scrub.ready``), before the old file
    is zeroed: what the next open finishes."""

    def die(directory: Path, used: int | None = None) -> int:
        raise Crash

    with monkeypatch.context() as patch:
        patch.setattr(scrub_module, "_install", die)
        with pytest.raises(Crash):
            scrub(directory)


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

    scrub_cut_short(store_dir, monkeypatch)
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


def used_bytes(path: Path) -> int:
    """(last page + 1) x page size: every byte LMDB has written to ``path/data.mdb``."""
    with LmdbStore.open(path, create=False) as store:
        return int((store._env.info()["last_pgno"] + 1) * store._env.stat()["psize"])


def test_the_scrubbed_file_is_private(store_dir: Path) -> None:
    """The copy is made 0600 whatever the umask (LMDB's own copy would be 0666 & ~umask)."""
    old = os.umask(0o022)
    try:
        scrub(store_dir)
    finally:
        os.umask(old)
    assert stat.S_IMODE((store_dir / "data.mdb").stat().st_mode) == 0o600


def test_a_damaged_page_is_corrupt_record_and_the_store_is_left_alone(store_dir: Path) -> None:
    with LmdbStore.open(store_dir) as store:  # enough pages that the middle is a branch
        store.append_events(make_events(1, 2000, payload_size=200))
    used = used_bytes(store_dir)
    with (store_dir / "data.mdb").open("r+b") as handle:
        handle.seek(used // 2)
        handle.write(b"\xff" * 16384)
    with pytest.raises(CorruptRecord):
        scrub(store_dir)
    assert not scrub_module.scrub_pending(store_dir)
    assert b"\xff" * 16384 in (store_dir / "data.mdb").read_bytes()


def test_a_truncated_store_is_unavailable_not_a_killed_process(store_dir: Path) -> None:
    """Without the length check LmdbStore.open makes, the copy reads past the end of the
    file: SIGBUS. Run in a child so that failure cannot take pytest down with it."""
    with LmdbStore.open(store_dir) as store:
        store.append_events(make_events(1, 300, payload_size=1000))
    used = used_bytes(store_dir)
    os.truncate(store_dir / "data.mdb", used // 2)
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from enclave_keys.errors import StoreUnavailable\n"
        "from enclave_keys.store.scrub import scrub\n"
        "try:\n"
        "    scrub(Path(sys.argv[1]))\n"
        "except StoreUnavailable as exc:\n"
        "    print('refused:', exc)\n"
    )
    child = run_python(script, store_dir)
    assert child.returncode == 0, child.stderr[-2000:]
    assert "truncated" in child.stdout
    assert (store_dir / "data.mdb").stat().st_size == used // 2
    assert not scrub_module.scrub_pending(store_dir)


@pytest.mark.parametrize("recorded", [True, False], ids=["used-recorded", "old-marker"])
def test_finishing_a_scrub_zeroes_the_used_pages_not_the_holes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recorded: bool
) -> None:
    """The file is extended (sparsely) to the map size: zero-filling it all after a crash
    would take map-size disk space (ENOSPC with a large map). A marker written before the
    used size was recorded is still finished, its holes skipped."""
    path = tmp_path / "node"
    map_size = 256 * 2**20
    with LmdbStore.open(path, map_size=map_size) as store:
        store.put_key(RoundId("gone"), DELETED)
        store.delete_key(RoundId("gone"))
    used = used_bytes(path)
    assert (path / "data.mdb").stat().st_size == map_size

    scrub_cut_short(path, monkeypatch)
    assert (path / READY_DIR / USED_FILE).read_text() == f"{used}\n"
    if not recorded:
        (path / READY_DIR / USED_FILE).unlink()
    old = os.open(path / "data.mdb", os.O_RDONLY)
    try:
        with capture_logs() as logs:
            LmdbStore.open(path).close()
        assert os.fstat(old).st_blocks * 512 < map_size // 4, "holes were filled"
        assert not any(os.pread(old, used, 0)), "the used pages were zeroed"
    finally:
        os.close(old)
    [finished] = [entry for entry in logs if entry["event"] == "scrub_finished_after_crash"]
    assert 0 < finished["overwritten"] <= used
    assert DELETED not in (path / "data.mdb").read_bytes()


def test_a_crash_after_the_copy_was_moved_leaves_nothing_behind(
    store_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed between step 4's rename and the removal of scrub.ready: the next open
    removes the marker, and the next scrub can run."""
    real_rmtree = shutil.rmtree

    def die(path: Path) -> None:
        if Path(path).name == READY_DIR:
            raise Crash
        real_rmtree(path)

    monkeypatch.setattr(shutil, "rmtree", die)
    with pytest.raises(Crash):
        scrub(store_dir)
    monkeypatch.undo()
    assert scrub_module.scrub_pending(store_dir)
    before = contents(store_dir)
    assert not scrub_module.scrub_pending(store_dir)
    scrub(store_dir)
    assert contents(store_dir) == before


def test_a_scrub_that_cannot_be_finished_is_a_typed_error(
    store_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC or EIO while finishing a crashed scrub: the open is refused with
    StoreUnavailable (not a raw OSError), and a later open finishes the scrub."""
    before = contents(store_dir)

    def no_space(path: Path, used: int | None = None) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    scrub_cut_short(store_dir, monkeypatch)
    with monkeypatch.context() as patch:
        patch.setattr(scrub_module, "_overwrite", no_space)
        with pytest.raises(StoreUnavailable, match="No space left"):
            LmdbStore.open(store_dir)
    assert contents(store_dir) == before
    assert not scrub_module.scrub_pending(store_dir)


@pytest.mark.parametrize("path_taken", ["scrub", "finished_after_a_crash"])
def test_pages_past_the_last_committed_one_are_zeroed_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path_taken: str
) -> None:
    """A commit killed between writing its pages and its meta page leaves them past the
    last committed page (``used``): a wrapped key in one of them must not survive the
    scrub, while the holes of the sparse file are still skipped."""
    path = tmp_path / "node"
    map_size = 256 * 2**20
    with LmdbStore.open(path, map_size=map_size) as store:
        store.put_key(RoundId("kept"), b"k" * 60)
    used = used_bytes(path)
    orphan = used + 3 * 4096 + 123
    with open(path / "data.mdb", "r+b") as data:  # what the cut-short commit wrote
        data.seek(orphan)
        data.write(DELETED)
    if path_taken == "finished_after_a_crash":
        scrub_cut_short(path, monkeypatch)
    old = os.open(path / "data.mdb", os.O_RDONLY)
    try:
        if path_taken == "scrub":
            scrub(path)
        else:
            LmdbStore.open(path).close()
        assert os.pread(old, len(DELETED), orphan) == bytes(len(DELETED))
        assert os.fstat(old).st_blocks * 512 < map_size // 4, "holes were filled"
    finally:
        os.close(old)
    with LmdbStore.open(path) as store:
        assert store.get_key(RoundId("kept")) == b"k" * 60
