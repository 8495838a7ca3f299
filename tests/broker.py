"""A real RabbitMQ for tests: RABBIT_URL, else localhost:5672, else testcontainers.

Each test gets unique exchange and agent names and deletes what it declared.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import orjson
import pytest

from heartbeat_consumer.bus.consumer import HeartbeatConsumer
from heartbeat_consumer.core.topology import DEFAULT_URL, dead_letter_exchange
from heartbeat_consumer.monitor.monitor import Monitor
from heartbeat_consumer.runtime.engine import wall_clock_ms

from .requires import need_tool

HOW_TO_START = (
    "no RabbitMQ reachable: set RABBIT_URL, or start one on localhost:5672 "
    "(apt-get install rabbitmq-server && rabbitmq-server -detached), "
    "or run a Docker engine for testcontainers"
)


def _port_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
        return True
    return False


def broker_url() -> str:
    if os.environ.get("RABBIT_URL"):
        return os.environ["RABBIT_URL"]
    if _port_open("127.0.0.1", 5672):
        return DEFAULT_URL
    try:
        from testcontainers.rabbitmq import RabbitMqContainer  # type: ignore[import-untyped]

        container = RabbitMqContainer("rabbitmq:3-management")
        container.start()
    except Exception as exc:
        pytest.fail(f"{HOW_TO_START} ({exc})")
    host = container.get_container_host_ip()
    port = container.get_exposed_port(5672)
    return f"amqp://guest:guest@{host}:{port}/"


@dataclass
class Bus:
    url: str
    connection: aio_pika.abc.AbstractRobustConnection
    channel: aio_pika.abc.AbstractChannel
    exchange_name: str
    queues: set[str] = field(default_factory=set)
    exchanges: set[str] = field(default_factory=set)

    def agent(self, prefix: str = "a") -> str:
        name = f"{prefix}{uuid.uuid4().hex[:10]}"
        self.queues |= {f"agent.{name}.inbox", f"agent.{name}.dlq"}
        return name

    async def exchange(self) -> aio_pika.abc.AbstractExchange:
        return await self.channel.declare_exchange(
            self.exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
        )

    async def publish(self, routing_key: str, body: bytes | dict[str, Any], **kw: Any) -> None:
        data = body if isinstance(body, bytes) else orjson.dumps(body)
        exchange = await self.exchange()
        await exchange.publish(aio_pika.Message(data, **kw), routing_key=routing_key)

    async def collector(self, binding: str, durable: bool = False) -> aio_pika.abc.AbstractQueue:
        """A queue of our own bound to ``binding`` (results, status events); ``durable``
        to keep what it holds through a broker restart."""
        name = f"test.collect.{uuid.uuid4().hex[:10]}"
        self.queues.add(name)
        queue = await self.channel.declare_queue(name, durable=durable, auto_delete=False)
        await queue.bind(await self.exchange(), routing_key=binding)
        return queue

    async def count(self, queue: str) -> int:
        """Ready messages in ``queue`` now (a fresh channel: robust channels cache
        declarations, and with them the count)."""
        channel = await self.connection.channel()
        try:
            declared = await channel.declare_queue(queue, passive=True)
        finally:
            await channel.close()
        assert declared.declaration_result.message_count is not None
        return declared.declaration_result.message_count

    async def cleanup(self) -> None:
        channel = await self.connection.channel()
        for queue in self.queues:
            with contextlib.suppress(Exception):
                await channel.queue_delete(queue)
        for exchange in {
            *self.exchanges,
            self.exchange_name,
            dead_letter_exchange(self.exchange_name),
        }:
            with contextlib.suppress(Exception):
                await channel.exchange_delete(exchange)
        await channel.close()


def _is_status(routing_key: str) -> bool:
    """Status events, run announcements and answers to commands (``._command.``)."""
    return any(part in routing_key for part in ("._status.", "._command.")) or routing_key.endswith(
        ".started"
    )


async def take(
    queue: aio_pika.abc.AbstractQueue,
    n: int,
    within: float = 10.0,
    *,
    skip_status: bool = True,
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Wait for ``n`` messages on ``queue``, failing after ``within`` seconds.

    Status events (``._status.``) are dropped unless ``skip_status`` is False."""
    got: list[aio_pika.abc.AbstractIncomingMessage] = []
    deadline = asyncio.get_running_loop().time() + within
    while len(got) < n:
        message = await queue.get(no_ack=True, fail=False)
        if message is None:
            assert asyncio.get_running_loop().time() < deadline, f"got {len(got)} of {n} messages"
            await asyncio.sleep(0.02)
            continue
        if skip_status and _is_status(message.routing_key or ""):
            continue
        got.append(message)
    return got


