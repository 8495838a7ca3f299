"""deploy/rabbitmq/permissions.sh against the real broker: agent A's user runs A's consumer
and nothing else (not B's results, queue, inbox or bindings; not the exchange itself),
and no least-privileged user can declare, delete or re-declare a queue: the dead-letter
bypass (re-declare your own DLQ to dead-letter into the main exchange under any key,
which the broker re-publishes without permission checks) is refused."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import orjson
import pytest
from aiormq.exceptions import ChannelAccessRefused

from heartbeat_consumer.bus.consumer import HeartbeatConsumer
from heartbeat_consumer.bus.settings import BusSettings, InboxSettings
from heartbeat_consumer.core.timeutil import floor_to
from heartbeat_consumer.monitor.monitor import Monitor

from .broker import Bus, rabbitmqctl, take
from .conftest import ROOT
from .helpers import BIN, Clock, envelope, now_ms, slot_tick, until, write

pytestmark = pytest.mark.rabbit

SCRIPT = ROOT / "deploy" / "rabbitmq" / "permissions.sh"
HOUR = 3_600_000


async def script(bus: Bus, *args: str, **env: str) -> tuple[int, str, str]:
    await rabbitmqctl("status")  # skips where there is no rabbitmqctl
    proc = await asyncio.create_subprocess_exec(
        "sh", str(SCRIPT), *args,
        env={**os.environ, "EXCHANGE_NAME": bus.exchange_name, "HEARTBEAT_CONSUMER": BIN, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()


def env_lines(out: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in out.splitlines())


@contextlib.asynccontextmanager
async def users(bus: Bus, *agents: str) -> AsyncIterator[dict[str, dict[str, str]]]:
    """Run the script for each agent; its env lines per agent; delete the users after."""
    made: dict[str, dict[str, str]] = {}
    try:
        before = await provisioners()
        for agent in agents:
            code, out, err = await script(bus, agent)
            assert code == 0, err
            made[agent] = env_lines(out)
        assert await provisioners() <= before, "a temporary provisioning user was left"
        yield made
    finally:
        for agent in agents:
            with contextlib.suppress(BaseException):
                await rabbitmqctl("delete_user", f"heartbeat-agent-{agent}")


async def provisioners() -> set[str]:
    listed = await rabbitmqctl("list_users")
    return {line.split()[0] for line in listed.splitlines() if "heartbeat-provision-" in line}


async def refused(url: str, action: str, bus: Bus, agent_b: str, own: str = "") -> None:
    """Do ``action`` as the user of ``url``; it must be refused with ACCESS_REFUSED.
    ``own`` is the user's own queue (an agent's inbox, the monitor's queue)."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        exchange = await channel.get_exchange(bus.exchange_name, ensure=True)
        with pytest.raises(ChannelAccessRefused):
            if action == "publish B's result":
                await exchange.publish(
                    aio_pika.Message(b"{}"), routing_key=f"heartbeat.{agent_b}.c.success"
                )
            elif action == "publish an alert about itself":
                await exchange.publish(
                    aio_pika.Message(b"{}"), routing_key=f"heartbeat.{url_user(url)}._alert.stale"
                )
            elif action == "publish a tick":
                await exchange.publish(aio_pika.Message(b"{}"), routing_key="system.heartbeat.tick")
            elif action == "declare B's queue":
                await channel.declare_queue(f"agent.{agent_b}.inbox", durable=True)
            elif action == "declare a queue of its own":
                await channel.declare_queue(f"agent.{agent_b}.x{uuid.uuid4().hex[:6]}")
            elif action == "consume B's inbox":
                queue = await channel.get_queue(f"agent.{agent_b}.inbox", ensure=True)
                await queue.consume(ignore)
            elif action == "bind to B's keys":
                queue = await channel.get_queue(own, ensure=True)
                await queue.bind(exchange, routing_key=f"agent.{agent_b}.#")
            elif action == "delete its own queue":
                await channel.queue_delete(own)
            elif action == "re-declare its own queue":
                await channel.declare_queue(own, durable=True)
            elif action == "delete the exchange":
                await exchange.delete()
            else:
                raise AssertionError(action)
    finally:
        await connection.close()


def url_user(url: str) -> str:
    """The agent of an agent user's URL."""
    return url.split("://heartbeat-agent-", 1)[1].split(":", 1)[0]


