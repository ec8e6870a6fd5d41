"""The operator CLI in this process: init, status, unseal, rotate-kek, rekey, seal.

Every command goes through ``enclave_keys.cli.main`` with secrets fed through a real pipe
(``--secret-fd``) or a patched ``getpass`` prompt; what it prints is captured. The
``run`` command and its signals are in ``test_cli_run.py`` (a real child process).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from enclave_keys.cli import PKCS11_MODULE_ENV, main
from enclave_keys.errors import UnsealMismatch
from enclave_keys.ids import RoundId
from enclave_keys.node import Node, NodeConfig
from enclave_keys.store import LmdbStore
from enclave_keys.store.slots import SLOT_FILE_NAME
from enclave_keys.unseal import EnvKeyUnseal, PassphraseUnseal, UnsealSource
from enclave_keys.unseal.env import DEFAULT_ENV_VARIABLE
from tests.cli.conftest import (
    NEW_PASSPHRASE,
    PASSPHRASE,
    PIN,
    TOKEN,
    Cli,
    Result,
    SoftHsm,
    make_rounds,
    read_store,
    shares_of,
)
from tests.node.conftest import keyshare_ciphertexts, log_of, open_keyshare
from tests.unseal.helpers import windows

ENV_KEY = bytes(range(32)).hex()


def data_hash(data_dir: Path) -> str:
    """The digest of the LMDB data file: equal digests mean nothing was written."""
    return hashlib.sha256((data_dir / "data.mdb").read_bytes()).hexdigest()


def assert_no_share_words(text: str, shares: list[str]) -> None:
    for share in shares:
        for run in windows(share.split()):
            assert run not in text, "share words were printed"


def unseal_line(method: str, kek: int, live: int) -> str:
    return (
        f"unsealed: method {method}, KEK v{kek}; {live} live round keys, 0 purged,"
        " 0 failed by recovery"
    )


def current_epoch(status: dict[str, object], count: int, kek: int) -> int:
    """The one storage epoch of a stopped node's directory: every one of the ``count``
    stored round keys is under it, and the slot file holds it (alone) under KEK ``kek``."""
    by_epoch = status["round_keys_by_epoch"]
    assert isinstance(by_epoch, dict)
    assert list(by_epoch.values()) == [count], by_epoch
    (name,) = by_epoch
    slots = status["epoch_slots"]
    assert isinstance(slots, list)
    assert len(slots) == 1, slots
    match = re.fullmatch(rf"slot [01]: {name} \(sequence \d+, KEK v{kek}\)", slots[0])
    assert match is not None, slots
    return int(name.removeprefix("e"))


def check_keyshares_open(data_dir: Path, source: UnsealSource, rounds: list[RoundId]) -> None:
    """A node opened with ``source`` loads every round's key back, and each opens the
    keyshare sealed under it when the round was made: the very same round keys."""
    node = Node.open(data_dir, source, config=NodeConfig(runtime="deterministic"))
    try:
        assert node.recovery.failed == ()
        keyshares = keyshare_ciphertexts(log_of(node.store))
        for r in rounds:
            assert len(open_keyshare(node, r, keyshares[r])) == 32
    finally:
        node.stop()


def error_class(result: Result, command: str) -> str:
    """The error class named by the CLI's one-line error on stderr."""
    match = re.search(rf"^enclave-keys {command}: (\w+): ", result.err, re.MULTILINE)
    assert match is not None, f"no error line for {command!r} on stderr: {result.err!r}"
    return match.group(1)


# --- passphrase ---------------------------------------------------------------------------


def test_init_passphrase_then_status(cli: Cli, data_dir: Path) -> None:
    result = cli("init", "passphrase", "--data-dir", data_dir, secrets=[PASSPHRASE])
    assert result.code == 0, result.err
    assert result.lines == [f"initialised {data_dir}: method passphrase, KEK v1 active"]
    assert cli.status(data_dir) == {
        "data_dir": str(data_dir),
        "initialised": True,
        "method": "passphrase",
        "damaged": None,
        "events": 0,
        "live_round_keys": 0,
        "round_keys_by_epoch": {},
        "epoch_slots": [],  # no node has started here yet: no storage epoch
        "snapshot_sequence": None,
        "running_pid": None,
    }
    text = cli("status", "--data-dir", data_dir)
    assert text.code == 0
    assert re.search(r"^method +passphrase$", text.out, re.MULTILINE)
    assert re.search(r"^initialised +True$", text.out, re.MULTILINE)


