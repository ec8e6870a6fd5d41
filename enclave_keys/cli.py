"""``enclave-keys``: the operator's command line for a node's data directory.

Commands (``enclave-keys COMMAND --help`` for each):

* ``init`` — initialise a data directory: a root key from a passphrase, an M-of-N
  Shamir share set (printed once, never stored), a PKCS#11 token, or the legacy
  environment key; and a keyring with KEK v1 sealed under it;
* ``unseal`` — check that a secret (or a set of shares) unseals the directory: starts the
  node, runs recovery, reports, stops;
* ``run`` — run a node until SIGTERM/SIGINT (which wipe every key before exiting);
  SIGUSR1 seals it (wipes keys, keeps running), SIGUSR2 unseals it again;
* ``seal`` — ask the node running on a directory to seal (sends it SIGUSR1);
* ``rotate-kek`` — new active KEK; every stored round key rewrapped in one transaction;
* ``rekey`` — new root key (new passphrase, new shares, an HSM seal, or a migration off
  the environment key); round keys untouched;
* ``status`` — what is in a directory, without unsealing it (``--json`` for scripts);
* ``replay``, ``inspect``, ``export-log`` — rebuild state from an event log and check the
  invariants, view rounds, key ids, KEK versions and epochs, export the log
  (:mod:`enclave_keys.cli_logs`; no secret needed);
* ``simulate`` — the seeded multi-node simulation (the same as ``python -m simulations``).

Secrets (passphrases, PINs, shares) are read from a hidden prompt or from a file
descriptor (``--secret-fd N``, one per line), never from the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

from enclave_keys import __version__
from enclave_keys.cli_logs import add_commands as add_log_commands
from enclave_keys.crypto import read_wrapped_header
from enclave_keys.epochs import slot_status
from enclave_keys.errors import (
    AlreadyInitialised,
    DirectoryInUse,
    EnclaveKeysError,
    StoreUnavailable,
    UnsealMismatch,
    UnwrapFailed,
)
from enclave_keys.log import configure_logging
from enclave_keys.master import KEYRING_RECORD, MasterKeys
from enclave_keys.node import Node, NodeConfig
from enclave_keys.store import LmdbStore, Store
from enclave_keys.store.claim import CLAIM_FILE, DirectoryClaim, claim_holder
from enclave_keys.store.datafile import DATA_FILE
from enclave_keys.store.scrub import scrub
from enclave_keys.store.slots import SLOT_FILE_NAME
from enclave_keys.unseal import (
    Enrolment,
    EnvKeyUnseal,
    HsmUnseal,
    PassphraseUnseal,
    ShamirUnseal,
    UnsealSource,
    read_secret,
)

PID_FILE = CLAIM_FILE
RUN_ROLE = "run"
"""How ``run`` marks its claim: the only holder that handles SIGUSR1/SIGUSR2."""
_STORE_FILES = (DATA_FILE, "lock.mdb", SLOT_FILE_NAME)
"""The files a new store may have in its directory: LMDB's two and the epoch slot file."""
PKCS11_MODULE_ENV = "ENCLAVE_KEYS_PKCS11_MODULE"
MAX_TICK = 3600.0
"""The longest ``run --tick`` (seconds): a signal is acted on at the next tick."""

Printer = Callable[[str], None]


class CliError(Exception):
    """A usage problem the operator can fix; printed without a traceback, exit 2."""


# --- secrets and unseal sources --------------------------------------------------------


def _secret(args: argparse.Namespace, prompt: str) -> str:
    fd: int | None = args.secret_fd
    if fd is None:
        return read_secret(prompt)
    try:
        return read_secret(prompt, fd=fd)
    except (OSError, OverflowError) as exc:  # not an open, readable descriptor
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "no such descriptor"
        raise CliError(f"cannot read a secret from file descriptor {fd}: {why}") from None


def _new_passphrase(args: argparse.Namespace) -> str:
    first = _secret(args, "new passphrase: ")
    if args.secret_fd is None and read_secret("repeat the passphrase: ") != first:
        raise CliError("the passphrases differ")
    return first


def _pkcs11(args: argparse.Namespace) -> HsmUnseal:
    module = args.pkcs11_module or os.environ.get(PKCS11_MODULE_ENV)
    if not module:
        raise CliError(f"name the PKCS#11 module: --pkcs11-module or ${PKCS11_MODULE_ENV}")
    if not args.token_label:
        raise CliError("name the token: --token-label")
    return HsmUnseal(module, args.token_label, _secret(args, "token PIN: "))


