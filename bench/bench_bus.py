"""Fleet throughput and tick-to-result latency on a real RabbitMQ, against a raw aio-pika
echo measured in the same run.

Run: make bench   (or .venv/bin/python bench/bench_bus.py [N ...]; RABBIT_URL or localhost)
BENCH_PROFILE=FILE writes the fleet child's cProfile statistics to FILE.

The system under test runs in a child process; this process is the ticker and the
collector. Both sides see the same traffic:

- ticks ``system.heartbeat.tick`` to a topic exchange, bound by N queues;
- each queue's consumer (prefetch 1, manual ack) replies under
  ``heartbeat.<agent>.c.success`` (persistent, publisher confirms) and then acks;
- a collector queue bound to ``heartbeat.#`` counts the replies.

The baseline is that echo in raw aio-pika: nothing else, the practical limit of one
Python process on this broker. A second baseline, "echo + the same I/O", does per reply
the I/O the project's guarantees require (a ``started`` event, the result, an atomic
state write with fsync, then the ack), to tell that cost from the framework's.

The project is a ``Fleet`` of N agents whose one check
(handler ``default``, a no-op) is due on every tick: per tick and agent it evaluates the
config, publishes ``started`` and the result, saves the state file (fsync) and acks.

Throughput: K ticks sent at once (each a new slot, 100 ms apart), replies per second
until all K x N arrived. Latency: one agent, one tick at a time, from publish to the
result's arrival; p50 and p99 of 300.
"""

from __future__ import annotations

import asyncio
import cProfile
import logging
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import orjson

from heartbeat_consumer.bus.fleet import Fleet
from heartbeat_consumer.bus.settings import BusSettings, InboxSettings
from heartbeat_consumer.runtime.store import atomic_write

URL = os.environ.get("RABBIT_URL", "amqp://guest:guest@localhost:5672/")
INTERVAL_MS = 100
TICKS = {1: 300, 100: 20, 1000: 5}
AHEAD_MS = 20_000
"""Slots start this far ahead of the clock (within the consumer's skew tolerance), so
that no tick of a long burst turns stale before it is handled."""
LATENCY_SAMPLES = 300


def tick(slot_ms: int) -> bytes:
    return orjson.dumps(
        {
            "event_id": f"bench-{slot_ms}",
            "event_type": "system.heartbeat.tick",
            "timestamp": slot_ms,
            "payload": {"epoch_ms": slot_ms},
        }
    )


# --- the systems under test (child processes) --------------------------------------------


async def serve_echo(n: int, exchange_name: str, same_work: bool = False) -> None:
    """The raw echo; with ``same_work``, each reply also does the project's required I/O:
    a ``started`` event first and a state file written atomically with fsync (in a
    thread) before the ack."""
    with tempfile.TemporaryDirectory(prefix="bench-echo-") as tmp:
        await _serve_echo(n, exchange_name, Path(tmp), same_work)


async def until_terminated() -> None:
    """Wait for the parent's SIGTERM, then return (so that ``with`` blocks clean up)."""
    stopped = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopped.set)
    await stopped.wait()


async def _serve_echo(n: int, exchange_name: str, state_dir: Path, same_work: bool) -> None:
    connection = await aio_pika.connect(URL)
    consume = await connection.channel()
    await consume.set_qos(prefetch_count=1)
    publish = await connection.channel()
    exchange = await publish.declare_exchange(exchange_name, "topic", durable=True)
    for i in range(n):
        queue = await consume.declare_queue(f"{exchange_name}.echo.{i}", durable=True)
        await queue.bind(exchange_name, "system.heartbeat.#")
        key = f"heartbeat.e{i}.c.success"

        async def reply(
            message: aio_pika.abc.AbstractIncomingMessage, key: str = key, i: int = i
        ) -> None:
            body = orjson.loads(message.body)
            out = {"event_id": str(uuid.uuid4()), "slot": body["payload"]["epoch_ms"]}
            persistent = aio_pika.DeliveryMode.PERSISTENT
            if same_work:
                started = aio_pika.Message(orjson.dumps(out), delivery_mode=persistent)
                await exchange.publish(started, routing_key=f"heartbeat.e{i}.c.started")
            await exchange.publish(
                aio_pika.Message(orjson.dumps(out), delivery_mode=persistent), routing_key=key
            )
            if same_work:
                await asyncio.to_thread(atomic_write, state_dir / f"{i}.json", orjson.dumps(out))
            await message.ack()

        await queue.consume(reply)
    print("READY", flush=True)
    await until_terminated()
    await connection.close()


