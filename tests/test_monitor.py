"""The fleet monitor against the real broker and real consumers: it hears the agents,
alerts once per incident (published on the bus), remembers across a restart, serves
the status API, /health and /metrics, and dead-letters what it cannot read."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from heartbeat_consumer.bus.connection import REASON_HEADER
from heartbeat_consumer.monitor.monitor import Monitor, status_document
from heartbeat_consumer.monitor.rules import WatchConfig, WatchState, observe
from heartbeat_consumer.runtime.engine import wall_clock_ms

from .broker import Bus, drain, new_monitor, running, settled, take, watching
from .helpers import Clock, envelope, free_port, http, sample, until, write

MIN = 60_000
HOUR = 60 * MIN


def last_status(monitor: Monitor, agent: str, check: str) -> str | None:
    view = monitor.state.agents.get(agent)
    found = view.checks.get(check) if view else None
    return found.last_status if found else None


# --- the status document (pure) -------------------------------------------------------------


def test_status_document_has_the_reference_shape_and_per_check_detail() -> None:
    t0 = 1_800_000_000_000
    state = WatchState()
    for event, at in (
        ({"event_type": "heartbeat.status", "payload": {"agent": "pm", "status": "online"}}, t0),
        (
            {
                "event_type": "heartbeat.result",
                "payload": {
                    "agent": "pm",
                    "check": "inbox",
                    "status": "success",
                    "slot": t0,
                    "cadence_ms": 15 * MIN,
                    "duration_ms": 40,
                },
            },
            t0 + 1000,
        ),
        (
            {
                "event_type": "heartbeat.started",
                "payload": {"agent": "dev", "check": "build", "idempotency_key": "dev:build:1"},
            },
            t0 + 2000,
        ),
    ):
        state = observe(state, event, at)
    doc = status_document(state, WatchConfig(), t0 + 5 * MIN, running=True)
    assert doc["success"] is True
    assert doc["status"] == "online"
    assert doc["monitor"]["running"] is True
    assert doc["monitor"]["agents_monitoring"] == 2
    assert doc["monitor"]["agents"] == ["dev", "pm"]
    assert doc["monitor"]["config"]["stale_threshold_ms"] == 600_000
    assert doc["timestamp"] == "2027-01-15T08:05:00.000Z"
    flights = {f["agent_id"]: f for f in doc["in_flight_agents"]}
    assert flights["dev"] == {
        "agent_id": "dev",
        "task_id": "dev:build:1",
        "status": "running",
        "running_for_ms": 5 * MIN - 2000,
        "idle_for_ms": 5 * MIN - 2000,
    }
    assert flights["pm"]["status"] == "idle"
    assert flights["pm"]["task_id"] is None
    pm = next(a for a in doc["agents"] if a["agent_id"] == "pm")
    inbox = pm["checks"]["inbox"]
    assert inbox["status"] == "success"
    assert inbox["since_last_run_ms"] == 5 * MIN - 1000
    assert inbox["next_due_at"] == "2027-01-15T08:15:00.000Z"
    assert inbox["due_in_ms"] == 10 * MIN
    assert inbox["duration_ms"] == 40
    down = status_document(state, WatchConfig(), t0, running=False)
    assert down["status"] == "offline"
    assert down["monitor"]["running"] is False


# --- against the broker ---------------------------------------------------------------------


async def test_monitor_hears_real_consumers_and_alerts_once_per_incident(
    bus: Bus, tmp_path: Path
) -> None:
    """A real consumer's online, started and result events reach the monitor; silence
    raises one stale alert on the bus; a restarted monitor does not send it again; the
    agent's next event resolves it."""
    agent = bus.agent()
    config = write(tmp_path, agent, {"c": {"cadenceMs": HOUR, "handler": "default"}})
    alerts = await bus.collector(f"heartbeat.{agent}._alert.#")
    clock = Clock()
    state_path = tmp_path / "monitor.state.json"
    async with watching(bus, state_path, clock) as monitor:
        async with running(bus, agent, config):
            await until(lambda: last_status(monitor, agent, "c") == "success")
        await until(lambda: monitor.state.agents[agent].status == "offline")
        assert await monitor.evaluate_once() == []  # offline on purpose: not stale

        # An agent that goes silent without saying goodbye (crash): back online, silent.
        await bus.publish(
            f"heartbeat.{agent}._status.online",
            envelope("heartbeat.status", {"agent": agent, "status": "online"}),
        )
        await until(lambda: monitor.state.agents[agent].online)
        clock.offset = 11 * MIN  # past the default stale threshold, 10 min
        sent = await monitor.evaluate_once()
        assert [(a.kind, a.agent) for a in sent] == [("stale", agent)]
        (published,) = await take(alerts, 1, skip_status=False)
        assert published.routing_key == f"heartbeat.{agent}._alert.stale"
        body = orjson.loads(published.body)
        assert body["event_type"] == published.routing_key
        assert body["payload"]["severity"] == "warning"
        assert published.delivery_mode == 2  # persistent
        assert await monitor.evaluate_once() == []  # not re-sent
        await until(lambda: monitor.metrics.events.labels("ignored")._value.get() >= 1)

    saved = WatchState.from_json(state_path.read_bytes())
    assert list(saved.incidents) == [f"{agent}:stale:*"]
    async with watching(bus, state_path, clock) as monitor:
        assert await monitor.evaluate_once() == []  # remembered: not sent again
        async with running(bus, agent, config):
            clock.offset = 0
            await until(lambda: monitor.state.agents[agent].status in ("online", "alive"))
            sent = await monitor.evaluate_once()
            assert [(a.kind, a.incident) for a in sent] == [("resolved", f"{agent}:stale:*")]
    kinds = [m.routing_key for m in await take(alerts, 1, skip_status=False)]
    assert kinds == [f"heartbeat.{agent}._alert.resolved"]
    assert await drain(alerts) == []


