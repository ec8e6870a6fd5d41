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
from enclave_keys.crypto.secret import CHUNK_SIZE, SLOT_SIZE, SecretBytes
from enclave_keys.errors import InvalidKeyMaterial, SecretWiped
from tests.crypto.forking import in_forked_child

KEY = bytes(range(1, 33))
REPO = Path(__file__).resolve().parents[2]

SMALL = 32  # an arena slot
LARGE = 100  # more than SLOT_SIZE: a mapping of its own
KINDS = pytest.mark.parametrize("size", [SMALL, LARGE], ids=["arena-slot", "own-mapping"])


def key_of(size: int) -> bytes:
    return bytes(i % 255 + 1 for i in range(size))


@dataclass
class Released:
    """What a secret's memory held at the moment it was about to be given back."""

    raw_at_address: bytes
    home: object
    address: int
    slot: int


@pytest.fixture
def released(monkeypatch: pytest.MonkeyPatch) -> list[Released]:
    """Spy on the give-back step: read the memory (by address, via ctypes) just before it."""
    seen: list[Released] = []
    original = secret_module._release

    def spy(
        home: secret_module._Arena | mmap.mmap, address: int, length: int, slot: int, locked: bool
    ) -> None:
        seen.append(Released(ctypes.string_at(address, length), home, address, slot))
        original(home, address, length, slot, locked)

    monkeypatch.setattr(secret_module, "_release", spy)
    return seen


@pytest.fixture
def arena(monkeypatch: pytest.MonkeyPatch) -> secret_module._Arena:
    """A fresh, empty arena for this test (its secrets keep using it after the test)."""
    fresh = secret_module._Arena()
    monkeypatch.setattr(secret_module, "_ARENA", fresh)
    return fresh


def raw_memory(secret: SecretBytes) -> bytes:
    return ctypes.string_at(secret._address, len(secret))


def raw_slot(address: int) -> bytes:
    """All SLOT_SIZE bytes of an arena slot."""
    return ctypes.string_at(address, SLOT_SIZE)


def assert_given_back_zeroed(seen: Released, size: int) -> None:
    """Zero when given back; a slot returns to the free list, an own mapping is unmapped."""
    assert seen.raw_at_address == bytes(len(seen.raw_at_address))
    if size <= SLOT_SIZE:
        assert isinstance(seen.home, secret_module._Arena)
        assert len(seen.raw_at_address) == SLOT_SIZE  # the whole slot, not just `size`
        assert seen.slot in seen.home._free
    else:
        assert isinstance(seen.home, mmap.mmap)
        assert len(seen.raw_at_address) % mmap.PAGESIZE == 0
        assert seen.home.closed


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


@KINDS
def test_wipe_zeroes_the_memory_before_giving_it_back(released: list[Released], size: int) -> None:
    key = key_of(size)
    secret = SecretBytes.from_bytes(key)
    assert raw_memory(secret) == key  # the spy reads the right address
    secret.wipe()
    [seen] = released
    assert seen.address == secret._address
    assert_given_back_zeroed(seen, size)
    assert secret.is_wiped
    assert not secret.is_locked


@KINDS
def test_wipe_is_idempotent(released: list[Released], size: int) -> None:
    secret = SecretBytes.from_bytes(key_of(size))
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


@KINDS
def test_context_manager_wipes_on_exit_even_on_error(released: list[Released], size: int) -> None:
    with pytest.raises(RuntimeError), SecretBytes.from_bytes(key_of(size)) as secret:
        raise RuntimeError("boom")
    assert secret.is_wiped
    [seen] = released
    assert_given_back_zeroed(seen, size)


@KINDS
def test_garbage_collection_wipes(released: list[Released], size: int) -> None:
    gc.collect()  # finalise other tests' leftovers first: only this secret may show below
    released.clear()
    secret = SecretBytes.from_bytes(key_of(size))
    address = secret._address
    del secret
    gc.collect()
    [seen] = [r for r in released if r.address == address]
    assert_given_back_zeroed(seen, size)


