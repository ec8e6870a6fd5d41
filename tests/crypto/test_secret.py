from __future__ import annotations

import copy
import ctypes
import errno
import gc
import json
import mmap
import os
import pickle
import random
import subprocess
import sys
import textwrap
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from enclave_keys.crypto import secret as secret_module
from enclave_keys.crypto.secret import SecretBytes
from enclave_keys.errors import InvalidKeyMaterial, SecretWiped

KEY = bytes(range(1, 33))
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Released:
    """What a mapping held at the moment it was about to be unlocked and unmapped."""

    raw_at_address: bytes
    via_mapping: bytes
    mapping: object


@pytest.fixture
def released(monkeypatch: pytest.MonkeyPatch) -> list[Released]:
    """Spy on the unmap step: read the memory (by address, via ctypes) just before it."""
    seen: list[Released] = []
    original = secret_module._release

    def spy(mapping: mmap.mmap, address: int, locked: bool) -> None:
        seen.append(Released(ctypes.string_at(address, len(mapping)), bytes(mapping), mapping))
        original(mapping, address, locked)

    monkeypatch.setattr(secret_module, "_release", spy)
    return seen


def raw_memory(secret: SecretBytes) -> bytes:
    return ctypes.string_at(secret._address, len(secret))


# --- construction ---------------------------------------------------------------------


def test_random_gives_distinct_secrets_of_the_requested_size() -> None:
    a, b = SecretBytes.random(32), SecretBytes.random(32)
    assert len(a) == len(b) == 32
    assert not a.equals(b)
    with a.borrow() as view:
        assert any(view)


def test_random_reads_from_an_injected_entropy_source_deterministically() -> None:
    a = SecretBytes.random(32, entropy=random.Random(1).randbytes)
    b = SecretBytes.random(32, entropy=random.Random(1).randbytes)
    assert a.equals(b)
    assert a.equals(random.Random(1).randbytes(32))


def test_an_entropy_source_returning_the_wrong_size_is_rejected() -> None:
    with pytest.raises(InvalidKeyMaterial):
        SecretBytes.random(32, entropy=lambda n: bytes(n - 1))


@pytest.mark.parametrize("size", [-1, True, 1.5, "32"])
def test_invalid_sizes_are_rejected(size: object) -> None:
    with pytest.raises(InvalidKeyMaterial):
        SecretBytes.random(size)  # type: ignore[arg-type]


def test_direct_construction_is_refused() -> None:
    with pytest.raises(TypeError):
        SecretBytes()


def test_from_bytes_copies_into_the_mapping() -> None:
    secret = SecretBytes.from_bytes(KEY)
    assert secret.equals(KEY)
    assert raw_memory(secret) == KEY


def test_from_buffer_zeroes_a_bytearray_source() -> None:
    source = bytearray(KEY)
    secret = SecretBytes.from_buffer(source)
    assert secret.equals(KEY)
    assert source == bytearray(32)


def test_from_buffer_zeroes_only_the_viewed_region_of_a_memoryview() -> None:
    backing = bytearray(b"\xff" * 4 + KEY + b"\xee" * 4)
    secret = SecretBytes.from_buffer(memoryview(backing)[4:36])
    assert secret.equals(KEY)
    assert backing == b"\xff" * 4 + bytes(32) + b"\xee" * 4


def test_from_buffer_can_leave_the_source_alone() -> None:
    source = bytearray(KEY)
    SecretBytes.from_buffer(source, wipe_source=False)
    assert source == KEY


def test_from_buffer_refuses_to_pretend_it_wiped_a_read_only_source() -> None:
    with pytest.raises(TypeError):
        SecretBytes.from_buffer(memoryview(KEY))
    assert SecretBytes.from_buffer(memoryview(KEY), wipe_source=False).equals(KEY)


def test_empty_secrets_work() -> None:
    with SecretBytes.from_bytes(b"") as secret, secret.borrow() as view:
        assert len(view) == 0


# --- access ---------------------------------------------------------------------------