async def test_a_run_that_never_finishes_raises_a_timeout_error(bus: Bus, tmp_path: Path) -> None:
    agent = bus.agent()
    alerts = await bus.collector(f"heartbeat.{agent}._alert.#")
    clock = Clock()
    async with watching(bus, tmp_path / "m.json", clock) as monitor:
        await bus.publish(
            f"heartbeat.{agent}.build.started",
            envelope(
                "heartbeat.started",
                {
                    "agent": agent,
                    "check": "build",
                    "idempotency_key": f"{agent}:build:1",
                    "timeout_ms": MIN,
                    "cadence_ms": HOUR,
                },
            ),
        )
        await until(lambda: agent in monitor.state.agents)
        clock.offset = MIN + 25_000
        assert await monitor.evaluate_once() == []  # within timeout + 30 s grace
        clock.offset = MIN + 31_000
        sent = await monitor.evaluate_once()
        assert [(a.kind, a.check, a.severity) for a in sent] == [("timeout", "build", "error")]
        document = monitor.status()
        (flight,) = document["in_flight_agents"]
        assert flight["task_id"] == f"{agent}:build:1"
        assert flight["running_for_ms"] >= MIN
    (message,) = await take(alerts, 1, skip_status=False)
    assert message.routing_key == f"heartbeat.{agent}._alert.timeout"


async def test_unreadable_events_are_dead_lettered_with_the_reason(
    bus: Bus, tmp_path: Path
) -> None:
    agent = bus.agent()
    async with watching(bus, tmp_path / "m.json") as monitor:
        await bus.publish(f"heartbeat.{agent}.c.success", b"{not json")
        await bus.publish(f"heartbeat.{agent}.c.success", orjson.dumps({"payload": {}}))
        dlq = monitor.dlq_name
        await until(lambda: monitor.metrics.monitor_dead_lettered._metrics.__len__() == 2)
        queue = await bus.channel.declare_queue(dlq, passive=True)
        dead = await take(queue, 2, skip_status=False)
        reasons = sorted(m.headers[REASON_HEADER] for m in dead)
        assert reasons[0].startswith("envelope field 'event_id'")
        assert reasons[1].startswith("malformed JSON")
        assert monitor.state.agents == {}


