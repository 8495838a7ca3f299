"""deploy/rabbitmq/permissions.sh against the real broker: agent A's user runs A's consumer
and nothing else (not B's results, queue, inbox or bindings; not the exchange itself)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import pytest
from aiormq.exceptions import ChannelAccessRefused

from heartbeat_consumer.consumer import HeartbeatConsumer
from heartbeat_consumer.monitor import Monitor

from .broker import Bus, rabbitmqctl, take
from .conftest import ROOT
from .test_bus import write
from .test_monitor import Clock, envelope, until

SCRIPT = ROOT / "deploy" / "rabbitmq" / "permissions.sh"
HOUR = 3_600_000


async def script(bus: Bus, *args: str, **env: str) -> tuple[int, str, str]:
    await rabbitmqctl("status")  # skips where there is no rabbitmqctl
    proc = await asyncio.create_subprocess_exec(
        "sh", str(SCRIPT), *args,
        env={**os.environ, "EXCHANGE_NAME": bus.exchange_name, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()


@contextlib.asynccontextmanager
async def users(bus: Bus, *agents: str) -> AsyncIterator[dict[str, dict[str, str]]]:
    """Run the script for each agent; its env lines per agent; delete the users after."""
    made: dict[str, dict[str, str]] = {}
    try:
        for agent in agents:
            code, out, err = await script(bus, agent)
            assert code == 0, err
            made[agent] = dict(line.split("=", 1) for line in out.splitlines())
        yield made
    finally:
        for agent in agents:
            with contextlib.suppress(BaseException):
                await rabbitmqctl("delete_user", f"heartbeat-agent-{agent}")


async def refused(url: str, action: str, bus: Bus, agent_b: str) -> None:
    """Do ``action`` as the user of ``url``; it must be refused with ACCESS_REFUSED."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        exchange = await channel.get_exchange(bus.exchange_name, ensure=True)
        with pytest.raises(ChannelAccessRefused):
            if action == "publish B's result":
                await exchange.publish(
                    aio_pika.Message(b"{}"), routing_key=f"heartbeat.{agent_b}.c.success"
                )
            elif action == "publish a tick":
                await exchange.publish(aio_pika.Message(b"{}"), routing_key="system.heartbeat.tick")
            elif action == "declare B's queue":
                await channel.declare_queue(f"agent.{agent_b}.inbox", durable=True)
            elif action == "consume B's inbox":
                queue = await channel.get_queue(f"agent.{agent_b}.inbox", ensure=True)
                await queue.consume(ignore)
            elif action == "bind to B's keys":
                queue = await channel.get_queue(f"agent.{url_agent(url)}.inbox", ensure=True)
                await queue.bind(exchange, routing_key=f"agent.{agent_b}.#")
            elif action == "delete the exchange":
                await exchange.delete()
            else:
                raise AssertionError(action)
    finally:
        await connection.close()


async def ignore(message: aio_pika.abc.AbstractIncomingMessage) -> None:
    pass


def url_agent(url: str) -> str:
    return url.split("://heartbeat-agent-", 1)[1].split(":", 1)[0]


async def test_agent_user_runs_its_consumer_and_nothing_else(bus: Bus, tmp_path: Path) -> None:
    await bus.exchange()  # the exchanges exist before least-privileged agents start
    dlx = await bus.channel.declare_exchange(
        f"{bus.exchange_name}.dlx", aio_pika.ExchangeType.TOPIC, durable=True
    )
    assert dlx
    a, b = bus.agent("pa"), bus.agent("pb")
    async with users(bus, a, b) as env:
        assert env[a]["DECLARE_EXCHANGES"] == "false"
        assert env[a]["EXCHANGE_NAME"] == bus.exchange_name
        url_a, url_b = env[a]["RABBIT_URL"], env[b]["RABBIT_URL"]
        assert url_a.startswith(f"amqp://heartbeat-agent-{a}:") and url_a != url_b

        # A's consumer works under A's user: declare, bind, consume, publish, dead-letter.
        results = await bus.collector(f"heartbeat.{a}.#")
        config = write(tmp_path, a, {"c": {"cadenceMs": HOUR, "handler": "default"}})
        consumer_a = HeartbeatConsumer(a, config, url_a, bus.exchange_name, declare_exchanges=False)
        config_b = write(tmp_path, b, {"c": {"cadenceMs": HOUR, "handler": "default"}})
        consumer_b = HeartbeatConsumer(
            b, config_b, url_b, bus.exchange_name, declare_exchanges=False
        )
        await consumer_a.start()
        await consumer_b.start()
        try:
            (first,) = await take(results, 1)
            assert first.routing_key == f"heartbeat.{a}.c.success"
            await bus.publish(f"agent.{a}.heartbeat.run", {"bad": "envelope"})
            await asyncio.sleep(0.5)
            assert await bus.count(f"agent.{a}.dlq") == 1
            assert (await consumer_a.health()).ok

            for action in (
                "publish B's result",
                "publish a tick",
                "declare B's queue",
                "consume B's inbox",
                "bind to B's keys",
                "delete the exchange",
            ):
                await refused(url_a, action, bus, b)
        finally:
            await consumer_a.stop()
            await consumer_b.stop()


