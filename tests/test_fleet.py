"""Fleet mode against a real RabbitMQ."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path
from typing import Any
from unittest.mock import MagicMock

import aio_pika
import orjson
import pytest

from heartbeat_consumer.bus.connection import make_broker
from heartbeat_consumer.bus.consumer import AgentConsumer
from heartbeat_consumer.bus.fleet import Fleet, FleetError, agent_files
from heartbeat_consumer.bus.settings import BusSettings
from heartbeat_consumer.core.timeutil import floor_to

from .broker import Bus, rabbitmqctl, take
from .helpers import now_ms, slot_tick, tick, until


def add_agent(directory: Path, agent: str) -> Path:
    path = directory / f"{agent}.heartbeat.json"
    path.write_bytes(
        orjson.dumps({"agent": agent, "checks": {"c": {"cadenceMs": 1, "handler": "default"}}})
    )
    return path


def test_agent_files(tmp_path: Path) -> None:
    add_agent(tmp_path, "x")
    (tmp_path / ".heartbeat.json").write_text("{}")
    (tmp_path / "notes.json").write_text("{}")
    assert agent_files(tmp_path) == {"x": tmp_path / "x.heartbeat.json"}


async def test_fleet_of_200_agents_answers_one_tick(bus: Bus, tmp_path: Path) -> None:
    agents = [bus.agent("f") for _ in range(200)]
    for agent in agents:
        add_agent(tmp_path, agent)
    results = await bus.collector("heartbeat.*.c.*")
    fleet = Fleet(tmp_path, bus.url, bus.exchange_name, tick_interval_ms=1000, rescan_s=3600)
    await fleet.start()
    try:
        startup = await take(results, 200, within=60)
        assert {m.routing_key for m in startup} == {f"heartbeat.{a}.c.success" for a in agents}
        await asyncio.sleep(1.1)
        await bus.publish("system.heartbeat.tick", tick())
        answered = await take(results, 200, within=30)
        assert {m.routing_key for m in answered} == {f"heartbeat.{a}.c.success" for a in agents}
        listing = await rabbitmqctl("list_connections", "channels")
        counts = [int(c) for c in listing.split() if c.isdigit()]
        assert max(counts) <= 5, f"one channel per agent? {counts}"
    finally:
        await fleet.stop()


async def test_fleet_picks_up_added_and_removed_files(bus: Bus, tmp_path: Path) -> None:
    first, second = bus.agent("f"), bus.agent("f")
    add_agent(tmp_path, first)
    results = await bus.collector("heartbeat.*.c.*")
    fleet = Fleet(tmp_path, bus.url, bus.exchange_name, tick_interval_ms=1000, rescan_s=3600)
    await fleet.start()
    try:
        await take(results, 1)
        add_agent(tmp_path, second)
        await fleet.rescan()
        (added,) = await take(results, 1)
        assert added.routing_key == f"heartbeat.{second}.c.success"
        (tmp_path / f"{first}.heartbeat.json").unlink()
        await fleet.rescan()
        assert set(fleet.agents) == {second}
        await asyncio.sleep(1.1)
        await bus.publish("system.heartbeat.tick", tick())
        (only,) = await take(results, 1)
        assert only.routing_key == f"heartbeat.{second}.c.success"
        await asyncio.sleep(0.3)
        assert await bus.count(f"agent.{first}.inbox") == 1, "kept for when it comes back"
    finally:
        await fleet.stop()


@pytest.mark.parametrize("broken", ["{not json", '{"agent": "x"}'])
async def test_a_broken_file_does_not_stop_the_fleet(bus: Bus, tmp_path: Path, broken: str) -> None:
    good, bad = bus.agent("f"), bus.agent("f")
    add_agent(tmp_path, good)
    (tmp_path / f"{bad}.heartbeat.json").write_text(broken)
    results = await bus.collector("heartbeat.#")
    fleet = Fleet(tmp_path, bus.url, bus.exchange_name, tick_interval_ms=1000, rescan_s=3600)
    await fleet.start()
    try:
        # Two online, the good agent's started and result, the bad one's config_invalid.
        got = await take(results, 5, skip_status=False, within=15)
        keys = {m.routing_key for m in got}
        assert f"heartbeat.{good}.c.success" in keys
        assert f"heartbeat.{bad}._status.config_invalid" in keys
    finally:
        await fleet.stop()


@pytest.mark.parametrize("name", ["#", "*", "a.b", "a b"])
async def test_a_file_name_that_is_no_agent_name_is_skipped_and_reported(
    bus: Bus, tmp_path: Path, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``#.heartbeat.json`` would make ``agent.#.inbox`` bound to ``agent.#.#``: every
    agent's commands. It is reported (once) and skipped; the good agent runs."""
    good = bus.agent("f")
    add_agent(tmp_path, good)
    (tmp_path / f"{name}.heartbeat.json").write_bytes(
        orjson.dumps({"agent": "x", "checks": {"c": {"cadenceMs": 1, "handler": "default"}}})
    )
    bus.queues |= {f"agent.{name}.inbox", f"agent.{name}.dlq"}
    results = await bus.collector("heartbeat.*.c.*")
    fleet = Fleet(tmp_path, bus.url, bus.exchange_name, tick_interval_ms=1000, rescan_s=3600)
    await fleet.start()
    try:
        (only,) = await take(results, 1)
        assert only.routing_key == f"heartbeat.{good}.c.success"
        await fleet.rescan()
        assert set(fleet.agents) == {good}
    finally:
        await fleet.stop()
    reported = [r for r in caplog.records if f"{name}.heartbeat.json skipped" in r.getMessage()]
    assert len(reported) == 1, "reported once, not on every rescan"
    with pytest.raises((aio_pika.exceptions.ChannelNotFoundEntity, ValueError)):
        await bus.count(f"agent.{name}.inbox")  # never made (pamqp refuses '*' outright)


