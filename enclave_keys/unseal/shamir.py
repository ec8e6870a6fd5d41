"""Shamir M-of-N key ceremony over SLIP-39 (``shamir_mnemonic``, the reference implementation).

The root key is the SLIP-39 *master secret* (32 bytes) of a single group of N shares, any M
of which recover it. SLIP-39 gives each share 33 words with an RS1024 checksum (a mistyped
word is caught at once) and a digest that rejects a combination of shares from different
sets. Shares are compatible with the reference ``shamir`` command both ways
(``docs/unseal.md``): SLIP-39 passphrase is always empty.

What is stored — record ``unseal.shamir.share_set``, version 1 (integers big-endian)::

    offset  size  field
    0       1     version, 0x01
    1       2     share-set identifier (15 bits)
    3       1     flags: bit 0 = SLIP-39 "extendable" flag
    4       1     iteration exponent (0..15)
    5       1     member threshold M (1..16)
    6       1     member count N (M..16), or 0 = not known (shares made outside the node)
    7       16    verifier salt
    23      32    verifier = HKDF-SHA256(root, salt, frame(domain, b"unseal/shamir"))

The shares themselves are **never** stored or logged, and no error message contains a
share word. A node initialised with Shamir starts sealed; :class:`ShamirCeremony` collects
shares one at a time:

* a malformed share (unknown word, wrong length, checksum) raises :class:`InvalidShare`;
* a share of another set (identifier or parameters differ from the record) raises
  :class:`MismatchedShare` and is dropped — **the shares accepted so far are kept**;
* a member index submitted twice raises :class:`DuplicateShare` (the first one is kept);
* once M shares are in they are combined at once; if the SLIP-39 digest or the root-key
  verifier fails, :class:`MismatchedShare` is raised and **the ceremony resets** (there
  is no telling which share was wrong): every share must be submitted again.

Memory: the combined secret is copied into :class:`SecretBytes` at once, but
``shamir_mnemonic`` works on immutable ``bytes`` (share values, the encrypted master
secret, the decrypted secret) and Python ``str`` mnemonics, none of which can be wiped;
they stay in the heap until collected. See the threat model in ``docs/unseal.md``.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Self

import structlog
from shamir_mnemonic import (  # type: ignore[import-untyped]
    EncryptedMasterSecret,
    MnemonicError,
    Share,
    split_ems,
)
from shamir_mnemonic.constants import (  # type: ignore[import-untyped]
    ID_LENGTH_BITS,
    MAX_SHARE_COUNT,
)
from shamir_mnemonic.recovery import RecoveryState  # type: ignore[import-untyped]
from shamir_mnemonic.wordlist import WORD_INDEX_MAP  # type: ignore[import-untyped]

from enclave_keys.crypto import SecretBytes
from enclave_keys.crypto.verifier import ROOT_VERIFIER_SIZE, VERIFIER_SALT_SIZE, RootVerifier
from enclave_keys.errors import (
    CeremonyError,
    CorruptRecord,
    DuplicateShare,
    InvalidShare,
    MismatchedShare,
)
from enclave_keys.events import UnsealProgress
from enclave_keys.store import Store
from enclave_keys.unseal.api import (
    ROOT_KEY_SIZE,
    Enrolment,
    check_method,
    read_record,
)

__all__ = [
    "SHARE_SET_RECORD",
    "CeremonyProgress",
    "ShamirCeremony",
    "ShamirUnseal",
    "ShareSetRecord",
]

_log = structlog.get_logger(__name__)

SHARE_SET_RECORD: Final = "unseal.shamir.share_set"
_PURPOSE: Final = b"unseal/shamir"
_RECORD_VERSION: Final = 0x01
_HEAD = struct.Struct(">BHBBBB")
_RECORD_SIZE: Final = _HEAD.size + VERIFIER_SALT_SIZE + ROOT_VERIFIER_SIZE
_PASSPHRASE: Final = b""  # SLIP-39 passphrase: always empty (the shares are the secret)
_EXTENDABLE: Final = True  # SLIP-39 defaults for new share sets
_ITERATION_EXPONENT: Final = 1
_MAX_WORDS: Final = 64  # a 32-byte secret takes 33 words; anything far longer is junk
_MAX_IDENTIFIER: Final[int] = (1 << ID_LENGTH_BITS) - 1
_MAX_SHARES: Final[int] = MAX_SHARE_COUNT


# --- the record -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ShareSetRecord:
    """The stored description of the node's share set (no share data) and the verifier."""

    identifier: int
    extendable: bool
    iteration_exponent: int
    threshold: int
    count: int
    verifier: RootVerifier

    def __post_init__(self) -> None:
        if not 0 <= self.identifier <= _MAX_IDENTIFIER:
            raise CorruptRecord("share-set identifier out of range")
        if not 0 <= self.iteration_exponent <= 15:
            raise CorruptRecord("share-set iteration exponent out of range")
        if not 1 <= self.threshold <= _MAX_SHARES:
            raise CorruptRecord("share-set threshold out of range")
        if self.count != 0 and not self.threshold <= self.count <= _MAX_SHARES:
            raise CorruptRecord("share-set count out of range")

    def to_bytes(self) -> bytes:
        head = _HEAD.pack(
            _RECORD_VERSION,
            self.identifier,
            1 if self.extendable else 0,
            self.iteration_exponent,
            self.threshold,
            self.count,
        )
        return head + self.verifier.salt + self.verifier.verifier

    @classmethod
    def from_bytes(cls, raw: bytes) -> ShareSetRecord:
        if not isinstance(raw, bytes) or len(raw) != _RECORD_SIZE:
            raise CorruptRecord("shamir share-set record has the wrong length")
        version, identifier, flags, exponent, threshold, count = _HEAD.unpack_from(raw)
        if version != _RECORD_VERSION:
            raise CorruptRecord(f"shamir share-set record version {version} is not supported")
        if flags & ~1:
            raise CorruptRecord("shamir share-set record has unknown flags")
        salt_end = _HEAD.size + VERIFIER_SALT_SIZE
        verifier = RootVerifier(salt=raw[_HEAD.size : salt_end], verifier=raw[salt_end:])
        return cls(identifier, bool(flags & 1), exponent, threshold, count, verifier)

    def mismatch(self, share: Any) -> str | None:
        """Why ``share`` is not a share of this set, or ``None`` if it may be."""
        if share.identifier != self.identifier:
            return "the share belongs to another share set (its identifier differs)"
        if share.extendable != self.extendable or share.iteration_exponent != (
            self.iteration_exponent
        ):
            return "the share belongs to another share set (its encryption parameters differ)"
        if share.group_count != 1 or share.group_threshold != 1 or share.group_index != 0:
            return "the share is from a multi-group scheme; this node uses a single group"
        if share.member_threshold != self.threshold:
            return (
                f"the share is from a {share.member_threshold}-of-N set;"
                f" this node's set needs {self.threshold}"
            )
        if len(share.value) != ROOT_KEY_SIZE:
            return (
                f"the share protects a {len(share.value)}-byte secret,"
                f" not a {ROOT_KEY_SIZE}-byte root key"
            )
        return None


