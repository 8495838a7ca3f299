"""Run state of one agent (kept apart from heartbeat.json) and its pure transitions.

Nothing here reads a clock or a file: :mod:`heartbeat_consumer.store` persists it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .config import HeartbeatConfig, Pause
from .timeutil import MS_PER_MINUTE, clamp_instant, in_instant_range

__all__ = [
    "FAILED_STATUSES",
    "OK_STATUSES",
    "STATUSES",
    "AgentState",
    "CheckState",
    "HistoryEntry",
    "Status",
    "AVOIDED_REASONS",
    "add_avoided",
    "backoff_ms",
    "clamp_future_runs",
    "compact_history",
    "idempotency_key",
    "record_run",
    "repair_ranges",
]

Status = Literal["success", "alert", "failed", "skipped", "timeout"]
STATUSES: tuple[Status, ...] = ("success", "alert", "failed", "skipped", "timeout")
OK_STATUSES = frozenset({"success", "alert", "skipped"})
FAILED_STATUSES = frozenset({"failed", "timeout"})

AVOIDED_REASONS = frozenset({"not-due", "empty-checklist", "duplicate"})
BACKOFF_BASE_MS = MS_PER_MINUTE
HISTORY_LIMIT = 1000
MAX_PAUSES = 1000
"""At most this many pauses are kept in an agent's state."""
"""Hard cap on history entries; ``quarterly_compaction`` trims far below it."""


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="ignore")


class CheckState(_Model):
    last_run: int | None = Field(default=None, alias="lastRun")
    """Slot (epoch ms) of the last completed run; failures leave it unchanged."""
    last_success: int | None = Field(default=None, alias="lastSuccess")
    last_status: Status | None = Field(default=None, alias="lastStatus")
    last_finished: int | None = Field(default=None, alias="lastFinished")
    consecutive_failures: int = Field(default=0, alias="consecutiveFailures")
    next_retry: int | None = Field(default=None, alias="nextRetry")
    last_key: str | None = Field(default=None, alias="lastKey")
    last_result: dict[str, Any] | None = Field(default=None, alias="lastResult")
    last_error: str | None = Field(default=None, alias="lastError")
    runs: int = 0
    wall_ms: int = Field(default=0, alias="wallMs")
    """Total wall time of its runs (the cost of an agent turn is mostly time)."""
    avoided: dict[str, int] = Field(default_factory=dict)
    """Runs not made, by reason (:data:`AVOIDED_REASONS`): ticks when it was not due,
    and skipped runs that said why (an empty checklist, a duplicate alert)."""
    recent_alerts: dict[str, int] = Field(default_factory=dict, alias="recentAlerts")
    """Fingerprints of the alerts it raised, with the slot of each (``agent_turn``
    suppresses the same alert for 24 h)."""
    auth_failures: int = Field(default=0, alias="authFailures")
    """Consecutive runs that failed on authentication or quota (``agent_turn``)."""


class HistoryEntry(_Model):
    check: str
    slot: int
    status: Status
    duration_ms: int = Field(alias="durationMs")


class AgentState(_Model):
    version: Literal[1] = 1
    agent: str | None = None
    checks: dict[str, CheckState] = Field(default_factory=dict)
    pauses: dict[str, Pause] = Field(default_factory=dict)
    """Run-time pauses (from commands); merged over the config's ``paused``."""
    pauses_version: int = Field(default=0, alias="pausesVersion")
    """When ``pauses`` last changed (epoch ms, and always more than before): replicas
    apply only a newer set of pauses."""
    history: tuple[HistoryEntry, ...] = ()

    def check(self, name: str, initial_last_run: int | None = None) -> CheckState:
        """The check's state; a check never recorded starts from the config's lastRun."""
        found = self.checks.get(name)
        return found if found is not None else CheckState(last_run=initial_last_run)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def idempotency_key(agent: str, check: str, slot_ms: int) -> str:
    """``agent:check:slot``: the same for every delivery of one tick."""
    return f"{agent}:{check}:{slot_ms}"


def backoff_ms(consecutive_failures: int, cadence_ms: int) -> int:
    """60 s doubling per consecutive failure, capped at the check's cadence."""
    exponent = min(max(consecutive_failures, 1) - 1, 30)
    return min(BACKOFF_BASE_MS * (1 << exponent), cadence_ms)


def record_run(
    state: AgentState,
    *,
    check: str,
    cadence_ms: int,
    slot_ms: int,
    status: Status,
    finished_ms: int,
    duration_ms: int,
    key: str,
    summary: dict[str, Any] | None = None,
    error: str | None = None,
    initial_last_run: int | None = None,
) -> AgentState:
    """State after one run of ``check`` for the tick at ``slot_ms``.

    success, alert and skipped record ``slot_ms`` as lastRun; failed and timeout keep
    lastRun (the check stays overdue) and set a retry time after a backoff.
    """
    before = state.check(check, initial_last_run)
    common: dict[str, Any] = {
        "last_status": status,
        "last_finished": finished_ms,
        "last_key": key,
        "last_result": summary,
        "last_error": error,
        "runs": before.runs + 1,
        "wall_ms": before.wall_ms + max(duration_ms, 0),
    }
    reason = (summary or {}).get("reason")
    if status == "skipped" and reason in AVOIDED_REASONS:
        common["avoided"] = {**before.avoided, reason: before.avoided.get(reason, 0) + 1}
    if status in OK_STATUSES:
        after = before.model_copy(
            update={
                **common,
                "last_run": slot_ms,
                "last_success": slot_ms,
                "consecutive_failures": 0,
                "next_retry": None,
            }
        )
    else:
        failures = before.consecutive_failures + 1
        after = before.model_copy(
            update={
                **common,
                "consecutive_failures": failures,
                "next_retry": clamp_instant(slot_ms + backoff_ms(failures, cadence_ms)),
            }
        )
    entry = HistoryEntry(check=check, slot=slot_ms, status=status, duration_ms=duration_ms)
    history = (*state.history, entry)[-HISTORY_LIMIT:]
    return state.model_copy(update={"checks": {**state.checks, check: after}, "history": history})


