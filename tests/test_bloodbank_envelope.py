"""Every event we publish is a Bloodbank ``EventEnvelope`` (see tests/bloodbank_envelope.py):
UUID ids, ``event_type`` the routing key, ``source.type`` a trigger type, UUID
correlation ids, ``payload.agent_name`` beside ``payload.agent``. Each kind is built by
the code that sends it (its publish captured, no broker), then all of them are taken off
a real broker from a consumer run driven by the CLI and the ticker. And what we read
stays as tolerant as before: the old ``event_type`` words and ids that are not UUIDs."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pydantic
import pytest

from heartbeat_consumer.bus.consumer import HeartbeatConsumer
from heartbeat_consumer.bus.fleet import Fleet
from heartbeat_consumer.bus.request import _correlated, send_and_wait
from heartbeat_consumer.bus.ticker import publish_event, tick_envelope
from heartbeat_consumer.core.topology import (
    ALERT_KINDS,
    STATUS_EVENTS,
    TICK_KEY,
    agent_key,
    alert_key,
    reply_key,
    result_key,
    status_key,
)
from heartbeat_consumer.monitor.monitor import Monitor
from heartbeat_consumer.monitor.rules import Alert, WatchState, event_source, observe
from heartbeat_consumer.runtime.engine import RunResult, StartedRun, local_envelope

from .bloodbank_envelope import EventEnvelope, TriggerType, assert_bloodbank_envelope
from .broker import Bus, drain, drain_all, running, take
from .helpers import cli, tick, write

NOWHERE = "amqp://guest:guest@127.0.0.1:1/"
"""No broker: the publishes below are captured before they reach one."""
SLOT = 1_800_000_000_000
AGENT = "pm"


def valid() -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()),
        "event_type": "heartbeat.pm.c.success",
        "timestamp": "2026-01-01T00:00:00.000Z",
        "version": "1.0.0",
        "source": {"host": "h", "type": "heartbeat", "app": "heartbeat-consumer"},
        "correlation_ids": [str(uuid.uuid4())],
        "payload": {"agent": AGENT, "agent_name": AGENT},
    }


# --- the re-typed model rejects what Bloodbank's rejects ------------------------------------


def test_the_model_takes_a_well_formed_envelope_and_ignores_unknown_fields() -> None:
    event = valid()
    event["extra"] = 1
    event["source"]["meta"] = {"component": "consumer"}
    event["source"]["other"] = "x"
    model = assert_bloodbank_envelope(event, "heartbeat.pm.c.success")
    assert model.source.type is TriggerType.HEARTBEAT
    minimal = {"event_type": "x", "source": {"host": "h", "type": "manual"}, "payload": None}
    assert EventEnvelope.model_validate(minimal).version == "1.0.0", "defaults, as there"
    assert {t.value for t in TriggerType} == {
        "manual",
        "agent",
        "scheduled",
        "heartbeat",
        "file_watch",
        "hook",
        "webhook",
        "service",
    }


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"event_id": "local:1800000000000"}, "event_id not a UUID"),
        ({"event_id": "t-1"}, "event_id not a UUID"),
        ({"correlation_ids": ["t1"]}, "a correlation id not a UUID"),
        ({"correlation_ids": "x"}, "correlation_ids not a list"),
        ({"source": {"host": "h", "type": "heartbeat-consumer"}}, "not a trigger type"),
        ({"source": {"host": "h", "type": "ticker"}}, "not a trigger type"),
        ({"source": {"type": "manual"}}, "no host"),
        ({"source": {"host": "h", "type": "manual", "app": 5}}, "app not a string"),
        ({"source": None}, "no source"),
        ({"event_type": 5}, "event_type not a string"),
        ({"version": 1}, "version not a string"),
        ({"timestamp": "yesterday"}, "not a time"),
        ({"agent_context": {"name": "x"}}, "agent_context without a type"),
        ({"agent_context": {"type": "robot"}}, "not an agent type"),
    ],
)
def test_the_model_refuses_what_bloodbank_refuses(change: dict[str, Any], why: str) -> None:
    event = {**valid(), **change}
    with pytest.raises(pydantic.ValidationError):
        EventEnvelope.model_validate(event)


@pytest.mark.parametrize("required", ["event_type", "source", "payload"])
def test_the_model_needs_a_type_a_source_and_a_payload(required: str) -> None:
    lacking = valid()
    del lacking[required]
    with pytest.raises(pydantic.ValidationError):
        EventEnvelope.model_validate(lacking)


def test_the_helper_asks_for_the_routing_key_agent_name_and_an_id() -> None:
    with pytest.raises(AssertionError, match="is not the routing key"):
        assert_bloodbank_envelope(valid(), "heartbeat.pm.c.failed")
    unnamed = valid()
    del unnamed["payload"]["agent_name"]
    with pytest.raises(AssertionError, match="agent_name"):
        assert_bloodbank_envelope(unnamed, "heartbeat.pm.c.success")
    anonymous = valid()
    del anonymous["event_id"]
    with pytest.raises(AssertionError, match="no event_id"):
        assert_bloodbank_envelope(anonymous, "heartbeat.pm.c.success")


# --- each kind, from the code that sends it ---------------------------------------------------


class Captured:
    """What a publish was asked to send: (routing key, event, AMQP correlation_id)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any], str]] = []

    async def send(self, key: str, event: dict[str, Any], correlation: str = "") -> None:
        self.sent.append((key, event, correlation))

    async def publish_json(
        self, broker: Any, exchange: Any, key: str, event: dict[str, Any], **kw: Any
    ) -> None:
        self.sent.append((key, event, kw.get("correlation_id") or ""))