def _source_for(method: str, args: argparse.Namespace) -> UnsealSource | None:
    """The unseal source for the method a directory was initialised with (None: shares)."""
    if method == "passphrase":
        return PassphraseUnseal(_secret(args, "passphrase: "))
    if method == "pkcs11":
        return _pkcs11(args)
    if method == "env":
        return EnvKeyUnseal()
    if method == "shamir":
        return None
    raise CliError(f"this directory uses the {method!r} method, which the CLI cannot unseal")


def _collect_shares(node: Node, args: argparse.Namespace, out: Printer) -> None:
    """Submit shares one at a time until the node unseals; a bad share is reported."""
    while node.sealed:
        mnemonic = _secret(args, "share: ")
        try:
            progress = node.submit_share(mnemonic)
        except EnclaveKeysError as exc:
            out(f"share rejected: {exc}")
            if args.secret_fd is not None:
                raise
            continue
        out(f"share accepted: {progress.submitted} of {progress.threshold}")


def _method_of(data_dir: Path) -> str:
    with LmdbStore.open(data_dir, create=False) as store:
        method = _initialised_method(store, data_dir)
    if method is None:
        raise UnsealMismatch(f"{data_dir} is not initialised (run `enclave-keys init`)")
    return method


def _initialised_method(store: Store, data_dir: Path) -> str | None:
    """The method ``store`` was initialised with, or None if it never was.

    :class:`UnsealMismatch` if it has only one of the method and keyring records (the
    other was lost or damaged): a node given such a store would enrol a new root over
    it and lose every round key, and ``init`` would overwrite it, so neither may run.
    """
    missing = MasterKeys.missing_record(store)
    if missing is not None:
        raise UnsealMismatch(
            f"{data_dir} is damaged: its {missing} record is missing; restore the"
            " directory from a backup (it is neither unsealed nor initialised again)"
        )
    return MasterKeys.method_of(store)


def _open_node(args: argparse.Namespace, out: Printer) -> Node:
    """Open and unseal the node on ``args.data_dir`` with whatever its method needs."""
    _refuse_if_running(args.data_dir)
    source = _source_for(_method_of(args.data_dir), args)
    node = Node.open(args.data_dir, source, config=NodeConfig(runtime="pykka"))
    try:
        if node.sealed:
            _collect_shares(node, args, out)
    except BaseException:
        node.stop()
        raise
    return node


# --- commands ---------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace, out: Printer) -> int:
    """Initialise ``args.data_dir``: nothing is written until the secrets are in and valid.

    A directory a node holds, or an initialised one, is refused first; then the
    enrolment (passphrase twice, share scheme, PKCS#11 token, environment key) is taken
    and checked; only then is the directory claimed (as ``init``: no node opens it
    meanwhile, and a node that took it since is not written under) and the store created.
    If that fails, the store files and directories this command created are removed
    again; the root key is wiped on every path.
    """
    _refuse_if_running(args.data_dir)  # before any secret is asked for
    if _is_initialised(args.data_dir):
        raise CliError(f"{args.data_dir} is already initialised")
    method = {"shares": "shamir"}.get(args.method, args.method)
    enrolment, shares = _enrol(args)
    with enrolment:  # wipes the root key on every path (MasterKeys also wipes its copy)
        created = _NewStoreFiles(args.data_dir)
        claim = _claim_new(args.data_dir, created)
        try:
            created.add_missing_files()  # under the claim: no node or tool makes them now
            with LmdbStore.open(args.data_dir) as store:
                master = MasterKeys.initialise(store, enrolment.root, method, enrolment.records)
                try:
                    version = master.active_version
                finally:
                    master.seal(force=True)
        except AlreadyInitialised:
            raise  # initialised meanwhile by another process: its files, not ours
        except BaseException:
            created.remove_files()  # still claimed: no other process has the files yet
            claim.release()  # its file goes with it, so an emptied directory can go too
            created.remove_dirs()
            raise
        finally:
            claim.release()
    out(f"initialised {args.data_dir}: method {method}, KEK v{version.number} active")
    _print_shares(shares, out)
    return 0


def _is_initialised(data_dir: Path) -> bool:
    """Whether ``data_dir`` holds an initialised store (:class:`UnsealMismatch` if only
    half of one: see :func:`_initialised_method`); creates nothing where none is."""
    if not (data_dir / DATA_FILE).exists():
        return False
    with LmdbStore.open(data_dir) as store:
        return _initialised_method(store, data_dir) is not None


