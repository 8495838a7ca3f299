"""On a 3-node RabbitMQ cluster (tests/cluster.py): an agent whose broker node goes away."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import orjson
import pytest

from heartbeat_consumer.bus.connection import NodesConnection
from heartbeat_consumer.bus.consumer import HeartbeatConsumer
from heartbeat_consumer.bus.settings import BusSettings, InboxSettings
from heartbeat_consumer.core.timeutil import floor_to

from .cluster import Cluster, make_cluster
from .helpers import now_ms, slot_tick

pytestmark = pytest.mark.rabbit


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    made = make_cluster()
    try:
        await made.start()
        yield made
    finally:
        await made.remove()


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
        orjson.dumps({"agent": agent, "checks": {"c": {"cadenceMs": 1, "handler": "default"}}})
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
