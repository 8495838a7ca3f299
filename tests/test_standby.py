"""Replicas of one agent (``--standby``) on a real RabbitMQ: one consumes, the others
follow its state on the bus and take over without running a slot twice.

Every run is counted by its idempotency key (the handler writes it down), and each
result says which replica ran it (``state_change.replica``)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from heartbeat_consumer import CheckConfig, register_handler
from heartbeat_consumer.bus.consumer import HeartbeatConsumer
from heartbeat_consumer.bus.fleet import Fleet
from heartbeat_consumer.bus.settings import BusSettings, InboxSettings
from heartbeat_consumer.core.timeutil import floor_to
from heartbeat_consumer.core.topology import node_urls
from heartbeat_consumer.handlers.registry import unregister_handler
from heartbeat_consumer.runtime.store import StateStore

from .broker import Bus, proxy_to
from .helpers import envelope, now_ms, slot_tick, until, write
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


@contextlib.contextmanager
def keys_handler(agent: str) -> Iterator[tuple[str, list[str]]]:
    name = f"keys_{agent}"
    calls: list[str] = []

    @register_handler(name)
    async def record(payload: dict[str, Any], check: CheckConfig) -> dict[str, Any]:
        calls.append(payload["idempotency_key"])
        return {"status": "success"}

    try:
        yield name, calls
    finally:
        unregister_handler(name)


def replica(
    bus: Bus, agent: str, config: Path, name: str, tmp_path: Path, *, url: str = ""
) -> HeartbeatConsumer:
    directory = tmp_path / name
    directory.mkdir(exist_ok=True)
    inbox = InboxSettings(queue_type="quorum", replica=name, tick_interval_ms=SLOT)
    return consumer_on(bus, agent, config, directory, inbox, url=url)


def consumer_on(
    bus: Bus, agent: str, config: Path, directory: Path, inbox: InboxSettings, *, url: str = ""
) -> HeartbeatConsumer:
    """A consumer of ``agent`` on the test's exchange, its state in ``directory``."""
    return HeartbeatConsumer(
        agent,
        config,
        bus=BusSettings(url=url or bus.url, exchange=bus.exchange_name),
        inbox=inbox,
        state_path=directory / "state.json",
    )


@pytest.fixture
async def stopping() -> AsyncIterator[list[HeartbeatConsumer]]:
    started: list[HeartbeatConsumer] = []
    yield started
    for consumer in started:
        with contextlib.suppress(Exception):
            await consumer.stop()


async def test_the_standby_follows_runs_and_pauses_and_takes_over_without_a_double_run(
    anybus: Bus, tmp_path: Path, stopping: list[HeartbeatConsumer]
) -> None:
    """Replica a consumes; b follows. a runs slot 1 and takes a pause; a stops. b, now
    the active consumer, holds the pause at slot 2 (nothing runs), and after the resume
    runs slot 3: each slot once, and b's state file has what a did."""
    bus = anybus
    agent = bus.agent()
    replicas_of(bus, agent, "a", "b")
    with keys_handler(agent) as (handler, calls):
        config = write(
            tmp_path, agent, {"c": {"cadenceMs": 1, "timeoutMs": 10_000, "handler": handler}}
        )
        results = await bus.collector(f"heartbeat.{agent}.c.*")
        answers = await bus.collector(f"heartbeat.{agent}._command.*")
        a, b = (replica(bus, agent, config, n, tmp_path) for n in ("a", "b"))
        stopping += [a, b]
        await a.start()
        await b.start()
        base = floor_to(now_ms(), SLOT) + 5 * SLOT  # ahead: no tick here goes stale
        await bus.publish("system.heartbeat.tick", slot_tick(base + SLOT))
        (first,) = await wait_results(results, 1)
        assert first["state_change"]["replica"] == "a"
        assert first["idempotency_key"] == f"{agent}:c:{base + SLOT}"
        await bus.publish(f"agent.{agent}.heartbeat.pause", envelope("pause", {"check": "c"}))
        await wait_results(answers, 1)
        await until(lambda: "c" in b.agent_consumer.runner.state.pauses, within=10)
        saved, _ = StateStore(tmp_path / "b" / "state.json").load()
        assert saved.check("c").last_run == base + SLOT, "b saved a's run"
        assert "c" in saved.pauses

        await a.stop()
        await bus.publish("system.heartbeat.tick", slot_tick(base + 2 * SLOT))
        await asyncio.sleep(1.5)
        assert await results_of(results) == [], "paused on b too"
        assert b.agent_consumer.last_slot == base + 2 * SLOT, "the tick was evaluated"
        await bus.publish(f"agent.{agent}.heartbeat.resume", envelope("resume", {"check": "c"}))
        await wait_results(answers, 1)
        await bus.publish("system.heartbeat.tick", slot_tick(base + 3 * SLOT))
        (third,) = await wait_results(results, 1)
        assert third["state_change"]["replica"] == "b"
        assert third["idempotency_key"] == f"{agent}:c:{base + 3 * SLOT}"
    assert calls == [f"{agent}:c:{base + SLOT}", f"{agent}:c:{base + 3 * SLOT}"]


