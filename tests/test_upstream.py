"""The ecosystem's own formats end to end on the real broker: Bloodbank's array-format
heartbeat.json (system_event, publish and command actions) and a v1 file with extra
fields and ``defaultHandler: openclaw``, reaching a fake OpenClaw gateway."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from heartbeat_consumer.bus.consumer import HeartbeatConsumer

from .bloodbank_envelope import assert_bloodbank_envelope
from .broker import Bus, take
from .fake_gateway import FakeGateway
from .helpers import tick

pytestmark = pytest.mark.rabbit

ALL_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


@pytest.fixture
async def gateway(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeGateway]:
    """A gateway that, as the ecosystem's are set up, lets requests name agent sessions."""
    async with FakeGateway(
        token="s3cret-hook-token",  # noqa: S106
        allow_request_session_key=True,
        allowed_session_key_prefixes=["agent:"],
    ) as gw:
        monkeypatch.setenv("OPENCLAW_URL", gw.url)
        monkeypatch.setenv("OPENCLAW_HOOK_TOKEN", gw.token)
        yield gw


@contextlib.asynccontextmanager
async def running(bus: Bus, agent: str, config: Path) -> AsyncIterator[HeartbeatConsumer]:
    consumer = HeartbeatConsumer(agent, config, bus.url, bus.exchange_name, tick_interval_ms=1000)
    await consumer.start()  # a start-up evaluation runs what is due at once
    try:
        yield consumer
    finally:
        await consumer.stop()


def write(tmp_path: Path, agent: str, data: dict[str, Any]) -> Path:
    path = tmp_path / f"{agent}.json"  # Bloodbank's fleet layout names files <agent>.json
    path.write_bytes(orjson.dumps(data))
    return path


async def result_of(bus: Bus, agent: str, config: Path, check: str) -> dict[str, Any]:
    results = await bus.collector(f"heartbeat.{agent}.{check}.*")
    async with running(bus, agent, config):
        (message,) = await take(results, 1, within=15)
    body: dict[str, Any] = orjson.loads(message.body)
    assert_bloodbank_envelope(body, message.routing_key or "")
    return body


async def test_array_format_system_event_reaches_the_gateway(
    bus: Bus, tmp_path: Path, gateway: FakeGateway
) -> None:
    agent = bus.agent("grolf")
    config = write(
        tmp_path,
        agent,
        {
            "agent": agent,
            "version": "1.0.0",
            "checks": [
                {
                    "id": "check-direct-reports",
                    "description": "Verify all direct reports are active",
                    "interval_minutes": 15,
                    "enabled": True,
                    "action": "system_event",
                    "prompt": "HEARTBEAT CHECK: no idle agents. Reply HEARTBEAT_OK if fine.",
                    "conditions": {"day_of_week": ALL_DAYS, "hour_range": [0, 23]},
                }
            ],
        },
    )
    body = await result_of(bus, agent, config, "check-direct-reports")
    assert body["payload"]["status"] == "success", body["payload"]
    (request,) = gateway.requests
    assert (request.method, request.path, request.query) == ("POST", "/hooks/agent", {})
    assert request.headers["authorization"] == "Bearer s3cret-hook-token"
    assert request.headers["content-type"].startswith("application/json")
    assert request.headers["idempotency-key"] == body["payload"]["idempotency_key"]
    assert request.body == {
        "message": "HEARTBEAT CHECK: no idle agents. Reply HEARTBEAT_OK if fine.",
        "name": "heartbeat:check-direct-reports",
        "sessionKey": f"agent:{agent}:main",
        "wakeMode": "now",
        "deliver": False,
    }
    assert "s3cret-hook-token" not in orjson.dumps(body).decode()


async def test_v1_with_extra_fields_and_default_handler_openclaw(
    bus: Bus, tmp_path: Path, gateway: FakeGateway
) -> None:
    agent = bus.agent("lenoon")
    config = write(
        tmp_path,
        agent,
        {
            "agent": agent,
            "role": "infrastructure",
            "defaultHandler": "openclaw",
            "checks": {
                "build_health": {
                    "cadenceMs": 1_800_000,
                    "handler": "build_health",
                    "description": "Check that every CI build on main is green.",
                    "lastRun": 0,
                    "owner": "infra",
                }
            },
        },
    )
    body = await result_of(bus, agent, config, "build_health")
    payload = body["payload"]
    assert payload["status"] == "success", payload
    assert payload["handler"] == "openclaw"
    (request,) = gateway.requests
    assert request.body["message"] == "Check that every CI build on main is green."
    assert request.body["sessionKey"] == f"agent:{agent}:main"


async def test_array_format_publish_action_puts_its_event_on_the_bus(
    bus: Bus, tmp_path: Path
) -> None:
    agent = bus.agent("pepe")
    config = write(
        tmp_path,
        agent,
        {
            "agent": agent,
            "checks": [
                {
                    "id": "announce",
                    "description": "tell the dashboard",
                    "interval_minutes": 60,
                    "action": "publish",
                },
                {"id": "custom", "action": "publish", "event_type": f"ops.{agent}.ping"},
            ],
        },
    )
    default_key = f"agent.{agent}.heartbeat.announce"
    published = await bus.collector(default_key)
    custom = await bus.collector(f"ops.{agent}.ping")
    results = await bus.collector(f"heartbeat.{agent}.*.*")
    async with running(bus, agent, config):
        (event,) = await take(published, 1, within=15)
        (first,) = await take(results, 1, within=15)
        await asyncio.sleep(1.1)  # the next 1 s slot
        await bus.publish("system.heartbeat.tick", tick())
        (other,) = await take(custom, 1, within=15)
        (second,) = await take(results, 1, within=15)
    assert second.routing_key == f"heartbeat.{agent}.custom.success"
    body = orjson.loads(event.body)
    assert_bloodbank_envelope(body, default_key)
    assert body["payload"]["check_id"] == "announce"
    assert body["payload"]["description"] == "tell the dashboard"
    assert orjson.loads(first.body)["payload"]["result"]["published"] == default_key
    assert_bloodbank_envelope(orjson.loads(other.body), f"ops.{agent}.ping")


async def test_array_format_command_action_runs_through_a_shell(bus: Bus, tmp_path: Path) -> None:
    agent = bus.agent("rar")
    out = tmp_path / "out.txt"
    config = write(
        tmp_path,
        agent,
        {
            "agent": agent,
            "checks": [
                {
                    "id": "disk",
                    "interval_minutes": 30,
                    "action": "command",
                    "command": f"echo disk ok | tr a-z A-Z > '{out}'",
                }
            ],
        },
    )
    body = await result_of(bus, agent, config, "disk")
    assert body["payload"]["status"] == "success", body["payload"]
    assert out.read_text() == "DISK OK\n"
