"""Property tests (hypothesis) of the scheduling rules: ratio, due, selection, backoff,
windows, quarters and DST behaviour.

Every expectation is computed independently of the code under test: local wall clocks
come from ``datetime.astimezone`` with zoneinfo, DST transitions are found by scanning
offsets, and orderings and backoffs are plain arithmetic on Python ints.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from functools import cache, lru_cache
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from heartbeat_consumer.core.config import HeartbeatConfig, Window, parse_config
from heartbeat_consumer.core.schedule import (
    Blocker,
    evaluate,
    in_window,
    overdue_ratio,
    plan,
    quarter_at,
    select,
)
from heartbeat_consumer.core.simulate import simulate
from heartbeat_consumer.core.state import AgentState, Status, backoff_ms, record_run

SECOND = 1000
MINUTE = 60 * SECOND
HOUR = 60 * MINUTE
DAY = 24 * HOUR
CADENCE_15M = 15 * MINUTE
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

DST_ZONES = ("Europe/Berlin", "America/New_York", "Australia/Lord_Howe")
ZONES = (
    *DST_ZONES,
    "UTC",
    "Asia/Kolkata",
    "Asia/Kathmandu",
    "America/St_Johns",
    "America/Santiago",
    "Pacific/Chatham",
    "Pacific/Apia",
    "Europe/Dublin",
    "Antarctica/Troll",
    "Africa/Casablanca",
)
YEARS_WITH_TRANSITIONS = (1975, 1996, 2011, 2026, 2038, 2099)

# Hypothesis settings per test (explicit, so another module's profile cannot change them).
QUICK = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MEDIUM = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MANY = settings(max_examples=300, deadline=None)


# ---------------------------------------------------------------------------
# Independent time helpers
# ---------------------------------------------------------------------------


def to_ms(moment: datetime) -> int:
    return (moment - EPOCH) // timedelta(milliseconds=1)


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> int:
    return to_ms(datetime(year, month, day, hour, minute, tzinfo=UTC))


def local(zone: str, day: date, hour: int, minute: int, *, fold: int = 0) -> int:
    """Epoch ms of an existing local wall-clock time (fold=1: second pass of a repeat)."""
    moment = datetime(day.year, day.month, day.day, hour, minute, tzinfo=ZoneInfo(zone), fold=fold)
    ms = to_ms(moment)
    back = wall(ms, ZoneInfo(zone)).replace(tzinfo=None)
    assert back == moment.replace(tzinfo=None), f"{moment} does not exist in {zone}"
    return ms


def wall(ms: int, tz: ZoneInfo) -> datetime:
    """The local wall clock of an instant, via astimezone (not the package's helper)."""
    return (EPOCH + timedelta(milliseconds=ms)).astimezone(tz)


def minute_of_day(moment: datetime) -> int:
    return moment.hour * 60 + moment.minute


def hhmm(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"


def end_minute(end: str) -> int:
    """The last minute inside a window: its end minute; '24:00' means 23:59."""
    hours, minutes = end.split(":")
    return min(int(hours) * 60 + int(minutes), 1439)


@cache
def transitions(zone: str, year: int) -> tuple[int, ...]:
    """Instants (epoch ms) in ``year`` at which the UTC offset of ``zone`` changes."""
    tz = ZoneInfo(zone)
    found: list[int] = []
    t = utc(year, 1, 1)
    end = utc(year + 1, 1, 1)
    before = wall(t, tz).utcoffset()
    while t < end:
        after = wall(t + HOUR, tz).utcoffset()
        if after != before:
            exact = next(
                m
                for m in range(t + MINUTE, t + HOUR + 1, MINUTE)
                if wall(m, tz).utcoffset() != before
            )
            found.append(exact)
        before = after
        t += HOUR
    return tuple(found)


@lru_cache(maxsize=4096)
def existing_minutes(day: date, zone: str) -> frozenset[int]:
    """Minutes of ``day`` that some instant shows on the local wall clock of ``zone``."""
    tz = ZoneInfo(zone)
    start = to_ms(datetime(day.year, day.month, day.day, tzinfo=UTC))
    offsets = {wall(start + k * 30 * MINUTE, tz).utcoffset() for k in range(-48, 97)}
    if len(offsets) == 1:
        return frozenset(range(1440))
    out = set()
    for m in range(start - 30 * HOUR, start + 54 * HOUR, MINUTE):
        moment = wall(m, tz)
        if moment.date() == day:
            out.add(minute_of_day(moment))
    return frozenset(out)


def expected_open(ms: int, start: int, end: int, zone: str) -> bool:
    """The documented window rule, computed from the wall clock directly.

    Inside [start, end] (end minute inclusive, start > end wraps midnight); and on a day
    where the start minute does not exist (spring-forward gap), also at the first existing
    minute after it, which is on the next day when the gap runs to midnight.
    """
    moment = wall(ms, ZoneInfo(zone))
    minute = minute_of_day(moment)
    inside = start <= minute <= end if start <= end else (minute >= start or minute <= end)
    if inside:
        return True
    present = existing_minutes(moment.date(), zone)
    if start not in present:
        later = [m for m in present if m > start]
        if later and minute == min(later):
            return True
    yesterday = existing_minutes(moment.date() - timedelta(days=1), zone)
    gap_ran_past_midnight = start not in yesterday and not any(m > start for m in yesterday)
    return gap_ran_past_midnight and bool(present) and minute == min(present)


# ---------------------------------------------------------------------------
# Config helpers and strategies
# ---------------------------------------------------------------------------


def load(data: dict[str, Any]) -> HeartbeatConfig:
    loaded = parse_config(orjson.dumps(data))
    assert not loaded.problems, loaded.problems
    return loaded.config


def one_check(cadence_ms: int, **fields: Any) -> HeartbeatConfig:
    check = {"cadenceMs": cadence_ms, "handler": "default", **fields}
    return load({"agent": "a", "checks": {"c": check}})


def all_day(zone: str) -> dict[str, str]:
    return {"start": "00:00", "end": "24:00", "tz": zone}


def replay(config: HeartbeatConfig, history: list[tuple[int, int, Status]]) -> AgentState:
    """The state after recording ``(check index, slot, status)`` runs, checks by name order."""
    names_ = sorted(config.checks)
    state = AgentState()
    for index, slot, status in history:
        state = record(state, config, names_[index % len(names_)], slot, status)
    return state


def record(
    state: AgentState, config: HeartbeatConfig, name: str, slot: int, status: Status
) -> AgentState:
    check = config.checks[name]
    return record_run(
        state,
        check=name,
        cadence_ms=check.cadence_ms,
        slot_ms=slot,
        status=status,
        finished_ms=slot + 5,
        duration_ms=5,
        key=f"{config.agent}:{name}:{slot}",
        initial_last_run=check.last_run,
    )


def last_run_of(config: HeartbeatConfig, state: AgentState, name: str) -> int | None:
    if name in state.checks:
        return state.checks[name].last_run
    return config.checks[name].last_run


END_2100 = utc(2100, 1, 1)
NEAR_NOW = st.integers(utc(2025, 1, 1), utc(2028, 1, 1))
names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,10}", fullmatch=True)
quarters = st.lists(st.sampled_from(["Q1", "Q2", "Q3", "Q4"]), min_size=1, max_size=4, unique=True)
window_ends = st.one_of(st.just("24:00"), st.integers(0, 1439).map(hhmm))
cadences = st.one_of(
    st.sampled_from([1, 999, MINUTE, 5 * MINUTE, CADENCE_15M, HOUR, DAY]),
    st.integers(1, 7 * DAY),
)


@st.composite
def check_specs(draw: st.DrawFn, last_runs: st.SearchStrategy[int]) -> dict[str, Any]:
    spec: dict[str, Any] = {"cadenceMs": draw(cadences), "handler": "default"}
    if draw(st.booleans()):
        spec["priority"] = draw(st.integers(-5, 5))
    if draw(st.integers(0, 4)) == 0:
        spec["enabled"] = False
    if draw(st.booleans()):
        window = {"start": hhmm(draw(st.integers(0, 1439))), "end": draw(window_ends)}
        if draw(st.booleans()):
            window["tz"] = draw(st.sampled_from(ZONES))
        spec["window"] = window
    if draw(st.integers(0, 2)) == 0:
        spec["triggerOnQuarters"] = draw(quarters)
        spec["quarterOf"] = draw(st.sampled_from(["day", "year"]))
    if draw(st.booleans()):
        spec["lastRun"] = draw(st.one_of(st.none(), last_runs))
    return spec


@st.composite
def config_dicts(
    draw: st.DrawFn,
    last_runs: st.SearchStrategy[int] = NEAR_NOW,
    pause_times: st.SearchStrategy[int] = NEAR_NOW,
) -> dict[str, Any]:
    checks = draw(st.dictionaries(names, check_specs(last_runs), min_size=1, max_size=6))
    data: dict[str, Any] = {
        "agent": "prop",
        "maxChecksPerTick": draw(st.integers(1, 4)),
        "selection": draw(st.sampled_from(["priority", "overdue"])),
        "checks": checks,
    }
    if draw(st.booleans()):
        data["tz"] = draw(st.sampled_from(ZONES))
    if draw(st.integers(0, 3)) == 0:
        keys = st.sampled_from([*checks, "*"])
        until = st.one_of(
            st.none(),
            pause_times,
            pause_times.map(lambda ms: wall(ms, UTC).isoformat()),
        )
        pauses = draw(st.dictionaries(keys, until, max_size=2))
        data["paused"] = {k: {"until": v, "reason": "test"} for k, v in pauses.items()}
    return data


configs = config_dicts().map(load)


# ---------------------------------------------------------------------------
# Sanity of the independent helpers
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("zone", "dates"),
    [
        ("Europe/Berlin", [date(2026, 3, 29), date(2026, 10, 25)]),
        ("America/New_York", [date(2026, 3, 8), date(2026, 11, 1)]),
        ("Australia/Lord_Howe", [date(2026, 4, 5), date(2026, 10, 4)]),
    ],
)
def test_helper_finds_the_2026_transitions(zone: str, dates: list[date]) -> None:
    found = transitions(zone, 2026)
    assert [wall(t, ZoneInfo(zone)).date() for t in found] == dates