# --- parsing shares without echoing them ------------------------------------------------


def _reason(message: str, words: int) -> str:
    """A safe description of a ``MnemonicError`` (whose own message quotes share words)."""
    if message.startswith("Invalid mnemonic length"):
        return f"the share has {words} words, which is not a valid SLIP-39 share length"
    if message.startswith("Invalid mnemonic checksum"):
        return "the share's checksum does not match: a word is mistyped, missing or swapped"
    if message.startswith("Invalid mnemonic padding"):
        return "the share's padding is invalid: a word is mistyped"
    if "threshold" in message:
        return "the share's group parameters are inconsistent"
    return "the text is not a valid SLIP-39 share"


def parse_share(mnemonic: str) -> Any:
    """Decode one mnemonic (case and spacing are normalised) or raise :class:`InvalidShare`.

    The error never quotes the text: it names word positions and counts only.
    """
    if not isinstance(mnemonic, str):
        raise InvalidShare("a share must be given as text")
    words = mnemonic.lower().split()
    if not words:
        raise InvalidShare("the share is empty")
    if len(words) > _MAX_WORDS:
        raise InvalidShare(f"the share has {len(words)} words; a share has at most 33")
    for position, word in enumerate(words, start=1):
        if word not in WORD_INDEX_MAP:
            raise InvalidShare(f"word {position} of the share is not in the SLIP-39 word list")
    reason: str | None = None
    share: Any = None
    try:
        share = Share.from_mnemonic(" ".join(words))
    except (MnemonicError, ValueError, IndexError) as exc:
        reason = _reason(str(exc), len(words))
    if reason is not None:  # raised outside the handler: no chained exception quoting words
        raise InvalidShare(reason)
    return share


