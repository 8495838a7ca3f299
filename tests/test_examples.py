"""The shipped examples stay valid and runnable."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from heartbeat_consumer.cli import main

from .conftest import ROOT

EXAMPLES = sorted((ROOT / "examples").glob("*.heartbeat.json"))
PLUGIN = str(ROOT / "examples/my_handlers.py")


def test_there_are_examples() -> None:
    assert {p.name for p in EXAMPLES} >= {"cack.heartbeat.json", "plugin.heartbeat.json"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_validates(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(path), "--handlers", PLUGIN]) == 0, capsys.readouterr().err


def test_plugin_example_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(ROOT / "examples/plugin.heartbeat.json")
    state = str(tmp_path / "s.json")
    # 02:00 Berlin: Q1 of the day, outside office hours.
    args = ["run-once", config, "--handlers", PLUGIN, "--state", state]
    assert main([*args, "--at", "2026-06-01T00:00:10Z"]) == 0
    first = [orjson.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["check"], r["status"]) for r in first] == [("disk", "success"), ("load", "success")]
    assert first[0]["result"]["path"] == "/" and 0 <= first[0]["result"]["used_percent"] <= 100
    assert main([*args, "--at", "2026-06-01T00:01:10Z"]) == 0
    second = [orjson.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["check"] for r in second] == ["night_cleanup"], "office_hours waits for 09:00"
