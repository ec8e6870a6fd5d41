"""``enclave-keys init`` writes nothing until the operator's input is in and valid.

Bad input (passphrases that differ, a malformed share scheme, a missing environment key
or PKCS#11 option, end of file or Ctrl-C at the prompt) is a typed error that leaves no
store behind: a new data directory is not created, an existing empty one stays empty.
If initialising fails after the store was created, the files ``init`` created are
removed again (and only those), and the new root key is wiped on every path.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from enclave_keys.cli import PKCS11_MODULE_ENV, _NewStoreFiles
from enclave_keys.errors import StoreError
from enclave_keys.master import MasterKeys
from enclave_keys.store.claim import CLAIM_FILE, ClaimHolder, claim_holder
from enclave_keys.unseal import Enrolment, PassphraseUnseal
from enclave_keys.unseal.env import DEFAULT_ENV_VARIABLE
from tests.claims import claimed_elsewhere
from tests.cli.conftest import NEW_PASSPHRASE, PASSPHRASE, TOKEN, Cli, read_store
from tests.cli.test_cli import data_hash, error_class

STORE_FILES = {"data.mdb", "lock.mdb"}

BAD_INPUT: dict[str, tuple[list[str], list[str] | None, str]] = {
    # name: (argv after "init", secrets through --secret-fd or None for the prompt, error)
    "passphrases-differ": (["passphrase"], None, "CliError"),
    "eof-at-the-prompt": (["passphrase"], [], "EOFError"),
    "shares-not-m-of-n": (["shares", "--shares", "a/b"], None, "CliError"),
    "shares-threshold-above-count": (["shares", "--shares", "9/3"], None, "CeremonyError"),
    "env-key-not-set": (["env"], None, "InvalidKeyMaterial"),
    "pkcs11-without-token-label": (
        ["pkcs11", "--pkcs11-module", "/nonexistent/libpkcs11.so"],
        [TOKEN],
        "CliError",
    ),
}


@pytest.fixture(autouse=True)
def _no_environment_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DEFAULT_ENV_VARIABLE, raising=False)
    monkeypatch.delenv(PKCS11_MODULE_ENV, raising=False)


@pytest.fixture
def enrolments(monkeypatch: pytest.MonkeyPatch) -> list[Enrolment]:
    """Every enrolment a passphrase init makes, kept to check that its root was wiped."""
    made: list[Enrolment] = []
    original = PassphraseUnseal.enrol

    def enrol(self: PassphraseUnseal) -> Enrolment:
        enrolment = original(self)
        made.append(enrolment)
        return enrolment

    monkeypatch.setattr(PassphraseUnseal, "enrol", enrol)
    return made


def prompt_answers(monkeypatch: pytest.MonkeyPatch, *answers: str) -> None:
    """The hidden prompt answers ``answers`` in turn; one prompt too many fails the test."""
    replies = iter(answers)

    def fake_getpass(prompt: str = "Password: ", stream: object = None) -> str:
        reply = next(replies, None)
        if reply is None:
            pytest.fail(f"unexpected prompt {prompt!r}")
        return reply

    monkeypatch.setattr("getpass.getpass", fake_getpass)


@pytest.mark.parametrize("existing", [False, True], ids=["new-dir", "existing-empty-dir"])
@pytest.mark.parametrize(("argv", "secrets", "error"), BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_bad_input_is_a_typed_error_and_writes_nothing(
    cli: Cli,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    secrets: list[str] | None,
    error: str,
    existing: bool,
) -> None:
    prompt_answers(monkeypatch, PASSPHRASE, NEW_PASSPHRASE)  # two that differ
    parent = tmp_path / "parent"
    data_dir = parent / "node"
    if existing:
        data_dir.mkdir(parents=True)
    result = cli("init", *argv, "--data-dir", data_dir, secrets=secrets)
    assert result.code == 2
    assert error_class(result, "init") == error
    assert result.out == ""
    if existing:
        assert list(data_dir.iterdir()) == [], "no store file is left in the directory"
    else:
        assert not parent.exists(), "neither the directory nor its parent is created"


def test_ctrl_c_at_the_prompt_creates_nothing(
    cli: Cli, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(prompt: str = "Password: ", stream: object = None) -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr("getpass.getpass", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cli("init", "passphrase", "--data-dir", data_dir)
    assert not data_dir.exists()


def test_an_initialised_directory_is_refused_before_any_secret_is_asked_for(
    cli: Cli, passphrase_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompt_answers(monkeypatch)  # any prompt fails the test
    before, view = data_hash(passphrase_dir), read_store(passphrase_dir)
    result = cli("init", "passphrase", "--data-dir", passphrase_dir)
    assert result.code == 2
    assert error_class(result, "init") == "CliError"
    assert f"{passphrase_dir} is already initialised" in result.err
    assert data_hash(passphrase_dir) == before
    assert read_store(passphrase_dir) == view


@pytest.mark.parametrize("existing", [False, True], ids=["new-dir", "existing-dir"])
def test_a_failed_initialise_removes_only_what_init_created_and_wipes_the_root(
    cli: Cli,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    enrolments: list[Enrolment],
    existing: bool,
) -> None:
    data_dir = tmp_path / "parent" / "node"
    if existing:
        data_dir.mkdir(parents=True)
        (data_dir / "operator-notes.txt").write_text("not the store's\n")
    seen: list[set[str]] = []

    def failing_initialise(*args: object, **kwargs: object) -> MasterKeys:
        seen.append({path.name for path in data_dir.iterdir()})
        raise StoreError("disk full, nothing was written")

    monkeypatch.setattr(MasterKeys, "initialise", failing_initialise)
    result = cli("init", "passphrase", "--data-dir", data_dir, secrets=[PASSPHRASE])
    assert result.code == 2
    assert error_class(result, "init") == "StoreError"
    (present,) = seen
    assert present >= STORE_FILES, "the store existed when initialise failed"
    if existing:
        assert [path.name for path in data_dir.iterdir()] == ["operator-notes.txt"]
    else:
        assert not (tmp_path / "parent").exists()
    (enrolment,) = enrolments
    assert enrolment.root.is_wiped


def test_a_store_that_cannot_be_created_is_an_error_and_the_root_is_wiped(
    cli: Cli, tmp_path: Path, enrolments: list[Enrolment]
) -> None:
    not_a_dir = tmp_path / "node"
    not_a_dir.write_text("a file, not a directory\n")
    result = cli("init", "passphrase", "--data-dir", not_a_dir, secrets=[PASSPHRASE])
    assert result.code == 2
    assert error_class(result, "init") == "StoreUnavailable"
    assert not_a_dir.read_text() == "a file, not a directory\n"
    (enrolment,) = enrolments
    assert enrolment.root.is_wiped


def test_a_directory_initialised_meanwhile_is_left_alone(
    cli: Cli, passphrase_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another ``init`` won the race after the first check: its store is not removed."""
    monkeypatch.setattr("enclave_keys.cli._is_initialised", lambda data_dir: False)
    view = read_store(passphrase_dir)
    result = cli("init", "passphrase", "--data-dir", passphrase_dir, secrets=[NEW_PASSPHRASE])
    assert result.code == 2
    assert error_class(result, "init") == "AlreadyInitialised"
    assert read_store(passphrase_dir) == view
    assert cli("unseal", "--data-dir", passphrase_dir, secrets=[PASSPHRASE]).code == 0


