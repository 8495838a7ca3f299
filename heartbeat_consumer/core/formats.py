"""Config formats read as heartbeat.v1 (pure): unknown fields, and Bloodbank's array format.

Two shapes of heartbeat.json are accepted, told apart by ``checks``:

- **heartbeat.v1** (``checks`` is an object of name -> check): this project's schema.
- **bloodbank** (``checks`` is an array): the format of Bloodbank's ``heartbeat_tick``,
  ``{agent, version, checks: [{id, description, interval_minutes, action, enabled,
  prompt, event_type, command, conditions: {day_of_week, hour_range, quarters}}]}``. It
  is rewritten into heartbeat.v1 here, and from then on the two are one model:

  ==================================  ==============================================
  Bloodbank                           heartbeat.v1
  ==================================  ==============================================
  ``id``                              the check's name
  ``interval_minutes`` (default 15)   ``cadenceMs`` = minutes x 60000
  ``enabled``, ``description``        the same
  ``action: system_event`` (default)  ``handler: openclaw``, ``meta.prompt`` = prompt
  ``action: command``                 ``handler: command``, ``meta.argv`` =
                                      ``["/bin/sh", "-c", command]`` (upstream runs it
                                      with a shell too)
  ``action: publish``                 ``handler: publish``, ``meta.eventType`` =
                                      ``event_type`` or ``agent.<agent>.heartbeat.<id>``
  ``conditions.hour_range [a, b]``    ``window {start: "a:00", end: "b:59", tz: UTC}``
                                      (inclusive hours, ``a > b`` wraps midnight)
  ``conditions.day_of_week``          ``window.days`` (UTC)
  ``conditions.quarters``             ``triggerOnQuarters``, ``quarterOf: year`` (UTC)
  ==================================  ==============================================

  Upstream ignores an ``hour_range`` that is not two hours; here it is a problem of its
  check, as every invalid window is.

A field that neither format knows is a warning with its path and a did-you-mean, and is
dropped (upstream allows extra fields); ``strict`` makes these warnings problems.
"""

from __future__ import annotations

import difflib
import re
import reprlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from .problems import Problem, json_path
from .timeutil import MS_PER_MINUTE

__all__ = ["BLOODBANK", "DAYS", "V1", "Format", "Normalised", "day_index", "normalise"]

Format = Literal["heartbeat.v1", "bloodbank"]
V1: Format = "heartbeat.v1"
BLOODBANK: Format = "bloodbank"

DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}(?!\n)$")
_MAX_CADENCE_MINUTES = 5 * 366 * 24 * 60
_BLOODBANK_TOP = ("agent", "version", "checks")
_BLOODBANK_CHECK = (
    "id",
    "description",
    "interval_minutes",
    "action",
    "enabled",
    "prompt",
    "event_type",
    "command",
    "conditions",
)
_BLOODBANK_CONDITIONS = ("day_of_week", "hour_range", "quarters")
_V1_ONLY = ("$schema", "tz", "maxChecksPerTick", "selection", "paused", "defaultHandler")
"""Top-level fields that make a file heartbeat.v1 even when its ``checks`` is a list."""
MAX_WARNINGS = 100
_KEY_CHARS = 80
ACTIONS = {"system_event": "openclaw", "command": "command", "publish": "publish"}


def day_index(name: str) -> int | None:
    """0 (Monday) .. 6 for a day name (``Mon`` or ``Monday``, any case), else None."""
    lowered = name.lower()
    for index, day in enumerate(DAYS):
        if lowered in (day.lower(), day[:3].lower()):
            return index
    return None


@dataclass
class Normalised:
    """A config as a heartbeat.v1 object, with what was said about it on the way."""

    data: dict[str, Any]
    format: Format
    warnings: list[Problem] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    """Problems found while converting (each about one check)."""
    paths: dict[str, str] = field(default_factory=dict)
    """Check name -> its path in the file as written (``$.checks[2]``), where it differs."""

    def source_path(self, problem: Problem) -> Problem:
        """``problem`` with its path as the file has it."""
        where = self.paths.get(problem.check or "")
        if where is None or problem.check is None:
            return problem
        prefix = json_path(("checks", problem.check))
        if not problem.path.startswith(prefix):
            return problem
        return Problem(where + problem.path[len(prefix) :], problem.message, problem.check)


def _unknown(
    key: str, allowed: Iterable[str], parts: tuple[str | int, ...], check: str | None
) -> Problem:
    short = key if len(key) <= _KEY_CHARS else key[: _KEY_CHARS - 1] + "…"
    names = list(allowed)
    by_case = {name.lower(): name for name in names}
    guess = by_case.get(key.lower())
    if guess is None and len(key) <= _KEY_CHARS:
        guess = next(iter(difflib.get_close_matches(key, names, n=1, cutoff=0.6)), None)
    hint = f"; did you mean {guess!r}?" if guess else ""
    return Problem(json_path((*parts, short)), f"unknown field {short!r}{hint}", check)


