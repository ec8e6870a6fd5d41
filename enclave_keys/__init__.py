"""enclave_keys: forward-secret per-round AES-256-GCM keys for threshold-cryptography nodes."""

from enclave_keys.clock import Clock, ManualClock, SystemClock
from enclave_keys.errors import EnclaveKeysError
from enclave_keys.ids import EventId, KekVersion, KeyId, RoundId

__all__ = [
    "Clock",
    "EnclaveKeysError",
    "EventId",
    "KekVersion",
    "KeyId",
    "ManualClock",
    "RoundId",
    "SystemClock",
]

__version__ = "0.1.0"
