"""The log commands of ``enclave-keys``: ``replay``, ``inspect``, ``export-log``.

None of them unseals anything or needs a secret; none writes to a data directory.

* ``replay PATH`` — rebuild round state from an event log (a node's data directory, or a
  file written by ``export-log``) and check the invariants (:mod:`enclave_keys.invariants`):
  the log checks always, the store checks too when PATH is a directory. Exit 1 on a
  violation.
* ``inspect DIR`` — rounds, key ids, KEK versions and storage epochs (never key bytes).
* ``export-log DIR -o FILE`` — the log in the exported format (:mod:`enclave_keys.logfile`).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from enclave_keys.inspect import format_inspection, inspect_store
from enclave_keys.invariants import (
    LOG_CHECKS,
    STORE_CHECKS,
    check_events,
    check_log,
    check_store,
    summarise,
)
from enclave_keys.logfile import log_digest, read_log_file, write_log_file
from enclave_keys.replay import replay
from enclave_keys.store import LmdbStore

Printer = Callable[[str], None]


def cmd_replay(args: argparse.Namespace, out: Printer) -> int:
    path: Path = args.path
    if path.is_dir():
        with LmdbStore.open(path, create=False) as store:
            events = list(store.read_events())
            state = replay(events)
            found = check_store(state, store)
        checks: tuple[str, ...] = (*LOG_CHECKS, *STORE_CHECKS)
    else:
        events = list(read_log_file(path))
        state = replay(events)
        found = []
        checks = LOG_CHECKS
    now = args.now
    if now is None and args.reaper_grace is not None:
        now = state.last_time
    found = check_log(state, now=now, grace=args.reaper_grace) + check_events(events) + found
    summary: dict[str, Any] = {
        "source": str(path),
        "log_hash": log_digest(events),
        **state.summary(),
        "invariants": summarise(found, checks),
        "violations": [v.to_dict() for v in found],
    }
    if args.rounds:
        summary["round_states"] = [state.rounds[r].to_dict() for r in sorted(state.rounds)]
    if args.json:
        out(json.dumps(summary, sort_keys=True))
    else:
        for name in ("source", "log_hash", "events", "rounds", "live_rounds", "outcomes"):
            out(f"{name:<18} {summary[name]}")
        out(f"{'purges':<18} {summary['purges']} (live keys {summary['live_keys']})")
        lifetime = summary["max_key_lifetime"]
        out(f"{'max key lifetime':<18} {'-' if lifetime is None else f'{lifetime:.1f} s'}")
        out(f"{'KEK':<18} active v{state.active_kek}, {state.rotations} rotation(s)")
        for check, count in summary["invariants"].items():
            out(f"  {check:<26} {'holds' if count == 0 else f'VIOLATED x{count}'}")
        for violation in found:
            out(f"VIOLATION: {violation}")
        out("invariants: " + ("all hold" if not found else f"{len(found)} violated"))
    return 0 if not found else 1


def cmd_inspect(args: argparse.Namespace, out: Printer) -> int:
    with LmdbStore.open(args.path, create=False) as store:
        view = inspect_store(store, args.path)
    if args.json:
        out(json.dumps(view, sort_keys=True))
    else:
        for line in format_inspection(view, limit=args.limit):
            out(line)
    return 0


def cmd_export(args: argparse.Namespace, out: Printer) -> int:
    with LmdbStore.open(args.path, create=False) as store:
        events = list(store.read_events())
    count = write_log_file(events, args.output)
    out(f"exported {count} events from {args.path} to {args.output} ({log_digest(events)})")
    return 0


def add_commands(sub: Any) -> None:
    """Register the three commands on the ``enclave-keys`` subparsers."""
    replay_p = sub.add_parser(
        "replay",
        help="rebuild state from an event log and check the invariants",
        description="Rebuild round state from a node's log (a data directory or an "
        "exported log file) and check the invariants; exit 1 on a violation.",
    )
    replay_p.add_argument("path", type=Path, metavar="DIR|LOGFILE")
    replay_p.add_argument("--json", action="store_true")
    replay_p.add_argument("--rounds", action="store_true", help="list every round's state")
    replay_p.add_argument(
        "--reaper-grace",
        type=float,
        default=None,
        help="also check no round is live past deadline + grace at --now",
    )
    replay_p.add_argument("--now", type=float, default=None, help="default: the last event's time")
    replay_p.set_defaults(handler=cmd_replay)

    inspect_p = sub.add_parser(
        "inspect",
        help="rounds, key ids, KEK versions and epochs (never key bytes)",
        description="A read-only view of a data directory; nothing is unsealed.",
    )
    inspect_p.add_argument("path", type=Path, metavar="DIR")
    inspect_p.add_argument("--json", action="store_true")
    inspect_p.add_argument("--limit", type=int, default=50, help="live rounds listed")
    inspect_p.set_defaults(handler=cmd_inspect)

    export_p = sub.add_parser(
        "export-log",
        help="write a data directory's event log to a file",
        description="Write the event log in the exported format (docs/simulations.md).",
    )
    export_p.add_argument("path", type=Path, metavar="DIR")
    export_p.add_argument("-o", "--output", type=Path, required=True, metavar="FILE")
    export_p.set_defaults(handler=cmd_export)
