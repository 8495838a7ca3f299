"""The commands that talk to RabbitMQ: run, fleet, ticker, tick, run-check, monitor,
provision, asyncapi; imported only when one of them runs."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import socket
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..bus.asyncapi import render as render_asyncapi
from ..bus.connection import TlsFiles, connect, make_broker
from ..bus.consumer import HeartbeatConsumer
from ..bus.fleet import Fleet
from ..bus.provision import (
    DeadLetterLimits,
    InboxOptions,
    declare_exchanges,
    provision_agent,
    provision_monitor,
)
from ..bus.request import Answer, send_and_wait
from ..bus.settings import BusSettings, InboxSettings
from ..bus.ticker import manual_tick_key, run_ticker
from ..core.config import (
    ConfigError,
    load_config,
)
from ..core.timeutil import format_duration
from ..core.topology import (
    MONITOR_BINDING,
    NAME_PATTERN,
    agent_key,
    check_name,
    dead_letter_queue,
    follow_queue,
    inbox_queue,
)
from ..monitor.monitor import Monitor
from ..monitor.rules import WatchConfig
from ..ops.settings import ServeSettings
from ..runtime.engine import wall_clock_ms
from ..runtime.local import stop_on_signals
from .common import (
    ENV_HELP,
    EXIT_INVALID,
    EXIT_OK,
    EXIT_RUN_FAILED,
    EXIT_USAGE,
    MIN_LOOP_MS,
    UsageError,
    _duration,
    _load_handlers,
    _out,
    _state_path,
    env,
)
from .render import _print_event


def _agent_of(path: str) -> str:
    try:
        return load_config(path).config.agent
    except ConfigError as exc:
        raise UsageError(f"name the agent with --agent: {exc}") from None


def cmd_run_bus(args: argparse.Namespace) -> int:
    """``run FILE`` without ``--local``: the agent's consumer on RabbitMQ."""
    return _run_bus(args, args.agent or _agent_of(args.file))


def _run_bus(args: argparse.Namespace, agent: str) -> int:
    consumer = HeartbeatConsumer(
        agent,
        args.file,
        bus=_bus_settings(args),
        inbox=_inbox_settings(args),
        serve=_serve_settings(args.health_port, args.health_host),
        state_path=_state_path(args),
    )
    with consumer.agent_consumer.runner.exclusive() as mine:
        if not mine:
            _out(f"another process runs agent {agent} on this state file", sys.stderr)
            return EXIT_INVALID
        consumer.run_sync()
    return EXIT_OK


def _bus_settings(args: argparse.Namespace) -> BusSettings:
    """The broker options (``--rabbit-url``, ``--exchange``, TLS, ``--no-declare``)."""
    return BusSettings(
        url=args.rabbit_url, exchange=args.exchange, tls=_tls(args), declare=args.declare_exchanges
    )


def _inbox_settings(args: argparse.Namespace) -> InboxSettings:
    """A consumer's inbox options (``--every``, ``--queue-type``, ...)."""
    try:
        return InboxSettings(
            tick_interval_ms=_duration(args.every),
            queue_type=args.queue_type,
            single_active_consumer=args.single_active_consumer,
            alive_every_ms=_duration(args.alive_every),
            dead_letters=_dead_letters(args),
            replica=_replica(args),
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _replica(args: argparse.Namespace) -> str | None:
    """``--standby``: this replica's name (``--replica``, else the host name)."""
    if not args.standby:
        if args.replica:
            raise UsageError("--replica names a replica of --standby consumers: add --standby")
        return None  # HEARTBEAT_REPLICA alone is left for when STANDBY is set
    if args.replica or env("HEARTBEAT_REPLICA"):
        return check_name(args.replica or env("HEARTBEAT_REPLICA"), "replica name (--replica)")
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:64]
    if not re.fullmatch(NAME_PATTERN, host):
        raise UsageError(f"name this replica with --replica (the host name {host!r} cannot)")
    return host


def _serve_settings(port: int | None, host: str) -> ServeSettings:
    try:
        return ServeSettings(port=port, host=host)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _tls(args: argparse.Namespace) -> TlsFiles | None:
    files = TlsFiles(args.ca_file, args.cert_file, args.key_file)
    return files if files else None