def add_avoided(
    state: AgentState, counts: dict[str, int], reason: str
) -> tuple[AgentState, dict[str, int]]:
    """Add ``counts`` (runs avoided per check) under ``reason`` to the tallies of checks
    that have a state; the counts of those that have none yet are returned, to be added
    once they have (creating one here would lose the config's ``lastRun``)."""
    checks = dict(state.checks)
    left: dict[str, int] = {}
    for name, n in counts.items():
        before = state.checks.get(name)
        if before is None:
            left[name] = n
            continue
        avoided = {**before.avoided, reason: before.avoided.get(reason, 0) + n}
        checks[name] = before.model_copy(update={"avoided": avoided})
    return state.model_copy(update={"checks": checks}), left


def compact_history(state: AgentState, keep_per_check: int) -> tuple[AgentState, int]:
    """Keep the newest ``keep_per_check`` history entries of each check; return how many went."""
    kept: list[HistoryEntry] = []
    seen: dict[str, int] = {}
    for entry in reversed(state.history):
        seen[entry.check] = seen.get(entry.check, 0) + 1
        if seen[entry.check] <= keep_per_check:
            kept.append(entry)
    removed = len(state.history) - len(kept)
    return state.model_copy(update={"history": tuple(reversed(kept))}), removed


_INSTANT_FIELDS = ("last_run", "last_success", "last_finished", "next_retry")
_COUNT_FIELDS = ("runs", "wall_ms", "consecutive_failures", "auth_failures")
"""A check's ``runs`` also orders the changes of its state between replicas."""
MAX_COUNT = 2**53
"""Counters beyond this (or below 0) are reset: JSON cannot carry them exactly."""


def _in_range(value: int | None) -> bool:
    return value is None or in_instant_range(value)


def repair_ranges(state: AgentState) -> tuple[AgentState, list[str]]:
    """The state with every instant outside 1970..9999 repaired, and what was repaired.

    A check's ``lastRun``, ``lastSuccess``, ``lastFinished`` or ``nextRetry`` out of
    range is dropped (a ``lastRun`` dropped makes the check due); a pause whose end is
    out of range holds until resumed; history entries and remembered alerts with such a
    slot are dropped. (A state file written by this package never holds such values;
    a hand edit or another writer can.)"""
    fixed: list[str] = []
    checks = dict(state.checks)
    for name, check in state.checks.items():
        bad = [f for f in _INSTANT_FIELDS if not _in_range(getattr(check, f))]
        alerts = {k: v for k, v in check.recent_alerts.items() if in_instant_range(v)}
        counts = {f: 0 for f in _COUNT_FIELDS if not 0 <= getattr(check, f) <= MAX_COUNT}
        avoided = {k: v for k, v in check.avoided.items() if 0 <= v <= MAX_COUNT}
        if bad or counts or len(alerts) != len(check.recent_alerts) or avoided != check.avoided:
            changes = {**dict.fromkeys(bad), **counts, "recent_alerts": alerts, "avoided": avoided}
            checks[name] = check.model_copy(update=changes)
            what = ", ".join([*bad, *counts]) or "recentAlerts or avoided"
            fixed.append(f"check {name}: {what} out of range, dropped")
    pauses = dict(state.pauses)
    for name, pause in state.pauses.items():
        if not _in_range(pause.until):
            pauses[name] = pause.model_copy(update={"until": None})
            fixed.append(f"pause of {name}: end out of range, holds until resumed")
    history = tuple(
        e for e in state.history if in_instant_range(e.slot) and 0 <= e.duration_ms <= MAX_COUNT
    )
    if len(history) != len(state.history):
        fixed.append(f"{len(state.history) - len(history)} history entries out of range, dropped")
    if not fixed:
        return state, fixed
    return state.model_copy(update={"checks": checks, "pauses": pauses, "history": history}), fixed


def clamp_future_runs(
    state: AgentState, config: HeartbeatConfig, now_ms: int
) -> tuple[AgentState, list[tuple[str, int]]]:
    """Each configured check whose ``lastRun`` (from the state, else the config) is after
    ``now_ms`` gets ``now_ms`` instead; the state, and (check, old lastRun) per change."""
    moved: list[tuple[str, int]] = []
    checks = dict(state.checks)
    for name, check in config.checks.items():
        current = state.check(name, check.last_run)
        if current.last_run is not None and current.last_run > now_ms:
            moved.append((name, current.last_run))
            checks[name] = current.model_copy(update={"last_run": now_ms})
    if not moved:
        return state, moved
    return state.model_copy(update={"checks": checks}), moved
