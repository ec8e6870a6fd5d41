"""Scratch directories on the real disk (durability is part of what is measured)."""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["Workdir"]


class Workdir:
    """Hands out fresh, numbered subdirectories of one base directory."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self._numbers = itertools.count()

    def fresh(self, label: str) -> Path:
        path = self.base / f"{label}-{next(self._numbers)}"
        shutil.rmtree(path, ignore_errors=True)
        return path

    @contextmanager
    def scratch(self, label: str) -> Iterator[Path]:
        """A fresh directory, removed when the block ends."""
        path = self.fresh(label)
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)
