"""Helpers shared by several test modules, none of which needs the broker (those are in
tests/broker.py): config files, tick bodies, envelopes, the CLI as a subprocess,
clocks and waiting, HTTP and Prometheus samples, this process's memory."""

from __future__ import annotations

import asyncio
import socket
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from heartbeat_consumer.runtime.engine import wall_clock_ms

BIN = str(Path(sys.executable).with_name("heartbeat-consumer"))
"""The installed ``heartbeat-consumer`` script beside this interpreter."""


def write(tmp_path: Path, agent: str, checks: dict[str, Any]) -> Path:
    """A heartbeat.json for ``agent`` with ``checks``, in ``tmp_path``."""
    path = tmp_path / f"{agent}.heartbeat.json"
    path.write_bytes(orjson.dumps({"agent": agent, "checks": checks}))
    return path


def tick(at: datetime | None = None, **payload: Any) -> dict[str, Any]:
    """A system.heartbeat.tick envelope dated ``at`` (now by default)."""
    at = at or datetime.now(UTC)
    return {
        "event_id": f"t-{at.timestamp()}",
        "event_type": "system.heartbeat.tick",
        "timestamp": at.isoformat(),
        "version": "1.0.0",
        "source": {"host": "test", "type": "test", "app": "pytest"},
        "payload": payload,
    }


def now_ms() -> int:
    return int(time.time() * 1000)


def slot_tick(slot_ms: int, event_id: str | None = None) -> dict[str, Any]:
    """A tick for the slot starting at ``slot_ms`` (epoch ms)."""
    return {
        "event_id": event_id or f"tick-{slot_ms}",
        "event_type": "system.heartbeat.tick",
        "timestamp": slot_ms,
        "payload": {"epoch_ms": slot_ms},
    }


def envelope(event_type: str, payload: dict[str, Any], at_ms: int | None = None) -> bytes:
    """An event body of ``event_type`` dated ``at_ms`` (now by default)."""
    return orjson.dumps(
        {
            "event_id": str(uuid.uuid4()),
            "event_type": event_type,
            "timestamp": at_ms if at_ms is not None else wall_clock_ms(),
            "payload": payload,
        }
    )


async def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run ``heartbeat-consumer *args``; its exit code and output (stderr included)."""
    proc = await asyncio.create_subprocess_exec(
        BIN, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode()


class Clock:
    """Wall time plus an offset the test moves (the monitor's only clock)."""

    def __init__(self) -> None:
        self.offset = 0

    def __call__(self) -> int:
        return wall_clock_ms() + self.offset


async def until(condition: Callable[[], bool], within: float = 10.0) -> None:
    """Wait until ``condition()`` holds, failing after ``within`` seconds."""
    deadline = asyncio.get_running_loop().time() + within
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def http(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request to 127.0.0.1:``port``: status, headers and body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def sample(metrics_text: bytes, name: str, **labels: str) -> float | None:
    """The value of one Prometheus sample, or None when absent."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in metrics_text.decode().splitlines():
        if line.startswith("#") or " " not in line:
            continue
        series, value = line.rsplit(" ", 1)
        metric, _, rest = series.partition("{")
        found = ",".join(sorted(rest.rstrip("}").split(","))) if rest else ""
        if metric == name and found == want:
            return float(value)
    return None


def memory_mb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (the peak) of this process, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field}")


async def clear_of_the_minute_end(seconds: float) -> None:
    """Wait, if need be, so that the next ``seconds`` fall in one wall-clock minute (a
    test whose start-up run and later tick must share a one-minute slot)."""
    now = time.time()
    if now % 60 + seconds >= 60:
        await asyncio.sleep(60 - now % 60 + 0.5)
