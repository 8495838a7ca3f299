"""heartbeat.json (schema heartbeat.v1): typed models, validation and loading.

Validation runs in two layers, and every problem carries the JSON path it is about:

1. the JSON Schema in ``schemas/heartbeat.v1.json`` (the single source of truth);
2. what a schema cannot say: IANA time zones, ISO pause times.

A problem inside one check disables only that check (it lands in ``invalid_checks``);
a problem anywhere else makes the whole file unusable (:class:`ConfigError`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache, cached_property
from importlib import resources
from pathlib import Path
from typing import Any, Literal, cast
from zoneinfo import ZoneInfo

import orjson
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError
from pydantic import BaseModel, ConfigDict, Field

from .timeutil import MS_PER_MINUTE, parse_instant_ms, zone

__all__ = [
    "DEFAULT_PRIORITY",
    "MAX_TIMEOUT_MS",
    "CheckConfig",
    "ConfigError",
    "ConfigSource",
    "HeartbeatConfig",
    "LoadedConfig",
    "Pause",
    "Problem",
    "Window",
    "load_config",
    "parse_config",
    "schema",
]

DEFAULT_PRIORITY = 100
DEFAULT_TIMEOUT_CAP_MS = 5 * MS_PER_MINUTE
MAX_TIMEOUT_MS = 25 * MS_PER_MINUTE

Quarter = Literal["Q1", "Q2", "Q3", "Q4"]


@cache
def schema() -> dict[str, Any]:
    """The heartbeat.v1 JSON Schema as a dict."""
    text = resources.files("heartbeat_consumer").joinpath("schemas/heartbeat.v1.json").read_text()
    loaded: dict[str, Any] = json.loads(text)
    return loaded


@cache
def _validator() -> Draft202012Validator:
    return Draft202012Validator(schema())


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config, at a JSON path like ``$.checks.ping.cadenceMs``."""

    path: str
    message: str
    check: str | None = None

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class ConfigError(Exception):
    """The config file as a whole cannot be used."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = problems
        lines = "; ".join(str(p) for p in problems[:5])
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        super().__init__(f"{source}: {lines}{more}")


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, populate_by_name=True, strict=True, extra="forbid")


def _minute(hhmm: str) -> int:
    hours, minutes = hhmm.split(":")
    return int(hours) * 60 + int(minutes)


class Window(_Model):
    """Local time-of-day window; start inclusive, end minute inclusive, may cross midnight."""

    start: str
    end: str
    tz: str | None = None

    @cached_property
    def start_minute(self) -> int:
        return _minute(self.start)

    @cached_property
    def end_minute(self) -> int:
        """Last minute of day inside the window (24:00 -> 1439)."""
        return min(_minute(self.end), 24 * 60 - 1)


class Pause(_Model):
    """A pause: until an instant (epoch ms), or until resumed (None)."""

    until: int | None = None
    reason: str | None = None

    def active(self, now_ms: int) -> bool:
        return self.until is None or now_ms < self.until


class CheckConfig(_Model):
    """One check of heartbeat.json, as handlers receive it."""

    name: str
    cadence_ms: int = Field(alias="cadenceMs")
    handler: str
    priority: int = DEFAULT_PRIORITY
    enabled: bool = True
    window: Window | None = None
    trigger_on_quarters: tuple[Quarter, ...] | None = Field(default=None, alias="triggerOnQuarters")
    quarter_of: Literal["day", "year"] = Field(default="day", alias="quarterOf")
    timeout_ms: int | None = Field(default=None, alias="timeoutMs")
    meta: dict[str, Any] = Field(default_factory=dict)
    last_run: int | None = Field(default=None, alias="lastRun")
    description: str | None = None
    tz: str = "UTC"
    """Effective zone for windows and quarters: window.tz, else the agent's tz, else UTC."""

    @cached_property
    def zoneinfo(self) -> ZoneInfo:
        return zone(self.tz)

    @property
    def effective_timeout_ms(self) -> int:
        if self.timeout_ms is not None:
            return self.timeout_ms
        return min(self.cadence_ms, DEFAULT_TIMEOUT_CAP_MS)


class HeartbeatConfig(_Model):
    """A validated heartbeat.json; ``checks`` holds only the valid checks."""

    agent: str
    tz: str = "UTC"
    max_checks_per_tick: int = Field(default=1, alias="maxChecksPerTick")
    selection: Literal["priority", "overdue"] = "priority"
    checks: dict[str, CheckConfig] = Field(default_factory=dict)
    paused: dict[str, Pause] = Field(default_factory=dict)


@dataclass(frozen=True)
class LoadedConfig:
    """A usable config plus the checks that were disabled for being invalid."""

    config: HeartbeatConfig
    invalid_checks: Mapping[str, tuple[Problem, ...]] = field(default_factory=dict)

    @property
    def problems(self) -> list[Problem]:
        return [p for problems in self.invalid_checks.values() for p in problems]


def _json_path(parts: list[str | int] | tuple[str | int, ...]) -> str:
    """``$.checks.ping.cadenceMs``; names that are not identifiers go in brackets."""
    out = "$"
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.isidentifier():
            out += f".{part}"
        else:
            out += "[" + json.dumps(part) + "]"
    return out