async def test_a_replica_that_joins_late_is_sent_the_whole_state(
    anybus: Bus, tmp_path: Path, stopping: list[HeartbeatConsumer]
) -> None:
    """a ran a slot before b's state queue existed: b asks for the state when it starts,
    and waits for a's snapshot before it consumes, so that it would not run that slot
    again."""
    bus = anybus
    agent = bus.agent()
    replicas_of(bus, agent, "a", "b")
    with keys_handler(agent) as (handler, calls):
        config = write(tmp_path, agent, {"c": {"cadenceMs": 3_600_000, "handler": handler}})
        results = await bus.collector(f"heartbeat.{agent}.c.*")
        a = replica(bus, agent, config, "a", tmp_path)
        stopping.append(a)
        await a.start()
        slot = floor_to(now_ms(), SLOT) + SLOT
        await bus.publish("system.heartbeat.tick", slot_tick(slot))
        await wait_results(results, 1)
        b = replica(bus, agent, config, "b", tmp_path)
        stopping.append(b)
        await b.start()  # the inbox has a consumer (a): b waits for a's state first
        assert b.agent_consumer.runner.state.check("c").last_run == slot
        await a.stop()
        await bus.publish("system.heartbeat.tick", slot_tick(slot + 10 * SLOT))  # not stale
        await asyncio.sleep(1.5)
        assert await results_of(results) == [], "b knows the check ran (its cadence: 1 h)"
        assert b.agent_consumer.last_slot == slot + 10 * SLOT, "the tick was evaluated"
    assert calls == [f"{agent}:c:{slot}"]


async def test_an_active_killed_after_confirming_a_run_is_not_run_again_by_the_standby(
    anybus: Bus, tmp_path: Path
) -> None:
    """The active replica dies (SIGKILL) after its result, with the state change, was
    confirmed and before the tick was acknowledged: the tick goes to the standby, which
    applies the change first and finds the slot done. The next slot runs on the
    standby. Every slot once."""
    bus = anybus
    agent = bus.agent()
    replicas_of(bus, agent, "a", "b")
    (tmp_path / "plugin.py").write_text(KILL_AFTER_RESULT)
    calls = tmp_path / "calls"
    check = {"cadenceMs": 1, "timeoutMs": 10_000, "handler": "keys", "meta": {"calls": str(calls)}}
    config = write(tmp_path, agent, {"c": check})
    results = await bus.collector(f"heartbeat.{agent}.c.*")
    online = await bus.collector(f"heartbeat.{agent}._status.online")
    base = floor_to(now_ms(), SLOT) + 20 * SLOT  # not stale once both replicas consume
    killed_at = base + 2 * SLOT
    a = await spawn(bus, config, tmp_path, "a", DIE_AT_SLOT=str(killed_at))
    b = None
    try:
        await wait_results(online, 1)
        b = await spawn(bus, config, tmp_path, "b")
        await until_consuming(tmp_path, "b")  # once it had a's state
        for k in range(4):
            await bus.publish("system.heartbeat.tick", slot_tick(base + k * SLOT))
        await asyncio.wait_for(a.wait(), 20)
        assert a.returncode == -signal.SIGKILL
        got = await wait_results(results, 4)
        await asyncio.sleep(1.0)
        got += await results_of(results)
    finally:
        for proc in (a, b):
            if proc is not None and proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                await asyncio.wait_for(proc.wait(), 30)
    keys = calls.read_text().split()
    assert Counter(keys) == Counter(f"{agent}:c:{base + k * SLOT}" for k in range(4)), keys
    by = {r["idempotency_key"].rsplit(":", 1)[1]: r["state_change"]["replica"] for r in got}
    assert by == {str(base + k * SLOT): "a" if k <= 2 else "b" for k in range(4)}, by
    assert len(got) == 4, "one result per slot"
    log_b = (tmp_path / "b" / "log").read_text()
    assert "applied" in log_b and "change(s) of the state" in log_b


