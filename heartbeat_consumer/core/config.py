"""heartbeat.json (schema heartbeat.v1): typed models, validation and loading.

Validation runs in two layers, and every problem carries the JSON path it is about:

1. the JSON Schema in ``schemas/heartbeat.v1.json`` (the single source of truth);
2. what a schema cannot say: IANA time zones, ISO pause times and their range.

A problem inside one check disables only that check (it lands in ``invalid_checks``);
a problem anywhere else makes the whole file unusable (:class:`ConfigError`).

Integers: JSON Schema counts ``6000.0`` as the integer 6000, and so does this module
(the integer fields are normalised before the typed models see them); ``6000.5`` is a
problem with its path. Files: regular files of at most :data:`MAX_CONFIG_BYTES`, opened
without blocking (a FIFO or a device is a problem, never a hang).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
from collections.abc import Container, Mapping
from dataclasses import dataclass, field, replace
from functools import cache, cached_property
from importlib import resources
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo

import orjson
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError
from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as ModelError

from .formats import DAYS, V1, Format, Normalised, day_index, normalise
from .problems import Problem
from .problems import json_path as _json_path
from .timeutil import MS_PER_MINUTE, parse_instant_ms, zone

__all__ = [
    "DEFAULT_PRIORITY",
    "MAX_CONFIG_BYTES",
    "MAX_TIMEOUT_MS",
    "CheckConfig",
    "ConfigError",
    "ConfigSource",
    "Format",
    "HeartbeatConfig",
    "LoadedConfig",
    "Pause",
    "Problem",
    "Window",
    "load_config",
    "normalise_config",
    "parse_config",
    "read_bounded",
    "schema",
    "with_default_handler",
]

log = logging.getLogger("heartbeat_consumer.config")

DEFAULT_PRIORITY = 100
DEFAULT_TIMEOUT_CAP_MS = 5 * MS_PER_MINUTE
MAX_TIMEOUT_MS = 25 * MS_PER_MINUTE
MAX_CONFIG_BYTES = 4 * 1024 * 1024
"""A heartbeat.json larger than this is refused (10,000 checks take about 2 MB)."""
MAX_DEPTH = 64
"""Objects and arrays nested deeper than this are refused (``meta`` included)."""
_INTEGER_FIELDS = ("cadenceMs", "priority", "timeoutMs", "lastRun")

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
    """Local days and time of day; start inclusive, end minute inclusive, may cross
    midnight. Without start and end, the whole of each of ``days``."""

    start: str | None = None
    end: str | None = None
    tz: str | None = None
    days: frozenset[int] | None = None
    """Days of the week (0 = Monday) of the local moment; None: every day."""

    @cached_property
    def start_minute(self) -> int:
        return 0 if self.start is None else _minute(self.start)

    @cached_property
    def end_minute(self) -> int:
        """Last minute of day inside the window (24:00 -> 1439)."""
        return 24 * 60 - 1 if self.end is None else min(_minute(self.end), 24 * 60 - 1)

    def describe(self) -> str:
        """``Mon,Tue 09:00-17:00`` (days, then the time of day, each if set)."""
        days = ",".join(DAYS[d][:3] for d in sorted(self.days)) if self.days else ""
        times = f"{self.start}-{self.end}" if self.start is not None else ""
        return " ".join(part for part in (days, times) if part)


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
    declared_handler: str | None = None
    """The handler the file names, when it is not registered and ``handler`` is the
    file's (or the process's) default handler instead."""
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
    default_handler: str | None = Field(default=None, alias="defaultHandler")
    checks: dict[str, CheckConfig] = Field(default_factory=dict)
    paused: dict[str, Pause] = Field(default_factory=dict)


@dataclass(frozen=True)
class LoadedConfig:
    """A usable config plus the checks that were disabled for being invalid."""

    config: HeartbeatConfig
    invalid_checks: Mapping[str, tuple[Problem, ...]] = field(default_factory=dict)
    format: Format = V1
    """The format the file was written in (``heartbeat.v1`` or ``bloodbank``)."""
    warnings: tuple[Problem, ...] = ()
    """Fields that were not understood and were ignored."""

    @property
    def problems(self) -> list[Problem]:
        return [p for problems in self.invalid_checks.values() for p in problems]


def _describe(error: ValidationError) -> str:
    """One line for a schema error (unknown fields never reach the schema: formats.py
    takes them out first, as warnings, or as problems with ``strict``)."""
    if "propertyNames" in error.schema_path or (
        error.validator == "pattern" and error.schema is schema()["$defs"]["name"]
    ):
        return (
            f"invalid name {error.instance!r}: use letters, digits, '_' or '-', "
            "starting with a letter or digit, at most 64 characters (no dots or wildcards)"
        )
    if error.validator == "pattern" and "handler" in error.path:
        return f"invalid handler name {error.instance!r}"
    if error.validator == "anyOf" and isinstance(error.instance, str) and "end" in error.path:
        return f"{error.instance!r} is not a time HH:MM (00:00-23:59) or 24:00"
    if error.validator == "anyOf" and "until" in error.path:
        return (
            f"{error.instance!r} is not a pause end: epoch ms (1970 to 9999), "
            "an ISO 8601 time or null"
        )
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


def _integer(value: Any) -> Any:
    """A float without a fraction as the int it is (JSON Schema's view); else as it is."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


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
        for key in _INTEGER_FIELDS:
            if key in fields:
                fields[key] = _integer(fields[key])
        if quarters is not None:
            fields["triggerOnQuarters"] = tuple(quarters)
        if window is not None:
            days = window.get("days")
            fields["window"] = Window(
                **{
                    **window,
                    "days": None if days is None else frozenset(map(_day, days)),
                }
            )
        checks[name] = CheckConfig(**fields)
    paused = {
        name: Pause(
            until=None if p.get("until") is None else parse_instant_ms(_integer(p["until"])),
            reason=p.get("reason"),
        )
        for name, p in data.get("paused", {}).items()
        if name not in invalid
    }
    return HeartbeatConfig(
        agent=data["agent"],
        tz=agent_tz,
        max_checks_per_tick=_integer(data.get("maxChecksPerTick", 1)),
        selection=data.get("selection", "priority"),
        default_handler=data.get("defaultHandler"),
        checks=checks,
        paused=paused,
    )


def _day(name: str) -> int:
    index = day_index(name)
    if index is None:  # the schema lets only day names through
        raise ValueError(f"{name!r} is not a day of the week")
    return index


def normalise_config(
    text: str | bytes, *, source: str = "<config>", strict: bool = False
) -> tuple[Normalised, list[Problem]]:
    """The file as a heartbeat.v1 object (whichever format it is in), and every problem
    with it (paths as the file has them). Raises :class:`ConfigError` when it is not a
    JSON object."""
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ConfigError(source, [Problem("$", f"invalid JSON: {exc}")]) from None
    if not isinstance(data, dict):
        raise ConfigError(source, [Problem("$", "the top level must be a JSON object")])
    if _too_deep(data, MAX_DEPTH):
        raise ConfigError(source, [Problem("$", f"nested deeper than {MAX_DEPTH} levels")])
    try:
        normal = normalise(data, schema(), strict=strict)
        found = _schema_problems(normal.data) + _semantic_problems(normal.data)
    except (ValueError, TypeError, ArithmeticError, RecursionError) as exc:
        # Every shape should be a problem with a path; if one slips through, the file
        # is still refused in one line, never with a traceback.
        raise ConfigError(source, [Problem("$", f"cannot read this config: {exc}")]) from None
    problems = normal.problems + [normal.source_path(p) for p in found]
    return normal, problems


def _too_deep(data: Any, limit: int) -> bool:
    """Whether objects and arrays nest more than ``limit`` deep (iteratively)."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth > limit:
                return True
            children = value.values() if isinstance(value, dict) else value
            stack.extend((child, depth + 1) for child in children)
    return False


def parse_config(
    text: str | bytes, *, source: str = "<config>", strict: bool = False
) -> LoadedConfig:
    """Validate and build a config. Raises :class:`ConfigError` when it is unusable.

    Fields that are not understood are ignored with a warning (``LoadedConfig.warnings``);
    with ``strict`` they are problems."""
    normal, problems = normalise_config(text, source=source, strict=strict)
    data = normal.data
    fatal = [p for p in problems if p.check is None]
    if fatal:
        raise ConfigError(source, problems)
    invalid: dict[str, list[Problem]] = {}
    for problem in problems:
        invalid.setdefault(problem.check or "", []).append(problem)
    try:
        config = _build(data, set(invalid))
    except (ModelError, ValueError, TypeError) as exc:
        # The schema and the models should agree; if they ever do not, the file is
        # still refused with a path, never with a traceback.
        raise ConfigError(source, _model_problems(exc)) from None
    return LoadedConfig(
        config,
        {name: tuple(ps) for name, ps in invalid.items()},
        format=normal.format,
        warnings=tuple(normal.warnings),
    )


def with_default_handler(
    loaded: LoadedConfig, known: Container[str], fallback: str | None = None
) -> LoadedConfig:
    """``loaded`` with every check whose handler is not in ``known`` sent to the file's
    ``defaultHandler`` when it is known, else to ``fallback`` (a process-wide
    ``--default-handler``) when that one is; ``declared_handler`` keeps the name the
    file gave. Pure."""
    default = loaded.config.default_handler
    if default is None or default not in known:
        default = fallback
    if default is None or default not in known:
        return loaded
    moved = {
        name: check.model_copy(update={"handler": default, "declared_handler": check.handler})
        for name, check in loaded.config.checks.items()
        if check.handler not in known
    }
    if not moved:
        return loaded
    config = loaded.config.model_copy(update={"checks": {**loaded.config.checks, **moved}})
    return replace(loaded, config=config)


def _model_problems(exc: Exception) -> list[Problem]:
    if not isinstance(exc, ModelError):
        return [Problem("$", str(exc).splitlines()[0])]
    return [
        Problem(_json_path([p for p in e["loc"] if isinstance(p, str | int)]), e["msg"])
        for e in exc.errors()
    ]


def read_bounded(path: str | os.PathLike[str], limit: int) -> bytes:
    """The bytes of a regular file (symlinks followed) of at most ``limit`` bytes, opened
    without blocking (a FIFO is refused, not waited on). Raises ``OSError`` when it cannot
    be read and ``ValueError`` (with the reason) when it is not such a file."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"not a regular file ({_file_kind(info.st_mode)})")
        if info.st_size > limit:
            raise ValueError(f"file of {info.st_size} bytes is over the {limit} byte limit")
        chunks = []
        size = 0
        while chunk := os.read(fd, 1 << 20):
            size += len(chunk)
            if size > limit:
                raise ValueError(f"file is over the {limit} byte limit")
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


def _file_kind(mode: int) -> str:
    kinds = (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((text for test, text in kinds if test(mode)), "a special file")


def read_config_bytes(path: str | os.PathLike[str]) -> bytes:
    """:func:`read_bounded` with :data:`MAX_CONFIG_BYTES`; raises :class:`ConfigError`."""
    try:
        return read_bounded(path, MAX_CONFIG_BYTES)
    except OSError as exc:
        text = f"cannot read file: {exc.strerror or exc}"
    except ValueError as exc:
        text = f"{exc}; use a JSON file"
    raise ConfigError(str(path), [Problem("$", text)])


def load_config(path: str | os.PathLike[str], *, strict: bool = False) -> LoadedConfig:
    """Read and validate a heartbeat.json file. Raises :class:`ConfigError`."""
    return parse_config(read_config_bytes(path), source=str(path), strict=strict)


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
        if signature is None or signature != self._signature:
            self._adopt(signature, self._load())
        return self._good, self._error

    async def current_async(self) -> tuple[LoadedConfig | None, ConfigError | None]:
        """:meth:`current`, reading and validating a changed file in a worker thread, so
        that a slow disk or a big file does not stall the other agents of a fleet."""
        signature = self._stat()
        if signature is None or signature != self._signature:
            self._adopt(signature, await asyncio.to_thread(self._load))
        return self._good, self._error

    def _load(self) -> LoadedConfig | ConfigError:
        try:
            return load_config(self.path)
        except ConfigError as exc:
            return exc

    def _adopt(
        self, signature: tuple[int, int, int, int] | None, outcome: LoadedConfig | ConfigError
    ) -> None:
        self._signature = signature
        if isinstance(outcome, ConfigError):
            self._error = outcome
        else:
            self._good, self._error = outcome, None
            self.generation += 1
            for warning in outcome.warnings[:10]:
                log.warning("%s: %s (ignored)", self.path, warning)
            if len(outcome.warnings) > 10:
                log.warning("%s: and %d more unknown fields", self.path, len(outcome.warnings) - 10)
