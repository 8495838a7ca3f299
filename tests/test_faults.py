"""The fault suite: a real RabbitMQ, real consumers, and things going wrong on purpose.

Every test is bounded in time. Ticks in the stream tests are stamped a little ahead of
the clock (within the consumer's clock-skew tolerance) and each one makes the check
due, so that a tick held up by the fault is not dropped as stale: every tick the broker
confirmed must give exactly one run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest

from heartbeat_consumer import CheckConfig, register_handler
from heartbeat_consumer.bus.connection import REASON_HEADER
from heartbeat_consumer.bus.fleet import Fleet
from heartbeat_consumer.core.state import AgentState, CheckState
from heartbeat_consumer.core.timeutil import floor_to
from heartbeat_consumer.handlers.registry import unregister_handler
from heartbeat_consumer.runtime.store import StateStore

from .broker import Bus, drain_all, queue_stats, rabbitmqctl, running, settled, take, watching
from .helpers import BIN, envelope, memory_mb, now_ms, slot_tick, until, write

pytestmark = pytest.mark.rabbit

INTERVAL = 100
"""Tick interval and cadence of the stream tests (ms): each tick a new, due slot."""


@contextlib.contextmanager
def counting_handler(agent: str) -> Iterator[tuple[str, list[str]]]:
    """A handler registered for this test (30 ms long, so that a run is usually under
    way when the fault strikes); yields its name and the keys it ran."""
    name = f"count_{agent}"
    calls: list[str] = []

    @register_handler(name)
    async def count(payload: dict[str, Any], check: CheckConfig) -> dict[str, Any]:
        calls.append(payload["idempotency_key"])
        await asyncio.sleep(0.03)
        return {"status": "success"}

    try:
        yield name, calls
    finally:
        unregister_handler(name)


async def read_all(queue: aio_pika.abc.AbstractQueue) -> list[dict[str, Any]]:
    return [orjson.loads(message.body) for message in await drain_all(queue)]


STREAMED_CHECK = {"cadenceMs": INTERVAL, "timeoutMs": 10_000}
"""A check due on every tick of a stream. Its timeout is not the default (the cadence,
100 ms): a 30 ms handler can take longer than that while the event loop of a long
pytest process stalls (forking rabbitmqctl, a garbage collection). It then ends in a
result with status timeout, which is a result, but not the one a test expects."""


def outcomes(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The results among a check's events (whatever their status), not its started events."""
    return [e for e in events if "status" in e["payload"]]


def assert_all_succeeded(results: list[dict[str, Any]]) -> None:
    failed = [(e["payload"]["idempotency_key"], e["payload"]["status"]) for e in results]
    failed = [(key, status) for key, status in failed if status != "success"]
    assert not failed, f"{len(failed)} run(s) did not succeed: {failed[:5]}"


FAULTS = {
    "broker restart": [("stop_app",), ("start_app",), ("await_startup",)],
    "killed connections": [("close_all_connections", "test: fault injection")],
}


@pytest.mark.parametrize("fault", FAULTS)
async def test_fault_mid_stream_loses_no_acked_tick_and_runs_no_slot_twice(
    bus: Bus, tmp_path: Path, fault: str
) -> None:
    agent = bus.agent()
    with counting_handler(agent) as (handler, calls):
        config = write(tmp_path, agent, {"c": STREAMED_CHECK | {"handler": handler}})
        results = await bus.collector(f"heartbeat.{agent}.c.*", durable=True)
        state = tmp_path / "state.json"
        async with running(
            bus, agent, config, tick_interval_ms=INTERVAL, state_path=state
        ) as consumer:
            await take(results, 1)  # the start-up run
            first = floor_to(now_ms(), INTERVAL) + 30_000
            confirmed: set[int] = set()
            attempted: set[int] = set()

            async def inject() -> None:
                for args in FAULTS[fault]:
                    await rabbitmqctl(*args)

            injector: asyncio.Task[None] | None = None
            after_fault = 0
            for i in range(600):
                slot = first + i * INTERVAL
                attempted.add(slot)
                with contextlib.suppress(Exception):
                    tick = slot_tick(slot)
                    persistent = aio_pika.DeliveryMode.PERSISTENT
                    await asyncio.wait_for(
                        bus.publish("system.heartbeat.tick", tick, delivery_mode=persistent), 2
                    )
                    confirmed.add(slot)
                if i == 20:
                    injector = asyncio.create_task(inject())
                if injector is not None and injector.done():
                    after_fault += 1
                    if after_fault == 20:
                        break
                await asyncio.sleep(0.02)  # faster than the handler: a backlog builds
            assert injector is not None
            assert injector.done(), "the fault did not end"
            await injector

            seen: list[dict[str, Any]] = []
            for _ in range(600):  # up to a minute for the backlog
                with contextlib.suppress(Exception):
                    seen += outcomes(await read_all(results))
                slots = {int(e["payload"]["idempotency_key"].rsplit(":", 1)[1]) for e in seen}
                if confirmed <= slots and not await inbox_busy(bus, agent):
                    break
                await asyncio.sleep(0.1)
            metrics = consumer.metrics.render()
    assert len(confirmed) >= 30
    assert len(attempted) - len(confirmed) <= len(attempted) // 2
    by_slot = Counter(e["payload"]["idempotency_key"] for e in seen)
    missing = sorted(confirmed - slots)
    assert not missing, (
        f"{len(missing)} confirmed tick(s) without a result: {missing[:5]}; "
        + "; ".join(ran_or_not(state, f"{agent}:c:{slot}", calls, metrics) for slot in missing[:5])
    )
    assert slots <= attempted, "a result for a slot nobody ticked"
    assert_all_succeeded(seen)
    ran_twice = [key for key, n in Counter(calls).items() if n > 1]
    assert not ran_twice, f"handler ran twice for {ran_twice}"
    for key, n in by_slot.items():  # a re-sent result is the same event, not a new run
        if n > 1:
            ids = {e["event_id"] for e in seen if e["payload"]["idempotency_key"] == key}
            assert len(ids) == 1, f"{key}: {n} different results"
    saved, warning = StateStore(state).load()
    assert warning is None
    assert saved.check("c").last_run == max(confirmed | slots)


