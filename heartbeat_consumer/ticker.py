"""The tick publisher, and one-off publishes (a manual tick, a run command).

Ticks fall on interval boundaries aligned to the epoch, like cron; each carries its
slot as ``timestamp`` and ``payload.epoch_ms``, an ``event_id`` derived from the
exchange and the slot (two tickers for availability send identical ticks, which
consumers de-duplicate), and a per-message expiration of one interval, so ticks that
nobody took in time never pile up into a burst.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable
from typing import Any

from .connection import TlsFiles, make_broker, publish_json, topic_exchange
from .engine import wall_clock_ms
from .envelope import envelope, tick_event_id
from .local import next_slot
from .schedule import quarter_at
from .timeutil import zone
from .topology import DEFAULT_EXCHANGE, DEFAULT_URL, TICK_KEY, agent_key, mask_url

__all__ = ["manual_tick_key", "publish_event", "run_ticker", "tick_envelope"]

log = logging.getLogger("heartbeat_consumer.ticker")


def tick_envelope(exchange: str, slot_ms: int, every_ms: int) -> dict[str, Any]:
    """The tick for ``slot_ms``: identical from every ticker on the same exchange."""
    return envelope(
        "system.heartbeat.tick",
        {
            "tick_id": str(slot_ms // every_ms),
            "epoch_ms": slot_ms,
            "interval_ms": every_ms,
            "quarter": quarter_at(slot_ms, zone("UTC")),
        },
        timestamp_ms=slot_ms,
        event_id=tick_event_id(exchange, slot_ms),
        source_type="ticker",
    )


async def publish_event(
    routing_key: str,
    event_type: str,
    payload: dict[str, Any],
    *,
    rabbit_url: str = DEFAULT_URL,
    exchange_name: str = DEFAULT_EXCHANGE,
    now_ms: int | None = None,
    tls: TlsFiles | None = None,
) -> dict[str, Any]:
    """Publish one event (a manual tick, a command) with publisher confirms."""
    broker = make_broker(rabbit_url, tls=tls)
    await broker.connect()
    try:
        exchange = topic_exchange(exchange_name)
        await broker.declare_exchange(exchange)
        event = envelope(
            event_type,
            payload,
            timestamp_ms=wall_clock_ms() if now_ms is None else now_ms,
            event_id=str(uuid.uuid4()),
            source_type="cli",
        )
        await publish_json(broker, exchange, routing_key, event)
        return event
    finally:
        await broker.stop()


def manual_tick_key(agent: str | None) -> str:
    return TICK_KEY if agent is None else agent_key(agent, "tick")


async def run_ticker(
    *,
    rabbit_url: str = DEFAULT_URL,
    exchange_name: str = DEFAULT_EXCHANGE,
    every_ms: int = 60_000,
    stop: asyncio.Event | None = None,
    max_ticks: int | None = None,
    clock: Callable[[], int] = wall_clock_ms,
    tls: TlsFiles | None = None,
) -> int:
    """Publish a tick at every boundary until ``stop``; returns the number published.

    A failed publish (broker down) is logged and the ticker carries on with the next
    slot; the connection reconnects by itself.
    """
    stop = stop or asyncio.Event()
    broker = make_broker(rabbit_url, tls=tls)
    log.info("ticker: %s, exchange %s, every %d ms", mask_url(rabbit_url), exchange_name, every_ms)
    await broker.connect()
    exchange = topic_exchange(exchange_name)
    await broker.declare_exchange(exchange)
    sent = 0
    now = clock()
    slot = now - now % every_ms + every_ms  # the next boundary
    try:
        while not stop.is_set():
            delay = (slot - clock()) / 1000
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                if stop.is_set():
                    break
            try:
                event = tick_envelope(exchange_name, slot, every_ms)
                await publish_json(broker, exchange, TICK_KEY, event, expiration_ms=every_ms)
                sent += 1
            except Exception as exc:
                log.error("tick for slot %d not published: %s", slot, exc)
            if max_ticks is not None and sent >= max_ticks:
                break
            slot = next_slot(slot, clock(), every_ms)
    finally:
        await broker.stop()
    return sent