async def test_agent_user_cannot_declare_the_exchange(bus: Bus, tmp_path: Path) -> None:
    """Without DECLARE_EXCHANGES=false the consumer needs configure on the exchange: it
    fails at start with a refusal, not silently."""
    await bus.exchange()
    a = bus.agent("pc")
    async with users(bus, a) as env:
        config = write(tmp_path, a, {"c": {"cadenceMs": HOUR, "handler": "default"}})
        consumer = HeartbeatConsumer(a, config, env[a]["RABBIT_URL"], bus.exchange_name)
        with pytest.raises(ChannelAccessRefused):
            await consumer.start()
        await consumer.broker.stop()


async def test_ticker_user_and_bad_names(bus: Bus) -> None:
    user = f"hbt{uuid.uuid4().hex[:8]}"
    code, out, err = await script(bus, "--ticker", user)
    try:
        assert code == 0, err
        url = dict(line.split("=", 1) for line in out.splitlines())["RABBIT_URL"]
        connection = await aio_pika.connect(url)
        try:
            channel = await connection.channel()
            exchange = await channel.declare_exchange(
                bus.exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
            )
            await exchange.publish(aio_pika.Message(b"{}"), routing_key="system.heartbeat.tick")
            with pytest.raises(ChannelAccessRefused):
                await exchange.publish(aio_pika.Message(b"{}"), routing_key="heartbeat.x.c.success")
        finally:
            await connection.close()
    finally:
        await rabbitmqctl("delete_user", user)
    code, _, err = await script(bus, "a.b")
    assert code == 2 and "agent names are letters" in err
    code, _, err = await script(bus)
    assert code == 2 and "usage:" in err


async def test_monitor_user_watches_and_alerts_but_cannot_forge_results(
    bus: Bus, tmp_path: Path
) -> None:
    user = f"hbm{uuid.uuid4().hex[:8]}"
    queue = f"test.monitor.{uuid.uuid4().hex[:8]}"
    bus.queues |= {queue, f"{queue}.dlq"}
    await bus.exchange()  # made by the ticker (or an admin) in a deployment
    await bus.channel.declare_exchange(
        f"{bus.exchange_name}.dlx", aio_pika.ExchangeType.TOPIC, durable=True
    )
    code, out, err = await script(bus, "--monitor", user, MONITOR_QUEUE=queue)
    assert code == 0, err
    env = dict(line.split("=", 1) for line in out.splitlines())
    assert env["DECLARE_EXCHANGES"] == "false"
    clock = Clock()
    try:
        monitor = Monitor(
            state_path=tmp_path / "m.json",
            rabbit_url=env["RABBIT_URL"],
            exchange_name=bus.exchange_name,
            queue_name=queue,
            declare_exchanges=False,
            clock=clock,
        )
        alerts = await bus.collector("heartbeat.*._alert.#")
        await monitor.start()
        try:
            await bus.publish(
                "heartbeat.x._status.online",
                envelope("heartbeat.status", {"agent": "x", "status": "online"}),
            )
            await until(lambda: "x" in monitor.state.agents)
            await bus.publish("heartbeat.x.c.success", b"not json")  # to its DLQ
            await until(lambda: len(monitor.metrics.monitor_dead_lettered._metrics) == 1)
            clock.offset = 10 * 60_000
            assert [a.kind for a in await monitor.evaluate_once()] == ["stale"]
            (alert,) = await take(alerts, 1, skip_status=False)
            assert alert.routing_key == "heartbeat.x._alert.stale"
        finally:
            await monitor.stop()
        await refused(env["RABBIT_URL"], "publish B's result", bus, "x")  # a forged result
        connection = await aio_pika.connect(env["RABBIT_URL"])
        try:
            channel = await connection.channel()
            exchange = await channel.get_exchange(bus.exchange_name, ensure=True)
            mine = await channel.get_queue(queue, ensure=True)
            with pytest.raises(ChannelAccessRefused):
                await mine.bind(exchange, routing_key="agent.#")  # nobody's inbox traffic
        finally:
            await connection.close()
    finally:
        await rabbitmqctl("delete_user", user)