async def inbox_busy(bus: Bus, agent: str) -> bool:
    try:
        return await bus.count(f"agent.{agent}.inbox") > 0
    except Exception:
        return True


KILL_PLUGIN = """
import asyncio, pathlib
from heartbeat_consumer import register_handler

@register_handler("kill_me")
async def kill_me(tick_payload, check_config):
    calls = pathlib.Path(check_config.meta["calls"])
    with calls.open("a") as out:
        out.write(tick_payload["idempotency_key"] + "\\n")
    if pathlib.Path(check_config.meta["block"]).exists():
        await asyncio.sleep(3600)
    return {"status": "success"}
"""


async def test_sigkill_during_a_handler_keeps_the_state_and_reruns_the_slot_once(
    bus: Bus, tmp_path: Path
) -> None:
    agent = bus.agent()
    calls, block = tmp_path / "calls", tmp_path / "block"
    (tmp_path / "kill_plugin.py").write_text(KILL_PLUGIN)
    meta = {"calls": str(calls), "block": str(block)}
    check = {"cadenceMs": 60_000, "handler": "kill_me", "timeoutMs": 600_000, "meta": meta}
    config = write(tmp_path, agent, {"c": check})
    state = tmp_path / "state.json"
    current = floor_to(now_ms(), 60_000)
    StateStore(state).save(AgentState(checks={"c": CheckState(last_run=current, runs=7)}))
    before = state.read_bytes()
    events = await bus.collector(f"heartbeat.{agent}.#")
    argv = [BIN, "run", str(config), "--rabbit-url", bus.url, "--exchange", bus.exchange_name]
    argv += ["--handlers", str(tmp_path / "kill_plugin.py"), "--state", str(state)]
    argv += ["--every", "60s"]
    block.touch()
    proc = await asyncio.create_subprocess_exec(*argv, stderr=asyncio.subprocess.DEVNULL)
    try:
        await take(events, 1, within=20, skip_status=False)  # online
        slot = current + 60_000  # the next slot, due then (at most a minute ahead)
        await bus.publish("system.heartbeat.tick", slot_tick(slot))
        for _ in range(200):
            if calls.exists() and calls.read_text():
                break
            await asyncio.sleep(0.05)
        assert calls.read_text() == f"{agent}:c:{slot}\n", "the handler is running"
        proc.kill()
        await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
    assert state.read_bytes() == before, "the killed run left the state file as it was"
    assert StateStore(state).load()[1] is None, "and valid"
    await asyncio.sleep(0.5)
    assert await bus.count(f"agent.{agent}.inbox") == 1, "the unacked tick is back"

    block.unlink()
    proc = await asyncio.create_subprocess_exec(*argv, stderr=asyncio.subprocess.DEVNULL)
    try:
        found: list[str] = []
        for _ in range(200):
            found += [m.routing_key or "" for m in await drain_all(events)]
            if f"heartbeat.{agent}.c.success" in found and not await inbox_busy(bus, agent):
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # nothing more comes
        found += [m.routing_key or "" for m in await drain_all(events)]
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)
    assert calls.read_text() == f"{agent}:c:{slot}\n" * 2, "re-run once, with the same key"
    assert found.count(f"heartbeat.{agent}.c.success") == 1
    saved, _ = StateStore(state).load()
    assert saved.check("c").last_run == slot
    assert saved.check("c").runs == 8


FLOOD = "import sys; sys.stdout.write('x' * 100_000_000); sys.stderr.write('e' * 10_000_000)"


