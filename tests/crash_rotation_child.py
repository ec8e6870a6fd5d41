"""Child process of the SIGKILL rotation test in ``tests/test_master.py``.

``python -m tests.crash_rotation_child DATA_DIR ROOT_FILE ROUNDS [DIE_AFTER [DIE_AT]]``

Opens (or initialises, method ``raw``) the master keys of the LMDB store in ``DATA_DIR``
with the 32-byte root key read from ``ROOT_FILE`` (never from argv), and the store's
storage epoch keeper (which finishes or rolls back whatever a kill interrupted). If the
store holds no round key yet, creates ``ROUNDS`` round keys through the round-cipher core
and stores, per round, a probe envelope sealed with its round key (meta
``probe.<round id>``). Then it rotates the KEK as the node does — an epoch change through
the keeper — in a loop, printing one line before and one after each rotation, until the
parent kills it:

    ready <active version>
    begin <version being made>
    rotated <new version>        (printed only after the rotation committed)

With ``DIE_AFTER`` = k it SIGKILLs itself during its k-th rotation, at ``DIE_AT``: the
instants a parent cannot aim at from outside.

* ``slot_written`` — the new epoch key is durable in the other slot, nothing committed;
* ``committed`` — the keyring and the rewrapped round keys committed, the old slot not
  yet wiped;
* ``returned`` (the default) — the rotation finished, before the child says so.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

import structlog

from enclave_keys.clock import ManualClock
from enclave_keys.context import ContextRegistry
from enclave_keys.crypto import SecretBytes
from enclave_keys.epochs import EpochKeeper
from enclave_keys.events import RoundKeyReady, RoundOpened
from enclave_keys.ids import RoundId
from enclave_keys.master import MasterKeys
from enclave_keys.round_cipher import ROUND_CIPHER, RoundCipherCore
from enclave_keys.store import LmdbStore
from enclave_keys.store.api import PreparedBatch
from tests.actors.helpers import T0, stored

METHOD = "raw"
PROBE_PURPOSE = "probe"
MAX_ROTATIONS = 100_000  # the parent kills long before; this only bounds an orphan child
DIE_AT = ("slot_written", "committed", "returned")


def round_ids(count: int) -> list[RoundId]:
    return [RoundId(f"crash:{index:03d}") for index in range(count)]


def probe_record(round_id: RoundId) -> str:
    return f"probe.{round_id.value}"


def read_root(path: Path) -> SecretBytes:
    """The root key from a file, read into a buffer that is wiped once copied."""
    buffer = bytearray(32)
    with path.open("rb", buffering=0) as source:
        if source.readinto(buffer) != 32 or source.read(1):
            raise SystemExit("the root key file must hold exactly 32 bytes")
    return SecretBytes.from_buffer(buffer)


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class DyingStore(LmdbStore):
    """An LMDB store that SIGKILLs its process right after a commit, once armed."""

    armed = False

    def _commit(self, batch: PreparedBatch) -> None:
        super()._commit(batch)
        if self.armed:
            die()


def create_rounds(store: LmdbStore, keeper: EpochKeeper, count: int) -> None:
    registry = ContextRegistry()
    core = RoundCipherCore(store, keeper, registry)
    for round_id in round_ids(count):
        registry.open(round_id)
        (ready,) = core.handle(stored(RoundOpened(round_id=round_id, deadline=T0 + 3600)))
        assert isinstance(ready, RoundKeyReady)
        context = registry.get(round_id)
        assert context is not None
        with context.require(ROUND_CIPHER).lease() as cipher:
            envelope = cipher.seal(PROBE_PURPOSE, round_id.to_bytes())
        store.put_meta(probe_record(round_id), envelope)
    core.wipe_all()


def say(*words: object) -> None:
    print(*words, flush=True)


def main(argv: list[str]) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    data_dir, root_file, rounds = Path(argv[0]), Path(argv[1]), int(argv[2])
    die_after = int(argv[3]) if len(argv) > 3 else None
    die_at = argv[4] if len(argv) > 4 else "returned"
    if die_at not in DIE_AT:
        raise SystemExit(f"DIE_AT must be one of {', '.join(DIE_AT)}")
    store = DyingStore.open(data_dir)
    assert isinstance(store, DyingStore)
    root = read_root(root_file)
    if MasterKeys.is_initialised(store):
        master = MasterKeys.open(store, root, METHOD)
    else:
        master = MasterKeys.initialise(store, root, METHOD)
    dying = [False]  # set during the rotation this child dies in

    def phase(name: str) -> None:
        if dying[0] and name == die_at:
            die()

    keeper, _ = EpochKeeper.open(store, master, clock=ManualClock(T0), phase_hook=phase)
    if store.key_count() == 0:
        create_rounds(store, keeper, rounds)
    say("ready", master.active_version.number)
    for count in range(1, MAX_ROTATIONS + 1):
        say("begin", master.active_version.number + 1)
        dying[0] = count == die_after
        store.armed = dying[0] and die_at == "committed"
        rotation = keeper.rotate_kek(master)
        if dying[0]:
            die()  # "returned" (the other instants never get here)
        say("rotated", rotation.new_version.number)
    keeper.close()
    master.seal()
    store.close()


if __name__ == "__main__":
    main(sys.argv[1:])