def _combine(shares: Iterable[Any]) -> SecretBytes | None:
    """The master secret of a complete single-group share list, or None if the digest fails."""
    state = RecoveryState()
    for share in shares:
        state.add_share(share)
    failed = False
    secret: bytes = b""
    try:
        secret = state.recover(_PASSPHRASE)
    except MnemonicError:
        failed = True
    if failed:
        return None
    buffer = bytearray(secret)  # the bytes from shamir_mnemonic cannot be wiped
    del secret
    return SecretBytes.from_buffer(buffer)


# --- the ceremony -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CeremonyProgress:
    """How far a ceremony is: ``submitted`` of ``threshold`` shares; no share data."""

    submitted: int
    threshold: int
    complete: bool

    def to_event(self) -> UnsealProgress:
        """The audit event for this progress (after at least one accepted share)."""
        return UnsealProgress(submitted=self.submitted, threshold=self.threshold)


class ShamirCeremony:
    """Collect the shares of a node's share set one at a time, then hand over the root key.

    Build one from the store of a node initialised with Shamir (:class:`UnsealMismatch`
    if it was not, :class:`CorruptRecord` if its record is damaged). :meth:`submit` each
    share; once it reports ``complete``, :meth:`root` hands over the root key (and resets
    the ceremony). Thread-safe. Use as a context manager to wipe everything on exit.
    """

    __slots__ = ("_lock", "_record", "_root", "_shares")

    def __init__(self, store: Store) -> None:
        check_method(store, ShamirUnseal.method)
        raw = read_record(store, SHARE_SET_RECORD, ShamirUnseal.method)
        self._record = ShareSetRecord.from_bytes(raw)
        self._lock = threading.Lock()
        self._shares: dict[int, Any] = {}
        self._root: SecretBytes | None = None

    @property
    def threshold(self) -> int:
        return self._record.threshold

    @property
    def progress(self) -> CeremonyProgress:
        with self._lock:
            return self._progress()

    def _progress(self) -> CeremonyProgress:
        if self._root is not None:
            return CeremonyProgress(self.threshold, self.threshold, complete=True)
        return CeremonyProgress(len(self._shares), self.threshold, complete=False)

    def submit(self, mnemonic: str) -> CeremonyProgress:
        """Add one share; see the module docstring for what is rejected and how."""
        with self._lock:
            if self._root is not None:
                raise CeremonyError("the ceremony is complete: take the root key or reset it")
            try:
                share = parse_share(mnemonic)
                reason = self._record.mismatch(share)
                if reason is not None:
                    raise MismatchedShare(reason)
                if share.index in self._shares:
                    raise DuplicateShare(
                        f"the share with member index {share.index + 1} was already submitted"
                    )
            except CeremonyError as exc:
                _log.warning(
                    "shamir_share_rejected",
                    reason=type(exc).__name__,
                    submitted=len(self._shares),
                    threshold=self.threshold,
                )
                raise
            self._shares[share.index] = share
            _log.info(
                "shamir_share_accepted", submitted=len(self._shares), threshold=self.threshold
            )
            if len(self._shares) >= self.threshold:
                self._complete()
            return self._progress()

    def _complete(self) -> None:
        shares = list(self._shares.values())
        self._shares.clear()
        root = _combine(shares)
        del shares
        if root is None:
            _log.warning("shamir_ceremony_reset", reason="digest")
            raise MismatchedShare(
                "the shares do not combine (SLIP-39 digest check failed): they are not all"
                " from this node's share set; the ceremony was reset, submit the shares again"
            )
        if not self._record.verifier.matches(root, _PURPOSE):
            root.wipe()
            _log.warning("shamir_ceremony_reset", reason="verifier")
            raise MismatchedShare(
                "the shares combine to a key that is not this node's root key; the ceremony"
                " was reset, submit the shares again"
            )
        self._root = root
        _log.info("shamir_ceremony_complete", threshold=self.threshold)

    def root(self) -> SecretBytes:
        """Hand over the recovered root key (the caller wipes it); the ceremony resets.

        :class:`CeremonyError` if fewer than ``threshold`` shares were accepted.
        """
        with self._lock:
            root = self._root
            if root is None:
                raise CeremonyError(
                    f"the ceremony is incomplete: {len(self._shares)} of"
                    f" {self.threshold} shares submitted"
                )
            self._root = None
            return root

    def reset(self) -> None:
        """Forget every accepted share and wipe a recovered root key not yet handed over."""
        with self._lock:
            self._shares.clear()
            if self._root is not None:
                self._root.wipe()
                self._root = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.reset()

    def __repr__(self) -> str:
        p = self._progress()
        return f"ShamirCeremony({p.submitted} of {p.threshold}{', complete' if p.complete else ''})"