def test_borrow_yields_a_read_only_view_released_after_the_block() -> None:
    secret = SecretBytes.from_bytes(KEY)
    with secret.borrow() as view:
        assert view.readonly
        assert bytes(view) == KEY
        with pytest.raises(TypeError):
            view[0] = 0
    with pytest.raises(ValueError, match="released"):
        len(view)


def test_equals_compares_contents() -> None:
    secret = SecretBytes.from_bytes(KEY)
    assert secret.equals(SecretBytes.from_bytes(KEY))
    assert secret.equals(bytearray(KEY))
    assert secret.equals(secret)
    assert not secret.equals(KEY[:-1] + b"\x00")
    assert not secret.equals(KEY[:-1])


def test_no_value_semantics_equality_hash_or_bytes() -> None:
    a, b = SecretBytes.from_bytes(KEY), SecretBytes.from_bytes(KEY)
    assert a != b
    assert hash(a) != hash(b)
    with pytest.raises(TypeError):
        bytes(a)  # type: ignore[call-overload]


def test_repr_and_str_show_size_and_state_only() -> None:
    secret = SecretBytes.from_bytes(KEY)
    for text in (repr(secret), str(secret)):
        assert "size=32" in text
        assert KEY.hex() not in text
        assert KEY.hex()[:8] not in text
        assert repr(KEY) not in text
    secret.wipe()
    assert "wiped" in repr(secret)


@pytest.mark.parametrize(
    "how",
    [copy.copy, copy.deepcopy]
    + [lambda s, p=p: pickle.dumps(s, protocol=p) for p in range(pickle.HIGHEST_PROTOCOL + 1)],
)
def test_pickling_and_copying_are_refused(how: object) -> None:
    with pytest.raises(TypeError):
        how(SecretBytes.from_bytes(KEY))  # type: ignore[operator]


# --- wiping ---------------------------------------------------------------------------


def test_wipe_zeroes_the_mapped_memory_before_unmapping(released: list[Released]) -> None:
    secret = SecretBytes.from_bytes(KEY)
    assert raw_memory(secret) == KEY  # the spy reads the right address
    secret.wipe()
    [seen] = released
    assert seen.raw_at_address == bytes(len(seen.raw_at_address))
    assert seen.via_mapping == bytes(len(seen.via_mapping))
    assert len(seen.raw_at_address) % mmap.PAGESIZE == 0
    assert seen.mapping.closed  # type: ignore[attr-defined]
    assert secret.is_wiped
    assert not secret.is_locked


def test_wipe_is_idempotent(released: list[Released]) -> None:
    secret = SecretBytes.from_bytes(KEY)
    secret.wipe()
    secret.wipe()
    assert len(released) == 1


def test_every_access_after_wipe_raises_secret_wiped() -> None:
    secret = SecretBytes.from_bytes(KEY)
    secret.wipe()
    with pytest.raises(SecretWiped), secret.borrow():
        pass
    with pytest.raises(SecretWiped):
        secret.equals(KEY)
    assert len(secret) == 32


def test_context_manager_wipes_on_exit_even_on_error(released: list[Released]) -> None:
    with pytest.raises(RuntimeError), SecretBytes.from_bytes(KEY) as secret:
        raise RuntimeError("boom")
    assert secret.is_wiped
    assert released[0].raw_at_address == bytes(len(released[0].raw_at_address))


def test_garbage_collection_wipes(released: list[Released]) -> None:
    gc.collect()  # finalise other tests' leftovers first: only this secret may show below
    released.clear()
    secret = SecretBytes.from_bytes(KEY)
    mapping = secret._mapping
    del secret
    gc.collect()
    [seen] = [r for r in released if r.mapping is mapping]
    assert seen.raw_at_address == bytes(len(seen.raw_at_address))


def test_wipe_during_a_borrow_zeroes_at_once_and_unmaps_when_it_ends(
    released: list[Released],
) -> None:
    secret = SecretBytes.from_bytes(KEY)
    with secret.borrow() as view:
        secret.wipe()
        assert bytes(view) == bytes(32)
        assert released == []
    assert len(released) == 1
    assert released[0].mapping.closed  # type: ignore[attr-defined]