# ---------------------------------------------------------------------------
# 1. Overdue ratio
# ---------------------------------------------------------------------------


@MANY
@given(
    st.one_of(st.none(), st.integers(0, END_2100)),
    st.integers(1, 365 * DAY),
    st.integers(0, END_2100),
    st.integers(0, 100 * 365 * DAY),
)
def test_overdue_ratio_is_monotone_in_now(
    last: int | None, cadence: int, now: int, later: int
) -> None:
    earlier_ratio = overdue_ratio(now, last, cadence)
    later_ratio = overdue_ratio(now + later, last, cadence)
    assert later_ratio >= earlier_ratio
    if last is None:
        assert earlier_ratio == math.inf
        assert later_ratio == math.inf
    else:
        assert math.isfinite(earlier_ratio)
        # one cadence elapsed <=> ratio reached 1 (exact for ints below 2**53)
        assert (earlier_ratio >= 1.0) == (now - last >= cadence)


# ---------------------------------------------------------------------------
# 2. Due exactly when one cadence has elapsed
# ---------------------------------------------------------------------------


@MEDIUM
@given(cadences, st.integers(0, END_2100 - 30 * DAY), st.integers(-30 * DAY, 30 * DAY))
def test_plain_check_is_due_exactly_when_a_cadence_elapsed(
    cadence: int, last: int, offset: int
) -> None:
    config = one_check(cadence, lastRun=last)
    now = last + offset
    elapsed = now - last >= cadence
    (evaluation,) = evaluate(config, AgentState(), now)
    assert evaluation.due == elapsed
    assert evaluation.causes == (() if elapsed else (Blocker.NOT_DUE,))
    assert evaluation.next_due == last + cadence
    selected = [e.check for e in plan(config, AgentState(), now).selected]
    assert selected == (["c"] if elapsed else [])
    # the boundary itself: due at last + cadence, not one millisecond before
    assert [e.due for e in evaluate(config, AgentState(), last + cadence - 1)] == [False]
    assert [e.due for e in evaluate(config, AgentState(), last + cadence)] == [True]