async def test_fleet_creates_its_state_directory_and_saves_state(bus: Bus, tmp_path: Path) -> None:
    """README's `fleet examples/ --state-dir /tmp/fleet-state`: the directory is made
    (0700) and the runs are saved, not held in memory."""
    agent = bus.agent("f")
    (tmp_path / "configs").mkdir()
    add_agent(tmp_path / "configs", agent)
    state_dir = tmp_path / "new" / "state"
    results = await bus.collector("heartbeat.*.c.*")
    fleet = Fleet(
        tmp_path / "configs", bus.url, bus.exchange_name, state_dir=state_dir, rescan_s=3600
    )
    await fleet.start()
    try:
        await take(results, 1)
    finally:
        await fleet.stop()
    assert state_dir.is_dir()
    assert (state_dir.stat().st_mode & 0o777) == 0o700
    saved = orjson.loads((state_dir / f"{agent}.state.json").read_bytes())
    assert saved["checks"]["c"]["runs"] == 1


async def test_a_state_directory_that_cannot_be_made_stops_the_fleet_before_it_declares(
    bus: Bus, tmp_path: Path
) -> None:
    agent = bus.agent("f")
    add_agent(tmp_path, agent)
    (tmp_path / "file").write_text("")
    fleet = Fleet(tmp_path, bus.url, bus.exchange_name, state_dir=tmp_path / "file" / "state")
    with pytest.raises(FleetError, match=r"cannot create the state directory .*file/state"):
        await fleet.start()
    await fleet.broker.stop()
    with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
        await bus.count(f"agent.{agent}.inbox")


async def test_an_agent_that_cannot_start_is_reported_and_retried_while_the_others_run(
    bus: Bus, tmp_path: Path
) -> None:
    """Another connection holds one agent's inbox (exclusive): that agent fails to
    start. It is logged, announced (start_failed), in /health's detail (not ok) and
    heartbeat_agent_up; the other agent answers ticks; once the queue is free, a retry
    starts it."""
    good, held = bus.agent("f"), bus.agent("f")
    add_agent(tmp_path, good)
    add_agent(tmp_path, held)
    other = await aio_pika.connect(bus.url)
    holder = await other.channel()
    await holder.declare_queue(f"agent.{held}.inbox", exclusive=True)
    events = await bus.collector("heartbeat.#")
    fleet = Fleet(tmp_path, bus.url, bus.exchange_name, tick_interval_ms=1000, rescan_s=3600)
    try:
        await fleet.start()
        keys = {m.routing_key for m in await take(events, 4, skip_status=False)}
        assert f"heartbeat.{held}._status.start_failed" in keys, keys
        assert f"heartbeat.{good}.c.success" in keys, keys
        health = await fleet.health()
        assert not health.ok, health
        assert set(health.detail["failed_to_start"]) == {held}, health
        assert "RESOURCE_LOCKED" in health.detail["failed_to_start"][held]
        metrics = fleet.metrics.render().decode()
        assert f'heartbeat_agent_up{{agent="{held}"}} 0.0' in metrics
        assert f'heartbeat_agent_up{{agent="{good}"}} 1.0' in metrics
        await asyncio.sleep(1.1)
        await bus.publish("system.heartbeat.tick", tick())
        (answer,) = await take(events, 1)
        assert answer.routing_key == f"heartbeat.{good}.c.success"
        await other.close()  # the exclusive queue goes with its connection
        fleet.failed[held].retry_at = 0  # the backoff (5 s) has passed
        await fleet.rescan()
        assert set(fleet.agents) == {good, held}
        assert not fleet.failed
        assert (await fleet.health()).ok
    finally:
        await fleet.stop()
        await other.close()