def _describe(error: ValidationError) -> str:
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = set(cast(dict[str, Any], error.schema).get("properties", {}))
        extra = sorted(k for k in error.instance if k not in allowed)
        return (
            f"unknown field(s) {', '.join(map(repr, extra))}; allowed: {', '.join(sorted(allowed))}"
        )
    if "propertyNames" in error.schema_path:
        return (
            f"invalid name {error.instance!r}: use letters, digits, '_' or '-', "
            "starting with a letter or digit, at most 64 characters (no dots or wildcards)"
        )
    if error.validator == "pattern" and error.schema is schema()["$defs"]["name"]:
        return f"invalid name {error.instance!r}: must match {error.validator_value}"
    if error.validator == "anyOf" and isinstance(error.instance, str) and "end" in error.path:
        return f"{error.instance!r} is not a time HH:MM (00:00-23:59) or 24:00"
    if error.validator == "pattern" and "(^|/)heartbeat" in str(error.validator_value):
        return f"{error.instance!r} is not this schema: use 'heartbeat.v1'"
    if error.validator == "pattern" and str(error.validator_value).startswith("^([01]"):
        return f"{error.instance!r} is not a time HH:MM (00:00-23:59)"
    if error.validator == "type":
        return f"{error.instance!r} is not of type {error.validator_value!r}"
    return error.message


def _schema_problems(data: Any) -> list[Problem]:
    problems = []
    for error in sorted(_validator().iter_errors(data), key=lambda e: list(map(str, e.path))):
        path = list(error.path)
        check: str | None = None
        names = "propertyNames" in error.schema_path
        if names:
            path = [*path, str(error.instance)]
        if len(path) >= 2 and path[0] == "checks":
            check = str(path[1])
        problems.append(Problem(_json_path(path), _describe(error), check))
    return problems


def _semantic_problems(data: dict[str, Any]) -> list[Problem]:
    """What JSON Schema cannot check: time zones and pause times."""
    problems: list[Problem] = []
    agent_tz = data.get("tz")
    if isinstance(agent_tz, str):
        try:
            zone(agent_tz)
        except ValueError as exc:
            problems.append(Problem("$.tz", str(exc)))
    checks = data.get("checks")
    for name, check in checks.items() if isinstance(checks, dict) else []:
        window = check.get("window") if isinstance(check, dict) else None
        tz = window.get("tz") if isinstance(window, dict) else None
        if isinstance(tz, str):
            try:
                zone(tz)
            except ValueError as exc:
                path = _json_path(("checks", name, "window", "tz"))
                problems.append(Problem(path, str(exc), name))
    paused = data.get("paused")
    for name, pause in paused.items() if isinstance(paused, dict) else []:
        until = pause.get("until") if isinstance(pause, dict) else None
        if isinstance(until, str):
            try:
                parse_instant_ms(until)
            except ValueError as exc:
                check = None if name == "*" else name
                path = _json_path(("paused", name, "until"))
                problems.append(Problem(path, str(exc), check))
    return problems


def _build(data: dict[str, Any], invalid: set[str]) -> HeartbeatConfig:
    agent_tz = data.get("tz", "UTC")
    checks = {}
    for name, raw in data.get("checks", {}).items():
        if name in invalid:
            continue
        window = raw.get("window")
        tz = (window or {}).get("tz") or agent_tz
        quarters = raw.get("triggerOnQuarters")
        fields = {**raw, "name": name, "tz": tz}
        if quarters is not None:
            fields["triggerOnQuarters"] = tuple(quarters)
        if window is not None:
            fields["window"] = Window(**window)
        checks[name] = CheckConfig(**fields)
    paused = {
        name: Pause(
            until=None if p.get("until") is None else parse_instant_ms(p["until"]),
            reason=p.get("reason"),
        )
        for name, p in data.get("paused", {}).items()
        if name not in invalid
    }
    return HeartbeatConfig(
        agent=data["agent"],
        tz=agent_tz,
        max_checks_per_tick=data.get("maxChecksPerTick", 1),
        selection=data.get("selection", "priority"),
        checks=checks,
        paused=paused,
    )


def parse_config(text: str | bytes, *, source: str = "<config>") -> LoadedConfig:
    """Validate and build a config. Raises :class:`ConfigError` when it is unusable."""
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ConfigError(source, [Problem("$", f"invalid JSON: {exc}")]) from None
    if not isinstance(data, dict):
        raise ConfigError(source, [Problem("$", "the top level must be a JSON object")])
    problems = _schema_problems(data) + _semantic_problems(data)
    fatal = [p for p in problems if p.check is None]
    if fatal:
        raise ConfigError(source, problems)
    invalid: dict[str, list[Problem]] = {}
    for problem in problems:
        invalid.setdefault(problem.check or "", []).append(problem)
    config = _build(data, set(invalid))
    return LoadedConfig(config, {name: tuple(ps) for name, ps in invalid.items()})


def load_config(path: str | os.PathLike[str]) -> LoadedConfig:
    """Read and validate a heartbeat.json file. Raises :class:`ConfigError`."""
    try:
        text = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(str(path), [Problem("$", f"cannot read file: {exc.strerror}")]) from None
    return parse_config(text, source=str(path))


class ConfigSource:
    """A config file re-read only when it changed on disk, keeping the last good version.

    ``current()`` never raises: when the file is unusable it returns the last good
    config (None if there never was one) together with the error.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._signature: tuple[int, int, int, int] | None = None
        self._good: LoadedConfig | None = None
        self._error: ConfigError | None = None
        self.generation = 0
        """Incremented each time a new good config is loaded."""

    def _stat(self) -> tuple[int, int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)

    def current(self) -> tuple[LoadedConfig | None, ConfigError | None]:
        signature = self._stat()
        if signature is not None and signature == self._signature:
            return self._good, self._error
        self._signature = signature
        try:
            loaded = load_config(self.path)
        except ConfigError as exc:
            self._error = exc
        else:
            self._good, self._error = loaded, None
            self.generation += 1
        return self._good, self._error
