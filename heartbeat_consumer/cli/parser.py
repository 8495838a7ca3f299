"""The argument parser: shared option groups and one sub-parser per command, each
with its function (``set_defaults(func=...)``)."""

from __future__ import annotations

import argparse
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..core.topology import (
    CONFIG_SUFFIX,
    DEFAULT_EXCHANGE,
    DEFAULT_MONITOR_QUEUE,
    DEFAULT_URL,
)
from ..core.version import __version__
from ..ops.logs import LOG_FORMATS
from . import local
from .common import _declare_from_environment, env, port, positive_int

Command = Callable[[argparse.Namespace], int]


def _bus(name: str) -> Command:
    """A command of :mod:`.bus`, imported when it runs (never for the other commands)."""

    def run(args: argparse.Namespace) -> int:
        code: int = getattr(importlib.import_module(".bus", __package__), name)(args)
        return code

    run.__name__ = name
    return run


Add = Callable[..., argparse.ArgumentParser]


def _group(*adders: Callable[[argparse.ArgumentParser], None]) -> argparse.ArgumentParser:
    """A parent parser holding one shared group of options."""
    group = argparse.ArgumentParser(add_help=False)
    for add in adders:
        add(group)
    return group


@dataclass(frozen=True)
class Groups:
    """The shared option groups, as parent parsers of the commands that take them."""

    file: argparse.ArgumentParser = field(default_factory=lambda: _group(file_argument))
    handlers: argparse.ArgumentParser = field(default_factory=lambda: _group(handlers_option))
    state: argparse.ArgumentParser = field(default_factory=lambda: _group(state_option))
    bus: argparse.ArgumentParser = field(default_factory=lambda: _group(bus_options))
    health: argparse.ArgumentParser = field(default_factory=lambda: _group(health_options))
    wait: argparse.ArgumentParser = field(default_factory=lambda: _group(wait_options))
    inbox: argparse.ArgumentParser = field(default_factory=lambda: _group(inbox_options))
    dead_letters: argparse.ArgumentParser = field(
        default_factory=lambda: _group(dead_letter_options)
    )
    alive: argparse.ArgumentParser = field(default_factory=lambda: _group(alive_option))
    replica: argparse.ArgumentParser = field(default_factory=lambda: _group(replica_option))

    @property
    def consumer(self) -> list[argparse.ArgumentParser]:
        """What a consumer takes (``run``, ``fleet``)."""
        return [self.alive, self.bus, self.health, self.inbox, self.replica, self.dead_letters]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="heartbeat-consumer",
        description="Run agents' periodic checks on time: locally, from cron, or from RabbitMQ.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("LOG_LEVEL", "INFO"),
        help="DEBUG, INFO, WARNING, ERROR (env LOG_LEVEL; default INFO)",
    )
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=os.environ.get("LOG_FORMAT", "text"),
        help="text (default) or json: one object per line (env LOG_FORMAT)",
    )
    parser.set_defaults(func=None, handlers_used=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    g = Groups()

    def add(
        name: str, func: Command, help_text: str, *parents: argparse.ArgumentParser, **kw: Any
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, parents=list(parents), **kw)
        p.set_defaults(func=func, handlers_used=g.handlers in parents)
        return p

    local_commands(add, g)
    bus_commands(add, g)
    return parser


def local_commands(add: Add, g: Groups) -> None:
    """The commands on a heartbeat.json that need no broker (and ``run``, which does
    without ``--local``)."""

    def describe(text: str) -> dict[str, str]:
        return {"description": text}

    text = "check a heartbeat.json; print every problem"
    p = add("validate", local.cmd_validate, text, g.file, g.handlers, **describe(text))
    p.add_argument(
        "--strict", action="store_true", help="fields that are not understood are errors"
    )
    text = "print a heartbeat.json (any accepted format) as heartbeat.v1"
    add("convert", local.cmd_convert, text, g.file, **describe(text))
    text = "show every check: due or not, and why"
    p = add("plan", local.cmd_plan, text, g.file, g.handlers, g.state, **describe(text))
    p.add_argument("--at", default="now", metavar="TIME", help="ISO 8601 or epoch ms (default now)")
    p.add_argument("--json", action="store_true", help="one JSON object")
    text = "print the runs that would happen between two times (JSON lines)"
    p = add("simulate", local.cmd_simulate, text, g.file, g.handlers, g.state, **describe(text))
    p.add_argument("--from", dest="start", required=True, metavar="TIME")
    p.add_argument("--to", dest="end", required=True, metavar="TIME")
    p.add_argument("--tick", default="60s", help="tick interval (default 60s)")
    text = "run what is due now, without a broker (for cron, systemd timers)"
    p = add("run-once", local.cmd_run_once, text, g.file, g.handlers, g.state, **describe(text))
    p.add_argument("--tick", default="60s", help="slot size: now is rounded down to it (60s)")
    p.add_argument("--at", metavar="TIME", help="pretend it is TIME (default now)")
    text = "run an agent's consumer on RabbitMQ, or with --local without a broker"
    p = add("run", local.cmd_run, text, g.file, g.handlers, g.state, *g.consumer, **describe(text))
    p.add_argument("--local", action="store_true", help="in-process ticker, no broker")
    p.add_argument("--every", default="60s", help="tick interval (default 60s)")
    p.add_argument(
        "--max-ticks", type=positive_int, metavar="N", help="--local: stop after N ticks"
    )
    p.add_argument("--agent", metavar="NAME", help="agent (queue) name (default: from FILE)")
    text = "show the state file: last runs, failures, retries"
    p = add("status", local.cmd_status, text, g.file, g.handlers, g.state, **describe(text))
    p.add_argument("--json", action="store_true")
    add("schema", local.cmd_schema, "print the heartbeat.v1 JSON Schema")


def bus_commands(add: Add, g: Groups) -> None:
    """The commands that talk to RabbitMQ; their code is imported when one runs."""
    p = add("asyncapi", _bus("cmd_asyncapi"), "write the AsyncAPI document of every channel")
    p.add_argument("--output", default="-", metavar="FILE", help="default: standard output")
    p.add_argument("--exchange", default=env("EXCHANGE_NAME", DEFAULT_EXCHANGE))

    text = "run the consumers of every *.heartbeat.json in DIR"
    p = add("fleet", _bus("cmd_fleet"), text, g.handlers, *g.consumer)
    p.add_argument(
        "directory",
        metavar="DIR",
        nargs="?",
        default=env("FLEET_DIR"),
        help="the agents' configs (env FLEET_DIR or AGENT_CONFIGS)",
    )
    p.add_argument(
        "--pattern",
        default=env("FLEET_PATTERN", "*" + CONFIG_SUFFIX),
        metavar="GLOB",
        help="which files are agents: '*SUFFIX', the agent being the name without SUFFIX "
        "(env FLEET_PATTERN; default *.heartbeat.json; '*.json' for Bloodbank's layout)",
    )
    p.add_argument("--state-dir", metavar="DIR", help="state files (default: beside each config)")
    p.add_argument("--every", default="60s", help="tick interval (default 60s)")
    p.add_argument("--rescan", default="5s", help="how often DIR is re-read (default 5s)")
    text = "publish system.heartbeat.tick at every interval boundary"
    p = add("ticker", _bus("cmd_ticker"), text, g.bus, g.health)
    p.add_argument("--every", default="60s", help="tick interval (default 60s)")
    p.add_argument("--max-ticks", type=positive_int, metavar="N", help="stop after N ticks")
    monitor_command(add, g.bus, g.dead_letters)
    text = "inject one tick now, to every agent or to one (and wait for its answer)"
    p = add("tick", _bus("cmd_tick"), text, g.wait, g.bus)
    p.add_argument("--agent", metavar="NAME", help="only this agent (its answer is awaited)")
    p = add(
        "provision",
        _bus("cmd_provision"),
        "declare the exchanges and the queues of agents and the monitor (as an admin)",
        g.bus,
        g.inbox,
        g.dead_letters,
        description="Declare what least-privileged agents and monitors may not declare "
        "themselves: the exchanges, each agent's inbox and dead-letter queue with their "
        "bindings, the monitor's queues. Run as a user that may declare them "
        "(deploy/rabbitmq/permissions.sh does it with a temporary user).",
    )
    p.add_argument("--agent", action="append", metavar="NAME", help="an agent (repeatable)")
    p.add_argument(
        "--replica",
        action="append",
        metavar="NAME",
        help="a replica of the agents (repeatable): its state queue, and a single active "
        "consumer on the inbox (run them with --standby --replica NAME)",
    )
    p.add_argument(
        "--monitor",
        nargs="?",
        const=DEFAULT_MONITOR_QUEUE,
        metavar="QUEUE",
        help=f"the monitor's queue (default {DEFAULT_MONITOR_QUEUE})",
    )
    p.add_argument(
        "--exchanges", dest="exchanges_only", action="store_true", help="only the exchanges"
    )
    p = add("run-check", _bus("cmd_run_check"), "ask an agent to run one check now", g.wait, g.bus)
    p.add_argument("agent", metavar="AGENT")
    p.add_argument("check", metavar="CHECK")
    p.add_argument("--force", action="store_true", help="run even if not due")


def monitor_command(add: Callable[..., argparse.ArgumentParser], *parents: Any) -> None:
    p = add(
        "monitor",
        _bus("cmd_monitor"),
        "watch every agent's events: stale, timeout, missed and config_invalid alerts, "
        "status API, dashboard",
        *parents,
    )
    p.add_argument(
        "--state",
        default=env("MONITOR_STATE_PATH", "monitor.state.json"),
        metavar="PATH",
        help="where open incidents survive a restart (env MONITOR_STATE_PATH; "
        "default monitor.state.json)",
    )
    p.add_argument(
        "--port",
        type=port,
        default=env("MONITOR_PORT", "8790"),
        help="dashboard, /api/heartbeat/status, /health, /metrics (env MONITOR_PORT; 8790)",
    )
    p.add_argument(
        "--host",
        default=env("MONITOR_HOST") or env("HEALTH_HOST", "127.0.0.1"),
        metavar="ADDR",
        help="address to serve on (env MONITOR_HOST or HEALTH_HOST; default 127.0.0.1)",
    )
    p.add_argument(
        "--queue", default=DEFAULT_MONITOR_QUEUE, help="its queue (default heartbeat.monitor)"
    )
    p.add_argument("--check-every", default="30s", help="evaluation interval (default 30s)")
    p.add_argument(
        "--stale-after",
        default="10m",
        help="silence that makes an agent stale (default 10m: twice the consumers' --alive-every)",
    )
    p.add_argument(
        "--stale-for",
        action="append",
        metavar="AGENT=DURATION",
        help="another stale threshold for one agent (repeatable)",
    )
    p.add_argument("--timeout-grace", default="30s", help="after a run's timeout (default 30s)")
    p.add_argument("--missed-grace", default="2m", help="after a check's cadence (default 2m)")
    p.add_argument("--repeat", metavar="DURATION", help="re-send open alerts this often")
    p.add_argument("--forget-after", default="7d", help="drop agents silent this long (default 7d)")


def wait_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--wait",
        default="10s",
        metavar="DURATION",
        help="how long to wait for the agent's answer (default 10s)",
    )
    p.add_argument("--no-wait", action="store_true", help="send, do not wait for the answer")


