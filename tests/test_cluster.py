"""On a 3-node RabbitMQ cluster (tests/cluster.py): an agent whose broker node goes away."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest

from heartbeat_consumer.bus.connection import NodesConnection
from heartbeat_consumer.bus.consumer import HeartbeatConsumer
from heartbeat_consumer.bus.settings import BusSettings, InboxSettings
from heartbeat_consumer.core.timeutil import floor_to

from .broker import Bus
from .cluster import Cluster
from .helpers import now_ms, slot_tick, write
from .replicas import (
    KILL_AFTER_RESULT,
    SLOT,
    replicas_of,
    results_of,
    spawn,
    until_consuming,
    wait_results,
)

pytestmark = pytest.mark.rabbit


async def take_one(queue: aio_pika.abc.AbstractQueue, within: float = 30) -> bytes:
    deadline = asyncio.get_running_loop().time() + within
    while asyncio.get_running_loop().time() < deadline:
        message = await queue.get(no_ack=True, fail=False)
        if message is not None:
            return message.body
        await asyncio.sleep(0.1)
    raise AssertionError("no result")


async def test_an_agent_whose_broker_node_stops_moves_to_the_next_and_goes_on(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The agent's inbox is a quorum queue (replicated on the three nodes); its consumer
    is given the node list and connects to node 1. Node 1 stops: the consumer moves to
    node 2 within seconds and answers the next tick, published through node 3."""
    agent, exchange = f"c{uuid.uuid4().hex[:10]}", f"test.cluster.{uuid.uuid4().hex[:8]}"
    config = tmp_path / f"{agent}.heartbeat.json"
    config.write_bytes(
        orjson.dumps(
            {
                "agent": agent,
                "checks": {"c": {"cadenceMs": 1, "timeoutMs": 10_000, "handler": "default"}},
            }
        )
    )
    third = await aio_pika.connect(cluster.nodes[2].url())
    channel = await third.channel()
    consumer = HeartbeatConsumer(
        agent,
        config,
        bus=BusSettings(url=cluster.url(1, 2, 3), exchange=exchange),
        inbox=InboxSettings(queue_type="quorum"),
        state_path=tmp_path / "state.json",
    )
    try:
        ex = await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        results = await channel.declare_queue(f"test.collect.{agent}", durable=True)
        await results.bind(ex, f"heartbeat.{agent}.c.success")
        await consumer.start()
        await take_one(results)  # the start-up run
        connection = await consumer.broker.connect()
        assert isinstance(connection, NodesConnection) and connection.node == 0
        began = asyncio.get_running_loop().time()
        await cluster.ctl(cluster.nodes[0], "stop_app")
        for _ in range(300):
            await asyncio.sleep(0.1)
            with contextlib.suppress(Exception):
                if connection.node == 1 and (await consumer.health()).ok:
                    break
        moved = asyncio.get_running_loop().time() - began
        assert connection.node == 1, "the consumer did not move to node 2"
        assert moved < 15, f"it took {moved:.1f} s to move"
        tick = slot_tick(floor_to(now_ms(), 60_000) + 60_000)  # the start-up run's next slot
        await ex.publish(
            aio_pika.Message(orjson.dumps(tick), delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key="system.heartbeat.tick",
        )
        result = orjson.loads(await take_one(results))
        assert result["payload"]["idempotency_key"] == f"{agent}:c:{tick['payload']['epoch_ms']}"
    finally:
        with contextlib.suppress(Exception):
            await consumer.stop()
        await third.close()
        await cluster.ctl(cluster.nodes[0], "start_app")
        await cluster.ctl(cluster.nodes[0], "await_startup")


async def test_replicas_on_the_cluster_survive_a_killed_active_and_a_stopped_node(
    cluster: Cluster, cluster_bus: Bus, tmp_path: Path
) -> None:
    """Three replicas of an agent (``run --standby``), each given the node list in another
    order: a on node 1, b on node 2, c on node 3. Ticks come one after another. a is
    SIGKILLed after slot 6: b takes over. Node 2 stops after slot 12: b's connection
    goes, c takes over (b comes back on another node, as a standby). Every slot runs
    exactly once (counted by idempotency key), the next slot after each failover runs
    within seconds."""
    bus = cluster_bus
    agent = bus.agent()
    replicas_of(bus, agent, "a", "b", "c")
    (tmp_path / "plugin.py").write_text(KILL_AFTER_RESULT)
    calls = tmp_path / "calls"
    check = {"cadenceMs": 1, "timeoutMs": 10_000, "handler": "keys", "meta": {"calls": str(calls)}}
    config = write(tmp_path, agent, {"c": check})
    results = await bus.collector(f"heartbeat.{agent}.c.*")
    procs: dict[str, asyncio.subprocess.Process] = {}
    orders = {"a": (1, 2, 3), "b": (2, 3, 1), "c": (3, 1, 2)}
    loop = asyncio.get_running_loop()
    got: list[dict[str, Any]] = []
    at: list[float] = []
    base = floor_to(now_ms(), SLOT) + 20 * SLOT  # ahead: no tick goes stale in a failover
    try:
        for name, order in orders.items():
            procs[name] = await spawn(bus, config, tmp_path, name, url=cluster.url(*order))
            await until_consuming(tmp_path, name)  # in this order
        await asyncio.sleep(1.0)  # their requests for the state are answered
        for k in range(18):
            await bus.publish("system.heartbeat.tick", slot_tick(base + k * SLOT))
            got += await wait_results(results, 1, within=60)
            at.append(loop.time())
            if k == 5:
                procs["a"].kill()
                await procs["a"].wait()
            elif k == 11:
                await cluster.ctl(cluster.nodes[1], "stop_app")
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)
        got += await results_of(results)
    finally:
        for proc in procs.values():
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), 30)
            if proc.returncode is None:
                proc.kill()
        await cluster.ctl(cluster.nodes[1], "start_app")
        await cluster.ctl(cluster.nodes[1], "await_startup")
    keys = calls.read_text().split()
    assert Counter(keys) == Counter(f"{agent}:c:{base + k * SLOT}" for k in range(18)), keys
    assert len(got) == 18, "one result per slot"
    ran_by = "".join(r["state_change"]["replica"] for r in got)
    assert ran_by == "a" * 6 + "b" * 6 + "c" * 6, ran_by
    killed, stopped = at[6] - at[5], at[12] - at[11]
    print(f"next slot after the kill: {killed:.2f} s; after the node stopped: {stopped:.2f} s")
    assert killed < 5 and stopped < 20
