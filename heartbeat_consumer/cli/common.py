"""What every command shares: exit codes, usage errors, the environment (with the
ecosystem's aliases), output, times and durations, handler loading."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any, TextIO

import orjson

from ..core.timeutil import format_duration, parse_duration_ms, parse_instant_ms
from ..handlers.registry import (
    handler_names,
    load_entry_points,
    load_plugins,
    plugin_modules_from_env,
    set_default_handler,
)
from ..ops.logs import first_line
from ..runtime.engine import wall_clock_ms
from ..runtime.store import default_state_path

EXIT_OK, EXIT_INVALID, EXIT_USAGE, EXIT_RUN_FAILED = 0, 1, 2, 3


MAX_SIMULATED_TICKS = 2_000_000


"""``simulate`` evaluates every tick: about two years of one-minute ticks, a few minutes."""


MIN_LOOP_MS = 100


"""``--rescan`` and ``--check-every`` below this would spin a core for nothing."""


ENV_HELP = (
    "heartbeat-consumer: to run the RabbitMQ consumer without a command, set AGENT_NAME and "
    "HEARTBEAT_PATH (and RABBIT_URL, EXCHANGE_NAME if not the defaults), or use "
    "'heartbeat-consumer run FILE'. Without a broker: 'run --local FILE' or 'run-once FILE'. "
    "See heartbeat-consumer --help."
)


class UsageError(Exception):
    pass


ENV_ALIASES = {
    "RABBIT_URL": "RABBITMQ_URL",
    "EXCHANGE_NAME": "BLOODBANK_EXCHANGE",
    "HEARTBEAT_PATH": "HEARTBEAT_JSON",
    "FLEET_DIR": "AGENT_CONFIGS",
}


"""Our environment variable -> the name Bloodbank's heartbeat_tick uses for it: a
container configured for that ecosystem works as it is. Ours wins when both are set."""


_env_conflicts: set[str] = set()


def env(name: str, default: str | None = None) -> str | None:
    """``name`` from the environment, else its ecosystem alias (see ENV_ALIASES), else
    ``default``. When both are set and differ, ours is used and a warning says so."""
    ours = os.environ.get(name)
    alias = ENV_ALIASES.get(name)
    theirs = os.environ.get(alias) if alias else None
    if ours is not None and theirs is not None and ours != theirs:
        _env_conflicts.add(name)
    if ours is not None:
        return ours
    return theirs if theirs is not None else default


def _warn_env_conflicts() -> None:
    for name in sorted(_env_conflicts):
        logging.getLogger("heartbeat_consumer").warning(
            "both %s and %s are set; using %s", name, ENV_ALIASES[name], name
        )


class MissingFile(Exception):
    """The heartbeat.json named on the command line is not there (exit 1)."""


def _require_file(path: str) -> None:
    """``run`` and ``status`` on a file that is not there say so and exit 1."""
    target = Path(path)
    if not target.exists():
        raise MissingFile(f"{path}: no such file (the agent's heartbeat.json)")
    if not target.is_file():
        raise MissingFile(f"{path}: not a regular file (the agent's heartbeat.json)")


def _out(line: str = "", stream: TextIO | None = None) -> None:
    print(line, file=stream or sys.stdout, flush=True)


def _json_line(data: dict[str, Any]) -> None:
    sys.stdout.write(orjson.dumps(data).decode() + "\n")
    sys.stdout.flush()


def _instant(text: str) -> int:
    if text == "now":
        return wall_clock_ms()
    try:
        return parse_instant_ms(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _duration(text: str, *, minimum: int = 1) -> int:
    try:
        value = parse_duration_ms(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if value < minimum:
        raise UsageError(f"{text!r} is too short here: at least {format_duration(minimum)}")
    return value


def _load_handlers(args: argparse.Namespace) -> None:
    """Entry-point plugins, then --handlers and HEARTBEAT_HANDLERS modules.

    The built-ins are registered by importing the package."""
    load_entry_points()
    load_plugins([*(args.handlers or []), *plugin_modules_from_env()])
    default = getattr(args, "default_handler", None) or None
    if default is not None and default not in handler_names():
        raise UsageError(
            f"--default-handler {default!r} is not a registered handler "
            f"(registered: {', '.join(sorted(handler_names()))})"
        )
    set_default_handler(default)


def _state_path(args: argparse.Namespace) -> Path:
    chosen = args.state or os.environ.get("HEARTBEAT_STATE_PATH")
    return Path(chosen) if chosen else default_state_path(args.file)


def port(text: str) -> int:
    """An argparse type: a TCP port, 0 (any free one) to 65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} is not within 0-65535")
    return value


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _declare_from_environment() -> bool:
    values = (os.environ.get("DECLARE"), os.environ.get("DECLARE_EXCHANGES"))
    return not any(v is not None and v.lower() in FALSE_WORDS for v in values)


FALSE_WORDS = frozenset({"0", "false", "no", "off"})


def _os_error(exc: OSError) -> str:
    """``cannot write /x/a.yaml: No such file or directory``, not a broker's name."""
    why = exc.strerror or first_line(exc)
    if exc.filename is not None:
        return f"{exc.filename}: {why}"
    return why


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's final flush of a closed pipe
    prints nothing."""
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