def handlers_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--handlers",
        action="append",
        metavar="MODULE",
        help="import a handler plugin module or file.py (repeatable; env HEARTBEAT_HANDLERS)",
    )
    p.add_argument(
        "--default-handler",
        default=os.environ.get("HEARTBEAT_DEFAULT_HANDLER"),
        metavar="NAME",
        help="handler for checks whose handler is not registered, in files without a "
        "defaultHandler (their description is the prompt; env HEARTBEAT_DEFAULT_HANDLER)",
    )


def alive_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--alive-every",
        default=os.environ.get("ALIVE_EVERY", "5m"),
        metavar="DURATION",
        help="an idle agent says alive at most this often (env ALIVE_EVERY; default 5m)",
    )


def file_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="heartbeat.json")


def state_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--state",
        metavar="PATH",
        help="state file (env HEARTBEAT_STATE_PATH; default FILE.state.json)",
    )


def inbox_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--queue-type",
        choices=("classic", "quorum"),
        default=env("QUEUE_TYPE", "classic"),
        help="the inbox's type (env QUEUE_TYPE; default classic; quorum: replicated over "
        "a cluster)",
    )
    p.add_argument(
        "--single-active-consumer",
        action="store_true",
        help="replicas of one agent stand by; one consumes at a time",
    )
    p.add_argument(
        "--standby",
        action="store_true",
        default=env("STANDBY", "") in ("1", "true", "yes", "on"),
        help="this is one replica of each agent (on each host): one consumes at a time and "
        "the others follow its state on the bus, ready to take over "
        "(implies --single-active-consumer; env STANDBY=true)",
    )


