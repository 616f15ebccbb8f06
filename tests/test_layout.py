"""The package's layers import only downwards, as ../shared/DESIGN.md's table says (import-linter holds it)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_layout_import_contracts_hold() -> None:
    """`lint-imports` keeps every contract in pyproject.toml: layers point down, the core stays pure."""
    lint = Path(sys.executable).parent / "lint-imports"
    done = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def test_layout_every_module_is_in_a_layer() -> None:
    """Every module sits in a sub-package that a contract names (besides the package's own entry points)."""
    top_level = {p.name for p in (ROOT / "proxy").glob("*.py")}
    assert top_level == {"__init__.py", "__main__.py"}


def _tests_imported_by(path: Path) -> set[str]:
    """The modules of tests/ that a test module may not import (other test modules, conftest) imported by `path`."""
    imported: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            package = "tests" if node.level else ""
            module = ".".join(part for part in (package, node.module) if part)
            imported.add(module)
            imported.update(f"{module}.{alias.name}" for alias in node.names if module == "tests")
    return {name for name in imported if name.split(".")[:1] == ["tests"] and _is_test_module(name)}


def _is_test_module(name: str) -> bool:
    """`tests.test_x` or `tests.conftest`: a module pytest collects, not one made to be imported."""
    parts = name.split(".")
    return len(parts) == 2 and (parts[1].startswith("test_") or parts[1] == "conftest")


def test_layout_no_test_module_imports_another() -> None:
    """Test modules share helpers through tests/helpers.py and tests/fakes/, never importing each other or conftest."""
    offenders = {
        path.name: sorted(imported)
        for path in sorted((ROOT / "tests").glob("*.py"))
        if (imported := _tests_imported_by(path))
    }
    assert offenders == {}
