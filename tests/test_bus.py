"""End to end against a real RabbitMQ (see tests/broker.py)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest

from heartbeat_consumer import CheckConfig, register_handler
from heartbeat_consumer.bus.connection import REASON_HEADER
from heartbeat_consumer.bus.consumer import HeartbeatConsumer, TopologyError
from heartbeat_consumer.core.envelope import correlation_uuid
from heartbeat_consumer.core.timeutil import floor_to
from heartbeat_consumer.runtime.store import StateStore

from .broker import Bus, drain, drain_all, rabbitmqctl, running, settled, take
from .conftest import ROOT
from .helpers import BIN, clear_of_the_minute_end, cli, now_ms, slot_tick, tick, write

MIN = 60_000


async def test_startup_evaluation_then_tick_result_with_routing_and_correlation(
    bus: Bus, tmp_path: Path
) -> None:
    agent = bus.agent()
    config = write(
        tmp_path,
        agent,
        {
            "first": {"cadenceMs": 3_600_000, "handler": "default", "priority": 1},
            "second": {"cadenceMs": 3_600_000, "handler": "default", "priority": 2},
        },
    )
    results = await bus.collector(f"heartbeat.{agent}.*.*")
    statuses = await bus.collector(f"heartbeat.{agent}._status.*")
    async with running(bus, agent, config, tick_interval_ms=1000):
        (online,) = await take(statuses, 1, skip_status=False)
        assert online.routing_key == f"heartbeat.{agent}._status.online"
        (startup,) = await take(results, 1)
        assert startup.routing_key == f"heartbeat.{agent}.first.success"
        await asyncio.sleep(1.1)  # the next 1 s slot
        event = tick()
        await bus.publish("system.heartbeat.tick", event)
        (second,) = await take(results, 1)
    body = orjson.loads(second.body)
    assert second.routing_key == f"heartbeat.{agent}.second.success"
    assert second.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert body["event_type"] == second.routing_key
    assert body["correlation_ids"] == [correlation_uuid(event["event_id"])]
    assert second.correlation_id == event["event_id"]
    payload = body["payload"]
    assert payload["agent"] == agent
    assert payload["check"] == "second"
    assert payload["status"] == "success"
    assert payload["idempotency_key"].startswith(f"{agent}:second:")
    assert set(payload) >= {
        "handler",
        "started_at",
        "finished_at",
        "duration_ms",
        "overdue_ratio",
        "result",
        "error",
    }
    (offline,) = await take(statuses, 1, skip_status=False)
    assert offline.routing_key == f"heartbeat.{agent}._status.offline"
    assert await bus.count(f"agent.{agent}.inbox") == 0


async def test_manual_tick_snippet_as_written(bus: Bus, tmp_path: Path) -> None:
    """The design's snippet, with only the URL and exchange name changed."""
    agent = bus.agent()
    config = write(tmp_path, agent, {"c": {"cadenceMs": 1, "handler": "default"}})
    results = await bus.collector(f"heartbeat.{agent}.#")
    async with running(bus, agent, config, tick_interval_ms=1000):
        await take(results, 1)  # the start-up evaluation
        await asyncio.sleep(1.1)  # so the snippet's tick falls in a later 1 s slot
        snippet = design_snippet().replace(
            '"amqp://delorenj:delorenj@localhost:5673/"', repr(bus.url)
        )
        snippet = snippet.replace('"bloodbank.events.v1"', repr(bus.exchange_name))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", snippet, stdout=asyncio.subprocess.PIPE
        )
        out, _ = await proc.communicate()
        assert out.strip() == b"Heartbeat tick sent"
        (result,) = await take(results, 1)
    assert result.routing_key == f"heartbeat.{agent}.c.success"


SNIPPET = textwrap.dedent(
    """
    import asyncio
    import aio_pika
    import orjson
    from datetime import datetime, timezone
    from uuid import uuid4

    async def main():
        conn = await aio_pika.connect_robust("amqp://delorenj:delorenj@localhost:5673/")
        ch = await conn.channel()
        ex = await ch.declare_exchange("bloodbank.events.v1", aio_pika.ExchangeType.TOPIC, durable=True)

        body = orjson.dumps({
            "event_id": str(uuid4()),
            "event_type": "system.heartbeat.tick",
            "timestamp": datetime.now(timezone.utc).isoformat(),
            "version": "1.0.0",
            "source": {"host": "local", "type": "manual", "app": "test"},
            "payload": {"tick_id": str(uuid4())[:8]},
        })

        await ex.publish(aio_pika.Message(body=body), routing_key="system.heartbeat.tick")
        await conn.close()
        print("Heartbeat tick sent")

    asyncio.run(main())
    """  # noqa: E501
)


def design_snippet() -> str:
    """The "Manual Heartbeat Trigger" snippet from the design, else our copy of it."""
    design = ROOT.parent / "shared/reference/heartbeat-consumer-design.md"
    if design.exists():
        match = re.search(r"python - <<'PY'\n(.*?)\nPY\n", design.read_text(), re.S)
        assert match, "the design no longer has the manual trigger snippet"
        return match.group(1)
    return SNIPPET


