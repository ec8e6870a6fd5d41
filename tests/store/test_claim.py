"""One node per data directory: the claim (``node.pid`` under an exclusive ``flock``)."""

from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path

import pytest

from enclave_keys.errors import DirectoryInUse, StoreUnavailable
from enclave_keys.store.claim import CLAIM_FILE, ClaimHolder, DirectoryClaim, claim_holder
from tests.claims import claimed_elsewhere

WAIT = 20.0


def test_a_directory_is_claimed_once_and_free_again_after_release(tmp_path: Path) -> None:
    assert claim_holder(tmp_path) is None
    claim = DirectoryClaim(tmp_path)
    assert (tmp_path / CLAIM_FILE).read_text() == f"{os.getpid()} node\n"
    assert claim_holder(tmp_path) == ClaimHolder(os.getpid(), "node")
    claim.describe("run")
    assert claim_holder(tmp_path) == ClaimHolder(os.getpid(), "run")

    with pytest.raises(DirectoryInUse, match=f"pid {os.getpid()}") as refused:
        DirectoryClaim(tmp_path)  # a second claim in the same process: refused too
    assert isinstance(refused.value, StoreUnavailable)

    claim.release()
    claim.release()  # idempotent
    assert not (tmp_path / CLAIM_FILE).exists()
    assert claim_holder(tmp_path) is None
    DirectoryClaim(tmp_path).release()


def test_a_claim_held_by_a_killed_process_is_free_at_once(tmp_path: Path) -> None:
    """The kernel drops the lock with the process (SIGKILL included): the ``node.pid`` it
    leaves behind counts for nothing, and the next claim takes the directory."""
    with claimed_elsewhere(tmp_path) as holder:
        assert claim_holder(tmp_path) == ClaimHolder(holder.pid, "node")
        with pytest.raises(DirectoryInUse, match=f"pid {holder.pid}"):
            DirectoryClaim(tmp_path)

    assert (tmp_path / CLAIM_FILE).exists()  # left behind, unlocked
    assert claim_holder(tmp_path) is None
    claim = DirectoryClaim(tmp_path)
    assert claim_holder(tmp_path) == ClaimHolder(os.getpid(), "node")
    claim.release()


def test_a_lock_won_on_a_file_released_meanwhile_does_not_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claimant opens ``node.pid``; its holder releases (unlinking the file while still
    holding it); another claim takes the new file; the first claimant's lock on the old
    file then succeeds, and must not count: it tries again on the new file, and is
    refused. Without that check two nodes would hold the directory at once."""
    first = DirectoryClaim(tmp_path)
    stale = os.open(tmp_path / CLAIM_FILE, os.O_RDWR)  # opened before the release
    first.release()
    current = DirectoryClaim(tmp_path)
    real_open = os.open
    opened: list[int] = []

    def the_stale_file_first(path: object, flags: int, mode: int = 0o777) -> int:
        fd = stale if not opened else real_open(path, flags, mode)  # type: ignore[arg-type]
        opened.append(fd)
        return fd

    monkeypatch.setattr(os, "open", the_stale_file_first)
    with pytest.raises(DirectoryInUse):
        DirectoryClaim(tmp_path)
    monkeypatch.undo()

    assert opened[0] == stale
    assert len(opened) > 1  # it noticed, and tried the file that is there now
    assert claim_holder(tmp_path) == ClaimHolder(os.getpid(), "node")
    current.release()


def test_a_directory_that_cannot_hold_the_claim_is_a_typed_error(tmp_path: Path) -> None:
    (tmp_path / CLAIM_FILE).mkdir()  # node.pid cannot be opened as a file
    with pytest.raises(StoreUnavailable, match="cannot claim"):
        DirectoryClaim(tmp_path)
    with pytest.raises(StoreUnavailable, match="cannot claim"):
        DirectoryClaim(tmp_path / "missing")


def test_a_brief_look_at_the_claim_does_not_turn_a_node_away(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``claim_holder`` holds the lock shared for an instant to look: a claim that meets it
    waits a moment and tries again, instead of failing."""
    probe = os.open(tmp_path / CLAIM_FILE, os.O_RDONLY | os.O_CREAT, 0o600)
    fcntl.flock(probe, fcntl.LOCK_SH)  # a look, under way
    pauses: list[float] = []

    def the_look_ends(seconds: float) -> None:
        pauses.append(seconds)
        fcntl.flock(probe, fcntl.LOCK_UN)

    monkeypatch.setattr(time, "sleep", the_look_ends)
    claim = DirectoryClaim(tmp_path)
    monkeypatch.undo()

    assert len(pauses) == 1
    assert claim_holder(tmp_path) == ClaimHolder(os.getpid(), "node")
    claim.release()
    os.close(probe)


def test_a_claim_that_cannot_write_its_pid_is_not_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(fd: int, data: bytes, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", disk_full)
    with pytest.raises(StoreUnavailable, match="No space left"):
        DirectoryClaim(tmp_path)
    monkeypatch.undo()

    assert claim_holder(tmp_path) is None  # the lock went with the failed claim
    DirectoryClaim(tmp_path).release()