def consumer_capturing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Captured]:
    config = write(tmp_path, AGENT, {"c": {"cadenceMs": 60_000, "handler": "default"}})
    consumer = HeartbeatConsumer(AGENT, config, NOWHERE, "ex", state_path=tmp_path / "s.json")
    captured = Captured()
    monkeypatch.setattr(consumer.agent, "_send", captured.send)
    return consumer.agent, captured


def source_type(event: dict[str, Any]) -> str:
    found: str = event["source"]["type"]
    return found


@pytest.mark.parametrize("status", STATUS_EVENTS)
async def test_status_events(status: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    agent, captured = consumer_capturing(tmp_path, monkeypatch)
    for _ in range(2):
        await agent.publish_status(status, correlation="t-1800000000000", reason="r")
    (key, event, correlation), again = captured.sent
    assert key == status_key(AGENT, status)
    model = assert_bloodbank_envelope(event, key)
    assert source_type(event) == "heartbeat"
    assert correlation == "t-1800000000000", "the raw id: what the CLI matches"
    assert len(model.correlation_ids) == 1
    assert again[1]["correlation_ids"] == event["correlation_ids"], "the same for the same id"
    assert event["payload"]["status"] == status


async def test_status_without_a_correlation_has_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent, captured = consumer_capturing(tmp_path, monkeypatch)
    await agent.publish_status("online", pid=1)
    ((key, event, _),) = captured.sent
    assert assert_bloodbank_envelope(event, key).correlation_ids == []


@pytest.mark.parametrize(
    ("outcome", "word"),
    [("done", "ack"), ("accepted", "ack"), ("nothing_due", "ack"), ("rejected", "error")],
)
async def test_command_replies(
    outcome: Any, word: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent, captured = consumer_capturing(tmp_path, monkeypatch)
    command_id = "cmd-not-a-uuid"
    await agent.reply("run", command_id, outcome, "why", check="c")
    ((key, event, correlation),) = captured.sent
    assert key == reply_key(AGENT, word)
    model = assert_bloodbank_envelope(event, key)
    assert source_type(event) == "heartbeat"
    assert correlation == command_id
    assert event["payload"]["command_id"] == command_id
    assert len(model.correlation_ids) == 1


async def test_started_and_result_events(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    agent, captured = consumer_capturing(tmp_path, monkeypatch)
    start = StartedRun(
        agent=AGENT,
        check="c",
        handler="default",
        slot=SLOT,
        started_at=SLOT + 5,
        idempotency_key=f"{AGENT}:c:{SLOT}",
        cadence_ms=60_000,
        timeout_ms=30_000,
    )
    agent._correlation = ["t-1800000000000", str(uuid.uuid4())]
    await agent._on_start(start)
    for status in ("success", "failed", "alert", "skipped", "timeout"):
        result = RunResult(
            **vars(start), status=status, finished_at=SLOT + 9, overdue_ratio=1.0, result={}
        )
        await agent._on_result(result)
    keys = [key for key, _, _ in captured.sent]
    assert keys == [
        result_key(AGENT, "c", word)
        for word in ("started", "success", "failed", "alert", "skipped", "timeout")
    ]
    for key, event, correlation in captured.sent:
        model = assert_bloodbank_envelope(event, key)
        assert source_type(event) == "heartbeat"
        assert correlation == "t-1800000000000"
        assert len(model.correlation_ids) == 2
        assert model.correlation_ids[1] == uuid.UUID(agent._correlation[1]), (
            "a UUID id is kept as it is"
        )


async def test_the_fleet_s_start_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    captured = Captured()
    monkeypatch.setattr("heartbeat_consumer.bus.fleet.publish_json", captured.publish_json)
    fleet = Fleet(tmp_path, NOWHERE, "ex")
    await fleet._start_failed(AGENT, RuntimeError("RESOURCE_LOCKED"))
    ((key, event, _),) = captured.sent
    assert key == status_key(AGENT, "start_failed")
    assert_bloodbank_envelope(event, key)
    assert source_type(event) == "heartbeat"


@pytest.mark.parametrize("kind", ALERT_KINDS)
async def test_monitor_alerts(kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    captured = Captured()
    monkeypatch.setattr("heartbeat_consumer.monitor.monitor.publish_json", captured.publish_json)
    monitor = Monitor(state_path=tmp_path / "m.json", rabbit_url=NOWHERE, exchange_name="ex")
    alert = Alert(
        agent=AGENT,
        kind=kind,
        check="c" if kind in ("timeout", "missed") else None,
        severity="info" if kind == "resolved" else "error",
        detail="d",
        incident=f"{AGENT}:{kind}:*",
        opened_at=SLOT,
        sent_at=SLOT + 1,
    )
    await monitor._publish(alert)
    ((key, event, _),) = captured.sent
    assert key == alert_key(AGENT, kind)
    assert_bloodbank_envelope(event, key)
    assert source_type(event) == "service"


def test_ticks_from_the_ticker() -> None:
    event = tick_envelope("bloodbank.events.v1", SLOT, 60_000)
    model = assert_bloodbank_envelope(event, TICK_KEY)
    assert model.source.type is TriggerType.SCHEDULED, "as Bloodbank's tick publisher"
    assert "agent" not in event["payload"], "a tick is for every agent"


@pytest.mark.parametrize("made_by", ["local", "run-once", "startup"])
def test_the_tick_made_up_without_a_broker(made_by: str) -> None:
    """Handlers get it as payload.envelope, and a start-up run's events are correlated
    with its id."""
    event = local_envelope(SLOT, source_type=made_by)
    assert_bloodbank_envelope(event, TICK_KEY)
    assert source_type(event) == "heartbeat"
    assert local_envelope(SLOT)["event_id"] == local_envelope(SLOT)["event_id"], "per slot"


# --- all of them off a real broker ------------------------------------------------------------


async def test_every_event_of_a_consumer_run_driven_by_the_cli_and_the_ticker(
    bus: Bus, tmp_path: Path
) -> None:
    """A consumer run (online, start-up run, idle ticks, a forced run, an unknown check,
    pause and resume, a broken config, offline), the CLI's commands and ticks and the
    ticker's ticks, as they travel: every one a Bloodbank envelope."""
    agent = bus.agent()
    config = write(tmp_path, agent, {"c": {"cadenceMs": 3_600_000, "handler": "default"}})
    events = await bus.collector(f"heartbeat.{agent}.#")
    sent = await bus.collector(f"agent.{agent}.#")
    ticks = await bus.collector(TICK_KEY)
    opts = ["--rabbit-url", bus.url, "--exchange", bus.exchange_name]
    kw: dict[str, Any] = {"state_path": tmp_path / "s.json", "tick_interval_ms": 1000}
    async with running(bus, agent, config, alive_every_ms=1, **kw):
        early = await until_key(events, result_key(agent, "c", "success"))  # start-up run
        code, out = await cli("tick", "--agent", agent, *opts)
        assert code == 0, out
        code, out = await cli("run-check", agent, "c", "--force", *opts)
        assert code == 0, out
        assert "done: c: success" in out, out
        code, out = await cli("run-check", agent, "nosuch", *opts)
        assert code == 1, out
        assert "rejected" in out, out
        for command in ("pause", "resume"):
            answer = await send_and_wait(
                agent_key(agent, command),
                f"heartbeat.command.{command}",
                {"check": "c"},
                agent=agent,
                wait_s=10,
                rabbit_url=bus.url,
                exchange_name=bus.exchange_name,
            )
            assert answer.outcome == "accepted", answer
        await publish_event(  # the one-off publish of the ticker module
            agent_key(agent, "resume"),
            "heartbeat.command.resume",
            {"check": "*"},
            rabbit_url=bus.url,
            exchange_name=bus.exchange_name,
        )
        code, out = await cli("ticker", "--max-ticks", "2", "--every", "1s", *opts)
        assert code == 0, out
        code, out = await cli("tick", *opts)  # to every agent
        assert code == 0, out
        config.write_text("{not json")
        code, out = await cli("ticker", "--max-ticks", "2", "--every", "1s", *opts)
        assert code == 0, out
    heard = [*early, *await until_key(events, status_key(agent, "offline"))]
    commands = await drain_all(sent)
    ticked = await drain_all(ticks)

    for message in [*heard, *commands, *ticked]:
        assert_bloodbank_envelope(message.body, message.routing_key or "")
    assert {source_type(orjson.loads(m.body)) for m in heard} == {"heartbeat"}
    assert {source_type(orjson.loads(m.body)) for m in commands} == {"manual"}
    assert {source_type(orjson.loads(m.body)) for m in ticked} == {"scheduled", "manual"}
    by_key = {m.routing_key for m in [*heard, *commands, *ticked]}
    expected = {
        *(status_key(agent, s) for s in ("online", "alive", "config_invalid", "offline")),
        result_key(agent, "c", "started"),
        result_key(agent, "c", "success"),
        reply_key(agent, "ack"),
        reply_key(agent, "error"),
        *(agent_key(agent, c) for c in ("tick", "run", "pause", "resume")),
        TICK_KEY,
    }
    assert expected <= by_key, expected - by_key
    from heartbeat_consumer.core.envelope import correlation_uuid  # new: here, not at the top

    for message in heard:  # correlated: the raw id as the AMQP property, its UUID in the body
        ids = orjson.loads(message.body)["correlation_ids"]
        if ids:
            assert ids[0] == correlation_uuid(message.correlation_id or ""), message.routing_key


async def until_key(queue: Any, key: str, within: float = 10.0) -> list[Any]:
    """Everything in ``queue`` up to and including the first message under ``key``."""
    found: list[Any] = []
    deadline = asyncio.get_running_loop().time() + within
    while not found or found[-1].routing_key != key:
        message = await queue.get(no_ack=True, fail=False)
        if message is None:
            assert asyncio.get_running_loop().time() < deadline, f"no {key}"
            await asyncio.sleep(0.02)
        else:
            found.append(message)
    return found


async def test_a_tick_whose_id_is_no_uuid_is_still_answered_and_correlated(
    bus: Bus, tmp_path: Path
) -> None:
    """A tick from elsewhere with the id ``t-...``: its runs carry that id as the AMQP
    correlation_id and its uuid5 in correlation_ids; the CLI's matching finds them."""
    agent = bus.agent()
    config = write(tmp_path, agent, {"c": {"cadenceMs": 1, "handler": "default"}})
    results = await bus.collector(f"heartbeat.{agent}.c.*")
    async with running(bus, agent, config, tick_interval_ms=1000):
        await take(results, 1)
        await asyncio.sleep(1.1)  # a later 1 s slot
        event = tick()
        await bus.publish(f"agent.{agent}.heartbeat.tick", event)
        (result,) = await take(results, 1)
    body = orjson.loads(result.body)
    assert_bloodbank_envelope(body, result.routing_key or "")
    from heartbeat_consumer.core.envelope import correlation_uuid

    assert result.correlation_id == event["event_id"]
    assert body["correlation_ids"] == [correlation_uuid(event["event_id"])]
    assert _correlated(result, event["event_id"], agent) is not None
    relayed: Any = SimpleNamespace(
        routing_key=result.routing_key, body=result.body, correlation_id=None
    )
    assert _correlated(relayed, event["event_id"], agent) is not None, "by correlation_ids"
    assert await drain(results) == []


# --- what we read: the old words and the new keys ---------------------------------------------


def test_readers_take_the_routing_key_and_the_old_words_alike() -> None:
    from heartbeat_consumer.core.envelope import event_kind, event_type_fits

    key = result_key("a", "c", "success")
    for event_type in (key, "heartbeat.result"):
        event: dict[str, Any] = {"event_type": event_type, "payload": {"agent": "a", "check": "c"}}
        assert event_source(key, event) == ("a", None), event_type
        assert event_kind(event_type) == "result"
        assert event_type_fits(event_type, key)
        folded = observe(
            WatchState(), {**event, "payload": {**event["payload"], "status": "success"}}, SLOT
        )
        assert folded.agents["a"].checks["c"].last_status == "success"
    for wrong in (
        "heartbeat.status",
        result_key("a", "c", "failed"),
        result_key("b", "c", "success"),
    ):
        assert event_source(key, {"event_type": wrong, "payload": {}}) == (None, "kind_mismatch")
    kinds = {
        status_key("a", "alive"): "status",
        "heartbeat.status": "status",
        result_key("a", "c", "started"): "started",
        "heartbeat.started": "started",
        reply_key("a", "ack"): "reply",
        "heartbeat.reply": "reply",
        alert_key("a", "stale"): "alert",
        "heartbeat.alert": "alert",
        TICK_KEY: "tick",
        agent_key("a", "tick"): "tick",
        agent_key("a", "run"): "command",
        "heartbeat.command.run": "command",
        "heartbeat.a._command.other": None,
        "heartbeat.a._other.x": None,
        "other": None,
    }
    assert {t: event_kind(t) for t in kinds} == kinds
    dispatch = result_key("a", "c", "dispatch")  # a handler's event: not a result
    assert event_kind(dispatch) is None
    # the monitor acks and ignores it: not an agent's word, nothing dropped
    assert event_source(dispatch, {"event_type": dispatch, "payload": {}}) == (None, None)
    odd = {"event_type": "heartbeat.result", "payload": {}}
    assert event_source("heartbeat.a.c.odd", odd) == ("a", None), "the old word, read as before"
    reply = {"agent": "a", "command_id": "id", "outcome": "done", "reason": "ok"}
    for event_type in (reply_key("a", "ack"), "heartbeat.reply"):
        body = {"event_type": event_type, "correlation_ids": [], "payload": reply}
        message: Any = SimpleNamespace(
            routing_key=reply_key("a", "ack"), body=orjson.dumps(body), correlation_id="id"
        )
        assert _correlated(message, "id", "a") is not None, event_type
