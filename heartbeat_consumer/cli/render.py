"""How the commands print: problems, plans, results and answers."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any

from ..core.config import (
    HeartbeatConfig,
    LoadedConfig,
    Problem,
)
from ..core.envelope import event_kind
from ..core.schedule import Evaluation
from ..core.timeutil import iso
from ..handlers.registry import (
    default_handler,
)
from ..runtime.engine import RunResult
from .common import _json_line, _out, _quiet_stdout


def _print_problems(source: str, problems: Sequence[Problem]) -> None:
    _out(f"{source}: {len(problems)} problem(s)", sys.stderr)
    for problem in problems:
        _out(f"  {problem}", sys.stderr)


def _format(loaded: LoadedConfig) -> str:
    if loaded.format == "bloodbank":
        return "format bloodbank (heartbeat_tick's array of checks)"
    return f"format {loaded.format}"


def _default_of(config: HeartbeatConfig) -> str:
    return repr(config.default_handler or default_handler())


def _ratio(value: float) -> str:
    if math.isnan(value):
        return "-"
    if math.isinf(value):
        return "inf"
    return f"{value:.2f}" if abs(value) < 1000 else f"{value:.2g}"


def _evaluation_json(ev: Evaluation, selected: bool) -> dict[str, Any]:
    return {
        "check": ev.check,
        "handler": ev.handler,
        "priority": ev.priority,
        "due": ev.due,
        "runs_now": selected,
        "overdue_ratio": None if math.isinf(ev.ratio) or math.isnan(ev.ratio) else ev.ratio,
        "last_run": iso(ev.last_run) if ev.last_run is not None else None,
        "next_due": iso(ev.next_due) if ev.next_due is not None else None,
        "reasons": [text for _, text in ev.blockers],
    }


async def _emit(result: RunResult) -> None:
    """Print a run's result; a reader that has gone (``| head``) does not stop the
    state from being saved."""
    try:
        _json_line(result.to_payload())
    except BrokenPipeError:
        _quiet_stdout()


def _print_event(event: dict[str, Any]) -> None:
    """One line per event correlated with a command (``run-check``, ``tick --agent``),
    by its kind (its event_type is its routing key, or the word older consumers send)."""
    raw = event.get("payload")
    payload: dict[str, Any] = raw if isinstance(raw, dict) else {}
    kind = event_kind(event.get("event_type"))
    if kind == "started":
        _out(f"started {payload.get('check')} ({payload.get('idempotency_key')})")
    elif kind == "result":
        error = f": {payload.get('error')}" if payload.get("error") else ""
        _out(f"{payload.get('check')}: {payload.get('status')}{error}")
    elif kind == "status":
        detail = payload.get("reason") or payload.get("error") or ""
        _out(f"status {payload.get('status')}{f': {detail}' if detail else ''}")
