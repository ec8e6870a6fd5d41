"""Regressions of ``enclave-keys`` on damaged stores, failures after a commit, bad input.

* A store with only one of ``master.method`` and ``master.keyring`` (the other lost or
  damaged) is refused with ``UnsealMismatch`` before any secret is asked for and before a
  node opens it: a node that finds no keyring enrols a fresh root over the store, and
  every round key is lost. ``init`` refuses it too instead of initialising it again.
* ``rekey --to shares`` prints the new shares as soon as the new root is committed: a
  failure after the commit (stopping the node, publishing the event) cannot lose them.
* A ``--secret-fd`` that cannot be read, or a ``--tick`` that is not a positive finite
  number of seconds, is a one-line error with exit 2, never a traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from enclave_keys.cli import MAX_TICK, main
from enclave_keys.errors import StoreUnavailable
from enclave_keys.events import Event, RootRekeyed
from enclave_keys.master import KEYRING_RECORD, METHOD_RECORD, MasterKeys
from enclave_keys.node import Node
from enclave_keys.store import LmdbStore
from enclave_keys.unseal import Enrolment, PassphraseUnseal, ShamirUnseal
from tests.cli.conftest import (
    PASSPHRASE,
    WAIT,
    Cli,
    Result,
    make_rounds,
    read_store,
    shares_of,
)
from tests.cli.test_cli import data_hash, error_class, unseal_line
from tests.cli.test_cli_init import prompt_answers

# --- a store missing one of its two master records ---------------------------------------


def forbid_nodes_and_prompts(monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on any ``Node.open`` or secret prompt fails the test."""

    def refused(*args: object, **kwargs: object) -> Node:
        pytest.fail("a node was opened on a damaged store")

    monkeypatch.setattr(Node, "open", refused)
    prompt_answers(monkeypatch)


def remove_record(data_dir: Path, name: str) -> bytes:
    """Delete the meta record ``name`` (as a lost or damaged record would be); its value."""
    with LmdbStore.open(data_dir, create=False) as store:
        value = store.get_meta(name)
        assert value is not None
        with store.write() as batch:
            batch.delete_meta(name)
    return value


def put_record(data_dir: Path, name: str, value: bytes) -> None:
    with LmdbStore.open(data_dir, create=False) as store, store.write() as batch:
        batch.put_meta(name, value)


@pytest.mark.parametrize("missing", [KEYRING_RECORD, METHOD_RECORD])
@pytest.mark.parametrize("command", ["unseal", "rotate-kek", "rekey", "run"])
def test_a_store_missing_a_master_record_is_refused_before_any_secret(
    cli: Cli,
    passphrase_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    command: str,
    missing: str,
) -> None:
    make_rounds(passphrase_dir, PassphraseUnseal(PASSPHRASE), 3)
    value = remove_record(passphrase_dir, missing)
    before = data_hash(passphrase_dir)
    extra = ["--to", "passphrase"] if command == "rekey" else []
    with monkeypatch.context() as patch:
        forbid_nodes_and_prompts(patch)
        result = cli(command, *extra, "--data-dir", passphrase_dir)
    assert result.code == 2
    assert error_class(result, command) == "UnsealMismatch"
    assert f"its {missing} record is missing" in result.err
    assert "Traceback" not in result.err
    assert data_hash(passphrase_dir) == before, "nothing is written"

    # Restored, the directory unseals with its passphrase and every round key is there.
    put_record(passphrase_dir, missing, value)
    unsealed = cli("unseal", "--data-dir", passphrase_dir, secrets=[PASSPHRASE])
    assert unsealed.lines == [unseal_line("passphrase", 1, 3)], unsealed.err


@pytest.mark.parametrize("missing", [KEYRING_RECORD, METHOD_RECORD])
def test_status_names_a_missing_master_record(cli: Cli, passphrase_dir: Path, missing: str) -> None:
    assert cli.status(passphrase_dir)["damaged"] is None
    remove_record(passphrase_dir, missing)
    assert cli.status(passphrase_dir)["damaged"] == (
        f"{missing} record missing: restore from a backup"
    )


