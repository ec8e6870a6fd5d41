"""The crypto layer: key memory, the round-data envelope, storage epoch keys, the key wraps,
the keyring of KEK versions with its leases, and the passphrase KDF.

The only package allowed to import ``cryptography``. Formats are described byte by byte
in ``docs/crypto.md`` and (the sealed keyring) ``docs/key-hierarchy.md``.
"""

from enclave_keys.crypto.aead import ENVELOPE_OVERHEAD, ENVELOPE_VERSION, RoundCipher
from enclave_keys.crypto.epoch import EpochKey, EpochSource
from enclave_keys.crypto.kdf import (
    KdfParams,
    PassphraseRecord,
    enroll_passphrase,
    unlock_passphrase,
)
from enclave_keys.crypto.keyring import Kek
from enclave_keys.crypto.lease import DEFAULT_LEASE_WAIT, LeaseGate, check_timeout
from enclave_keys.crypto.ring import (
    FIRST_KEK_VERSION,
    KEYRING_BLOB_VERSION,
    KEYRING_ENTRY_SIZE,
    KekSource,
    KekState,
    Keyring,
)
from enclave_keys.crypto.secret import Entropy, SecretBytes
from enclave_keys.crypto.wrap import (
    WRAPPED_EPOCH_SIZE,
    WRAPPED_EPOCH_VERSION,
    WRAPPED_KEY_SIZE,
    WRAPPED_KEY_VERSION,
    read_epoch_header,
    read_wrapped_header,
    rewrap_round_keys,
    unwrap_epoch_key,
    unwrap_round_key,
    wrap_epoch_key,
    wrap_round_key,
)

__all__ = [
    "DEFAULT_LEASE_WAIT",
    "ENVELOPE_OVERHEAD",
    "ENVELOPE_VERSION",
    "FIRST_KEK_VERSION",
    "KEYRING_BLOB_VERSION",
    "KEYRING_ENTRY_SIZE",
    "WRAPPED_EPOCH_SIZE",
    "WRAPPED_EPOCH_VERSION",
    "WRAPPED_KEY_SIZE",
    "WRAPPED_KEY_VERSION",
    "Entropy",
    "EpochKey",
    "EpochSource",
    "KdfParams",
    "Kek",
    "KekSource",
    "KekState",
    "Keyring",
    "LeaseGate",
    "PassphraseRecord",
    "RoundCipher",
    "SecretBytes",
    "check_timeout",
    "enroll_passphrase",
    "read_epoch_header",
    "read_wrapped_header",
    "rewrap_round_keys",
    "unlock_passphrase",
    "unwrap_epoch_key",
    "unwrap_round_key",
    "wrap_epoch_key",
    "wrap_round_key",
]
