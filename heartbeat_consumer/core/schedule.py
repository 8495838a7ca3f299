"""The scheduling rules: pure functions of (config, state, now).

No clock reads and no I/O here. ``now`` is the tick's scheduled slot in epoch ms, so
handler latency never shifts the schedule.

A check is *due* when all hold:

- it is valid, its handler is known, and it is enabled;
- it is not paused (by name or by ``*``, in the config or in the state);
- its overdue ratio ``(now - lastRun) / cadenceMs`` is ``>= 1.0`` (never run: infinite);
- it is not waiting out a failure backoff;
- the local wall clock of its zone is inside its window and in one of its quarters.

Among due checks, at most ``maxChecksPerTick`` are selected: by priority (lower first),
then higher ratio, then name; ``selection: "overdue"`` puts the ratio first.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Container, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from functools import partial
from zoneinfo import ZoneInfo

from .config import CheckConfig, HeartbeatConfig, Pause, Problem, Window
from .state import AgentState
from .timeutil import clamp_instant, format_duration, gap_end, iso, local_time

__all__ = [
    "Blocker",
    "Evaluation",
    "Plan",
    "evaluate",
    "in_window",
    "is_paused",
    "overdue_ratio",
    "plan",
    "quarter_at",
    "select",
]


_QUARTERS = ("Q1", "Q2", "Q3", "Q4")


class Blocker(StrEnum):
    """Why a check is not due, in the order they are reported."""

    INVALID = "invalid"
    UNKNOWN_HANDLER = "unknown-handler"
    DISABLED = "disabled"
    PAUSED = "paused"
    OUTSIDE_WINDOW = "outside-window"
    WRONG_QUARTER = "wrong-quarter"
    BACKOFF = "backoff"
    NOT_DUE = "not-due"


@dataclass(frozen=True)
class Evaluation:
    """Whether one check is due at ``now`` and, if not, every reason why."""

    check: str
    handler: str | None
    priority: int
    ratio: float
    """Overdue ratio; ``math.inf`` when never run, ``nan`` for an invalid check."""
    last_run: int | None
    next_due: int | None
    """Earliest instant the cadence and backoff allow (windows and quarters aside)."""
    causes: tuple[Blocker, ...] = ()
    """Why it is not due; empty when due."""
    explain: Callable[[Blocker], str] = field(default=str, repr=False, compare=False)
    """Renders a cause as text; texts are built only when asked for (plan, logs)."""

    @property
    def due(self) -> bool:
        return not self.causes

    @property
    def blockers(self) -> tuple[tuple[Blocker, str], ...]:
        """Each cause with its human-readable explanation."""
        return tuple((cause, self.explain(cause)) for cause in self.causes)

    @property
    def reason(self) -> str:
        """The first reason it is not due, or 'due'."""
        return self.explain(self.causes[0]) if self.causes else "due"


@dataclass(frozen=True)
class Plan:
    now: int
    evaluations: tuple[Evaluation, ...]
    selected: tuple[Evaluation, ...]

    def not_due(self) -> list[str]:
        """The checks held back only because they are not due yet (a run avoided)."""
        return [ev.check for ev in self.evaluations if ev.causes == (Blocker.NOT_DUE,)]

    def why_nothing(self, limit: int = 3) -> str:
        """Why nothing runs now, in one line: the checks that come due first, with the
        first reason of each (``nothing due: a: not due until ...; b: paused ...``)."""
        if not self.evaluations:
            return "nothing due: the config has no checks"
        waiting = sorted(
            (ev for ev in self.evaluations if not ev.due),
            key=lambda ev: (ev.next_due is None, ev.next_due or 0, ev.check),
        )
        parts = [f"{ev.check}: {ev.reason}" for ev in waiting[:limit]]
        more = len(waiting) - limit
        return "nothing due: " + "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def overdue_ratio(now_ms: int, last_run_ms: int | None, cadence_ms: int) -> float:
    """``(now - lastRun) / cadence``; infinite when the check never ran."""
    if last_run_ms is None:
        return math.inf
    return (now_ms - last_run_ms) / cadence_ms


def _in_window_local(local: datetime, window: Window, tz: ZoneInfo) -> bool:
    if window.days is not None and local.weekday() not in window.days:
        return False
    if window.start is None:
        return True
    minute = local.hour * 60 + local.minute
    start, end = window.start_minute, window.end_minute
    inside = start <= minute <= end if start <= end else (minute >= start or minute <= end)
    if inside:
        return True
    today = local.date()
    for day in (today, today - timedelta(days=1)):  # the gap may end at midnight
        if gap_end(day, start, tz) == (today, minute):
            return True
    return False


def in_window(now_ms: int, window: Window, tz: ZoneInfo) -> bool:
    """Local wall clock inside [start, end] (end minute inclusive; start > end wraps midnight)
    on one of the window's days (the day of the local moment, also after midnight in a
    window that crosses it).

    Through fall-back both passes of a repeated hour count. On a spring-forward day, a
    window whose start falls in the skipped hour also opens at the first valid minute.
    """
    return _in_window_local(local_time(now_ms, tz), window, tz)


def _quarter_local(local: datetime, quarter_of: str) -> str:
    index = local.hour // 6 if quarter_of == "day" else (local.month - 1) // 3
    return _QUARTERS[index]


def quarter_at(now_ms: int, tz: ZoneInfo, quarter_of: str = "day") -> str:
    """'Q1'..'Q4': of the local day (6-hour blocks from 00:00) or of the calendar year."""
    return _quarter_local(local_time(now_ms, tz), quarter_of)


def _active_pause(
    name: str, config: HeartbeatConfig, state: AgentState, now_ms: int
) -> tuple[str, Pause] | None:
    if not config.paused and not state.pauses:
        return None
    for key in (name, "*"):
        for pause in (config.paused.get(key), state.pauses.get(key)):
            if pause is not None and pause.active(now_ms):
                return key, pause
    return None


def is_paused(name: str, config: HeartbeatConfig, state: AgentState, now_ms: int) -> str | None:
    """A description of the active pause on ``name`` (or on the whole agent), else None."""
    found = _active_pause(name, config, state, now_ms)
    if found is None:
        return None
    key, pause = found
    until = "until resumed" if pause.until is None else f"until {iso(pause.until)}"
    whom = "agent paused" if key == "*" else "paused"
    because = f" ({pause.reason})" if pause.reason else ""
    return f"{whom} {until}{because}"


def _explain(
    check: CheckConfig,
    config: HeartbeatConfig,
    state: AgentState,
    now_ms: int,
    cause: Blocker,
) -> str:
    current = state.check(check.name, check.last_run)
    if cause is Blocker.UNKNOWN_HANDLER:
        return f"unknown handler {check.handler!r}"
    if cause is Blocker.DISABLED:
        return "disabled"
    if cause is Blocker.PAUSED:
        return is_paused(check.name, config, state, now_ms) or "paused"
    local = local_time(now_ms, check.zoneinfo)
    if cause is Blocker.OUTSIDE_WINDOW and check.window is not None:
        w = check.window
        when = f"{local:%a %H:%M}" if w.days is not None else f"{local:%H:%M}"
        return f"outside window {w.describe()} {check.tz} (local {when})"
    if cause is Blocker.WRONG_QUARTER and check.trigger_on_quarters is not None:
        quarter = _quarter_local(local, check.quarter_of)
        wanted = ", ".join(check.trigger_on_quarters)
        return f"wrong quarter: {quarter} of the {check.quarter_of}, runs in {wanted}"
    if cause is Blocker.BACKOFF and current.next_retry is not None:
        return (
            f"backing off after {current.consecutive_failures} failure(s) "
            f"until {iso(current.next_retry)}"
        )
    if cause is Blocker.NOT_DUE and current.last_run is not None:
        ratio = overdue_ratio(now_ms, current.last_run, check.cadence_ms)
        left = format_duration(current.last_run + check.cadence_ms - now_ms)
        return f"not due: ratio {ratio:.2f}, due in {left}"
    return cause.value


def _constant(text: str) -> Callable[[Blocker], str]:
    return lambda _cause: text


def _evaluate_check(
    check: CheckConfig,
    config: HeartbeatConfig,
    state: AgentState,
    now_ms: int,
    *,
    known_handlers: Container[str] | None,
    local_of: Callable[[ZoneInfo], datetime],
) -> Evaluation:
    current = state.check(check.name, check.last_run)
    last = current.last_run
    causes: list[Blocker] = []
    if known_handlers is not None and check.handler not in known_handlers:
        causes.append(Blocker.UNKNOWN_HANDLER)
    if not check.enabled:
        causes.append(Blocker.DISABLED)
    if _active_pause(check.name, config, state, now_ms) is not None:
        causes.append(Blocker.PAUSED)
    if check.window is not None or check.trigger_on_quarters is not None:
        tz = check.zoneinfo
        local = local_of(tz)
        if check.window is not None and not _in_window_local(local, check.window, tz):
            causes.append(Blocker.OUTSIDE_WINDOW)
        quarters = check.trigger_on_quarters
        if quarters is not None and _quarter_local(local, check.quarter_of) not in quarters:
            causes.append(Blocker.WRONG_QUARTER)
    if current.next_retry is not None and now_ms < current.next_retry:
        causes.append(Blocker.BACKOFF)
    if last is not None and now_ms - last < check.cadence_ms:
        causes.append(Blocker.NOT_DUE)
    next_due = None if last is None else clamp_instant(last + check.cadence_ms)
    if current.next_retry is not None:
        next_due = current.next_retry if next_due is None else max(next_due, current.next_retry)
    return Evaluation(
        check=check.name,
        handler=check.handler,
        priority=check.priority,
        ratio=overdue_ratio(now_ms, last, check.cadence_ms),
        last_run=last,
        next_due=next_due,
        causes=tuple(causes),
        explain=partial(_explain, check, config, state, now_ms),
    )


def evaluate(
    config: HeartbeatConfig,
    state: AgentState,
    now_ms: int,
    *,
    known_handlers: Container[str] | None = None,
    invalid_checks: Mapping[str, Iterable[Problem]] | None = None,
) -> list[Evaluation]:
    """Evaluate every check (valid and invalid) at ``now_ms``, ordered by check name."""
    locals_by_zone: dict[ZoneInfo, datetime] = {}

    def local_of(tz: ZoneInfo) -> datetime:
        found = locals_by_zone.get(tz)
        if found is None:
            found = locals_by_zone[tz] = local_time(now_ms, tz)
        return found

    out = [
        _evaluate_check(
            check, config, state, now_ms, known_handlers=known_handlers, local_of=local_of
        )
        for check in config.checks.values()
    ]
    for name, problems in (invalid_checks or {}).items():
        text = "invalid: " + "; ".join(str(p) for p in problems)
        out.append(
            Evaluation(
                check=name,
                handler=None,
                priority=0,
                ratio=math.nan,
                last_run=state.check(name).last_run,
                next_due=None,
                causes=(Blocker.INVALID,),
                explain=_constant(text),
            )
        )
    return sorted(out, key=lambda e: e.check)


def select(
    evaluations: Iterable[Evaluation], *, max_checks: int = 1, selection: str = "priority"
) -> list[Evaluation]:
    """The due checks to run this tick, best first, at most ``max_checks``."""
    due = [e for e in evaluations if e.due]
    if selection == "overdue":
        due.sort(key=lambda e: (-e.ratio, e.priority, e.check))
    else:
        due.sort(key=lambda e: (e.priority, -e.ratio, e.check))
    return due[:max_checks]


def plan(
    config: HeartbeatConfig,
    state: AgentState,
    now_ms: int,
    *,
    known_handlers: Container[str] | None = None,
    invalid_checks: Mapping[str, Iterable[Problem]] | None = None,
) -> Plan:
    """Evaluate every check and select what one tick at ``now_ms`` runs."""
    evaluations = evaluate(
        config, state, now_ms, known_handlers=known_handlers, invalid_checks=invalid_checks
    )
    chosen = select(evaluations, max_checks=config.max_checks_per_tick, selection=config.selection)
    return Plan(now_ms, tuple(evaluations), tuple(chosen))
