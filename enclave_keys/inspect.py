"""A read-only view of a node's data directory: rounds, key ids, KEK versions, epochs.

Nothing is unsealed and nothing is written. Round state comes from the event log
(:mod:`enclave_keys.replay`); key ids and storage epochs from the headers of the stored
wrapped keys (which name them in the clear); KEK versions from the log's audit events.
Key bytes are never read out: a wrapped key is only ever asked for its header.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from enclave_keys.crypto import read_wrapped_header
from enclave_keys.epochs import slot_status
from enclave_keys.errors import EnclaveKeysError
from enclave_keys.master import MasterKeys
from enclave_keys.replay import LogState, replay
from enclave_keys.store import Store

__all__ = ["blob_header", "inspect_store"]

_LMDB_FILES = frozenset({"data.mdb", "lock.mdb"})


def blob_header(blob: bytes) -> dict[str, Any]:
    """What a wrapped key's header names: ``key_id`` (hex) and its ``epoch`` or
    ``kek_version`` number; ``{"unreadable": True}`` when the header does not parse."""
    try:
        wrapping, key_id = read_wrapped_header(blob)
    except (EnclaveKeysError, ValueError, IndexError):
        return {"unreadable": True}
    kind = "epoch" if type(wrapping).__name__.startswith("Epoch") else "kek_version"
    number = getattr(wrapping, "number", None)
    return {"key_id": key_id.hex(), kind: number}


def inspect_store(store: Store, data_dir: Path | None = None) -> dict[str, Any]:
    """The view as plain data (what ``enclave-keys inspect --json`` prints)."""
    state: LogState = replay(store.read_events())
    keys = store.list_keys()
    epochs: Counter[str] = Counter()
    stored: dict[str, dict[str, Any]] = {}
    for rid, blob in keys:
        header = blob_header(blob)
        stored[rid.value] = header
        if "epoch" in header:
            epochs[str(header["epoch"])] += 1
    rounds = []
    for rid in state.live_rounds():
        entry = state.rounds[rid].to_dict()
        entry["stored"] = stored.get(rid.value)
        rounds.append(entry)
    orphans = sorted(r for r in stored if r not in {x.value for x in state.live_rounds()})
    latest = store.latest_snapshot()
    files: dict[str, int] = {}
    if data_dir is not None and data_dir.is_dir():
        files = {
            p.name: p.stat().st_size
            for p in sorted(data_dir.iterdir())
            if p.is_file() and p.name not in _LMDB_FILES
        }
    summary = state.summary()
    slots = []
    try:
        for slot in slot_status(store):
            slots.append(
                {
                    "index": slot.index,
                    "state": slot.state,
                    "sequence": slot.sequence,
                    "epoch": None if slot.epoch is None else slot.epoch.number,
                    "kek_version": None if slot.kek_version is None else slot.kek_version.number,
                }
            )
    except (EnclaveKeysError, OSError, AttributeError):
        slots = []  # a store without epoch slots (an older format, or a memory store)
    return {
        "data_dir": None if data_dir is None else str(data_dir),
        "method": MasterKeys.method_of(store),
        "events": summary["events"],
        "snapshots": store.snapshot_sequences(),
        "snapshot_sequence": None if latest is None else latest[0],
        "kek": {
            "active": state.active_kek,
            "versions_seen": state.kek_versions,
            "rotations": state.rotations,
        },
        "epochs": {"round_keys_by_epoch": dict(sorted(epochs.items())), "slots": slots},
        "rounds": {
            "known": len(state.rounds),
            "live": len(rounds),
            "outcomes": summary["outcomes"],
            "purges": state.purges,
        },
        "live_rounds": rounds,
        "stored_keys": len(keys),
        "stored_keys_without_live_round": orphans,
        "other_files": files,
    }


def format_inspection(view: dict[str, Any], *, limit: int = 50) -> list[str]:
    """Human-readable lines of :func:`inspect_store`'s result."""
    lines = [
        f"data directory     {view['data_dir']}",
        f"unseal method      {view['method']}",
        f"events             {view['events']}  (snapshots at {view['snapshots']})",
        f"KEK                active v{view['kek']['active']}, seen "
        + ", ".join(f"v{n}" for n in view["kek"]["versions_seen"])
        + f"; {view['kek']['rotations']} rotation(s)",
        f"epochs             round keys by epoch {view['epochs']['round_keys_by_epoch']}",
        f"rounds             {view['rounds']['known']} known, {view['rounds']['live']} live, "
        f"{view['rounds']['purges']} keys purged",
        f"outcomes           {view['rounds']['outcomes']}",
        f"stored keys        {view['stored_keys']} "
        f"({len(view['stored_keys_without_live_round'])} without a live round)",
    ]
    for slot in view["epochs"]["slots"]:
        detail = (
            f"epoch e{slot['epoch']} under KEK v{slot['kek_version']} (sequence {slot['sequence']})"
            if slot["state"] == "epoch"
            else slot["state"]
        )
        lines.append(f"  epoch slot {slot['index']}    {detail}")
    if view["other_files"]:
        lines.append(f"other files        {view['other_files']}")
    live = view["live_rounds"]
    if live:
        lines.append("")
        lines.append(f"{'round':<20} {'stage':<20} {'key id':<34} {'kek':<5} {'epoch':<6}")
        for entry in live[:limit]:
            stored = entry["stored"] or {}
            lines.append(
                f"{entry['round_id']:<20} {entry['stage']:<20} {entry['key_id'] or '-':<34} "
                f"{entry['kek_version'] or '-'!s:<5} {stored.get('epoch', '-')!s:<6}"
            )
        if len(live) > limit:
            lines.append(f"... and {len(live) - limit} more (--json lists all)")
    return lines
