"""State that follows the bus (pure): the event an agent's active replica publishes for
every change of its state, and how a standby applies it to its own.

- kind ``run``, inside the run's result event ``heartbeat.<agent>.<check>.<status>`` as
  its ``state_change`` (one message: the result and the change are confirmed together
  or not at all): the check's whole state after the run (lastRun, backoff, alert
  fingerprints, counters), the run's history entry, and the run commands that asked
  for it (their ids: a redelivered one is not run again);
- ``heartbeat.<agent>._state._pauses``, kind ``pauses``: every run-time pause, after a
  pause or resume;
- ``heartbeat.<agent>._state._sync``, kind ``sync``: a replica that starts asks the
  others for the whole state;
- ``heartbeat.<agent>._state._snapshot``, kind ``snapshot``: the whole state, their
  answer.

Each is applied only where it is newer than what it names: a check's state by when
its last run finished (then by its ``runs``), the pauses by ``pausesVersion`` (the
time of their change), a snapshot check by check. So applying one twice, late, or
after a newer one, whoever published it, changes nothing; and a replica that comes
back with an old state (a restored backup, a state directory lost) cannot undo what
the others did meanwhile, whatever its counters say. (Instants from different hosts:
their clocks should agree to well within a check's cadence.) The ``origin`` is the
publishing process: a replica skips its own sync requests and snapshots.
"""

from __future__ import annotations

from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .config import Pause
from .state import (
    HISTORY_LIMIT,
    MAX_PAUSES,
    STATUSES,
    AgentState,
    CheckState,
    HistoryEntry,
    repair_ranges,
)
from .topology import check_name

__all__ = [
    "MAX_EVENT_BYTES",
    "PAUSES",
    "SNAPSHOT",
    "STATE_WORD",
    "SYNC",
    "StateChange",
    "StateEventError",
    "apply_change",
    "newer",
    "parse_state_event",
    "pauses_change",
    "run_change",
    "snapshot_change",
    "sync_request",
]

STATE_WORD = "_state"
PAUSES = "_pauses"
SNAPSHOT = "_snapshot"
SYNC = "_sync"
MAX_EVENT_BYTES = 16 * 1024 * 1024
"""As large as a state file may be (a snapshot carries one)."""
MAX_REQUESTS = 20


class StateEventError(ValueError):
    """A state event that cannot be applied (the text says why, in one line)."""


class StateChange(BaseModel):
    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="ignore")

    kind: Literal["run", "pauses", "snapshot", "sync"]
    check: str | None = None
    state: CheckState | None = None
    entry: HistoryEntry | None = None
    pauses: dict[str, Pause] | None = None
    version: int | None = None
    """Of the pauses: the state's ``pausesVersion`` with them."""
    snapshot: AgentState | None = None
    requests: tuple[str, ...] = Field(default=(), max_length=MAX_REQUESTS)

    @property
    def word(self) -> str:
        """The last word of its routing key."""
        if self.kind == "run" and self.check is not None:
            return self.check
        return {"pauses": PAUSES, "snapshot": SNAPSHOT}.get(self.kind, SYNC)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def run_change(after: AgentState, check: str, requests: tuple[str, ...] = ()) -> StateChange:
    """The change a run of ``check`` made: ``after`` is the state the run left."""
    entry = after.history[-1] if after.history and after.history[-1].check == check else None
    return StateChange(
        kind="run",
        check=check,
        state=after.checks[check],
        entry=entry,
        requests=requests[:MAX_REQUESTS],
    )


def pauses_change(pauses: dict[str, Pause], version: int) -> StateChange:
    return StateChange(kind="pauses", pauses=pauses, version=version)


def snapshot_change(state: AgentState) -> StateChange:
    return StateChange(kind="snapshot", snapshot=state)


def sync_request() -> StateChange:
    return StateChange(kind="sync")