async def test_bad_handlers_are_bounded_and_reported_while_others_keep_running(
    bus: Bus, tmp_path: Path
) -> None:
    suffix = uuid.uuid4().hex[:6]

    async def hangs(payload: dict[str, Any], check: CheckConfig) -> dict[str, Any]:
        await asyncio.sleep(3600)
        return {"status": "success"}

    async def raises(payload: dict[str, Any], check: CheckConfig) -> dict[str, Any]:
        raise RuntimeError("boom")

    async def garbage(payload: dict[str, Any], check: CheckConfig) -> Any:
        return ["not", "a", "dict"]

    async def huge(payload: dict[str, Any], check: CheckConfig) -> dict[str, Any]:
        return {"status": "success", "blob": "y" * 20_000_000}

    handlers = {"hangs": hangs, "raises": raises, "garbage": garbage, "huge": huge}
    for name, func in handlers.items():
        register_handler(f"{name}_{suffix}")(func)
    checks: dict[str, dict[str, Any]] = {
        name: {"cadenceMs": 1, "handler": f"{name}_{suffix}", "timeoutMs": 4000}
        for name in handlers
    }
    checks["floods"] = {
        "cadenceMs": 1,
        "handler": "command",
        "timeoutMs": 30_000,
        "meta": {"argv": [sys.executable, "-c", FLOOD]},
    }
    checks["good"] = {"cadenceMs": 1, "handler": "default"}
    agents = {kind: bus.agent(kind[:2]) for kind in checks}
    for kind, agent in agents.items():
        write(tmp_path, agent, {kind: checks[kind]})
    results = await bus.collector("heartbeat.*.*.*")
    Path("/proc/self/clear_refs").write_text("5")  # noqa: ASYNC240 (reset the peak RSS)
    baseline = memory_mb("VmRSS")
    fleet = Fleet(tmp_path, bus.url, bus.exchange_name, tick_interval_ms=1000, rescan_s=3600)
    try:
        await fleet.start()  # each agent's start-up run, one after another
        startup = {orjson.loads(m.body)["payload"]["agent"]: m for m in await take(results, 6)}
        peak = memory_mb("VmHWM") - baseline
        payloads = {kind: orjson.loads(startup[a].body)["payload"] for kind, a in agents.items()}
        assert payloads["hangs"]["status"] == "timeout"
        assert payloads["raises"]["status"] == "failed"
        assert payloads["raises"]["error"] == "RuntimeError: boom"
        assert payloads["garbage"]["status"] == "failed"
        assert "handler returned list" in payloads["garbage"]["error"]
        assert payloads["huge"]["result"]["truncated"] is True
        assert len(startup[agents["huge"]].body) < 10_000, "a preview, not 20 MB"
        assert payloads["floods"]["status"] == "success"
        assert len(startup[agents["floods"]].body) < 100_000, "output tail only"
        assert payloads["good"]["status"] == "success"
        assert peak < 120, f"peak RSS grew {peak:.0f} MB (100 MB of output, 20 MB result)"

        await asyncio.sleep(1.05)  # the next slot: everything is due again
        loop = asyncio.get_running_loop()
        sent = loop.time()
        await bus.publish("system.heartbeat.tick", slot_tick(floor_to(now_ms(), 1000)))
        arrived: dict[str, float] = {}
        deadline = sent + 20
        while len(arrived) < 6 and loop.time() < deadline:
            for m in await drain_all(results):
                payload = orjson.loads(m.body)["payload"]
                if "check" in payload and m.routing_key and not m.routing_key.endswith("started"):
                    arrived[payload["check"]] = loop.time() - sent
            await asyncio.sleep(0.02)
        assert set(arrived) == set(checks), arrived
        assert arrived["good"] < 2.0, f"the good agent waited {arrived['good']:.1f} s"
        assert arrived["hangs"] >= 3.9, "the hung one ran to its timeout"
    finally:
        await fleet.stop()
        for name in handlers:
            unregister_handler(f"{name}_{suffix}")


async def statuses(queue: aio_pika.abc.AbstractQueue) -> list[tuple[str, dict[str, Any]]]:
    """(status word or check name, payload) of everything on ``queue`` now."""
    found = []
    for m in await drain_all(queue):
        key = m.routing_key or ""
        payload = orjson.loads(m.body)["payload"]
        if "._status." in key:
            found.append((key.rsplit(".", 1)[1], payload))
        elif not key.endswith(".started"):
            found.append((payload["check"], payload))
    return found


async def tick_and_see(
    bus: Bus, queue: aio_pika.abc.AbstractQueue, want: int
) -> list[tuple[str, dict[str, Any]]]:
    """Wait for the next 1 s slot, tick, and return the next ``want`` events (alive
    left out)."""
    await asyncio.sleep(1.05 - (now_ms() % 1000) / 1000)
    await bus.publish("system.heartbeat.tick", slot_tick(floor_to(now_ms(), 1000)))
    got: list[tuple[str, dict[str, Any]]] = []
    for _ in range(200):
        got += [e for e in await statuses(queue) if e[0] != "alive"]
        if len(got) >= want:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)
    return got + [e for e in await statuses(queue) if e[0] != "alive"]


