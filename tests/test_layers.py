"""The one-way arrows of the design hold in the imports: checked on the source, without importing it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "harness"


def imported_modules(folder: Path) -> dict[str, set[str]]:
    """Every harness module a package's files import (top level and inside functions)."""
    found: dict[str, set[str]] = {}
    for path in sorted(folder.rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        found[str(path.relative_to(PACKAGE))] = {n for n in names if n.startswith("harness.")}
    return found


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("trace", ("harness.runtime", "harness.models", "harness.run")),  # replay needs no model
        ("store", ("harness.cache",)),  # the store moves bytes; policies are the cache's
        ("cache", ("harness.store", "harness.runtime")),  # policies never touch bytes
    ],
)
def test_package_does_not_import(package, forbidden):
    for path, names in imported_modules(PACKAGE / package).items():
        bad = sorted(n for n in names if n.startswith(forbidden))
        assert not bad, f"{path} imports {bad}"
