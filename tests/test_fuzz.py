"""Fuzzed envelopes and configs: every input gets a clean result, a rejection or a
validation error, and no exception escapes (hypothesis; the last test on a real broker)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from heartbeat_consumer.bus.connection import REASON_HEADER
from heartbeat_consumer.core.config import ConfigError, parse_config
from heartbeat_consumer.core.envelope import (
    EnvelopeError,
    parse_command,
    parse_envelope,
    parse_tick,
)
from heartbeat_consumer.core.schedule import Plan, plan
from heartbeat_consumer.core.state import AgentState
from heartbeat_consumer.core.timeutil import MAX_INSTANT_MS, iso
from heartbeat_consumer.monitor.monitor import status_document
from heartbeat_consumer.monitor.rules import (
    WatchConfig,
    WatchState,
    evaluate,
    event_source,
    observe_agent,
)
from heartbeat_consumer.runtime.engine import AgentRunner
from heartbeat_consumer.runtime.store import StateStore

from .broker import Bus, running, take
from .helpers import now_ms, slot_tick, write

NOW = 1_795_000_000_000

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=30),
    st.sampled_from(["", "*", "2026-03-29T02:30:00", "2026-11-23T10:00:00Z", "1e309", "nan"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=12,
)
times = st.one_of(
    values,
    st.integers(min_value=0, max_value=2**63),
    st.datetimes().map(lambda d: d.isoformat()),
)
payloads = st.one_of(
    values,
    st.fixed_dictionaries(
        {},
        optional={
            "epoch_ms": times,
            "check": st.one_of(st.sampled_from(["c", "*", ""]), values),
            "force": values,
            "until": times,
            "reason": values,
        },
    ),
)
envelopes = st.fixed_dictionaries(
    {},
    optional={
        "event_id": st.one_of(st.text(min_size=1, max_size=20), values),
        "event_type": st.one_of(st.just("system.heartbeat.tick"), values),
        "timestamp": times,
        "payload": payloads,
        "correlation_ids": values,
    },
)
bodies = st.one_of(
    st.binary(max_size=300),
    values.map(lambda v: json.dumps(v).encode()),
    envelopes.map(lambda v: json.dumps(v).encode()),
)


content_types = st.sampled_from(
    [None, "application/json", "text/plain", "application/json; charset=utf-16", "x; charset=?"]
)


@settings(max_examples=400)
@given(bodies, st.sampled_from(["run", "pause", "resume"]), content_types)
def test_any_body_is_a_tick_or_command_or_an_envelope_error(
    body: bytes, command: str, content_type: str | None
) -> None:
    """... and what parses can be used: its times convert (no OverflowError later)."""
    try:
        tick = parse_tick(body, interval_ms=60_000, content_type=content_type)
        iso(tick.slot_ms)
    except EnvelopeError as exc:
        assert str(exc)
        assert exc.kind
    try:
        parsed = parse_command(body, command, content_type)
        if parsed.until_ms is not None:
            iso(parsed.until_ms)
        assert isinstance(parsed.force, bool)
    except EnvelopeError as exc:
        assert str(exc)
        assert exc.kind


any_times = st.one_of(
    times,
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False),
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
)


@settings(max_examples=400)
@given(any_times, st.sampled_from(["epoch_ms", "timestamp", "until"]))
def test_any_time_in_a_tick_or_a_pause_is_usable_or_an_envelope_error(
    value: Any, where: str
) -> None:
    envelope = {"event_id": "e", "event_type": "t", "payload": {"check": "c"}}
    if where == "timestamp":
        envelope["timestamp"] = value
    else:
        envelope["payload"] = {"check": "c", where: value}
    body = json.dumps(envelope).encode()  # any int, as a neighbour's JSON library may write it
    with contextlib.suppress(EnvelopeError):
        iso(parse_tick(body, interval_ms=60_000).slot_ms)
    with contextlib.suppress(EnvelopeError):
        until = parse_command(body, "pause").until_ms
        if until is not None:
            iso(until)


config_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)
checks = st.dictionaries(
    st.sampled_from(["c", "d", "", "a b", "x" * 70]),
    st.one_of(
        config_values,
        st.fixed_dictionaries(
            {"cadenceMs": st.one_of(st.integers(-5, 10**13), config_values)},
            optional={
                "handler": st.one_of(st.sampled_from(["default", "command", "nope"]), values),
                "priority": config_values,
                "timeoutMs": config_values,
                "window": st.one_of(
                    config_values,
                    st.fixed_dictionaries(
                        {
                            "start": st.sampled_from(["08:00", "25:00", "02:30", "x"]),
                            "end": st.sampled_from(["20:00", "00:00", "08:00"]),
                            "tz": st.sampled_from(["Europe/Berlin", "Mars/Base", "", "UTC"]),
                        }
                    ),
                ),
                "triggerOnQuarters": config_values,
                "lastRun": times,
                "meta": config_values,
            },
        ),
    ),
    max_size=3,
)
configs = st.one_of(
    st.binary(max_size=200),
    config_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {},
        optional={
            "agent": st.one_of(st.just("bot"), config_values),
            "checks": st.one_of(checks, config_values),
            "maxChecksPerTick": config_values,
            "paused": config_values,
        },
    ).map(lambda v: json.dumps(v).encode()),
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(configs)
def test_any_config_is_loaded_or_a_validation_error(text: bytes) -> None:
    try:
        loaded = parse_config(text)
    except ConfigError as exc:
        assert exc.problems
        assert all(p.path.startswith("$") for p in exc.problems)
        return
    assert set(loaded.invalid_checks) <= set(loaded.config.checks) | set(loaded.invalid_checks)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs)
def test_the_engine_ticks_on_any_config_without_raising(text: bytes) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "bot.heartbeat.json")
        path.write_bytes(text)
        runner = AgentRunner(path, clock=lambda: NOW)
        report = asyncio.run(runner.tick(NOW))
        assert (report.config_error is None) == (report.plan is not None)
        for result in report.results:
            assert result.status in ("success", "failed", "timeout", "alert", "skipped")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs)
def test_any_loaded_config_plans_and_explains_at_any_time(text: bytes) -> None:
    try:
        loaded = parse_config(text)
    except ConfigError:
        return
    for now in (0, NOW, MAX_INSTANT_MS):
        result = plan(loaded.config, AgentState(), now, invalid_checks=loaded.invalid_checks)
        rendered(result)


def rendered(result: Plan) -> None:
    """Everything ``plan`` shows of a plan: the reasons, the times."""
    for evaluation in result.evaluations:
        assert all(text for _, text in evaluation.blockers)
        for instant in (evaluation.last_run, evaluation.next_due):
            if instant is not None:
                iso(instant)


instants = st.one_of(
    st.none(),
    st.integers(min_value=-(2**62), max_value=2**62),
    st.sampled_from([1e17, -1.0, float(NOW), NOW, 0, MAX_INSTANT_MS + 1]),
)
state_files = st.fixed_dictionaries(
    {},
    optional={
        "checks": st.dictionaries(
            st.sampled_from(["c", "d"]),
            st.fixed_dictionaries(
                {},
                optional={
                    "lastRun": instants,
                    "lastSuccess": instants,
                    "nextRetry": instants,
                    "consecutiveFailures": st.integers(0, 100),
                    "recentAlerts": st.dictionaries(st.text(max_size=3), instants.filter(bool)),
                },
            ),
        ),
        "pauses": st.dictionaries(
            st.sampled_from(["c", "*"]),
            st.fixed_dictionaries({}, optional={"until": instants, "reason": st.text(max_size=3)}),
        ),
        "history": st.lists(
            st.fixed_dictionaries(
                {
                    "check": st.just("c"),
                    "slot": instants.filter(lambda v: v is not None),
                    "status": st.just("success"),
                    "durationMs": st.integers(0, 10),
                }
            ),
            max_size=3,
        ),
    },
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(state_files)
def test_any_state_file_loads_repaired_or_set_aside_and_plans(data: dict[str, Any]) -> None:
    import tempfile

    config = parse_config(
        json.dumps(
            {
                "agent": "bot",
                "checks": {
                    "c": {"cadenceMs": 60_000, "handler": "default"},
                    "d": {"cadenceMs": 60_000, "handler": "default"},
                },
            }
        )
    ).config
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "s.json")
        path.write_bytes(orjson.dumps(data))
        state, _ = StateStore(path).load(NOW)
    rendered(plan(config, state, NOW))


monitor_keys = st.sampled_from(
    [
        "heartbeat.a.c.success",
        "heartbeat.a.c.started",
        "heartbeat.a._status.alive",
        "heartbeat.b.c.failed",
        "heartbeat.a.b.c.d",
        "heartbeat.a._alert.stale",
        "other",
    ]
)


extremes = [10**17, -(10**17), 2**62, MAX_INSTANT_MS + 1, -1, 1e17, 10**30]
monitor_numbers = st.one_of(
    st.sampled_from([*extremes, 0, 1, 60_000, NOW, "2026-11-23T10:00:00Z", "x", None]),
    st.integers(min_value=-(2**63), max_value=2**63),
    st.floats(allow_nan=False, allow_infinity=False),
)
monitor_events = st.fixed_dictionaries(
    {
        "event_id": st.just("e"),
        "event_type": st.sampled_from(
            ["heartbeat.result", "heartbeat.started", "heartbeat.status"]
        ),
        "timestamp": monitor_numbers,
        "payload": st.fixed_dictionaries(
            {
                "agent": st.sampled_from(["a", "b"]),
                "check": st.sampled_from(["c", "d"]),
                "status": st.sampled_from(["success", "failed", "alive", "offline"]),
                "slot": monitor_numbers,
                "cadence_ms": monitor_numbers,
                "timeout_ms": monitor_numbers,
                "duration_ms": monitor_numbers,
            },
            optional={"idempotency_key": st.text(max_size=5)},
        ),
    }
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(monitor_keys, st.one_of(envelopes, monitor_events)), max_size=6))
def test_any_events_keep_the_monitor_s_status_document_renderable(
    events: list[tuple[str, dict[str, Any]]],
) -> None:
    agents: dict[str, Any] = {}
    for key, data in events:
        try:
            event = parse_envelope(json.dumps(data).encode())
        except EnvelopeError:
            continue
        agent, _ = event_source(key, event)
        if agent is not None:
            folded = observe_agent(agents, event, NOW, agent)
            if folded is not None:
                agents[folded[0]] = folded[1]
    state = WatchState(agents=agents)
    for now in (NOW, NOW + 10**10):
        state, _ = evaluate(state, WatchConfig(), now)
        orjson.dumps(status_document(state, WatchConfig(), now, running=True))


def corpus(n: int) -> list[tuple[str, bytes]]:
    """``n`` (routing suffix, body) pairs drawn by hypothesis, to send to a real consumer."""
    drawn: list[tuple[str, bytes]] = []

    @settings(max_examples=n, database=None, derandomize=True)
    @given(st.sampled_from(["system", "tick", "run", "pause", "resume", "other"]), bodies)
    def draw(where: str, body: bytes) -> None:
        drawn.append((where, body))

    draw()
    return drawn


async def test_fuzzed_messages_on_a_real_inbox_are_handled_or_dead_lettered(
    bus: Bus, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    agent = bus.agent()
    config = write(tmp_path, agent, {"c": {"cadenceMs": 1, "handler": "default"}})
    results = await bus.collector(f"heartbeat.{agent}.c.*")
    keys = {
        "system": "system.heartbeat.tick",
        "tick": f"agent.{agent}.heartbeat.tick",
        "other": f"agent.{agent}.heartbeat.other",
        **{c: f"agent.{agent}.heartbeat.{c}" for c in ("run", "pause", "resume")},
    }
    sent = corpus(150)
    async with running(bus, agent, config, tick_interval_ms=1000) as consumer:
        await take(results, 1)
        for where, body in sent:
            await bus.publish(keys[where], body)
        for _ in range(300):
            if await bus.count(f"agent.{agent}.inbox") == 0:
                break
            await asyncio.sleep(0.1)
        assert await bus.count(f"agent.{agent}.inbox") == 0, "a message stuck or looping"
        await bus.publish(keys["resume"], resume_all())  # a fuzzed pause may have hit '*'
        await asyncio.sleep(1.05)
        await bus.publish(keys["system"], slot_tick(now_ms(), "final"))
        await bus.publish(keys["run"], run_now())
        assert (await take(results, 1, within=15))[0].routing_key == f"heartbeat.{agent}.c.success"
        assert (await consumer.health()).ok, "still consuming"
    dlq = await bus.channel.declare_queue(f"agent.{agent}.dlq", durable=True, passive=True)
    reasons = []
    while (message := await dlq.get(no_ack=True, fail=False)) is not None:
        reasons.append(str((message.headers or {}).get(REASON_HEADER)))
    assert reasons, reasons[:5]
    assert all(r and r != "None" for r in reasons), reasons[:5]
    escaped = [r for r in caplog.records if "not processed" in r.getMessage()]
    assert not escaped, escaped[0].getMessage()


def resume_all() -> dict[str, Any]:
    return {"event_id": "resume", "event_type": "resume", "timestamp": 0, "payload": {}}


def run_now() -> dict[str, Any]:
    payload = {"check": "c", "force": True}
    return {"event_id": "run", "event_type": "run", "timestamp": 0, "payload": payload}


async def test_a_tick_far_ahead_of_the_clock_is_dead_lettered_and_holds_nothing_back(
    bus: Bus, tmp_path: Path
) -> None:
    agent = bus.agent()
    config = write(tmp_path, agent, {"c": {"cadenceMs": 1, "handler": "default"}})
    results = await bus.collector(f"heartbeat.{agent}.c.success")
    async with running(bus, agent, config, tick_interval_ms=1000):
        await take(results, 1)
        await bus.publish("system.heartbeat.tick", slot_tick(now_ms() + 3_600_000, "ahead"))
        await asyncio.sleep(1.05)
        await bus.publish("system.heartbeat.tick", slot_tick(now_ms(), "now"))
        assert len(await take(results, 1)) == 1, "the next real tick still runs"
    dlq = await bus.channel.declare_queue(f"agent.{agent}.dlq", durable=True, passive=True)
    message = await dlq.get(no_ack=True, fail=False)
    assert message is not None
    reason = str((message.headers or {})[REASON_HEADER])
    assert "ahead of this host's clock" in reason, reason
