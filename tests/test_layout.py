"""The package's layers import only downwards, as ../shared/DESIGN.md's table says (import-linter holds it)."""

from __future__ import annotations

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
