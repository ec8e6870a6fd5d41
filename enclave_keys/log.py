"""Structured logging set-up: structlog with a processor that never lets bytes through.

Library modules log with ``structlog.get_logger(__name__)`` and event-style names
(``round_key_created``) with ids as fields. Key bytes must never be logged; as a second
line of defence :func:`redact_bytes` replaces every bytes-like field value with its
length, whatever a caller passed, however deep in lists, tuples, sets and maps.
:func:`configure_logging` installs it for applications that have no structlog
configuration of their own; an application that configures structlog itself should put
:func:`redact_bytes` after every processor that adds fields (``merge_contextvars``) and
before its renderer.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

import structlog

_BYTES_LIKE = (bytes, bytearray, memoryview)
_CONTAINERS = (list, tuple, set, frozenset, Mapping)
_MAX_DEPTH = 8
"""Nesting below which a container is not looked into: it is replaced whole."""
_MAX_ITEMS = 10_000
"""Values looked at per field: beyond them, containers are replaced whole (a log call
must stay cheap whatever it is given)."""


def redact_bytes(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: replace every bytes-like value, at any depth of lists,
    tuples, sets and maps (keys too), with its length. A container nested deeper than
    :data:`_MAX_DEPTH`, met again inside itself, or past :data:`_MAX_ITEMS` values is
    replaced whole."""
    for name, value in list(event_dict.items()):
        if isinstance(value, _BYTES_LIKE):
            event_dict[name] = f"<{len(value)} bytes redacted>"
        elif isinstance(value, _CONTAINERS):  # most fields are neither: no walk for them
            redacted = _Redactor().redacted(value, 0)
            if redacted is not value:
                event_dict[name] = redacted
    return event_dict


class _Redactor:
    """One field's walk: the containers on the current path, and a budget of values."""

    __slots__ = ("_budget", "_path")

    def __init__(self) -> None:
        self._path: set[int] = set()
        self._budget = _MAX_ITEMS

    def redacted(self, value: object, depth: int) -> object:
        """``value`` with its bytes redacted; ``value`` itself when it holds none."""
        if isinstance(value, _BYTES_LIKE):
            return f"<{len(value)} bytes redacted>"
        if not isinstance(value, _CONTAINERS):
            return value
        self._budget -= 1
        if depth >= _MAX_DEPTH or self._budget < 0 or id(value) in self._path:
            return f"<{type(value).__name__} not looked into: redacted>"
        self._path.add(id(value))
        try:
            if isinstance(value, Mapping):
                return self._map(value, depth)
            items = [self.redacted(item, depth + 1) for item in value]
        finally:
            self._path.discard(id(value))
        if all(new is old for new, old in zip(items, value, strict=True)):
            return value
        return items

    def _map(self, value: Mapping[Any, Any], depth: int) -> object:
        """A map with its bytes redacted: keys that are not bytes are kept as they are, a
        bytes key becomes its length (made unique, so no entry is lost)."""
        out: dict[Any, object] = {}
        changed = False
        for key, item in value.items():
            new = self.redacted(item, depth + 1)
            if isinstance(key, _BYTES_LIKE):
                label = f"<{len(key)} bytes redacted>"
                key, n = label, 1
                while key in out or key in value:
                    n += 1
                    key = f"{label} #{n}"
                changed = True
            changed = changed or new is not item
            out[key] = new
        return out if changed else value


CACHE_LOGGERS_DEFAULT = True
"""Whether :func:`configure_logging` caches loggers unless told otherwise (a test suite
that runs the command line in-process and then captures logs turns it off)."""


def configure_logging(
    *, json: bool = False, level: int = logging.INFO, cache: bool | None = None
) -> None:
    """Configure structlog for a process: redaction first, then key/value or JSON lines.

    ``cache`` (default :data:`CACHE_LOGGERS_DEFAULT`) makes each module's logger bind once,
    on first use, as structlog recommends in production: an uncached logger is rebuilt on
    every call, which costs a node several microseconds per log line even when the line is
    filtered out. A cached logger keeps the configuration it first saw, so a process that
    reconfigures structlog later must pass ``cache=False``.
    """
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,  # before redaction: bound fields too
            redact_bytes,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=CACHE_LOGGERS_DEFAULT if cache is None else cache,
    )