async def test_malformed_messages_are_dead_lettered_with_a_reason(bus: Bus, tmp_path: Path) -> None:
    agent = bus.agent()
    config = write(tmp_path, agent, {"c": {"cadenceMs": 1, "handler": "default"}})
    results = await bus.collector(f"heartbeat.{agent}.#")
    async with running(bus, agent, config, tick_interval_ms=1000):
        await take(results, 1)
        await bus.publish(f"agent.{agent}.heartbeat.tick", b"{not json")
        await bus.publish("system.heartbeat.tick", {"event_type": "system.heartbeat.tick"})
        await bus.publish(f"agent.{agent}.heartbeat.run", tick(check=None))
        await bus.publish(f"agent.{agent}.something.else", b"whatever")  # unknown: acked
        await asyncio.sleep(1.1)
        await bus.publish("system.heartbeat.tick", tick())  # still consuming afterwards
        (result,) = await take(results, 1)
        assert result.routing_key == f"heartbeat.{agent}.c.success"
    dlq = await bus.channel.declare_queue(f"agent.{agent}.dlq", passive=True)
    dead = await take(dlq, 3)
    reasons = [(m.headers[REASON_HEADER], m.headers["x-original-routing-key"]) for m in dead]
    assert reasons[0][0].startswith("malformed JSON")
    assert reasons[0][1].endswith(".heartbeat.tick")
    assert "'event_id' must be a non-empty string" in reasons[1][0]
    assert "run command needs payload.check" in reasons[2][0]
    assert dead[0].body == b"{not json"
    assert await bus.count(f"agent.{agent}.inbox") == 0
    assert await bus.count(f"agent.{agent}.dlq") == 0


async def test_results_of_one_agent_never_reach_another_inbox(bus: Bus, tmp_path: Path) -> None:
    a, b = bus.agent("a"), bus.agent("b")
    results = await bus.collector("heartbeat.#")
    config_a = write(tmp_path, a, {"c": {"cadenceMs": 1, "handler": "default"}})
    config_b = write(tmp_path, b, {"c": {"cadenceMs": 1, "handler": "default"}})
    async with running(bus, a, config_a, tick_interval_ms=1000):
        await take(results, 1)
    # A is stopped: its inbox and B's hold whatever is routed to them from now on.
    async with running(bus, b, config_b, tick_interval_ms=1000):
        await take(results, 1)
        await asyncio.sleep(1.1)
        await bus.publish(f"agent.{b}.heartbeat.tick", tick())
        (result,) = await take(results, 1)
        assert result.routing_key == f"heartbeat.{b}.c.success"
        await asyncio.sleep(0.3)
        assert await bus.count(f"agent.{b}.inbox") == 0
    assert await bus.count(f"agent.{a}.inbox") == 0, "B's results or B's own tick reached A"


async def test_stale_ticks_after_downtime_run_each_due_check_once(bus: Bus, tmp_path: Path) -> None:
    agent = bus.agent()
    config = write(
        tmp_path,
        agent,
        {
            "quick": {"cadenceMs": 300_000, "handler": "default", "priority": 1},
            "slow": {"cadenceMs": 3_600_000, "handler": "default", "priority": 2},
        },
    )
    results = await bus.collector(f"heartbeat.{agent}.#")
    async with running(bus, agent, config):
        await take(results, 1)
    # Downtime: 60 minutes of ticks pile up in the inbox.
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    for minute in range(60, 0, -1):
        await bus.publish("system.heartbeat.tick", tick(now - timedelta(minutes=minute)))
    assert await bus.count(f"agent.{agent}.inbox") == 60
    async with running(bus, agent, config):
        got = await take(results, 1)
        await asyncio.sleep(1.0)
        assert await bus.count(f"agent.{agent}.inbox") == 0
    ran = [(m.routing_key or "").split(".")[2] for m in [*got, *await drain(results)]]
    assert sorted(ran) == ["slow"], "only the check still due ran, once"


async def test_commands_run_pause_resume(bus: Bus, tmp_path: Path) -> None:
    agent = bus.agent()
    config = write(tmp_path, agent, {"c": {"cadenceMs": 3_600_000, "handler": "default"}})
    results = await bus.collector(f"heartbeat.{agent}.#")
    command = {
        "event_id": "cmd",
        "event_type": "command",
        "timestamp": datetime.now(UTC).isoformat(),
    }
    async with running(bus, agent, config) as consumer:
        await take(results, 1)
        await bus.publish(f"agent.{agent}.heartbeat.run", {**command, "payload": {"check": "c"}})
        (refused,) = await take(results, 1, skip_status=False)  # not due: not run
        assert refused.routing_key == f"heartbeat.{agent}._command.error"
        assert orjson.loads(refused.body)["payload"]["reason"].startswith("not due")
        await bus.publish(
            f"agent.{agent}.heartbeat.run", {**command, "payload": {"check": "c", "force": True}}
        )
        (forced,) = await take(results, 1)
        assert orjson.loads(forced.body)["correlation_ids"] == [correlation_uuid("cmd")]
        assert forced.correlation_id == "cmd"
        await bus.publish(
            f"agent.{agent}.heartbeat.pause",
            {**command, "payload": {"check": "*", "reason": "ops"}},
        )
        await asyncio.sleep(0.5)
        state_path = consumer.agent.runner.store.path
        paused = StateStore(state_path).load()[0].pauses["*"]
        assert paused.until is None
        assert paused.reason == "ops"
        await bus.publish(f"agent.{agent}.heartbeat.resume", {**command, "payload": {"check": "*"}})
        await asyncio.sleep(0.5)
        assert StateStore(state_path).load()[0].pauses == {}


