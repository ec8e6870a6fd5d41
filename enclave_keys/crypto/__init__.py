"""The crypto layer: key memory, the round-data envelope, key wrapping, the keyring of KEK
versions with its leases, and the passphrase KDF.

The only package allowed to import ``cryptography``. Formats are described byte by byte
in ``docs/crypto.md`` and (the sealed keyring) ``docs/key-hierarchy.md``.
"""

from enclave_keys.crypto.aead import ENVELOPE_OVERHEAD, ENVELOPE_VERSION, RoundCipher
from enclave_keys.crypto.kdf import (
    KdfParams,
    PassphraseRecord,
    enroll_passphrase,
    unlock_passphrase,
)
from enclave_keys.crypto.keyring import (
    WRAPPED_KEY_SIZE,
    WRAPPED_KEY_VERSION,
    Kek,
    read_wrapped_header,
    unwrap_round_key,
    wrap_round_key,
)
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

__all__ = [
    "DEFAULT_LEASE_WAIT",
    "ENVELOPE_OVERHEAD",
    "ENVELOPE_VERSION",
    "FIRST_KEK_VERSION",
    "KEYRING_BLOB_VERSION",
    "KEYRING_ENTRY_SIZE",
    "WRAPPED_KEY_SIZE",
    "WRAPPED_KEY_VERSION",
    "Entropy",
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
    "read_wrapped_header",
    "unlock_passphrase",
    "unwrap_round_key",
    "wrap_round_key",
]
