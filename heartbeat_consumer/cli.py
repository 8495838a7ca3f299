"""The ``heartbeat-consumer`` command line.

Exit codes: 0 ok; 1 the config (or state) cannot be used; 2 usage error;
3 a check run failed or timed out (``run-once``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import orjson
from aiormq.exceptions import AMQPError
from pydantic import ValidationError

from . import __version__
from .asyncapi import render as render_asyncapi
from .config import (
    ConfigError,
    HeartbeatConfig,
    LoadedConfig,
    Problem,
    load_config,
    normalise_config,
    read_config_bytes,
    schema,
    with_default_handler,
)
from .connection import BrokerError, TlsError, TlsFiles, connect, first_line, make_broker
from .consumer import HeartbeatConsumer
from .deadman import WatchConfig
from .engine import AgentRunner, RunResult, wall_clock_ms
from .envelope import event_kind
from .fleet import SUFFIX as FLEET_SUFFIX
from .fleet import Fleet, FleetError
from .handlers import (
    HandlerError,
    default_handler,
    handler_names,
    load_entry_points,
    load_plugins,
    plugin_modules_from_env,
    set_default_handler,
)
from .health import ServeError
from .local import run_local, run_once, stop_on_signals
from .logs import LOG_FORMATS, setup_logging
from .monitor import DEFAULT_MONITOR_QUEUE, Monitor
from .provision import (
    DeadLetterLimits,
    InboxOptions,
    TopologyError,
    declare_exchanges,
    provision_agent,
    provision_monitor,
)
from .request import Answer, send_and_wait
from .schedule import Evaluation, plan
from .simulate import simulate
from .state import AgentState
from .store import AgentBusy, StateError, StateStore, default_state_path
from .ticker import manual_tick_key, run_ticker
from .timeutil import format_duration, iso, parse_duration_ms, parse_instant_ms
from .topology import (
    DEFAULT_EXCHANGE,
    DEFAULT_URL,
    MONITOR_BINDING,
    InvalidName,
    InvalidUrl,
    agent_key,
    check_name,
    dead_letter_queue,
    inbox_queue,
    mask_url,
)

__all__ = ["main"]

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


def _print_problems(source: str, problems: Sequence[Problem]) -> None:
    _out(f"{source}: {len(problems)} problem(s)", sys.stderr)
    for problem in problems:
        _out(f"  {problem}", sys.stderr)


def _load(path: str, *, strict: bool = False) -> LoadedConfig | None:
    """The config with unregistered handlers sent to the default handler; its warnings
    printed. None (the problems printed) when it cannot be used."""
    try:
        loaded = load_config(path, strict=strict)
    except ConfigError as exc:
        _print_problems(exc.source, exc.problems)
        return None
    for warning in loaded.warnings:
        _out(f"warning: {path}: {warning} (ignored)", sys.stderr)
    return with_default_handler(loaded, handler_names(), default_handler())


def _format(loaded: LoadedConfig) -> str:
    if loaded.format == "bloodbank":
        return "format bloodbank (heartbeat_tick's array of checks)"
    return f"format {loaded.format}"


def _unknown_handler_problems(loaded: LoadedConfig) -> list[Problem]:
    known = handler_names()
    default = loaded.config.default_handler
    unknown_default = (
        [Problem("$.defaultHandler", f"unknown handler {default!r}")]
        if default is not None and default not in known
        else []
    )
    return unknown_default + [
        Problem(
            f"$.checks.{check.name}.handler",
            f"unknown handler {check.handler!r} (registered: {', '.join(sorted(known))})",
            check.name,
        )
        for check in loaded.config.checks.values()
        if check.handler not in known
    ]


def cmd_validate(args: argparse.Namespace) -> int:
    loaded = _load(args.file, strict=args.strict)
    if loaded is None:
        return EXIT_INVALID
    problems = loaded.problems + _unknown_handler_problems(loaded)
    if problems:
        _print_problems(args.file, problems)
        return EXIT_INVALID
    config = loaded.config
    defaulted = sum(1 for c in config.checks.values() if c.declared_handler is not None)
    via = f", {defaulted} by handler {_default_of(config)}" if defaulted else ""
    _out(
        f"ok: {args.file}: {_format(loaded)}, agent {config.agent}, "
        f"{len(config.checks)} check(s){via}"
    )
    return EXIT_OK


def _default_of(config: HeartbeatConfig) -> str:
    return repr(config.default_handler or default_handler())


def cmd_convert(args: argparse.Namespace) -> int:
    """The file as heartbeat.v1 on stdout: every problem is an error, every dropped field a
    warning on stderr."""
    try:
        normal, problems = normalise_config(read_config_bytes(args.file), source=args.file)
    except ConfigError as exc:
        problems, normal = exc.problems, None
    if normal is None or problems:
        _print_problems(args.file, problems)
        return EXIT_INVALID
    for warning in normal.warnings:
        _out(f"warning: {args.file}: {warning} (not converted)", sys.stderr)
    data = {"$schema": "heartbeat.v1", "agent": normal.data.get("agent"), **normal.data}
    _out(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
    return EXIT_OK


def _read_state(args: argparse.Namespace) -> AgentState:
    path = _state_path(args)
    state, warning = StateStore(path).load(repair=False)
    if warning:
        _out(f"warning: {warning}", sys.stderr)
    return state


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


def cmd_plan(args: argparse.Namespace) -> int:
    loaded = _load(args.file)
    if loaded is None:
        return EXIT_INVALID
    now = _instant(args.at)
    state = _read_state(args)
    result = plan(
        loaded.config,
        state,
        now,
        known_handlers=handler_names(),
        invalid_checks=loaded.invalid_checks,
    )
    chosen = {ev.check for ev in result.selected}
    if args.json:
        _json_line(
            {
                "agent": loaded.config.agent,
                "format": loaded.format,
                "at": iso(now),
                "checks": [_evaluation_json(ev, ev.check in chosen) for ev in result.evaluations],
            }
        )
        return EXIT_OK
    config = loaded.config
    _out(f"agent {config.agent} at {iso(now)}  ({_format(loaded)}; state: {_state_path(args)})")
    _out(f"selection: {config.selection}, at most {config.max_checks_per_tick} check(s) per tick")
    width = max([len(ev.check) for ev in result.evaluations] + [5])
    _out(f"  {'CHECK':<{width}}  {'PRIO':>4}  {'RATIO':>6}  {'LAST RUN':<24}  VERDICT")
    for ev in result.evaluations:
        if ev.check in chosen:
            verdict, mark = "RUNS NOW", "*"
        elif ev.due:
            verdict, mark = "due, waits for a later tick (maxChecksPerTick)", " "
        else:
            verdict, mark = "; ".join(text for _, text in ev.blockers), " "
        last = iso(ev.last_run) if ev.last_run is not None else "never"
        prio = "-" if ev.handler is None else str(ev.priority)
        _out(f"{mark} {ev.check:<{width}}  {prio:>4}  {_ratio(ev.ratio):>6}  {last:<24}  {verdict}")
    if not result.evaluations:
        _out("  (no checks)")
    return EXIT_OK


def cmd_simulate(args: argparse.Namespace) -> int:
    loaded = _load(args.file)
    if loaded is None:
        return EXIT_INVALID
    start, end = _instant(args.start), _instant(args.end)
    if end <= start:
        raise UsageError("--to must be after --from")
    tick = _duration(args.tick)
    if (end - start) // tick > MAX_SIMULATED_TICKS:
        raise UsageError(
            f"{(end - start) // tick} ticks from --from to --to; at most {MAX_SIMULATED_TICKS} "
            "(a longer --tick or a shorter range)"
        )
    state = _read_state(args) if args.state else AgentState()
    for run in simulate(
        loaded.config, start, end, tick, state=state, known_handlers=handler_names()
    ):
        _json_line(run.to_json())
    return EXIT_OK


async def _emit(result: RunResult) -> None:
    """Print a run's result; a reader that has gone (``| head``) does not stop the
    state from being saved."""
    try:
        _json_line(result.to_payload())
    except BrokenPipeError:
        _quiet_stdout()


def _runner(args: argparse.Namespace) -> AgentRunner:
    runner = AgentRunner(args.file, state_path=_state_path(args), on_result=_emit)
    runner.start()
    return runner


def cmd_run_once(args: argparse.Namespace) -> int:
    runner = _runner(args)
    with runner.exclusive() as mine:
        if not mine:
            _out(f"another run holds {runner.store.path}.lock; nothing done", sys.stderr)
            return EXIT_OK
        now = _instant(args.at) if args.at else None
        report = asyncio.run(run_once(runner, every_ms=_duration(args.tick), now_ms=now))
    if report.plan is None:
        return EXIT_INVALID
    if any(r.status in ("failed", "timeout") for r in report.results):
        return EXIT_RUN_FAILED
    return EXIT_OK


async def _run_local(runner: AgentRunner, every_ms: int, max_ticks: int | None) -> int:
    return await run_local(runner, every_ms=every_ms, max_ticks=max_ticks, stop=stop_on_signals())


def cmd_run(args: argparse.Namespace) -> int:
    _require_file(args.file)
    if not args.local:
        return _run_bus(args, args.agent or _agent_of(args.file))
    every = _duration(args.every)
    runner = _runner(args)
    with runner.exclusive() as mine:
        if not mine:
            _out(f"another process runs this agent ({runner.store.path}.lock is held)", sys.stderr)
            return EXIT_INVALID
        logging.getLogger("heartbeat_consumer").info(
            "running %s locally, ticking every %s (Ctrl-C stops)", args.file, format_duration(every)
        )
        asyncio.run(_run_local(runner, every, args.max_ticks))
    return EXIT_OK


def _agent_of(path: str) -> str:
    try:
        return load_config(path).config.agent
    except ConfigError as exc:
        raise UsageError(f"name the agent with --agent: {exc}") from None


def _run_bus(args: argparse.Namespace, agent: str) -> int:
    consumer = HeartbeatConsumer(
        agent,
        args.file,
        args.rabbit_url,
        args.exchange,
        state_path=_state_path(args),
        tick_interval_ms=_duration(args.every),
        queue_type=args.queue_type,
        single_active_consumer=args.single_active_consumer,
        tls=_tls(args),
        declare_exchanges=args.declare_exchanges,
        health_port=args.health_port,
        health_host=args.health_host,
        dead_letters=_dead_letters(args),
        alive_every_ms=_duration(args.alive_every),
    )
    with consumer.agent.runner.exclusive() as mine:
        if not mine:
            _out(f"another process runs agent {agent} on this state file", sys.stderr)
            return EXIT_INVALID
        consumer.run_sync()
    return EXIT_OK


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
    inbox = InboxOptions(args.queue_type, args.single_active_consumer)

    async def run() -> None:
        broker = make_broker(args.rabbit_url, tls=_tls(args))
        connection = await connect(broker, args.rabbit_url)
        try:
            await declare_exchanges(connection, args.exchange, require=True)
            _out(f"exchanges {args.exchange} and {args.exchange}.dlx ready")
            for agent in agents:
                await provision_agent(
                    connection,
                    agent,
                    args.exchange,
                    inbox=inbox,
                    dead_letters=limits,
                    require=True,
                )
                _out(f"agent {agent}: {inbox_queue(agent)} and {dead_letter_queue(agent)} ready")
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
        args.rabbit_url,
        args.exchange,
        pattern=args.pattern,
        state_dir=args.state_dir,
        tick_interval_ms=_duration(args.every),
        queue_type=args.queue_type,
        single_active_consumer=args.single_active_consumer,
        rescan_s=_duration(args.rescan, minimum=MIN_LOOP_MS) / 1000,
        tls=_tls(args),
        declare_exchanges=args.declare_exchanges,
        health_port=args.health_port,
        health_host=args.health_host,
        dead_letters=_dead_letters(args),
        alive_every_ms=_duration(args.alive_every),
    )

    async def run() -> None:
        await fleet.run(stop_on_signals())

    asyncio.run(run())
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
        rabbit_url=args.rabbit_url,
        exchange_name=args.exchange,
        config=_watch_config(args),
        queue_name=args.queue,
        check_every_ms=_duration(args.check_every, minimum=MIN_LOOP_MS),
        tls=_tls(args),
        declare_exchanges=args.declare_exchanges,
        dead_letters=_dead_letters(args),
    )
    asyncio.run(monitor.run(port=args.port, host=args.host))
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
            rabbit_url=args.rabbit_url,
            exchange_name=args.exchange,
            every_ms=_duration(args.every),
            stop=stop_on_signals(),
            max_ticks=args.max_ticks,
            tls=_tls(args),
            declare_exchanges=args.declare_exchanges,
            health_port=args.health_port,
            health_host=args.health_host,
        )

    asyncio.run(run())
    return EXIT_OK


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


def cmd_status(args: argparse.Namespace) -> int:
    _require_file(args.file)
    path = _state_path(args)
    try:
        loaded: LoadedConfig | None = load_config(args.file)
    except ConfigError:
        loaded = None
    state = _read_state(args)
    configured = list(loaded.config.checks) if loaded else []
    names = sorted(set(configured) | set(state.checks))
    if args.json:
        _json_line(
            {
                "state_path": str(path),
                "checks": {name: state.check(name).model_dump(by_alias=True) for name in names},
                "pauses": {k: v.model_dump() for k, v in state.pauses.items()},
            }
        )
        return EXIT_OK
    _out(f"state: {path}{'' if path.exists() else ' (not written yet)'}")
    width = max([len(n) for n in names] + [5])
    _out(
        f"  {'CHECK':<{width}}  {'STATUS':<8}  {'LAST RUN':<24}  {'RUNS':>5}  {'FAILS':>5}  DETAIL"
    )
    for name in names:
        cs = state.check(name)
        last = iso(cs.last_run) if cs.last_run is not None else "never"
        detail = cs.last_error or ""
        if cs.next_retry is not None:
            detail = f"retry after {iso(cs.next_retry)}; {detail}"
        if name not in configured and loaded:
            detail = "not in the config any more; " + detail
        status = cs.last_status or "-"
        _out(
            f"  {name:<{width}}  {status:<8}  {last:<24}  {cs.runs:>5}  "
            f"{cs.consecutive_failures:>5}  {detail}"
        )
    return EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    sys.stdout.write(orjson.dumps(schema(), option=orjson.OPT_INDENT_2).decode() + "\n")
    return EXIT_OK


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
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, help_text: str, *, state: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("file", metavar="FILE", help="heartbeat.json")
        handlers_option(p)
        if state:
            p.add_argument(
                "--state",
                metavar="PATH",
                help="state file (env HEARTBEAT_STATE_PATH; default FILE.state.json)",
            )
        return p

    p = command("validate", "check a heartbeat.json; print every problem", state=False)
    p.add_argument(
        "--strict", action="store_true", help="fields that are not understood are errors"
    )
    p = sub.add_parser(
        "convert",
        help="print a heartbeat.json (any accepted format) as heartbeat.v1",
        description="print a heartbeat.json (any accepted format) as heartbeat.v1",
    )
    p.add_argument("file", metavar="FILE", help="heartbeat.json")
    p = command("plan", "show every check: due or not, and why")
    p.add_argument("--at", default="now", metavar="TIME", help="ISO 8601 or epoch ms (default now)")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p = command("simulate", "print the runs that would happen between two times (JSON lines)")
    p.add_argument("--from", dest="start", required=True, metavar="TIME")
    p.add_argument("--to", dest="end", required=True, metavar="TIME")
    p.add_argument("--tick", default="60s", help="tick interval (default 60s)")
    p = command("run-once", "run what is due now, without a broker (for cron, systemd timers)")
    p.add_argument("--tick", default="60s", help="slot size: now is rounded down to it (60s)")
    p.add_argument("--at", metavar="TIME", help="pretend it is TIME (default now)")
    p = command("run", "run an agent's consumer on RabbitMQ, or with --local without a broker")
    p.add_argument("--local", action="store_true", help="in-process ticker, no broker")
    p.add_argument("--every", default="60s", help="tick interval (default 60s)")
    p.add_argument(
        "--max-ticks", type=positive_int, metavar="N", help="--local: stop after N ticks"
    )
    p.add_argument("--agent", metavar="NAME", help="agent (queue) name (default: from FILE)")
    consumer_options(p)
    p = command("status", "show the state file: last runs, failures, retries")
    p.add_argument("--json", action="store_true")
    sub.add_parser("schema", help="print the heartbeat.v1 JSON Schema")
    p = sub.add_parser("asyncapi", help="write the AsyncAPI document of every channel")
    p.add_argument("--output", default="-", metavar="FILE", help="default: standard output")
    p.add_argument("--exchange", default=env("EXCHANGE_NAME", DEFAULT_EXCHANGE))
    _bus_commands(sub)
    return parser


def _bus_commands(sub: Any) -> None:
    p = sub.add_parser("fleet", help="run the consumers of every *.heartbeat.json in DIR")
    p.add_argument(
        "directory",
        metavar="DIR",
        nargs="?",
        default=env("FLEET_DIR"),
        help="the agents' configs (env FLEET_DIR or AGENT_CONFIGS)",
    )
    p.add_argument(
        "--pattern",
        default=env("FLEET_PATTERN", "*" + FLEET_SUFFIX),
        metavar="GLOB",
        help="which files are agents: '*SUFFIX', the agent being the name without SUFFIX "
        "(env FLEET_PATTERN; default *.heartbeat.json; '*.json' for Bloodbank's layout)",
    )
    p.add_argument("--state-dir", metavar="DIR", help="state files (default: beside each config)")
    p.add_argument("--every", default="60s", help="tick interval (default 60s)")
    p.add_argument("--rescan", default="5s", help="how often DIR is re-read (default 5s)")
    handlers_option(p)
    consumer_options(p)
    p = sub.add_parser("ticker", help="publish system.heartbeat.tick at every interval boundary")
    p.add_argument("--every", default="60s", help="tick interval (default 60s)")
    p.add_argument("--max-ticks", type=positive_int, metavar="N", help="stop after N ticks")
    bus_options(p)
    health_options(p)
    _monitor_command(sub)
    p = sub.add_parser(
        "tick",
        help="inject one tick now, to every agent or to one (and wait for its answer)",
    )
    p.add_argument("--agent", metavar="NAME", help="only this agent (its answer is awaited)")
    wait_options(p)
    bus_options(p)
    p = sub.add_parser(
        "provision",
        help="declare the exchanges and the queues of agents and the monitor (as an admin)",
        description="Declare what least-privileged agents and monitors may not declare "
        "themselves: the exchanges, each agent's inbox and dead-letter queue with their "
        "bindings, the monitor's queues. Run as a user that may declare them "
        "(deploy/rabbitmq/permissions.sh does it with a temporary user).",
    )
    p.add_argument("--agent", action="append", metavar="NAME", help="an agent (repeatable)")
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
    bus_options(p)
    inbox_options(p)
    dead_letter_options(p)
    p = sub.add_parser("run-check", help="ask an agent to run one check now")
    p.add_argument("agent", metavar="AGENT")
    p.add_argument("check", metavar="CHECK")
    p.add_argument("--force", action="store_true", help="run even if not due")
    wait_options(p)
    bus_options(p)


def _monitor_command(sub: Any) -> None:
    p = sub.add_parser(
        "monitor",
        help="watch every agent's events: stale, timeout, missed and config_invalid alerts, "
        "status API, dashboard",
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
    bus_options(p)
    dead_letter_options(p)


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


def consumer_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--alive-every",
        default=os.environ.get("ALIVE_EVERY", "5m"),
        metavar="DURATION",
        help="an idle agent says alive at most this often (env ALIVE_EVERY; default 5m)",
    )
    bus_options(p)
    health_options(p)
    inbox_options(p)
    dead_letter_options(p)


def inbox_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--queue-type", choices=("classic", "quorum"), default="classic")
    p.add_argument(
        "--single-active-consumer",
        action="store_true",
        help="replicas of one agent stand by; one consumes at a time",
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


def _declare_from_environment() -> bool:
    values = (os.environ.get("DECLARE"), os.environ.get("DECLARE_EXCHANGES"))
    return not any(v is not None and v.lower() in FALSE_WORDS for v in values)


def _run_from_environment(parser: argparse.ArgumentParser) -> int:
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


FALSE_WORDS = frozenset({"0", "false", "no", "off"})

BROKER_ONLY = frozenset(
    {"schema", "asyncapi", "convert", "ticker", "tick", "run-check", "monitor", "provision"}
)
"""Commands that run no handlers, so load no plugins."""

COMMANDS = {
    "validate": cmd_validate,
    "convert": cmd_convert,
    "plan": cmd_plan,
    "simulate": cmd_simulate,
    "run-once": cmd_run_once,
    "run": cmd_run,
    "status": cmd_status,
    "schema": cmd_schema,
    "ticker": cmd_ticker,
    "fleet": cmd_fleet,
    "asyncapi": cmd_asyncapi,
    "tick": cmd_tick,
    "run-check": cmd_run_check,
    "monitor": cmd_monitor,
    "provision": cmd_provision,
}


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
            return _run_from_environment(parser)
        if args.command not in BROKER_ONLY:
            _load_handlers(args)
        return COMMANDS[args.command](args)
    except (UsageError, InvalidName, InvalidUrl) as exc:
        _out(f"{name}: {exc}", sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `| head`: the reader has gone; nothing more to say
        _quiet_stdout()
        return EXIT_OK
    except AMQPError as exc:  # after connecting: a channel closed, a declaration refused
        url = mask_url(
            getattr(args, "rabbit_url", None) or env("RABBIT_URL", DEFAULT_URL) or DEFAULT_URL
        )
        _out(f"{name}: RabbitMQ at {url}: {first_line(exc)}", sys.stderr)
        return EXIT_INVALID
    except OSError as exc:  # a file, a directory, a port: named as what it is
        _out(f"{name}: {_os_error(exc)}", sys.stderr)
        return EXIT_INVALID
    except (
        BrokerError,
        HandlerError,
        StateError,
        TlsError,
        TopologyError,
        ServeError,
        AgentBusy,
        FleetError,
        MissingFile,
    ) as exc:
        _out(f"{name}: {exc}", sys.stderr)
        return EXIT_INVALID
    except KeyboardInterrupt:
        return 130
