"""The package's floors: a module imports only from its own floor or the floors below it.

A reader finds each part where its name says, and a change to a higher floor (the app, a benchmark) can never
break a lower one (the backbone, adaptation) it does not import. Lazy imports inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "medmeta_plugin"

# Lowest first; one floor may hold several packages that do not import each other's floors above.
FLOORS: tuple[tuple[str, ...], ...] = (
    ("names", "paths", "atomic", "caching", "transforms", "io", "registration"),
    ("networks",),
    ("episodes",),
    ("adapt",),
    ("meta",),
    ("app",),
    ("benchmarks",),
    ("stack",),
    ("cli",),
)
FLOOR = {part: level for level, parts in enumerate(FLOORS) for part in parts}


def _part(path: Path) -> str:
    """The top-level part of the package a module belongs to (``adapt`` for ``adapt/atlas.py``)."""
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imported_parts(path: Path) -> set[str]:
    parts = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            bits = name.split(".")
            if bits[0] == "medmeta_plugin" and len(bits) > 1 and bits[1] in FLOOR:
                parts.add(bits[1])
    return parts


def test_every_part_of_the_package_has_a_floor() -> None:
    parts = {_part(p) for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE or p.name != "__init__.py"}
    assert parts == set(FLOOR), "a new part of the package needs its floor in FLOORS"


def test_no_import_reaches_a_higher_floor() -> None:
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent == PACKAGE and path.name == "__init__.py":
            continue
        part = _part(path)
        for other in _imported_parts(path):
            if FLOOR[other] > FLOOR[part]:
                upward.append(f"{path.relative_to(PACKAGE)} ({part}, floor {FLOOR[part]}) imports {other}")
    assert not upward, "imports from a lower floor to a higher one:\n" + "\n".join(upward)