async def test_alerts_that_cannot_be_published_are_sent_at_the_next_evaluation(
    bus: Bus, tmp_path: Path
) -> None:
    """The exchange disappears: the publish fails, the incident is not recorded; once it
    is back, the next evaluation sends the alert."""
    agent = bus.agent()
    clock = Clock()
    async with watching(bus, tmp_path / "m.json", clock) as monitor:
        await bus.publish(
            f"heartbeat.{agent}._status.online",
            envelope("heartbeat.status", {"agent": agent, "status": "online"}),
        )
        await until(lambda: agent in monitor.state.agents)
        await bus.channel.exchange_delete(bus.exchange_name)
        clock.offset = 10 * MIN
        assert await monitor.evaluate_once() == []
        assert monitor.state.incidents == {}
        assert monitor.metrics.alert_errors._value.get() == 1
        await bus.exchange()  # declared again
        alerts = await bus.collector(f"heartbeat.{agent}._alert.#")
        sent: list[Any] = []
        for _ in range(50):  # the robust channel reopens after the 404
            sent = await monitor.evaluate_once()
            if sent:
                break
            await asyncio.sleep(0.1)
        assert [a.kind for a in sent] == ["stale"]
        assert len(await take(alerts, 1, skip_status=False)) == 1


async def test_status_api_health_metrics_and_dashboard_over_http(bus: Bus, tmp_path: Path) -> None:
    agent = bus.agent()
    config = write(tmp_path, agent, {"c": {"cadenceMs": HOUR, "handler": "default"}})
    port = free_port()
    monitor = new_monitor(bus, tmp_path / "m.json", check_every_ms=200)
    stop = asyncio.Event()
    task = asyncio.create_task(monitor.run(stop, port=port))
    try:
        await until(lambda: monitor.running)
        async with running(bus, agent, config):
            await until(lambda: last_status(monitor, agent, "c") is not None)
            status, headers, body = await http(port, "/api/heartbeat/status")
            assert status == 200
            assert headers["Content-Type"] == "application/json"
            document = orjson.loads(body)
            assert document["status"] == "online"
            assert agent in document["monitor"]["agents"]
            (row,) = document["agents"]
            assert row["checks"]["c"]["status"] == "success"
            assert row["state"] == "idle"
            status, _, body = await http(port, "/health")
            health = orjson.loads(body)
            assert status == 200
            assert health["consumers"] == 1
            assert health["queue"] == monitor.queue.name
            await until(lambda: monitor.last_evaluation is not None)
            _, _, metrics = await http(port, "/metrics")
            assert sample(metrics, "heartbeat_monitor_agents", state="online") == 1
            assert (sample(metrics, "heartbeat_monitor_events_total", type="result") or 0) >= 1
            status, headers, page = await http(port, "/")
            assert status == 200
            assert headers["Content-Type"].startswith("text/html")
            assert b"/api/heartbeat/status" in page
    finally:
        stop.set()
        await task
    assert WatchState.from_json((tmp_path / "m.json").read_bytes()).agents[agent].checks


def test_a_corrupt_state_file_is_set_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "m.json"
    path.write_text("{ not a state")
    monitor = Monitor(state_path=path)
    monitor.load()
    assert monitor.state == WatchState()
    assert (tmp_path / "m.json.corrupt").read_text() == "{ not a state"
    assert "unreadable" in caplog.text


def test_fresh_monitor_has_no_agents(tmp_path: Path) -> None:
    monitor = Monitor(state_path=tmp_path / "m.json")
    monitor.load()
    assert monitor.status(connected=False)["status"] == "offline"


async def test_result_events_dated_by_their_timestamp(bus: Bus, tmp_path: Path) -> None:
    """A backlog read after a restart keeps its own times (never later than arrival)."""
    agent = bus.agent()
    old = wall_clock_ms() - 30 * MIN
    async with watching(bus, tmp_path / "m.json") as monitor:
        await bus.publish(
            f"heartbeat.{agent}.c.success",
            envelope(
                "heartbeat.result",
                {"agent": agent, "check": "c", "status": "success", "cadence_ms": HOUR},
                at_ms=old,
            ),
        )
        future = wall_clock_ms() + HOUR
        await bus.publish(
            f"heartbeat.{agent}._status.alive",
            envelope("heartbeat.status", {"agent": agent, "status": "alive"}, at_ms=future),
        )
        await until(lambda: monitor.state.agents.get(agent, None) is not None)
        await until(lambda: monitor.state.agents[agent].status == "alive")
        view = monitor.state.agents[agent]
        assert view.checks["c"].last_result_at == old
        assert view.last_seen is not None
        assert view.last_seen <= wall_clock_ms()


