"""The peer: the ``eventsourcing`` library, SQLite persistence, its AES-GCM cipher on.

The same lifecycle events are mapped to one domain-event class (tag, round id, source
and fields; the keyshare ciphertext as hex, since its JSON transcoder has no bytes),
one aggregate per round. A batch is one ``EventStore.put``: one SQLite transaction,
which in the WAL mode the library sets, with SQLite's default ``synchronous=FULL``, is
flushed to disk on commit like an LMDB commit. Replay reads the application's
notification log in pages and maps every record back to a domain event (decrypt, JSON
decode), the counterpart of decoding our log.
"""

from __future__ import annotations

import importlib.util
import sqlite3
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Any, Final

from benchmarks.dataset import T0, Published
from enclave_keys.events import FrozenStrMap
from enclave_keys.ids import EventId, KekVersion, KeyId, RoundId

__all__ = ["AVAILABLE", "PeerLog"]

AVAILABLE: Final = importlib.util.find_spec("eventsourcing") is not None
_PAGE: Final = 1000
_NAMESPACE: Final = uuid.UUID("6f1c1f5e-8d1e-4e49-9a53-2f4ad0f3c0aa")


def _plain(value: object) -> object:
    """A field value as JSON can hold it."""
    if isinstance(value, KeyId | EventId):
        return value.raw.hex()
    if isinstance(value, RoundId):
        return value.value
    if isinstance(value, KekVersion):
        return value.number
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, FrozenStrMap):
        return value.to_dict()
    if isinstance(value, Enum):
        return value.value
    return value


def _fields_of(p: Published) -> dict[str, object]:
    return {spec.name: _plain(getattr(p.event, spec.name)) for spec in p.event.FIELDS}


@dataclass(frozen=True, slots=True)
class _Prepared:
    """What the peer's events are built from, made before the clock starts."""

    originator: uuid.UUID
    version: int
    tag: str
    source: str
    fields: dict[str, object]


class PeerLog:
    """An ``eventsourcing`` application over one SQLite file, cipher on."""

    def __init__(self, path: Path) -> None:
        from eventsourcing.application import Application
        from eventsourcing.cryptography import AESCipher

        path.mkdir(parents=True, exist_ok=True)
        self.db_file = path / "events.sqlite"
        env = {
            "PERSISTENCE_MODULE": "eventsourcing.sqlite",
            "SQLITE_DBNAME": str(self.db_file),
            "CIPHER_TOPIC": "eventsourcing.cryptography:AESCipher",
            "CIPHER_KEY": AESCipher.create_key(32),
        }
        self.app: Any = Application(env=env)
        self._event_class = _event_class()

    @staticmethod
    def prepare(events: Sequence[Published]) -> list[_Prepared]:
        versions: dict[str, int] = {}
        out = []
        for p in events:
            rid = p.event.round_id_or_none
            name = "" if rid is None else rid.value
            versions[name] = versions.get(name, 0) + 1
            out.append(
                _Prepared(
                    uuid.uuid5(_NAMESPACE, name),
                    versions[name],
                    p.event.TAG,
                    p.source,
                    _fields_of(p),
                )
            )
        return out

    def append(self, batch: Sequence[_Prepared]) -> None:
        """Build the domain events (the peer's stamping) and put them in one transaction."""
        make = self._event_class
        now = datetime.fromtimestamp(T0, UTC)
        self.app.events.put(
            [
                make(
                    originator_id=e.originator,
                    originator_version=e.version,
                    timestamp=now,
                    tag=e.tag,
                    source=e.source,
                    fields=e.fields,
                )
                for e in batch
            ]
        )

    def scan(self) -> int:
        """Read the notification log page by page, mapping each record to a domain event."""
        recorder = self.app.recorder
        to_domain: Callable[[Any], object] = self.app.mapper.to_domain_event
        count = 0
        start = 1
        while True:
            page = recorder.select_notifications(start=start, limit=_PAGE)
            for notification in page:
                to_domain(notification)
            count += len(page)
            if len(page) < _PAGE:
                return count
            start = page[-1].id + 1

    def synchronous(self) -> int:
        """SQLite's ``synchronous`` setting on a fresh connection (2 = FULL)."""
        with sqlite3.connect(self.db_file) as conn:
            value: int = conn.execute("PRAGMA synchronous").fetchone()[0]
        return value

    def close(self) -> None:
        self.app.close()


_EVENT_CLASS: list[type[Any]] = []


def _event_class() -> type[Any]:
    """The peer's domain-event class, defined once ``eventsourcing`` is known to be there."""
    if not _EVENT_CLASS:
        from eventsourcing.domain import DomainEvent

        class LoggedEvent(DomainEvent):
            tag: str
            source: str
            fields: dict[str, object]

        LoggedEvent.__module__ = __name__
        LoggedEvent.__qualname__ = "LoggedEvent"
        globals()["LoggedEvent"] = LoggedEvent
        _EVENT_CLASS.append(LoggedEvent)
    return _EVENT_CLASS[0]
