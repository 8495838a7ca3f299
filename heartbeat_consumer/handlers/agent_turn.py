"""The ``agent_turn`` handler: wake an AI agent (``claude -p``, say) on schedule, cheaply.

Settings in the check's ``meta``:

- ``argv`` (required): the agent command, no shell. The prompt is appended as the last
  argument, or written to stdin with ``promptVia: "stdin"``.
- ``prompt``: default :data:`~.heartbeat_md.DEFAULT_PROMPT` (also for a prompt of only
  whitespace).
- ``checklist``: path of a HEARTBEAT.md (relative to ``workdir``). An effectively empty
  one skips the turn (status skipped, reason ``empty-checklist``); a missing one runs.
- ``workdir``: the agent's working directory.
- ``env``: names of environment variables the agent may see, besides PATH, HOME, LANG,
  LC_ALL, TZ, TMPDIR, USER and the HEARTBEAT_* ones (or an object of variables to set).
  Nothing else leaks to it.
- ``ackMaxChars`` (300), ``maxOutputBytes`` (65536), ``dedupWindowMs`` (24 h),
  ``pauseAfterAuthFailures`` (2), ``authPauseMs`` (6 h).

The reply follows the HEARTBEAT_OK contract (:func:`~.heartbeat_md.parse_reply`): a
silent success, or an alert with the message. The same alert again within the dedup
window is skipped (reason ``duplicate``); the alert's fingerprint is kept in the state,
which is saved only after the result was published. A non-zero exit is a failure with
the tail of stderr; authentication or quota failures in a row pause the check (reason
kept in the state) instead of paying for a failing turn every tick. The check's timeout
kills the agent's whole process group.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from ..core.config import CheckConfig, Pause, read_bounded
from ..core.state import CheckState
from ..core.timeutil import iso
from .heartbeat_md import (
    DEDUP_WINDOW_MS,
    DEFAULT_ACK_MAX_CHARS,
    checklist_is_empty,
    classify_failure,
    fingerprint,
    is_duplicate,
    parse_reply,
    remember_alert,
    resolve_prompt,
)
from .process import BASE_ENV, child_env, meta_argv, output_limit, run_process
from .registry import RunContext, current_run, register_handler

__all__ = ["BASE_ENV", "agent_turn"]

DEFAULT_MAX_OUTPUT_BYTES = 65_536
DEFAULT_PAUSE_AFTER_AUTH_FAILURES = 2
DEFAULT_AUTH_PAUSE_MS = 6 * 3_600_000
STDERR_TAIL_CHARS = 2000
MAX_CHECKLIST_BYTES = 1024 * 1024
"""A HEARTBEAT.md larger than this (or not a regular file) fails the check."""


class _Settings:
    def __init__(self, meta: dict[str, Any]) -> None:
        self.argv = meta_argv(meta)
        self.prompt = resolve_prompt(meta.get("prompt"))
        self.via = meta.get("promptVia", "argument")
        if self.via not in ("argument", "stdin"):
            raise ValueError('meta.promptVia must be "argument" or "stdin"')
        self.workdir = str(meta["workdir"]) if meta.get("workdir") else None
        self.checklist = str(meta["checklist"]) if meta.get("checklist") else None
        self.env: object = meta.get("env")
        child_env(self.env, {})  # ValueError now rather than at the turn
        self.ack_max = int(meta.get("ackMaxChars", DEFAULT_ACK_MAX_CHARS))
        self.limit = output_limit(meta, DEFAULT_MAX_OUTPUT_BYTES)
        self.window = int(meta.get("dedupWindowMs", DEDUP_WINDOW_MS))
        self.pause_after = int(
            meta.get("pauseAfterAuthFailures", DEFAULT_PAUSE_AFTER_AUTH_FAILURES)
        )
        self.pause_ms = int(meta.get("authPauseMs", DEFAULT_AUTH_PAUSE_MS))

    def checklist_path(self) -> Path | None:
        if self.checklist is None:
            return None
        path = Path(self.checklist)
        return path if path.is_absolute() or self.workdir is None else Path(self.workdir) / path

    def environment(self, tick_payload: dict[str, Any]) -> dict[str, str]:
        return child_env(self.env, tick_payload)


@register_handler("agent_turn")
async def agent_turn(tick_payload: dict[str, Any], check_config: CheckConfig) -> dict[str, Any]:
    """One agent turn under the HEARTBEAT_OK contract (see the module documentation)."""
    try:
        settings = _Settings(check_config.meta)
    except (ValueError, TypeError) as exc:
        return {"status": "failed", "error": str(exc)}
    checklist = settings.checklist_path()
    if checklist is not None:
        try:
            raw = await asyncio.to_thread(read_bounded, checklist, MAX_CHECKLIST_BYTES)
            text: str | None = raw.decode("utf-8", errors="replace")
        except FileNotFoundError:
            text = None  # no checklist: the prompt alone decides
        except OSError as exc:
            return {"status": "failed", "error": f"cannot read {checklist}: {exc.strerror}"}
        except ValueError as exc:  # a FIFO, a device, a file over the limit
            return {"status": "failed", "error": f"cannot use {checklist}: {exc}"}
        if text is not None and checklist_is_empty(text):
            return {"status": "skipped", "reason": "empty-checklist", "checklist": str(checklist)}

    argv = settings.argv if settings.via == "stdin" else [*settings.argv, settings.prompt]
    try:
        done = await run_process(
            argv,
            stdin=settings.prompt.encode() if settings.via == "stdin" else None,
            cwd=settings.workdir,
            env=settings.environment(tick_payload),
            limit=settings.limit,
        )
    except OSError as exc:
        return {"status": "failed", "error": f"cannot start {argv[0]!r}: {exc.strerror or exc}"}

    ctx = current_run()
    if done.exit_code != 0:
        stderr = done.stderr[-STDERR_TAIL_CHARS:]
        result: dict[str, Any] = {
            "status": "failed",
            "error": f"exit code {done.exit_code}: {stderr.strip() or done.stdout[-500:]}",
            "exit_code": done.exit_code,
            "stderr": stderr,
        }
        kind = classify_failure(f"{done.stderr}\n{done.stdout}")
        if kind is not None:
            result["failure_kind"] = kind
            if ctx is not None:
                result.update(_count_auth_failure(ctx, settings, kind))
        return result
    if ctx is not None:
        _set_check(ctx, auth_failures=0)

    reply = parse_reply(done.stdout, settings.ack_max)
    if reply.status == "success":
        return {"status": "success", "silent": reply.silent, "message": reply.message}
    key = fingerprint(reply.message)
    if ctx is not None:
        recent = _check_state(ctx).recent_alerts
        if is_duplicate(recent, key, ctx.slot_ms, settings.window):
            return {
                "status": "skipped",
                "reason": "duplicate",
                "fingerprint": key,
                "first_sent": iso(recent[key]),
                "message": reply.message,
            }
        _set_check(ctx, recent_alerts=remember_alert(recent, key, ctx.slot_ms, settings.window))
    return {"status": "alert", "silent": False, "message": reply.message, "fingerprint": key}


def _check_state(ctx: RunContext) -> CheckState:
    return ctx.state.check(ctx.check.name, ctx.check.last_run)


def _set_check(ctx: RunContext, **changes: Any) -> None:
    """Change this check's state; the engine saves it after the result is published."""
    updated = _check_state(ctx).model_copy(update=changes)
    ctx.state = ctx.state.model_copy(
        update={"checks": {**ctx.state.checks, ctx.check.name: updated}}
    )


def _count_auth_failure(ctx: RunContext, settings: _Settings, kind: str) -> dict[str, Any]:
    failures = _check_state(ctx).auth_failures + 1
    _set_check(ctx, auth_failures=failures)
    if failures < settings.pause_after:
        return {"auth_failures": failures}
    until = ctx.slot_ms + settings.pause_ms
    reason = f"{failures} {kind} failures in a row; paused until {iso(until)} (resume to retry)"
    pauses = {**ctx.state.pauses, ctx.check.name: Pause(until=until, reason=reason)}
    ctx.state = ctx.state.model_copy(update={"pauses": pauses})
    return {"auth_failures": failures, "paused_until": iso(until), "pause_reason": reason}
