"""Property tests of the scheduling rules over random configs, states and times.

Expected values are computed independently (datetime and zoneinfo directly), not by
calling the functions under test.
"""

from __future__ import annotations

import itertools
import math
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from heartbeat_consumer.config import HeartbeatConfig, Window, parse_config
from heartbeat_consumer.schedule import evaluate, in_window, overdue_ratio, plan, quarter_at
from heartbeat_consumer.simulate import simulate
from heartbeat_consumer.state import AgentState, backoff_ms, record_run

MIN = 60_000
HOUR = 60 * MIN
DST_ZONES = ["Europe/Berlin", "America/New_York", "Australia/Lord_Howe"]
ZONES = [*DST_ZONES, "UTC", "Asia/Kolkata", "America/St_Johns", "Pacific/Chatham"]
# 1970 .. 2100
INSTANTS = st.integers(min_value=0, max_value=4_102_444_800_000)
NEAR = st.integers(min_value=1_750_000_000_000, max_value=1_850_000_000_000)

settings.register_profile("heartbeat", deadline=None, max_examples=150)
settings.load_profile("heartbeat")


def ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def hhmm(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"


names = st.from_regex(r"[a-z][a-z0-9_-]{0,8}", fullmatch=True)


@st.composite
def checks(draw: st.DrawFn) -> dict[str, Any]:
    check: dict[str, Any] = {
        "cadenceMs": draw(st.sampled_from([MIN, 5 * MIN, 15 * MIN, HOUR, 6 * HOUR, 24 * HOUR]))
        + draw(st.sampled_from([0, 0, 1, 999])),
        "handler": "default",
        "priority": draw(st.integers(-3, 3)),
        "enabled": draw(st.sampled_from([True, True, True, False])),
    }
    if draw(st.booleans()):
        check["window"] = {
            "start": hhmm(draw(st.integers(0, 1439))),
            "end": draw(st.sampled_from(["24:00"]) | st.integers(0, 1439).map(hhmm)),
            "tz": draw(st.sampled_from(ZONES)),
        }
    if draw(st.booleans()):
        check["triggerOnQuarters"] = sorted(
            draw(st.sets(st.sampled_from(["Q1", "Q2", "Q3", "Q4"]), min_size=1))
        )
        check["quarterOf"] = draw(st.sampled_from(["day", "year"]))
    if draw(st.booleans()):
        check["lastRun"] = draw(st.one_of(st.none(), NEAR))
    return check


@st.composite
def configs(draw: st.DrawFn) -> HeartbeatConfig:
    data = {
        "agent": "prop",
        "tz": draw(st.sampled_from(ZONES)),
        "maxChecksPerTick": draw(st.integers(1, 4)),
        "selection": draw(st.sampled_from(["priority", "overdue"])),
        "checks": draw(st.dictionaries(names, checks(), min_size=1, max_size=6)),
    }
    loaded = parse_config(orjson.dumps(data))
    assert not loaded.problems, loaded.problems
    return loaded.config


def run_success(state: AgentState, config: HeartbeatConfig, name: str, slot: int) -> AgentState:
    check = config.checks[name]
    return record_run(
        state,
        check=name,
        cadence_ms=check.cadence_ms,
        slot_ms=slot,
        status="success",
        finished_ms=slot,
        duration_ms=0,
        key=f"prop:{name}:{slot}",
        initial_last_run=check.last_run,
    )


@given(
    st.one_of(st.none(), NEAR),
    st.integers(1, 10 * 24 * HOUR),
    NEAR,
    st.integers(0, 10**9),
)
def test_ratio_is_monotone_in_now(last: int | None, cadence: int, now: int, later: int) -> None:
    earlier_ratio = overdue_ratio(now, last, cadence)
    later_ratio = overdue_ratio(now + later, last, cadence)
    assert later_ratio >= earlier_ratio
    assert math.isinf(earlier_ratio) == (last is None)


@given(st.integers(1, 30 * 24 * HOUR), NEAR, st.integers(-(10**10), 10**10))
def test_due_exactly_when_one_cadence_has_passed(cadence: int, last: int, offset: int) -> None:
    config = parse_config(
        orjson.dumps(
            {"agent": "a", "checks": {"c": {"cadenceMs": cadence, "handler": "h", "lastRun": last}}}
        )
    ).config
    now = last + offset
    (ev,) = evaluate(config, AgentState(), now)
    assert ev.due == (now - last >= cadence)
    assert ev.due == (ev.ratio >= 1.0)


@given(configs(), NEAR, st.lists(st.tuples(st.integers(-5, 30), st.booleans()), max_size=40))
def test_never_two_runs_of_one_check_in_one_slot(
    config: HeartbeatConfig, start: int, steps: list[tuple[int, bool]]
) -> None:
    """Ticks may repeat and arrive out of order; runs may fail. Still at most one
    completed run per (check, slot), and a failure is not retried within its backoff."""
    state = AgentState()
    start -= start % MIN
    completed: set[tuple[str, int]] = set()
    for minute, fail in steps:
        slot = start + minute * MIN
        for ev in plan(config, state, slot).selected:
            check = config.checks[ev.check]
            assert (ev.check, slot) not in completed, "ran twice in one slot"
            before = state.check(ev.check, check.last_run)
            assert before.next_retry is None or slot >= before.next_retry
            state = record_run(
                state,
                check=ev.check,
                cadence_ms=check.cadence_ms,
                slot_ms=slot,
                status="failed" if fail else "success",
                finished_ms=slot,
                duration_ms=0,
                key="k",
                initial_last_run=check.last_run,
            )
            after = state.check(ev.check)
            if fail:
                assert after.last_run == before.last_run
                assert after.next_retry == slot + backoff_ms(
                    after.consecutive_failures, check.cadence_ms
                )
            else:
                completed.add((ev.check, slot))
                assert after.last_run == slot


@given(configs(), NEAR)
def test_selection_is_bounded_due_and_ordered(config: HeartbeatConfig, now: int) -> None:
    result = plan(config, AgentState(), now)
    due = [e for e in result.evaluations if e.due]
    assert len(result.selected) == min(len(due), config.max_checks_per_tick)
    assert all(e.due for e in result.selected)

    def key(e: Any) -> tuple[Any, ...]:
        if config.selection == "overdue":
            return (-e.ratio, e.priority, e.check)
        return (e.priority, -e.ratio, e.check)

    best = sorted(due, key=key)[: config.max_checks_per_tick]
    assert [e.check for e in result.selected] == [e.check for e in best]
    chosen = {e.check for e in result.selected}
    for waiting in (e for e in due if e.check not in chosen):
        assert all(key(s) <= key(waiting) for s in result.selected)


@given(st.integers(1, 40), st.integers(1, 48 * HOUR))
def test_backoff_doubles_from_a_minute_and_is_capped(failures: int, cadence: int) -> None:
    expected = MIN
    for _ in range(failures - 1):
        expected *= 2
    assert backoff_ms(failures, cadence) == min(expected, cadence)


@given(configs(), INSTANTS)
def test_evaluate_never_raises(config: HeartbeatConfig, now: int) -> None:
    for ev in evaluate(config, AgentState(), now):
        assert ev.reason  # every explanation renders


@given(st.integers(0, 1439), st.integers(0, 1440), st.sampled_from(ZONES), NEAR)
def test_window_matches_the_local_wall_clock(start: int, end: int, zone: str, now: int) -> None:
    window = Window(start=hhmm(start), end="24:00" if end == 1440 else hhmm(end))
    tz = ZoneInfo(zone)
    local = datetime.fromtimestamp(now / 1000, tz)
    minute = local.hour * 60 + local.minute
    last = min(end, 1439)
    expected = start <= minute <= last if start <= last else (minute >= start or minute <= last)
    if expected:
        assert in_window(now, window, tz)
    else:
        # Only the spring-forward rule may add a minute.
        opened = in_window(now, window, tz)
        wall = datetime.combine(local.date(), datetime.min.time()) + timedelta(minutes=start)
        start_exists = (
            wall.replace(tzinfo=tz).astimezone(UTC).astimezone(tz).replace(tzinfo=None) == wall
        )
        assert not opened or not start_exists


@given(NEAR, st.sampled_from(ZONES))
def test_quarters_follow_local_hours_and_months(now: int, zone: str) -> None:
    local = datetime.fromtimestamp(now / 1000, ZoneInfo(zone))
    day = {0: "Q1", 1: "Q2", 2: "Q3", 3: "Q4"}[local.hour // 6]
    year = {1: "Q1", 4: "Q2", 7: "Q3", 10: "Q4"}[(local.month - 1) // 3 * 3 + 1]
    assert quarter_at(now, ZoneInfo(zone), "day") == day
    assert quarter_at(now, ZoneInfo(zone), "year") == year


def transitions(zone: str, year: int) -> list[datetime]:
    """UTC instants (on the minute) where the zone's UTC offset changes."""
    tz = ZoneInfo(zone)
    found = []
    moment = datetime(year, 1, 1, tzinfo=UTC)
    step = timedelta(hours=1)
    while moment.year == year:
        nxt = moment + step
        if moment.astimezone(tz).utcoffset() != nxt.astimezone(tz).utcoffset():
            lo, hi = moment, nxt
            while hi - lo > timedelta(minutes=1):
                mid = lo + (hi - lo) / 2
                mid = mid.replace(second=0, microsecond=0)
                if mid.astimezone(tz).utcoffset() == lo.astimezone(tz).utcoffset():
                    lo = mid
                else:
                    hi = mid
            found.append(hi)
        moment = nxt
    return found


def all_day_config(zone: str, cadence: int = 15 * MIN) -> HeartbeatConfig:
    data = {
        "agent": "a",
        "checks": {
            "c": {
                "cadenceMs": cadence,
                "handler": "h",
                "window": {"start": "00:00", "end": "23:59", "tz": zone},
            }
        },
    }
    return parse_config(orjson.dumps(data)).config


def test_dst_transitions_found_in_each_zone() -> None:
    for zone in DST_ZONES:
        assert len(transitions(zone, 2026)) == 2, zone


def test_fifteen_minute_cadence_runs_four_times_per_real_hour_through_dst() -> None:
    for zone in DST_ZONES:
        config = all_day_config(zone)
        for change in transitions(zone, 2026):
            start = ms(change - timedelta(hours=3))
            end = ms(change + timedelta(hours=3))
            slots = [run.slot for run in simulate(config, start, end, MIN)]
            assert len(slots) == 24, (zone, change)
            assert {b - a for a, b in itertools.pairwise(slots)} == {15 * MIN}
            for hour in range(6):
                lo = start + hour * HOUR
                assert sum(lo <= s < lo + HOUR for s in slots) == 4, (zone, change, hour)


def test_window_starting_in_the_spring_forward_gap_opens_at_first_valid_minute() -> None:
    for zone in DST_ZONES:
        tz = ZoneInfo(zone)
        for change in transitions(zone, 2026):
            before = (change - timedelta(minutes=1)).astimezone(tz)
            after = change.astimezone(tz)
            if after.utcoffset() <= before.utcoffset():  # type: ignore[operator]
                continue  # fall-back: no gap
            gap_minutes = int((after.utcoffset() - before.utcoffset()).total_seconds() // 60)  # type: ignore[operator]
            gap_start = before + timedelta(minutes=1)  # first skipped wall-clock minute
            start = gap_start.hour * 60 + gap_start.minute + min(5, gap_minutes - 1)
            end = start + 2  # the whole window lies inside the gap
            assert end < gap_start.hour * 60 + gap_start.minute + gap_minutes
            data = {
                "agent": "a",
                "checks": {
                    "c": {
                        "cadenceMs": 15 * MIN,
                        "handler": "h",
                        "lastRun": ms(change) - 2 * 24 * HOUR,
                        "window": {"start": hhmm(start), "end": hhmm(end), "tz": zone},
                    }
                },
            }
            config = parse_config(orjson.dumps(data)).config
            day_start = ms(change - timedelta(hours=6))
            runs = list(simulate(config, day_start, day_start + 12 * HOUR, MIN))
            assert [r.slot for r in runs] == [ms(change)], (zone, [r.local for r in runs])
            assert runs[0].local == after.isoformat(timespec="minutes")


def test_repeated_hour_is_inside_a_window_on_both_passes() -> None:
    tz = ZoneInfo("America/New_York")
    window = Window(start="01:00", end="01:30")
    first = datetime(2026, 11, 1, 1, 15, tzinfo=tz, fold=0)
    second = datetime(2026, 11, 1, 1, 15, tzinfo=tz, fold=1)
    assert ms(second) - ms(first) == HOUR
    assert in_window(ms(first), window, tz) and in_window(ms(second), window, tz)
    assert not in_window(ms(datetime(2026, 11, 1, 1, 31, tzinfo=tz, fold=1)), window, tz)


def test_lord_howe_half_hour_shift() -> None:
    tz = ZoneInfo("Australia/Lord_Howe")
    changes = transitions("Australia/Lord_Howe", 2026)
    shifts = {
        abs(c.astimezone(tz).utcoffset() - (c - timedelta(minutes=1)).astimezone(tz).utcoffset())  # type: ignore[operator]
        for c in changes
    }
    assert shifts == {timedelta(minutes=30)}
    spring = next(c for c in changes if c.astimezone(tz).month == 10)
    assert spring.astimezone(tz).strftime("%H:%M") == "02:30"


def test_daily_window_check_runs_once_every_local_day_through_dst() -> None:
    """The documented pattern for "once a day at HH:MM": a window pins the time and a
    cadence under a day (20 h) absorbs 23- and 25-hour days. One run per local day,
    including the spring-forward day (window inside the gap) and the fall-back day
    (window inside the repeated hour)."""
    for zone in DST_ZONES:
        tz = ZoneInfo(zone)
        for change in transitions(zone, 2026):
            for start in range(60, 4 * 60, 30):
                data = {
                    "agent": "a",
                    "checks": {
                        "daily": {
                            "cadenceMs": 20 * HOUR,
                            "handler": "h",
                            "window": {"start": hhmm(start), "end": hhmm(start + 10), "tz": zone},
                        }
                    },
                }
                config = parse_config(orjson.dumps(data)).config
                first_day = (change - timedelta(days=3)).astimezone(tz).date()
                begin = ms(datetime.combine(first_day, datetime.min.time(), tz))
                runs = list(simulate(config, begin, begin + 6 * 24 * HOUR, MIN))
                days = [date.fromisoformat(r.local[:10]) for r in runs]
                expected = [first_day + timedelta(days=i) for i in range(6)]
                assert days == expected, (zone, change, hhmm(start), [r.local for r in runs])