def _enrol(args: argparse.Namespace) -> tuple[Enrolment, list[str]]:
    """The new root key (and shares, for ``shares``) from the operator's input."""
    if args.method == "passphrase":
        return PassphraseUnseal(_new_passphrase(args)).enrol(), []
    if args.method == "shares":
        return ShamirUnseal.enrol_shares(*_scheme(args.shares))
    if args.method == "pkcs11":
        return _pkcs11(args).enrol(), []
    return EnvKeyUnseal().enrol(), []


class _NewStoreFiles:
    """The directories and store files missing from ``data_dir`` when ``init`` makes them:
    what a failed ``init`` removes again (never a file or directory that was there)."""

    def __init__(self, data_dir: Path) -> None:
        self._data_dir = data_dir
        self._files: list[Path] = []
        self._dirs: list[Path] = []  # the deepest first
        for path in (data_dir, *data_dir.parents):
            if path.exists():
                break
            self._dirs.append(path)

    def add_missing_files(self) -> None:
        """Note the store files missing now (called under the directory's claim, so that
        none another process makes meanwhile is taken for ours)."""
        self._files = [
            self._data_dir / name for name in _STORE_FILES if not (self._data_dir / name).exists()
        ]

    def remove_files(self) -> None:
        """Best effort, never raising (the caller re-raises the error that made it clean
        up); called while ``init`` still holds the directory's claim."""
        for path in self._files:
            with contextlib.suppress(OSError):  # ``data_dir`` is a file, say
                path.unlink(missing_ok=True)

    def remove_dirs(self) -> None:
        """Best effort, never raising: a directory that is not empty (someone else's
        files) stays."""
        for path in self._dirs:
            try:
                path.rmdir()
            except OSError:
                return


def _claim_new(data_dir: Path, created: _NewStoreFiles) -> DirectoryClaim:
    """``data_dir``'s claim for ``init``, the directory made first if missing. If it
    cannot be had, the directories just made are removed again (only if still empty)."""
    try:
        try:
            data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailable(f"cannot create store directory {data_dir}: {exc}") from None
        return _claim(data_dir, "init")
    except BaseException:
        created.remove_dirs()  # no store file is noted as ours before the claim
        raise


def _scheme(text: str) -> tuple[int, int]:
    try:
        threshold, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise CliError("--shares takes M/N, for example 3/5") from None
    return threshold, count


def _print_shares(shares: Sequence[str], out: Printer) -> None:
    if not shares:
        return
    out(f"{len(shares)} shares follow; give one to each holder. They are not stored.")
    for n, share in enumerate(shares, 1):
        out(f"share {n}: {share}")


def cmd_unseal(args: argparse.Namespace, out: Printer) -> int:
    with _open_node(args, out) as node:
        report = node.recovery
        out(
            f"unsealed: method {node.master.method}, KEK v{node.master.active_version.number}; "
            f"{len(report.hydrated)} live round keys, {len(report.purged)} purged, "
            f"{len(report.failed)} failed by recovery"
        )
    return 0


def cmd_rotate(args: argparse.Namespace, out: Printer) -> int:
    with _open_node(args, out) as node:
        rotation = node.rotate_kek()
    out(
        f"KEK rotated: v{rotation.old_version.number} -> v{rotation.new_version.number}, "
        f"{rotation.rewrapped} round keys rewrapped"
    )
    return 0


def cmd_rekey(args: argparse.Namespace, out: Printer) -> int:
    """Replace the root key; round keys are untouched.

    Once the new root is committed the store opens with it alone, so the new shares are
    printed at once: a step that fails after the commit (stopping the node, say) cannot
    lose them. Such a failure still exits non-zero, and says the root was replaced.
    """
    method = {"shares": "shamir"}.get(args.to, args.to)
    replaced = False
    try:
        with _open_node(args, out) as node:
            enrolment, shares = _new_root(args)
            before = node.store.get_meta(KEYRING_RECORD)
            try:
                node.rekey_root(enrolment, method)
                replaced = True
            finally:
                replaced = replaced or _keyring_replaced(node.store, before)
                if replaced:
                    out(f"root key replaced: now method {method}; round keys untouched")
                    _print_shares(shares, out)
                else:
                    enrolment.wipe()  # failed before the commit: the new root is unused
    except BaseException:
        if replaced:
            out(f"the new root key (method {method}) is in effect, but a later step failed")
        raise
    return 0


def _new_root(args: argparse.Namespace) -> tuple[Enrolment, list[str]]:
    """The enrolment (and shares, for ``shares``) of ``rekey --to``."""
    if args.to == "passphrase":
        return PassphraseUnseal(_new_passphrase(args)).enrol(), []
    if args.to == "shares":
        return ShamirUnseal.enrol_shares(*_scheme(args.shares))
    return _pkcs11(args).enrol(), []