async def dead_letter_bypass(url: str, bus: Bus, dlq: str, aim: str) -> None:
    """The attack: delete the user's own DLQ, re-declare it dead-lettering into the main
    exchange under ``aim`` with a short TTL, publish into it. Must be refused at the
    first step; if it were not, a message would arrive under ``aim``."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        with pytest.raises(ChannelAccessRefused):
            await channel.queue_delete(dlq)
        channel = await connection.channel()
        with pytest.raises(ChannelAccessRefused):
            await channel.declare_queue(
                dlq,
                durable=True,
                arguments={
                    "x-dead-letter-exchange": bus.exchange_name,
                    "x-dead-letter-routing-key": aim,
                    "x-message-ttl": 1,
                },
            )
    finally:
        await connection.close()


async def ignore(message: aio_pika.abc.AbstractIncomingMessage) -> None:
    pass


async def test_agent_user_runs_its_consumer_and_nothing_else(bus: Bus, tmp_path: Path) -> None:
    a, b = bus.agent("pa"), bus.agent("pb")
    async with users(bus, a, b) as env:
        assert env[a]["DECLARE"] == "false"
        assert env[a]["EXCHANGE_NAME"] == bus.exchange_name
        url_a, url_b = env[a]["RABBIT_URL"], env[b]["RABBIT_URL"]
        assert url_a.startswith(f"amqp://heartbeat-agent-{a}:")
        assert url_a != url_b
        # The script provisioned the exchanges and both agents' queues.
        assert await bus.count(f"agent.{a}.inbox") == 0
        assert await bus.count(f"agent.{b}.dlq") == 0

        # A's consumer works under A's user: checks the topology, consumes, publishes,
        # dead-letters; with declaring left on, the refusal falls back to the check.
        results = await bus.collector(f"heartbeat.{a}.#")
        config = write(tmp_path, a, {"c": {"cadenceMs": HOUR, "handler": "default"}})
        consumer_a = HeartbeatConsumer(a, config, url_a, bus.exchange_name)
        config_b = write(tmp_path, b, {"c": {"cadenceMs": HOUR, "handler": "default"}})
        consumer_b = HeartbeatConsumer(
            b, config_b, url_b, bus.exchange_name, declare_exchanges=False
        )
        await consumer_a.start()
        await consumer_b.start()
        try:
            (first,) = await take(results, 1)
            assert first.routing_key == f"heartbeat.{a}.c.success"
            await bus.publish("system.heartbeat.tick", {"bad": "envelope"})
            await asyncio.sleep(0.5)
            assert await bus.count(f"agent.{a}.dlq") == 1
            assert (await consumer_a.health()).ok

            for action in (
                "publish B's result",
                "publish an alert about itself",
                "publish a tick",
                "declare B's queue",
                "declare a queue of its own",
                "consume B's inbox",
                "bind to B's keys",
                "delete its own queue",
                "re-declare its own queue",
                "delete the exchange",
            ):
                await refused(url_a, action, bus, b, own=f"agent.{a}.inbox")
            await dead_letter_bypass(url_a, bus, f"agent.{a}.dlq", f"agent.{b}.heartbeat.run")
        finally:
            await consumer_a.stop()
            await consumer_b.stop()
        assert await bus.count(f"agent.{b}.inbox") == 0, "nothing reached B's inbox"
        limits = await rabbitmqctl("list_user_limits", "--user", f"heartbeat-agent-{a}")
        assert '"max-connections":8' in limits.replace(" ", ""), limits


async def test_a_signal_during_provisioning_leaves_no_temporary_user(
    bus: Bus, tmp_path: Path
) -> None:
    fake = tmp_path / "fake-heartbeat-consumer"
    fake.write_text("#!/bin/sh\nsleep 30\n")
    fake.chmod(0o755)
    before = await provisioners()
    agent = bus.agent("ps")
    proc = await asyncio.create_subprocess_exec(
        "sh", str(SCRIPT), agent,
        env={**os.environ, "EXCHANGE_NAME": bus.exchange_name, "HEARTBEAT_CONSUMER": str(fake)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    for _ in range(100):  # until the temporary user exists
        if await provisioners() - before:
            break
        await asyncio.sleep(0.1)
    assert await provisioners() - before, "the script made no temporary user"
    try:
        proc.send_signal(signal.SIGTERM)
        killer = await asyncio.create_subprocess_exec("pkill", "-f", str(fake))  # its child
        await killer.wait()
        await asyncio.wait_for(proc.wait(), 30)
        assert proc.returncode != 0
        assert await provisioners() <= before, "the temporary user outlived the script"
        assert f"heartbeat-agent-{agent}" not in await rabbitmqctl("list_users")
    finally:
        for user in (await provisioners() - before) | {f"heartbeat-agent-{agent}"}:
            with contextlib.suppress(BaseException):
                await rabbitmqctl("delete_user", user)


async def test_an_agent_user_on_an_unprovisioned_agent_is_told_what_to_do(
    bus: Bus, tmp_path: Path
) -> None:
    """PROVISION=no makes the user only; its consumer then names the missing queue and
    the way to provision it, in one line."""
    a = bus.agent("pn")
    await bus.exchange()  # the exchanges exist (an admin made them), the queues do not
    await bus.channel.declare_exchange(
        f"{bus.exchange_name}.dlx", aio_pika.ExchangeType.TOPIC, durable=True
    )
    code, out, err = await script(bus, a, PROVISION="no")
    try:
        assert code == 0, err
        config = write(tmp_path, a, {"c": {"cadenceMs": HOUR, "handler": "default"}})
        proc = await asyncio.create_subprocess_exec(
            BIN, "run", str(config), "--state", str(tmp_path / "s.json"),
            env={**os.environ, **env_lines(out)},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, stderr = await asyncio.wait_for(proc.communicate(), 30)
        text = stderr.decode().strip()
        assert proc.returncode == 1, text
        last = text.splitlines()[-1]
        assert f"queue 'agent.{a}.dlq' does not exist" in last
        assert "permissions.sh" in last
        assert "Traceback" not in text, text
    finally:
        await rabbitmqctl("delete_user", f"heartbeat-agent-{a}")


async def test_ticker_user_and_bad_names(bus: Bus) -> None:
    user = f"hbt{uuid.uuid4().hex[:8]}"
    before = await provisioners()
    code, out, err = await script(bus, "--ticker", user)
    try:
        assert code == 0, err
        assert await provisioners() <= before, "a temporary provisioning user was left"
        url = env_lines(out)["RABBIT_URL"]
        connection = await aio_pika.connect(url)
        try:
            channel = await connection.channel()
            exchange = await channel.get_exchange(bus.exchange_name, ensure=True)
            await exchange.publish(aio_pika.Message(b"{}"), routing_key="system.heartbeat.tick")
            with pytest.raises(ChannelAccessRefused):
                await exchange.publish(aio_pika.Message(b"{}"), routing_key="heartbeat.x.c.success")
            channel = await connection.channel()
            with pytest.raises(ChannelAccessRefused):
                await channel.declare_exchange(
                    bus.exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
                )
        finally:
            await connection.close()
    finally:
        await rabbitmqctl("delete_user", user)
    code, _, err = await script(bus, "a.b")
    assert code == 2
    assert "agent names are letters" in err
    code, _, err = await script(bus)
    assert code == 2
    assert "usage:" in err


async def test_monitor_user_watches_and_alerts_but_cannot_forge_results(
    bus: Bus, tmp_path: Path
) -> None:
    user = f"hbm{uuid.uuid4().hex[:8]}"
    queue = f"test.monitor.{uuid.uuid4().hex[:8]}"
    bus.queues |= {queue, f"{queue}.dlq"}
    code, out, err = await script(bus, "--monitor", user, MONITOR_QUEUE=queue)
    assert code == 0, err
    env = env_lines(out)
    assert env["DECLARE"] == "false"
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
        url = env["RABBIT_URL"]
        await refused(url, "publish B's result", bus, "x")  # a forged result
        for action in ("bind to B's keys", "delete its own queue", "re-declare its own queue"):
            await refused(url, action, bus, "x", own=queue)
        await dead_letter_bypass(url, bus, f"{queue}.dlq", "heartbeat.x.c.failed")
    finally:
        await rabbitmqctl("delete_user", user)


async def test_replicas_run_as_their_agent_s_user_with_their_state_queues_provisioned(
    bus: Bus, tmp_path: Path
) -> None:
    """``REPLICAS="r1 r2" permissions.sh AGENT`` provisions the state queues too; two
    ``--standby`` replicas run as the agent's user without declaring anything: one runs
    the tick, the other follows its state."""
    a = bus.agent("pr")
    bus.queues |= {f"agent.{a}.state.r1", f"agent.{a}.state.r2"}
    try:
        code, out, err = await script(bus, a, REPLICAS="r1 r2", QUEUE_TYPE="quorum")
        assert code == 0, err
        env = env_lines(out)
        assert env["STANDBY"] == "true" and env["QUEUE_TYPE"] == "quorum"
        assert await bus.count(f"agent.{a}.state.r2") == 0, "provisioned"
        results = await bus.collector(f"heartbeat.{a}.c.*")
        config = write(
            tmp_path, a, {"c": {"cadenceMs": 1, "timeoutMs": 10_000, "handler": "default"}}
        )
        replicas = []
        as_a = BusSettings(url=env["RABBIT_URL"], exchange=bus.exchange_name, declare=False)
        for name in ("r1", "r2"):
            (tmp_path / name).mkdir()
            replicas.append(
                HeartbeatConsumer(
                    a,
                    config,
                    bus=as_a,
                    inbox=InboxSettings(queue_type="quorum", replica=name, tick_interval_ms=1000),
                    state_path=tmp_path / name / "state.json",
                )
            )
        for replica in replicas:
            await replica.start()
        try:
            slot = floor_to(now_ms(), 1000) + 1000
            await bus.publish("system.heartbeat.tick", slot_tick(slot))
            (result,) = await take(results, 1)
            assert orjson.loads(result.body)["payload"]["state_change"]["replica"] == "r1"
            await replicas[1].agent_consumer.catch_up()
            assert replicas[1].agent_consumer.runner.state.check("c").last_run == slot
        finally:
            for replica in replicas:
                await replica.stop()
    finally:
        with contextlib.suppress(BaseException):
            await rabbitmqctl("delete_user", f"heartbeat-agent-{a}")
    code, _, err = await script(bus, a, REPLICAS="r.1")
    assert code == 2 and "bad replica name" in err