def test_status_of_a_directory_no_node_started_in_writes_no_slot_file(
    cli: Cli, passphrase_dir: Path
) -> None:
    """A read-only look creates no slot file (run as another user, it would leave one the
    node cannot open)."""
    assert not (passphrase_dir / SLOT_FILE_NAME).exists()
    assert cli.status(passphrase_dir)["epoch_slots"] == []
    assert not (passphrase_dir / SLOT_FILE_NAME).exists(), "status must write nothing"


def test_status_of_a_missing_directory_is_an_error(cli: Cli, tmp_path: Path) -> None:
    result = cli("status", "--data-dir", tmp_path / "nothing", "--json")
    assert result.code == 2
    assert error_class(result, "status") == "StoreUnavailable"
    assert not (tmp_path / "nothing").exists(), "status must not create a directory"


def test_unseal_with_the_right_passphrase(cli: Cli, passphrase_dir: Path) -> None:
    result = cli("unseal", "--data-dir", passphrase_dir, secrets=[PASSPHRASE])
    assert result.code == 0, result.err
    assert result.lines == [unseal_line("passphrase", 1, 0)]


def test_a_wrong_passphrase_exits_2_and_changes_nothing(cli: Cli, passphrase_dir: Path) -> None:
    before, view = data_hash(passphrase_dir), read_store(passphrase_dir)
    result = cli("unseal", "--data-dir", passphrase_dir, secrets=["not the passphrase"])
    assert result.code == 2
    assert error_class(result, "unseal") == "WrongPassphrase"
    assert "unsealed" not in result.out
    assert data_hash(passphrase_dir) == before
    assert read_store(passphrase_dir) == view
    assert cli("unseal", "--data-dir", passphrase_dir, secrets=[PASSPHRASE]).code == 0


def test_unseal_of_an_uninitialised_directory_is_an_error(cli: Cli, tmp_path: Path) -> None:
    missing = cli("unseal", "--data-dir", tmp_path / "missing", secrets=[PASSPHRASE])
    assert missing.code == 2
    assert error_class(missing, "unseal") == "StoreUnavailable"
    empty = tmp_path / "empty"
    LmdbStore.open(empty).close()  # a store, but no keyring in it
    result = cli("unseal", "--data-dir", empty, secrets=[PASSPHRASE])
    assert result.code == 2
    assert error_class(result, "unseal") == "UnsealMismatch"
    assert "not initialised" in result.err


@pytest.mark.parametrize("second", ["passphrase", "shares", "env"])
def test_init_twice_is_refused_and_the_first_keyring_survives(
    cli: Cli, passphrase_dir: Path, second: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DEFAULT_ENV_VARIABLE, ENV_KEY)
    before, view = data_hash(passphrase_dir), read_store(passphrase_dir)
    result = cli("init", second, "--data-dir", passphrase_dir, secrets=[NEW_PASSPHRASE])
    assert result.code == 2
    assert error_class(result, "init") == "CliError"
    assert "already initialised" in result.err
    assert result.out == "", "nothing (no shares!) is printed for a refused init"
    assert data_hash(passphrase_dir) == before
    assert read_store(passphrase_dir) == view
    assert cli("unseal", "--data-dir", passphrase_dir, secrets=[NEW_PASSPHRASE]).code == 2
    assert cli("unseal", "--data-dir", passphrase_dir, secrets=[PASSPHRASE]).code == 0


BAD_SCHEMES = {
    "9/3": "CeremonyError",
    "1/3": "CeremonyError",  # SLIP-39 forbids 1-of-N
    "0/2": "CeremonyError",
    "3/17": "CeremonyError",
    "3": "CliError",
    "a/b": "CliError",
    "2/3/4": "CliError",
}