async def test_commands_that_are_not_quite_right_are_dead_lettered_not_guessed(
    bus: Bus, tmp_path: Path
) -> None:
    """``force: "false"`` is not a boolean (it used to force a run); a pause of a check
    the config does not have is refused; both with the reason."""
    agent = bus.agent()
    config = write(tmp_path, agent, {"c": {"cadenceMs": 3_600_000, "handler": "default"}})
    results = await bus.collector(f"heartbeat.{agent}.c.*")
    command = {"event_id": "cmd", "event_type": "command", "timestamp": 0}
    async with running(bus, agent, config) as consumer:
        await take(results, 1)
        run = {"check": "c", "force": "false"}
        await bus.publish(f"agent.{agent}.heartbeat.run", {**command, "payload": run})
        await bus.publish(f"agent.{agent}.heartbeat.pause", {**command, "payload": {"check": "x"}})
        await bus.publish(f"agent.{agent}.heartbeat.run", {**command, "payload": {"check": "y"}})
        await bus.publish(f"agent.{agent}.heartbeat.pause", {**command, "payload": {}})
        await asyncio.sleep(0.5)
        assert await drain(results) == [], "nothing ran"
        assert consumer.agent.runner.state.pauses == {}, "no pause, of 'x' or of everything"
    dlq = await bus.channel.declare_queue(f"agent.{agent}.dlq", passive=True)
    reasons = sorted(str(m.headers[REASON_HEADER]) for m in await take(dlq, 4))
    assert reasons[0].startswith("no check named 'x'")
    assert reasons[1].startswith("no check named 'y'")
    assert (
        reasons[2] == "pause command needs payload.check (a check name or '*' for the whole agent)"
    )
    assert reasons[3] == "payload.force must be true or false, not 'false'"


async def test_handler_exception_is_a_failed_result_not_a_crash(bus: Bus, tmp_path: Path) -> None:
    @register_handler("t_bus_boom")
    async def boom(tick_payload: dict[str, Any], check_config: CheckConfig) -> dict[str, Any]:
        raise RuntimeError("kaput")

    agent = bus.agent()
    config = write(tmp_path, agent, {"c": {"cadenceMs": 1, "handler": "t_bus_boom"}})
    results = await bus.collector(f"heartbeat.{agent}.#")
    async with running(bus, agent, config):
        (failed,) = await take(results, 1)
    assert failed.routing_key == f"heartbeat.{agent}.c.failed"
    assert orjson.loads(failed.body)["payload"]["error"] == "RuntimeError: kaput"


async def test_environment_mode_tick_and_run_check_commands_and_sigterm(
    bus: Bus, tmp_path: Path
) -> None:
    """`heartbeat-consumer` with the design's environment variables, driven by the
    `tick` and `run-check` commands; SIGTERM publishes offline and exits 0."""
    agent = bus.agent()
    config = write(tmp_path, agent, {"c": {"cadenceMs": 3_600_000, "handler": "default"}})
    results = await bus.collector(f"heartbeat.{agent}.#")
    env = {
        **__import__("os").environ,
        "AGENT_NAME": agent,
        "HEARTBEAT_PATH": str(config),
        "RABBIT_URL": bus.url,
        "EXCHANGE_NAME": bus.exchange_name,
    }
    proc = await asyncio.create_subprocess_exec(
        BIN, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        (online,) = await take(results, 1, skip_status=False)
        assert online.routing_key.endswith("._status.online")
        (first,) = await take(results, 1)  # start-up evaluation
        assert first.routing_key == f"heartbeat.{agent}.c.success"
        opts = ["--rabbit-url", bus.url, "--exchange", bus.exchange_name]
        code, out = await cli("tick", "--agent", agent, *opts)
        assert code == 0, out
        assert f"tick to {agent}: nothing due: the slot" in out, out
        code, out = await cli("run-check", agent, "c", "--force", *opts)
        assert code == 0, out
        (forced,) = await take(results, 1)
        assert forced.routing_key == f"heartbeat.{agent}.c.success"
    finally:
        proc.send_signal(__import__("signal").SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    assert "guest:guest" not in err.decode(), "password in the logs"
    rest = await take(results, 2, skip_status=False)  # the forced run's answer, offline
    assert rest[0].routing_key == f"heartbeat.{agent}._command.ack"
    assert rest[1].routing_key.endswith("._status.offline")


async def test_two_tickers_each_check_runs_once_per_slot(bus: Bus, tmp_path: Path) -> None:
    agent = bus.agent()
    config = write(tmp_path, agent, {"c": {"cadenceMs": 1, "handler": "default"}})
    results = await bus.collector(f"heartbeat.{agent}.#")
    opts = ["--rabbit-url", bus.url, "--exchange", bus.exchange_name, "--every", "1s"]
    async with running(bus, agent, config, tick_interval_ms=1000):
        (startup,) = await take(results, 1)
        outcomes = await asyncio.gather(
            cli("ticker", "--max-ticks", "3", *opts), cli("ticker", "--max-ticks", "3", *opts)
        )
        assert [code for code, _ in outcomes] == [0, 0], outcomes
        await asyncio.sleep(0.5)
    slots = [orjson.loads(m.body)["payload"]["slot"] for m in [startup, *await drain(results)]]
    assert len(slots) == len(set(slots)), f"a slot ran twice: {slots}"
    assert len(slots) >= 3, slots


async def test_unreachable_broker_is_a_clear_error(tmp_path: Path) -> None:
    config = write(tmp_path, "nobroker", {"c": {"cadenceMs": 1, "handler": "default"}})
    url = "amqp://guest:s3cret@127.0.0.1:1/"
    code, out = await cli("run", str(config), "--rabbit-url", url, "--state", str(tmp_path / "s"))
    assert code == 1
    assert "cannot reach RabbitMQ at amqp://guest:***@127.0.0.1:1/" in out
    assert "s3cret" not in out
    assert "Traceback" not in out


async def test_exchange_with_other_settings_is_a_clear_error(bus: Bus, tmp_path: Path) -> None:
    await bus.channel.declare_exchange(
        bus.exchange_name, aio_pika.ExchangeType.FANOUT, durable=False
    )
    agent = bus.agent()
    config = write(tmp_path, agent, {"c": {"cadenceMs": 1, "handler": "default"}})
    consumer = HeartbeatConsumer(agent, config, bus.url, bus.exchange_name)
    with pytest.raises(TopologyError, match=r"already has exchange .* with other settings"):
        await consumer.start()
    await consumer.broker.stop()


async def test_consumer_recovers_after_connections_are_killed(bus: Bus, tmp_path: Path) -> None:
    agent = bus.agent()
    config = write(tmp_path, agent, {"c": {"cadenceMs": 1, "handler": "default"}})
    results = await bus.collector(f"heartbeat.{agent}.#")
    async with running(bus, agent, config, tick_interval_ms=1000):
        await take(results, 1)
        await rabbitmqctl("close_all_connections", "test: connection killed")
        delivered = await tick_until_result(bus, results, attempts=40)
        assert delivered, "no tick processed after reconnect"
        assert set(delivered) == {f"heartbeat.{agent}.c.success"}


async def tick_until_result(
    bus: Bus, results: aio_pika.abc.AbstractQueue, attempts: int
) -> list[str]:
    """Send a tick every 0.5 s until a result arrives (while the consumer reconnects)."""
    for _ in range(attempts):
        await asyncio.sleep(0.5)
        with contextlib.suppress(Exception):
            await bus.publish("system.heartbeat.tick", tick())
        with contextlib.suppress(Exception):
            found = await drain(results)
            if found:
                return [m.routing_key or "" for m in found]
    return []


SLOW_PLUGIN = """
import asyncio, pathlib
from heartbeat_consumer import register_handler

@register_handler("slow_sigterm")
async def slow(tick_payload, check_config):
    pathlib.Path(check_config.meta["started"]).write_text("started")
    await asyncio.sleep(2)
    return {"status": "success", "slept": 2}
"""


async def test_sigterm_during_a_handler_finishes_it_acks_and_saves(
    bus: Bus, tmp_path: Path
) -> None:
    agent = bus.agent()
    started = tmp_path / "started"
    (tmp_path / "slow_plugin.py").write_text(SLOW_PLUGIN)
    config = write(
        tmp_path,
        agent,
        {
            "c": {
                "cadenceMs": 1,
                "timeoutMs": 20_000,
                "handler": "slow_sigterm",
                "meta": {"started": str(started)},
            }
        },
    )
    results = await bus.collector(f"heartbeat.{agent}.#")
    state = tmp_path / "state.json"
    proc = await asyncio.create_subprocess_exec(
        BIN,
        "run",
        str(config),
        "--rabbit-url",
        bus.url,
        "--exchange",
        bus.exchange_name,
        "--handlers",
        str(tmp_path / "slow_plugin.py"),
        "--state",
        str(state),
        "--every",
        "1s",
        stderr=asyncio.subprocess.PIPE,
    )
    await take(results, 1, within=15)  # the start-up run, 2 s long
    started.unlink()
    await asyncio.sleep(1.1)
    await bus.publish("system.heartbeat.tick", tick())
    for _ in range(100):
        if started.exists():
            break
        await asyncio.sleep(0.05)
    assert started.exists(), "the tick's handler did not start"
    proc.send_signal(__import__("signal").SIGTERM)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    (finished,) = await take(results, 1)
    payload = orjson.loads(finished.body)["payload"]
    assert payload["result"] == {"status": "success", "slept": 2}, payload
    saved, _ = StateStore(state).load()
    assert saved.check("c").runs == 2
    assert await bus.count(f"agent.{agent}.inbox") == 0, "the tick was acked"


async def test_quorum_queue(bus: Bus, tmp_path: Path) -> None:
    agent = bus.agent()
    config = write(tmp_path, agent, {"c": {"cadenceMs": 1, "handler": "default"}})
    results = await bus.collector(f"heartbeat.{agent}.#")
    async with running(bus, agent, config, queue_type="quorum"):
        await take(results, 1)
        listing = await rabbitmqctl("list_queues", "name", "type")
    assert f"agent.{agent}.inbox\tquorum" in listing


async def test_single_active_consumer_hot_standby(bus: Bus, tmp_path: Path) -> None:
    agent = bus.agent()
    config = write(tmp_path, agent, {"c": {"cadenceMs": 1, "handler": "default"}})
    results = await bus.collector(f"heartbeat.{agent}.c.*")
    options: dict[str, Any] = {"tick_interval_ms": 1000, "single_active_consumer": True}
    async with running(bus, agent, config, state_path=tmp_path / "one.json", **options):
        (tmp_path / "replica").mkdir()  # replicas keep apart state directories (the lock)
        two = tmp_path / "replica" / "two.json"
        async with running(bus, agent, config, state_path=two, **options):
            await asyncio.sleep(1.1)
            # Neither evaluated at start-up (the standby would have run beside the active).
            assert await results.get(no_ack=True, fail=False) is None
            await bus.publish("system.heartbeat.tick", tick())
            await take(results, 1)
            await asyncio.sleep(0.5)
            assert await results.get(no_ack=True, fail=False) is None, "both replicas ran the tick"
            consumers = await rabbitmqctl("list_consumers", "queue_name", "active")
            states = [line.split("\t")[1] for line in consumers.splitlines() if agent in line]
            assert sorted(states) == ["false", "true"], consumers


async def test_ticker_ticks_are_aligned_expiring_and_deterministic(bus: Bus) -> None:
    from heartbeat_consumer.core.envelope import tick_event_id

    ticks = await bus.collector("system.heartbeat.tick")
    opts = ["--rabbit-url", bus.url, "--exchange", bus.exchange_name, "--every", "1s"]
    ticker = asyncio.create_task(cli("ticker", "--max-ticks", "2", *opts))
    got = await take(ticks, 2)  # read as they come: each expires after one interval
    code, out = await ticker
    assert code == 0, out
    for message in got:
        body = orjson.loads(message.body)
        slot = body["payload"]["epoch_ms"]
        assert slot % 1000 == 0
        assert body["event_id"] == message.message_id == tick_event_id(bus.exchange_name, slot)
        assert message.expiration == 1.0, "expires after one interval"
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    slots = [orjson.loads(m.body)["payload"]["epoch_ms"] for m in got]
    assert slots[1] - slots[0] == 1000


async def test_consumer_recovers_after_a_broker_restart(bus: Bus, tmp_path: Path) -> None:
    agent = bus.agent()
    config = write(tmp_path, agent, {"c": {"cadenceMs": 1, "handler": "default"}})
    results = await bus.collector(f"heartbeat.{agent}.#")
    async with running(bus, agent, config, tick_interval_ms=1000):
        await take(results, 1)
        await rabbitmqctl("stop_app")
        await rabbitmqctl("start_app")
        await rabbitmqctl("await_startup")
        delivered = await tick_until_result(bus, results, attempts=60)
        assert delivered, "no tick processed after restart"
        assert set(delivered) == {f"heartbeat.{agent}.c.success"}


async def test_environment_mode_with_unreachable_broker_names_the_masked_url(
    tmp_path: Path,
) -> None:
    config = write(tmp_path, "envnobroker", {"c": {"cadenceMs": 1, "handler": "default"}})
    env = {
        **__import__("os").environ,
        "AGENT_NAME": "envnobroker",
        "HEARTBEAT_PATH": str(config),
        "HEARTBEAT_STATE_PATH": str(tmp_path / "state.json"),
        "RABBIT_URL": "amqp://guest:s3cret@127.0.0.1:1/",
    }
    code, out = await cli(env=env)
    assert code == 1
    assert "cannot reach RabbitMQ at amqp://guest:***@127.0.0.1:1/" in out
    assert "s3cret" not in out
    assert "Traceback" not in out
    assert (tmp_path / "state.json.lock").exists(), "HEARTBEAT_STATE_PATH is honoured"


async def test_started_announces_each_run_and_alive_reports_idle_ticks(
    bus: Bus, tmp_path: Path
) -> None:
    """What the monitor's dead-man's switch hears: ``started`` before each run (with its
    timeout and cadence, also in the result), ``alive`` after a tick that ran nothing."""
    agent = bus.agent()
    config = write(
        tmp_path, agent, {"c": {"cadenceMs": 3_600_000, "handler": "default", "timeoutMs": 5000}}
    )
    events = await bus.collector(f"heartbeat.{agent}.#")
    async with running(bus, agent, config, alive_every_ms=60_000):
        online, started, result = await take(events, 3, skip_status=False)
        assert online.routing_key == f"heartbeat.{agent}._status.online"
        assert started.routing_key == f"heartbeat.{agent}.c.started"
        assert result.routing_key == f"heartbeat.{agent}.c.success"
        announced = orjson.loads(started.body)
        done = orjson.loads(result.body)
        assert announced["event_type"] == started.routing_key
        assert announced["payload"]["idempotency_key"] == done["payload"]["idempotency_key"]
        for payload in (announced["payload"], done["payload"]):
            assert payload["timeout_ms"] == 5000
            assert payload["cadence_ms"] == 3_600_000
        assert announced["event_id"] != done["event_id"]
        await bus.publish("system.heartbeat.tick", tick(datetime.now(UTC) + timedelta(minutes=1)))
        (alive,) = await take(events, 1, skip_status=False)
        assert alive.routing_key == f"heartbeat.{agent}._status.alive"
        assert orjson.loads(alive.body)["payload"]["slot"].endswith("Z")


async def test_the_inbox_is_consumed_with_prefetch_one_also_after_a_reconnect(
    bus: Bus, tmp_path: Path
) -> None:
    """FastStream consumes through the queue object declared first: the inbox must be
    declared on the subscriber's channel, or it is consumed without a prefetch limit
    (every queued tick delivered at once, one task each)."""
    agent = bus.agent()
    config = write(tmp_path, agent, {"c": {"cadenceMs": 3_600_000, "handler": "default"}})

    async def prefetch() -> list[str]:
        listing = await rabbitmqctl("list_consumers", "queue_name", "prefetch_count")
        return [line.split("\t")[1] for line in listing.splitlines() if agent in line]

    async with running(bus, agent, config) as consumer:
        assert await prefetch() == ["1"]
        await rabbitmqctl("close_all_connections", "test: reconnect")
        for _ in range(100):
            if (await consumer.health()).ok:
                break
            await asyncio.sleep(0.1)
        assert await prefetch() == ["1"]


async def test_every_command_and_tick_gets_an_answer_the_cli_waits_for(
    bus: Bus, tmp_path: Path
) -> None:
    """run-check and tick --agent publish as mandatory and wait for the agent's
    answer: done, rejected (unknown check, not due), nothing due (a slot evaluated
    already), unroutable (no such agent), unanswered (no consumer)."""
    agent = bus.agent()
    config = write(tmp_path, agent, {"c": {"cadenceMs": 3_600_000, "handler": "default"}})
    replies = await bus.collector(f"heartbeat.{agent}._command.*")
    opts = ["--rabbit-url", bus.url, "--exchange", bus.exchange_name]
    await clear_of_the_minute_end(30)  # the start-up run and the tick share a slot
    async with running(bus, agent, config, state_path=tmp_path / "s.json"):
        code, out = await cli("run-check", agent, "c", "--force", *opts)
        assert code == 0, out
        assert f"run {agent}/c: done: c: success" in out, out
        code, out = await cli("run-check", agent, "c", *opts)
        assert code == 1, out
        assert f"run {agent}/c: rejected: not due" in out, out
        code, out = await cli("run-check", agent, "nosuch", *opts)
        assert code == 1, out
        assert f"no check named 'nosuch' in the config of {agent}" in out, out
        code, out = await cli("tick", "--agent", agent, *opts)
        assert code == 0, out
        assert "nothing due: the slot" in out, out
        assert "evaluated already" in out, out
        code, out = await cli("run-check", agent, "c", "--no-wait", *opts)
        assert code == 0, out
        assert "sent" in out, out
        await asyncio.sleep(0.5)
        answers = []
        while (message := await replies.get(no_ack=True, fail=False)) is not None:
            answers.append(message)
        words = [m.routing_key.rsplit(".", 1)[1] for m in answers]
        assert words.count("ack") == 2, words
        assert words.count("error") == 3, words
        for message in answers:
            assert message.correlation_id == orjson.loads(message.body)["payload"]["command_id"]
    code, out = await cli("run-check", bus.agent("nobody"), "c", *opts)
    assert code == 1, out
    assert "is listening on exchange" in out, out
    code, out = await cli("run-check", agent, "c", "--wait", "1s", *opts)  # nobody consumes
    assert code == 1, out
    assert f"no answer from {agent} within 1s" in out, out
    assert "Traceback" not in out


@pytest.mark.parametrize("problem", ["vhost", "password"])
async def test_a_broker_that_refuses_is_one_line_naming_the_fix(
    bus: Bus, tmp_path: Path, problem: str
) -> None:
    base = bus.url.rstrip("/")
    url = f"{base}/no-such-vhost" if problem == "vhost" else base.replace(":guest@", ":wrong@")
    code, out = await cli("run-check", "a", "c", "--rabbit-url", url)
    expected = {
        "vhost": "has no virtual host 'no-such-vhost' that user 'guest' may use",
        "password": "refused the login of user 'guest': check the user name and password",
    }[problem]
    assert code == 1, out
    assert expected in out, out
    assert len(out.strip().splitlines()) == 1, out  # no "Reconnecting after 5 seconds"
    assert "wrong" not in out
    assert "Connection.OpenOk" not in out


async def test_a_queue_or_exchange_declared_elsewhere_is_said_in_a_line_or_two(
    bus: Bus, tmp_path: Path
) -> None:
    agent = bus.agent()
    config = write(tmp_path, agent, {"c": {"cadenceMs": 3_600_000, "handler": "default"}})
    await bus.channel.declare_queue(
        f"agent.{agent}.inbox", durable=True, arguments={"x-max-length": 5}
    )
    opts = [
        "--rabbit-url",
        bus.url,
        "--exchange",
        bus.exchange_name,
        "--state",
        str(tmp_path / "s.json"),
    ]
    proc = await asyncio.create_subprocess_exec(
        BIN, "run", str(config), "--agent", agent, *opts,
        cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    await asyncio.sleep(3)
    proc.send_signal(__import__("signal").SIGTERM)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    text = err.decode()
    assert proc.returncode == 0, text
    assert "exists with other arguments" in text, text
    assert "Traceback" not in text, text
    await bus.cleanup()
    await bus.channel.declare_exchange(bus.exchange_name, aio_pika.ExchangeType.FANOUT)
    code, out = await cli("run", str(config), "--agent", agent, *opts)
    assert code == 1, out
    assert "with other settings" in out, out
    assert len(out.strip().splitlines()) <= 2, out
    assert "Traceback" not in out, out


async def test_one_consumer_per_agent_and_state_directory_whatever_the_entry_point(
    bus: Bus, tmp_path: Path
) -> None:
    """Two consumers of one agent with different state files in one directory: the
    second is refused, by the CLI, a fleet and HeartbeatConsumer alike."""
    from heartbeat_consumer.bus.fleet import Fleet
    from heartbeat_consumer.runtime.store import AgentBusy

    agent = bus.agent()
    config = write(tmp_path, agent, {"c": {"cadenceMs": 3_600_000, "handler": "default"}})
    async with running(bus, agent, config, state_path=tmp_path / "one.json"):
        opts = ["--rabbit-url", bus.url, "--exchange", bus.exchange_name]
        second = await asyncio.create_subprocess_exec(
            BIN, "run", str(config), "--state", str(tmp_path / "two.json"), *opts,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        try:
            out = (await asyncio.wait_for(second.communicate(), 30))[0].decode()
        except TimeoutError:
            second.kill()
            await second.wait()
            pytest.fail("a second consumer of the agent runs beside the first")
        assert second.returncode == 1, out
        assert f"agent {agent} already runs with the state directory" in out, out
        twin = HeartbeatConsumer(
            agent, config, bus.url, bus.exchange_name, state_path=tmp_path / "three.json"
        )
        with pytest.raises(AgentBusy):
            await twin.start()
        await twin.broker.stop()
        fleet = Fleet(tmp_path, bus.url, bus.exchange_name, state_dir=tmp_path, rescan_s=3600)
        await fleet.start()
        try:
            assert agent not in fleet.agents
            assert "already runs" in fleet.failed[agent].error
        finally:
            await fleet.stop()
    async with running(bus, agent, config, state_path=tmp_path / "two.json"):
        pass  # free again once the first one stopped


async def test_a_flood_of_ticks_to_every_agent_in_an_evaluated_slot_draws_no_answers(
    bus: Bus, tmp_path: Path
) -> None:
    """A tick to every agent is answered by runs or alive only: ticks with fresh ids for a
    slot evaluated already (a flood from the ticker's user) are not answered by each."""
    agent = bus.agent()
    config = write(tmp_path, agent, {"c": {"cadenceMs": 3_600_000, "handler": "default"}})
    replies = await bus.collector(f"heartbeat.{agent}._command.*")
    async with running(bus, agent, config, state_path=tmp_path / "s.json"):
        now = datetime.now(UTC)
        for n in range(30):
            await bus.publish("system.heartbeat.tick", {**tick(now), "event_id": f"flood-{n}"})
        await bus.publish(f"agent.{agent}.heartbeat.tick", {**tick(now), "event_id": "mine"})
        (answer,) = await take(replies, 1, skip_status=False)
        await asyncio.sleep(0.3)
        assert await replies.get(no_ack=True, fail=False) is None
    assert orjson.loads(answer.body)["payload"]["command_id"] == "mine"


async def test_a_tick_that_failed_on_the_broker_is_evaluated_when_it_comes_back(
    bus: Bus, tmp_path: Path
) -> None:
    agent = bus.agent()
    config = write(tmp_path, agent, {"c": {"cadenceMs": 1, "handler": "default"}})
    results = await bus.collector(f"heartbeat.{agent}.c.*")
    async with running(bus, agent, config, tick_interval_ms=1000) as consumer:
        await take(results, 1)  # start-up
        runner = consumer.agent.runner
        announce = runner.on_start
        assert announce is not None
        failures = [ConnectionError("the broker went away")]

        async def flaky(run: Any) -> None:
            if failures:
                raise failures.pop()
            await announce(run)

        runner.on_start = flaky
        await asyncio.sleep(1.1)
        await bus.publish(f"agent.{agent}.heartbeat.tick", tick())
        (result,) = await take(results, 1)
    assert not failures
    assert result.routing_key == f"heartbeat.{agent}.c.success"


async def test_a_broker_that_fails_publishes_for_two_seconds_dead_letters_no_tick(
    bus: Bus, tmp_path: Path
) -> None:
    """The result of a tick cannot be published for two seconds (as while a connection
    is restored). The delivery goes back to the queue after a growing pause, not five
    times within milliseconds, so it is not dead-lettered: its result (kept, not re-run)
    is sent once publishing works again, and the tick is acked."""
    agent = bus.agent()
    config = write(tmp_path, agent, {"c": {"cadenceMs": 1, "handler": "default"}})
    results = await bus.collector(f"heartbeat.{agent}.c.*")
    async with running(bus, agent, config, tick_interval_ms=1000) as consumer:
        await take(results, 1)  # start-up
        runner = consumer.agent.runner
        publish = runner.on_result
        assert publish is not None
        loop = asyncio.get_running_loop()
        broken_until = loop.time() + 3600.0
        failed = 0

        async def flaky(result: Any) -> None:
            nonlocal failed
            if loop.time() < broken_until:
                failed += 1
                raise ConnectionError("the broker went away")
            await publish(result)

        runner.on_result = flaky
        await asyncio.sleep(1.1)
        broken_until = loop.time() + 2.0
        ahead = floor_to(now_ms(), 1000) + 30_000  # not stale while it is retried
        await bus.publish(f"agent.{agent}.heartbeat.tick", slot_tick(ahead))
        (result,) = await take(results, 1, within=15)
        await settled(f"agent.{agent}.inbox")
        assert await bus.count(f"agent.{agent}.dlq") == 0, "a confirmed tick dead-lettered"
    assert result.routing_key == f"heartbeat.{agent}.c.success"
    assert 2 <= failed < 5, failed


async def test_an_unreadable_command_is_dead_lettered_and_answered(
    bus: Bus, tmp_path: Path
) -> None:
    agent = bus.agent()
    config = write(tmp_path, agent, {"c": {"cadenceMs": 3_600_000, "handler": "default"}})
    replies = await bus.collector(f"heartbeat.{agent}._command.*")
    async with running(bus, agent, config, state_path=tmp_path / "s.json"):
        await bus.publish(
            f"agent.{agent}.heartbeat.pause",
            {**tick(), "event_id": "no-check", "payload": {"reason": "which one?"}},
        )
        (answer,) = await take(replies, 1, skip_status=False)
    assert answer.routing_key == f"heartbeat.{agent}._command.error"
    payload = orjson.loads(answer.body)["payload"]
    assert payload["command_id"] == "no-check"
    assert payload["outcome"] == "rejected"


async def test_an_inbox_with_other_arguments_and_no_bindings_still_gets_its_ticks(
    bus: Bus, tmp_path: Path
) -> None:
    agent = bus.agent()
    config = write(tmp_path, agent, {"c": {"cadenceMs": 1, "handler": "default"}})
    await bus.channel.declare_queue(
        f"agent.{agent}.inbox", durable=True, arguments={"x-max-length": 50}
    )
    results = await bus.collector(f"heartbeat.{agent}.c.*")
    async with running(bus, agent, config, tick_interval_ms=1000):
        await take(results, 1)
        await asyncio.sleep(1.1)
        await bus.publish("system.heartbeat.tick", tick())
        await take(results, 1)  # bound as ours is, although declared elsewhere


async def test_the_cli_believes_only_the_agent_s_own_answers() -> None:
    """An answer counts only under the agent's own keys, of the type its key says and
    naming the agent and command: a forged reply on an alert key (which the monitor's
    user may publish) or on another agent's key (a CC copy keeps it) is ignored."""
    from types import SimpleNamespace

    from heartbeat_consumer.bus.request import _correlated

    def message(key: str, event_type: str, **payload: Any) -> Any:
        body = {"event_type": event_type, "correlation_ids": ["id"], "payload": payload}
        return SimpleNamespace(routing_key=key, body=orjson.dumps(body), correlation_id="id")

    reply = {"agent": "a", "command_id": "id", "outcome": "done", "reason": "ok"}
    assert _correlated(message("heartbeat.a._command.ack", "heartbeat.reply", **reply), "id", "a")
    for forged in (
        message("heartbeat.a._alert.stale", "heartbeat.reply", **reply),
        message("heartbeat.evil._command.ack", "heartbeat.reply", **reply),
        message("heartbeat.a._command.ack", "heartbeat.reply", **{**reply, "agent": "b"}),
        message("heartbeat.a._command.ack", "heartbeat.reply", **{**reply, "command_id": "x"}),
        message("heartbeat.a._command.ack", "heartbeat.result", **reply),
        message("heartbeat.a.c.success", "heartbeat.reply", **reply),
        message("heartbeat.a.c.success", "heartbeat.result", agent="a", check="d"),
    ):
        assert _correlated(forged, "id", "a") is None, forged.routing_key
    result = message("heartbeat.a.c.success", "heartbeat.result", agent="a", check="c")
    assert _correlated(result, "id", "a")


async def test_waiting_ends_when_the_connection_is_lost() -> None:
    from heartbeat_consumer.bus.request import LOST, _wait

    arrived: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    arrived.put_nowait(LOST)
    answer = await asyncio.wait_for(_wait("id", arrived, 60, None), 5)
    assert answer.outcome == "lost"


async def test_two_forced_runs_in_one_slot_have_two_result_ids(bus: Bus, tmp_path: Path) -> None:
    agent = bus.agent()
    config = write(tmp_path, agent, {"c": {"cadenceMs": 3_600_000, "handler": "default"}})
    results = await bus.collector(f"heartbeat.{agent}.c.success")
    opts = ["--rabbit-url", bus.url, "--exchange", bus.exchange_name]
    hourly = {"tick_interval_ms": 3_600_000}  # one slot for the whole test
    async with running(bus, agent, config, state_path=tmp_path / "s.json", **hourly):
        (startup,) = await take(results, 1)
        for _ in range(2):
            code, out = await cli("run-check", agent, "c", "--force", *opts)
            assert code == 0, out
        forced = await take(results, 2)
    events = [orjson.loads(m.body) for m in (startup, *forced)]
    keys = {e["payload"]["idempotency_key"] for e in events}
    assert len({e["event_id"] for e in events}) == 3, "stores keyed on the id keep all three"
    assert len(keys) == 1, "one slot: one idempotency key"


async def test_an_idle_agent_says_alive_now_and_then_not_on_every_tick(
    bus: Bus, tmp_path: Path
) -> None:
    """`alive` at most once per --alive-every: 1,440 events a day per idle agent on
    one-minute ticks were noise in stores that keep everything."""
    agent = bus.agent()
    config = write(tmp_path, agent, {"c": {"cadenceMs": 3_600_000, "handler": "default"}})
    events = await bus.collector(f"heartbeat.{agent}._status.alive")
    options: dict[str, Any] = {"tick_interval_ms": 1000, "alive_every_ms": 3000}
    async with running(bus, agent, config, **options):
        start = datetime.now(UTC).replace(microsecond=0)
        for second in range(1, 7):  # ticks for the next six one-second slots
            await bus.publish("system.heartbeat.tick", tick(start + timedelta(seconds=second)))
        await asyncio.sleep(1.5)
    slots = [orjson.loads(m.body)["payload"]["slot"] for m in await drain_all(events)]
    assert len(slots) == 2, slots  # the run at start-up was heard; then every 3 s
