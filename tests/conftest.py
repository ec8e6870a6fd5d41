"""Fixtures shared by the whole suite."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog


@pytest.fixture(autouse=True)
def _isolated_structlog() -> Iterator[None]:
    """A test that configures structlog (e.g. by running a CLI) must not leak into others."""
    yield
    structlog.reset_defaults()