@pytest.mark.parametrize(("scheme", "error"), BAD_SCHEMES.items(), ids=BAD_SCHEMES.keys())
def test_a_bad_share_scheme_initialises_nothing(
    cli: Cli, data_dir: Path, scheme: str, error: str
) -> None:
    result = cli("init", "shares", "--shares", scheme, "--data-dir", data_dir)
    assert result.code == 2
    assert error_class(result, "init") == error
    assert result.out == ""
    assert not data_dir.exists(), "a refused init creates nothing"


def test_init_passphrase_from_the_prompt_asks_twice(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompts: list[str] = []
    answers = iter([PASSPHRASE, PASSPHRASE + "x", PASSPHRASE, PASSPHRASE])

    def fake_getpass(prompt: str = "Password: ", stream: object = None) -> str:
        prompts.append(prompt)
        return next(answers)

    monkeypatch.setattr("getpass.getpass", fake_getpass)
    differ = cli("init", "passphrase", "--data-dir", tmp_path / "a")
    assert differ.code == 2
    assert "the passphrases differ" in differ.err
    assert not (tmp_path / "a").exists(), "a refused init creates nothing"
    same = cli("init", "passphrase", "--data-dir", tmp_path / "b")
    assert same.code == 0, same.err
    assert prompts == ["new passphrase: ", "repeat the passphrase: "] * 2
    assert cli("unseal", "--data-dir", tmp_path / "b", secrets=[PASSPHRASE]).code == 0


def test_no_secret_is_ever_printed(cli: Cli, data_dir: Path) -> None:
    wrong = "wrong horse battery staple"
    verbose = "-v"  # INFO logs too: they go to stderr, which is captured as well
    steps = [
        (["init", "passphrase"], [PASSPHRASE], 0),
        (["unseal"], [PASSPHRASE], 0),
        (["unseal"], [wrong], 2),
        (["rotate-kek"], [PASSPHRASE], 0),
        (["rekey", "--to", "passphrase"], [PASSPHRASE, NEW_PASSPHRASE], 0),
        (["unseal"], [PASSPHRASE], 2),
        (["unseal"], [NEW_PASSPHRASE], 0),
    ]
    for argv, secrets, code in steps:
        result = cli(verbose, *argv, "--data-dir", data_dir, secrets=secrets)
        assert result.code == code, (argv, result.err)
    cli.status(data_dir)
    assert any("passphrase" in r.err for r in cli.history), "expected INFO logs on stderr"
    for result in cli.history:
        for secret in (PASSPHRASE, NEW_PASSPHRASE.strip(), wrong):
            assert secret not in result.everything()
    stored = (data_dir / "data.mdb").read_bytes()
    for secret in (PASSPHRASE, NEW_PASSPHRASE, wrong):
        assert secret.encode() not in stored


EXPECTED_OPTIONS = {
    "init": {"--data-dir", "--shares", "--secret-fd", "--pkcs11-module", "--token-label"},
    "unseal": {"--data-dir", "--secret-fd", "--pkcs11-module", "--token-label"},
    "rotate-kek": {"--data-dir", "--secret-fd", "--pkcs11-module", "--token-label"},
    "rekey": {"--data-dir", "--to", "--shares", "--secret-fd", "--pkcs11-module", "--token-label"},
    "run": {"--data-dir", "--tick", "--secret-fd", "--pkcs11-module", "--token-label"},
    "seal": {"--data-dir"},
    "status": {"--data-dir", "--json"},
}


@pytest.mark.parametrize("command", sorted(EXPECTED_OPTIONS))
def test_no_option_takes_a_secret(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The options are exactly these; none takes a passphrase, PIN, share or key."""
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    options = set(re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", capsys.readouterr().out))
    assert options - {"--help"} == EXPECTED_OPTIONS[command]


@pytest.mark.parametrize(
    "extra",
    [
        ["--passphrase", PASSPHRASE],
        [f"--passphrase={PASSPHRASE}"],
        ["--pin", PASSPHRASE],
        ["--share", PASSPHRASE],
        ["--secret", PASSPHRASE],  # an abbreviation of --secret-fd: takes a number only
        [PASSPHRASE],
    ],
    ids=["passphrase", "passphrase=", "pin", "share", "secret", "positional"],
)
def test_argv_cannot_carry_a_secret(
    passphrase_dir: Path, extra: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    before = data_hash(passphrase_dir)
    with pytest.raises(SystemExit) as done:
        main(["unseal", "--data-dir", str(passphrase_dir), *extra])
    assert done.value.code == 2
    assert "unsealed" not in capsys.readouterr().out
    assert data_hash(passphrase_dir) == before


# --- Shamir shares ------------------------------------------------------------------------


@pytest.fixture
def shares_dir(cli: Cli, tmp_path: Path) -> tuple[Path, list[str]]:
    data_dir = tmp_path / "shares"
    result = cli("init", "shares", "--shares", "2/3", "--data-dir", data_dir)
    assert result.code == 0, result.err
    return data_dir, shares_of(result)


def test_init_shares_prints_three_shares_and_stores_none(
    cli: Cli, shares_dir: tuple[Path, list[str]]
) -> None:
    data_dir, shares = shares_dir
    result = cli.history[0]
    assert result.lines[0] == f"initialised {data_dir}: method shamir, KEK v1 active"
    assert "3 shares follow" in result.lines[1]
    assert len(shares) == 3
    assert len(set(shares)) == 3
    assert all(len(share.split()) == 33 for share in shares)
    status = cli.status(data_dir)
    assert (status["initialised"], status["method"]) == (True, "shamir")
    stored = (data_dir / "data.mdb").read_bytes().decode("latin-1")
    assert_no_share_words(stored, shares)


@pytest.mark.parametrize("pair", [(0, 1), (2, 0)])
def test_two_shares_through_one_fd_unseal(
    cli: Cli, shares_dir: tuple[Path, list[str]], pair: tuple[int, int]
) -> None:
    data_dir, shares = shares_dir
    given = [shares[i] for i in pair]
    result = cli("unseal", "--data-dir", data_dir, secrets=given)
    assert result.code == 0, result.err
    assert result.lines == [
        "share accepted: 1 of 2",
        "share accepted: 2 of 2",
        unseal_line("shamir", 1, 0),
    ]
    assert_no_share_words(result.everything(), shares)


def test_one_share_is_not_enough(cli: Cli, shares_dir: tuple[Path, list[str]]) -> None:
    data_dir, shares = shares_dir
    result = cli("unseal", "--data-dir", data_dir, secrets=shares[:1])
    assert result.code == 2
    assert error_class(result, "unseal") == "EOFError"
    assert "unsealed" not in result.out
    assert_no_share_words(result.everything(), shares)


def mistyped(share: str) -> str:
    """The share with two adjacent, different words swapped: the checksum fails."""
    words = share.split()
    i = next(i for i in range(4, len(words) - 1) if words[i] != words[i + 1])
    words[i], words[i + 1] = words[i + 1], words[i]
    return " ".join(words)


@pytest.mark.parametrize(
    ("kind", "error"),
    [
        ("mistyped", "InvalidShare"),
        ("another set", "MismatchedShare"),
        ("duplicate", "DuplicateShare"),
    ],
)
def test_a_rejected_share_through_an_fd_exits_2_naming_the_error_class(
    cli: Cli, shares_dir: tuple[Path, list[str]], tmp_path: Path, kind: str, error: str
) -> None:
    data_dir, shares = shares_dir
    other = shares_of(cli("init", "shares", "--shares", "2/3", "--data-dir", tmp_path / "o"))
    if kind == "mistyped":
        given = [mistyped(shares[0]), shares[0], shares[1]]
    elif kind == "another set":
        given = [other[0], shares[0], shares[1]]
    else:
        given = [shares[0], shares[0], shares[1]]
    result = cli("unseal", "--data-dir", data_dir, secrets=given)
    assert result.code == 2
    assert error_class(result, "unseal") == error
    assert any(line.startswith("share rejected: ") for line in result.lines)
    assert "unsealed" not in result.out, "the good shares after the bad one are not read"
    assert_no_share_words(result.everything(), [*shares, *other, *given])
    assert cli.status(data_dir)["initialised"] is True


def test_at_the_prompt_a_rejected_share_is_reported_and_the_ceremony_goes_on(
    cli: Cli, shares_dir: tuple[Path, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir, shares = shares_dir
    prompts: list[str] = []
    answers = iter([mistyped(shares[1]), shares[1], shares[1], shares[2]])

    def fake_getpass(prompt: str = "Password: ", stream: object = None) -> str:
        prompts.append(prompt)
        return next(answers)

    monkeypatch.setattr("getpass.getpass", fake_getpass)
    result = cli("unseal", "--data-dir", data_dir)
    assert result.code == 0, result.err
    assert prompts == ["share: "] * 4
    assert [line.split(":")[0] for line in result.lines] == [
        "share rejected",
        "share accepted",
        "share rejected",
        "share accepted",
        "unsealed",
    ]
    assert result.lines[1] == "share accepted: 1 of 2"
    assert "already submitted" in result.lines[2]
    assert result.lines[-1] == unseal_line("shamir", 1, 0)
    assert_no_share_words(result.everything(), shares)


# --- PKCS#11 (SoftHSM2) -------------------------------------------------------------------


def init_pkcs11(cli: Cli, hsm: SoftHsm, data_dir: Path) -> Result:
    return cli(
        "init",
        "pkcs11",
        "--data-dir",
        data_dir,
        "--pkcs11-module",
        hsm.module,
        "--token-label",
        TOKEN,
        secrets=[PIN],
    )


def test_pkcs11_init_then_auto_unseal_with_the_pin(
    cli: Cli, softhsm: SoftHsm, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = init_pkcs11(cli, softhsm, data_dir)
    assert result.code == 0, result.err
    assert result.lines == [f"initialised {data_dir}: method pkcs11, KEK v1 active"]
    assert cli.status(data_dir)["method"] == "pkcs11"
    monkeypatch.setenv(PKCS11_MODULE_ENV, softhsm.module)  # the module from the environment
    for _ in range(2):
        unsealed = cli("unseal", "--data-dir", data_dir, "--token-label", TOKEN, secrets=[PIN])
        assert unsealed.code == 0, unsealed.err
        assert unsealed.lines == [unseal_line("pkcs11", 1, 0)]
    assert all(PIN not in r.everything() for r in cli.history)


def test_pkcs11_wrong_pin_exits_2_with_hsm_error(
    cli: Cli, softhsm: SoftHsm, data_dir: Path
) -> None:
    assert init_pkcs11(cli, softhsm, data_dir).code == 0
    before = data_hash(data_dir)
    wrong_pin = "000000-wrong"
    result = cli(
        "unseal",
        "--data-dir",
        data_dir,
        "--pkcs11-module",
        softhsm.module,
        "--token-label",
        TOKEN,
        secrets=[wrong_pin],
    )
    assert result.code == 2
    assert error_class(result, "unseal") == "HsmError"
    assert "refused the PIN" in result.err
    assert wrong_pin not in result.everything()
    assert PIN not in result.everything()
    assert data_hash(data_dir) == before


@pytest.mark.parametrize("missing", ["--pkcs11-module", "--token-label"])
def test_pkcs11_needs_a_module_and_a_token_label(
    cli: Cli, data_dir: Path, missing: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(PKCS11_MODULE_ENV, raising=False)
    options = {"--pkcs11-module": "/nonexistent/libpkcs11.so", "--token-label": TOKEN}
    del options[missing]
    argv = [part for pair in options.items() for part in pair]
    result = cli("init", "pkcs11", "--data-dir", data_dir, *argv, secrets=[PIN])
    assert result.code == 2
    assert error_class(result, "init") == "CliError"
    assert missing in result.err
    assert not data_dir.exists(), "a refused init creates nothing"


# --- rotate-kek ---------------------------------------------------------------------------


def test_rotate_kek_rewraps_every_round_key(cli: Cli, passphrase_dir: Path) -> None:
    rounds = make_rounds(passphrase_dir, PassphraseUnseal(PASSPHRASE), 4)
    status = cli.status(passphrase_dir)
    assert status["live_round_keys"] == 4
    first = current_epoch(status, 4, kek=1)
    before = read_store(passphrase_dir)

    refused = cli("rotate-kek", "--data-dir", passphrase_dir, secrets=["wrong"])
    assert refused.code == 2
    assert error_class(refused, "rotate-kek") == "WrongPassphrase"
    assert read_store(passphrase_dir) == before

    result = cli("rotate-kek", "--data-dir", passphrase_dir, secrets=[PASSPHRASE])
    assert result.code == 0, result.err
    assert result.lines == ["KEK rotated: v1 -> v2, 4 round keys rewrapped"]
    status = cli.status(passphrase_dir)
    second = current_epoch(status, 4, kek=2)  # a new epoch key, kept under the new KEK
    assert second > first
    assert status["live_round_keys"] == 4
    assert status["events"] > before.last_sequence
    after = read_store(passphrase_dir)
    assert set(after.keys) == set(before.keys) == set(rounds)
    assert all(after.keys[r] != before.keys[r] for r in rounds), "every blob is rewrapped"
    assert after.key_ids == before.key_ids, "... and holds the same round key"
    assert after.slots != before.slots

    unsealed = cli("unseal", "--data-dir", passphrase_dir, secrets=[PASSPHRASE])
    assert unsealed.lines == [unseal_line("passphrase", 2, 4)]
    third = current_epoch(cli.status(passphrase_dir), 4, kek=2)  # a start ratchets too
    again = cli("rotate-kek", "--data-dir", passphrase_dir, secrets=[PASSPHRASE])
    assert again.lines == ["KEK rotated: v2 -> v3, 4 round keys rewrapped"]
    assert current_epoch(cli.status(passphrase_dir), 4, kek=3) > third
    assert read_store(passphrase_dir).key_ids == before.key_ids


# --- rekey --------------------------------------------------------------------------------


def test_rekey_to_a_new_passphrase(cli: Cli, passphrase_dir: Path) -> None:
    rounds = make_rounds(passphrase_dir, PassphraseUnseal(PASSPHRASE), 3)
    before = read_store(passphrase_dir)
    result = cli(
        "rekey",
        "--to",
        "passphrase",
        "--data-dir",
        passphrase_dir,
        secrets=[PASSPHRASE, NEW_PASSPHRASE],
    )
    assert result.code == 0, result.err
    assert result.lines == ["root key replaced: now method passphrase; round keys untouched"]
    after = read_store(passphrase_dir)
    # The same round keys (the node the command started ratcheted the storage epoch, so
    # the blob bytes differ; the rekey itself touches no blob: tests/node/test_master_keys)
    assert after.key_ids == before.key_ids, "the rekey must keep the round keys"
    assert after.meta["unseal.passphrase.kdf"] != before.meta["unseal.passphrase.kdf"]
    assert after.meta["master.keyring"] != before.meta["master.keyring"]

    old = cli("unseal", "--data-dir", passphrase_dir, secrets=[PASSPHRASE])
    assert old.code == 2
    assert error_class(old, "unseal") == "WrongPassphrase"
    new = cli("unseal", "--data-dir", passphrase_dir, secrets=[NEW_PASSPHRASE])
    assert new.code == 0, new.err
    assert new.lines == [unseal_line("passphrase", 1, 3)]
    assert read_store(passphrase_dir).key_ids == before.key_ids
    check_keyshares_open(passphrase_dir, PassphraseUnseal(NEW_PASSPHRASE), rounds)


def test_rekey_from_a_passphrase_to_shares(cli: Cli, passphrase_dir: Path) -> None:
    make_rounds(passphrase_dir, PassphraseUnseal(PASSPHRASE), 2)
    before = read_store(passphrase_dir)
    rekey: list[str | Path] = [
        "rekey",
        "--to",
        "shares",
        "--shares",
        "2/3",
        "--data-dir",
        passphrase_dir,
    ]
    result = cli(*rekey, secrets=[PASSPHRASE])
    assert result.code == 0, result.err
    assert result.lines[0] == "root key replaced: now method shamir; round keys untouched"
    shares = shares_of(result)
    assert len(shares) == 3
    after = read_store(passphrase_dir)
    assert after.key_ids == before.key_ids
    assert after.meta["master.method"] == b"shamir"
    assert after.meta["unseal.passphrase.kdf"] is None, "the old method's record is dropped"
    assert cli.status(passphrase_dir)["method"] == "shamir"

    unsealed = cli("unseal", "--data-dir", passphrase_dir, secrets=[shares[2], shares[1]])
    assert unsealed.code == 0, unsealed.err
    assert unsealed.lines[-1] == unseal_line("shamir", 1, 2)
    old = cli("unseal", "--data-dir", passphrase_dir, secrets=[PASSPHRASE])
    assert old.code == 2
    assert error_class(old, "unseal") == "InvalidShare"
    assert PASSPHRASE not in old.everything()


def test_rekey_from_a_passphrase_into_the_hsm(
    cli: Cli, softhsm: SoftHsm, passphrase_dir: Path
) -> None:
    make_rounds(passphrase_dir, PassphraseUnseal(PASSPHRASE), 2)
    before = read_store(passphrase_dir)
    hsm = ["--pkcs11-module", softhsm.module, "--token-label", TOKEN]
    result = cli(
        "rekey", "--to", "pkcs11", *hsm, "--data-dir", passphrase_dir, secrets=[PASSPHRASE, PIN]
    )
    assert result.code == 0, result.err
    assert result.lines == ["root key replaced: now method pkcs11; round keys untouched"]
    assert read_store(passphrase_dir).key_ids == before.key_ids
    unsealed = cli("unseal", *hsm, "--data-dir", passphrase_dir, secrets=[PIN])
    assert unsealed.lines == [unseal_line("pkcs11", 1, 2)]
    assert all(PIN not in r.everything() for r in cli.history)


def test_migration_off_the_environment_key(
    cli: Cli, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DEFAULT_ENV_VARIABLE, ENV_KEY)
    init = cli("init", "env", "--data-dir", data_dir)
    assert init.code == 0, init.err
    assert init.lines == [f"initialised {data_dir}: method env, KEK v1 active"]
    rounds = make_rounds(data_dir, EnvKeyUnseal(), 2)
    unsealed = cli("unseal", "--data-dir", data_dir)  # no secret: the environment has it
    assert unsealed.lines == [unseal_line("env", 1, 2)]
    before = read_store(data_dir)

    result = cli("rekey", "--to", "passphrase", "--data-dir", data_dir, secrets=[NEW_PASSPHRASE])
    assert result.code == 0, result.err
    assert result.lines == ["root key replaced: now method passphrase; round keys untouched"]
    status = cli.status(data_dir)
    assert status["method"] == "passphrase"
    after = read_store(data_dir)
    assert after.key_ids == before.key_ids
    assert after.meta["unseal.env.verifier"] is None

    # The key is still in the environment, and is refused.
    with pytest.raises(UnsealMismatch, match="migrated off the environment key"):
        Node.open(data_dir, EnvKeyUnseal())
    no_secret = cli("unseal", "--data-dir", data_dir, secrets=[])
    assert no_secret.code == 2, "the CLI must not fall back to the environment key"
    assert error_class(no_secret, "unseal") == "EOFError"
    new = cli("unseal", "--data-dir", data_dir, secrets=[NEW_PASSPHRASE])
    assert new.lines == [unseal_line("passphrase", 1, 2)]
    check_keyshares_open(data_dir, PassphraseUnseal(NEW_PASSPHRASE), rounds)
    assert all(ENV_KEY not in r.everything().lower() for r in cli.history)


def test_init_env_with_a_malformed_key_is_refused_without_echoing_it(
    cli: Cli, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = ENV_KEY[:-1]
    monkeypatch.setenv(DEFAULT_ENV_VARIABLE, bad)
    result = cli("init", "env", "--data-dir", data_dir)
    assert result.code == 2
    assert error_class(result, "init") == "InvalidKeyMaterial"
    assert bad not in result.everything()
    assert not data_dir.exists(), "a refused init creates nothing"


# --- seal ---------------------------------------------------------------------------------


def test_seal_without_a_running_node_is_an_error(cli: Cli, passphrase_dir: Path) -> None:
    result = cli("seal", "--data-dir", passphrase_dir)
    assert result.code == 2
    assert error_class(result, "seal") == "CliError"
    assert "no node is running" in result.err