def fleet_agent(exchange_name: str, i: int) -> str:
    """The name of the fleet's i-th agent (unique per run: the exchange's suffix)."""
    return f"{exchange_name.rsplit('.', 1)[1]}f{i}"


def write_fleet(directory: Path, n: int, exchange_name: str) -> tuple[Path, Path]:
    """N agent configs with one check due on every tick; the configs and state dirs."""
    configs, states = directory / "configs", directory / "state"
    configs.mkdir()
    states.mkdir()
    checks = {"c": {"cadenceMs": INTERVAL_MS, "handler": "default"}}
    for i in range(n):
        agent = fleet_agent(exchange_name, i)
        Path(configs, f"{agent}.heartbeat.json").write_bytes(
            orjson.dumps({"agent": agent, "checks": checks})
        )
    return configs, states


async def serve_fleet(n: int, exchange_name: str) -> None:
    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        configs, states = write_fleet(Path(tmp), n, exchange_name)
        fleet = Fleet(
            configs,
            bus=BusSettings(url=URL, exchange=exchange_name),
            inbox=InboxSettings(tick_interval_ms=INTERVAL_MS),
            state_dir=states,
            rescan_s=3600,
        )
        await fleet.start()
        profile = os.environ.get("BENCH_PROFILE")  # a file: the fleet's cProfile stats
        profiler = cProfile.Profile()
        if profile:
            profiler.enable()
        print("READY", flush=True)
        await until_terminated()
        if profile:
            profiler.disable()
            profiler.dump_stats(profile)
        await fleet.stop()


# --- the driver -------------------------------------------------------------------------


