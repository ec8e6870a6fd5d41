"""A forensic attacker for tests: what can a data directory plus the master secret give?

It plays the attacker of ``docs/threat-model.md`` — a disk image taken after rounds
ended, and the root key leaked later — against the raw bytes of every file in a data
directory, using only the documented fixed-size formats (``docs/storage-format.md``):

1. every offset that may start a sealed keyring (any number of KEK versions) is opened
   with the root key: every KEK version ever present, including those of keyrings that
   linger in LMDB free pages;
2. every 73-byte candidate naming a known KEK version is unwrapped as an epoch key;
3. every 85-byte candidate naming a recovered epoch is unwrapped as a round key, for
   the round its key id belongs to (from the plaintext event log) or, failing that,
   for every round id given.

The report counts what was tried and lists what was recovered (round ids and key ids
only). :func:`find_raw_keys` looks for raw key bytes in the files. Use it in tests of
forward secrecy: a purged round must not be in :attr:`ForensicReport.recovered`.

Slow by design (it tries every offset); meant for test-sized directories.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from enclave_keys.crypto import (
    KEYRING_ENTRY_SIZE,
    WRAPPED_EPOCH_SIZE,
    WRAPPED_EPOCH_VERSION,
    WRAPPED_KEY_SIZE,
    WRAPPED_KEY_VERSION,
    EpochKey,
    Kek,
    KekState,
    Keyring,
    SecretBytes,
    read_wrapped_header,
    unwrap_epoch_key,
    unwrap_round_key,
)
from enclave_keys.crypto.ring import KEYRING_BLOB_VERSION
from enclave_keys.errors import EnclaveKeysError
from enclave_keys.ids import EpochNumber, KekVersion, KeyId, RoundId

__all__ = ["ForensicReport", "find_raw_keys", "scan_data_dir"]

_KEYRING_OVERHEAD = 1 + 12 + 4 + 16  # version, nonce, count, tag


@dataclass
class ForensicReport:
    """What the attacker got. Ids and counts only, never key bytes."""

    files: dict[str, int] = field(default_factory=dict)  # name -> bytes scanned
    kek_versions: set[KekVersion] = field(default_factory=set)
    epochs: set[EpochNumber] = field(default_factory=set)
    recovered: dict[RoundId, set[KeyId]] = field(default_factory=dict)
    keyring_candidates: int = 0
    epoch_candidates: int = 0
    round_key_candidates: int = 0

    @property
    def recovered_rounds(self) -> set[RoundId]:
        return set(self.recovered)


def _read_files(data_dir: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(data_dir)): path.read_bytes()
        for path in sorted(data_dir.rglob("*"))
        if path.is_file()
    }


def _offsets(data: bytes, prefix: bytes) -> Iterable[int]:
    at = data.find(prefix)
    while at != -1:
        yield at
        at = data.find(prefix, at + 1)


def _keks_from_keyrings(
    files: Mapping[str, bytes],
    root: SecretBytes,
    report: ForensicReport,
    rings: list[Keyring],
    max_versions: int,
) -> dict[KekVersion, Kek]:
    """Open every candidate keyring blob; every KEK version not retired in one of them.

    The opened keyrings are appended to ``rings`` (the caller seals them)."""
    keks: dict[KekVersion, Kek] = {}
    marker = bytes([KEYRING_BLOB_VERSION])
    try_open = Keyring.probe(root)
    for data in files.values():
        for at in _offsets(data, marker):
            for count in range(1, max_versions + 1):
                end = at + _KEYRING_OVERHEAD + count * KEYRING_ENTRY_SIZE
                if end > len(data):
                    break
                report.keyring_candidates += 1
                ring = try_open(data[at:end])
                if ring is None:
                    continue
                rings.append(ring)
                for version, state in ring.versions():
                    if state is not KekState.RETIRED:
                        keks.setdefault(version, ring.kek(version))
                break
    report.kek_versions = set(keks)
    return keks


def _epoch_keys(
    files: Mapping[str, bytes], keks: Mapping[KekVersion, Kek], report: ForensicReport
) -> dict[EpochNumber, EpochKey]:
    epochs: dict[EpochNumber, EpochKey] = {}
    for version, kek in keks.items():
        prefix = bytes([WRAPPED_EPOCH_VERSION]) + version.to_bytes()
        for data in files.values():
            for at in _offsets(data, prefix):
                blob = data[at : at + WRAPPED_EPOCH_SIZE]
                if len(blob) != WRAPPED_EPOCH_SIZE:
                    continue
                report.epoch_candidates += 1
                try:
                    key = unwrap_epoch_key(kek, blob)
                except EnclaveKeysError:
                    continue
                if key.number in epochs:
                    key.wipe()
                else:
                    epochs[key.number] = key
    report.epochs = set(epochs)
    return epochs


def _round_keys(
    files: Mapping[str, bytes],
    epochs: Mapping[EpochNumber, EpochKey],
    round_of_key: Mapping[KeyId, RoundId],
    round_ids: Iterable[RoundId],
    report: ForensicReport,
) -> None:
    every_round = sorted(set(round_ids) | set(round_of_key.values()))
    for number, epoch in epochs.items():
        prefix = bytes([WRAPPED_KEY_VERSION]) + number.to_bytes()
        for data in files.values():
            for at in _offsets(data, prefix):
                blob = data[at : at + WRAPPED_KEY_SIZE]
                if len(blob) != WRAPPED_KEY_SIZE:
                    continue
                report.round_key_candidates += 1
                try:
                    _, key_id = read_wrapped_header(blob)
                except EnclaveKeysError:
                    continue
                known = round_of_key.get(key_id)
                for round_id in [known] if known is not None else every_round:
                    try:
                        unwrap_round_key(epoch, round_id, blob).wipe()
                    except EnclaveKeysError:
                        continue
                    report.recovered.setdefault(round_id, set()).add(key_id)
                    break


def scan_data_dir(
    data_dir: str | Path,
    root: SecretBytes,
    *,
    round_of_key: Mapping[KeyId, RoundId] | None = None,
    round_ids: Iterable[RoundId] = (),
    max_kek_versions: int = 16,
) -> ForensicReport:
    """Recover every round key the raw files of ``data_dir`` still give under ``root``.

    ``round_of_key`` maps key ids to rounds (the event log's ``RoundKeyReady`` events
    give it); blobs with other key ids are tried against every round in ``round_ids``.
    Keyrings of up to ``max_kek_versions`` versions are tried at every offset.
    ``root`` stays the caller's. Every recovered key is wiped at once.
    """
    files = _read_files(Path(data_dir))
    report = ForensicReport(files={name: len(data) for name, data in files.items()})
    rings: list[Keyring] = []
    epochs: dict[EpochNumber, EpochKey] = {}
    try:
        keks = _keks_from_keyrings(files, root, report, rings, max_kek_versions)
        epochs = _epoch_keys(files, keks, report)
        _round_keys(files, epochs, round_of_key or {}, round_ids, report)
    finally:
        for key in epochs.values():
            key.wipe()
        for ring in rings:
            ring.seal(0.0, force=True)
    return report


def find_raw_keys(data_dir: str | Path, raw_keys: Iterable[bytes]) -> list[tuple[str, int]]:
    """(file, offset) of every occurrence of any of ``raw_keys`` in ``data_dir``'s files."""
    files = _read_files(Path(data_dir))
    hits: list[tuple[str, int]] = []
    for raw in raw_keys:
        for name, data in files.items():
            hits.extend((name, at) for at in _offsets(data, raw))
    return hits
