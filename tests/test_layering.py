"""Imports point downwards only (design §4). A new module must be placed in LAYERS."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "enclave_keys"

# Lower number = lower layer. A module may import its own layer or lower ones.
LAYERS: dict[str, int] = {
    "enclave_keys": 0,  # the package __init__ re-exports vocabulary only
    "enclave_keys.errors": 0,
    "enclave_keys.ids": 0,
    "enclave_keys.clock": 0,
    "enclave_keys.log": 0,
    "enclave_keys.collector": 0,
    "enclave_keys.events": 1,
    "enclave_keys.codec": 1,
    "enclave_keys.crypto": 2,
    "enclave_keys.store": 3,
    "enclave_keys.bus": 4,
    "enclave_keys.router": 4,
    "enclave_keys.context": 4,
    "enclave_keys.handler": 4,
    "enclave_keys.runtime": 4,
    "enclave_keys.round_cipher": 4,
    "enclave_keys.keyshare": 4,
    "enclave_keys.reaper": 4,
    "enclave_keys.core_state": 4,
    "enclave_keys.master": 4,
    "enclave_keys.epochs": 4,
    "enclave_keys.node": 5,
    "enclave_keys.unseal": 5,
    "enclave_keys.snapshot": 5,
    "enclave_keys.replay": 5,  # pure projection of a log (simulations, replay, inspect)
    "enclave_keys.invariants": 5,
    "enclave_keys.inspect": 5,
    "enclave_keys.logfile": 5,
    "enclave_keys.cli": 6,
    "enclave_keys.cli_logs": 6,
    "enclave_keys.testing": 6,
    "enclave_keys.testing.fakes": 6,
    "enclave_keys.testing.statemachine": 6,
    "enclave_keys.testing.strategies": 6,
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _layer_of(module: str) -> int | None:
    """The layer of the longest LAYERS prefix that names ``module`` or a package of it."""
    best: tuple[int, int] | None = None
    for name, layer in LAYERS.items():
        covers = module == name or module.startswith(name + ".")
        if covers and name != "enclave_keys" and (best is None or len(name) > best[0]):
            best = (len(name), layer)
    if best is None:
        return 0 if module == "enclave_keys" else None
    return best[1]


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: _module_name(p))
def test_module_is_placed_and_imports_point_down(path: Path) -> None:
    importer = _module_name(path)
    own = _layer_of(importer)
    assert own is not None, f"{importer} is in no layer: add it to LAYERS"
    for imported in _imports(path):
        if imported == "cryptography" or imported.startswith("cryptography."):
            assert importer.startswith("enclave_keys.crypto"), (
                f"{importer} imports {imported}: only enclave_keys.crypto may"
            )
        if not imported.startswith("enclave_keys"):
            continue
        theirs = _layer_of(imported)
        assert theirs is not None, f"{imported} (imported by {importer}) is in no layer"
        assert theirs <= own, f"{importer} (layer {own}) imports {imported} (layer {theirs})"


def test_layer_checker_catches_an_upward_import() -> None:
    assert _layer_of("enclave_keys.crypto.aead") == 2
    assert _layer_of("enclave_keys.store.lmdb_store") == 3
    assert _layer_of("enclave_keys.nowhere") is None
