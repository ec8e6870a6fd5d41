"""Reading an operator secret for the CLI: from a prompt or a file descriptor, never argv.

A secret on the command line is visible to every user (``ps``, ``/proc/<pid>/cmdline``)
and lands in shell history, so the CLI takes passphrases, PINs and shares only through
:func:`read_secret`: ``--passphrase-fd 3 3<file`` style descriptors, or a hidden prompt.
"""

from __future__ import annotations

import getpass
import os
from typing import Final

from enclave_keys.errors import InvalidPassphrase

__all__ = ["MAX_SECRET_BYTES", "read_secret"]

MAX_SECRET_BYTES: Final = 64 * 1024


def _read_line(fd: int) -> bytes:
    """One line from ``fd``, byte by byte, so nothing past the newline is consumed.

    Reading stops at the first ``\\n`` (which is kept) or at end of file. The caller may
    read the next secret from the same descriptor (one share per line, for instance).
    """
    buffer = bytearray()
    try:
        while True:
            chunk = os.read(fd, 1)
            if not chunk:
                break
            buffer += chunk
            if chunk == b"\n":
                break
            if len(buffer) > MAX_SECRET_BYTES:
                raise InvalidPassphrase(f"the secret is longer than {MAX_SECRET_BYTES} bytes")
        return bytes(buffer)
    finally:
        buffer[:] = bytes(len(buffer))


def read_secret(prompt: str, *, fd: int | None = None) -> str:
    """A secret from file descriptor ``fd`` if given, else from a hidden ``getpass`` prompt.

    From ``fd``: one line, UTF-8 (else :class:`InvalidPassphrase`); exactly one trailing
    newline (``\\n`` or ``\\r\\n``) is stripped, nothing else. The descriptor is not closed.
    :class:`EOFError` if it is already at end of file. A descriptor that cannot be read
    raises the :class:`OSError` of ``os.read`` (errno and strerror only: no secret byte).
    ``prompt`` is used only for the interactive prompt. The returned ``str`` cannot be
    wiped: keep it short-lived.
    """
    if fd is None:
        return getpass.getpass(prompt)
    raw = _read_line(fd)
    if not raw:
        raise EOFError(f"file descriptor {fd} is at end of file: no secret to read")
    if raw.endswith(b"\r\n"):
        raw = raw[:-2]
    elif raw.endswith(b"\n"):
        raw = raw[:-1]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidPassphrase("the secret read from the file descriptor is not UTF-8") from None