class Bench:
    def __init__(self, exchange_name: str) -> None:
        self.exchange_name = exchange_name
        self.arrived: list[float] = []
        self.waiter: asyncio.Event = asyncio.Event()
        self.want = 0
        self.celery_agents: list[str] = []

    async def open(self) -> None:
        self.connection = await aio_pika.connect(URL)
        self.channel = await self.connection.channel()
        await self.channel.set_qos(prefetch_count=2000)
        self.exchange = await self.channel.declare_exchange(
            self.exchange_name, "topic", durable=True
        )
        self.results = await self.channel.declare_queue(f"{self.exchange_name}.collect")
        await self.results.bind(self.exchange, "heartbeat.*.*.success")
        await self.results.consume(self.on_result, no_ack=True)

    async def on_result(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self.arrived.append(time.perf_counter())
        if len(self.arrived) >= self.want:
            self.waiter.set()

    async def until(self, total: int, within_s: float) -> None:
        """Wait until ``total`` replies have arrived since the start."""
        self.want = total
        self.waiter.clear()
        if len(self.arrived) < total:
            await asyncio.wait_for(self.waiter.wait(), within_s)

    async def send(self, slot_ms: int) -> None:
        if self.celery_agents:  # Celery has no fan-out: a task per agent and tick
            queue = celery_queue(self.exchange_name)
            await asyncio.gather(
                *(
                    self.channel.default_exchange.publish(celery_task(agent, slot_ms), queue)
                    for agent in self.celery_agents
                )
            )
            return
        await self.exchange.publish(aio_pika.Message(tick(slot_ms)), "system.heartbeat.tick")

    async def close(self, n: int, kind: str) -> None:
        await self.channel.close()  # our consumer goes before its queue
        channel = await self.connection.channel()
        await channel.queue_delete(f"{self.exchange_name}.collect")
        if kind in CELERY_POOLS:  # the worker declares an exchange of the queue's name
            await channel.queue_delete(celery_queue(self.exchange_name))
            await channel.exchange_delete(celery_queue(self.exchange_name))
        for i in range(n):
            if kind in CELERY_POOLS:
                break
            if kind.startswith("echo"):
                await channel.queue_delete(f"{self.exchange_name}.echo.{i}")
            else:
                agent = fleet_agent(self.exchange_name, i)
                await channel.queue_delete(f"agent.{agent}.inbox")
                await channel.queue_delete(f"agent.{agent}.dlq")
        await channel.exchange_delete(self.exchange_name)
        await channel.exchange_delete(f"{self.exchange_name}.dlx")
        await self.connection.close()


PEERS = Path(__file__).with_name(".peers")
"""The peers' own environment (``make bench`` makes it): Celery, not a project dependency."""
CELERY_POOLS = {
    "celery-solo": ["--pool", "solo"],
    "celery-threads": ["--pool", "threads", "-c", "8"],
}


def celery_queue(exchange_name: str) -> str:
    return f"{exchange_name}.celery"


def celery_task(agent: str, slot_ms: int) -> aio_pika.Message:
    """A Celery task message (protocol 2) for ``peer.beat(agent, slot_ms)``, as Celery's
    own client sends it: persistent, JSON."""
    task_id = str(uuid.uuid4())
    headers: dict[str, Any] = {
        "lang": "py",
        "task": "peer.beat",
        "id": task_id,
        "root_id": task_id,
        "parent_id": None,
        "group": None,
        "retries": 0,
        "eta": None,
        "expires": None,
        "timelimit": [None, None],
        "argsrepr": repr((agent, slot_ms)),
        "kwargsrepr": "{}",
        "origin": "bench_bus",
    }
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    return aio_pika.Message(
        orjson.dumps([[agent, slot_ms], {}, embed]),
        headers=headers,
        content_type="application/json",
        content_encoding="utf-8",
        correlation_id=task_id,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


async def start_child(kind: str, n: int, exchange_name: str) -> asyncio.subprocess.Process:
    if kind in CELERY_POOLS:
        env = {
            **os.environ,
            "BENCH_URL": URL,
            "BENCH_EXCHANGE": exchange_name,
        }
        argv = [str(PEERS / "bin" / "celery"), "-A", "celery_peer", "worker"]
        level = os.environ.get("BENCH_CELERY_LOG", "warning")  # info: a line per task
        argv += [*CELERY_POOLS[kind], "-Q", celery_queue(exchange_name), "-l", level]
        argv += ["--without-heartbeat", "--without-mingle", "--without-gossip"]
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=Path(__file__).parent, env=env, stdout=asyncio.subprocess.PIPE
        )
    else:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--serve",
            kind,
            str(n),
            exchange_name,
            stdout=asyncio.subprocess.PIPE,
        )
    assert proc.stdout is not None
    deadline = time.monotonic() + 600
    while (line := await asyncio.wait_for(proc.stdout.readline(), 600)).strip() != b"READY":
        assert line and time.monotonic() < deadline, "the child ended before it was ready"
    return proc


def next_slot() -> int:
    now = int(time.time() * 1000)
    return now - now % INTERVAL_MS + INTERVAL_MS


