"""Failover of an agent's replicas on a real RabbitMQ: takeover time and double runs.

Run: .venv/bin/python bench/bench_failover.py [FAILOVERS]   (RABBIT_URL or localhost;
about 3 minutes for 20 failovers; RABBIT_URL may be a cluster's node list)

Two replicas of one agent run as processes (``heartbeat-consumer run``) on a quorum
inbox with a single active consumer. This process publishes a tick at every 100 ms
boundary; the agent's one check has a cadence of 1 s and a handler that writes down
each run. Over and over, at a random moment 0.5 to 1.5 s after the new active replica's
first result, the active one is SIGKILLed; the other takes over; the killed one is
started again, as the standby. Measured per failover:

- takeover: from the last result of the old active to the first of the new one (with
  a 1 s cadence, 1 s is a takeover that costs nothing);
- late: slots of 100 ms between the check's due slot and the new active's first run
  (a run before it is early, counted below);
- double runs: a slot run twice (same idempotency key), and a run less than a cadence
  after the one before it (the new active did not know of it).

Both modes, in the same run: ``--standby`` (the state follows the bus) and the baseline
``--single-active-consumer`` alone, where each replica has only its own state file.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import platform
import random
import signal
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import orjson

from heartbeat_consumer.core.topology import node_urls

URL = os.environ.get("RABBIT_URL", "amqp://guest:guest@localhost:5672/")
BIN = str(Path(sys.executable).with_name("heartbeat-consumer"))
TICK_MS = 100
CADENCE_MS = 1000
PLUGIN = """
import os
from heartbeat_consumer import register_handler

@register_handler("keys")
async def keys(payload, check):
    with open(check.meta["calls"], "a") as out:
        out.write(payload["idempotency_key"] + "\\n")
    return {"status": "success", "replica": os.environ["REPLICA"]}
