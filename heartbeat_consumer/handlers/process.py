"""Running a child process for a handler: no shell, its own process group, bounded output.

The handler's timeout cancels the awaiting task; the whole process group is then killed
(an agent CLI's own children included), so nothing outlives the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BASE_ENV",
    "Finished",
    "child_env",
    "heartbeat_env",
    "meta_argv",
    "output_limit",
    "run_process",
    "tail_text",
]


def meta_argv(meta: dict[str, Any]) -> list[str]:
    """``meta.argv`` of a handler that runs a program; ValueError when it is not a
    non-empty list of strings (no shell: a string is refused, not split)."""
    argv = meta.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise ValueError('meta.argv must be a non-empty list of strings, e.g. ["/usr/bin/true"]')
    return list(argv)


def heartbeat_env(tick_payload: dict[str, Any]) -> dict[str, str]:
    """The variables that tell a child which run it is part of."""
    return {
        "HEARTBEAT_AGENT": str(tick_payload.get("agent", "")),
        "HEARTBEAT_CHECK": str(tick_payload.get("check_name", "")),
        "HEARTBEAT_SLOT": str(tick_payload.get("timestamp", "")),
        "HEARTBEAT_IDEMPOTENCY_KEY": str(tick_payload.get("idempotency_key", "")),
    }


MAX_OUTPUT_BYTES = 1024 * 1024
"""The most of a child's stdout (and of its stderr) a handler may keep."""


def output_limit(meta: dict[str, Any], default: int) -> int:
    """``meta.maxOutputBytes``: a whole number from 1 to :data:`MAX_OUTPUT_BYTES`, else
    ValueError."""
    value = meta.get("maxOutputBytes", default)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_OUTPUT_BYTES:
        raise ValueError(f"meta.maxOutputBytes must be a whole number from 1 to {MAX_OUTPUT_BYTES}")
    return value


BASE_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "USER")
"""What every child sees of the consumer's environment."""


def child_env(meta_env: object, tick_payload: dict[str, Any]) -> dict[str, str]:
    """A child's environment: :data:`BASE_ENV` from ours, plus the names ``meta.env``
    lists (an allow-list) or the variables it sets (an object), plus the HEARTBEAT_*
    ones. Nothing else: the consumer's secrets (``RABBIT_URL`` with its password, API
    keys) stay with it. ValueError when ``meta.env`` is neither."""
    allowed: list[str] = []
    values: dict[str, str] = {}
    if isinstance(meta_env, list) and all(isinstance(n, str) for n in meta_env):
        allowed = meta_env
    elif isinstance(meta_env, dict):
        values = {str(k): str(v) for k, v in meta_env.items()}
    elif meta_env is not None:
        raise ValueError(
            "meta.env must be a list of variable names to pass on (an allow-list), "
            "or an object of variables to set"
        )
    env = {n: os.environ[n] for n in (*BASE_ENV, *allowed) if n in os.environ}
    return {**env, **values, **heartbeat_env(tick_payload)}


@dataclass(frozen=True)
class Finished:
    exit_code: int
    stdout: str
    """The last ``limit`` bytes, prefixed with how many were cut."""
    stderr: str
    stdout_bytes: int
    """How many bytes it wrote in all."""


async def run_process(
    argv: Sequence[str],
    *,
    stdin: bytes | None = None,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
    limit: int = 4096,
) -> Finished:
    """Run ``argv`` to its end, keeping the last ``limit`` bytes of stdout and stderr.

    Raises ``OSError`` when it cannot start; on cancellation kills its process group."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=cwd,
        env=dict(env) if env is not None else None,
        start_new_session=True,
    )
    try:
        if stdin is not None and proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                proc.stdin.write(stdin)
                await proc.stdin.drain()
            proc.stdin.close()
        (out, out_total), (err, err_total) = await asyncio.gather(
            _drain(proc.stdout, limit), _drain(proc.stderr, limit)
        )
        code = await proc.wait()
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                await asyncio.shield(proc.wait())
    return Finished(code, tail_text(out, out_total), tail_text(err, err_total), out_total)


async def _drain(stream: asyncio.StreamReader | None, limit: int) -> tuple[bytes, int]:
    """Read a stream to its end, keeping the last ``limit`` bytes; return (tail, total)."""
    if stream is None:
        return b"", 0
    tail = bytearray()
    total = 0
    while chunk := await stream.read(65536):
        total += len(chunk)
        tail += chunk
        if len(tail) > limit:
            del tail[: len(tail) - limit]
    return bytes(tail), total


def tail_text(tail: bytes, total: int) -> str:
    text = tail.decode("utf-8", errors="replace")
    if total > len(tail):
        return f"[... {total - len(tail)} bytes cut ...]" + text
    return text
