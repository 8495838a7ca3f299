"""The fleet monitor's rules, pure: what the bus told us, and which alerts that makes.

A dead-man's switch per agent: nothing is wrong until something that should have
happened did not. Three kinds of incident, each keyed by (agent, kind, check):

- ``stale``: no event at all (result or status) from an agent for longer than its stale
  threshold (default 5 min). A warning. An agent that said ``offline`` is not stale:
  it stopped on purpose.
- ``timeout``: a run was announced (``started``) and no result came within its timeout
  plus a grace. An error.
- ``missed``: a check's last success is older than its cadence plus a grace. An error.

:func:`evaluate` opens an incident (one alert), keeps it open without re-sending (unless
``repeat_ms`` asks for reminders) and resolves it when the condition clears (one
``resolved``). The whole :class:`WatchState` is serialisable, so a restarted monitor
neither forgets open incidents nor sends them again. No clock reads, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "Alert",
    "AgentView",
    "CheckView",
    "Incident",
    "WatchConfig",
    "WatchState",
    "evaluate",
    "observe",
]

Kind = Literal["stale", "timeout", "missed"]
Severity = Literal["warning", "error"]
SEVERITY: dict[str, Severity] = {"stale": "warning", "timeout": "error", "missed": "error"}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False)


class WatchConfig(_Model):
    stale_ms: int = Field(default=300_000, gt=0)
    stale_ms_by_agent: dict[str, int] = Field(default_factory=dict)
    """Per-agent stale thresholds, overriding ``stale_ms``."""
    timeout_grace_ms: int = Field(default=30_000, ge=0)
    missed_grace_ms: int = Field(default=120_000, ge=0)
    """Two one-minute ticks: a check may run on the tick after it became due."""
    repeat_ms: int | None = Field(default=None, gt=0)
    """Re-send an open incident's alert this often; None sends it once."""

    def stale_for(self, agent: str) -> int:
        return self.stale_ms_by_agent.get(agent, self.stale_ms)


class CheckView(_Model):
    first_seen_at: int | None = None
    last_status: str | None = None
    last_result_at: int | None = None
    last_success_at: int | None = None
    cadence_ms: int | None = None
    """Learnt from the check's events; without it, ``missed`` cannot be judged."""
    running_key: str | None = None
    """Idempotency key of a run announced and not finished."""
    started_at: int | None = None
    timeout_ms: int | None = None


class AgentView(_Model):
    online: bool = False
    last_seen: int | None = None
    checks: dict[str, CheckView] = Field(default_factory=dict)


class Incident(_Model):
    agent: str
    kind: Kind
    check: str | None = None
    opened_at: int
    last_sent_at: int
    detail: str


class WatchState(_Model):
    version: Literal[1] = 1
    agents: dict[str, AgentView] = Field(default_factory=dict)
    incidents: dict[str, Incident] = Field(default_factory=dict)
    """Open incidents by :func:`incident_id`."""


@dataclass(frozen=True)
class Alert:
    """An event to publish as ``heartbeat.<agent>._alert.<kind>`` (``resolved`` too)."""

    agent: str
    kind: str
    """``stale``, ``timeout``, ``missed`` or ``resolved``."""
    check: str | None
    severity: Severity | Literal["info"]
    detail: str
    incident: str
    opened_at: int
    repeat: bool = False

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


# --- what the bus told us ----------------------------------------------------------------