async def drain(queue: aio_pika.abc.AbstractQueue) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Whatever is in ``queue`` now, status events left out."""
    found = []
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        if not _is_status(message.routing_key or ""):
            found.append(message)
    return found


async def drain_all(
    queue: aio_pika.abc.AbstractQueue,
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Whatever is in ``queue`` now, status events included. Taken without acks: if a
    get fails after some were taken (a lost channel), those are returned, not dropped."""
    found = []
    try:
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            found.append(message)
    except Exception:
        if not found:
            raise
    return found


async def rabbitmqctl(*args: str) -> str:
    """Run rabbitmqctl on this machine's broker; skip the test where it cannot.

    Missing under CI fails unless RABBIT_URL names a broker elsewhere (.ci/run installs
    rabbitmq-server only when RABBIT_URL is unset)."""
    __tracebackhide__ = True
    tool = need_tool(
        "rabbitmqctl",
        "manages the local broker's users and connections",
        "apt-get install rabbitmq-server",
        ci=not os.environ.get("RABBIT_URL"),
    )
    proc = await asyncio.create_subprocess_exec(
        tool, "-q", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        pytest.skip(f"rabbitmqctl {args[0]} is not available here")
    return out.decode()


@contextlib.asynccontextmanager
async def open_bus(url: str = "", through: str = "") -> AsyncIterator[Bus]:
    """The test's own connection (to ``through``, else ``url``) and names; ``url`` (by
    default the machine's broker) is what the components under test are given: a
    cluster's node list, say."""
    url = url or broker_url()
    connection = await aio_pika.connect_robust(through or url)
    channel = await connection.channel()
    bus = Bus(url, connection, channel, f"test.hb.{uuid.uuid4().hex[:10]}")
    try:
        yield bus
    finally:
        await bus.cleanup()
        await connection.close()


async def queue_stats(name: str) -> dict[str, Any]:
    """What the broker says of queue ``name``: messages_ready, messages_unacknowledged,
    arguments (rabbitmqctl; skips the test where it cannot run)."""
    out = await rabbitmqctl(
        "list_queues", "name", "messages_ready", "messages_unacknowledged", "arguments",
        "--formatter", "json",
    )  # fmt: skip
    for row in orjson.loads(out):
        if row["name"] == name:
            found: dict[str, Any] = row
            return found
    raise AssertionError(f"no queue {name}")


async def settled(name: str, within: float = 10.0) -> None:
    """Wait until ``name`` holds nothing, ready or unacknowledged."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        stats = await queue_stats(name)
        if stats["messages_ready"] == 0 and stats["messages_unacknowledged"] == 0:
            return
        assert asyncio.get_running_loop().time() < deadline, f"{name} not settled: {stats}"
        await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def running(
    bus: Bus, agent: str, config: Path, **kw: Any
) -> AsyncIterator[HeartbeatConsumer]:
    """A consumer for ``agent`` on the test's exchange, started and stopped."""
    consumer = HeartbeatConsumer(agent, config, bus.url, bus.exchange_name, **kw)
    await consumer.start()
    try:
        yield consumer
    finally:
        await consumer.stop()


def new_monitor(bus: Bus, state_path: Path, **kw: Any) -> Monitor:
    """A monitor on the test's exchange, with a queue of its own that cleanup deletes."""
    queue = f"test.monitor.{uuid.uuid4().hex[:10]}"
    bus.queues |= {queue, f"{queue}.dlq"}
    return Monitor(
        state_path=state_path,
        rabbit_url=bus.url,
        exchange_name=bus.exchange_name,
        queue_name=queue,
        **kw,
    )


@contextlib.asynccontextmanager
async def watching(
    bus: Bus, state_path: Path, clock: Callable[[], int] = wall_clock_ms, **kw: Any
) -> AsyncIterator[Monitor]:
    """A monitor (see new_monitor), started and stopped."""
    monitor = new_monitor(bus, state_path, clock=clock, **kw)
    await monitor.start()
    try:
        yield monitor
    finally:
        await monitor.stop()


async def proxy_to(
    url: str, tls: ssl.SSLContext | None = None, port: int = 0
) -> tuple[asyncio.Server, list[asyncio.StreamWriter]]:
    """A TCP proxy on a free port of 127.0.0.1 (or ``port``) to the broker of ``url``
    (with ``tls``: a TLS server), and the writers of the connections it made (both ends
    of each)."""
    upstream = urlsplit(url)
    connections: list[asyncio.StreamWriter] = []

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        broker_r, broker_w = await asyncio.open_connection(upstream.hostname, upstream.port or 5672)
        connections.extend((client_w, broker_w))
        await asyncio.gather(forward(client_r, broker_w), forward(broker_r, client_w))

    return await asyncio.start_server(handle, "127.0.0.1", port, ssl=tls), connections
