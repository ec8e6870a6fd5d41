"""Structured logging set-up: structlog with a processor that never lets bytes through.

Library modules log with ``structlog.get_logger(__name__)`` and event-style names
(``round_key_created``) with ids as fields. Key bytes must never be logged; as a second
line of defence :func:`redact_bytes` replaces every bytes-like field value with its
length, whatever a caller passed. :func:`configure_logging` installs it for applications
that have no structlog configuration of their own; an application that configures
structlog itself should put :func:`redact_bytes` first in its processor chain.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_BYTES_LIKE = (bytes, bytearray, memoryview)


def redact_bytes(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: replace bytes-like values (at top level and one level down)."""
    for name, value in list(event_dict.items()):
        if isinstance(value, _BYTES_LIKE):
            event_dict[name] = f"<{len(value)} bytes redacted>"
        elif isinstance(value, (list, tuple)) and any(isinstance(v, _BYTES_LIKE) for v in value):
            event_dict[name] = [
                f"<{len(v)} bytes redacted>" if isinstance(v, _BYTES_LIKE) else v for v in value
            ]
    return event_dict


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
            redact_bytes,
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=CACHE_LOGGERS_DEFAULT if cache is None else cache,
    )