def _dead_letters(args: argparse.Namespace) -> DeadLetterLimits:
    if args.dlq_max_length < 1:
        raise UsageError(f"--dlq-max-length must be at least 1, not {args.dlq_max_length}")
    try:
        return DeadLetterLimits(max_length=args.dlq_max_length, ttl_ms=_duration(args.dlq_ttl))
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def cmd_provision(args: argparse.Namespace) -> int:
    if not args.agent and not args.monitor and not args.exchanges_only:
        raise UsageError(
            "name what to provision: --agent NAME (repeatable), --monitor, --exchanges"
        )
    agents = [check_name(agent, "agent name") for agent in args.agent or []]
    limits = _dead_letters(args)
    sac = args.single_active_consumer or args.standby
    replicas: list[str | None] = [check_name(r, "replica name") for r in args.replica or []]
    if replicas and not agents:
        raise UsageError("--replica provisions the state queues of agents: name them with --agent")
    inboxes = [InboxOptions(args.queue_type, sac, r) for r in replicas or [None]]  # no --every

    async def run() -> None:
        broker = make_broker(args.rabbit_url, tls=_tls(args))
        connection = await connect(broker, args.rabbit_url)
        try:
            await declare_exchanges(connection, args.exchange, require=True)
            _out(f"exchanges {args.exchange} and {args.exchange}.dlx ready")
            for agent in agents:
                for options in inboxes:
                    await provision_agent(
                        connection,
                        agent,
                        args.exchange,
                        inbox=options,
                        dead_letters=limits,
                        require=True,
                        exchanges=False,
                    )
                _out(f"agent {agent}: {inbox_queue(agent)} and {dead_letter_queue(agent)} ready")
                for replica in filter(None, replicas):
                    _out(f"agent {agent}: {follow_queue(agent, replica)} ready")
            if args.monitor:
                await provision_monitor(
                    connection,
                    args.monitor,
                    args.exchange,
                    MONITOR_BINDING,
                    dead_letters=limits,
                    require=True,
                )
                _out(f"monitor: {args.monitor} and {args.monitor}.dlq ready")
        finally:
            await broker.stop()

    asyncio.run(run())
    return EXIT_OK


def cmd_fleet(args: argparse.Namespace) -> int:
    if not args.directory:
        raise UsageError("name the directory of the agents' configs: fleet DIR (or FLEET_DIR)")
    fleet = Fleet(
        args.directory,
        bus=_bus_settings(args),
        inbox=_inbox_settings(args),
        serve=_serve_settings(args.health_port, args.health_host),
        pattern=args.pattern,
        state_dir=args.state_dir,
        rescan_s=_duration(args.rescan, minimum=MIN_LOOP_MS) / 1000,
    )
    fleet.run_sync()
    return EXIT_OK


def _watch_config(args: argparse.Namespace) -> WatchConfig:
    by_agent = {}
    for item in args.stale_for or []:
        agent, sep, duration = item.partition("=")
        if not sep or not agent:
            raise UsageError(f"--stale-for wants AGENT=DURATION, not {item!r}")
        by_agent[agent] = _duration(duration)
    try:
        return WatchConfig(
            stale_ms=_duration(args.stale_after),
            stale_ms_by_agent=by_agent,
            timeout_grace_ms=_duration(args.timeout_grace),
            missed_grace_ms=_duration(args.missed_grace),
            repeat_ms=_duration(args.repeat) if args.repeat else None,
            forget_ms=_duration(args.forget_after),
        )
    except ValidationError as exc:
        problems = "; ".join(f"{e['loc'][0]}: {e['msg']}" for e in exc.errors())
        raise UsageError(f"monitor settings: {problems}") from None


def cmd_monitor(args: argparse.Namespace) -> int:
    monitor = Monitor(
        state_path=args.state,
        bus=_bus_settings(args),
        serve=_serve_settings(args.port, args.host),
        config=_watch_config(args),
        queue_name=args.queue,
        check_every_ms=_duration(args.check_every, minimum=MIN_LOOP_MS),
        dead_letters=_dead_letters(args),
    )
    monitor.run_sync()
    return EXIT_OK


def cmd_asyncapi(args: argparse.Namespace) -> int:
    text = render_asyncapi(args.exchange)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text)
        _out(f"wrote {args.output}")
    return EXIT_OK