"""


@dataclass
class Seen:
    """Results (arrival time, replica, slot) and online events as they arrive."""

    results: list[tuple[float, str, int]] = field(default_factory=list)
    online: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait(self, condition: Any, within: float = 30) -> None:
        """Until ``condition()`` holds, re-checked at each arrival."""
        async with asyncio.timeout(within):
            while not condition():
                self.changed.clear()
                await self.changed.wait()

    async def on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        payload = orjson.loads(message.body)["payload"]
        if (message.routing_key or "").endswith(".online"):
            self.online += 1
        else:
            slot = int(payload["idempotency_key"].rsplit(":", 1)[1])
            self.results.append((time.monotonic(), payload["result"]["replica"], slot))
        self.changed.set()
        await message.ack()


def floor_ms(step: int) -> int:
    now = time.time_ns() // 1_000_000
    return now - now % step


async def ticker(exchange: aio_pika.abc.AbstractExchange) -> None:
    """A tick at every TICK_MS boundary, until cancelled."""
    while True:
        slot = floor_ms(TICK_MS) + TICK_MS
        await asyncio.sleep(max(0.0, slot / 1000 - time.time()))
        body = {
            "event_id": str(uuid.uuid4()),
            "event_type": "system.heartbeat.tick",
            "timestamp": slot,
            "payload": {"epoch_ms": slot},
        }
        message = aio_pika.Message(
            orjson.dumps(body), delivery_mode=aio_pika.DeliveryMode.PERSISTENT
        )
        await exchange.publish(message, routing_key="system.heartbeat.tick")


@dataclass
class Replicas:
    """The two replica processes of one agent, in one mode."""

    mode: str
    work: Path
    agent: str
    exchange: str
    seen: Seen
    procs: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)

    async def start(self, name: str) -> None:
        """Start replica ``name`` and wait until it says online."""
        (self.work / name).mkdir(exist_ok=True)
        config = self.work / f"{self.agent}.heartbeat.json"
        argv = [BIN, "run", str(config), "--rabbit-url", URL, "--exchange", self.exchange]
        argv += ["--handlers", str(self.work / "plugin.py"), "--every", f"{TICK_MS}ms"]
        argv += ["--state", str(self.work / name / "state.json"), "--queue-type", "quorum"]
        if self.mode == "standby":
            argv += ["--standby", "--replica", name]
        else:
            argv += ["--single-active-consumer"]
        log = (self.work / name / "log").open("ab")
        online = self.seen.online
        self.procs[name] = await asyncio.create_subprocess_exec(
            *argv, stdout=log, stderr=log, env={**os.environ, "REPLICA": name}
        )
        await self.seen.wait(lambda: self.seen.online > online)

    async def fail_over(self) -> tuple[float, int]:
        """Kill the active replica, wait for the other's first result, start the killed
        one again; the takeover time and the slots it was late (early: 0)."""
        results = self.seen.results
        active = results[-1][1]
        other = "b" if active == "a" else "a"
        self.procs[active].kill()
        await self.procs[active].wait()
        before = len(results)
        await self.seen.wait(lambda: any(r[1] == other for r in results[before:]))
        last_old = max(r for r in results[:before] if r[1] == active)
        first_new = next(r for r in results[before:] if r[1] == other)
        await self.start(active)
        late = (first_new[2] - (last_old[2] + CADENCE_MS)) // TICK_MS
        return first_new[0] - last_old[0], max(late, 0)

    async def stop(self) -> None:
        for proc in self.procs.values():
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 30)


async def remove(connection: aio_pika.abc.AbstractConnection, agent: str, exchange: str) -> None:
    channel = await connection.channel()
    for queue in ("inbox", "dlq", "state.a", "state.b"):
        with contextlib.suppress(Exception):
            await channel.queue_delete(f"agent.{agent}.{queue}")
    for name in (exchange, f"{exchange}.dlx"):
        with contextlib.suppress(Exception):
            await channel.exchange_delete(name)


def doubles(calls: Path) -> tuple[int, int, int]:
    """Runs, slots run twice, and runs less than a cadence after the one before."""
    slots = [int(line.rsplit(":", 1)[1]) for line in calls.read_text().split()]
    ordered = sorted(set(slots))
    early = sum(1 for x, y in itertools.pairwise(ordered) if y - x < CADENCE_MS)
    return len(slots), len(slots) - len(set(slots)), early


async def failovers(mode: str, count: int, base: Path) -> dict[str, Any]:
    agent = f"bf{uuid.uuid4().hex[:8]}"
    work = base / mode
    work.mkdir()
    (work / "plugin.py").write_text(PLUGIN)
    check = {"cadenceMs": CADENCE_MS, "handler": "keys", "meta": {"calls": str(work / "calls")}}
    config = {"agent": agent, "checks": {"c": check}}
    (work / f"{agent}.heartbeat.json").write_bytes(orjson.dumps(config))
    connection = await aio_pika.connect_robust(node_urls(URL)[0])
    channel = await connection.channel()
    replicas = Replicas(mode, work, agent, f"bench.failover.{uuid.uuid4().hex[:8]}", Seen())
    exchange = await channel.declare_exchange(replicas.exchange, "topic", durable=True)
    collect = await channel.declare_queue(f"bench.collect.{agent}", auto_delete=True)
    await collect.bind(exchange, f"heartbeat.{agent}.c.success")
    await collect.bind(exchange, f"heartbeat.{agent}._status.online")
    await collect.consume(replicas.seen.on_message)
    ticks = asyncio.create_task(ticker(exchange))
    measured: list[tuple[float, int]] = []
    try:
        await replicas.start("a")
        await replicas.start("b")
        await replicas.seen.wait(lambda: bool(replicas.seen.results))
        for _ in range(count):
            await asyncio.sleep(random.uniform(0.5, 1.5))  # noqa: S311 (jitter, not a secret)
            measured.append(await replicas.fail_over())
    finally:
        ticks.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticks
        await replicas.stop()
        await remove(connection, agent, replicas.exchange)
        await connection.close()
    runs, twice, early = doubles(work / "calls")
    takeovers = [t for t, _ in measured]
    return {
        "mode": mode,
        "failovers": count,
        "takeover_p50": statistics.median(takeovers),
        "takeover_max": max(takeovers),
        "late_max": max(late for _, late in measured),
        "same_slot_twice": twice,
        "within_a_cadence": early,
        "runs": runs,
    }


async def main(count: int) -> None:
    print(f"# bench_failover: {count} failovers per mode, {time.strftime('%Y-%m-%d')}")
    cpu = platform.processor() or platform.machine()
    nodes = len(node_urls(URL))
    print(f"# {platform.node()}: {cpu}, {os.cpu_count()} CPUs; RabbitMQ: {nodes} node(s)")
    with tempfile.TemporaryDirectory(prefix="bench-failover-") as base:
        rows = [await failovers(mode, count, Path(base)) for mode in ("standby", "sac-only")]
    print(
        "| mode | failovers | takeover p50 | takeover max | slots late (max) |"
        " same slot twice | run within a cadence | runs |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['mode']} | {r['failovers']} | {r['takeover_p50']:.2f} s |"
            f" {r['takeover_max']:.2f} s | {r['late_max']} | {r['same_slot_twice']} |"
            f" {r['within_a_cadence']} | {r['runs']} |"
        )
    for r in rows:  # 1.00x: the next run came exactly a cadence after the last one
        print(f"{r['mode']}: takeover p50 / cadence = {r['takeover_p50'] * 1000 / CADENCE_MS:.2f}x")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 20))
