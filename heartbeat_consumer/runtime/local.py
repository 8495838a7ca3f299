"""Running without a broker: an in-process ticker (``run --local``) and ``run-once``.

Ticks fall on interval boundaries aligned to the epoch (like cron), and each tick's
``now`` is its slot, so the schedule never drifts. After a suspend or a long handler,
missed slots are skipped rather than replayed: each due check runs once.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable

from ..core.timeutil import floor_to
from .engine import AgentRunner, TickReport, local_envelope, wall_clock_ms

__all__ = ["next_slot", "run_local", "run_once", "stop_on_signals"]


def stop_on_signals(stop: asyncio.Event | None = None) -> asyncio.Event:
    """An event that SIGINT and SIGTERM set (where this loop can take signal handlers)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    return stop


def next_slot(previous_slot: int, now_ms: int, every_ms: int) -> int:
    """The slot to tick after ``previous_slot``: the next boundary, or the current one
    when boundaries were missed (never a burst of old slots)."""
    return max(previous_slot + every_ms, floor_to(now_ms, every_ms))


async def run_once(runner: AgentRunner, *, every_ms: int, now_ms: int | None = None) -> TickReport:
    """One tick at the slot containing now (for cron and systemd timers)."""
    now = wall_clock_ms() if now_ms is None else now_ms
    slot = floor_to(now, every_ms)
    return await runner.tick(slot, local_envelope(slot, source_type="run-once"))


async def run_local(
    runner: AgentRunner,
    *,
    every_ms: int,
    max_ticks: int | None = None,
    stop: asyncio.Event | None = None,
    clock: Callable[[], int] = wall_clock_ms,
) -> int:
    """Tick at every interval boundary until ``stop`` is set or ``max_ticks`` ran.

    The first evaluation happens at once, for the slot containing the start time.
    Returns the number of ticks processed.
    """
    stop = stop or asyncio.Event()
    slot = floor_to(clock(), every_ms)
    ticks = 0
    while not stop.is_set():
        await runner.tick(slot, local_envelope(slot))
        ticks += 1
        if max_ticks is not None and ticks >= max_ticks:
            break
        upcoming = slot + every_ms
        delay = (upcoming - clock()) / 1000
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
        slot = next_slot(slot, clock(), every_ms)
    return ticks
