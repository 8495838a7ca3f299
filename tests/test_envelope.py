from __future__ import annotations

import orjson
import pytest

from heartbeat_consumer.core.envelope import (
    EnvelopeError,
    correlation_uuid,
    decode_body,
    envelope,
    parse_command,
    parse_tick,
    tick_event_id,
)
from heartbeat_consumer.core.topology import (
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
                "payload": {"check": "*", "until": "2026-01-01T00:00:00Z", "reason": "ops"},
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
    assert env["timestamp"] == "1970-01-01T00:00:00.000Z"
    assert env["correlation_ids"] == [correlation_uuid("t1")], "a UUID for an id that is not one"


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


def command_body(payload: dict[str, object]) -> bytes:
    return body({"event_id": "c", "event_type": "command", "timestamp": 0, "payload": payload})


@pytest.mark.parametrize("force", ["false", "true", 1, 0, [], {}])
def test_force_must_be_a_boolean(force: object) -> None:
    with pytest.raises(EnvelopeError, match=r"payload\.force must be true or false"):
        parse_command(command_body({"check": "c", "force": force}), "run")
    assert parse_command(command_body({"check": "c", "force": None}), "run").force is False
    assert parse_command(command_body({"check": "c", "force": True}), "run").force is True


@pytest.mark.parametrize(
    "until", [1e17, -1, "100000000000000000000", "10000-01-01T00:00:00Z", "1e17", float("1e308")]
)
def test_times_out_of_range_are_envelope_errors(until: object) -> None:
    with pytest.raises(EnvelopeError, match=r"range|not a time"):
        parse_command(command_body({"check": "c", "until": until}), "pause")
    tick = {"event_id": "t", "event_type": "tick", "payload": {"epoch_ms": until}}
    with pytest.raises(EnvelopeError, match=r"range|not a time"):
        parse_tick(body(tick), interval_ms=60_000)


def test_names_reasons_and_ids_are_bounded() -> None:
    with pytest.raises(EnvelopeError, match="is not a check name"):
        parse_command(command_body({"check": "a.b"}), "pause")
    long = parse_command(command_body({"check": "c", "reason": "r" * 10_000}), "pause")
    assert long.reason is not None
    assert len(long.reason) == 500
    assert long.reason.endswith("…")
    with pytest.raises(EnvelopeError, match=r"payload\.reason must be a string"):
        parse_command(command_body({"check": "c", "reason": 5}), "pause")
    for event_id in ("x" * 201, "é" * 101):  # a correlation id is at most 255 bytes
        with pytest.raises(EnvelopeError, match="at most 200 bytes"):
            parse_tick(
                body({"event_id": event_id, "event_type": "t", "timestamp": 0}), interval_ms=1
            )
    with pytest.raises(EnvelopeError, match=r"needs payload\.check"):
        parse_command(command_body({}), "pause")  # stopping the whole agent must be said
    assert parse_command(command_body({}), "resume").check == "*"


def test_the_content_type_charset_is_honoured_and_otherwise_only_a_hint() -> None:
    tick = {"event_id": "t", "event_type": "tick", "timestamp": 1_795_000_000_000}
    utf16 = orjson.dumps(tick).decode().encode("utf-16")
    parsed = parse_tick(utf16, interval_ms=60_000, content_type="application/json; charset=utf-16")
    assert parsed.event_id == "t"
    for content_type in ("text/plain", "application/json; charset=nope", None):
        assert parse_tick(orjson.dumps(tick), interval_ms=60_000, content_type=content_type)
    with pytest.raises(EnvelopeError, match="malformed JSON"):
        parse_tick(b"\xff\xfe", interval_ms=60_000, content_type="text/plain; charset=utf-8")


def test_charset_hints_outside_the_linear_text_codecs_are_ignored() -> None:
    """punycode decodes in worse than linear time (a 1 MB body: a minute on the event
    loop); zlib or base64 are no text at all. Such hints are ignored."""
    tick = {"event_id": "t", "event_type": "tick", "timestamp": 1_795_000_000_000}
    for charset in ("punycode", "zlib", "base64", "rot13", "idna", "x" * 100):
        content_type = f"application/json; charset={charset}"
        assert decode_body(b"a" * 1_000_000, content_type) == b"a" * 1_000_000
        assert parse_tick(orjson.dumps(tick), interval_ms=60_000, content_type=content_type)
    latin = orjson.dumps({**tick, "event_id": "é"}).decode().encode("latin-1")
    parsed = parse_tick(latin, interval_ms=60_000, content_type="text/plain; charset=latin-1")
    assert parsed.event_id == "é"


@pytest.mark.parametrize(
    ("at", "quarter", "day", "hour", "minute"),
    [
        ("2026-03-31T23:59:00Z", "Q1", "Tuesday", 23, 59),
        ("2026-04-01T00:00:00Z", "Q2", "Wednesday", 0, 0),
        ("2026-12-31T18:30:00Z", "Q4", "Thursday", 18, 30),
    ],
)
def test_ticker_payload_has_the_fields_bloodbank_consumers_read(
    at: str, quarter: str, day: str, hour: int, minute: int
) -> None:
    """Bloodbank's publisher sends tick, timestamp, epoch_ms, quarter (of the year),
    day_of_week, hour and minute, all UTC; consumers of that ecosystem schedule by them."""
    from heartbeat_consumer.bus.ticker import tick_envelope
    from heartbeat_consumer.core.timeutil import parse_instant_ms

    slot = parse_instant_ms(at)
    payload = tick_envelope("x", slot, 60_000)["payload"]
    assert payload["tick"] == slot // 60_000
    assert payload["epoch_ms"] == slot
    assert payload["timestamp"].startswith(at[:16])
    assert (payload["quarter"], payload["day_of_week"]) == (quarter, day)
    assert (payload["hour"], payload["minute"]) == (hour, minute)
    assert tick_envelope("x", slot, 60_000) == tick_envelope("x", slot, 60_000), "deterministic"
