"""``main``: parse, set up logging, run the command, turn expected errors into one
line and an exit code."""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Sequence

from ..core.topology import DEFAULT_URL, InvalidName, InvalidUrl, mask_url
from ..handlers.registry import HandlerError
from ..ops.logs import LOG_FORMATS, first_line, setup_logging
from ..runtime.store import AgentBusy, StateError
from .common import (
    EXIT_INVALID,
    EXIT_OK,
    EXIT_USAGE,
    MissingFile,
    UsageError,
    _load_handlers,
    _os_error,
    _out,
    _quiet_stdout,
    _warn_env_conflicts,
    env,
)
from .parser import build_parser

__all__ = ["main"]

EXPECTED: tuple[type[Exception], ...] = (HandlerError, StateError, AgentBusy, MissingFile)
"""Errors that are one line and exit 1, from the layers every command loads."""
EXPECTED_IN = {
    "heartbeat_consumer.bus.connection": ("BrokerError", "TlsError"),
    "heartbeat_consumer.bus.provision": ("TopologyError",),
    "heartbeat_consumer.bus.fleet": ("FleetError",),
    "heartbeat_consumer.ops.http": ("ServeError",),
}
"""The same, from modules only the bus commands load: looked up only once loaded, so
that a broker-free command never imports them."""


def _expected() -> tuple[type[Exception], ...]:
    found = list(EXPECTED)
    for module, names in EXPECTED_IN.items():
        loaded = sys.modules.get(module)
        found += [getattr(loaded, name) for name in names if hasattr(loaded, name)]
    return tuple(found)


def _amqp_error(exc: Exception) -> bool:
    """A broker error after connecting (a channel closed, a declaration refused)."""
    amqp = sys.modules.get("aiormq.exceptions")
    return amqp is not None and isinstance(exc, amqp.AMQPError)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = str(args.log_level).upper()
    if level not in logging.getLevelNamesMapping():
        parser.error(f"unknown log level {args.log_level!r} (use DEBUG, INFO, WARNING or ERROR)")
    if args.log_format not in LOG_FORMATS:
        parser.error(f"unknown log format {args.log_format!r} (use text or json)")
    setup_logging(level, args.log_format)
    _warn_env_conflicts()
    name = f"heartbeat-consumer {args.command}" if args.command else "heartbeat-consumer"
    try:
        if args.command is None:
            bus = importlib.import_module(".bus", __package__)
            code: int = bus.run_from_environment(parser)
            return code
        if args.handlers_used:
            _load_handlers(args)
        result: int = args.func(args)
        return result
    except (UsageError, InvalidName, InvalidUrl) as exc:
        _out(f"{name}: {exc}", sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `| head`: the reader has gone; nothing more to say
        _quiet_stdout()
        return EXIT_OK
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if _amqp_error(exc):
            url = getattr(args, "rabbit_url", None) or env("RABBIT_URL", DEFAULT_URL)
            _out(
                f"{name}: RabbitMQ at {mask_url(url or DEFAULT_URL)}: {first_line(exc)}", sys.stderr
            )
            return EXIT_INVALID
        if isinstance(exc, OSError):  # a file, a directory, a port: named as what it is
            _out(f"{name}: {_os_error(exc)}", sys.stderr)
            return EXIT_INVALID
        if isinstance(exc, _expected()):
            _out(f"{name}: {exc}", sys.stderr)
            return EXIT_INVALID
        raise
