"""The package's modules import only downwards, as DESIGN.md's table says."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "proxy"

ALLOWED = {
    "__main__": {"cli"},
    "__init__": set(),
    "cli": {"app", "config", "errors", "log", "demo", "tokens", "store"},
    "demo": {"app", "config"},
    "access": {"errors"},
    "app": {
        "access", "admin", "forward", "fast_client", "session_client", "upstream", "server", "listener",
        "tokens", "grants", "store", "config", "log", "metrics", "errors",
    },
    "server": {"errors"},
    "listener": set(),
    "admin": {"tokens", "metrics"},
    "forward": {"upstream", "tokens", "headers", "body", "server", "errors", "log", "metrics"},
    "fast_client": {"upstream", "errors"},
    "session_client": {"upstream", "headers", "errors"},
    "upstream": {"body"},
    "body": {"errors"},
    "headers": set(),
    "tokens": {"grants", "store", "errors", "log", "metrics"},
    "grants": {"errors"},
    "store": set(),
    "config": {"errors"},
    "errors": set(),
    "log": set(),
    "metrics": set(),
}


def local_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("proxy."):
            found.add(node.module.split(".")[1])
    return found


def test_layout_every_module_is_known() -> None:
    """Every module in proxy/ has a row in the import table."""
    assert {p.stem for p in PACKAGE.glob("*.py")} <= set(ALLOWED)


def test_layout_imports_point_downwards() -> None:
    """No module imports one above it."""
    wrong = {
        path.stem: sorted(local_imports(path) - ALLOWED[path.stem])
        for path in PACKAGE.glob("*.py")
        if local_imports(path) - ALLOWED.get(path.stem, set())
    }
    assert wrong == {}