# --- enrolment --------------------------------------------------------------------------


def _check_scheme(threshold: int, count: int) -> None:
    for name, value in (("threshold", threshold), ("count", count)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise CeremonyError(f"the share {name} must be an integer")
    if not 1 <= threshold <= count <= _MAX_SHARES:
        raise CeremonyError(
            f"a share set needs 1 <= threshold <= count <= {_MAX_SHARES}"
            f" (got {threshold} of {count})"
        )
    if threshold == 1 and count > 1:
        raise CeremonyError("SLIP-39 does not allow 1-of-N sets: use 1-of-1, or threshold >= 2")


def _random_identifier(avoid: int | None) -> int:
    while True:
        identifier = int.from_bytes(os.urandom(2), "big") & _MAX_IDENTIFIER
        if identifier != avoid:
            return identifier


class ShamirUnseal:
    """The Shamir method: enrol a new share set, or unlock with a list of shares.

    * :meth:`enrol_shares` / :meth:`resplit` — a new M-of-N set for a new (or the current)
      root key: the :class:`Enrolment` to persist and the mnemonics to hand out;
    * :meth:`enrol_from_shares` (also :meth:`enrol` of ``ShamirUnseal(shares)``) — build
      the records from shares created elsewhere (the reference ``shamir create``);
    * :meth:`unlock_root` of ``ShamirUnseal(shares)`` — a non-interactive unlock: the shares
      are fed through a :class:`ShamirCeremony`. Interactive unsealing uses the ceremony.

    The mnemonic strings cannot be wiped (Python ``str``): keep them short-lived.
    """

    __slots__ = ("_shares",)

    method: Final = "shamir"
    RECORDS: Final = (SHARE_SET_RECORD,)

    def __init__(self, shares: Iterable[str] = ()) -> None:
        self._shares = tuple(shares)

    def enrol(self) -> Enrolment:
        """:meth:`enrol_from_shares` with the shares given at construction."""
        return self.enrol_from_shares(self._shares)

    def unlock_root(self, store: Store) -> SecretBytes:
        with ShamirCeremony(store) as ceremony:
            progress = ceremony.progress
            for mnemonic in self._shares:
                progress = ceremony.submit(mnemonic)
                if progress.complete:
                    return ceremony.root()
            raise CeremonyError(
                f"{progress.submitted} of {progress.threshold} shares given:"
                " not enough to recover the root key"
            )

    @classmethod
    def enrol_shares(cls, threshold: int, count: int) -> tuple[Enrolment, list[str]]:
        """A fresh random 32-byte root key split into a new ``threshold``-of-``count`` set."""
        with SecretBytes.random(ROOT_KEY_SIZE) as root:
            return cls.resplit(root, threshold, count)

    @classmethod
    def resplit(
        cls,
        root: SecretBytes,
        threshold: int,
        count: int,
        *,
        previous: Store | None = None,
    ) -> tuple[Enrolment, list[str]]:
        """Split ``root`` (the current root key, or a new one) into a new share set.

        ``root`` is copied, not taken: the returned :class:`Enrolment` owns its own copy.
        With ``previous`` (a store with a Shamir record), the new set gets a different
        identifier, so the old shares are refused as another set's.
        """
        _check_scheme(threshold, count)
        if not isinstance(root, SecretBytes) or len(root) != ROOT_KEY_SIZE:
            raise CeremonyError(f"the root key must be {ROOT_KEY_SIZE} bytes of SecretBytes")
        avoid: int | None = None
        if previous is not None:
            raw = previous.get_meta(SHARE_SET_RECORD)
            if raw is not None:
                avoid = ShareSetRecord.from_bytes(raw).identifier
        identifier = _random_identifier(avoid)
        with root.borrow() as view:
            # shamir_mnemonic needs an immutable ``bytes`` master secret: it cannot be wiped.
            ems = EncryptedMasterSecret.from_master_secret(
                bytes(view), _PASSPHRASE, identifier, _EXTENDABLE, _ITERATION_EXPONENT
            )
            groups = split_ems(1, [(threshold, count)], ems)
        mnemonics: list[str] = [share.mnemonic() for share in groups[0]]
        del ems, groups
        with root.borrow() as view:
            copy = SecretBytes.from_buffer(view, wipe_source=False)
        try:
            record = ShareSetRecord(
                identifier=identifier,
                extendable=_EXTENDABLE,
                iteration_exponent=_ITERATION_EXPONENT,
                threshold=threshold,
                count=count,
                verifier=RootVerifier.create(copy, _PURPOSE),
            )
        except BaseException:
            copy.wipe()
            raise
        _log.info("shamir_share_set_created", threshold=threshold, count=count)
        return Enrolment(copy, {SHARE_SET_RECORD: record.to_bytes()}), mnemonics

    @classmethod
    def enrol_from_shares(cls, mnemonics: Sequence[str] | Iterable[str]) -> Enrolment:
        """Initialise from shares created elsewhere: combine them once to build the records.

        Give at least M shares of one single-group set protecting a 32-byte secret (with
        an empty SLIP-39 passphrase); the root key is that secret. The member count N is
        not written in the shares, so the record stores 0 ("not known").
        """
        parsed: dict[int, Any] = {}
        first: Any = None
        for mnemonic in mnemonics:
            share = parse_share(mnemonic)
            if first is None:
                first = share
                if share.group_count != 1 or share.group_threshold != 1:
                    raise MismatchedShare(
                        "the shares are from a multi-group scheme; a node uses a single group"
                    )
                if len(share.value) != ROOT_KEY_SIZE:
                    raise CeremonyError(
                        f"the shares protect a {len(share.value)}-byte secret;"
                        f" the root key must be {ROOT_KEY_SIZE} bytes (shamir create -s 256)"
                    )
            elif share.common_parameters() != first.common_parameters() or (
                share.member_threshold != first.member_threshold
            ):
                raise MismatchedShare("the shares are not all from the same share set")
            if share.index in parsed:
                raise DuplicateShare(
                    f"the share with member index {share.index + 1} was given twice"
                )
            parsed[share.index] = share
        if first is None:
            raise CeremonyError("no shares given")
        threshold = int(first.member_threshold)
        if len(parsed) < threshold:
            raise CeremonyError(
                f"{len(parsed)} of {threshold} shares given: not enough to recover the secret"
            )
        given = list(parsed.values())
        root = _combine(given[:threshold])
        if root is None:
            raise MismatchedShare("the shares do not combine (SLIP-39 digest check failed)")
        if len(given) > threshold:  # more than M given: the last M must agree with the first M
            again = _combine(given[-threshold:])
            agree = again is not None and again.equals(root)
            if again is not None:
                again.wipe()
            if not agree:
                root.wipe()
                raise MismatchedShare("the shares do not all combine to the same secret")
        try:
            record = ShareSetRecord(
                identifier=int(first.identifier),
                extendable=bool(first.extendable),
                iteration_exponent=int(first.iteration_exponent),
                threshold=threshold,
                count=0,
                verifier=RootVerifier.create(root, _PURPOSE),
            )
        except BaseException:
            root.wipe()
            raise
        _log.info("shamir_share_set_imported", threshold=threshold)
        return Enrolment(root, {SHARE_SET_RECORD: record.to_bytes()})

    def __repr__(self) -> str:
        return f"ShamirUnseal(<{len(self._shares)} shares hidden>)"