@pytest.mark.parametrize("what", ["missing", "file"])
async def test_a_fleet_on_no_directory_is_a_clear_error(
    bus: Bus, tmp_path: Path, what: str
) -> None:
    target = tmp_path / "configs"
    if what == "file":
        target.write_text("")
    fleet = Fleet(target, bus.url, bus.exchange_name)
    expected = "does not exist" if what == "missing" else "is not a directory"
    with pytest.raises(FleetError, match=f"fleet directory .* {expected}"):
        await fleet.start()
    await fleet.broker.stop()


async def test_a_fleet_with_no_agents_says_so_and_is_not_healthy(
    bus: Bus, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fleet = Fleet(tmp_path, bus.url, bus.exchange_name, rescan_s=3600)
    await fleet.start()
    try:
        health = await fleet.health()
        assert not health.ok
        assert "no agent runs" in health.detail["error"]
        await fleet.rescan()
    finally:
        await fleet.stop()
    warned = [r for r in caplog.records if "fleet: no agents" in r.getMessage()]
    assert len(warned) == 1, "said once, not on every rescan"


async def test_a_bloodbank_layout_runs_with_pattern_and_is_pointed_out_without(
    bus: Bus, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Bloodbank's multi-consumer reads `<agent>.json` files: --pattern '*.json' runs
    them (state files are never agents); the default pattern says what it skipped."""
    agent = bus.agent("f")
    path = add_agent(tmp_path, agent)
    path.rename(tmp_path / f"{agent}.json")
    (tmp_path / f"{agent}.json.state.json").write_text("{}")
    results = await bus.collector("heartbeat.*.c.*")
    skipping = Fleet(tmp_path, bus.url, bus.exchange_name, rescan_s=3600)
    await skipping.start()
    await skipping.stop()
    warned = [r.getMessage() for r in caplog.records if "do not match --pattern" in r.getMessage()]
    assert len(warned) == 1
    assert f"{agent}.json" in warned[0]
    assert "state" not in warned[0]
    fleet = Fleet(tmp_path, bus.url, bus.exchange_name, rescan_s=3600, pattern="*.json")
    await fleet.start()
    try:
        (result,) = await take(results, 1)
        assert result.routing_key == f"heartbeat.{agent}.c.success"
        assert set(fleet.agents) == {agent}
    finally:
        await fleet.stop()
    with pytest.raises(ValueError, match="use '\\*SUFFIX'"):
        Fleet(tmp_path, bus.url, bus.exchange_name, pattern="a*.json")


async def consume(started: Any) -> Any:
    return started


async def test_agents_start_concurrently_within_the_bound_and_fail_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rescan starts its new agents START_CONCURRENCY at a time (not one after another,
    nor all at once: each holds a channel of its own while it declares); one that fails
    is reported and does not hold up the rest; each is evaluated once it consumes."""
    from heartbeat_consumer.bus import fleet as fleet_module

    names = [f"a{i:02d}" for i in range(40)]
    for name in names:
        add_agent(tmp_path, name)
    fleet = Fleet(tmp_path, rescan_s=3600)
    running, most, added, failed = 0, 0, [], []

    evaluated: list[str] = []

    class Started:
        def __init__(self, agent: str) -> None:
            self.agent = agent

        async def evaluate_now(self) -> None:
            assert self.agent in added, "evaluated after its consumer started"
            evaluated.append(self.agent)

    async def add(agent: str, path: Path, exchanges_ready: bool, lender: object) -> Started:
        nonlocal running, most
        assert exchanges_ready, "the exchanges were ensured once, before"
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.01)
        running -= 1
        if agent == "a07":
            raise RuntimeError("refused")
        added.append(agent)
        return Started(agent)

    async def start_failed(agent: str, exc: Exception) -> None:
        failed.append((agent, str(exc)))

    async def exchanges_ready() -> bool:
        return True

    monkeypatch.setattr(fleet, "_exchanges_ready", exchanges_ready)
    monkeypatch.setattr(fleet, "_open", add)  # each agent opens (the bounded part)
    monkeypatch.setattr(fleet, "_consume", consume)  # and then consumes
    monkeypatch.setattr(fleet, "_start_failed", start_failed)
    await fleet.rescan()
    assert most == fleet_module.START_CONCURRENCY
    assert sorted(added) == [n for n in names if n != "a07"]
    assert failed == [("a07", "refused")]
    assert sorted(evaluated) == sorted(added), "each started agent is evaluated once"
    assert fleet.last_start.agents == len(added)
    assert Fleet(tmp_path, start_concurrency=1).start_concurrency == 1
    with pytest.raises(ValueError, match="at least 1"):
        Fleet(tmp_path, start_concurrency=0)


async def test_agents_starting_together_share_one_consuming_channel(
    bus: Bus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FastStream opens the channel of its cache on first use without a lock: agents that
    start together must not each open one of their own (they did, up to 16, when channels
    open slowly: here 50 ms each)."""
    agents = [bus.agent("f") for _ in range(20)]
    for agent in agents:
        add_agent(tmp_path, agent)
    initialize = aio_pika.Channel.initialize

    async def slow_initialize(self: aio_pika.Channel, *args: Any, **kw: Any) -> None:
        await asyncio.sleep(0.05)
        await initialize(self, *args, **kw)

    results = await bus.collector("heartbeat.*.c.*")
    fleet = Fleet(tmp_path, bus.url, bus.exchange_name, tick_interval_ms=1000, rescan_s=3600)
    monkeypatch.setattr(aio_pika.Channel, "initialize", slow_initialize)
    await fleet.start()
    try:
        await take(results, 20, within=60)
        listing = await rabbitmqctl("list_connections", "channels")
        counts = [int(c) for c in listing.split() if c.isdigit()]
        assert max(counts) <= 5, f"one channel per agent? {counts}"
    finally:
        await fleet.stop()


async def test_a_refusal_on_the_lent_channel_falls_back_and_the_next_agent_declares_anew(
    bus: Bus, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Agents starting together declare on a channel lent to them. One whose inbox exists
    with other arguments is refused there (which closes that channel): it falls back to
    declaring step by step (the queue is used as it is, with a warning), and the agents
    after it, one at a time here, get a new channel; all of them answer."""
    caplog.set_level("DEBUG", logger="heartbeat_consumer.provision")
    agents = sorted(bus.agent("f") for _ in range(3))
    for agent in agents:
        add_agent(tmp_path, agent)
    other = await aio_pika.connect(bus.url)
    try:
        channel = await other.channel()
        await channel.declare_queue(
            f"agent.{agents[0]}.inbox", durable=True, arguments={"x-max-length": 7}
        )
    finally:
        await other.close()
    results = await bus.collector("heartbeat.*.c.*")
    fleet = Fleet(
        tmp_path,
        bus.url,
        bus.exchange_name,
        tick_interval_ms=1000,
        rescan_s=3600,
        start_concurrency=1,
    )
    await fleet.start()
    try:
        keys = {m.routing_key for m in await take(results, 3, within=30)}
        assert keys == {f"heartbeat.{a}.c.success" for a in agents}
        assert set(fleet.agents) == set(agents) and not fleet.failed
        assert f"{agents[0]}: declaring on the shared channel failed" in caplog.text
        assert f"queue agent.{agents[0]}.inbox exists with other arguments" in caplog.text
        assert fleet.last_start.agents == 3
        assert (await fleet.health()).ok
    finally:
        await fleet.stop()


def test_an_agent_s_consumer_keeps_no_test_mock(tmp_path: Path) -> None:
    """FastStream makes a MagicMock per handler for its test broker (11 KB each, a fifth
    of what a fleet agent held); an agent's consumer lets go of it."""

    def mocks() -> int:
        gc.collect()
        return sum(isinstance(o, MagicMock) for o in gc.get_objects())

    broker = make_broker()
    before = mocks()
    consumers = [
        AgentConsumer(
            broker, agent=f"m{i}", heartbeat_path=add_agent(tmp_path, f"m{i}"), bus=BusSettings()
        )
        for i in range(20)
    ]
    assert len(consumers) == 20
    assert mocks() - before == 0


async def test_a_slot_is_evaluated_once_when_a_tick_for_it_comes_before_the_start_up_run(
    bus: Bus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fleet's agent consumes before its start-up evaluation: a tick for the same slot,
    waiting in its inbox, can come first. The slot is evaluated once: with one check per
    tick, the second due check does not run in that slot as well."""
    agent = bus.agent("f")
    path = tmp_path / f"{agent}.heartbeat.json"
    checks = {
        "a": {"cadenceMs": 1, "handler": "default", "priority": 10},
        "b": {"cadenceMs": 1, "handler": "default", "priority": 1},
    }
    path.write_bytes(orjson.dumps({"agent": agent, "checks": checks, "maxChecksPerTick": 1}))
    inbox = await bus.channel.declare_queue(
        f"agent.{agent}.inbox", durable=True, arguments={"x-queue-type": "classic"}
    )
    await inbox.bind(await bus.exchange(), f"agent.{agent}.#")
    results = await bus.collector(f"heartbeat.{agent}.*.success")
    slot = floor_to(now_ms(), 60_000)
    if slot + 55_000 < now_ms():  # too close to the next minute: its start-up run would
        await asyncio.sleep(6)  # evaluate another slot
        slot = floor_to(now_ms(), 60_000)
    await bus.publish(f"agent.{agent}.heartbeat.tick", slot_tick(slot))
    evaluate_now = AgentConsumer.evaluate_now

    async def after_the_tick(self: AgentConsumer) -> Any:
        await until(lambda: self.last_slot is not None)
        return await evaluate_now(self)

    monkeypatch.setattr(AgentConsumer, "evaluate_now", after_the_tick)
    fleet = Fleet(tmp_path, bus.url, bus.exchange_name, tick_interval_ms=60_000, rescan_s=3600)
    await fleet.start()
    try:
        (first,) = await take(results, 1)
        await asyncio.sleep(0.5)
        assert await results.get(no_ack=True, fail=False) is None, "the slot ran twice"
    finally:
        await fleet.stop()
    assert first.routing_key in {f"heartbeat.{agent}.{c}.success" for c in checks}


async def test_one_slow_agent_holds_up_the_others_first_evaluation_only_so_long(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Agents starting together are evaluated once all consume; one that takes long to
    start (a hung state disk, a blocked broker) delays the others' evaluation by at most
    EVALUATE_WITHIN_S, and is evaluated itself once it has started."""
    from heartbeat_consumer.bus import fleet as fleet_module

    for name in ("fast1", "fast2", "slow"):
        add_agent(tmp_path, name)
    fleet = Fleet(tmp_path, rescan_s=3600)
    slow_may_finish = asyncio.Event()
    evaluated: list[str] = []

    class Started:
        def __init__(self, agent: str) -> None:
            self.agent = agent

        async def evaluate_now(self) -> None:
            evaluated.append(self.agent)
            if len(evaluated) == 2:
                slow_may_finish.set()

    async def add(agent: str, path: Path, exchanges_ready: bool, lender: object) -> Started:
        if agent == "slow":
            await asyncio.wait_for(slow_may_finish.wait(), 10)
        return Started(agent)

    async def exchanges_ready() -> bool:
        return True

    monkeypatch.setattr(fleet_module, "EVALUATE_WITHIN_S", 0.05)
    monkeypatch.setattr(fleet, "_exchanges_ready", exchanges_ready)
    monkeypatch.setattr(fleet, "_open", add)  # each agent opens (the bounded part)
    monkeypatch.setattr(fleet, "_consume", consume)  # and then consumes
    await fleet.rescan()
    assert sorted(evaluated[:2]) == ["fast1", "fast2"]
    assert evaluated[2:] == ["slow"]
    assert fleet.last_start.agents == 3
