"""The crypto layer: key memory, the round-data envelope, key wrapping and the passphrase KDF.

The only package allowed to import ``cryptography``. Formats are described byte by byte
in ``docs/crypto.md``.
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
from enclave_keys.crypto.secret import Entropy, SecretBytes

__all__ = [
    "ENVELOPE_OVERHEAD",
    "ENVELOPE_VERSION",
    "WRAPPED_KEY_SIZE",
    "WRAPPED_KEY_VERSION",
    "Entropy",
    "KdfParams",
    "Kek",
    "PassphraseRecord",
    "RoundCipher",
    "SecretBytes",
    "enroll_passphrase",
    "read_wrapped_header",
    "unlock_passphrase",
    "unwrap_round_key",
    "wrap_round_key",
]