def _keyring_replaced(store: Store, before: bytes | None) -> bool:
    """Whether ``store``'s keyring is no longer ``before`` (re-sealed: a rekey committed).
    True if it cannot be read: shares that may be unused are printed, never lost."""
    try:
        return store.get_meta(KEYRING_RECORD) != before
    except EnclaveKeysError:
        return True


def cmd_status(args: argparse.Namespace, out: Printer) -> int:
    with LmdbStore.open(args.data_dir, create=False) as store:
        status = _status(store, args.data_dir)
    if args.json:
        out(json.dumps(status, sort_keys=True))
    else:
        for name, value in status.items():
            out(f"{name:<22} {value}")
    return 0


def _status(store: Store, data_dir: Path) -> dict[str, object]:
    by_epoch: dict[str, int] = {}
    for _, blob in store.list_keys():
        try:
            name = str(read_wrapped_header(blob)[0])
        except UnwrapFailed:
            name = "unreadable"
        by_epoch[name] = by_epoch.get(name, 0) + 1
    current = [slot for slot in slot_status(store) if slot.state == "epoch"]
    latest = store.latest_snapshot()
    return {
        "data_dir": str(data_dir),
        "initialised": MasterKeys.is_initialised(store),
        "method": MasterKeys.method_of(store),
        "damaged": _damage(store),
        "events": store.last_sequence(),
        "live_round_keys": store.key_count(),
        "round_keys_by_epoch": by_epoch,
        "epoch_slots": [
            f"slot {slot.index}: {slot.epoch} (sequence {slot.sequence}, KEK {slot.kek_version})"
            for slot in current
        ],
        "snapshot_sequence": None if latest is None else latest[0],
        "running_pid": _running_pid(data_dir),
    }


def _damage(store: Store) -> str | None:
    """What ``status`` says is wrong with the store's master records, if anything."""
    missing = MasterKeys.missing_record(store)
    return None if missing is None else f"{missing} record missing: restore from a backup"


def _running_pid(data_dir: Path) -> int | None:
    """The pid of the node (or tool) holding ``data_dir``, if it has written it."""
    holder = claim_holder(data_dir)
    return None if holder is None else holder.pid


def _refuse_if_running(data_dir: Path) -> None:
    holder = claim_holder(data_dir)
    if holder is not None:
        pid = "pid unknown" if holder.pid is None else f"pid {holder.pid}"
        raise CliError(f"a node is running on {data_dir} ({pid}); stop it first")


def _claim(data_dir: Path, role: str) -> DirectoryClaim:
    """Hold ``data_dir`` as a node would (so that none starts meanwhile)."""
    try:
        return DirectoryClaim(data_dir, role)
    except DirectoryInUse as exc:
        raise CliError(str(exc)) from None


def cmd_scrub(args: argparse.Namespace, out: Printer) -> int:
    """Compact the LMDB file and overwrite the old one in place (the node must be stopped)."""
    claim = _claim(args.data_dir, "scrub")  # no node may start while the file is replaced
    try:
        report = scrub(args.data_dir)
    finally:
        claim.release()
    out(f"scrubbed {args.data_dir}: {report.old_size} bytes overwritten, {report.new_size} kept")
    return 0


def cmd_seal(args: argparse.Namespace, out: Printer) -> int:
    holder = claim_holder(args.data_dir)
    if holder is None:
        raise CliError(f"no node is running on {args.data_dir}")
    if holder.role != RUN_ROLE or holder.pid is None:
        # Only `run` handles SIGUSR1: to any other holder (a program embedding a node,
        # another command) the signal would be fatal, with no seal and no clean stop.
        raise CliError(
            f"{args.data_dir} is held by a process that is not `enclave-keys run`"
            f" (pid {holder.pid}, {holder.role}); seal it from that process"
        )
    os.kill(holder.pid, signal.SIGUSR1)
    out(f"asked node {holder.pid} to seal")
    return 0


