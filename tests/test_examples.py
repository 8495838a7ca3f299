"""The shipped examples stay valid and runnable."""

from __future__ import annotations

import asyncio
import sys
import uuid
from pathlib import Path

import orjson
import pytest

from heartbeat_consumer.cli import main

from .broker import Bus, watching
from .conftest import ROOT
from .helpers import Clock, envelope, until

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
    assert first[0]["result"]["path"] == "/"
    assert 0 <= first[0]["result"]["used_percent"] <= 100
    assert main([*args, "--at", "2026-06-01T00:01:10Z"]) == 0
    second = [orjson.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["check"] for r in second] == ["night_cleanup"], "office_hours waits for 09:00"


async def test_alert_subscriber_prints_and_forwards_a_monitor_alert(
    bus: Bus, tmp_path: Path
) -> None:
    """examples/alert_subscriber.py against a real monitor's stale alert: printed, and
    POSTed to a webhook (a local server here), then acknowledged."""
    received: list[bytes] = []

    async def webhook(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        received.append(await reader.readexactly(length))
        writer.write(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(webhook, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    queue = f"test.alerts.{uuid.uuid4().hex[:8]}"
    bus.queues.add(queue)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "examples/alert_subscriber.py"),
        "--rabbit-url", bus.url, "--exchange", bus.exchange_name, "--queue", queue,
        "--webhook", f"http://127.0.0.1:{port}/hook",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert line.startswith(b"waiting for alerts on " + queue.encode())
        # An unreadable alert and one whose payload names another agent than its key.
        await bus.publish("heartbeat.x._alert.stale", b"not json")
        forged = {"agent": "db", "kind": "stale", "severity": "error", "detail": "forged"}
        await bus.publish("heartbeat.x._alert.stale", envelope("heartbeat.alert", forged))
        for _ in range(2):
            line = await asyncio.wait_for(proc.stdout.readline(), 20)
            assert line.startswith(b"skipped an alert that is not one"), line
        clock = Clock()
        async with watching(bus, tmp_path / "m.json", clock) as monitor:
            online = envelope("heartbeat.status", {"agent": "db", "status": "online"})
            await bus.publish("heartbeat.db._status.online", online)
            await until(lambda: "db" in monitor.state.agents)
            clock.offset = 11 * 60_000  # past the default stale threshold, 10 min
            assert [a.kind for a in await monitor.evaluate_once()] == ["stale"]
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert line.decode().split()[:3] == ["WARNING", "stale", "db:"]
        await until(lambda: len(received) == 1)
        assert orjson.loads(received[0])["payload"]["incident"] == "db:stale:*"
    finally:
        proc.terminate()
        await proc.wait()
        server.close()
    assert await bus.count(queue) == 0  # acknowledged after the webhook took it


BLOODBANK_EXAMPLES = sorted((ROOT / "examples/bloodbank").glob("*.json"))


@pytest.mark.parametrize("path", BLOODBANK_EXAMPLES, ids=lambda p: p.name)
def test_bloodbank_example_validates_and_converts(
    path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err
    assert "format bloodbank" in capsys.readouterr().out
    assert main(["convert", str(path)]) == 0
    converted = tmp_path / "v1.json"
    converted.write_text(capsys.readouterr().out)
    assert main(["validate", "--strict", str(converted)]) == 0, capsys.readouterr().err