# --- hostile neighbours: payloads that lie, values out of range ------------------------------


def result(agent: str, check: str, status: str, **extra: Any) -> bytes:
    payload = {"agent": agent, "check": check, "status": status, "cadence_ms": MIN, **extra}
    return envelope("heartbeat.result", payload)


async def test_the_monitor_believes_the_routing_key_not_the_payload(
    bus: Bus, tmp_path: Path
) -> None:
    a, b = bus.agent("ma"), bus.agent("mb")
    async with watching(bus, tmp_path / "m.json") as monitor:
        # A, on its own key, claims to be B, and to be other checks of its own.
        await bus.publish(f"heartbeat.{a}.c.failed", result(b, "c", "failed"))
        await bus.publish(f"heartbeat.{a}.c.failed", result(a, "invented", "failed"))
        await bus.publish(f"heartbeat.{a}.c.failed", result(a, "c", "success"))
        await bus.publish(f"heartbeat.{a}.c.failed", envelope("heartbeat.status", {"agent": a}))
        await bus.publish(f"heartbeat.{a}.c.success", result(a, "c", "success"))  # honest
        await until(lambda: last_status(monitor, a, "c") == "success")
        await settled(monitor.queue.name)
        assert set(monitor.state.agents) == {a}, "B never appears"
        assert set(monitor.state.agents[a].checks) == {"c"}, "no invented check"
        dropped = {
            s.labels["reason"]: s.value
            for m in monitor.metrics.events_dropped.collect()
            for s in m.samples
            if s.name.endswith("_total")
        }
        assert dropped == {
            "agent_mismatch": 1,
            "check_mismatch": 1,
            "status_mismatch": 1,
            "kind_mismatch": 1,
        }


async def test_values_out_of_range_never_take_the_status_api_down(bus: Bus, tmp_path: Path) -> None:
    agent = bus.agent()
    state = tmp_path / "m.json"
    port = free_port()
    monitor = new_monitor(bus, state, check_every_ms=100)
    stop = asyncio.Event()
    task = asyncio.create_task(monitor.run(stop, port=port))
    try:
        await until(lambda: monitor.running)
        huge = {"slot": 10**17, "cadence_ms": 10**18, "duration_ms": -(10**18)}
        await bus.publish(f"heartbeat.{agent}.c.success", result(agent, "c", "success", **huge))
        started = {"agent": agent, "check": "c", "timeout_ms": 10**19, "cadence_ms": 1e300}
        await bus.publish(
            f"heartbeat.{agent}.d.started", envelope("heartbeat.started", {**started, "check": "d"})
        )
        await until(lambda: agent in monitor.state.agents)
        await until(lambda: len(monitor.state.agents[agent].checks) == 2)
        await asyncio.sleep(0.3)  # an evaluation or two, and a save
        status, _, body = await http(port, "/api/heartbeat/status")
        assert status == 200, body[:200]
        (row,) = orjson.loads(body)["agents"]
        assert row["checks"]["c"]["cadence_ms"] is None
        assert row["checks"]["c"]["next_due_at"] is None
    finally:
        stop.set()
        await task
    # A state file that holds such values anyway (another writer, a hand edit) loads.
    raw = orjson.loads(state.read_bytes())
    raw["agents"][agent]["checks"]["c"].update(last_slot=10**17, cadence_ms=10**18)
    raw["agents"][agent]["last_seen"] = -(10**17)
    state.write_bytes(orjson.dumps(raw))
    again = new_monitor(bus, state)
    again.load()
    document = again.status(connected=False)
    assert document["agents"][0]["checks"]["c"]["next_due_at"] is None
    orjson.dumps(document)


