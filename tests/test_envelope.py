from __future__ import annotations

import orjson
import pytest

from heartbeat_consumer.envelope import (
    EnvelopeError,
    envelope,
    parse_command,
    parse_tick,
    tick_event_id,
)
from heartbeat_consumer.topology import (
    agent_key,
    dead_letter_queue,
    inbox_bindings,
    inbox_queue,
    mask_url,
    result_key,
    status_key,
)

MIN = 60_000


def body(data: object) -> bytes:
    return orjson.dumps(data)


def test_manual_tick_snippet_from_the_design_is_accepted() -> None:
    tick = parse_tick(
        body(
            {
                "event_id": "3f1c",
                "event_type": "system.heartbeat.tick",
                "timestamp": "2026-11-23T12:15:42.123456+00:00",
                "version": "1.0.0",
                "source": {"host": "local", "type": "manual", "app": "test"},
                "payload": {"tick_id": "ab12cd34"},
            }
        ),
        interval_ms=MIN,
    )
    assert tick.event_id == "3f1c"
    assert tick.slot_ms % MIN == 0
    assert tick.envelope["payload"] == {"tick_id": "ab12cd34"}


def test_bloodbank_payload_epoch_ms_wins_and_extra_fields_pass() -> None:
    tick = parse_tick(
        body(
            {
                "event_id": "e",
                "event_type": "system.heartbeat.tick",
                "timestamp": "2000-01-01T00:00:00Z",
                "payload": {"tick": 7, "epoch_ms": 1_795_000_020_000, "quarter": "Q3", "x": 1},
                "unexpected": True,
            }
        ),
        interval_ms=MIN,
    )
    assert tick.slot_ms == 1_795_000_020_000 - 1_795_000_020_000 % MIN


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"not json", "malformed JSON"),
        (b"[1]", "must be a JSON object, not list"),
        (body({"event_type": "t", "timestamp": "2026-01-01T00:00:00Z"}), "'event_id'"),
        (body({"event_id": "e", "event_type": 5}), "'event_type'"),
        (body({"event_id": "e", "event_type": "t", "payload": []}), "'payload' must be an object"),
        (body({"event_id": "e", "event_type": "t"}), "needs a 'timestamp'"),
        (
            body({"event_id": "e", "event_type": "t", "timestamp": "yesterday"}),
            "timestamp: not a time",
        ),
        (body({"event_id": "e", "event_type": "t", "timestamp": True}), "timestamp must be"),
        (
            body({"event_id": "e", "event_type": "t", "correlation_ids": "x", "timestamp": 1}),
            "list",
        ),
        (b"{" + b" " * 1_000_001 + b"}", "over the 1000000 limit"),
    ],
)
def test_bad_ticks_have_a_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(EnvelopeError) as info:
        parse_tick(raw, interval_ms=MIN)
    assert reason in str(info.value)


def test_commands() -> None:
    run = parse_command(
        body({"event_id": "e", "event_type": "t", "payload": {"check": "c", "force": True}}), "run"
    )
    assert (run.check, run.force) == ("c", True)
    pause = parse_command(
        body(
            {
                "event_id": "e",
                "event_type": "t",
                "payload": {"until": "2026-01-01T00:00:00Z", "reason": "ops"},
            }
        ),
        "pause",
    )
    assert (pause.check, pause.until_ms, pause.reason) == ("*", 1767225600000, "ops")
    with pytest.raises(EnvelopeError, match=r"needs payload\.check"):
        parse_command(body({"event_id": "e", "event_type": "t", "payload": {}}), "run")
    with pytest.raises(EnvelopeError, match="not '\\*'"):
        parse_command(body({"event_id": "e", "event_type": "t", "payload": {"check": "*"}}), "run")


def test_tick_event_id_is_deterministic_per_exchange_and_slot() -> None:
    assert tick_event_id("x", 60_000) == tick_event_id("x", 60_000)
    assert tick_event_id("x", 60_000) != tick_event_id("x", 120_000)
    assert tick_event_id("x", 60_000) != tick_event_id("y", 60_000)


def test_envelope_shape() -> None:
    env = envelope("heartbeat.result", {"a": 1}, timestamp_ms=0, correlation_ids=["t1"])
    assert set(env) == {
        "event_id",
        "event_type",
        "timestamp",
        "version",
        "source",
        "correlation_ids",
        "payload",
    }
    assert env["timestamp"] == "1970-01-01T00:00:00.000Z" and env["correlation_ids"] == ["t1"]


def test_routing_names() -> None:
    assert inbox_queue("cack") == "agent.cack.inbox"
    assert inbox_bindings("cack") == ("agent.cack.#", "system.heartbeat.#")
    assert agent_key("cack", "tick") == "agent.cack.heartbeat.tick"
    assert dead_letter_queue("cack") == "agent.cack.dlq"
    assert result_key("cack", "sub_health", "success") == "heartbeat.cack.sub_health.success"
    assert status_key("cack", "online") == "heartbeat.cack._status.online"


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("amqp://guest:guest@localhost:5672/", "amqp://guest:***@localhost:5672/"),
        ("amqps://u:p%40ss@broker.example:5671/vh", "amqps://u:***@broker.example:5671/vh"),
        ("amqp://localhost/", "amqp://localhost/"),
    ],
)
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked
