"""``enclave-keys run`` as a real child process: readiness, seal/unseal signals, shutdown.

The child is ``python -m enclave_keys.cli run --data-dir D --secret-fd 0 --tick 0.05``
with the passphrase (or the shares) on its standard input. Every wait for one of its
lines, and for its exit, is bounded (``WAIT``); no test sleeps.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from enclave_keys.cli import PID_FILE
from enclave_keys.unseal import PassphraseUnseal
from tests.claims import claimed_elsewhere
from tests.cli.conftest import (
    NEW_PASSPHRASE,
    PASSPHRASE,
    WAIT,
    Cli,
    NodeProcess,
    make_rounds,
    read_store,
    shares_of,
)
from tests.unseal.helpers import windows


def test_run_seal_unseal_and_terminate(
    cli: Cli, passphrase_dir: Path, spawn: type[NodeProcess]
) -> None:
    rounds = make_rounds(passphrase_dir, PassphraseUnseal(PASSPHRASE), 2)
    before = read_store(passphrase_dir)
    node = spawn(passphrase_dir, [PASSPHRASE])
    running = node.expect("node running")
    assert running == f"node running on {passphrase_dir} (pid {node.pid})"
    assert (passphrase_dir / PID_FILE).read_text() == f"{node.pid} run\n"
    status = cli.status(passphrase_dir)
    assert status["running_pid"] == node.pid
    assert status["live_round_keys"] == len(rounds)

    sealed = cli("seal", "--data-dir", passphrase_dir)
    assert sealed.code == 0, sealed.err
    assert sealed.lines == [f"asked node {node.pid} to seal"]
    assert node.expect("node sealed") == "node sealed: every key wiped from memory"
    assert cli.status(passphrase_dir)["running_pid"] == node.pid, "sealed, still running"

    node.signal(signal.SIGUSR2)
    assert node.expect("node unsealed") == "node unsealed"

    node.signal(signal.SIGTERM)
    code, out, err = node.wait()
    assert code == 0, err
    assert out[-1] == "node stopped; every key wiped"
    assert out == [running, "node sealed: every key wiped from memory", "node unsealed", out[-1]]
    assert not (passphrase_dir / PID_FILE).exists()
    assert cli.status(passphrase_dir)["running_pid"] is None
    after = read_store(passphrase_dir)
    assert after.key_ids == before.key_ids, "run, seal and unseal keep the round keys"
    # Nothing was purged and every stop and seal was clean: no start had to ratchet.
    assert after.epochs == before.epochs
    assert len(after.epochs) == 1
    assert not any("Traceback" in line for line in err)
    assert all(PASSPHRASE not in line for line in out + err)


def test_sigint_stops_the_node_like_sigterm(
    cli: Cli, passphrase_dir: Path, spawn: type[NodeProcess]
) -> None:
    node = spawn(passphrase_dir, [PASSPHRASE])
    node.expect("node running")
    node.signal(signal.SIGINT)
    code, out, err = node.wait()
    assert code == 0, err
    assert out[-1] == "node stopped; every key wiped"
    assert not (passphrase_dir / PID_FILE).exists()
    assert cli("seal", "--data-dir", passphrase_dir).code == 2, "nothing left to seal"


def test_run_with_a_wrong_passphrase_exits_2_and_writes_no_pid_file(
    passphrase_dir: Path, spawn: type[NodeProcess]
) -> None:
    before = read_store(passphrase_dir)
    node = spawn(passphrase_dir, [NEW_PASSPHRASE])
    code, out, err = node.wait()
    assert code == 2
    assert out == []
    assert any(line.startswith("enclave-keys run: WrongPassphrase: ") for line in err), err
    assert not (passphrase_dir / PID_FILE).exists()
    assert read_store(passphrase_dir) == before
    assert all(NEW_PASSPHRASE.strip() not in line for line in err)


def test_a_share_unsealed_node_cannot_unseal_itself(
    cli: Cli, tmp_path: Path, spawn: type[NodeProcess]
) -> None:
    data_dir = tmp_path / "shares"
    shares = shares_of(cli("init", "shares", "--shares", "2/3", "--data-dir", data_dir))
    node = spawn(data_dir, [shares[0], shares[2]])
    node.expect("share accepted: 2 of 2")
    node.expect("node running")
    node.signal(signal.SIGUSR1)
    node.expect("node sealed")
    node.signal(signal.SIGUSR2)
    refusal = node.expect("cannot unseal itself")
    assert refusal.startswith("a share-unsealed node cannot unseal itself")
    node.signal(signal.SIGTERM)
    code, out, err = node.wait()
    assert code == 0, err
    assert "node unsealed" not in out
    assert out[-1] == "node stopped; every key wiped"
    text = "\n".join(out + err)
    assert not any(run in text for share in shares for run in windows(share.split()))


# --- regressions: bugs these tests found in cli.py ---------------------------------------


def test_run_reports_readiness_through_a_pipe(
    passphrase_dir: Path, spawn: type[NodeProcess]
) -> None:
    node = spawn(passphrase_dir, [PASSPHRASE], unbuffered=False, verbose=True)
    node.expect_err("node_started")  # stderr is unbuffered: the node is up
    node.expect("node running", timeout=3.0)  # printed just after: milliseconds
    assert node.proc.poll() is None


def test_rotate_kek_refuses_while_a_node_runs(
    cli: Cli, passphrase_dir: Path, spawn: type[NodeProcess]
) -> None:
    node = spawn(passphrase_dir, [PASSPHRASE])
    node.expect("node running")
    before = read_store(passphrase_dir)
    result = cli("rotate-kek", "--data-dir", passphrase_dir, secrets=[PASSPHRASE])
    assert result.code == 2, f"rotate-kek ran beside node {node.pid}: {result.out!r}"
    assert "running" in result.err
    assert read_store(passphrase_dir) == before
    assert cli("seal", "--data-dir", passphrase_dir).code == 0
    node.expect("node sealed")


def test_a_stale_pid_file_naming_another_process_is_not_a_running_node(
    cli: Cli, passphrase_dir: Path
) -> None:
    bystander = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        (passphrase_dir / PID_FILE).write_text(f"{bystander.pid}\n")
        status = cli.status(passphrase_dir)
        seal = cli("seal", "--data-dir", passphrase_dir)
        alive = bystander.poll() is None
        assert (status["running_pid"], seal.code, alive) == (None, 2, True)
    finally:
        if bystander.stdin is not None:
            bystander.stdin.close()
        bystander.wait(timeout=WAIT)


def test_seal_signals_only_a_run_process_never_another_holder(
    cli: Cli, passphrase_dir: Path
) -> None:
    """A program embedding a node holds the directory too, but does not handle SIGUSR1:
    `seal` must not send it (the signal would kill it, with no seal and no clean stop)."""
    with claimed_elsewhere(passphrase_dir) as embedder:
        assert cli.status(passphrase_dir)["running_pid"] == embedder.pid
        seal = cli("seal", "--data-dir", passphrase_dir)
        assert seal.code == 2
        assert "not `enclave-keys run`" in seal.everything()
        assert embedder.poll() is None  # not signalled
