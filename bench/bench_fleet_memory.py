"""Process RSS of a fleet of N agents on a real RabbitMQ (default: 1, 100, 1000, 10000),
and what one process per agent would cost instead.

Run: .venv/bin/python bench/bench_fleet_memory.py [N ...]   (RABBIT_URL or localhost)
Each size runs in a fresh process; the queues and exchanges it declares are deleted.
For one process per agent, 10 ``heartbeat-consumer run`` processes are started side by
side and measured once connected: RSS each, and PSS (shared pages divided among the
processes that share them), which is what N of them would add up to.
"""

from __future__ import annotations

import asyncio
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aio_pika
import orjson

from heartbeat_consumer.bus.fleet import START_CONCURRENCY, Fleet
from heartbeat_consumer.bus.settings import BusSettings
from heartbeat_consumer.core.topology import DEFAULT_URL

URL = os.environ.get("RABBIT_URL", DEFAULT_URL)


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def write_configs(directory: str, agents: list[str]) -> None:
    for agent in agents:
        checks = {"c": {"cadenceMs": 3_600_000, "handler": "default"}}
        Path(directory, f"{agent}.heartbeat.json").write_bytes(
            orjson.dumps({"agent": agent, "checks": checks})
        )


def new_fleet(directory: str, exchange: str, concurrency: int) -> Fleet:
    return Fleet(
        directory,
        bus=BusSettings(url=URL, exchange=exchange),
        rescan_s=3600,
        start_concurrency=concurrency,
    )


async def measure(n: int, concurrency: int) -> None:
    exchange = f"bench.hb.{uuid.uuid4().hex[:8]}"
    agents = [f"b{uuid.uuid4().hex[:10]}" for _ in range(n)]
    with tempfile.TemporaryDirectory() as tmp:
        write_configs(tmp, agents)
        before = rss_mb()
        started = time.monotonic()
        fleet = new_fleet(tmp, exchange, concurrency)
        await fleet.start()
        took = time.monotonic() - started
        first = fleet.last_start
        await asyncio.sleep(1)
        after = rss_mb()
        await fleet.stop()
        # A restart: the same agents, their queues and state files there already.
        again = new_fleet(tmp, exchange, concurrency)
        await again.start()
        restart = again.last_start
        await again.stop()
    await delete(exchange, agents)
    per_agent = (after - before) / n * 1024
    print(
        f"{n:>6} agents  RSS {after:7.1f} MB  (+{per_agent:6.1f} KB/agent)  "
        f"{concurrency:>2} at once: new {took:5.1f} s (consuming after "
        f"{first.consuming_s:5.2f} s); restart: consuming after {restart.consuming_s:5.2f} s, "
        f"evaluated after {restart.evaluated_s:5.2f} s"
    )


def pss_mb(pid: int) -> tuple[float, float]:
    """(RSS, PSS) of a process in MB."""
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        parts = line.split()
        if parts[0] in ("Rss:", "Pss:"):
            values[parts[0]] = int(parts[1]) / 1024
    return values["Rss:"], values["Pss:"]


def one_process_per_agent(count: int = 10) -> None:
    exchange = f"bench.hb.{uuid.uuid4().hex[:8]}"
    agents = [f"p{uuid.uuid4().hex[:10]}" for _ in range(count)]
    binary = str(Path(sys.executable).with_name("heartbeat-consumer"))
    with tempfile.TemporaryDirectory() as tmp:
        write_configs(tmp, agents)
        procs = []
        for agent in agents:
            config = str(Path(tmp, f"{agent}.heartbeat.json"))
            argv = [binary, "run", config, "--rabbit-url", URL, "--exchange", exchange]
            argv += ["--state", str(Path(tmp, f"{agent}.state.json"))]
            procs.append(subprocess.Popen(argv, stderr=subprocess.DEVNULL))
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if all(Path(tmp, f"{a}.state.json").exists() for a in agents):
                    break
                time.sleep(0.2)
            time.sleep(2)
            sizes = [pss_mb(p.pid) for p in procs]
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(30)
    asyncio.run(delete(exchange, agents))
    rss = sum(r for r, _ in sizes) / count
    pss = sum(p for _, p in sizes) / count
    print(
        f"one process per agent ({count} running): RSS {rss:.1f} MB each, PSS {pss:.1f} MB each;"
        f" 1,000 agents would take about {pss * 1000 / 1024:.1f} GB"
    )


async def delete(exchange: str, agents: list[str]) -> None:
    connection = await aio_pika.connect(URL)
    channel = await connection.channel()
    for agent in agents:
        await channel.queue_delete(f"agent.{agent}.inbox")
        await channel.queue_delete(f"agent.{agent}.dlq")
    await channel.exchange_delete(exchange)
    await channel.exchange_delete(f"{exchange}.dlx")
    await connection.close()


def main() -> None:
    sizes = [int(a) for a in sys.argv[1:]] or [1, 100, 1000, 10000]
    if os.environ.get("BENCH_CHILD"):
        asyncio.run(measure(sizes[0], int(os.environ["BENCH_CONCURRENCY"])))
        return
    machine = f"{platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}"
    print(f"fleet memory, {machine}")
    for n in sizes:  # one agent at a time (as before 2026-12-01) as the baseline, then ours
        for concurrency in (1, START_CONCURRENCY):
            env = {**os.environ, "BENCH_CHILD": "1", "BENCH_CONCURRENCY": str(concurrency)}
            subprocess.run([sys.executable, __file__, str(n)], env=env, check=True)
    one_process_per_agent()


if __name__ == "__main__":
    main()