async def test_commands_to_a_quorum_inbox_with_a_single_active_consumer_are_answered(
    bus: Bus, tmp_path: Path, stopping: list[HeartbeatConsumer]
) -> None:
    """RabbitMQ refuses basic.get on such an inbox by closing the channel: commands are
    not read ahead there (they were, and every pause failed and came back for ever)."""
    agent = bus.agent()
    config = write(tmp_path, agent, {"c": {"cadenceMs": 60_000, "handler": "default"}})
    answers = await bus.collector(f"heartbeat.{agent}._command.*")
    inbox = InboxSettings(queue_type="quorum", single_active_consumer=True)
    consumer = consumer_on(bus, agent, config, tmp_path, inbox)
    stopping.append(consumer)
    await consumer.start()
    for word in ("pause", "resume", "pause"):
        await bus.publish(f"agent.{agent}.heartbeat.{word}", envelope(word, {"check": "c"}))
    got = await wait_results(answers, 3)
    assert [a["outcome"] for a in got] == ["accepted"] * 3
    assert await bus.count(f"agent.{agent}.dlq") == 0


def cut(proxy: asyncio.Server, connections: list[asyncio.StreamWriter]) -> None:
    """The network between a replica and the broker goes: the proxy closes, and with it
    every connection through it."""
    proxy.close()
    for writer in connections:
        writer.transport.abort()
    connections.clear()


async def test_a_partitioned_standby_catches_up_before_it_runs_anything(
    anybus: Bus, tmp_path: Path, stopping: list[HeartbeatConsumer]
) -> None:
    """b reaches the broker through a proxy. The network to b goes; meanwhile a runs a
    slot and takes a pause, then a stops. The network comes back: b reconnects, becomes
    the active consumer, and applies what a did before it handles the ticks that waited:
    the paused slot does not run, nor does a's slot run again."""
    bus = anybus
    agent = bus.agent()
    replicas_of(bus, agent, "a", "b")
    node = node_urls(bus.url)[0]  # of a cluster, b reaches node 1 only
    proxy, connections = await proxy_to(node)
    port = proxy.sockets[0].getsockname()[1]
    upstream = urlsplit(node)
    via_proxy = f"amqp://{upstream.username}:{upstream.password}@127.0.0.1:{port}/"
    with keys_handler(agent) as (handler, calls):
        config = write(
            tmp_path, agent, {"c": {"cadenceMs": 1, "timeoutMs": 10_000, "handler": handler}}
        )
        results = await bus.collector(f"heartbeat.{agent}.c.*")
        answers = await bus.collector(f"heartbeat.{agent}._command.*")
        a = replica(bus, agent, config, "a", tmp_path)
        b = replica(bus, agent, config, "b", tmp_path, url=via_proxy)
        stopping += [a, b]
        await a.start()
        await b.start()
        base = floor_to(now_ms(), SLOT) + 10 * SLOT  # ahead: not stale after b's reconnect
        await bus.publish("system.heartbeat.tick", slot_tick(base))
        await wait_results(results, 1)
        await until(lambda: b.agent_consumer.runner.state.check("c").last_run == base, within=10)
        cut(proxy, connections)
        for _ in range(100):
            if not await b.broker.ping(timeout=0.2):
                break
            await asyncio.sleep(0.1)
        await bus.publish("system.heartbeat.tick", slot_tick(base + SLOT))
        (second,) = await wait_results(results, 1)
        assert second["state_change"]["replica"] == "a"
        await bus.publish(f"agent.{agent}.heartbeat.pause", envelope("pause", {"check": "c"}))
        await wait_results(answers, 1)
        await a.stop()
        await bus.publish("system.heartbeat.tick", slot_tick(base + 2 * SLOT))  # waits
        assert b.agent_consumer.runner.state.check("c").last_run == base, "b is behind"

        proxy = (await proxy_to(node, port=port))[0]
        try:
            await until(lambda: b.agent_consumer.subscriber.running, within=20)
            await until(lambda: b.agent_consumer.runner.state.pauses != {}, within=20)
            await asyncio.sleep(1.5)  # the tick that waited is handled
            assert await results_of(results) == [], "the paused slot did not run"
            assert b.agent_consumer.last_slot == base + 2 * SLOT, "the tick was evaluated"
            assert b.agent_consumer.runner.state.check("c").last_run == base + SLOT
            await bus.publish(f"agent.{agent}.heartbeat.resume", envelope("resume", {"check": "c"}))
            await wait_results(answers, 1, within=20)
            await bus.publish("system.heartbeat.tick", slot_tick(base + 3 * SLOT))
            (fourth,) = await wait_results(results, 1)
            assert fourth["state_change"]["replica"] == "b"
        finally:
            with contextlib.suppress(Exception):
                await b.stop()
            proxy.close()
    assert calls == [f"{agent}:c:{base + k * SLOT}" for k in (0, 1, 3)]


