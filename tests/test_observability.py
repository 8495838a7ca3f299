"""Health, metrics, systemd notifications and JSON logs, against a real RabbitMQ."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from heartbeat_consumer.bus.consumer import HeartbeatConsumer
from heartbeat_consumer.bus.fleet import Fleet
from heartbeat_consumer.bus.ticker import run_ticker
from heartbeat_consumer.ops.health import Health, probe_with_timeout
from heartbeat_consumer.ops.http import HealthServer
from heartbeat_consumer.ops.metrics import Metrics
from heartbeat_consumer.ops.sdnotify import notify, watchdog_interval_s
from heartbeat_consumer.ops.service import run_service

from .broker import Bus, take
from .conftest import ROOT
from .helpers import BIN, clear_of_the_minute_end, free_port, http, sample, tick, write

HOUR = 3_600_000


async def wait_for(predicate: Any, within: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def served(service: Any) -> AsyncIterator[asyncio.Event]:
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


# --- the consumer's /health and /metrics ---------------------------------------------------


async def test_health_and_metrics_of_a_consumer(bus: Bus, tmp_path: Path) -> None:
    agent = bus.agent()
    config = write(tmp_path, agent, {"c": {"cadenceMs": HOUR, "handler": "default"}})
    results = await bus.collector(f"heartbeat.{agent}.#")
    port = free_port()
    consumer = HeartbeatConsumer(agent, config, bus.url, bus.exchange_name, health_port=port)
    await clear_of_the_minute_end(15)  # the start-up run and tick() share a slot
    async with served(consumer):
        await take(results, 1)  # the start-up run

        async def healthy() -> bool:
            with contextlib.suppress(OSError):
                return (await http(port, "/health"))[0] == 200
            return False

        await wait_for(healthy)
        status, headers, body = await http(port, "/health")
        report = orjson.loads(body)
        assert headers["Content-Type"] == "application/json"
        assert report["status"] == "ok"
        assert report["connected"] is True
        assert report["queue"] == f"agent.{agent}.inbox"
        assert report["consumers"] == 1

        await bus.publish("system.heartbeat.tick", tick())  # this minute's slot: done
        later = datetime.now(UTC) + timedelta(minutes=1)
        await bus.publish("system.heartbeat.tick", tick(later))  # evaluated: nothing due
        await bus.publish(f"agent.{agent}.heartbeat.tick", b"{not json")
        await bus.publish(f"agent.{agent}.heartbeat.run", {"no": "envelope"})

        async def counted() -> bool:
            text = (await http(port, "/metrics"))[2]
            ticks = {
                outcome: sample(
                    text, "heartbeat_ticks_received_total", agent=agent, outcome=outcome
                )
                for outcome in ("evaluated", "duplicate")
            }
            return (
                ticks == {"evaluated": 1, "duplicate": 1}
                and sample(
                    text, "heartbeat_dead_lettered_total", agent=agent, reason="invalid_envelope"
                )
                == 1
            )

        await wait_for(counted)
        text = (await http(port, "/metrics"))[2]
        avoided = sample(
            text, "heartbeat_runs_avoided_total", agent=agent, check="c", reason="not-due"
        )
        assert avoided == 1  # the later tick found it not due
        status, headers, text = await http(port, "/metrics")
        assert status == 200
        assert headers["Content-Type"].startswith("text/plain")
        assert sample(text, "heartbeat_checks_run_total", agent=agent, check="c", status="success")
        assert sample(text, "heartbeat_dead_lettered_total", agent=agent, reason="malformed_json")
        assert sample(text, "heartbeat_handler_duration_seconds_count", agent=agent, check="c")
        assert sample(text, "heartbeat_config_valid", agent=agent) == 1
        assert sample(text, "heartbeat_last_success_timestamp_seconds", agent=agent, check="c")

        assert (await http(port, "/health", "HEAD"))[2] == b""
        assert (await http(port, "/nope"))[0] == 404
        assert (await http(port, "/health", "POST"))[0] == 405

        # Not a ping: with the broker up but the inbox gone, the consumer is unhealthy.
        await bus.channel.queue_delete(f"agent.{agent}.inbox")

        async def unhealthy() -> bool:
            return (await http(port, "/health"))[0] == 503

        await wait_for(unhealthy)
        report = orjson.loads((await http(port, "/health"))[2])
        assert report["connected"] is True
        assert "queue not usable" in report["error"]


async def test_config_errors_are_counted(bus: Bus, tmp_path: Path) -> None:
    agent = bus.agent()
    config = write(tmp_path, agent, {"c": {"cadenceMs": HOUR, "handler": "default"}})
    consumer = HeartbeatConsumer(agent, config, bus.url, bus.exchange_name)
    await consumer.start()
    try:
        config.write_text("{broken")
        await consumer.agent.evaluate_now(again=True)
        text = consumer.metrics.render()
        assert sample(text, "heartbeat_config_valid", agent=agent) == 0
        assert sample(text, "heartbeat_config_errors_total", agent=agent) == 1
    finally:
        await consumer.stop()


async def test_fleet_health_names_unhealthy_agents_and_forgets_removed_ones(
    bus: Bus, tmp_path: Path
) -> None:
    agents = [bus.agent("f") for _ in range(3)]
    for agent in agents:
        write(tmp_path, agent, {"c": {"cadenceMs": HOUR, "handler": "default"}})
    fleet = Fleet(tmp_path, bus.url, bus.exchange_name, rescan_s=0.2)
    async with served(fleet):
        await wait_for(lambda: _ok(fleet))
        health = await fleet.health()
        assert health.detail == {"agents": 3, "unhealthy": {}}
        assert sample(fleet.metrics.render(), "heartbeat_config_valid", agent=agents[0]) == 1

        await bus.channel.queue_delete(f"agent.{agents[1]}.inbox")
        health = await fleet.health()
        assert not health.ok
        assert health.connected
        assert list(health.detail["unhealthy"]) == [agents[1]]

        (tmp_path / f"{agents[0]}.heartbeat.json").unlink()

        async def forgotten() -> bool:
            return sample(fleet.metrics.render(), "heartbeat_config_valid", agent=agents[0]) is None

        await wait_for(forgotten)


async def _ok(service: Any) -> bool:
    health: Health = await service.health()
    return health.ok


async def test_ticker_health_and_metrics(bus: Bus) -> None:
    port = free_port()
    stop = asyncio.Event()
    task = asyncio.create_task(
        run_ticker(
            rabbit_url=bus.url,
            exchange_name=bus.exchange_name,
            every_ms=200,
            stop=stop,
            health_port=port,
        )
    )
    try:

        async def ticked() -> bool:
            with contextlib.suppress(OSError):
                text = (await http(port, "/metrics"))[2]
                return (sample(text, "heartbeat_ticks_published_total") or 0) >= 2
            return False

        await wait_for(ticked)
        status, _, body = await http(port, "/health")
        assert status == 200
        assert orjson.loads(body)["ticks_sent"] >= 2
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 10) >= 2


# --- the HTTP server and probes on their own -----------------------------------------------


async def test_probe_that_hangs_or_raises_is_unhealthy() -> None:
    async def hangs() -> Health:
        await asyncio.sleep(10)
        raise AssertionError

    async def raises() -> Health:
        raise RuntimeError("boom")

    slow = await probe_with_timeout(hangs, timeout_s=0.05)
    assert not slow.ok
    assert "over 0.05 s" in slow.detail["error"]
    broken = await probe_with_timeout(raises)
    assert not broken.ok
    assert "boom" in broken.detail["error"]


async def test_health_probe_is_cached_and_bad_requests_get_400() -> None:
    calls = 0

    async def probe() -> Health:
        nonlocal calls
        calls += 1
        return Health(True, True)

    server = HealthServer(probe, Metrics(), port=0, cache_s=60)
    await server.start()
    try:
        for _ in range(3):
            assert (await http(server.port, "/health"))[0] == 200
        assert calls == 1
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"garbage\r\n\r\n")
        status_line = (await reader.read()).split(b"\r\n", 1)[0]  # aiohttp's: HTTP/1.0
        assert status_line.split(b" ", 2)[1] == b"400", status_line
        writer.close()
    finally:
        await server.stop()


async def test_clients_that_never_read_cannot_exhaust_memory_or_hold_connections() -> None:
    """A status document of 16 MB asked for by 20 clients that never read: at most the
    in-flight budget waits in buffers (the rest get a small 503), /health still answers,
    and the stuck connections are dropped after the write timeout."""
    from .helpers import memory_mb

    big = b"x" * (16 * 1024 * 1024)

    async def document() -> tuple[int, str, bytes]:
        return 200, "application/json", big

    async def probe() -> Health:
        return Health(True, True)

    server = HealthServer(probe, Metrics(), port=0, routes={"/big": document})
    await server.start()
    clients = []
    try:
        Path("/proc/self/clear_refs").write_text("5")  # noqa: ASYNC240 (reset the peak RSS)
        before = memory_mb("VmRSS")
        for _ in range(20):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.transport.pause_reading()  # never read: the server's writes back up
            writer.write(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
            clients.append((reader, writer))
        await asyncio.sleep(1)
        grown = memory_mb("VmHWM") - before
        assert grown < 150, f"{grown:.0f} MB held for clients that do not read"
        status, _, body = await asyncio.wait_for(http(server.port, "/health"), 2)
        assert status == 200, body
        await asyncio.sleep(10)  # past the write timeout
        complete = 0
        for reader, writer in clients:
            writer.transport.resume_reading()
            data = b""
            with contextlib.suppress(ConnectionError, TimeoutError):
                data = await asyncio.wait_for(reader.read(), 5)
            complete += data.startswith(b"HTTP/1.1 200") and len(data) > len(big)
        assert complete == 0, f"{complete} stuck clients were kept until they read"
    finally:
        for _, writer in clients:
            writer.close()
        await server.stop()


async def test_slow_clients_cannot_lock_out_health_and_a_failing_route_still_answers() -> None:
    """100 connections that never finish their request: /health is still answered at
    once (the slow ones wait for the read timeout); a route that raises is a 500, not a
    hang."""

    async def broken() -> tuple[int, str, bytes]:
        raise TypeError("Integer exceeds 64-bit range")

    async def probe() -> Health:
        return Health(True, True)

    server = HealthServer(probe, Metrics(), port=0, routes={"/broken": broken})
    await server.start()
    slow = []
    try:
        for _ in range(100):
            _, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET /health HTTP/1.1\r\n")  # and never the end of the headers
            slow.append(writer)
        await asyncio.sleep(0.2)
        for _ in range(3):
            status, _, _ = await asyncio.wait_for(http(server.port, "/health"), 2)
            assert status == 200
        status, _, body = await asyncio.wait_for(http(server.port, "/broken"), 2)
        assert (status, body) == (500, b"internal error\n")
    finally:
        for writer in slow:
            writer.close()
        await server.stop()


def test_the_amqp_libraries_log_a_lost_connection_in_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import logging

    from heartbeat_consumer.ops.logs import setup_logging

    setup_logging("INFO")
    try:
        raise ConnectionError("CONNECTION_FORCED - closed via management plugin")
    except ConnectionError:
        logging.getLogger("aiormq.connection").warning("reader exited", exc_info=True)
        logging.getLogger("heartbeat_consumer.x").warning("ours keep it", exc_info=True)
    lines = capsys.readouterr().err.splitlines()
    expected = "reader exited: ConnectionError: CONNECTION_FORCED - closed via management plugin"
    assert lines[0].endswith(expected)
    assert lines[1].endswith("ours keep it")
    assert lines[2].startswith("Traceback")


# --- systemd notify protocol ---------------------------------------------------------------


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket standing in for systemd; NOTIFY_SOCKET points at it."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(15)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


def received(sock: socket.socket, until: str, limit: int = 200) -> list[str]:
    """Datagrams (each split into its assignments) until one carries ``until``."""
    seen: list[str] = []
    for _ in range(limit):
        message = sock.recv(4096).decode().split("\n")
        seen.extend(message)
        if until in message:
            return seen
    raise AssertionError(f"{until} not received in {seen}")


def test_notify_without_systemd_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False


def test_notify_sends_one_datagram_also_to_abstract_sockets(
    notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert notify("READY=1", "STATUS=two\nlines")
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=two lines"
    name = f"hb-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as abstract:
        abstract.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify("WATCHDOG=1")
        assert abstract.recv(4096) == b"WATCHDOG=1"


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert watchdog_interval_s() == 15
    monkeypatch.setenv("WATCHDOG_PID", "1")  # another process's watchdog
    assert watchdog_interval_s() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval_s() == 15
    monkeypatch.setenv("WATCHDOG_USEC", "0")
    assert watchdog_interval_s() is None


async def test_consumer_process_notifies_ready_watchdog_and_stopping(
    bus: Bus, tmp_path: Path, notify_socket: socket.socket
) -> None:
    """As systemd runs it: READY only once consuming, WATCHDOG at half of WatchdogSec,
    STOPPING on SIGTERM."""
    agent = bus.agent()
    config = write(tmp_path, agent, {"c": {"cadenceMs": HOUR, "handler": "default"}})
    results = await bus.collector(f"heartbeat.{agent}.#")
    env = {**os.environ, "WATCHDOG_USEC": "400000", "RABBIT_URL": bus.url}
    proc = await asyncio.create_subprocess_exec(
        BIN, "run", str(config), "--agent", agent, "--exchange", bus.exchange_name,
        env=env, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    loop = asyncio.get_running_loop()
    try:
        before = await loop.run_in_executor(None, received, notify_socket, "READY=1")
        assert "WATCHDOG=1" not in before
        assert any(a.startswith("STATUS=agent ") for a in before)
        (status,) = await take(results, 1, skip_status=False)  # online came before READY
        assert status.routing_key.endswith("._status.online")
        pings = 0
        for _ in range(3):
            got = await loop.run_in_executor(None, received, notify_socket, "WATCHDOG=1")
            pings += got.count("WATCHDOG=1")
        assert pings >= 3
    finally:
        proc.send_signal(signal.SIGTERM)
    rest = await loop.run_in_executor(None, received, notify_socket, "STOPPING=1")
    assert "STOPPING=1" in rest
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()


class FakeService:
    """Connected to the broker but never healthy (a cancelled consumer, say)."""

    def __init__(self, connected: bool) -> None:
        self.metrics = Metrics()
        self.connected = connected

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def health(self) -> Health:
        return Health(False, self.connected, {"error": "no consumer"})

    def describe(self) -> str:
        return "fake"


@pytest.mark.parametrize("connected", [True, False])
async def test_watchdog_pings_stop_only_when_unhealthy_while_connected(
    notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch, connected: bool
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # a ping every 50 ms
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    reading = loop.run_in_executor(None, received, notify_socket, "STOPPING=1", 1000)
    task = asyncio.create_task(run_service(FakeService(connected), stop, grace_s=0.3))
    await asyncio.sleep(1.0)
    stop.set()
    await task
    timeline = await reading
    pings = timeline.count("WATCHDOG=1")
    if connected:  # about 0.3 s of pings, then withheld so that systemd restarts it
        assert 3 <= pings <= 9, timeline
        last_ping = len(timeline) - 1 - timeline[::-1].index("WATCHDOG=1")
        assert sum(a.startswith("STATUS=unhealthy") for a in timeline[last_ping + 1 :]) >= 5
    else:  # broker unreachable: a restart cannot help, keep pinging
        assert pings >= 15, timeline
    assert timeline[-2:] == ["STOPPING=1", "STATUS=stopping"]


# --- logs -----------------------------------------------------------------------------------


def test_json_logs_one_object_per_line_with_a_line_per_check_run(tmp_path: Path) -> None:
    state = tmp_path / "s.json"
    example = ROOT / "examples" / "cack.heartbeat.json"
    out = subprocess.run(
        [BIN, "--log-format", "json", "run-once", str(example), "--state", str(state)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode in (0, 3), out.stderr
    lines = [orjson.loads(line) for line in out.stderr.splitlines()]
    runs = [line for line in lines if line.get("event") == "check_run"]
    assert runs, lines
    for run in runs:
        assert run["agent"] == "cack"
        assert run["check"]
        assert run["status"]
        assert isinstance(run["duration_ms"], int)
        assert run["level"] in ("INFO", "WARNING")
        assert run["ts"].endswith("+00:00")


def test_text_logs_carry_the_same_fields(tmp_path: Path) -> None:
    example = ROOT / "examples" / "cack.heartbeat.json"
    out = subprocess.run(
        [BIN, "run-once", str(example), "--state", str(tmp_path / "s.json")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    run_lines = [line for line in out.stderr.splitlines() if " run agent=cack " in line]
    assert run_lines
    assert all("status=" in x and "duration_ms=" in x for x in run_lines)


def test_unknown_log_format_is_a_usage_error() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "heartbeat_consumer", "validate", "x"],
        capture_output=True,
        text=True,
        env={**os.environ, "LOG_FORMAT": "xml"},
        check=False,
    )
    assert out.returncode == 2
    assert "unknown log format 'xml'" in out.stderr
