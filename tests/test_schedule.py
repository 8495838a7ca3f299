"""Examples of the scheduling rules (properties live in test_properties.py)."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest

from heartbeat_consumer.core.config import HeartbeatConfig, Pause, Window, parse_config
from heartbeat_consumer.core.schedule import Blocker, evaluate, in_window, plan, quarter_at, select
from heartbeat_consumer.core.state import AgentState, record_run
from heartbeat_consumer.core.timeutil import to_ms

MIN = 60_000
T0 = 1_795_000_000_000 - 1_795_000_000_000 % (24 * 60 * MIN)  # a UTC midnight


def cfg(checks: dict[str, dict[str, Any]], **top: Any) -> HeartbeatConfig:
    data = {"agent": "a", "checks": checks, **top}
    loaded = parse_config(orjson.dumps(data))
    assert not loaded.problems, loaded.problems
    return loaded.config


def at(text: str, tz: str) -> int:
    return to_ms(datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(tz)))


def blockers(
    config: HeartbeatConfig, now: int, state: AgentState | None = None
) -> dict[str, list[Blocker]]:
    return {
        e.check: [b for b, _ in e.blockers] for e in evaluate(config, state or AgentState(), now)
    }


def test_due_at_exactly_one_cadence_not_after() -> None:
    config = cfg({"c": {"cadenceMs": 15 * MIN, "handler": "h", "lastRun": T0}})
    assert blockers(config, T0 + 15 * MIN - 1)["c"] == [Blocker.NOT_DUE]
    assert blockers(config, T0 + 15 * MIN)["c"] == []


def test_never_run_is_infinitely_overdue() -> None:
    (ev,) = evaluate(cfg({"c": {"cadenceMs": MIN, "handler": "h"}}), AgentState(), T0)
    assert ev.due
    assert math.isinf(ev.ratio)
    assert ev.next_due is None


def test_state_last_run_overrides_config_initial_value() -> None:
    config = cfg({"c": {"cadenceMs": 10 * MIN, "handler": "h", "lastRun": 0}})
    state = record_run(
        AgentState(),
        check="c",
        cadence_ms=10 * MIN,
        slot_ms=T0,
        status="success",
        finished_ms=T0,
        duration_ms=0,
        key="k",
    )
    (ev,) = evaluate(config, state, T0 + 5 * MIN)
    assert ev.ratio == 0.5
    assert not ev.due
    assert ev.next_due == T0 + 10 * MIN
    assert "due in 5m" in ev.reason


def test_every_blocker_is_reported() -> None:
    config = cfg(
        {
            "c": {
                "cadenceMs": MIN,
                "handler": "h",
                "enabled": False,
                "lastRun": T0,
                "window": {"start": "09:00", "end": "10:00", "tz": "UTC"},
                "triggerOnQuarters": ["Q3"],
            }
        },
        paused={"c": {"until": None, "reason": "ops"}},
    )
    found = evaluate(config, AgentState(), T0 + 30 * 1000)[0]
    assert [b for b, _ in found.blockers] == [
        Blocker.DISABLED,
        Blocker.PAUSED,
        Blocker.OUTSIDE_WINDOW,
        Blocker.WRONG_QUARTER,
        Blocker.NOT_DUE,
    ]
    texts = [t for _, t in found.blockers]
    assert texts[1] == "paused until resumed (ops)"
    assert texts[2] == "outside window 09:00-10:00 UTC (local 00:00)"
    assert texts[3] == "wrong quarter: Q1 of the day, runs in Q3"


def test_unknown_handler_blocks_only_that_check() -> None:
    config = cfg(
        {"a1": {"cadenceMs": MIN, "handler": "nope"}, "b1": {"cadenceMs": MIN, "handler": "ok"}}
    )
    result = plan(config, AgentState(), T0, known_handlers={"ok"})
    assert [e.check for e in result.selected] == ["b1"]
    assert result.evaluations[0].reason == "unknown handler 'nope'"


def test_pause_until_expires_and_star_pauses_agent() -> None:
    config = cfg({"c": {"cadenceMs": MIN, "handler": "h"}}, paused={"*": {"until": T0 + MIN}})
    assert blockers(config, T0)["c"] == [Blocker.PAUSED]
    assert blockers(config, T0 + MIN)["c"] == []
    state = AgentState(pauses={"c": Pause(until=None, reason="from a command")})
    assert blockers(config, T0 + MIN, state)["c"] == [Blocker.PAUSED]


def test_selection_by_priority_then_ratio_then_name() -> None:
    config = cfg(
        {
            "low_prio_very_late": {"cadenceMs": MIN, "handler": "h", "priority": 5, "lastRun": 0},
            "b": {"cadenceMs": MIN, "handler": "h", "priority": 1, "lastRun": T0 - 2 * MIN},
            "a": {"cadenceMs": MIN, "handler": "h", "priority": 1, "lastRun": T0 - 2 * MIN},
            "c": {"cadenceMs": MIN, "handler": "h", "priority": 1, "lastRun": T0 - 3 * MIN},
        },
        maxChecksPerTick=3,
    )
    result = plan(config, AgentState(), T0)
    assert [e.check for e in result.selected] == ["c", "a", "b"]
    evs = evaluate(config, AgentState(), T0)
    assert [e.check for e in select(evs, max_checks=2, selection="overdue")] == [
        "low_prio_very_late",
        "c",
    ]


def test_max_checks_per_tick_defaults_to_one() -> None:
    config = cfg({n: {"cadenceMs": MIN, "handler": "h"} for n in ("x", "y", "z")})
    assert [e.check for e in plan(config, AgentState(), T0).selected] == ["x"]


def test_backoff_after_failure_lets_others_run() -> None:
    config = cfg(
        {
            "flaky": {"cadenceMs": 60 * MIN, "handler": "h", "priority": 1},
            "other": {"cadenceMs": 60 * MIN, "handler": "h", "priority": 2},
        }
    )
    state = record_run(
        AgentState(),
        check="flaky",
        cadence_ms=60 * MIN,
        slot_ms=T0,
        status="failed",
        finished_ms=T0,
        duration_ms=1,
        key="k",
    )
    result = plan(config, state, T0)
    assert [e.check for e in result.selected] == ["other"]
    flaky = next(e for e in result.evaluations if e.check == "flaky")
    assert flaky.last_run is None
    assert flaky.blockers[0][0] is Blocker.BACKOFF
    assert [e.check for e in plan(config, state, T0 + MIN).selected] == ["flaky"]


@pytest.mark.parametrize(
    ("start", "end", "inside", "outside"),
    [
        ("09:00", "17:00", ["09:00", "12:00", "17:00"], ["08:59", "17:01", "18:00"]),
        ("00:00", "23:59", ["00:00", "12:00", "23:59"], []),
        ("00:00", "24:00", ["00:00", "23:59"], []),
        ("22:00", "02:00", ["22:00", "23:59", "00:00", "02:00"], ["02:01", "21:59", "12:00"]),
        ("12:00", "12:00", ["12:00"], ["11:59", "12:01"]),
    ],
)
def test_window_boundaries(start: str, end: str, inside: list[str], outside: list[str]) -> None:
    """Start inclusive; the end *minute* inclusive; start > end wraps midnight."""
    window = Window(start=start, end=end)
    utc = ZoneInfo("UTC")
    for hhmm in inside:
        now = at(f"2026-06-01T{hhmm}:30", "UTC")
        assert in_window(now, window, utc), (start, end, hhmm)
    for hhmm in outside:
        now = at(f"2026-06-01T{hhmm}:00", "UTC")
        assert not in_window(now, window, utc), (start, end, hhmm)


def test_window_one_minute_is_only_that_minute() -> None:
    window = Window(start="12:00", end="12:00")
    utc = ZoneInfo("UTC")
    assert in_window(at("2026-06-01T12:00:59", "UTC"), window, utc)
    assert not in_window(at("2026-06-01T12:01:00", "UTC"), window, utc)
    assert not in_window(at("2026-06-01T11:59:59", "UTC"), window, utc)


def test_window_is_evaluated_on_the_checks_local_clock() -> None:
    config = cfg(
        {
            "c": {
                "cadenceMs": 1,
                "handler": "h",
                "window": {"start": "09:00", "end": "17:00", "tz": "America/New_York"},
            }
        }
    )
    # 14:00 UTC is 09:00 in New York in winter (EST, UTC-5) and 10:00 in summer.
    assert blockers(config, at("2026-01-15T14:00", "UTC"))["c"] == []
    assert blockers(config, at("2026-01-15T13:59", "UTC"))["c"] == [Blocker.OUTSIDE_WINDOW]
    assert blockers(config, at("2026-07-15T13:00", "UTC"))["c"] == []


def test_spring_forward_gap_window_opens_at_first_valid_minute() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    window = Window(start="02:30", end="02:45")
    # 2026-03-29: Berlin jumps 02:00 CET -> 03:00 CEST (01:00 UTC).
    assert in_window(to_ms(datetime.fromisoformat("2026-03-29T01:00:00+00:00")), window, berlin)
    assert not in_window(to_ms(datetime.fromisoformat("2026-03-29T01:01:00+00:00")), window, berlin)
    assert not in_window(to_ms(datetime.fromisoformat("2026-03-29T00:59:00+00:00")), window, berlin)
    # On ordinary days the window is its wall-clock range.
    assert in_window(at("2026-03-30T02:30", "Europe/Berlin"), window, berlin)
    assert not in_window(at("2026-03-30T03:00", "Europe/Berlin"), window, berlin)


def test_window_starting_in_gap_and_ending_after_it() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    window = Window(start="02:30", end="04:00")
    for utc in ("2026-03-29T01:00", "2026-03-29T01:30", "2026-03-29T02:00"):
        assert in_window(at(utc, "UTC"), window, berlin), utc
    assert not in_window(at("2026-03-29T02:01", "UTC"), window, berlin)


@pytest.mark.parametrize(
    ("hour", "quarter"),
    [(0, "Q1"), (5, "Q1"), (6, "Q2"), (11, "Q2"), (12, "Q3"), (18, "Q4"), (23, "Q4")],
)
def test_quarter_of_day(hour: int, quarter: str) -> None:
    tz = ZoneInfo("Australia/Lord_Howe")
    assert quarter_at(at(f"2026-06-01T{hour:02d}:59", "Australia/Lord_Howe"), tz) == quarter


def test_quarter_of_year() -> None:
    tz = ZoneInfo("America/New_York")
    # 2026-04-01 02:00 UTC is still March 31 in New York: Q1.
    assert quarter_at(at("2026-04-01T02:00", "UTC"), tz, "year") == "Q1"
    assert quarter_at(at("2026-04-01T05:00", "UTC"), tz, "year") == "Q2"
    assert quarter_at(at("2026-12-31T12:00", "UTC"), tz, "year") == "Q4"


def test_invalid_checks_appear_in_evaluation_but_never_run() -> None:
    loaded = parse_config(
        b'{"agent":"a","checks":{"bad":{"cadenceMs":"1","handler":"h"},"good":{"cadenceMs":1,"handler":"h"}}}'
    )
    result = plan(loaded.config, AgentState(), T0, invalid_checks=loaded.invalid_checks)
    assert [e.check for e in result.evaluations] == ["bad", "good"]
    assert result.evaluations[0].reason.startswith("invalid: $.checks.bad.cadenceMs")
    assert [e.check for e in result.selected] == ["good"]