def cmd_ticker(args: argparse.Namespace) -> int:
    async def run() -> int:
        return await run_ticker(
            bus=_bus_settings(args),
            serve=_serve_settings(args.health_port, args.health_host),
            every_ms=_duration(args.every),
            stop=stop_on_signals(),
            max_ticks=args.max_ticks,
        )

    asyncio.run(run())
    return EXIT_OK


def _answer_exit(args: argparse.Namespace, what: str, answer: Answer) -> int:
    """Print what became of a command; its exit code."""
    agent = args.agent
    if answer.outcome == "unroutable":
        whom = f"no agent named {agent}" if agent else "no agent"
        _out(
            f"{what}: {whom} is listening on exchange {args.exchange} (no queue is bound to "
            "the key; is the name right, and was the agent ever started?)",
            sys.stderr,
        )
        return EXIT_INVALID
    if answer.outcome == "sent":
        note = f" ({answer.reason}: not waiting for the answer)" if answer.reason else ""
        _out(f"{what} sent ({answer.event_id}){note}")
        return EXIT_OK
    if answer.outcome == "unanswered":
        _out(
            f"{what}: no answer from {agent} within {format_duration(_wait_ms(args))} "
            f"(is its consumer running, or busy with a long check? the message waits in "
            f"{inbox_queue(agent)} and is handled when the agent gets to it)",
            sys.stderr,
        )
        return EXIT_INVALID
    if answer.outcome == "lost":
        _out(
            f"{what}: the broker connection was lost while waiting for the answer (the "
            "message was sent; it is handled when the agent gets to it)",
            sys.stderr,
        )
        return EXIT_INVALID
    if answer.outcome == "started":
        _out(
            f"{what}: started; no result within {format_duration(_wait_ms(args))} "
            f"(it is published under heartbeat.{agent}.<check>.<status> when done)"
        )
        return EXIT_OK
    if answer.outcome == "rejected":
        _out(f"{what}: rejected: {answer.reason}", sys.stderr)
        return EXIT_INVALID
    _out(f"{what}: {answer.outcome.replace('_', ' ')}: {answer.reason}")
    if answer.status in ("failed", "timeout"):
        return EXIT_RUN_FAILED
    return EXIT_OK


def _wait_ms(args: argparse.Namespace) -> int:
    return 0 if args.no_wait else _duration(args.wait)


def _send(args: argparse.Namespace, key: str, event_type: str, payload: dict[str, Any]) -> Answer:
    wait_ms = _wait_ms(args)
    return asyncio.run(
        send_and_wait(
            key,
            event_type,
            payload,
            agent=args.agent,
            wait_s=wait_ms / 1000,
            rabbit_url=args.rabbit_url,
            exchange_name=args.exchange,
            now_ms=payload.get("epoch_ms"),
            tls=_tls(args),
            declare=args.declare_exchanges,
            on_event=_print_event,
        )
    )


def cmd_tick(args: argparse.Namespace) -> int:
    if args.agent is not None:
        check_name(args.agent, "agent name")
    now = wall_clock_ms()
    key = manual_tick_key(args.agent)
    payload = {"tick_id": f"manual-{now}", "epoch_ms": now}
    answer = _send(args, key, "system.heartbeat.tick", payload)
    return _answer_exit(args, f"tick to {args.agent or 'every agent'}", answer)


def cmd_run_check(args: argparse.Namespace) -> int:
    key = agent_key(check_name(args.agent, "agent name"), "run")
    check_name(args.check, "check name")
    payload = {"check": args.check, "force": args.force}
    answer = _send(args, key, "heartbeat.command.run", payload)
    return _answer_exit(args, f"run {args.agent}/{args.check}", answer)


def run_from_environment(parser: argparse.ArgumentParser) -> int:
    """No command: the reference design's environment variables run the bus consumer,
    exactly as ``run $HEARTBEAT_PATH --agent $AGENT_NAME`` (which reads the rest of the
    environment: RABBIT_URL, EXCHANGE_NAME, HEARTBEAT_STATE_PATH, ...)."""
    agent, path = os.environ.get("AGENT_NAME"), env("HEARTBEAT_PATH")
    if not agent or not path:
        _out(ENV_HELP, sys.stderr)
        return EXIT_USAGE
    args = parser.parse_args(["run", path, "--agent", agent])
    _load_handlers(args)
    return _run_bus(args, agent)
