"""A simulated node: a real :class:`~enclave_keys.node.Node` with two test hooks.

* **Entropy.** Round keys, key ids, nonces and keyshares come from an entropy source the
  simulation passes in, instead of the OS: seeded for the deterministic runtime (so the
  same seed gives the same log, byte for byte), the OS CSPRNG under Pykka. Either way the
  source *records* every secret-sized draw, so the checker can look for raw keys and
  keyshares in the log, the snapshots and the stored blobs. FOR SIMULATIONS ONLY.
* **Faults.** A function given the node's freshly built cores may break one on purpose
  (:mod:`simulations.faults`), to show that the invariant checker catches it.

Both are applied where the node builds its cores (``Node._build_cores``, the composition
root's one factory), without changing the node's code.
"""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from enclave_keys.clock import Clock
from enclave_keys.crypto import SecretBytes
from enclave_keys.errors import LifecycleError
from enclave_keys.node import Node, NodeConfig, _Cores
from enclave_keys.unseal import KeyUnseal

__all__ = ["CoreHook", "SecretLedger", "SimNode", "master_key", "open_node"]

CoreHook = Callable[[_Cores], None]

SECRET_SIZE = 32  # round keys and (reference) keyshares are 32 bytes


class SecretLedger:
    """Every 32-byte secret the simulated nodes drew (kept in memory, never printed)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._secrets: list[bytes] = []

    def add(self, data: bytes) -> None:
        with self._lock:
            self._secrets.append(data)

    def all(self) -> list[bytes]:
        with self._lock:
            return list(self._secrets)

    def __len__(self) -> int:
        with self._lock:
            return len(self._secrets)

    def __repr__(self) -> str:
        return f"SecretLedger({len(self)} secrets)"


class RecordingEntropy:
    """An entropy source (``Callable[[int], bytes]``) that records secret-sized draws."""

    def __init__(self, ledger: SecretLedger, seed: str | None) -> None:
        self._ledger = ledger
        self._rng = None if seed is None else random.Random(seed)
        self._lock = threading.Lock()

    def __call__(self, size: int) -> bytes:
        with self._lock:
            data = os.urandom(size) if self._rng is None else self._rng.randbytes(size)
        if size == SECRET_SIZE:
            self._ledger.add(data)
        return data

    def __repr__(self) -> str:
        return "RecordingEntropy(<hidden>)"


def master_key(seed: int, node: int) -> SecretBytes:
    """The simulated node's 32-byte master key, derived from the seed (never printed)."""
    return SecretBytes.random(32, random.Random(f"{seed}/master/{node}").randbytes)


class SimNode(Node):
    """A :class:`Node` whose cores draw from a recording entropy source and may be broken
    by a hook. Arm it with :meth:`arm` before :meth:`start`."""

    _sim_entropy: RecordingEntropy | None = None
    _sim_hook: CoreHook | None = None
    _sim_seed: str | None = None
    _sim_ledger: SecretLedger | None = None

    def arm(self, ledger: SecretLedger, seed: str | None, hook: CoreHook | None) -> None:
        self._sim_ledger = ledger
        self._sim_seed = seed
        self._sim_hook = hook

    def _build_cores(self, *args: Any, **kwargs: Any) -> _Cores:
        # Whatever the node builds its cores from (the keyring, the epoch keeper), as is.
        cores = super()._build_cores(*args, **kwargs)
        if self._sim_ledger is not None:
            # A fresh stream per start, keyed by the log position (as the runtime's seed is):
            # a restarted node draws new keys; the same history draws the same ones.
            seed = None
            if self._sim_seed is not None:
                seed = f"{self._sim_seed}/{self.store.last_sequence()}"
            entropy = RecordingEntropy(self._sim_ledger, seed)
            for core in (cores.round_cipher, cores.keyshare):
                if not hasattr(core, "_entropy"):
                    raise LifecycleError(f"{core!r} has no entropy hook to simulate with")
                core._entropy = entropy
        if self._sim_hook is not None:
            self._sim_hook(cores)
        return cores


def open_node(
    data_dir: Path,
    *,
    seed: int,
    index: int,
    clock: Clock,
    config: NodeConfig,
    ledger: SecretLedger,
    deterministic_entropy: bool,
    hook: CoreHook | None,
) -> SimNode:
    """Open (creating if needed) and start simulated node ``index`` on ``data_dir``."""
    node = SimNode.open(data_dir, None, clock=clock, config=config)
    assert isinstance(node, SimNode)
    entropy_seed = f"{seed}/entropy/{index}" if deterministic_entropy else None
    node.arm(ledger, entropy_seed, hook)
    master = master_key(seed, index)
    try:
        node.start(KeyUnseal(master))
    except BaseException:
        node.stop()
        raise
    finally:
        master.wipe()
    return node
