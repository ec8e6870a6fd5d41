from __future__ import annotations

import pytest

from enclave_keys.context import ContextRegistry, DependencyKey, RoundContext
from enclave_keys.errors import ContextClosed, MissingDependency
from enclave_keys.ids import RoundId


class Widget:
    def __init__(self, secret: str) -> None:
        self.secret = secret


WIDGET = DependencyKey("widget", Widget)
COUNT = DependencyKey("count", int)
R1 = RoundId("e3:1")


def test_put_get_require_are_typed_by_key() -> None:
    ctx = RoundContext(R1)
    assert ctx.get(WIDGET) is None
    w = Widget("s3cr3t")
    ctx.put(WIDGET, w)
    assert ctx.require(WIDGET) is w
    with pytest.raises(TypeError, match="widget"):
        ctx.put(WIDGET, "not a widget")  # type: ignore[misc]


def test_missing_dependency_is_an_error_not_a_none() -> None:
    with pytest.raises(MissingDependency, match="e3:1 has no widget"):
        RoundContext(R1).require(WIDGET)


def test_snapshot_lists_names_never_values() -> None:
    reg = ContextRegistry()
    reg.open(R1).put(WIDGET, Widget("s3cr3t"))
    reg.open(RoundId("e3:2")).put(COUNT, 3)
    snap = reg.snapshot()
    assert snap == {"e3:1": ("widget",), "e3:2": ("count",)}
    assert "s3cr3t" not in repr(snap)
    assert "s3cr3t" not in repr(reg.open(R1))


def test_open_is_idempotent_and_close_tears_down() -> None:
    reg = ContextRegistry()
    ctx = reg.open(R1)
    assert reg.open(R1) is ctx
    ctx.put(COUNT, 1)
    assert reg.close(R1) is ctx
    assert ctx.closed
    assert ctx.get(COUNT) is None
    assert reg.get(R1) is None
    assert reg.close(R1) is None
    with pytest.raises(ContextClosed):
        ctx.put(COUNT, 2)
    with pytest.raises(ContextClosed):
        ctx.require(COUNT)
    assert len(reg) == 0
