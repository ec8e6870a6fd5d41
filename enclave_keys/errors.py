"""The exception hierarchy.

Every error the library raises on purpose derives from :class:`EnclaveKeysError`, so a
node can catch one class at its boundary. Subclasses are named by the condition, not by
the module that noticed it. No error message ever contains key bytes, nonces, ciphertexts
or passphrases: messages name ids, sizes and versions only.
"""

from __future__ import annotations


class EnclaveKeysError(Exception):
    """Root of every error raised by enclave_keys."""


# --- vocabulary -----------------------------------------------------------------------


class InvalidIdentifier(EnclaveKeysError, ValueError):
    """A round id, key id, event id or KEK version is malformed."""


# --- crypto ---------------------------------------------------------------------------


class CryptoError(EnclaveKeysError):
    """Base for failures in the crypto layer."""


class UnwrapFailed(CryptoError):
    """Authentication failed: wrong key, wrong associated data, or tampered bytes.

    Deliberately opaque: it never says which check failed and never echoes the input,
    so it cannot be used as an oracle. Truncated, extended, bit-flipped, re-targeted or
    unknown-version envelopes all raise this one error.
    """

    def __init__(self, what: str = "envelope") -> None:
        super().__init__(f"authentication failed for {what}")


class SecretWiped(CryptoError):
    """A secret (key memory, round cipher, KEK) was used after it was wiped."""


class InvalidKeyMaterial(CryptoError, ValueError):
    """Key material has the wrong length or form (the message gives sizes, never bytes)."""


class WeakKdfParameters(CryptoError, ValueError):
    """Argon2id parameters are below the library's floor."""


class WrongPassphrase(CryptoError):
    """The passphrase does not match the stored verifier."""


class InvalidPassphrase(CryptoError, ValueError):
    """A passphrase is empty, too long, or not valid text (checked before any derivation)."""


# --- events and codec -----------------------------------------------------------------


class CodecError(EnclaveKeysError):
    """Base for every failure to decode (or encode) an event."""


class TruncatedData(CodecError):
    """The bytes end before the value they encode is complete."""


class TrailingBytes(CodecError):
    """Bytes follow a complete encoded value."""


class UnknownEventTag(CodecError):
    """The wire tag names no known event type."""


class SchemaMismatch(CodecError):
    """The event's schema number is not the one this version reads."""


class MalformedEvent(CodecError):
    """A field is missing, unexpected, or of the wrong type or range."""


# --- storage --------------------------------------------------------------------------


class StoreError(EnclaveKeysError):
    """Base for failures of the storage layer."""


class StoreClosed(StoreError):
    """The store was used after close()."""


class CorruptRecord(StoreError):
    """A stored record cannot be decoded: wrong layout, version or length."""


class SequenceConflict(StoreError):
    """An appended batch does not continue the log (gap, overlap or reordering)."""


class StoreUnavailable(StoreError):
    """The data directory cannot be opened (missing, foreign or damaged LMDB file)."""


class DirectoryInUse(StoreUnavailable):
    """Another node holds the data directory (one node per directory at a time)."""


class CorruptSlot(StoreError):
    """An epoch slot record is malformed: wrong magic, version, length or checksum.

    A torn write leaves exactly this; recovery treats the slot as empty.
    """


# --- actors and lifecycle -------------------------------------------------------------


class LifecycleError(EnclaveKeysError):
    """Base for failures of the round lifecycle (contexts, leases, actors)."""


class ActorsStopped(LifecycleError):
    """A runtime's actor was stopped by someone else (``pykka.ActorRegistry.stop_all()``,
    say): the runtime takes no more work. Stop the node and open it again; it recovers
    as after a crash."""


class MissingDependency(LifecycleError):
    """A round context lacks a dependency an actor needs (e.g. no round cipher).

    Never answered with a fallback: the round fails instead.
    """


class ContextClosed(LifecycleError):
    """The round's context was torn down: the round has ended."""


class RoundCipherRetired(LifecycleError):
    """The round cipher was purged (or is being purged): no new lease can be taken."""


class LeaseTimeout(LifecycleError):
    """Open leases did not end within the bounded wait."""


# --- storage epochs (forward secrecy at rest) ---------------------------------------


class EpochError(EnclaveKeysError):
    """Base for failures of the storage epoch ratchet."""


class UnknownEpoch(EpochError):
    """No key for this storage epoch: it was destroyed by a ratchet, or never existed.

    A round key wrapped under such an epoch is unrecoverable — by design, once its
    round was purged.
    """


class RatchetFailed(EpochError):
    """An epoch change could not finish. The new epoch is current and the old one is
    kept (in memory and its slot) until the next ratchet, or open, finishes the change."""


# --- master keys: unseal, keyring, ceremony, HSM -------------------------------------


class MasterKeyError(EnclaveKeysError):
    """Base for failures of the master-key hierarchy (unseal sources and the keyring)."""


class Sealed(MasterKeyError):
    """The keyring is sealed (not yet unsealed, or sealed again): no KEK can be used."""


class UnknownKekVersion(MasterKeyError):
    """A blob names a KEK version the keyring does not have."""


class KekRetired(MasterKeyError):
    """The KEK version is retired: its key is destroyed and it can no longer unwrap."""


class UnsealMismatch(MasterKeyError):
    """The store was initialised with a different unseal method, or is not initialised."""


class AlreadyInitialised(MasterKeyError):
    """The store already has a root key and keyring; initialising again would lose them."""


class CeremonyError(MasterKeyError):
    """Base for a rejected key-ceremony share (the message never contains share words)."""


class InvalidShare(CeremonyError):
    """The share is malformed: wrong words, bad checksum, wrong length."""


class DuplicateShare(CeremonyError):
    """This share (same index) was already submitted in the current ceremony."""


class MismatchedShare(CeremonyError):
    """The share belongs to another share set, or the combined set fails its digest."""


class HsmError(MasterKeyError):
    """The PKCS#11 token is unreachable, refuses the PIN, or lacks the wrapping key."""


# --- simulations, log files, replay (appended by the simulations work; append-only) ---


class LogFileError(CodecError):
    """An exported event-log file is malformed — wrong magic or version, a truncated or
    oversized record, a trailer whose count or digest does not match — or it cannot be
    read or written (the path and the system's reason only)."""


class ScenarioError(EnclaveKeysError, ValueError):
    """A simulation scenario is malformed (an unknown outcome in a mix, a bad count)."""
