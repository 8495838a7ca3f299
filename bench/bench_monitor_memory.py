"""Memory per tracked agent in the fleet monitor, and what a big fleet costs it.

Run: .venv/bin/python bench/bench_monitor_memory.py [AGENTS] [CHECKS]   (10000, 3)

1. The rules alone: fold AGENTS x (status + CHECKS results) events with ``observe``;
   tracemalloc's growth per agent; then the time of one ``evaluate`` and one status
   document (and its JSON size), and the state file's size.
2. A real monitor on the real broker (RABBIT_URL or localhost), in a fresh process: the
   same events published to the exchange; the process's RSS growth per agent once the
   monitor has read them all, and the rate it read them at. Its queues and exchange are
   deleted afterwards.
"""

from __future__ import annotations

import asyncio
import gc
import os
import platform
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aio_pika
import orjson

from heartbeat_consumer.bus.settings import BusSettings
from heartbeat_consumer.core.topology import DEFAULT_URL
from heartbeat_consumer.monitor.monitor import Monitor, status_document
from heartbeat_consumer.monitor.rules import WatchConfig, WatchState, evaluate, observe_agent

URL = os.environ.get("RABBIT_URL", DEFAULT_URL)
T0 = 1_800_000_000_000


def events(agents: int, checks: int, at: int) -> Iterator[tuple[str, dict[str, Any]]]:
    """Routing key and envelope of each agent's online status and one result per check,
    shaped like the consumer's (payload fields included)."""
    for i in range(agents):
        agent = f"agent-{i:06d}"
        online = {"agent": agent, "status": "online", "pid": 4242}
        yield f"heartbeat.{agent}._status.online", _event("heartbeat.status", at, online)
        for c in range(checks):
            check = f"check-{c}"
            result = {
                "agent": agent,
                "check": check,
                "handler": "default",
                "slot": "2027-01-15T08:00:00.000Z",
                "started_at": "2027-01-15T08:00:00.010Z",
                "idempotency_key": f"{agent}:{check}:2027-01-15T08:00:00.000Z",
                "cadence_ms": 900_000,
                "timeout_ms": 60_000,
                "status": "success",
                "finished_at": "2027-01-15T08:00:00.050Z",
                "duration_ms": 40,
                "overdue_ratio": 1.0,
                "result": {"ok": True},
                "error": None,
            }
            yield f"heartbeat.{agent}.{check}.success", _event("heartbeat.result", at, result)


def _event(event_type: str, at: int, payload: dict[str, Any]) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()),
        "event_type": event_type,
        "timestamp": at,
        "payload": payload,
    }


def rules(agents: int, checks: int) -> None:
    batch = [orjson.loads(orjson.dumps(e)) for _, e in events(agents, checks, T0)]
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    state = WatchState()
    started = time.perf_counter()
    for event in batch:  # as the monitor does: each agent's new view into its own map
        folded = observe_agent(state.agents, event, T0)
        if folded is not None:
            state.agents[folded[0]] = folded[1]
    took = time.perf_counter() - started
    del batch
    gc.collect()
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    print(f"rules: {grown / agents:,.0f} bytes per agent with {checks} checks (tracemalloc)")
    print(f"  observe: {len(state.agents) * (checks + 1) / took:,.0f} events/s")
    config = WatchConfig()
    started = time.perf_counter()
    state, _ = evaluate(state, config, T0 + 60_000)
    print(f"  evaluate {agents} agents: {(time.perf_counter() - started) * 1000:.1f} ms")
    started = time.perf_counter()
    body = orjson.dumps(status_document(state, config, T0 + 60_000, running=True))
    print(
        f"  status document: {(time.perf_counter() - started) * 1000:.1f} ms, "
        f"{len(body) / 1e6:.1f} MB of JSON"
    )
    print(f"  state file: {len(state.to_json()) / 1e6:.1f} MB")


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def on_broker(agents: int, checks: int) -> None:
    exchange_name = f"bench.hb.{uuid.uuid4().hex[:8]}"
    queue = f"bench.monitor.{uuid.uuid4().hex[:8]}"
    total = agents * (checks + 1)
    with tempfile.TemporaryDirectory() as tmp:
        monitor = Monitor(
            state_path=Path(tmp, "m.json"),
            bus=BusSettings(url=URL, exchange=exchange_name),
            queue_name=queue,
            prefetch=500,
        )
        await monitor.start()
        gc.collect()
        before = rss_kb()
        connection = await aio_pika.connect(URL)
        try:
            # Without confirms, so that the rate measured is the monitor's reading.
            channel = await connection.channel(publisher_confirms=False)
            exchange = await channel.get_exchange(exchange_name)
            now = int(time.time() * 1000)
            started = time.monotonic()
            for key, event in events(agents, checks, now):
                await exchange.publish(aio_pika.Message(orjson.dumps(event)), routing_key=key)
            while monitor.events < total:  # noqa: ASYNC110 (the monitor has no event for it)
                await asyncio.sleep(0.05)
            took = time.monotonic() - started
            gc.collect()
            after = rss_kb()
            await monitor.stop()
            assert len(monitor.state.agents) == agents
            print(
                f"monitor on the broker: {(after - before) * 1024 / agents:,.0f} bytes RSS per "
                f"agent ({agents} agents, {checks} checks each; {before / 1024:.0f} -> "
                f"{after / 1024:.0f} MB)"
            )
            print(f"  {total} events published and read in {took:.1f} s ({total / took:,.0f}/s)")
            await channel.queue_delete(queue)
            await channel.queue_delete(f"{queue}.dlq")
            await channel.exchange_delete(exchange_name)
            await channel.exchange_delete(f"{exchange_name}.dlx")
        finally:
            await connection.close()


def main() -> None:
    agents = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    checks = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    if os.environ.get("BENCH_PART") == "broker":
        asyncio.run(on_broker(agents, checks))
        return
    print(
        f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}"
    )
    rules(agents, checks)
    rules(agents, 1)
    subprocess.run(  # a fresh process: RSS is not muddied by part 1
        [sys.executable, __file__, str(agents), str(checks)],
        env={**os.environ, "BENCH_PART": "broker"},
        check=True,
    )


if __name__ == "__main__":
    main()