def parse_state_event(
    body: bytes, agent: str, routing_key: str | None = None
) -> tuple[str, StateChange] | None:
    """The origin and change of a state event for ``agent``: an envelope whose payload
    is ``{"agent", "origin", **change}``, or a result whose payload carries that as
    ``state_change``. None for an event that carries no change (a result of a consumer
    that is not a replica, an alert) and for one whose ``routing_key`` is not one of the
    agent's (a copy another user put in our queue with a ``CC`` header: topic
    permissions check the routing key only); :class:`StateEventError` for one that
    cannot be used."""
    key = (routing_key or "").split(".")
    if routing_key is not None and not _from_agent(key, agent):
        return None
    if len(body) > MAX_EVENT_BYTES:
        raise StateEventError(f"state event of {len(body)} bytes, at most {MAX_EVENT_BYTES}")
    try:
        event = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise StateEventError(f"state event is not JSON: {exc}") from None
    payload = event.get("payload") if isinstance(event, dict) else None
    if not isinstance(payload, dict):
        raise StateEventError("state event without a payload object")
    if "state_change" in payload:
        payload = payload["state_change"]
        if not isinstance(payload, dict):
            raise StateEventError("state_change is not an object")
    elif "origin" not in payload:
        return None
    if payload.get("agent") != agent:
        raise StateEventError(f"state event for agent {payload.get('agent')!r}, not {agent!r}")
    origin = payload.get("origin")
    if not isinstance(origin, str) or not 0 < len(origin) <= 200:
        raise StateEventError("state event without an origin")
    _check_sizes(payload)
    try:
        change = StateChange.model_validate(payload, strict=False)
    except (ValidationError, ValueError) as exc:
        first = str(exc).splitlines()
        raise StateEventError(f"invalid state event: {' '.join(first[:3])}") from None
    if change.kind == "run":
        if change.check is None or change.state is None:
            raise StateEventError("run state event without its check and state")
        if routing_key is not None and key[2] not in (STATE_WORD, change.check):
            raise StateEventError(f"a change of check {change.check!r} in a result of {key[2]}")
        try:
            check_name(change.check, "check name")
        except ValueError as exc:
            raise StateEventError(str(exc)) from None
    if change.kind == "pauses" and change.pauses is None:
        raise StateEventError("pauses state event without its pauses")
    if change.kind == "snapshot" and change.snapshot is None:
        raise StateEventError("snapshot state event without its state")
    return origin, change


def _order(check: CheckState) -> tuple[int, int]:
    return (check.last_finished if check.last_finished is not None else -1, check.runs)


def newer(theirs: CheckState, ours: CheckState | None) -> bool:
    """True when ``theirs`` is a later state of the check than ``ours``: its last run
    finished later (or as late, with more runs)."""
    return ours is None or _order(theirs) > _order(ours)


def _from_agent(key: list[str], agent: str) -> bool:
    """A routing key only the agent may publish under: its results (not an alert, the
    monitor's word) and its state events."""
    ours = len(key) == 4 and key[0] == "heartbeat" and key[1] == agent
    result = ours and not key[2].startswith("_") and key[3] in STATUSES
    return result or (ours and key[2] == STATE_WORD)


def _check_sizes(payload: dict[str, Any]) -> None:
    pauses, snapshot = payload.get("pauses"), payload.get("snapshot")
    if isinstance(pauses, dict) and len(pauses) > MAX_PAUSES:
        raise StateEventError(f"state event with {len(pauses)} pauses, at most {MAX_PAUSES}")
    if isinstance(snapshot, dict):
        history, pauses = snapshot.get("history"), snapshot.get("pauses")
        if isinstance(history, list) and len(history) > HISTORY_LIMIT:
            raise StateEventError(f"snapshot with more than {HISTORY_LIMIT} history entries")
        if isinstance(pauses, dict) and len(pauses) > MAX_PAUSES:
            raise StateEventError(f"snapshot with more than {MAX_PAUSES} pauses")


def apply_change(state: AgentState, change: StateChange) -> AgentState:
    """``state`` after ``change``, where it is newer (see above); values out of range are
    repaired as in a state file."""
    if change.kind == "snapshot" and change.snapshot is not None:
        after = _merged(state, repair_ranges(change.snapshot)[0])
    elif change.kind == "pauses" and change.pauses is not None:
        version = change.version if change.version is not None else state.pauses_version + 1
        if version <= state.pauses_version:
            return state
        after = state.model_copy(update={"pauses": dict(change.pauses), "pauses_version": version})
    elif change.kind == "run" and change.check is not None and change.state is not None:
        if not newer(change.state, state.checks.get(change.check)):
            return state
        history = state.history
        if change.entry is not None and change.entry not in history:
            history = (*history, change.entry)[-HISTORY_LIMIT:]
        checks = {**state.checks, change.check: change.state}
        after = state.model_copy(update={"checks": checks, "history": history})
    else:
        return state
    return repair_ranges(after)[0]


def _merged(ours: AgentState, theirs: AgentState) -> AgentState:
    """A snapshot merged into our state: each check's newer state, the newer pauses, the
    history of both (by slot)."""
    checks = dict(ours.checks)
    for name, check in theirs.checks.items():
        if newer(check, checks.get(name)):
            checks[name] = check
    pauses, version = ours.pauses, ours.pauses_version
    if theirs.pauses_version > version:
        pauses, version = theirs.pauses, theirs.pauses_version
    known = set(ours.history)
    extra = [entry for entry in theirs.history if entry not in known]
    history = tuple(sorted((*ours.history, *extra), key=lambda e: e.slot))[-HISTORY_LIMIT:]
    return ours.model_copy(
        update={"checks": checks, "pauses": pauses, "pauses_version": version, "history": history}
    )
