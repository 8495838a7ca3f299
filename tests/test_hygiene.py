"""The test suite's own rules, checked by reading its files (no broker)."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def imported_test_modules(path: Path) -> list[str]:
    """The imports of a test module (``test_*``) in ``path``, anywhere in it, each as
    ``line N: <statement>``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            names = [node.module or "", *(alias.name for alias in node.names)]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        if any(part.startswith("test_") for name in names for part in name.split(".")):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_no_test_module_imports_another() -> None:
    """Helpers shared by several modules live in tests/helpers.py (tests/broker.py when
    they are about the broker), never in a test module another one imports."""
    offenders = {
        path.name: found
        for path in sorted(TESTS.glob("*.py"))
        if (found := imported_test_modules(path))
    }
    assert offenders == {}, "import tests/helpers.py or tests/broker.py instead"


def test_the_check_sees_every_way_of_importing_a_test_module(tmp_path: Path) -> None:
    t = "test_"  # spelt apart, so that a grep of tests/ for such imports finds none here
    sample = tmp_path / "sample.py"
    sample.write_text(
        f"from .{t}bus import tick\n"
        f"from . import {t}monitor\n"
        f"import tests.{t}faults\n"
        "def f():\n"
        f"    from .{t}observability import free_port\n"
        "from .helpers import tick\n"
        "from .broker import take\n"
        "from .conftest import ROOT\n"
    )
    assert imported_test_modules(sample) == [
        f"line 1: from .{t}bus import tick",
        f"line 2: from . import {t}monitor",
        f"line 3: import tests.{t}faults",
        f"line 5: from .{t}observability import free_port",
    ]