def replica_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--replica",
        metavar="NAME",
        help="with --standby: this replica's name, unique per agent (env HEARTBEAT_REPLICA; "
        "default: the host name); its state queues are agent.<agent>.state.<NAME>",
    )


def dead_letter_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dlq-max-length",
        type=int,
        default=env("DLQ_MAX_LENGTH", "10000"),
        metavar="N",
        help="dead-letter queue: at most N messages, the oldest go first "
        "(env DLQ_MAX_LENGTH; default 10000)",
    )
    p.add_argument(
        "--dlq-ttl",
        default=env("DLQ_TTL", "7d"),
        metavar="DURATION",
        help="dead-letter queue: how long a message is kept (env DLQ_TTL; default 7d)",
    )


def health_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--health-port",
        type=port,
        default=os.environ.get("HEALTH_PORT") or None,
        metavar="PORT",
        help="serve /health and /metrics on PORT (env HEALTH_PORT; default: off)",
    )
    p.add_argument(
        "--health-host",
        default=os.environ.get("HEALTH_HOST", "127.0.0.1"),
        metavar="ADDR",
        help="address to serve them on (env HEALTH_HOST; default 127.0.0.1)",
    )


def bus_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--rabbit-url",
        default=env("RABBIT_URL", DEFAULT_URL),
        help="env RABBIT_URL or RABBITMQ_URL (default amqp://guest:guest@localhost:5672/)",
    )
    p.add_argument(
        "--exchange",
        default=env("EXCHANGE_NAME", DEFAULT_EXCHANGE),
        help=f"env EXCHANGE_NAME or BLOODBANK_EXCHANGE (default {DEFAULT_EXCHANGE})",
    )
    for option, variable in (("ca", "RABBIT_CA_FILE"), ("cert", "RABBIT_CERT_FILE")):
        p.add_argument(
            f"--{option}-file", default=os.environ.get(variable), help=f"amqps: env {variable}"
        )
    p.add_argument(
        "--key-file", default=os.environ.get("RABBIT_KEY_FILE"), help="env RABBIT_KEY_FILE"
    )
    p.add_argument(
        "--no-declare",
        "--no-declare-exchanges",
        dest="declare_exchanges",
        action="store_false",
        default=_declare_from_environment(),
        help="declare nothing, only check that the exchanges and queues exist (as a user "
        "without configure permission does by itself; env DECLARE=false)",
    )
