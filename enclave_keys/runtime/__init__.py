"""Runtimes: what drives handlers (cores) from the event log.

* :class:`DeterministicRuntime` — single-threaded and seeded, for simulations and tests;
* :class:`PykkaRuntime` — Pykka actors on threads, for a node.

Both implement :class:`Runtime` over one :class:`~enclave_keys.bus.EventBus`, isolate
handler failures the same way (:mod:`enclave_keys.runtime.shell`) and record handler
publishes that could not be committed (:class:`CommitFailure`).
"""

from enclave_keys.runtime.api import Runtime
from enclave_keys.runtime.deterministic import DeterministicRuntime
from enclave_keys.runtime.failures import CommitFailure
from enclave_keys.runtime.pykka_runtime import PykkaRuntime
from enclave_keys.runtime.shell import RUNTIME_SOURCE

__all__ = [
    "RUNTIME_SOURCE",
    "CommitFailure",
    "DeterministicRuntime",
    "PykkaRuntime",
    "Runtime",
]