def test_concurrent_wipes_release_exactly_once(released: list[Released]) -> None:
    secret = SecretBytes.from_bytes(KEY)
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def wipe() -> None:
        try:
            barrier.wait(timeout=10)
            secret.wipe()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=wipe) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert errors == []
    assert len(released) == 1


# --- memory protections -----------------------------------------------------------------


def _vm_flags(address: int) -> set[str]:
    current: tuple[int, int] | None = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            start, end = (int(part, 16) for part in head.split("-"))
            current = (start, end)
        elif line.startswith("VmFlags:") and current and current[0] <= address < current[1]:
            return set(line.split()[1:])
    raise AssertionError("mapping not found in /proc/self/smaps")


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc")
def test_mapping_is_excluded_from_core_dumps_and_locked() -> None:
    secret = SecretBytes.from_bytes(KEY)
    flags = _vm_flags(secret._address)
    assert "dd" in flags  # MADV_DONTDUMP
    assert secret.is_locked == ("lo" in flags)
    if os.geteuid() == 0:
        assert secret.is_locked


class _RefusingLibc:
    """Stands in for libc: mlock fails with EPERM, like RLIMIT_MEMLOCK = 0."""

    def __init__(self) -> None:
        self.munlocked = 0

    def mlock(self, address: int, length: int) -> int:
        ctypes.set_errno(errno.EPERM)
        return -1

    def munlock(self, address: int, length: int) -> int:  # pragma: no cover - must not run
        self.munlocked += 1
        return 0


def test_refused_mlock_degrades_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _RefusingLibc()
    monkeypatch.setattr(secret_module, "_LIBC", fake)
    monkeypatch.setattr(secret_module, "_warned_not_locked", False)
    with capture_logs() as logs:
        secrets = [SecretBytes.random(32) for _ in range(3)]  # no getrandom: /dev/urandom
        copied = SecretBytes.from_bytes(KEY)
    warnings = [entry for entry in logs if entry["event"] == "secret_memory_not_locked"]
    assert len(warnings) == 1
    assert warnings[0]["log_level"] == "warning"
    assert warnings[0]["size"] == 32
    assert warnings[0]["errno"] == "EPERM"
    assert not any(s.is_locked for s in secrets)
    assert not secrets[0].equals(secrets[1])
    assert copied.equals(KEY)
    for secret in [*secrets, copied]:
        secret.wipe()
    assert fake.munlocked == 0


_RLIMIT_SCRIPT = textwrap.dedent(
    """
    import json, os, resource, sys
    from structlog.testing import capture_logs
    from enclave_keys.crypto.secret import SecretBytes

    resource.setrlimit(resource.RLIMIT_MEMLOCK, (0, 0))
    if os.geteuid() == 0:  # root has CAP_IPC_LOCK, which ignores the limit: drop it
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
        except OSError as exc:
            print(json.dumps({"skip": str(exc)}))
            sys.exit(0)
    with capture_logs() as logs:
        secrets = [SecretBytes.random(32) for _ in range(3)]
        copied = SecretBytes.from_buffer(bytearray(b"k" * 32))
        works = copied.equals(b"k" * 32) and not secrets[0].equals(secrets[1])
        locked = [s.is_locked for s in [*secrets, copied]]
        for s in [*secrets, copied]:
            s.wipe()
    print(json.dumps({"logs": logs, "works": works, "locked": locked}))
    """
)


def test_rlimit_memlock_zero_degrades_with_exactly_one_structured_warning() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", _RLIMIT_SCRIPT],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(f"cannot drop root privileges: {result['skip']}")
    warnings = [e for e in result["logs"] if e["event"] == "secret_memory_not_locked"]
    assert len(warnings) == 1
    assert warnings[0]["size"] == 32
    assert warnings[0]["errno"] in {"EPERM", "ENOMEM"}
    assert result["works"] is True
    assert result["locked"] == [False] * 4
    assert "k" * 32 not in done.stdout + done.stderr