@pytest.mark.parametrize("existing", [False, True], ids=["new-dir", "existing-empty-dir"])
def test_a_good_init_still_initialises_and_wipes_the_root(
    cli: Cli, data_dir: Path, enrolments: list[Enrolment], existing: bool
) -> None:
    if existing:
        data_dir.mkdir()
    result = cli("init", "passphrase", "--data-dir", data_dir, secrets=[PASSPHRASE])
    assert result.code == 0, result.err
    assert result.lines == [f"initialised {data_dir}: method passphrase, KEK v1 active"]
    assert {path.name for path in data_dir.iterdir()} == STORE_FILES
    status = cli.status(data_dir)
    assert (status["initialised"], status["method"]) == (True, "passphrase")
    (enrolment,) = enrolments
    assert enrolment.root.is_wiped
    assert cli("unseal", "--data-dir", data_dir, secrets=[PASSPHRASE]).code == 0


# --- one process on a data directory ---------------------------------------------------------


def test_a_directory_a_node_holds_is_refused_before_any_secret_is_asked_for(
    cli: Cli, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node may hold a directory it opened uninitialised (sealed): init must not write
    a store under it."""
    data_dir.mkdir()
    prompt_answers(monkeypatch)  # any prompt fails the test
    with claimed_elsewhere(data_dir) as holder:
        result = cli("init", "passphrase", "--data-dir", data_dir)
        assert result.code == 2
        assert error_class(result, "init") == "CliError"
        assert f"pid {holder.pid}" in result.err
        assert sorted(path.name for path in data_dir.iterdir()) == [CLAIM_FILE]


@pytest.mark.parametrize("existing", [False, True], ids=["new-dir", "existing-dir"])
def test_a_node_that_took_the_directory_meanwhile_keeps_it(
    cli: Cli,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    enrolments: list[Enrolment],
    existing: bool,
) -> None:
    """The holder appeared after the first check (while the secrets were entered): the
    claim refuses init, which writes and removes nothing of the holder's."""
    data_dir = tmp_path / "parent" / "node"
    data_dir.mkdir(parents=True)
    theirs = data_dir / "data.mdb"
    with claimed_elsewhere(data_dir), monkeypatch.context() as patch:
        theirs.write_bytes(b"the holder's store, mid-creation")
        if not existing:
            # As the directory looked before the holder made it (and its files).
            patch.setattr(Path, "exists", _absent_under(data_dir.parent, Path.exists))
        patch.setattr("enclave_keys.cli._refuse_if_running", lambda data_dir: None)
        patch.setattr("enclave_keys.cli._is_initialised", lambda data_dir: False)
        result = cli("init", "passphrase", "--data-dir", data_dir, secrets=[PASSPHRASE])
        patch.undo()
        assert result.code == 2
        assert error_class(result, "init") == "CliError"
        assert "is in use by" in result.err
        assert theirs.read_bytes() == b"the holder's store, mid-creation"
        assert sorted(path.name for path in data_dir.iterdir()) == ["data.mdb", CLAIM_FILE]
    (enrolment,) = enrolments
    assert enrolment.root.is_wiped


def _absent_under(root: Path, exists: Callable[[Path], bool]) -> Callable[[Path], bool]:
    def seen_as_absent(path: Path) -> bool:
        return False if path == root or root in path.parents else exists(path)

    return seen_as_absent


def test_init_holds_the_directory_while_it_writes(
    cli: Cli, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No node can open the directory while init writes the master key records, and
    init leaves no claim behind."""
    original = MasterKeys.initialise
    seen: list[tuple[ClaimHolder | None, str]] = []

    def initialise(*args: Any, **kwargs: Any) -> MasterKeys:
        seen.append((claim_holder(data_dir), _second_claimant(data_dir)))
        return original(*args, **kwargs)

    monkeypatch.setattr(MasterKeys, "initialise", initialise)
    result = cli("init", "passphrase", "--data-dir", data_dir, secrets=[PASSPHRASE])
    assert result.code == 0, result.err
    ((holder, second),) = seen
    assert holder == ClaimHolder(os.getpid(), "init")
    assert second == "DirectoryInUse"
    assert claim_holder(data_dir) is None
    assert {path.name for path in data_dir.iterdir()} == STORE_FILES
    assert cli("unseal", "--data-dir", data_dir, secrets=[PASSPHRASE]).code == 0


def _second_claimant(data_dir: Path) -> str:
    """What a node in another process gets when it opens ``data_dir`` now."""
    probe = (
        "import sys\n"
        "from pathlib import Path\n"
        "from enclave_keys.store.claim import DirectoryClaim\n"
        "try:\n"
        "    DirectoryClaim(Path(sys.argv[1]))\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__)\n"
        "else:\n"
        "    print('claimed')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.strip()


def test_a_failed_init_leaves_alone_a_store_made_once_it_let_go(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed init removes its store files while it still holds the claim: a second
    init (a real process) that takes the directory the moment it is released keeps the
    store it makes."""
    data_dir = tmp_path / "node"

    def failing_initialise(*args: object, **kwargs: object) -> MasterKeys:
        raise StoreError("disk full, nothing was written")

    second: list[subprocess.CompletedProcess[str]] = []
    remove_dirs = _NewStoreFiles.remove_dirs

    def init_elsewhere_then_remove_dirs(self: _NewStoreFiles) -> None:
        second.append(
            subprocess.run(
                [sys.executable, "-m", "enclave_keys.cli", "init", "env", "--data-dir", data_dir],
                capture_output=True,
                text=True,
                timeout=120,
                env={**os.environ, DEFAULT_ENV_VARIABLE: "11" * 32},
            )
        )
        remove_dirs(self)

    monkeypatch.setattr(MasterKeys, "initialise", failing_initialise)
    monkeypatch.setattr(_NewStoreFiles, "remove_dirs", init_elsewhere_then_remove_dirs)
    result = cli("init", "passphrase", "--data-dir", data_dir, secrets=[PASSPHRASE])
    assert error_class(result, "init") == "StoreError"
    (other,) = second
    assert other.returncode == 0, other.stderr
    monkeypatch.undo()
    assert cli.status(data_dir)["method"] == "env", "the second init's store is intact"
