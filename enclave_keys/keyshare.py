"""The keyshare actor: the reference consumer of round ciphers (design §2, step 4).

On ``RoundKeyReady`` :class:`KeyshareCore` resolves the round's cipher **from the round
context**, makes a random keyshare, seals it under a lease (purpose ``"keyshare"``) and
publishes ``KeyshareCreated`` — only the ciphertext ever leaves. A missing cipher fails
the round with ``round_cipher_missing``; there is no fallback to another key.

It learns each live round's keyshare ciphertext from the ``KeyshareCreated`` events it
published (so replaying the log rebuilds it) and forgets it on ``RoundPurged`` or
``RoundComplete``. On ``DecryptionShareRequested`` it opens the keyshare under a lease,
derives a decryption share (HMAC-SHA256 over the round and request ids, keyed by the
keyshare), seals it (purpose ``"decryption-share"``) and publishes
``DecryptionShareCreated``; when it cannot, it publishes ``DecryptionShareFailed`` with a
short reason. Nothing raises out of a decryption-share request.

Memory: the new keyshare lives in wipeable key memory and is wiped after sealing. An
opened keyshare and a derived share are immutable ``bytes`` (what ``AESGCM`` and
``hmac`` return) that cannot be wiped; they are dropped at once.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from typing import Any, Final

import structlog

from enclave_keys.context import ContextRegistry
from enclave_keys.core_state import DEFAULT_HORIZON, KnownRoundIds, RecentRounds, StateReader
from enclave_keys.crypto import Entropy, SecretBytes
from enclave_keys.errors import (
    ContextClosed,
    InvalidKeyMaterial,
    MissingDependency,
    RoundCipherRetired,
    SecretWiped,
    UnwrapFailed,
)
from enclave_keys.events import (
    DecryptionShareCreated,
    DecryptionShareFailed,
    DecryptionShareRequested,
    Event,
    FailureReason,
    KeyshareCreated,
    RoundComplete,
    RoundFailed,
    RoundKeyReady,
    RoundPurged,
    RoundStage,
    StoredEvent,
)
from enclave_keys.ids import EventId, KeyId, RoundId, by_round_id
from enclave_keys.round_cipher import ROUND_CIPHER, LeasedRoundCipher

__all__ = [
    "DECRYPTION_SHARE_PURPOSE",
    "KEYSHARE_PURPOSE",
    "MAX_SHARE_SIZE",
    "MIN_SHARE_SIZE",
    "KeyshareCore",
    "derive_decryption_share",
]

_log = structlog.get_logger(__name__)

KEYSHARE_PURPOSE: Final = "keyshare"
DECRYPTION_SHARE_PURPOSE: Final = "decryption-share"
MIN_SHARE_SIZE: Final = 32
MAX_SHARE_SIZE: Final = 8 * 1024 * 1024

_DOMAIN: Final = b"enclave_keys/decryption-share/v1"
_SNAPSHOT_VERSION: Final = 1


def derive_decryption_share(keyshare: bytes, round_id: RoundId, request_id: EventId) -> bytes:
    """HMAC-SHA256 keyed by the keyshare over (domain, round id, request id), framed."""
    message = b"".join(
        len(part).to_bytes(2, "big") + part
        for part in (_DOMAIN, round_id.to_bytes(), request_id.raw)
    )
    return hmac.new(keyshare, message, hashlib.sha256).digest()


class _Unavailable(Exception):
    """Internal: why a decryption share cannot be made (a short reason)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class KeyshareCore:
    """The keyshare actor's logic. See the module docstring.

    ``share_size`` is the keyshare length in bytes (32 B to 8 MiB). ``entropy`` makes
    keyshares deterministic: FOR SIMULATIONS ONLY. ``horizon`` bounds how many ended
    rounds are remembered.
    """

    name: Final = "keyshare"
    subscriptions: Final[tuple[type[Event], ...]] = (
        RoundKeyReady,
        KeyshareCreated,
        RoundPurged,
        RoundComplete,
        DecryptionShareRequested,
    )

    def __init__(
        self,
        registry: ContextRegistry,
        *,
        share_size: int = MIN_SHARE_SIZE,
        entropy: Entropy | None = None,
        horizon: int = DEFAULT_HORIZON,
    ) -> None:
        if (
            not isinstance(share_size, int)
            or isinstance(share_size, bool)
            or not MIN_SHARE_SIZE <= share_size <= MAX_SHARE_SIZE
        ):
            raise InvalidKeyMaterial(
                f"share_size must be an int from {MIN_SHARE_SIZE} to {MAX_SHARE_SIZE} bytes"
            )
        if not isinstance(horizon, int) or isinstance(horizon, bool) or horizon < 1:
            raise ValueError("horizon must be a positive int")
        self._registry = registry
        self._share_size = share_size
        self._entropy = entropy
        self._horizon = horizon
        self._shares: dict[RoundId, tuple[KeyId, bytes]] = {}
        self._ended = RecentRounds(horizon)

    # --- queries ------------------------------------------------------------------------

    def keyshare_of(self, round_id: RoundId) -> tuple[KeyId, bytes] | None:
        """The round's (key id, keyshare ciphertext), if this core made one."""
        return self._shares.get(round_id)

    def rounds_with_keyshare(self) -> list[RoundId]:
        return sorted(self._shares)

    # --- events ---------------------------------------------------------------------------

    def handle(self, stored: StoredEvent) -> Sequence[Event]:
        event = stored.payload
        if isinstance(event, RoundKeyReady):
            self._ended.discard(event.round_id)  # see replay
            return self._create(event)
        if isinstance(event, DecryptionShareRequested):
            return (self._decryption_share(event),)
        self.replay(stored)
        return ()

    def replay(self, stored: StoredEvent) -> None:
        """Apply an already-logged event to the state; create nothing, return nothing."""
        event = stored.payload
        if isinstance(event, RoundKeyReady):
            # A new key for an id that ended before: the router opened it again (past its
            # horizon). The new round is live: its share must be kept.
            self._ended.discard(event.round_id)
        elif isinstance(event, KeyshareCreated) and stored.source == self.name:
            # Sealed before the purge (under the cipher's lease), but logged after it: the
            # round has ended, and its share must not come back.
            if event.round_id not in self._ended:
                self._shares[event.round_id] = (event.key_id, event.ciphertext)
        elif isinstance(event, RoundPurged):
            self._forget(event.round_id)
        elif isinstance(event, RoundComplete) and event.round_id in self._shares:
            # Only a round this core knows: a stray RoundComplete (for a round id nobody
            # requested yet) must not refuse the shares of a later round of that id. A
            # keyed round without a share is forgotten by its RoundPurged.
            self._forget(event.round_id)

    def _forget(self, rid: RoundId) -> None:
        self._shares.pop(rid, None)
        self._ended.add_first(rid)

    def _create(self, event: RoundKeyReady) -> Sequence[Event]:
        rid = event.round_id
        fields = {"round_id": rid.value, "key_id": event.key_id.hex()}
        context = self._registry.get(rid)
        if context is None or rid in self._shares:
            _log.debug("keyshare_not_needed", **fields)
            return ()
        try:
            leased = context.require(ROUND_CIPHER)
            if leased.key_id != event.key_id:
                raise MissingDependency(f"round {rid} holds another round key")
        except ContextClosed:
            _log.debug("keyshare_not_needed", **fields)
            return ()
        except MissingDependency:
            _log.error("round_cipher_missing", **fields)
            failed = RoundFailed(
                round_id=rid,
                failed_at=RoundStage.KEY_GENERATION,
                reason=FailureReason.ROUND_CIPHER_MISSING,
                detail="keyshare found no round cipher for this key in the round context",
            )
            return (failed,)
        ciphertext = self._seal_new_share(leased)
        if ciphertext is None:
            _log.info("keyshare_not_created", why="round_cipher_retired", **fields)
            return ()
        _log.info("keyshare_created", size=self._share_size, **fields)
        return (KeyshareCreated(round_id=rid, key_id=leased.key_id, ciphertext=ciphertext),)

    def _seal_new_share(self, leased: LeasedRoundCipher) -> bytes | None:
        """A fresh random keyshare sealed under the round key; None if it was retired —
        also if that happened once the seal was made: the purge waits for the seal's
        lease only, so its ``RoundPurged`` could otherwise reach the log before this
        share's ``KeyshareCreated`` (a share logged for a purged round)."""
        with SecretBytes.random(self._share_size, self._entropy) as share:
            try:
                with leased.lease() as cipher, share.borrow() as view:
                    sealed = cipher.seal(KEYSHARE_PURPOSE, view)
            except (RoundCipherRetired, SecretWiped):
                return None
        return None if leased.retired else sealed

    def _decryption_share(self, event: DecryptionShareRequested) -> Event:
        rid, request_id = event.round_id, event.request_id
        fields = {"round_id": rid.value, "request_id": request_id.hex()}
        try:
            ciphertext = self._make_decryption_share(rid, request_id)
        except _Unavailable as why:
            _log.warning("decryption_share_failed", reason=why.reason, **fields)
            return DecryptionShareFailed(round_id=rid, request_id=request_id, reason=why.reason)
        except Exception as exc:
            _log.error(
                "decryption_share_failed",
                reason="internal_error",
                error_type=type(exc).__qualname__,
                **fields,
            )
            return DecryptionShareFailed(
                round_id=rid, request_id=request_id, reason="internal_error"
            )
        _log.info("decryption_share_created", **fields)
        return DecryptionShareCreated(round_id=rid, request_id=request_id, ciphertext=ciphertext)

    def _make_decryption_share(self, rid: RoundId, request_id: EventId) -> bytes:
        if rid in self._ended:
            raise _Unavailable("round_purged")
        context = self._registry.get(rid)
        share = self._shares.get(rid)
        if context is None:  # torn down: the round ended (or never was)
            raise _Unavailable("unknown_round" if share is None else "round_purged")
        if share is None:
            raise _Unavailable("no_keyshare")
        key_id, keyshare_ciphertext = share
        try:
            leased = context.require(ROUND_CIPHER)
        except ContextClosed:
            raise _Unavailable("round_purged") from None
        except MissingDependency:
            raise _Unavailable("round_cipher_missing") from None
        if leased.key_id != key_id:
            raise _Unavailable("key_mismatch")
        try:
            with leased.lease() as cipher:
                keyshare = cipher.open(KEYSHARE_PURPOSE, keyshare_ciphertext)
                derived = derive_decryption_share(keyshare, rid, request_id)
                del keyshare
                sealed = cipher.seal(DECRYPTION_SHARE_PURPOSE, derived)
        except (RoundCipherRetired, SecretWiped):
            raise _Unavailable("round_cipher_retired") from None
        except UnwrapFailed:
            raise _Unavailable("keyshare_unreadable") from None
        if leased.retired:  # purged meanwhile: see _seal_new_share
            raise _Unavailable("round_cipher_retired")
        return sealed

    # --- snapshots ------------------------------------------------------------------------

    def snapshot_state(self) -> dict[str, Any]:
        """``{"version": 1, "shares": [{"round_id", "key_id" (hex), "ciphertext"}, ...],
        "ended": [round id, ...]}`` — ciphertexts only, never key material."""
        return {
            "version": _SNAPSHOT_VERSION,
            "shares": [
                {"round_id": rid.value, "key_id": key_id.hex(), "ciphertext": ciphertext}
                for rid, (key_id, ciphertext) in sorted(self._shares.items(), key=by_round_id)
            ],
            "ended": [rid.value for rid in self._ended],
        }

    def restore_state(self, state: object, *, round_ids: KnownRoundIds | None = None) -> None:
        """Replace the state with a snapshot; :class:`CorruptRecord` (changing nothing)
        when it is malformed. ``round_ids``: a table shared with the other cores restored
        from the same snapshot."""
        reader = StateReader(
            "keyshare snapshot", state, version=_SNAPSHOT_VERSION, round_ids=round_ids
        )
        shares = reader.unique(
            (
                reader.round_id(item.get("round_id")),
                (reader.key_id(item.get("key_id")), reader.ciphertext(item.get("ciphertext"))),
            )
            for item in map(reader.map, reader.items("shares"))
        )
        ended = RecentRounds(self._horizon, map(reader.round_id, reader.items("ended")))
        self._shares, self._ended = shares, ended

    def __repr__(self) -> str:
        return f"KeyshareCore(rounds={len(self._shares)}, share_size={self._share_size})"