def _strip(
    obj: dict[str, Any], allowed: Iterable[str], parts: tuple[str | int, ...], check: str | None
) -> tuple[dict[str, Any], list[Problem]]:
    known = tuple(allowed)
    kept = {k: v for k, v in obj.items() if k in known}
    extra = [k for k in obj if k not in known]
    warnings = [_unknown(k, known, parts, check) for k in extra[:MAX_WARNINGS]]
    if len(extra) > MAX_WARNINGS:
        where = json_path(parts)
        more = len(extra) - MAX_WARNINGS
        warnings.append(Problem(where, f"and {more} more unknown fields", check))
    return kept, warnings


def _props(schema: dict[str, Any], *where: str) -> tuple[str, ...]:
    node = schema
    for key in where:
        node = node[key]
    return tuple(node.get("properties", {}))


def _v1(data: dict[str, Any], schema: dict[str, Any]) -> Normalised:
    """heartbeat.v1 with fields it does not know dropped, each with a warning."""
    out, warnings = _strip(data, _props(schema), (), None)
    check_fields = _props(schema, "$defs", "check")
    window_fields = _props(schema, "$defs", "check", "properties", "window")
    pause_fields = _props(schema, "$defs", "pause")
    checks = out.get("checks")
    if isinstance(checks, dict):
        cleaned: dict[str, Any] = {}
        for name, given in checks.items():
            if not isinstance(given, dict):
                cleaned[name] = given
                continue
            check, found = _strip(given, check_fields, ("checks", name), name)
            warnings += found
            window = check.get("window")
            if isinstance(window, dict):
                parts = ("checks", name, "window")
                check["window"], found = _strip(window, window_fields, parts, name)
                warnings += found
            cleaned[name] = check
        out["checks"] = cleaned
    paused = out.get("paused")
    if isinstance(paused, dict):
        kept_pauses: dict[str, Any] = {}
        for name, pause in paused.items():
            kept_pauses[name] = pause
            if isinstance(pause, dict):
                about = None if name == "*" else name
                kept_pauses[name], found = _strip(pause, pause_fields, ("paused", name), about)
                warnings += found
        out["paused"] = kept_pauses
    return Normalised(out, V1, warnings)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class _Check:
    """One Bloodbank check being rewritten; ``problems`` say why it cannot be."""

    def __init__(self, index: int, raw: dict[str, Any], agent: str) -> None:
        self.index = index
        self.raw = raw
        self.agent = agent
        ident = raw.get("id")
        self.valid_id = isinstance(ident, str) and _NAME.fullmatch(ident) is not None
        self.name = ident if self.valid_id and isinstance(ident, str) else f"checks[{index}]"
        self.problems: list[Problem] = []
        self.warnings: list[Problem] = []

    def problem(self, key: str, message: str) -> None:
        """A problem at ``$.checks[i].<key>`` (``key`` may be dotted: ``conditions.x``)."""
        parts: tuple[str | int, ...] = ("checks", self.index, *key.split("."))
        self.problems.append(Problem(json_path(parts), message, self.name))

    def text(self, key: str) -> str:
        value = self.raw.get(key, "")
        if value is None:
            return ""
        if not isinstance(value, str):
            self.problem(key, f"{key} must be a string")
            return ""
        return value

    def convert(self) -> dict[str, Any]:
        raw = self.raw
        if not self.valid_id:
            self.problem(
                "id",
                f"id {reprlib.repr(raw.get('id'))} is not a check name: use letters, digits, "
                "'_' or '-', starting with a letter or digit, at most 64 characters",
            )
        out: dict[str, Any] = {}
        minutes = raw.get("interval_minutes", 15)
        if not _number(minutes) or not 0 < minutes <= _MAX_CADENCE_MINUTES:
            self.problem("interval_minutes", "interval_minutes must be a number of minutes > 0")
        else:
            out["cadenceMs"] = max(1, round(minutes * MS_PER_MINUTE))
        enabled = raw.get("enabled", True)
        if not isinstance(enabled, bool):
            self.problem("enabled", "enabled must be true or false")
        elif not enabled:
            out["enabled"] = False
        description = self.text("description")
        if description:
            out["description"] = description
        self._action(out, description)
        conditions = raw.get("conditions")
        if conditions is not None:
            self._conditions(out, conditions)
        return out

    def _action(self, out: dict[str, Any], description: str) -> None:
        action = self.raw.get("action", "system_event")
        handler = ACTIONS.get(action) if isinstance(action, str) else None
        if handler is None:
            shown = reprlib.repr(action)
            self.problem("action", f"action {shown} is not one of {', '.join(ACTIONS)}")
            return
        out["handler"] = handler
        prompt, command, event_type = (self.text(k) for k in ("prompt", "command", "event_type"))
        if action == "system_event" and prompt.strip():
            out["meta"] = {"prompt": prompt}
        elif action == "command":
            if not command.strip():
                self.problem("command", "action 'command' needs a non-empty command")
            out["meta"] = {"argv": ["/bin/sh", "-c", command]}
        elif action == "publish":
            out["meta"] = {"eventType": event_type or f"agent.{self.agent}.heartbeat.{self.name}"}

    def _conditions(self, out: dict[str, Any], conditions: Any) -> None:
        if not isinstance(conditions, dict):
            self.problem("conditions", "conditions must be an object")
            return
        parts = ("checks", self.index, "conditions")
        conditions, self.warnings = _strip(conditions, _BLOODBANK_CONDITIONS, parts, self.name)
        window: dict[str, Any] = {}
        days = _list_or_none(conditions.get("day_of_week"))
        indices = (
            [day_index(d) if isinstance(d, str) else None for d in days]
            if isinstance(days, list)
            else []
        )
        if not isinstance(days, list) or None in indices:
            self.problem(
                "conditions.day_of_week", "day_of_week must be a list of day names (Monday..Sunday)"
            )
        elif days:
            window["days"] = [DAYS[i] for i in sorted({i for i in indices if i is not None})]
        hours = _list_or_none(conditions.get("hour_range"))
        whole = [int(h) for h in hours if _hour(h)] if isinstance(hours, list) else []
        if not isinstance(hours, list) or (hours and (len(hours) != 2 or len(whole) != 2)):
            self.problem(
                "conditions.hour_range", "hour_range must be [first hour, last hour], each 0-23"
            )
        elif hours:
            window["start"], window["end"] = f"{whole[0]:02d}:00", f"{whole[1]:02d}:59"
        if window:
            out["window"] = {**window, "tz": "UTC"}
        quarters = _list_or_none(conditions.get("quarters"))
        valid = ("Q1", "Q2", "Q3", "Q4")
        if not isinstance(quarters, list) or not all(q in valid for q in quarters):
            self.problem("conditions.quarters", "quarters must be a list of Q1, Q2, Q3, Q4")
        elif quarters:
            out["triggerOnQuarters"] = sorted(set(quarters))
            out["quarterOf"] = "year"