def cmd_run(args: argparse.Namespace, out: Printer) -> int:
    """Run a node until SIGTERM/SIGINT; SIGUSR1 seals, SIGUSR2 unseals again. The node
    holds the data directory (``node.pid``) from open to stop."""
    _refuse_if_running(args.data_dir)  # before asking for a passphrase
    source = _source_for(_method_of(args.data_dir), args)
    try:
        node = Node.open(args.data_dir, source, config=NodeConfig(runtime="pykka"))
    except DirectoryInUse as exc:
        raise CliError(str(exc)) from None
    if node.claim is not None:
        node.claim.describe(RUN_ROLE)  # `seal` signals only a holder marked so
    # The handler only appends to a list: it takes no lock, so it cannot deadlock with
    # the interrupted main thread. The main loop sleeps one tick at a time and acts.
    requests: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        requests.append(signum)

    try:
        if node.sealed:
            _collect_shares(node, args, out)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, on_signal)
        out(f"node running on {args.data_dir} (pid {os.getpid()})")
        while True:
            while requests:
                signum = requests.pop(0)
                if signum in (signal.SIGTERM, signal.SIGINT):
                    return 0
                _act(node, "seal" if signum == signal.SIGUSR1 else "unseal", source, out)
            if not node.sealed:
                node.tick()
            time.sleep(args.tick)
    finally:
        node.stop()
        out("node stopped; every key wiped")


def _act(node: Node, request: str, source: UnsealSource | None, out: Printer) -> None:
    if request == "seal" and not node.sealed:
        node.seal()
        out("node sealed: every key wiped from memory")
    elif request == "unseal" and node.sealed:
        if source is None:
            out("a share-unsealed node cannot unseal itself: restart it and submit shares")
            return
        node.start(source)
        out("node unsealed")


# --- the parser -------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="enclave-keys", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"enclave-keys {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, handler: Callable[..., int], help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--data-dir", type=Path, required=True, help="the node's LMDB directory")
        p.set_defaults(handler=handler)
        return p

    def secrets(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--secret-fd",
            type=int,
            metavar="N",
            help="read passphrases, PINs and shares from file descriptor N, one per line",
        )
        p.add_argument("--pkcs11-module", help=f"PKCS#11 library (or ${PKCS11_MODULE_ENV})")
        p.add_argument("--token-label", help="PKCS#11 token label")

    init = command("init", cmd_init, "initialise a data directory and its keyring")
    init.add_argument("method", choices=("passphrase", "shares", "pkcs11", "env"))
    init.add_argument("--shares", default="3/5", metavar="M/N", help="threshold/count")
    secrets(init)

    for name, handler, text in (
        ("unseal", cmd_unseal, "check that the directory unseals; report recovery"),
        ("rotate-kek", cmd_rotate, "rotate the KEK and rewrap every stored round key"),
    ):
        secrets(command(name, handler, text))

    rekey = command("rekey", cmd_rekey, "replace the root key; round keys untouched")
    rekey.add_argument("--to", required=True, choices=("passphrase", "shares", "pkcs11"))
    rekey.add_argument("--shares", default="3/5", metavar="M/N", help="threshold/count")
    secrets(rekey)

    run = command("run", cmd_run, "run a node until SIGTERM; SIGUSR1 seals, SIGUSR2 unseals")
    run.add_argument(
        "--tick",
        type=_tick,
        default=1.0,
        help=f"seconds between reaper ticks (0 < T <= {MAX_TICK:g})",
    )
    secrets(run)

    command("seal", cmd_seal, "ask the running node to seal (wipe every key)")
    command("scrub", cmd_scrub, "compact the store and overwrite the old file (node stopped)")
    status = command("status", cmd_status, "what is in a data directory (no unsealing)")
    status.add_argument("--json", action="store_true")
    add_log_commands(sub)
    sub.add_parser(
        "simulate",
        help="run the seeded simulation (python -m simulations; --help for its options)",
        add_help=False,
    )
    return parser


def _tick(text: str) -> float:
    """``--tick``: a number of seconds above 0 and at most :data:`MAX_TICK` (not NaN)."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds <= MAX_TICK:  # NaN compares false
        raise argparse.ArgumentTypeError(f"must be a number of seconds, 0 < T <= {MAX_TICK:g}")
    return seconds


def _print(line: str) -> None:
    """Status lines reach a supervisor reading a pipe at once, not when the node exits."""
    print(line, flush=True)


def _simulate(argv: Sequence[str]) -> int:
    """``enclave-keys simulate ARGS``: ``python -m simulations ARGS``."""
    from simulations.cli import main as simulate

    return simulate(argv, prog="enclave-keys simulate")


def main(argv: Sequence[str] | None = None, *, out: Printer = _print) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["simulate"]:
        return _simulate(argv[1:])
    args = _parser().parse_args(argv)
    configure_logging(level=logging.INFO if args.verbose else logging.WARNING)
    handler: Callable[[argparse.Namespace, Printer], int] = args.handler
    try:
        return handler(args, out)
    except (CliError, EnclaveKeysError, EOFError) as exc:
        print(f"enclave-keys {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