def test_init_refuses_a_store_with_a_method_but_no_keyring(
    cli: Cli, passphrase_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    remove_record(passphrase_dir, KEYRING_RECORD)
    before, view = data_hash(passphrase_dir), read_store(passphrase_dir)
    prompt_answers(monkeypatch)  # refused before any secret is asked for
    result = cli("init", "passphrase", "--data-dir", passphrase_dir)
    assert result.code == 2
    assert error_class(result, "init") == "UnsealMismatch"
    assert f"its {KEYRING_RECORD} record is missing" in result.err
    assert result.out == ""
    assert data_hash(passphrase_dir) == before
    assert read_store(passphrase_dir) == view


# --- rekey: the new shares are printed once committed ----------------------------------


REKEY_TO_SHARES = ("rekey", "--to", "shares", "--shares", "2/3", "--data-dir")


@pytest.fixture
def new_roots(monkeypatch: pytest.MonkeyPatch) -> list[Enrolment]:
    """Every enrolment ``ShamirUnseal.enrol_shares`` makes, kept to look at its root."""
    made: list[Enrolment] = []
    original = ShamirUnseal.enrol_shares

    def enrol_shares(threshold: int, count: int) -> tuple[Enrolment, list[str]]:
        enrolment, shares = original(threshold, count)
        made.append(enrolment)
        return enrolment, shares

    monkeypatch.setattr(ShamirUnseal, "enrol_shares", enrol_shares)
    return made


def test_a_failure_at_stop_after_the_rekey_commit_still_prints_the_new_shares(
    cli: Cli, passphrase_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_rounds(passphrase_dir, PassphraseUnseal(PASSPHRASE), 2)
    stop = Node.stop

    def stop_then_fail(self: Node) -> None:  # the node stops, then the disk is full
        stop(self)
        raise StoreUnavailable("MDB_MAP_FULL at stop")

    with monkeypatch.context() as patch:
        patch.setattr(Node, "stop", stop_then_fail)
        result = cli(*REKEY_TO_SHARES, passphrase_dir, secrets=[PASSPHRASE])
    assert result.code == 2
    assert error_class(result, "rekey") == "StoreUnavailable"
    assert result.lines[0] == "root key replaced: now method shamir; round keys untouched"
    assert result.lines[-1] == LATER_STEP_FAILED
    check_new_shares(cli, passphrase_dir, shares_of(result))


def test_ctrl_c_inside_the_rekey_after_its_commit_still_prints_the_new_shares(
    cli: Cli,
    passphrase_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    make_rounds(passphrase_dir, PassphraseUnseal(PASSPHRASE), 2)
    audit = Node._audit

    def interrupted(self: Node, event: Event) -> None:  # after the commit
        if isinstance(event, RootRekeyed):
            raise KeyboardInterrupt
        audit(self, event)

    with monkeypatch.context() as patch:
        patch.setattr(Node, "_audit", interrupted)
        with pytest.raises(KeyboardInterrupt):
            cli(*REKEY_TO_SHARES, passphrase_dir, secrets=[PASSPHRASE])
    result = Result(-1, capsys.readouterr().out, "")
    assert result.lines[0] == "root key replaced: now method shamir; round keys untouched"
    assert result.lines[-1] == LATER_STEP_FAILED
    check_new_shares(cli, passphrase_dir, shares_of(result))


LATER_STEP_FAILED = "the new root key (method shamir) is in effect, but a later step failed"


def check_new_shares(cli: Cli, data_dir: Path, shares: list[str]) -> None:
    """``shares`` are the 2-of-3 set the directory is now sealed under."""
    assert len(shares) == 3
    assert read_store(data_dir).meta[METHOD_RECORD] == b"shamir"
    unsealed = cli("unseal", "--data-dir", data_dir, secrets=shares[:2])
    assert unsealed.code == 0, unsealed.err
    assert unsealed.lines[-1] == unseal_line("shamir", 1, 2)


def test_a_rekey_failing_before_its_commit_prints_no_share_and_wipes_the_new_root(
    cli: Cli, passphrase_dir: Path, monkeypatch: pytest.MonkeyPatch, new_roots: list[Enrolment]
) -> None:
    def fails(self: MasterKeys, *args: object, **kwargs: object) -> None:
        raise StoreUnavailable("MDB_MAP_FULL before the commit")  # and wipes nothing

    before = read_store(passphrase_dir)
    with monkeypatch.context() as patch:
        patch.setattr(MasterKeys, "rekey_root", fails)
        result = cli(*REKEY_TO_SHARES, passphrase_dir, secrets=[PASSPHRASE])
    assert result.code == 2
    assert error_class(result, "rekey") == "StoreUnavailable"
    assert shares_of(result) == []
    assert "root key" not in result.out
    (enrolment,) = new_roots
    assert enrolment.root.is_wiped
    assert read_store(passphrase_dir).meta == before.meta
    assert cli("unseal", "--data-dir", passphrase_dir, secrets=[PASSPHRASE]).code == 0


# --- bad input: one line, exit 2 ---------------------------------------------------------


def closed_fd() -> int:
    read_end, write_end = os.pipe()
    os.close(read_end)
    os.close(write_end)
    return read_end


@pytest.mark.parametrize("kind", ["closed", "negative", "huge", "directory", "write-only"])
def test_a_secret_fd_that_cannot_be_read_is_a_one_line_error(
    cli: Cli, passphrase_dir: Path, kind: str
) -> None:
    read_end, write_end = os.pipe()
    directory = os.open(passphrase_dir, os.O_RDONLY)
    fd = {
        "closed": closed_fd(),
        "negative": -1,
        "huge": 2**40,
        "directory": directory,
        "write-only": write_end,
    }[kind]
    try:
        result = cli("unseal", "--data-dir", passphrase_dir, "--secret-fd", str(fd))
    finally:
        for opened in (read_end, write_end, directory):
            os.close(opened)
    assert result.code == 2
    assert error_class(result, "unseal") == "CliError"
    assert f"cannot read a secret from file descriptor {fd}: " in result.err
    assert len(result.err.splitlines()) == 1


PYTHON_CLI = (sys.executable, "-m", "enclave_keys.cli")
BAD_TICKS = ["-1", "0", "-0.0", "nan", "inf", "-inf", "1e400", str(MAX_TICK + 1), "soon"]


@pytest.mark.parametrize("tick", BAD_TICKS)
def test_run_refuses_a_tick_that_is_not_a_positive_number_of_seconds(
    passphrase_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tick: str,
) -> None:
    prompt_answers(monkeypatch)  # refused before the passphrase is asked for
    with pytest.raises(SystemExit) as exited:
        main(["run", "--data-dir", str(passphrase_dir), f"--tick={tick}"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --tick: must be a number of seconds, 0 < T <= {MAX_TICK:g}" in err


def test_a_negative_tick_from_the_shell_is_no_traceback(passphrase_dir: Path) -> None:
    proc = subprocess.run(
        [*PYTHON_CLI, "run", "--data-dir", str(passphrase_dir), "--secret-fd", "0", "--tick=-1"],
        input=f"{PASSPHRASE}\n".encode(),
        capture_output=True,
        timeout=WAIT,
        check=False,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr.decode()