async def test_config_edited_while_running_keeps_the_last_good_and_recovers(
    bus: Bus, tmp_path: Path
) -> None:
    agent = bus.agent()
    config = write(tmp_path, agent, {"a": {"cadenceMs": 1, "handler": "default"}})
    events = await bus.collector(f"heartbeat.{agent}.#")

    def body(check: str) -> bytes:
        checks = {check: {"cadenceMs": 1, "handler": "default"}}
        return orjson.dumps({"agent": agent, "checks": checks})

    async with running(bus, agent, config, tick_interval_ms=1000):
        assert [e[0] for e in await tick_and_see(bus, events, 3)] == ["online", "a", "a"]

        new = body("b")
        with config.open("r+b") as handle:  # a non-atomic write, seen half done
            handle.truncate(0)
            handle.write(new[: len(new) // 2])
            handle.flush()
            seen = dict(await tick_and_see(bus, events, 2))
            assert sorted(seen) == ["a", "config_invalid"], "the last good one runs"
            assert "JSON" in seen["config_invalid"]["error"], seen
            handle.write(new[len(new) // 2 :])
        assert [e[0] for e in await tick_and_see(bus, events, 1)] == ["b"], "recovered"

        for broken, why in [
            (new[:7], "JSON"),  # truncated
            (b'{"agent": "x", "checks": "c"}', "checks"),  # valid JSON, not a config
            (None, "No such file"),  # deleted
        ]:
            if broken is None:
                config.unlink()
            else:
                config.write_bytes(broken)
            seen = dict(await tick_and_see(bus, events, 2))
            assert sorted(seen) == ["b", "config_invalid"], "the last good one runs"
            assert why in seen["config_invalid"]["error"], seen

        staged = tmp_path / "staged.json"  # the atomic way: write aside, rename over
        staged.write_bytes(body("c"))
        staged.replace(config)
        assert [e[0] for e in await tick_and_see(bus, events, 1)] == ["c"], "recovered"


@contextlib.contextmanager
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MB tmpfs at ``tmp_path/disk`` (root only), unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
        check=False,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def remount(mount: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(mount)], check=True)


def fill(mount: Path) -> Path:
    filler = mount / "filler"
    with contextlib.suppress(OSError), filler.open("wb") as out:
        while True:
            out.write(b"\0" * 65536)
            out.flush()
            os.fsync(out.fileno())
    return filler


async def test_full_or_read_only_state_disk_is_reported_and_the_agent_keeps_running(
    bus: Bus, tmp_path: Path
) -> None:
    agent = bus.agent()
    config = write(tmp_path, agent, {"c": {"cadenceMs": 1, "handler": "default"}})
    events = await bus.collector(f"heartbeat.{agent}.#")
    with small_disk(tmp_path) as disk:
        state = disk / "state.json"
        remount(disk, "ro")  # read-only from the start: no exit, reported
        async with running(bus, agent, config, tick_interval_ms=1000, state_path=state) as c:
            seen = await statuses(events)
            assert [e[0] for e in seen] == ["online", "state_error", "c", "state_error"], seen
            assert "Read-only file system" in seen[1][1]["error"]
            health = await c.health()
            assert health.ok
            assert "Read-only" in health.detail["state_error"]

            remount(disk, "rw")
            assert [e[0] for e in await tick_and_see(bus, events, 2)] == ["c", "state_ok"]
            assert StateStore(state).load()[0].check("c").runs == 2

            filler = fill(disk)
            seen = await tick_and_see(bus, events, 2)
            assert [e[0] for e in seen] == ["c", "state_error"], seen
            assert "No space left on device" in seen[1][1]["error"]
            seen = await tick_and_see(bus, events, 2)
            assert [e[0] for e in seen] == ["c", "state_error"], "still running, still told"

            filler.unlink()
            assert [e[0] for e in await tick_and_see(bus, events, 2)] == ["c", "state_ok"]
            saved, warning = StateStore(state).load()
            assert warning is None
            assert saved.check("c").runs == 5, "memory kept the count"
            assert not list(disk.glob(".*.tmp")), "no temporary files left behind"


# --- hostile input: poison bodies, values out of range, floods ------------------------------

POISON: list[tuple[str, bytes]] = [
    # (content type, body): each contradicts its content type, or is no envelope at all
    ("application/json", b"not json at all"),
    ("text/plain", b"\xff\xfe\xfd not utf-8"),
    ("application/json; charset=utf-16", "[1, 2".encode("utf-16")),
    ("application/json; charset=x-no-such-charset", b"\x00\x01\x02"),
    ("application/json", b'["an", "array"]'),
    ("application/octet-stream", bytes(range(256))),
]


def utf16_tick(slot_ms: int, event_id: str) -> bytes:
    """A good tick in UTF-16 (its content type says so: a hint that is right)."""
    return orjson.dumps(slot_tick(slot_ms, event_id)).decode().encode("utf-16")


async def dead_letters(bus: Bus, queue: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    dlq = await bus.channel.declare_queue(queue, passive=True)
    return await drain_all(dlq)


def reason_of(message: aio_pika.abc.AbstractIncomingMessage) -> str:
    return str((message.headers or {}).get(REASON_HEADER))


async def test_poison_bodies_on_an_inbox_are_dead_lettered_and_the_next_tick_runs(
    bus: Bus, tmp_path: Path
) -> None:
    agent = bus.agent()
    config = write(tmp_path, agent, {"c": {"cadenceMs": 1, "handler": "default"}})
    results = await bus.collector(f"heartbeat.{agent}.c.*")
    keys = ["system.heartbeat.tick", *(f"agent.{agent}.heartbeat.{c}" for c in ("pause", "run"))]
    async with running(bus, agent, config, tick_interval_ms=1000):
        await take(results, 1)
        for key in keys:
            for content_type, body in POISON:
                await bus.publish(key, body, content_type=content_type)
        await asyncio.sleep(1.05)
        content_type = "application/json; charset=utf-16"
        await bus.publish(
            "system.heartbeat.tick", utf16_tick(now_ms(), "u"), content_type=content_type
        )
        (result,) = await take(results, 1, within=15)
        assert result.routing_key == f"heartbeat.{agent}.c.success"
        await settled(f"agent.{agent}.inbox")
    dead = await dead_letters(bus, f"agent.{agent}.dlq")
    assert len(dead) == len(keys) * len(POISON), [reason_of(m) for m in dead]
    assert all(reason_of(m) not in ("", "None") for m in dead)


@contextlib.asynccontextmanager
async def small_fleet(
    bus: Bus, tmp_path: Path, prefix: str, n: int
) -> AsyncIterator[tuple[list[str], aio_pika.abc.AbstractQueue]]:
    """A started fleet of ``n`` agents with an every-tick check ``c``, their start-up runs
    taken; the agents and the queue of their results."""
    agents = [bus.agent(prefix) for _ in range(n)]
    for agent in agents:
        write(tmp_path, agent, {"c": {"cadenceMs": 1, "handler": "default"}})
    results = await bus.collector("heartbeat.*.c.success")
    fleet = Fleet(tmp_path, bus.url, bus.exchange_name, tick_interval_ms=1000, rescan_s=3600)
    await fleet.start()
    try:
        await take(results, n)
        yield agents, results
        for agent in agents:
            await settled(f"agent.{agent}.inbox")
        assert (await fleet.health()).ok
    finally:
        await fleet.stop()


async def answered_by(results: aio_pika.abc.AbstractQueue, n: int) -> set[str]:
    return {orjson.loads(m.body)["payload"]["agent"] for m in await take(results, n)}


async def test_a_poison_tick_to_a_fleet_stops_no_agent(bus: Bus, tmp_path: Path) -> None:
    async with small_fleet(bus, tmp_path, "fp", 3) as (agents, results):
        for content_type, body in POISON:
            await bus.publish("system.heartbeat.tick", body, content_type=content_type)
        await asyncio.sleep(1.05)
        await bus.publish("system.heartbeat.tick", slot_tick(now_ms(), "real"))
        assert await answered_by(results, 3) == set(agents)


async def test_poison_bodies_do_not_freeze_the_monitor(bus: Bus, tmp_path: Path) -> None:
    async with watching(bus, tmp_path / "m.json") as monitor:
        for i in range(200):  # as many as its prefetch
            content_type, body = POISON[i % len(POISON)]
            await bus.publish("heartbeat.x.c.success", body, content_type=content_type)
        await bus.publish(
            "heartbeat.y._status.online",
            envelope("heartbeat.status", {"agent": "y", "status": "online"}),
        )
        await until(lambda: "y" in monitor.state.agents, within=20)
        await settled(monitor.queue.name)
        assert len(await dead_letters(bus, monitor.dlq_name)) == 200


OUT_OF_RANGE = [1e20, -1e20, "100000000000000000000", "10000-01-01T00:00:00Z", 253402300800000, -1]


async def test_ticks_and_pauses_out_of_range_are_dead_lettered_not_looped_or_kept(
    bus: Bus, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    agent = bus.agent()
    config = write(tmp_path, agent, {"c": {"cadenceMs": 1, "handler": "default"}})
    state = tmp_path / "state.json"
    results = await bus.collector(f"heartbeat.{agent}.c.*")
    pause = f"agent.{agent}.heartbeat.pause"
    async with running(bus, agent, config, tick_interval_ms=1000, state_path=state):
        await take(results, 1)
        for value in OUT_OF_RANGE:
            await bus.publish(
                "system.heartbeat.tick", {**slot_tick(0), "payload": {"epoch_ms": value}}
            )
            await bus.publish(pause, {**slot_tick(0), "payload": {"check": "c", "until": value}})
        await asyncio.sleep(1.05)
        await bus.publish("system.heartbeat.tick", slot_tick(now_ms(), "real"))
        (result,) = await take(results, 1)
        assert result.routing_key == f"heartbeat.{agent}.c.success", "no pause was kept"
        await settled(f"agent.{agent}.inbox")
    dead = await dead_letters(bus, f"agent.{agent}.dlq")
    assert len(dead) == 2 * len(OUT_OF_RANGE)
    assert all("range" in reason_of(m) or "not a time" in reason_of(m) for m in dead), [
        reason_of(m) for m in dead
    ]
    assert not [r for r in caplog.records if "returned to the queue" in r.getMessage()]
    assert StateStore(state).load()[0].pauses == {}
    # It starts again on the same state (the crash loop of a kept pause is gone).
    async with running(bus, agent, config, tick_interval_ms=1000, state_path=state) as again:
        assert (await again.health()).ok


async def test_a_flood_of_pauses_is_coalesced_bounded_and_does_not_starve_the_tick(
    bus: Bus, tmp_path: Path
) -> None:
    agent = bus.agent()
    checks = {
        "c": {"cadenceMs": 1, "handler": "default"},
        "d": {"cadenceMs": HOUR, "handler": "default", "enabled": False},
    }
    config = write(tmp_path, agent, checks)
    state = tmp_path / "state.json"
    results = await bus.collector(f"heartbeat.{agent}.c.*")
    pause = f"agent.{agent}.heartbeat.pause"
    reason = "r" * 10_000
    async with running(bus, agent, config, tick_interval_ms=1000, state_path=state) as consumer:
        await take(results, 1)
        store = consumer.agent.runner.store
        saves: list[int] = []
        save = store.save

        def counting(saved: AgentState) -> None:
            saves.append(1)
            save(saved)

        store.save = counting  # type: ignore[method-assign]
        for i in range(300):
            payload = {"check": f"nope{i}", "until": now_ms() + HOUR, "reason": reason}
            await bus.publish(pause, {**slot_tick(0, f"p{i}"), "payload": payload})
            payload = {"check": "d", "until": now_ms() + HOUR + i, "reason": reason}
            await bus.publish(pause, {**slot_tick(0, f"d{i}"), "payload": payload})
        await asyncio.sleep(1.05)
        await bus.publish("system.heartbeat.tick", slot_tick(now_ms(), "real"))
        (result,) = await take(results, 1, within=60)
        assert result.routing_key == f"heartbeat.{agent}.c.success"
        await settled(f"agent.{agent}.inbox")
    assert len(saves) <= 10, f"{len(saves)} state saves for 600 commands"
    saved = StateStore(state).load()[0]
    assert set(saved.pauses) == {"d"}
    assert len(saved.pauses["d"].reason or "") <= 500
    assert state.stat().st_size < 20_000, "the state stays small"
    dead = await dead_letters(bus, f"agent.{agent}.dlq")
    assert len(dead) == 300
    assert all("no check named" in reason_of(m) for m in dead)


HOUR = 3_600_000


async def test_dead_letters_are_bounded_and_expired_ticks_are_not_kept(
    bus: Bus, tmp_path: Path
) -> None:
    agent = bus.agent()
    config = write(tmp_path, agent, {"c": {"cadenceMs": HOUR, "handler": "default"}})
    async with running(bus, agent, config, tick_interval_ms=1000):
        pass
    dlq = {k: v for k, _, v in (await queue_stats(f"agent.{agent}.dlq"))["arguments"]}
    assert dlq["x-max-length"] == 10_000
    assert dlq["x-message-ttl"] == 7 * 24 * HOUR
    await bus.publish("system.heartbeat.tick", slot_tick(now_ms()), expiration=0.001)
    await bus.publish(f"agent.{agent}.heartbeat.run", b"x" * 300_000)
    await asyncio.sleep(0.3)  # the tick expires in the inbox while nobody consumes
    async with running(bus, agent, config, tick_interval_ms=1000):
        await settled(f"agent.{agent}.inbox")
    (dead,) = await dead_letters(bus, f"agent.{agent}.dlq")
    assert dead.routing_key == f"agent.{agent}.dlq"
    assert "malformed JSON" in reason_of(dead)
    assert len(dead.body) == 64 * 1024
    assert (dead.headers or {})["x-original-size"] == 300_000


async def test_an_inbox_declared_by_an_older_version_is_used_as_it_is(
    bus: Bus, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    agent = bus.agent()
    await bus.channel.declare_queue(
        f"agent.{agent}.inbox",
        durable=True,
        arguments={"x-dead-letter-exchange": "somewhere", "x-queue-type": "classic"},
    )
    config = write(tmp_path, agent, {"c": {"cadenceMs": HOUR, "handler": "default"}})
    results = await bus.collector(f"heartbeat.{agent}.c.*")
    async with running(bus, agent, config, tick_interval_ms=1000) as consumer:
        await take(results, 1)
        assert (await consumer.health()).ok
    assert any("exists with other arguments" in r.getMessage() for r in caplog.records)


async def test_a_batch_that_has_run_long_returns_the_rest_to_the_queue(
    bus: Bus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Read-ahead commands must not wait unacknowledged into RabbitMQ's consumer_timeout:
    after MAX_HOLD_S the batch hands back what it has not started; each still runs once."""
    from heartbeat_consumer.bus import consumer as consumer_module

    monkeypatch.setattr(consumer_module, "MAX_HOLD_S", 0.3)
    caplog.set_level(logging.INFO, "heartbeat_consumer.consumer")
    agent = bus.agent()
    runs: list[str] = []

    @register_handler(f"slow_{agent}")
    async def slow(payload: dict[str, Any], check: CheckConfig) -> dict[str, Any]:
        runs.append(check.name)
        await asyncio.sleep(0.5)
        return {"status": "success"}

    checks = {name: {"cadenceMs": HOUR, "handler": f"slow_{agent}"} for name in "abc"}
    config = write(tmp_path, agent, checks)
    results = await bus.collector(f"heartbeat.{agent}.*.success")
    try:
        async with running(bus, agent, config, tick_interval_ms=1000):
            await take(results, 1)  # the start-up run (one check per tick)
            for name in "abc":
                run = {**slot_tick(0, f"r{name}"), "payload": {"check": name, "force": True}}
                await bus.publish(f"agent.{agent}.heartbeat.run", run)
            got = {m.routing_key for m in await take(results, 3, within=20)}
            assert got == {f"heartbeat.{agent}.{name}.success" for name in "abc"}
            await settled(f"agent.{agent}.inbox")
        assert sorted(runs[1:]) == ["a", "b", "c"], runs
        assert "back to the queue (batch held)" in caplog.text
    finally:
        unregister_handler(f"slow_{agent}")


RAW_KINDS = [
    "timestamp",
    "header-timestamp",
    "content-type",
    "message-id",
    "reply-to",
    "header-name",
]


async def raw_publish(bus: Bus, routing_key: str, kind: str) -> None:
    """A message with properties Python cannot decode (tests/raw_publish.py)."""
    script = str(Path(__file__).with_name("raw_publish.py"))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, script, bus.url, bus.exchange_name, routing_key, kind
    )
    assert await proc.wait() == 0


async def test_properties_that_cannot_be_decoded_kill_no_connection(
    bus: Bus, tmp_path: Path
) -> None:
    """Such a message used to kill the connection in its reader, again after every
    reconnect: a whole fleet and the monitor off the bus for good."""

    async with (
        small_fleet(bus, tmp_path, "fr", 2) as (agents, results),
        watching(bus, tmp_path / "m.json") as monitor,
    ):
        for kind in RAW_KINDS:
            await raw_publish(bus, "system.heartbeat.tick", kind)
            await raw_publish(bus, "heartbeat.x.other.success", kind)
        await asyncio.sleep(1.05)
        await bus.publish("system.heartbeat.tick", slot_tick(now_ms(), "real"))
        assert await answered_by(results, 2) == set(agents)
        event = envelope("heartbeat.status", {"agent": "y", "status": "online"})
        await bus.publish("heartbeat.y._status.online", event)
        await until(lambda: "y" in monitor.state.agents)
        await settled(monitor.queue.name)


async def test_a_reply_to_on_a_delivery_is_never_answered(bus: Bus, tmp_path: Path) -> None:
    """FastStream answers a delivery that names a reply_to (to a queue, or to
    'key|exchange'): a neighbour could make every agent of a fleet publish, with its own
    credentials, to any queue, or tick every other agent. Nobody answers now."""

    replies = await bus.collector("test.replies")
    async with (
        small_fleet(bus, tmp_path, "rt", 2) as (agents, results),
        watching(bus, tmp_path / "m.json") as monitor,
    ):
        await asyncio.sleep(1.05)
        for reply_to in (replies.name, f"test.replies|{bus.exchange_name}"):
            await bus.publish("system.heartbeat.tick", slot_tick(now_ms()), reply_to=reply_to)
            event = envelope("heartbeat.status", {"agent": "z", "status": "online"})
            await bus.publish("heartbeat.z._status.online", event, reply_to=reply_to)
        assert await answered_by(results, 2) == set(agents)
        await until(lambda: "z" in monitor.state.agents)
        await settled(monitor.queue.name)
    assert await drain_all(replies) == [], "somebody answered a reply_to"


async def test_a_forced_run_redelivered_after_a_lost_connection_is_not_run_again(
    bus: Bus, tmp_path: Path
) -> None:
    """The run finishes while the connection is gone: its result is kept and re-sent, and
    the redelivered command, recognised by its event id, runs nothing a second time."""
    agent = bus.agent()
    calls: list[str] = []

    @register_handler(f"long_{agent}")
    async def long(payload: dict[str, Any], check: CheckConfig) -> dict[str, Any]:
        calls.append(payload["idempotency_key"])
        await asyncio.sleep(1.5)
        return {"status": "success"}

    config = write(tmp_path, agent, {"k": {"cadenceMs": HOUR, "handler": f"long_{agent}"}})
    results = await bus.collector(f"heartbeat.{agent}.k.success", durable=True)
    try:
        async with running(bus, agent, config, tick_interval_ms=1000) as consumer:
            await take(results, 1, within=15)  # the start-up run
            run = {**slot_tick(0, "forced-once"), "payload": {"check": "k", "force": True}}
            await bus.publish(f"agent.{agent}.heartbeat.run", run)
            await asyncio.sleep(0.5)
            await rabbitmqctl("close_all_connections", "test: mid-run")
            for _ in range(300):  # both ends reconnect (about 5 s)
                with contextlib.suppress(Exception):
                    if (await consumer.health()).ok and await bus.count(results.name) >= 1:
                        break
                await asyncio.sleep(0.1)
            await asyncio.sleep(3)  # time for a second run, if there were one
            await settled(f"agent.{agent}.inbox", within=20)
        assert len(calls) == 2, f"the forced run ran {len(calls) - 1} times: {calls}"
        assert await bus.count(results.name) == 1, "its result was re-sent, once"
    finally:
        unregister_handler(f"long_{agent}")


def ran_or_not(state: Path, key: str, calls: list[str], metrics: bytes) -> str:
    """What became of a (agent, slot) without a result: did its handler run, does the
    agent's state have the run, what did the agent run around it, and the agent's
    counters of ticks (by outcome), runs (by status), dead letters and runs avoided."""
    agent, _, slot = key.split(":")
    saved, _ = StateStore(state).load()
    runs = [entry.slot for entry in saved.history if entry.check == "c"]
    near = [r for r in runs if abs(r - int(slot)) <= 1000]
    families = ("ticks_received", "checks_run", "dead_lettered", "runs_avoided")
    counters = [
        line.removeprefix("heartbeat_")
        for line in metrics.decode().splitlines()
        if f'agent="{agent}"' in line
        and line.startswith(tuple(f"heartbeat_{f}_total" for f in families))
    ]
    return (
        f"{key}: handler ran {calls.count(key)}x, in state {int(slot) in runs}, "
        f"runs {near}, counters {counters}"
    )


async def test_killed_connection_with_a_fleet_s_confirms_in_flight_loses_nothing_acked(
    bus: Bus, tmp_path: Path
) -> None:
    """Twelve agents of one fleet share one connection; every tick makes each of them
    publish a started event and a result (30 ms apart) and wait for their confirms, so
    at any moment a batch of confirms from several agents is in flight on it. The
    connection is killed mid-stream: every tick the broker confirmed still gives each
    agent exactly one run and one result (a result re-sent is the same event), and
    every agent's saved state has the last slot."""
    agents = sorted(bus.agent("k") for _ in range(12))
    with counting_handler(agents[0]) as (name, calls):
        configs, states = tmp_path / "configs", tmp_path / "state"
        configs.mkdir()
        for agent in agents:
            (configs / f"{agent}.heartbeat.json").write_bytes(
                orjson.dumps({"agent": agent, "checks": {"c": STREAMED_CHECK | {"handler": name}}})
            )
        results = await bus.collector("heartbeat.*.c.*", durable=True)
        fleet = Fleet(
            configs,
            bus.url,
            bus.exchange_name,
            tick_interval_ms=INTERVAL,
            state_dir=states,
            rescan_s=3600,
        )
        seen: list[dict[str, Any]] = []
        confirmed: set[int] = set()
        try:
            await fleet.start()
            # Stamped 50 s ahead (the skew tolerance is 60 s): no tick of the stream expires
            # (stale, 2 intervals after its slot) while the backlog is worked off.
            first = floor_to(now_ms(), INTERVAL) + 50_000
            injector: asyncio.Task[str] | None = None
            after_fault = 0
            for i in range(400):
                slot = first + i * INTERVAL
                with contextlib.suppress(Exception):
                    persistent = aio_pika.DeliveryMode.PERSISTENT
                    await asyncio.wait_for(
                        bus.publish(
                            "system.heartbeat.tick", slot_tick(slot), delivery_mode=persistent
                        ),
                        2,
                    )
                    confirmed.add(slot)
                if i == 10:
                    injector = asyncio.create_task(
                        rabbitmqctl("close_all_connections", "test: confirms in flight")
                    )
                if injector is not None and injector.done():
                    after_fault += 1
                    if after_fault == 10:
                        break
                await asyncio.sleep(0.05)
            assert injector is not None and injector.done(), "the fault did not end"
            await injector
            want = {f"{agent}:c:{slot}" for agent in agents for slot in confirmed}
            for _ in range(600):  # up to a minute for the backlog
                with contextlib.suppress(Exception):
                    seen += outcomes(await read_all(results))
                if want <= {e["payload"]["idempotency_key"] for e in seen}:
                    break
                await asyncio.sleep(0.1)
            metrics = fleet.metrics.render()
        finally:
            await fleet.stop()
    assert len(confirmed) >= 15
    keys = {e["payload"]["idempotency_key"] for e in seen}
    missing = sorted(want - keys)
    assert not missing, (
        f"{len(missing)} confirmed (agent, tick) without a result: {missing[:5]}; "
        + "; ".join(
            ran_or_not(states / f"{key.split(':')[0]}.state.json", key, calls, metrics)
            for key in missing[:5]
        )
    )
    assert_all_succeeded(seen)
    ran_twice = [key for key, n in Counter(calls).items() if n > 1]
    assert not ran_twice, f"handler ran twice for {ran_twice[:5]}"
    for key in keys:  # a re-sent result is the same event, not a new run
        ids = {e["event_id"] for e in seen if e["payload"]["idempotency_key"] == key}
        assert len(ids) == 1, f"{key}: {len(ids)} different results"
    for agent in agents:
        saved, warning = StateStore(states / f"{agent}.state.json").load()
        assert warning is None
        ran = {int(k.rsplit(":", 1)[1]) for k in keys if k.startswith(f"{agent}:")}
        assert saved.check("c").last_run == max(ran), agent
