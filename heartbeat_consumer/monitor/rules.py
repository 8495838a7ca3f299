"""The fleet monitor's rules, pure: what the bus told us, and which alerts that makes.

A dead-man's switch per agent: nothing is wrong until something that should have
happened did not, or the agent says it cannot work. Four kinds of incident, each keyed
by (agent, kind, check):

- ``stale``: no event at all (result or status) from an agent for longer than its stale
  threshold (default 5 min). A warning. An agent that said ``offline`` is not stale:
  it stopped on purpose.
- ``timeout``: a run was announced (``started``) and no result came within its timeout
  plus a grace. An error.
- ``missed``: a check's last success is older than its cadence plus a grace. An error.
- ``config_invalid``: the agent's last word about its heartbeat.json is that it is
  unusable (a ``config_invalid`` status, with the reason as the detail); from the first
  event the monitor hears of it, even if it never had a good config. An error: it runs
  nothing, or an outdated config, until someone fixes the file. It resolves when the
  agent shows a usable config (see :func:`_config_verdict`); ``online`` and ``offline``
  say nothing about the config and keep it open (stopping an agent does not fix its
  file; it is resolved when the agent is forgotten).

:func:`evaluate` opens an incident (one alert), keeps it open without re-sending (unless
``repeat_ms`` asks for reminders) and resolves it when the condition clears (one
``resolved``). The whole :class:`WatchState` is serialisable (:meth:`WatchState.to_json`),
so a restarted monitor neither forgets open incidents nor sends them again.

The views are small slotted dataclasses, not models: a monitor holds one per agent and
check of the fleet (see bench/bench_monitor_memory.py). No clock reads, no I/O.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from ..core.envelope import event_kind, event_type_fits
from ..core.state import FAILED_STATUSES, OK_STATUSES
from ..core.timeutil import MAX_DURATION_MS, format_duration, in_instant_range, instant_or_none
from ..core.topology import DISPATCH_WORD, NAME_PATTERN

__all__ = [
    "SEVERITY",
    "Alert",
    "AgentView",
    "CheckView",
    "Incident",
    "WatchConfig",
    "WatchState",
    "evaluate",
    "event_source",
    "incident_id",
    "next_due_at",
    "observe",
    "observe_agent",
    "repair",
]

Kind = Literal["stale", "timeout", "missed", "config_invalid"]
Severity = Literal["warning", "error"]
SEVERITY: dict[str, Severity] = {
    "stale": "warning",
    "timeout": "error",
    "missed": "error",
    "config_invalid": "error",
}
WATCHED_KINDS = frozenset({"status", "started", "result"})
"""What an agent says about itself (see :func:`~.envelope.event_kind`); anything else
(the monitor's own alerts) is not a sign of life."""
MAX_ERROR_CHARS = 200
MAX_KEY_CHARS = 300
NO_REASON = "heartbeat.json unusable (no reason given)"
_NAME = re.compile(NAME_PATTERN)
DROP_REASONS = (
    "unexpected_key",
    "kind_mismatch",
    "agent_mismatch",
    "check_mismatch",
    "status_mismatch",
    "too_many_agents",
    "too_many_checks",
)
"""Why the monitor drops an event it could read (a bounded metrics label)."""


class WatchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stale_ms: int = Field(default=600_000, gt=0)
    """Twice the consumers' default ``--alive-every`` (5 min): an idle agent is heard
    at least that often."""
    stale_ms_by_agent: dict[str, int] = Field(default_factory=dict)
    """Per-agent stale thresholds, overriding ``stale_ms``."""
    timeout_grace_ms: int = Field(default=30_000, ge=0)
    missed_grace_ms: int = Field(default=120_000, ge=0)
    """Two one-minute ticks: a check may run on the tick after it became due."""
    repeat_ms: int | None = Field(default=None, gt=0)
    """Re-send an open incident's alert this often; None sends it once."""
    forget_ms: int = Field(default=7 * 86_400_000, gt=0)
    """An agent offline (or silent) for this long is dropped from the view."""

    def stale_for(self, agent: str) -> int:
        return self.stale_ms_by_agent.get(agent, self.stale_ms)


@dataclass(frozen=True, slots=True)
class CheckView:
    first_seen_at: int | None = None
    last_status: str | None = None
    last_result_at: int | None = None
    last_success_at: int | None = None
    last_slot: int | None = None
    """The slot of the last success: the agent's lastRun for this check."""
    last_error: str | None = None
    failures: int = 0
    """Results in a row that were failed or timeout."""
    duration_ms: int | None = None
    cadence_ms: int | None = None
    """Learnt from the check's events; without it, ``missed`` cannot be judged."""
    running_key: str | None = None
    """Idempotency key of a run announced and not finished."""
    started_at: int | None = None
    timeout_ms: int | None = None
    last_key: str | None = None
    """Idempotency key of the last result: that run's ``started``, if it comes after it
    (the monitor handles deliveries concurrently), is not taken for a new run."""


@dataclass(frozen=True, slots=True)
class AgentView:
    online: bool = False
    last_seen: int | None = None
    status: str | None = None
    """The last status the agent announced (online, alive, config_invalid, offline)."""
    checks: dict[str, CheckView] = field(default_factory=dict)
    config_error: str | None = None
    """Why its heartbeat.json is unusable (its last ``config_invalid``, at most
    :data:`MAX_ERROR_CHARS`); None once it showed a usable config again."""
    config_invalid_at: int | None = None
    """When that ``config_invalid`` was announced."""
    ran_slot: int | None = None
    """While ``config_error`` is set: the slot of the first tick heard running checks
    since that ``config_invalid`` (see :func:`_config_verdict`)."""


@dataclass(frozen=True, slots=True)
class Incident:
    agent: str
    kind: Kind
    check: str | None
    opened_at: int
    last_sent_at: int
    detail: str


@dataclass(frozen=True, slots=True)
class WatchState:
    version: Literal[1] = 1
    agents: dict[str, AgentView] = field(default_factory=dict)
    incidents: dict[str, Incident] = field(default_factory=dict)
    """Open incidents by :func:`incident_id`."""

    def to_json(self) -> bytes:
        return _STATE.dump_json(self)

    @staticmethod
    def from_json(data: bytes | str) -> WatchState:
        """Raises ``pydantic.ValidationError`` on a file that is not a saved state."""
        return _STATE.validate_json(data)


_STATE: TypeAdapter[WatchState] = TypeAdapter(WatchState)


@dataclass(frozen=True)
class Alert:
    """An event to publish as ``heartbeat.<agent>._alert.<kind>`` (``resolved`` too)."""

    agent: str
    kind: str
    """``stale``, ``timeout``, ``missed``, ``config_invalid`` or ``resolved``."""
    check: str | None
    severity: Severity | Literal["info"]
    detail: str
    incident: str
    opened_at: int
    sent_at: int
    repeat: bool = False

    @property
    def key(self) -> str:
        """Unique per alert sent: the same alert published twice has the same key."""
        return f"{self.incident}:{self.kind}:{self.opened_at}:{self.sent_at}"

    def to_payload(self) -> dict[str, Any]:
        return {
            "agent": self.agent,
            "kind": self.kind,
            "check": self.check,
            "severity": self.severity,
            "detail": self.detail,
            "incident": self.incident,
            "opened_at": self.opened_at,
            "repeat": self.repeat,
        }


def incident_id(agent: str, kind: str, check: str | None) -> str:
    return f"{agent}:{kind}:{check or '*'}"


def next_due_at(check: CheckView) -> int | None:
    """When the check becomes due again, as far as the bus tells: its last successful
    slot plus its cadence (the agent's windows and retries may move it later)."""
    if check.last_slot is None or check.cadence_ms is None:
        return None
    return check.last_slot + check.cadence_ms


# --- what the bus told us ----------------------------------------------------------------


def observe(state: WatchState, event: dict[str, Any], at_ms: int) -> WatchState:
    """Fold one event (a status, started or result envelope) into the state. ``at_ms`` is
    when it happened (the envelope's timestamp, at most when it was received)."""
    folded = observe_agent(state.agents, event, at_ms)
    if folded is None:
        return state
    agent, view = folded
    return replace(state, agents={**state.agents, agent: view})


def event_source(routing_key: str, event: dict[str, Any]) -> tuple[str | None, str | None]:
    """Whose event this is, by its routing key: ``(agent, None)``; or ``(None, reason)``
    when it is to be dropped (a payload that claims another agent, check or status than
    its key, a key of another shape); ``(None, None)`` for keys that are not agent events.

    Topic permissions confine each agent's user to ``heartbeat.<agent>.*``, so the key is
    what the broker vouches for; the payload is only what the publisher says. The
    ``event_type`` must be the key (what consumers send), or the word they sent before
    for the key's kind (``heartbeat.status``, ``heartbeat.started``, ``heartbeat.result``)."""
    parts = routing_key.split(".")
    if len(parts) != 4 or parts[0] != "heartbeat" or not _NAME.fullmatch(parts[1]):
        return None, "unexpected_key"
    agent, second, word = parts[1], parts[2], parts[3]
    if second == "_status":
        started, check = False, None
    elif second.startswith("_"):
        return None, None  # another family of events (alerts, ...): not an agent's word
    elif word == DISPATCH_WORD:
        return None, None  # a handler's own event (``publish``), not a run's
    elif _NAME.fullmatch(second):
        started, check = word == "started", second
    else:
        return None, "unexpected_key"
    payload = event.get("payload") or {}
    if not event_type_fits(event.get("event_type"), routing_key):
        return None, "kind_mismatch"
    if payload.get("agent", agent) != agent:
        return None, "agent_mismatch"
    if check is not None and payload.get("check", check) != check:
        return None, "check_mismatch"
    if not started and payload.get("status", word) != word:
        return None, "status_mismatch"
    return agent, None


def observe_agent(
    agents: Mapping[str, AgentView],
    event: dict[str, Any],
    at_ms: int,
    agent: str | None = None,
) -> tuple[str, AgentView] | None:
    """The agent an event is about and its new view, or None when the event says nothing
    about an agent. :func:`observe` without copying the fleet: a monitor stores the view
    in its own mapping (O(1) per event however large the fleet). ``agent`` is whose
    event it is (see :func:`event_source`); without it, the payload's ``agent``."""
    payload = event.get("payload") or {}
    if agent is None:
        agent = payload.get("agent")
    kind = event_kind(event.get("event_type"))
    if not isinstance(agent, str) or not agent or kind not in WATCHED_KINDS:
        return None
    view = agents.get(agent) or AgentView()
    last_seen = max(at_ms, view.last_seen or at_ms)
    check_name = payload.get("check")
    if kind == "status":
        status = sys.intern(str(payload.get("status")))
        view = replace(
            view,
            last_seen=last_seen,
            status=status,
            online=status != "offline",
            **_config_verdict(view, kind, payload, at_ms),
        )
    elif isinstance(check_name, str) and check_name:
        name = sys.intern(check_name)
        check = _fold_check(view.checks.get(name), kind, payload, at_ms)
        view = replace(
            view,
            last_seen=last_seen,
            online=True,
            checks={**view.checks, name: check},
            **_config_verdict(view, kind, payload, at_ms),
        )
    else:
        view = replace(view, last_seen=last_seen)
    return sys.intern(agent), view


def _config_verdict(
    view: AgentView, kind: str, payload: dict[str, Any], at_ms: int
) -> dict[str, Any]:
    """What an event changes in the agent's word about its config.

    ``config_invalid`` (announced at the end of every tick while heartbeat.json is
    unusable) opens it; ``alive`` (announced only with a usable config) clears it. A run
    alone proves nothing: an agent keeps running its last good config, and announces
    ``config_invalid`` after that tick's runs. So a run counts only if its slot is later
    than the last ``config_invalid`` (not a result re-sent, not a manual run in the same
    minute); the first such slot is kept, and a run of a later slot still shows that
    tick ended without ``config_invalid``: the config was usable. Other statuses
    (``online``, ``offline``, ``state_error``...) say nothing about the config."""
    if kind == "status":
        status = payload.get("status")
        if status == "config_invalid":
            error = payload.get("error")
            reason = str(error)[:MAX_ERROR_CHARS] if error else NO_REASON
            return {"config_error": reason, "config_invalid_at": at_ms, "ran_slot": None}
        if status == "alive" and view.config_error is not None:
            return {"config_error": None, "config_invalid_at": None, "ran_slot": None}
        return {}
    slot = instant_or_none(payload.get("slot"))
    if view.config_error is None or slot is None:
        return {}
    if view.config_invalid_at is not None and slot <= view.config_invalid_at:
        return {}
    if view.ran_slot is None:
        return {"ran_slot": slot}
    if slot <= view.ran_slot:
        return {}
    return {"config_error": None, "config_invalid_at": None, "ran_slot": None}


def _fold_check(
    check: CheckView | None, kind: str, payload: dict[str, Any], at_ms: int
) -> CheckView:
    check = check or CheckView(first_seen_at=at_ms)
    cadence = _duration(payload.get("cadence_ms"))
    if cadence:
        check = replace(check, cadence_ms=cadence)
    key = str(payload.get("idempotency_key") or "")[:MAX_KEY_CHARS]
    if kind == "started":
        finished = check.last_result_at
        if key and key == check.last_key and finished is not None and at_ms <= finished:
            return check  # that run has finished already (a forced rerun starts later)
        return replace(
            check,
            running_key=key,
            started_at=at_ms,
            timeout_ms=_duration(payload.get("timeout_ms")) or None,
        )
    status = sys.intern(str(payload.get("status"))[:MAX_KEY_CHARS])
    error = payload.get("error")
    changes: dict[str, Any] = {
        "last_status": status,
        "last_result_at": at_ms,
        "last_error": str(error)[:MAX_ERROR_CHARS] if error else None,
        "duration_ms": _duration(payload.get("duration_ms"), minimum=0),
        "last_key": key or None,
    }
    changes["failures"] = check.failures + 1 if status in FAILED_STATUSES else 0
    if status in OK_STATUSES:  # the agent records the slot as lastRun: the check ran
        changes["last_success_at"] = at_ms
        changes["last_slot"] = instant_or_none(payload.get("slot")) or at_ms
    if check.running_key in (None, "", payload.get("idempotency_key")):
        changes["running_key"], changes["started_at"] = None, None
    return replace(check, **changes)


def _duration(value: object, *, minimum: int = 1) -> int | None:
    """An integer number of ms within ``minimum``..five years, else None."""
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if minimum <= value <= MAX_DURATION_MS else None


def _instant(value: int | None) -> int | None:
    return value if value is None or in_instant_range(value) else None


def repair(state: WatchState) -> tuple[WatchState, int]:
    """The state with every instant outside 1970..9999 and every duration outside its
    range dropped (incidents with such times are dropped whole); how many values went.
    For a state file written by another version or by hand: never a crash at start."""
    fixed = 0
    agents: dict[str, AgentView] = {}
    for name, view in state.agents.items():
        checks = {}
        for check_name, check in view.checks.items():
            changes: dict[str, Any] = {}
            for field_name in ("first_seen_at", "last_result_at", "last_success_at",
                               "last_slot", "started_at"):  # fmt: skip
                value = getattr(check, field_name)
                if _instant(value) != value:
                    changes[field_name] = None
            for field_name, minimum in (("cadence_ms", 1), ("timeout_ms", 1), ("duration_ms", 0)):
                value = getattr(check, field_name)
                if value is not None and _duration(value, minimum=minimum) is None:
                    changes[field_name] = None
            if not 0 <= check.failures <= 2**53:
                changes["failures"] = 0
            fixed += len(changes)
            checks[check_name] = replace(check, **changes) if changes else check
        last_seen = _instant(view.last_seen)
        fixed += last_seen != view.last_seen
        invalid_at, ran_slot = _instant(view.config_invalid_at), _instant(view.ran_slot)
        fixed += (invalid_at != view.config_invalid_at) + (ran_slot != view.ran_slot)
        config_error = view.config_error
        if config_error is not None and not 0 < len(config_error) <= MAX_ERROR_CHARS:
            config_error = config_error[:MAX_ERROR_CHARS] or NO_REASON
            fixed += 1
        agents[name] = replace(
            view,
            last_seen=last_seen,
            checks=checks,
            config_error=config_error,
            config_invalid_at=invalid_at,
            ran_slot=ran_slot,
        )
    incidents = {
        key: incident
        for key, incident in state.incidents.items()
        if in_instant_range(incident.opened_at) and in_instant_range(incident.last_sent_at)
    }
    fixed += len(state.incidents) - len(incidents)
    if not fixed:
        return state, 0
    return replace(state, agents=agents, incidents=incidents), fixed


# --- which alerts that makes ---------------------------------------------------------------


def _conditions(state: WatchState, config: WatchConfig, now: int) -> dict[str, Incident]:
    """Every incident whose condition holds at ``now`` (opened now, if new)."""
    found: dict[str, Incident] = {}

    def hold(agent: str, kind: Kind, check: str | None, detail: str) -> None:
        found[incident_id(agent, kind, check)] = Incident(agent, kind, check, now, now, detail)

    for agent, view in state.agents.items():
        if view.config_error is not None:  # online or not: stopping it fixes nothing
            hold(agent, "config_invalid", None, view.config_error)
        stale_ms = config.stale_for(agent)
        if view.online and view.last_seen is not None and now - view.last_seen > stale_ms:
            hold(agent, "stale", None, f"no event for {format_duration(now - view.last_seen)}")
        for name, check in view.checks.items():
            if check.started_at is not None and check.timeout_ms is not None:
                limit = check.timeout_ms + config.timeout_grace_ms
                if now - check.started_at > limit:
                    hold(
                        agent,
                        "timeout",
                        name,
                        f"started {format_duration(now - check.started_at)} ago, "
                        f"timeout {format_duration(check.timeout_ms)}",
                    )
            if view.online and check.cadence_ms is not None:
                since = check.last_success_at or check.first_seen_at
                if since is not None and now - since > check.cadence_ms + config.missed_grace_ms:
                    what = (
                        "last success" if check.last_success_at else "no success since first seen"
                    )
                    hold(
                        agent,
                        "missed",
                        name,
                        f"{what} {format_duration(now - since)} ago, "
                        f"cadence {format_duration(check.cadence_ms)}",
                    )
    return found


def evaluate(state: WatchState, config: WatchConfig, now: int) -> tuple[WatchState, list[Alert]]:
    """Open, remind and resolve incidents at ``now``; forget agents gone for
    ``forget_ms``; the alerts to publish."""
    agents = {
        name: view
        for name, view in state.agents.items()
        if view.last_seen is None or now - view.last_seen <= config.forget_ms
    }
    if len(agents) != len(state.agents):
        state = replace(state, agents=agents)
    holding = _conditions(state, config, now)
    incidents: dict[str, Incident] = {}
    alerts: list[Alert] = []
    for key, fresh in holding.items():
        old = state.incidents.get(key)
        if old is None:
            incidents[key] = fresh
            alerts.append(_alert(fresh, key, now))
            continue
        due = config.repeat_ms is not None and now - old.last_sent_at >= config.repeat_ms
        kept = replace(old, detail=fresh.detail, last_sent_at=now if due else old.last_sent_at)
        incidents[key] = kept
        if due:
            alerts.append(_alert(kept, key, now, repeat=True))
    for key, old in state.incidents.items():
        if key not in holding:
            detail = f"{old.kind} resolved after {format_duration(now - old.opened_at)}"
            alerts.append(
                Alert(old.agent, "resolved", old.check, "info", detail, key, old.opened_at, now)
            )
    if incidents == state.incidents:
        return state, alerts
    return replace(state, incidents=incidents), alerts


def _alert(incident: Incident, key: str, now: int, *, repeat: bool = False) -> Alert:
    return Alert(
        incident.agent,
        incident.kind,
        incident.check,
        SEVERITY[incident.kind],
        incident.detail,
        key,
        incident.opened_at,
        now,
        repeat,
    )
