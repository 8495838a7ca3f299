"""Built-in handlers: default, sub_health, quarterly_compaction, command, publish."""

from __future__ import annotations

import os
import platform
import re
import socket
import time
from typing import Any

from ..core.config import CheckConfig
from ..core.envelope import key_kind
from ..core.state import compact_history
from ..core.timeutil import iso
from ..core.topology import dispatch_key
from .process import child_env, meta_argv, output_limit, run_process
from .registry import current_run, register_handler

__all__ = ["command", "default", "publish", "quarterly_compaction", "sub_health"]

DEFAULT_MAX_OUTPUT_BYTES = 4096
DEFAULT_KEEP_PER_CHECK = 20
DEFAULT_ALERT_AFTER_FAILURES = 3
_ROUTING_KEY = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+){0,15}(?!\n)$")


@register_handler("default")
async def default(tick_payload: dict[str, Any], check_config: CheckConfig) -> dict[str, Any]:
    """No-op: succeeds and records the run."""
    return {"status": "success"}


@register_handler("sub_health")
async def sub_health(tick_payload: dict[str, Any], check_config: CheckConfig) -> dict[str, Any]:
    """The agent's health: process, uptime, and the last result of every check.

    Status ``alert`` when another check has failed ``meta.alertAfterFailures``
    (default 3) times in a row.
    """
    report: dict[str, Any] = {
        "agent": tick_payload.get("agent"),
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "python": platform.python_version(),
    }
    ctx = current_run()
    if ctx is None:
        return {"status": "success", **report}
    threshold = int(check_config.meta.get("alertAfterFailures", DEFAULT_ALERT_AFTER_FAILURES))
    report["uptime_s"] = round(time.time() - ctx.process_started_ms / 1000, 3)
    checks = {}
    failing = []
    for name, cs in sorted(ctx.state.checks.items()):
        checks[name] = {
            "last_status": cs.last_status,
            "last_run": iso(cs.last_run) if cs.last_run is not None else None,
            "consecutive_failures": cs.consecutive_failures,
        }
        if name != check_config.name and cs.consecutive_failures >= threshold:
            failing.append(name)
    report["checks"] = checks
    if failing:
        return {"status": "alert", "failing": failing, **report}
    return {"status": "success", **report}


@register_handler("quarterly_compaction")
async def quarterly_compaction(
    tick_payload: dict[str, Any], check_config: CheckConfig
) -> dict[str, Any]:
    """Compact the state file's run history to ``meta.keepPerCheck`` (default 20) per check."""
    ctx = current_run()
    if ctx is None:
        return {"status": "skipped", "reason": "no state to compact outside the engine"}
    keep = check_config.meta.get("keepPerCheck", DEFAULT_KEEP_PER_CHECK)
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
        return {"status": "failed", "error": "meta.keepPerCheck must be a whole number >= 0"}
    ctx.state, removed = compact_history(ctx.state, keep)
    return {"status": "success", "removed": removed, "kept": len(ctx.state.history)}


@register_handler("command")
async def command(tick_payload: dict[str, Any], check_config: CheckConfig) -> dict[str, Any]:
    """Run ``meta.argv`` without a shell. Exit 0 = success, else failed.

    Options in meta: ``cwd``, ``env`` (a list of the consumer's variables to pass on, or
    an object of variables to set), ``maxOutputBytes`` (default 4096, the tail of stdout
    and stderr is kept). The check's timeout kills the whole process group. The child
    sees PATH, HOME, LANG, LC_ALL, TZ, TMPDIR, USER, what ``env`` names, and
    HEARTBEAT_AGENT, HEARTBEAT_CHECK, HEARTBEAT_SLOT and HEARTBEAT_IDEMPOTENCY_KEY:
    nothing else of the consumer's environment (its broker password stays with it).
    """
    meta = check_config.meta
    try:
        argv = meta_argv(meta)
        env = child_env(meta.get("env"), tick_payload)
        limit = output_limit(meta, DEFAULT_MAX_OUTPUT_BYTES)
    except ValueError as exc:
        return {"status": "failed", "error": str(exc)}
    try:
        done = await run_process(argv, cwd=meta.get("cwd"), env=env, limit=limit)
    except OSError as exc:
        return {"status": "failed", "error": f"cannot start {argv[0]!r}: {exc.strerror or exc}"}
    code = done.exit_code
    result: dict[str, Any] = {"exit_code": code, "stdout": done.stdout, "stderr": done.stderr}
    if code == 0:
        return {"status": "success", **result}
    return {"status": "failed", "error": f"exit code {code}", **result}


@register_handler("publish")
async def publish(tick_payload: dict[str, Any], check_config: CheckConfig) -> dict[str, Any]:
    """Publish an event to the bus, under ``meta.eventType`` (default
    ``heartbeat.<agent>.<check>.dispatch``), which is also its ``event_type``.

    The payload is ``meta.payload`` (an object, default empty) with ``agent``,
    ``agent_name``, ``check``, ``check_id``, ``description``, ``slot`` and
    ``idempotency_key`` set. Skipped where there is no bus (``run --local``,
    ``run-once``). Bloodbank's ``action: publish`` is this handler. A key that is one of
    the heartbeat's own (a tick, a command to an agent, a run's result or status: see
    :func:`~..core.envelope.key_kind`) fails the check: an event must not pose as them.
    """
    ctx = current_run()
    if ctx is None or ctx.publish is None:
        return {"status": "skipped", "reason": "no bus to publish to (a local run)"}
    meta = check_config.meta
    key = meta.get("eventType") or dispatch_key(ctx.agent, check_config.name)
    if not isinstance(key, str) or len(key) > 255 or not _ROUTING_KEY.fullmatch(key):
        return {
            "status": "failed",
            "error": "meta.eventType must be a routing key: words of letters, digits, "
            "'_' or '-' joined by '.', no wildcards, at most 255 characters",
        }
    kind = key_kind(key)
    if kind is not None:  # an agent would read it as a tick or command, a monitor as ours
        return {
            "status": "failed",
            "error": f"meta.eventType {key!r} is the key of a heartbeat {kind}; "
            "publish events under keys of their own",
        }
    extra = meta.get("payload", {})
    if not isinstance(extra, dict):
        return {"status": "failed", "error": "meta.payload must be an object"}
    payload = {
        **extra,
        "agent": ctx.agent,
        "agent_name": ctx.agent,
        "check": check_config.name,
        "check_id": check_config.name,
        "description": check_config.description or "",
        "slot": iso(ctx.slot_ms),
        "idempotency_key": tick_payload.get("idempotency_key"),
    }
    await ctx.publish(key, payload)
    return {"status": "success", "published": key}