async def test_two_fleets_on_one_directory_are_active_and_standby_for_every_agent(
    anybus: Bus, tmp_path: Path
) -> None:
    """``fleet DIR --standby`` on two hosts: the fleet that started first is the active
    replica of every agent; when it stops, the other runs each agent's next slot, and
    no slot runs twice."""
    bus = anybus
    agents = [bus.agent() for _ in range(4)]
    configs = tmp_path / "configs"
    configs.mkdir()
    for agent in agents:
        replicas_of(bus, agent, "one", "two")
    calls: list[list[str]] = []
    with contextlib.ExitStack() as stack:
        for agent in agents:
            handler, ran = stack.enter_context(keys_handler(agent))
            calls.append(ran)
            write(configs, agent, {"c": {"cadenceMs": 1, "timeoutMs": 10_000, "handler": handler}})
        results = await bus.collector("heartbeat.*.c.*")
        fleets = {}
        for name in ("one", "two"):
            (tmp_path / name).mkdir()
            fleets[name] = Fleet(
                configs,
                bus=BusSettings(url=bus.url, exchange=bus.exchange_name),
                inbox=InboxSettings(queue_type="quorum", replica=name, tick_interval_ms=SLOT),
                state_dir=tmp_path / name,
                rescan_s=3600,
            )
        try:
            await fleets["one"].start()
            await fleets["two"].start()
            base = floor_to(now_ms(), SLOT) + SLOT
            await bus.publish("system.heartbeat.tick", slot_tick(base))
            first = await wait_results(results, 4)
            assert {r["state_change"]["replica"] for r in first} == {"one"}
            await fleets["one"].stop()
            await bus.publish("system.heartbeat.tick", slot_tick(base + SLOT))
            second = await wait_results(results, 4)
            assert {r["state_change"]["replica"] for r in second} == {"two"}
            await asyncio.sleep(0.5)
            assert await results_of(results) == []
        finally:
            for fleet in fleets.values():
                with contextlib.suppress(Exception):
                    await fleet.stop()
    keys = Counter(r["idempotency_key"] for r in first + second)
    assert set(keys.values()) == {1} and len(keys) == 8, "one result per agent and slot"
    assert sorted(k for ran in calls for k in ran) == sorted(keys), "one run per agent and slot"


