"""The layers are subpackages that import only downwards, and the broker-free commands
never load the broker's libraries."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

PACKAGE = ROOT / "heartbeat_consumer"
LAYERS = ("core", "handlers", "runtime", "ops", "bus", "monitor", "cli")
"""Bottom first: a module may import its own layer and the ones before it."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module ``path`` imports, absolute, with its line (function-level ones too)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
    return found


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "heartbeat_consumer" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in LAYERS else None


def test_every_module_is_in_a_layer() -> None:
    loose = [p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    assert loose == [], "modules outside the layers"
    assert sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__") == (
        sorted([*LAYERS, "schemas"])
    )


def test_layers_import_only_downwards() -> None:
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = _layer(_module_name(path))
        if source is None:  # the package itself and __main__ sit on top
            continue
        for line, target in _imports(path):
            if target == "heartbeat_consumer":
                violations.append(f"{path.relative_to(ROOT)}:{line} imports the package itself")
                continue
            layer = _layer(target)
            if layer is not None and LAYERS.index(layer) > LAYERS.index(source):
                violations.append(f"{path.relative_to(ROOT)}:{line} ({source}) imports {target}")
    assert violations == []


HEAVY = ("faststream", "aio_pika", "aiormq", "pamqp", "prometheus_client", "aiohttp")


def _loaded_after(code: str) -> list[str]:
    probe = f"{code}\nimport sys\nprint(' '.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    return [m for m in out.split() if m.split(".")[0] in HEAVY]


def test_the_core_loads_no_broker_or_http_library() -> None:
    assert _loaded_after("import heartbeat_consumer.core.schedule") == []
    assert _loaded_after("import heartbeat_consumer") == []
    assert _loaded_after("from heartbeat_consumer import register_handler, CheckConfig") == []


@pytest.mark.parametrize(
    "argv",
    [
        ["validate", "examples/cack.heartbeat.json"],
        ["plan", "examples/cack.heartbeat.json", "--state", "{tmp}/s.json"],
        [
            "simulate",
            "examples/cack.heartbeat.json",
            "--from",
            "2026-01-01",
            "--to",
            "2026-01-01T01:00",
        ],
        ["run-once", "examples/cack.heartbeat.json", "--state", "{tmp}/s.json"],
        ["convert", "examples/bloodbank/eng.json"],
    ],
    ids=lambda argv: argv[0],
)
def test_broker_free_commands_load_no_broker_library(argv: list[str], tmp_path: Path) -> None:
    args = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code = (
        "import contextlib, io, sys\n"
        "from heartbeat_consumer.cli import main\n"
        "out, err = io.StringIO(), io.StringIO()\n"
        "with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):\n"
        f"    code = main({args!r})\n"
        "assert code == 0, code"
    )
    assert _loaded_after(code) == []