@MEDIUM
@given(cadences)
def test_never_run_plain_check_is_due(cadence: int) -> None:
    (evaluation,) = evaluate(one_check(cadence), AgentState(), utc(2026, 5, 5))
    assert evaluation.due
    assert evaluation.ratio == math.inf


def test_fifteen_minute_check_runs_every_fifteen_minutes_with_minute_ticks() -> None:
    config = one_check(CADENCE_15M)
    start = utc(2026, 6, 1)
    slots = [run.slot for run in simulate(config, start, start + DAY, MINUTE)]
    assert slots == list(range(start, start + DAY, CADENCE_15M))  # 96 runs, not 90 (16 min)


@QUICK
@given(
    st.integers(1, HOUR),
    st.integers(0, 10 * MINUTE),
    st.sampled_from([15 * SECOND, 30 * SECOND, MINUTE]),
)
def test_runs_are_one_cadence_apart_rounded_up_to_ticks(
    cadence: int, offset: int, tick: int
) -> None:
    config = one_check(cadence)
    start = utc(2026, 2, 2) + offset
    runs = list(simulate(config, start, start + 3 * HOUR, tick))
    first_slot = -(-start // tick) * tick
    step = -(-cadence // tick) * tick  # the first tick at or after one cadence
    assert [r.slot for r in runs] == list(range(first_slot, start + 3 * HOUR, step))


# ---------------------------------------------------------------------------
# 3. Never two runs of one check for one slot
# ---------------------------------------------------------------------------


@MEDIUM
@given(
    configs,
    NEAR_NOW,
    st.lists(
        st.tuples(
            st.integers(-20, 200),
            st.sampled_from([0, 0, 1, 30 * SECOND]),
            st.lists(st.sampled_from(["success", "failed", "timeout"]), min_size=4, max_size=4),
        ),
        min_size=1,
        max_size=60,
    ),
)
def test_never_two_runs_of_one_check_in_one_slot(
    config: HeartbeatConfig, base: int, steps: list[tuple[int, int, list[Status]]]
) -> None:
    state = AgentState()
    ran: set[tuple[str, int]] = set()
    for minutes, extra, statuses in steps:
        slot = base + minutes * MINUTE + extra
        selected = plan(config, state, slot).selected
        chosen = [e.check for e in selected]
        assert len(chosen) == len(set(chosen)) <= config.max_checks_per_tick
        for name, status in zip(chosen, statuses, strict=False):
            assert (name, slot) not in ran, f"{name} selected twice for slot {slot}"
            ran.add((name, slot))
            state = record(state, config, name, slot, status)
        # a redelivery of the same tick selects nothing that already ran for it
        again = plan(config, state, slot).selected
        assert not {e.check for e in again} & set(chosen)


# ---------------------------------------------------------------------------
# 4. Selection
# ---------------------------------------------------------------------------


@MEDIUM
@given(
    configs,
    NEAR_NOW,
    st.lists(
        st.tuples(
            st.integers(0, 10),
            NEAR_NOW,
            st.sampled_from(["success", "alert", "skipped", "failed", "timeout"]),
        ),
        max_size=8,
    ),
    st.integers(1, 8),
)
def test_select_picks_the_best_due_checks_in_order(
    config: HeartbeatConfig,
    now: int,
    history: list[tuple[int, int, Status]],
    max_checks: int,
) -> None:
    names_ = sorted(config.checks)
    state = replay(config, history)
    evaluations = evaluate(config, state, now)
    assert [e.check for e in evaluations] == names_

    ratios: dict[str, float] = {}
    for name in names_:
        last = last_run_of(config, state, name)
        cadence = config.checks[name].cadence_ms
        ratios[name] = math.inf if last is None else (now - last) / cadence
        assert next(e for e in evaluations if e.check == name).ratio == ratios[name]
    due = [e.check for e in evaluations if e.due]

    def priority(name: str) -> int:
        return config.checks[name].priority

    keys = {
        "priority": lambda n: (priority(n), -ratios[n], n),
        "overdue": lambda n: (-ratios[n], priority(n), n),
    }
    for mode, key in keys.items():
        chosen = select(evaluations, max_checks=max_checks, selection=mode)
        assert len(chosen) <= max_checks
        assert all(e.due for e in chosen)
        assert [e.check for e in chosen] == sorted(due, key=key)[:max_checks]
    # only checks whose cadence elapsed (or that never ran) can be chosen
    for e in select(evaluations, max_checks=max_checks):
        assert ratios[e.check] >= 1.0

    expected = select(
        evaluations, max_checks=config.max_checks_per_tick, selection=config.selection
    )
    assert plan(config, state, now).selected == tuple(expected)


# ---------------------------------------------------------------------------
# 5. Backoff
# ---------------------------------------------------------------------------


@MANY
@given(st.integers(1, 80), st.integers(1, 3650 * DAY))
def test_backoff_doubles_from_a_minute_capped_at_cadence(failures: int, cadence: int) -> None:
    expected = min(60_000 * 2 ** (failures - 1), cadence)
    assert backoff_ms(failures, cadence) == expected
    assert backoff_ms(failures + 1, cadence) == min(2 * expected, cadence)


@MEDIUM
@given(
    st.integers(MINUTE, 2 * DAY),
    st.one_of(st.none(), st.integers(0, 10 * DAY)),
    st.lists(
        st.tuples(
            st.sampled_from(["failed", "timeout", "failed", "success"]), st.integers(0, HOUR)
        ),
        min_size=1,
        max_size=14,
    ),
    st.data(),
)
def test_failure_backs_off_and_keeps_last_run(
    cadence: int,
    last_ago: int | None,
    outcomes: list[tuple[Status, int]],
    data: st.DataObject,
) -> None:
    slot = utc(2026, 7, 1, 12)
    last = None if last_ago is None else slot - cadence - last_ago
    config = one_check(cadence, lastRun=last)
    state = AgentState()
    failures = 0
    for status, jitter in outcomes:
        assert [e.due for e in evaluate(config, state, slot)] == [True]
        state = record(state, config, "c", slot, status)
        if status == "success":
            failures = 0
            last = slot
            wait = cadence
        else:
            failures += 1
            wait = min(60_000 * 2 ** (failures - 1), cadence)
        assert state.checks["c"].last_run == last  # failures leave lastRun unchanged
        assert state.checks["c"].consecutive_failures == failures
        before = data.draw(st.integers(slot, slot + wait - 1), label="instant before retry")
        for blocked in (slot, before, slot + wait - 1):
            (evaluation,) = evaluate(config, state, blocked)
            assert not evaluation.due
            assert plan(config, state, blocked).selected == ()
            assert (Blocker.BACKOFF in evaluation.causes) == (status != "success")
        (evaluation,) = evaluate(config, state, slot + wait)
        assert evaluation.due
        assert evaluation.next_due == slot + wait
        slot += wait + jitter


def test_backoff_sequence_with_minute_ticks() -> None:
    """Every run fails: retries at +1, +2, +4, +8 min, then every cadence (10 min)."""
    config = one_check(10 * MINUTE)
    state = AgentState()
    start = utc(2026, 1, 1)
    attempts = []
    for slot in range(start, start + 60 * MINUTE, MINUTE):
        for e in plan(config, state, slot).selected:
            attempts.append((slot - start) // MINUTE)
            state = record(state, config, e.check, slot, "failed")
    assert attempts == [0, 1, 3, 7, 15, 25, 35, 45, 55]
    assert state.checks["c"].last_run is None


# ---------------------------------------------------------------------------
# 6. DST: a 15-minute check runs 4 times per real hour
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("zone", DST_ZONES)
@settings(max_examples=10, deadline=None)
@given(phase=st.one_of(st.none(), st.integers(0, 14)))
def test_fifteen_minute_check_keeps_real_time_through_dst(zone: str, phase: int | None) -> None:
    tz = ZoneInfo(zone)
    found = transitions(zone, 2026)
    assert len(found) == 2
    for transition in found:
        start = transition - transition % HOUR - 12 * HOUR
        end = start + DAY
        last = None if phase is None else start - CADENCE_15M + phase * MINUTE
        config = one_check(CADENCE_15M, window=all_day(zone), lastRun=last)
        runs = list(simulate(config, start, end, MINUTE))
        slots = [r.slot for r in runs]
        first = start + (phase or 0) * MINUTE
        assert slots == list(range(first, end, CADENCE_15M))
        assert all(b - a == CADENCE_15M for a, b in itertools.pairwise(slots))
        per_hour = Counter((s - start) // HOUR for s in slots)
        assert per_hour == dict.fromkeys(range(24), 4)
        for run in runs:
            assert run.local == wall(run.slot, tz).isoformat(timespec="minutes")
        walls = [wall(s, tz).replace(tzinfo=None) for s in slots]
        offset_change = wall(transition, tz).utcoffset() - wall(transition - 1, tz).utcoffset()
        if offset_change < timedelta(0):  # fall-back: the repeated wall times both ran
            repeated = [w for w, n in Counter(walls).items() if n == 2]
            assert len(repeated) == -offset_change // timedelta(minutes=15)
        else:  # spring-forward: skipped wall times never appear
            assert len(set(walls)) == len(walls)


# ---------------------------------------------------------------------------
# 7. Windows
# ---------------------------------------------------------------------------


@st.composite
def window_cases(draw: st.DrawFn) -> tuple[str, int, int, str]:
    """(zone, now, start minute, end text): random, near a DST transition, or a window
    starting inside a spring-forward gap tested around the end of the gap."""
    zone = draw(st.sampled_from(ZONES))
    tz = ZoneInfo(zone)
    year = draw(st.sampled_from(YEARS_WITH_TRANSITIONS))
    near = transitions(zone, year)
    forward = [t for t in near if wall(t, tz).utcoffset() > wall(t - 1, tz).utcoffset()]
    mode = draw(st.sampled_from(["random", "near", "gap"]))
    if mode == "gap" and forward:
        transition = draw(st.sampled_from(forward))
        before = minute_of_day(wall(transition - MINUTE, tz))
        skipped = (wall(transition, tz).utcoffset() - wall(transition - 1, tz).utcoffset()) // (
            timedelta(minutes=1)
        )
        start = (before + draw(st.integers(1, skipped))) % 1440
        now = transition + draw(st.sampled_from([-MINUTE, -1, 0, 1, 59_999, MINUTE]))
    elif mode != "random" and near:
        transition = draw(st.sampled_from(near))
        minutes = st.one_of(st.integers(-180, 180), st.sampled_from([-1, 0, 0, 1]))
        now = transition + draw(minutes) * MINUTE + draw(st.sampled_from([0, 1, 59_999]))
        before = minute_of_day(wall(transition - MINUTE, tz))
        start = (before + draw(st.integers(-30, 90))) % 1440
    else:
        now = draw(st.integers(0, END_2100))
        start = draw(st.integers(0, 1439))
        return zone, now, start, draw(window_ends)
    end = draw(
        st.one_of(
            st.just("24:00"),
            st.integers(0, 120).map(lambda d: hhmm((start + d) % 1440)),
            window_ends,
        )
    )
    return zone, now, start, end


@settings(max_examples=400, deadline=None)
@given(window_cases())
def test_in_window_follows_the_local_wall_clock(case: tuple[str, int, int, str]) -> None:
    zone, now, start, end = case
    window = Window(start=hhmm(start), end=end)
    expected = expected_open(now, start, end_minute(end), zone)
    assert in_window(now, window, ZoneInfo(zone)) == expected


@cache
def forward_gaps() -> tuple[tuple[str, int, int], ...]:
    """(zone, transition, skipped minutes) of every spring-forward in the sampled years."""
    out = []
    for zone in ZONES:
        tz = ZoneInfo(zone)
        for year in YEARS_WITH_TRANSITIONS:
            for t in transitions(zone, year):
                jump = wall(t, tz).utcoffset() - wall(t - 1, tz).utcoffset()
                # a whole skipped date (Pacific/Apia 2011-12-30) has no window to open
                if timedelta(0) < jump < timedelta(days=1):
                    out.append((zone, t, jump // timedelta(minutes=1)))
    return tuple(out)


@MEDIUM
@given(st.data())
def test_window_starting_in_a_gap_opens_exactly_at_the_gap_end(data: st.DataObject) -> None:
    zone, transition, skipped = data.draw(st.sampled_from(forward_gaps()), label="gap")
    tz = ZoneInfo(zone)
    last_before = minute_of_day(wall(transition - MINUTE, tz))
    first_after = minute_of_day(wall(transition, tz))
    assert (first_after - last_before) % 1440 == skipped + 1
    start = (last_before + data.draw(st.integers(1, skipped), label="start in gap")) % 1440
    # an end inside the gap too: the window has no existing minute but the gap's end
    end = (start + data.draw(st.integers(0, (last_before + skipped - start) % 1440))) % 1440
    window = Window(start=hhmm(start), end=hhmm(end))
    assert in_window(transition, window, tz)
    assert in_window(transition + 59_999, window, tz)
    assert not in_window(transition - MINUTE, window, tz)
    assert not in_window(transition + MINUTE, window, tz)
    for now in (transition - 1, transition + 1, transition + 60_000):
        assert in_window(now, window, tz) == expected_open(now, start, end, zone)


def test_window_starting_in_a_gap_that_ends_at_midnight_opens_at_midnight() -> None:
    """A gap that ends at local midnight (America/Nuuk springs 23:00 -> 00:00)."""
    zone = "America/Nuuk"
    tz = ZoneInfo(zone)
    (spring, _) = transitions(zone, 2026)
    # 2026-03-28 22:59 -02:00 is followed by 2026-03-29 00:00 -01:00: 23:00-23:59 is skipped
    assert wall(spring - MINUTE, tz).replace(tzinfo=None) == datetime(2026, 3, 28, 22, 59)
    assert wall(spring, tz).replace(tzinfo=None) == datetime(2026, 3, 29, 0, 0)
    config = one_check(CADENCE_15M, window={"start": "23:15", "end": "23:45", "tz": zone})
    start, end = local(zone, date(2026, 3, 26), 0, 0), local(zone, date(2026, 3, 31), 0, 0)
    slots = [r.slot for r in simulate(config, start, end, MINUTE)]
    usual = [local(zone, date(2026, 3, d), 23, m) for d in (26, 27, 29, 30) for m in (15, 30, 45)]
    # the window of 03-28 opens at the first valid minute after the gap: 03-29 00:00
    assert slots == sorted([*usual, spring])
    assert in_window(spring, Window(start="23:15", end="23:45"), tz)


@MEDIUM
@given(st.sampled_from(ZONES), st.integers(0, END_2100))
def test_all_day_window_is_always_open(zone: str, now: int) -> None:
    tz = ZoneInfo(zone)
    assert in_window(now, Window(start="00:00", end="24:00"), tz)
    assert in_window(now, Window(start="00:00", end="23:59"), tz)


@pytest.mark.parametrize(
    ("zone", "day", "span", "opens", "closed"),
    [
        # Berlin skips 02:00-02:59 on 2026-03-29
        ("Europe/Berlin", date(2026, 3, 29), ("02:15", "02:45"), (3, 0), [(1, 59), (3, 1)]),
        # New York skips 02:00-02:59 on 2026-03-08
        ("America/New_York", date(2026, 3, 8), ("02:00", "02:30"), (3, 0), [(1, 59), (3, 1)]),
        # Lord Howe skips 02:00-02:29 on 2026-10-04 (a 30-minute shift)
        ("Australia/Lord_Howe", date(2026, 10, 4), ("02:00", "02:10"), (2, 30), [(1, 59), (2, 31)]),
    ],
)
def test_window_starting_in_the_gap_opens_after_it(
    zone: str,
    day: date,
    span: tuple[str, str],
    opens: tuple[int, int],
    closed: list[tuple[int, int]],
) -> None:
    tz = ZoneInfo(zone)
    start, end = span
    window = Window(start=start, end=end, tz=zone)
    first_valid = local(zone, day, *opens)
    # the start minute really is in the gap: the minute before first_valid is earlier wall time
    assert minute_of_day(wall(first_valid - MINUTE, tz)) < minute_of_day(wall(first_valid, tz)) - 1
    assert in_window(first_valid, window, tz)
    assert in_window(first_valid + 59_999, window, tz)
    for hour, minute in closed:
        assert not in_window(local(zone, day, hour, minute), window, tz)

    day_start = local(zone, day, 0, 0)
    day_end = local(zone, day + timedelta(days=1), 0, 0)
    config = one_check(CADENCE_15M, window={"start": start, "end": end, "tz": zone})
    runs = list(simulate(config, day_start, day_end, MINUTE))
    assert [r.slot for r in runs] == [first_valid]
    assert runs[0].local.startswith(f"{day.isoformat()}T{opens[0]:02d}:{opens[1]:02d}")

    # the same window on the ordinary day before runs at its start and then every 15 min
    prev = day - timedelta(days=1)
    prev_start = local(zone, prev, 0, 0)
    runs = list(simulate(config, prev_start, day_start, MINUTE))
    start_h, start_m = map(int, start.split(":"))
    first = local(zone, prev, start_h, start_m)
    last = local(zone, prev, *divmod(end_minute(end), 60))
    assert [r.slot for r in runs] == list(range(first, last + 1, CADENCE_15M))


# ---------------------------------------------------------------------------
# 8. Fall-back: both passes of the repeated hour count
# ---------------------------------------------------------------------------


def test_window_in_repeated_hour_is_open_in_both_passes() -> None:
    zone = "America/New_York"
    tz = ZoneInfo(zone)
    window = Window(start="01:00", end="01:30", tz=zone)
    first_pass = local(zone, date(2026, 11, 1), 1, 0, fold=0)
    second_pass = local(zone, date(2026, 11, 1), 1, 0, fold=1)
    assert second_pass - first_pass == HOUR
    assert first_pass == utc(2026, 11, 1, 5)  # EDT, UTC-4
    for m in range(utc(2026, 11, 1, 3), utc(2026, 11, 1, 9), MINUTE):
        moment = wall(m, tz)
        expected = moment.date() == date(2026, 11, 1) and moment.hour == 1 and moment.minute <= 30
        assert in_window(m, window, tz) == expected, moment
    open_minutes = [
        m
        for m in range(utc(2026, 11, 1, 3), utc(2026, 11, 1, 9), MINUTE)
        if in_window(m, window, tz)
    ]
    assert len(open_minutes) == 2 * 31

    config = one_check(CADENCE_15M, window={"start": "01:00", "end": "01:30", "tz": zone})
    runs = list(simulate(config, utc(2026, 11, 1), utc(2026, 11, 2), MINUTE))
    assert [r.slot for r in runs] == [
        first_pass,
        first_pass + 15 * MINUTE,
        first_pass + 30 * MINUTE,
        second_pass,
        second_pass + 15 * MINUTE,
        second_pass + 30 * MINUTE,
    ]
    assert [r.local for r in runs] == [
        "2026-11-01T01:00-04:00",
        "2026-11-01T01:15-04:00",
        "2026-11-01T01:30-04:00",
        "2026-11-01T01:00-05:00",
        "2026-11-01T01:15-05:00",
        "2026-11-01T01:30-05:00",
    ]


# ---------------------------------------------------------------------------
# 9. Quarters
# ---------------------------------------------------------------------------

QUARTER_OF_HOUR = {
    **dict.fromkeys(range(6), "Q1"),
    **dict.fromkeys(range(6, 12), "Q2"),
    **dict.fromkeys(range(12, 18), "Q3"),
    **dict.fromkeys(range(18, 24), "Q4"),
}
QUARTER_OF_MONTH = {
    **dict.fromkeys((1, 2, 3), "Q1"),
    **dict.fromkeys((4, 5, 6), "Q2"),
    **dict.fromkeys((7, 8, 9), "Q3"),
    **dict.fromkeys((10, 11, 12), "Q4"),
}


@MANY
@given(st.sampled_from(ZONES), st.integers(0, END_2100))
def test_quarter_of_day_and_year_follow_the_local_clock(zone: str, now: int) -> None:
    tz = ZoneInfo(zone)
    moment = wall(now, tz)
    assert quarter_at(now, tz, "day") == QUARTER_OF_HOUR[moment.hour]
    assert quarter_at(now, tz) == QUARTER_OF_HOUR[moment.hour]
    assert quarter_at(now, tz, "year") == QUARTER_OF_MONTH[moment.month]


@QUICK
@given(st.sampled_from(ZONES), NEAR_NOW, quarters, st.sampled_from(["day", "year"]))
def test_check_is_blocked_outside_its_quarters(
    zone: str, now: int, wanted: list[str], quarter_of: str
) -> None:
    config = one_check(MINUTE, triggerOnQuarters=wanted, quarterOf=quarter_of, window=all_day(zone))
    moment = wall(now, ZoneInfo(zone))
    by_day = quarter_of == "day"
    current = QUARTER_OF_HOUR[moment.hour] if by_day else QUARTER_OF_MONTH[moment.month]
    (evaluation,) = evaluate(config, AgentState(), now)
    assert evaluation.due == (current in wanted)
    assert evaluation.causes == (() if current in wanted else (Blocker.WRONG_QUARTER,))


# ---------------------------------------------------------------------------
# 10. evaluate never raises
# ---------------------------------------------------------------------------


@MEDIUM
@given(
    config_dicts(last_runs=st.integers(0, END_2100), pause_times=st.integers(0, END_2100)).map(
        load
    ),
    st.integers(0, END_2100),
    st.lists(
        st.tuples(
            st.integers(0, 10),
            st.integers(0, END_2100),
            st.sampled_from(["success", "alert", "skipped", "failed", "timeout"]),
        ),
        max_size=5,
    ),
)
def test_evaluate_never_raises(
    config: HeartbeatConfig, now: int, history: list[tuple[int, int, Status]]
) -> None:
    names_ = sorted(config.checks)
    state = replay(config, history)
    evaluations = evaluate(config, state, now)
    assert [e.check for e in evaluations] == names_
    for e in evaluations:
        assert e.due == (not e.causes)
        assert isinstance(e.reason, str)
        assert all(isinstance(text, str) and text for _, text in e.blockers)
        assert (e.ratio == math.inf) == (last_run_of(config, state, e.check) is None)
    chosen = plan(config, state, now).selected
    assert len(chosen) <= config.max_checks_per_tick
    assert all(e.due for e in chosen)