def _list_or_none(value: Any) -> Any:
    """A condition as given; null (as upstream: no condition) is the empty list."""
    return [] if value is None else value


def _hour(value: Any) -> bool:
    """A whole hour of the day, 0..23 (``6.0`` counts, as integers do elsewhere)."""
    return _number(value) and float(value).is_integer() and 0 <= value <= 23


def _bloodbank(data: dict[str, Any]) -> Normalised:
    top, warnings = _strip(data, _BLOODBANK_TOP, (), None)
    agent = top.get("agent")
    version = top.get("version")
    problems: list[Problem] = []
    if version is not None and not isinstance(version, str):
        warnings.append(Problem("$.version", "version should be a string"))
    out: dict[str, Any] = {"checks": {}}
    if agent is not None:
        out["agent"] = agent
    paths: dict[str, str] = {}
    seen: dict[str, int] = {}
    for index, given in enumerate(data.get("checks") or []):
        if not isinstance(given, dict):
            where = json_path(("checks", index))
            problems.append(Problem(where, "a check must be an object", f"checks[{index}]"))
            continue
        raw, found = _strip(given, _BLOODBANK_CHECK, ("checks", index), None)
        check = _Check(index, raw, agent if isinstance(agent, str) else "")
        converted = check.convert()
        warnings += [Problem(w.path, w.message, check.name) for w in found] + check.warnings
        if check.name in seen:
            check.problem("id", f"duplicate id (also $.checks[{seen[check.name]}])")
            check.name = f"checks[{index}]"
            check.problems = [Problem(p.path, p.message, check.name) for p in check.problems]
        else:
            seen[check.name] = index
        paths[check.name] = json_path(("checks", index))
        problems += check.problems
        if not check.problems:
            out["checks"][check.name] = converted
    return Normalised(out, BLOODBANK, warnings, problems, paths)


def normalise(data: dict[str, Any], schema: dict[str, Any], *, strict: bool = False) -> Normalised:
    """``data`` (a JSON object) as heartbeat.v1. With ``strict``, unknown fields are
    problems (of their check, or of the whole file) instead of warnings."""
    array = isinstance(data.get("checks"), list) and not any(k in data for k in _V1_ONLY)
    result = _bloodbank(data) if array else _v1(data, schema)
    if strict:
        result.problems += result.warnings
        result.warnings = []
    return result