async def test_old_timestamps_are_dated_by_arrival_and_checks_are_capped(
    bus: Bus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from heartbeat_consumer.monitor import monitor as monitor_module

    monkeypatch.setattr(monitor_module, "MAX_CHECK_VIEWS", 3)
    agent = bus.agent()
    async with watching(bus, tmp_path / "m.json") as monitor:
        # A run "started" in 1970 with a 1 ms timeout: not a timeout the moment it arrives.
        started = {"agent": agent, "check": "c", "timeout_ms": 1, "cadence_ms": MIN}
        await bus.publish(f"heartbeat.{agent}.c.started", envelope("heartbeat.started", started, 0))
        await until(lambda: agent in monitor.state.agents)
        view = monitor.state.agents[agent].checks["c"]
        assert view.started_at is not None
        assert view.started_at > wall_clock_ms() - MIN
        assert [a.kind for a in await monitor.evaluate_once()] == []
        for name in ("d", "e", "f", "g"):  # one fleet-wide view is left, then no more
            await bus.publish(f"heartbeat.{agent}.{name}.success", result(agent, name, "success"))
        await settled(monitor.queue.name)
        assert set(monitor.state.agents[agent].checks) == {"c", "d", "e"}
        dropped = {
            s.labels["reason"]: s.value
            for m in monitor.metrics.events_dropped.collect()
            for s in m.samples
            if s.name.endswith("_total")
        }
        assert dropped == {"too_many_checks": 2}


async def status_over_http(port: int, condition: Callable[[dict[str, Any]], bool]) -> Any:
    """The status API's document once ``condition`` holds (it is cached for a second)."""
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        status, _, body = await http(port, "/api/heartbeat/status")
        document = orjson.loads(body)
        if status == 200 and condition(document):
            return document
        assert asyncio.get_running_loop().time() < deadline, document
        await asyncio.sleep(0.1)


async def test_an_agent_never_valid_raises_config_invalid_until_it_is_alive(
    bus: Bus, tmp_path: Path
) -> None:
    """The first events the monitor hears of a fresh agent are its online and
    config_invalid: one config_invalid error alert on the bus, the agent red with the
    reason in the status API (not idle); its alive resolves it."""
    agent = bus.agent("broken")
    reason = "heartbeat.json: Expecting ',' delimiter: line 3 column 5 <b>x</b>"
    alerts = await bus.collector(f"heartbeat.{agent}._alert.#")
    port = free_port()
    monitor = new_monitor(bus, tmp_path / "m.json", check_every_ms=3_600_000)
    stop = asyncio.Event()
    task = asyncio.create_task(monitor.run(stop, port=port))
    try:
        await until(lambda: monitor.running)
        for word, extra in (("online", {}), ("config_invalid", {"error": reason})):
            await bus.publish(
                f"heartbeat.{agent}._status.{word}",
                envelope("heartbeat.status", {"agent": agent, "status": word, **extra}),
            )
        await until(
            lambda: (
                agent in monitor.state.agents
                and monitor.state.agents[agent].status == "config_invalid"
            )
        )
        sent = await monitor.evaluate_once()
        assert [(a.kind, a.agent, a.severity) for a in sent] == [("config_invalid", agent, "error")]
        (published,) = await take(alerts, 1, skip_status=False)
        assert published.routing_key == f"heartbeat.{agent}._alert.config_invalid"
        payload = orjson.loads(published.body)["payload"]
        assert payload["kind"] == "config_invalid"
        assert payload["detail"] == reason
        assert payload["incident"] == f"{agent}:config_invalid:*"
        assert await monitor.evaluate_once() == []  # not re-sent

        document = await status_over_http(port, lambda d: bool(d["incidents"]))
        (row,) = document["agents"]
        assert row["state"] == "config_invalid"
        assert row["config_error"] == reason
        assert [(a["kind"], a["severity"], a["detail"]) for a in row["alerts"]] == [
            ("config_invalid", "error", reason)
        ]
        assert document["in_flight_agents"][0]["status"] == "config_invalid"
        saved = WatchState.from_json((tmp_path / "m.json").read_bytes())
        assert list(saved.incidents) == [f"{agent}:config_invalid:*"]

        await bus.publish(
            f"heartbeat.{agent}._status.alive",
            envelope("heartbeat.status", {"agent": agent, "status": "alive"}),
        )
        await until(lambda: monitor.state.agents[agent].status == "alive")
        sent = await monitor.evaluate_once()
        assert [(a.kind, a.incident) for a in sent] == [("resolved", f"{agent}:config_invalid:*")]
        (published,) = await take(alerts, 1, skip_status=False)
        assert published.routing_key == f"heartbeat.{agent}._alert.resolved"
        document = await status_over_http(port, lambda d: not d["incidents"])
        assert document["agents"][0]["state"] == "idle"
        assert document["agents"][0]["config_error"] is None
    finally:
        stop.set()
        await task
    assert await drain(alerts) == []