def observe(state: WatchState, event: dict[str, Any], at_ms: int) -> WatchState:
    """Fold one event (the ``payload`` of a status, started or result event, with
    ``event_type``) into the state. ``at_ms`` is when it was received."""
    payload = event.get("payload") or {}
    agent = str(payload.get("agent") or "")
    if not agent:
        return state
    view = state.agents.get(agent, AgentView()).model_copy(deep=True)
    view.last_seen = max(at_ms, view.last_seen or at_ms)
    kind = event.get("event_type")
    check_name = payload.get("check")
    if kind == "heartbeat.status":
        status = payload.get("status")
        if status in ("online", "offline"):
            view.online = status == "online"
    elif kind in ("heartbeat.started", "heartbeat.result") and isinstance(check_name, str):
        check = view.checks.get(check_name, CheckView(first_seen_at=at_ms))
        cadence = payload.get("cadence_ms")
        if isinstance(cadence, int) and cadence > 0:
            check.cadence_ms = cadence
        view.online = True
        if kind == "heartbeat.started":
            check.running_key = str(payload.get("idempotency_key") or "")
            check.started_at = at_ms
            timeout = payload.get("timeout_ms")
            check.timeout_ms = timeout if isinstance(timeout, int) and timeout > 0 else None
        else:
            status = payload.get("status")
            check.last_status = str(status)
            check.last_result_at = at_ms
            if status in ("success", "alert", "skipped"):
                check.last_success_at = at_ms
            if check.running_key in (None, "", payload.get("idempotency_key")):
                check.running_key, check.started_at = None, None
        view.checks[check_name] = check
    agents = {**state.agents, agent: view}
    return state.model_copy(update={"agents": agents})


# --- which alerts that makes ---------------------------------------------------------------


def _conditions(state: WatchState, config: WatchConfig, now: int) -> dict[str, Incident]:
    """Every incident whose condition holds at ``now`` (opened now, if new)."""
    found: dict[str, Incident] = {}

    def hold(agent: str, kind: Kind, check: str | None, detail: str) -> None:
        key = incident_id(agent, kind, check)
        found[key] = Incident(
            agent=agent, kind=kind, check=check, opened_at=now, last_sent_at=now, detail=detail
        )

    for agent, view in state.agents.items():
        stale_ms = config.stale_for(agent)
        if view.online and view.last_seen is not None and now - view.last_seen > stale_ms:
            hold(agent, "stale", None, f"no event for {(now - view.last_seen) // 1000} s")
        for name, check in view.checks.items():
            if check.started_at is not None and check.timeout_ms is not None:
                limit = check.timeout_ms + config.timeout_grace_ms
                if now - check.started_at > limit:
                    hold(
                        agent,
                        "timeout",
                        name,
                        f"started {(now - check.started_at) // 1000} s ago, "
                        f"timeout {check.timeout_ms // 1000} s",
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
                        f"{what} {(now - since) // 1000} s ago, "
                        f"cadence {check.cadence_ms // 1000} s",
                    )
    return found


def evaluate(state: WatchState, config: WatchConfig, now: int) -> tuple[WatchState, list[Alert]]:
    """Open, remind and resolve incidents at ``now``; the alerts to publish."""
    holding = _conditions(state, config, now)
    incidents: dict[str, Incident] = {}
    alerts: list[Alert] = []
    for key, fresh in holding.items():
        old = state.incidents.get(key)
        if old is None:
            incidents[key] = fresh
            alerts.append(_alert(fresh, key))
            continue
        due = config.repeat_ms is not None and now - old.last_sent_at >= config.repeat_ms
        kept = old.model_copy(
            update={"detail": fresh.detail, "last_sent_at": now if due else old.last_sent_at}
        )
        incidents[key] = kept
        if due:
            alerts.append(_alert(kept, key, repeat=True))
    for key, old in state.incidents.items():
        if key not in holding:
            alerts.append(
                Alert(
                    old.agent,
                    "resolved",
                    old.check,
                    "info",
                    f"{old.kind} resolved after {(now - old.opened_at) // 1000} s",
                    key,
                    old.opened_at,
                )
            )
    return state.model_copy(update={"incidents": incidents}), alerts


def _alert(incident: Incident, key: str, *, repeat: bool = False) -> Alert:
    return Alert(
        incident.agent,
        incident.kind,
        incident.check,
        SEVERITY[incident.kind],
        incident.detail,
        key,
        incident.opened_at,
        repeat,
    )