async def test_a_copy_put_in_a_state_queue_under_another_key_changes_nothing(
    bus: Bus, tmp_path: Path, stopping: list[HeartbeatConsumer]
) -> None:
    """Another agent's user may publish its own results, with a CC header naming our
    state key: RabbitMQ puts a copy in our state queue (it checks the routing key only).
    The copy keeps the key it was published under, so it is acked and not applied; the
    same event under our own key is."""
    agent, other = bus.agent(), bus.agent()
    replicas_of(bus, agent, "b")
    config = write(tmp_path, agent, {"c": {"cadenceMs": 60_000, "handler": "default"}})
    b = replica(bus, agent, config, "b", tmp_path)
    stopping.append(b)
    await b.start()
    payload = {"agent": agent, "origin": "forger", "kind": "pauses", "pauses": {"c": {}}}
    forged = envelope(f"heartbeat.{agent}._state._pauses", payload)
    await bus.publish(
        f"heartbeat.{other}.c.success", forged, headers={"CC": [f"heartbeat.{agent}._state.x"]}
    )
    assert await b.agent_consumer.catch_up() == 0
    assert b.agent_consumer.runner.state.pauses == {}
    assert await bus.count(f"agent.{agent}.state.b") == 0, "acked"
    await bus.publish(f"heartbeat.{agent}._state._pauses", forged)
    assert await b.agent_consumer.catch_up() == 1, "the same under our key"
    assert set(b.agent_consumer.runner.state.pauses) == {"c"}


async def test_a_replica_whose_state_queue_was_deleted_declares_it_again(
    bus: Bus, tmp_path: Path, stopping: list[HeartbeatConsumer], caplog: pytest.LogCaptureFixture
) -> None:
    """The missing queue closes the followers' channel only (the inbox consumer goes on),
    is said in a warning, and is declared again; ticks are still answered."""
    agent = bus.agent()
    replicas_of(bus, agent, "b")
    config = write(
        tmp_path, agent, {"c": {"cadenceMs": 1, "timeoutMs": 10_000, "handler": "default"}}
    )
    results = await bus.collector(f"heartbeat.{agent}.c.success")
    b = replica(bus, agent, config, "b", tmp_path)
    stopping.append(b)
    await b.start()
    await bus.channel.queue_delete(f"agent.{agent}.state.b")
    assert await b.agent_consumer.catch_up() == 0
    assert f"state queue agent.{agent}.state.b is missing" in caplog.text
    assert await bus.count(f"agent.{agent}.state.b") >= 0, "declared again"
    await bus.publish("system.heartbeat.tick", slot_tick(floor_to(now_ms(), SLOT) + SLOT))
    assert len(await wait_results(results, 1)) == 1
    assert b.agent_consumer.subscriber.running


async def test_a_replica_applies_its_own_change_that_it_did_not_make(
    bus: Bus, tmp_path: Path, stopping: list[HeartbeatConsumer]
) -> None:
    """A pause event routed to every state queue whose confirm was lost: the replica
    that sent it did not make the change (the command comes again, and finds the pause
    made elsewhere, or not). Its own queue holds the event: it applies it too."""
    agent = bus.agent()
    replicas_of(bus, agent, "a")
    config = write(tmp_path, agent, {"c": {"cadenceMs": 60_000, "handler": "default"}})
    a = replica(bus, agent, config, "a", tmp_path)
    stopping.append(a)
    await a.start()
    assert a.agent_consumer.follower is not None
    origin = a.agent_consumer.follower.origin
    payload = {"agent": agent, "origin": origin, "kind": "pauses", "pauses": {"c": {}}}
    await bus.publish(
        f"heartbeat.{agent}._state._pauses", envelope("x", {**payload, "version": now_ms()})
    )
    assert await a.agent_consumer.catch_up() == 1
    assert set(a.agent_consumer.runner.state.pauses) == {"c"}
    assert await a.agent_consumer.catch_up() == 0, "nothing new"


async def test_a_consumer_of_a_single_active_consumer_inbox_does_not_run_at_start_up(
    bus: Bus, tmp_path: Path, stopping: list[HeartbeatConsumer]
) -> None:
    """It may be a standby: a start-up evaluation would run the check beside the active
    one. It runs on the ticks it is given."""
    agent = bus.agent()
    config = write(tmp_path, agent, {"c": {"cadenceMs": 60_000, "handler": "default"}})
    results = await bus.collector(f"heartbeat.{agent}.c.success")
    inbox = InboxSettings(single_active_consumer=True, tick_interval_ms=SLOT)
    consumer = consumer_on(bus, agent, config, tmp_path, inbox)
    stopping.append(consumer)
    await consumer.start()
    await asyncio.sleep(1.0)
    assert await results_of(results) == [], "nothing ran at start-up"
    await bus.publish("system.heartbeat.tick", slot_tick(floor_to(now_ms(), SLOT) + SLOT))
    assert len(await wait_results(results, 1)) == 1