@KINDS
def test_wipe_during_a_borrow_zeroes_at_once_and_gives_back_when_it_ends(
    released: list[Released], size: int
) -> None:
    secret = SecretBytes.from_bytes(key_of(size))
    with secret.borrow() as view:
        secret.wipe()
        assert bytes(view) == bytes(size)
        if size <= SLOT_SIZE:
            assert raw_slot(secret._address) == bytes(SLOT_SIZE)
        assert released == []
    [seen] = released
    assert_given_back_zeroed(seen, size)


@KINDS
def test_nested_borrows_the_last_one_to_end_gives_back(released: list[Released], size: int) -> None:
    secret = SecretBytes.from_bytes(key_of(size))
    with secret.borrow():
        with secret.borrow():
            secret.wipe()
        assert released == []
    [seen] = released
    assert_given_back_zeroed(seen, size)


@KINDS
def test_a_failing_writer_wipes_the_secret(released: list[Released], size: int) -> None:
    def half_then_fail(view: memoryview) -> None:
        view[: size // 2] = key_of(size)[: size // 2]
        raise RuntimeError("writer failed")

    with pytest.raises(RuntimeError):
        SecretBytes._filled_by(size, half_then_fail)
    [seen] = released
    assert_given_back_zeroed(seen, size)


@KINDS
def test_concurrent_wipes_release_exactly_once(released: list[Released], size: int) -> None:
    secret = SecretBytes.from_bytes(key_of(size))
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


# --- the arena ------------------------------------------------------------------------


def test_small_secrets_share_a_chunk_and_large_ones_get_their_own_mapping(
    arena: secret_module._Arena,
) -> None:
    small = [SecretBytes.from_bytes(key_of(n)) for n in (0, 1, 32, SLOT_SIZE)]
    large = SecretBytes.from_bytes(key_of(SLOT_SIZE + 1))
    [chunk] = arena._chunks
    offsets = [s._address - chunk.address for s in small]
    assert offsets == [0, SLOT_SIZE, 2 * SLOT_SIZE, 3 * SLOT_SIZE]
    assert all(s._mapping is None and s._arena is arena for s in small)
    assert large._arena is None
    assert large._mapping is not None
    assert not chunk.address <= large._address < chunk.address + CHUNK_SIZE
    for secret in small:
        assert raw_memory(secret) == key_of(len(secret))


def test_a_new_chunk_only_when_the_last_is_full(arena: secret_module._Arena) -> None:
    per_chunk = CHUNK_SIZE // SLOT_SIZE
    secrets = [SecretBytes._allocate(16) for _ in range(per_chunk)]
    assert len(arena._chunks) == 1
    secrets.append(SecretBytes._allocate(16))
    assert len(arena._chunks) == 2
    assert secrets[-1]._address == arena._chunks[1].address
    assert len({s._address for s in secrets}) == len(secrets)


def test_wipe_zeroes_the_whole_slot_and_neighbours_are_untouched(
    arena: secret_module._Arena,
) -> None:
    before, secret, after = (SecretBytes.from_bytes(key_of(SLOT_SIZE)) for _ in range(3))
    small = SecretBytes.from_bytes(b"\x01" * 8)
    # junk past the secret's 8 bytes, inside its slot: the wipe must zero it too
    ctypes.memset(small._address + 8, 0xAB, SLOT_SIZE - 8)
    small.wipe()
    assert raw_slot(small._address) == bytes(SLOT_SIZE)
    secret.wipe()
    assert raw_slot(secret._address) == bytes(SLOT_SIZE)
    assert raw_memory(before) == raw_memory(after) == key_of(SLOT_SIZE)


def test_a_freed_slot_is_zero_when_reused(arena: secret_module._Arena) -> None:
    first = SecretBytes.from_bytes(key_of(SLOT_SIZE))
    address = first._address
    first.wipe()
    assert arena._free == [first._slot]
    again = SecretBytes._allocate(SMALL)
    assert again._address == address  # the free list is last in, first out
    assert raw_slot(address) == bytes(SLOT_SIZE)
    with again.borrow() as view:
        assert bytes(view) == bytes(SMALL)
    assert arena._free == []


def test_a_view_kept_past_its_borrow_retires_the_slot(
    arena: secret_module._Arena, released: list[Released]
) -> None:
    secret = SecretBytes.from_bytes(KEY)
    with secret.borrow() as view:
        kept = view[:]  # misuse: a slice outlives the borrow
    secret.wipe()
    assert bytes(kept) == bytes(32)  # zeroed, as an own mapping would be
    assert released == []  # never given back: no other secret can land under `kept`
    assert arena._free == []
    assert SecretBytes._allocate(SMALL)._address != secret._address


def test_a_view_released_in_time_does_not_retire_the_slot(
    arena: secret_module._Arena, released: list[Released]
) -> None:
    secret = SecretBytes.from_bytes(KEY)
    with secret.borrow() as view:
        bytes(view[:4])  # a temporary slice, gone before the borrow ends
    secret.wipe()
    assert len(released) == 1
    assert arena._free == [secret._slot]


def test_concurrent_allocation_and_wiping_keep_secrets_apart(
    arena: secret_module._Arena,
) -> None:
    errors: list[BaseException] = []
    kept: list[tuple[SecretBytes, bytes]] = []
    barrier = threading.Barrier(8)

    def churn(seed: int) -> None:
        rng = random.Random(seed)
        try:
            barrier.wait(timeout=10)
            for _ in range(300):
                value = rng.randbytes(rng.randint(1, SLOT_SIZE))
                secret = SecretBytes.from_bytes(value)
                if rng.random() < 0.3:
                    kept.append((secret, value))
                else:
                    assert secret.equals(value)
                    secret.wipe()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=churn, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    assert len({secret._address for secret, _ in kept}) == len(kept)
    for secret, value in kept:
        assert secret.equals(value)
    assert len(arena._free) + len(kept) == arena._next
    assert not set(arena._free) & {secret._slot for secret, _ in kept}


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
@KINDS
def test_memory_is_excluded_from_core_dumps_and_locked(size: int) -> None:
    secret = SecretBytes.from_bytes(key_of(size))
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


def test_refused_mlock_degrades_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, arena: secret_module._Arena
) -> None:
    fake = _RefusingLibc()
    monkeypatch.setattr(secret_module, "_LIBC", fake)
    monkeypatch.setattr(secret_module, "_warned_not_locked", False)
    with capture_logs() as logs:
        secrets = [SecretBytes.random(32) for _ in range(3)]  # no getrandom: /dev/urandom
        copied = SecretBytes.from_bytes(KEY)
        large = SecretBytes.from_bytes(key_of(LARGE))
        # a second chunk is refused too, without a second warning
        filler = [SecretBytes._allocate(1) for _ in range(CHUNK_SIZE // SLOT_SIZE)]
    assert len(arena._chunks) == 2
    warnings = [entry for entry in logs if entry["event"] == "secret_memory_not_locked"]
    assert len(warnings) == 1
    assert warnings[0]["log_level"] == "warning"
    assert warnings[0]["size"] == 32
    assert warnings[0]["mapped"] == CHUNK_SIZE
    assert warnings[0]["errno"] == "EPERM"
    assert not any(s.is_locked for s in [*secrets, copied, large, *filler])
    assert not secrets[0].equals(secrets[1])
    assert copied.equals(KEY)
    assert large.equals(key_of(LARGE))
    for secret in [*secrets, copied, large, *filler]:
        secret.wipe()
    assert fake.munlocked == 0


_DROP_ROOT = textwrap.dedent(
    """
    if os.geteuid() == 0:  # root has CAP_IPC_LOCK, which ignores the limit: drop it
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
        except OSError as exc:
            print(json.dumps({"skip": str(exc)}))
            sys.exit(0)
    """
)

_RLIMIT_SCRIPT = (
    textwrap.dedent(
        """
    import json, os, resource, sys
    from structlog.testing import capture_logs
    from enclave_keys.crypto.secret import SecretBytes

    resource.setrlimit(resource.RLIMIT_MEMLOCK, (0, 0))
    """
    )
    + _DROP_ROOT
    + textwrap.dedent(
        """
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
)


def _run_script(script: str) -> tuple[dict[str, object], str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert isinstance(result, dict)
    if "skip" in result:
        pytest.skip(f"cannot run the check: {result['skip']}")
    return result, done.stdout + done.stderr


def test_rlimit_memlock_zero_degrades_with_exactly_one_structured_warning() -> None:
    result, output = _run_script(_RLIMIT_SCRIPT)
    logs = result["logs"]
    assert isinstance(logs, list)
    warnings = [e for e in logs if e["event"] == "secret_memory_not_locked"]
    assert len(warnings) == 1
    assert warnings[0]["size"] == 32
    assert warnings[0]["errno"] in {"EPERM", "ENOMEM"}
    assert result["works"] is True
    assert result["locked"] == [False] * 4
    assert "k" * 32 not in output


_MANY_SCRIPT = (
    textwrap.dedent(
        """
    import json, os, resource, sys
    from pathlib import Path
    from structlog.testing import capture_logs
    from enclave_keys.crypto import secret as secret_module
    from enclave_keys.crypto.secret import SecretBytes

    LIMIT = 8 * 1024 * 1024  # the usual default RLIMIT_MEMLOCK
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if os.geteuid() != 0 and hard != resource.RLIM_INFINITY and hard < LIMIT:
        print(json.dumps({"skip": f"RLIMIT_MEMLOCK hard limit {hard} is below 8 MiB"}))
        sys.exit(0)
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (LIMIT, LIMIT))
    """
    )
    + _DROP_ROOT
    + textwrap.dedent(
        """
    with capture_logs() as logs:
        secrets = [SecretBytes.random(32) for _ in range(5000)]
    status = Path("/proc/self/status")
    vm_lck = None
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmLck:"):
                vm_lck = int(line.split()[1]) * 1024
    print(json.dumps({
        "logs": logs,
        "locked": sum(s.is_locked for s in secrets),
        "chunks": len(secret_module._ARENA._chunks),
        "vm_lck": vm_lck,
    }))
    """
    )
)


def test_many_small_secrets_are_all_locked_under_the_default_memlock_limit() -> None:
    # One page per key would lock only the first 2,048 under 8 MiB; slots fit 5,000 easily.
    result, _ = _run_script(_MANY_SCRIPT)
    assert result["logs"] == []
    assert result["locked"] == 5000
    assert result["chunks"] == -(-5000 * SLOT_SIZE // CHUNK_SIZE)  # 5 chunks, 320 KiB
    if result["vm_lck"] is not None:
        assert result["vm_lck"] == result["chunks"] * CHUNK_SIZE


# --- fork ---------------------------------------------------------------------------------


def inherited(secret: SecretBytes) -> dict[str, object]:
    """What a child sees of a secret made before the fork."""
    try:
        with secret.borrow():
            borrow = "allowed"
    except SecretWiped:
        borrow = "refused"
    return {
        "memory_is_zero": raw_memory(secret) == bytes(len(secret)),
        "borrow": borrow,
        "is_wiped": secret.is_wiped,
    }


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@KINDS
def test_a_forked_child_inherits_no_key_bytes(size: int) -> None:
    secret = SecretBytes.from_bytes(key_of(size))

    def probe() -> dict[str, object]:
        seen = inherited(secret)
        secret.wipe()  # takes no lock the child may not own, changes nothing in the parent
        with SecretBytes.random(size) as fresh, fresh.borrow() as view:
            seen["fresh"] = len(view) == size and raw_memory(fresh) == bytes(view)
        return seen

    assert in_forked_child(probe) == {
        "memory_is_zero": True,
        "borrow": "refused",
        "is_wiped": True,
        "fresh": True,
    }
    assert secret.equals(key_of(size))  # the parent's copy is untouched
    assert not secret.is_wiped


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_where_the_kernel_does_not_wipe_on_fork_the_child_zeroes_the_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(secret_module, "_MADV_WIPEONFORK", None)  # as on an old kernel
    secret = SecretBytes.from_bytes(key_of(SLOT_SIZE + 1))  # its own mapping, made now

    assert in_forked_child(lambda: inherited(secret)) == {
        "memory_is_zero": True,
        "borrow": "refused",
        "is_wiped": True,
    }
    assert secret.equals(key_of(SLOT_SIZE + 1))
    secret.wipe()
    assert not secret_module._UNWIPED_ON_FORK  # forgotten once unmapped


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc")
@KINDS
def test_memory_is_marked_wipe_on_fork(size: int) -> None:
    secret = SecretBytes.from_bytes(key_of(size))
    assert "wf" in _vm_flags(secret._address)  # VM_WIPEONFORK