async def run(kind: str, n: int, ticks: int) -> tuple[float, list[float]]:
    """Replies per second for ``ticks`` ticks sent at once to ``n`` agents; with
    ``ticks`` 0, the latencies (ms) of one tick at a time instead."""
    exchange_name = f"bench.{uuid.uuid4().hex[:8]}"
    bench = Bench(exchange_name)
    await bench.open()
    if kind in CELERY_POOLS:
        bench.celery_agents = [f"{exchange_name.rsplit('.', 1)[1]}c{i}" for i in range(n)]
        await bench.channel.declare_queue(celery_queue(exchange_name), durable=True)
    try:
        proc = await start_child(kind, n, exchange_name)
    except BaseException:
        await bench.close(n, kind)
        raise
    try:
        if kind == "fleet":  # each agent's start-up run
            await bench.until(n, 120)
        await asyncio.sleep(0.5)
        first = next_slot() + AHEAD_MS
        samples: list[float] = []
        if not ticks:
            for i in range(LATENCY_SAMPLES):
                sent = time.perf_counter()
                await bench.send(first + i * INTERVAL_MS)
                await bench.until(len(bench.arrived) + 1, 10)
                samples.append((bench.arrived[-1] - sent) * 1000)
            return 0.0, samples
        before = len(bench.arrived)
        started = time.perf_counter()
        for i in range(ticks):
            await bench.send(first + i * INTERVAL_MS)
        # A Celery pool that stalls (the solo pool did, with many tasks queued) is
        # reported as such rather than waited for.
        await bench.until(before + ticks * n, 60 if kind in CELERY_POOLS else 300)
        return ticks * n / (bench.arrived[-1] - started), samples
    finally:
        proc.terminate()
        await proc.wait()
        await bench.close(n, kind)


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


async def main(sizes: list[int]) -> None:
    cpu = platform.processor() or platform.machine()
    print(f"# bus benchmarks, {time.strftime('%Y-%m-%d')}, {cpu}, {os.cpu_count()} cores, ", end="")
    print(f"python {platform.python_version()}, broker {URL.split('@')[-1]}")
    print()
    peers = list(CELERY_POOLS) if (PEERS / "bin" / "celery").exists() else []
    if not peers:
        print(f"(Celery is not measured: {PEERS} is missing; `make bench` makes it)\n")
    header = "| agents | ticks | raw aio-pika echo | echo + the same I/O "
    header += "".join(f"| Celery, {kind.split('-')[1]} pool " for kind in peers)
    print(header + "| heartbeat-consumer | ratio to echo | ratio to echo + same I/O |")
    print("|---:|---:|---:|---:|" + "---:|" * len(peers) + "---:|---:|---:|")
    for n in sizes:
        ticks = TICKS.get(n, max(5, 2000 // n))
        echo, _ = await run("echo", n, ticks)
        same, _ = await run("echo-same-work", n, ticks)
        celery: list[float | None] = []
        for kind in peers:
            try:
                celery.append((await run(kind, n, ticks))[0])
            except TimeoutError:
                celery.append(None)
        fleet, _ = await run("fleet", n, ticks)
        print(
            f"| {n} | {ticks} | {echo:,.0f}/s | {same:,.0f}/s "
            + "".join("| stalled " if c is None else f"| {c:,.0f}/s " for c in celery)
            + f"| {fleet:,.0f}/s | {fleet / echo:.2f}x | {fleet / same:.2f}x |",
            flush=True,
        )
    if peers:
        print(
            "\nPer task Celery (acks_late, prefetch 1, persistent, confirmed) publishes one"
            " result and acks; it keeps no state (no fsync) and sends no started event,"
            " which heartbeat-consumer does per tick and agent."
        )
    latencies = {
        "raw aio-pika echo": (await run("echo", 1, 0))[1],
        "heartbeat-consumer": (await run("fleet", 1, 0))[1],
    }
    if latencies:
        print()
        print(f"tick to result, one agent, {LATENCY_SAMPLES} ticks one at a time (ms)")
        print()
        print("| | p50 | p99 | max |")
        print("|---|---:|---:|---:|")
        for name, samples in latencies.items():
            p50, p99 = statistics.median(samples), percentile(samples, 99)
            print(f"| {name} | {p50:.2f} | {p99:.2f} | {max(samples):.2f} |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        kind, count, name = sys.argv[2], int(sys.argv[3]), sys.argv[4]
        if kind == "fleet":
            asyncio.run(serve_fleet(count, name))
        else:
            asyncio.run(serve_echo(count, name, same_work=kind == "echo-same-work"))
    else:
        asyncio.run(main([int(a) for a in sys.argv[1:]] or [1, 100, 1000]))
