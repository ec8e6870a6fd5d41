"""Family 5: keyshare seal and open, against raw ``AESGCM`` in the same run.

Ours: ``RoundCipher.seal(purpose, data)`` — validate the purpose, build the associated
data, draw a nonce, encrypt, assemble the envelope — and ``open``. The baseline:
``AESGCM.encrypt`` / ``decrypt`` with a random nonce and associated data of the same
length, on an ``AESGCM`` object built once, as ours is. Rates in MiB/s.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Final

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from benchmarks.config import KIB, Sizes
from benchmarks.harness import Row, Target, median_seconds, timed
from enclave_keys.crypto import RoundCipher
from enclave_keys.ids import RoundId
from enclave_keys.keyshare import KEYSHARE_PURPOSE

__all__ = ["run_seal"]

SEAL_TARGET: Final = Target(0.8, on="ratio")
SEAL_TARGET_SIZE: Final = 64 * KIB
_MIB: Final = 1024 * 1024
_AAD_LEN: Final = 80  # about what ours binds: domain, header, round id, purpose


def _label(size: int) -> str:
    return f"{size // _MIB} MiB" if size >= _MIB else f"{size // KIB} KiB"


def _rows(cipher: RoundCipher, raw: AESGCM, size: int, sizes: Sizes) -> list[Row]:
    """Seal and open rows at one plaintext size."""
    data = os.urandom(size)
    aad = os.urandom(_AAD_LEN)
    ops = max(10, sizes.seal_bytes // size)
    mib = ops * size / _MIB
    sealed = cipher.seal(KEYSHARE_PURPOSE, data)
    nonce = os.urandom(12)
    encrypted = raw.encrypt(nonce, data, aad)

    def rate(op: Callable[[], object]) -> float:
        return mib / median_seconds(
            lambda: timed(lambda: [op() for _ in range(ops)]), sizes.repeats
        )

    label = _label(size)
    return [
        Row(
            "seal",
            f"keyshare seal {label}",
            size,
            "MiB/s",
            rate(lambda: cipher.seal(KEYSHARE_PURPOSE, data)),
            "raw AESGCM.encrypt",
            rate(lambda: raw.encrypt(os.urandom(12), data, aad)),
            SEAL_TARGET if size == SEAL_TARGET_SIZE else None,
        ),
        Row(
            "seal",
            f"keyshare open {label}",
            size,
            "MiB/s",
            rate(lambda: cipher.open(KEYSHARE_PURPOSE, sealed)),
            "raw AESGCM.decrypt",
            rate(lambda: raw.decrypt(nonce, encrypted, aad)),
        ),
    ]


def run_seal(sizes: Sizes) -> list[Row]:
    with RoundCipher.generate(RoundId("bench:seal")) as cipher:
        raw = AESGCM(AESGCM.generate_key(256))
        return [row for size in sizes.payloads for row in _rows(cipher, raw, size, sizes)]
