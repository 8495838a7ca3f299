"""The commands that need no broker: validate, convert, plan, simulate, run-once,
run --local, status, schema. They never import the broker's libraries."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import sys

import orjson

from ..core.config import (
    ConfigError,
    LoadedConfig,
    Problem,
    load_config,
    normalise_config,
    read_config_bytes,
    schema,
    with_default_handler,
)
from ..core.schedule import plan
from ..core.simulate import simulate
from ..core.state import AgentState
from ..core.timeutil import format_duration, iso
from ..handlers.registry import (
    default_handler,
    handler_names,
)
from ..runtime.engine import AgentRunner
from ..runtime.local import run_local, run_once, stop_on_signals
from ..runtime.store import StateStore
from .common import (
    EXIT_INVALID,
    EXIT_OK,
    EXIT_RUN_FAILED,
    MAX_SIMULATED_TICKS,
    UsageError,
    _duration,
    _instant,
    _json_line,
    _out,
    _require_file,
    _state_path,
)
from .render import _default_of, _emit, _evaluation_json, _format, _print_problems, _ratio


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
    if not args.local:  # the broker's libraries are loaded for this only
        bus = importlib.import_module(".bus", __package__)
        code: int = bus.cmd_run_bus(args)
        return code
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
