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
from datetime import UTC, datetime
from typing import Any

from .connection import (
    TlsFiles,
    closed_on_failure,
    connect,
    make_broker,
    publish_json,
    topic_exchange,
)
from .engine import wall_clock_ms
from .envelope import envelope, tick_event_id
from .health import Health
from .local import next_slot
from .metrics import Metrics
from .provision import declare_exchanges
from .schedule import quarter_at
from .service import run_service
from .timeutil import iso, zone
from .topology import (
    DEFAULT_EXCHANGE,
    DEFAULT_URL,
    TICK_KEY,
    agent_key,
    mask_url,
)

__all__ = ["Ticker", "manual_tick_key", "publish_event", "run_ticker", "tick_envelope"]

log = logging.getLogger("heartbeat_consumer.ticker")


def tick_envelope(exchange: str, slot_ms: int, every_ms: int) -> dict[str, Any]:
    """The tick for ``slot_ms``: identical from every ticker on the same exchange. The
    payload has the fields of Bloodbank's tick publisher, which that ecosystem's
    consumers read (all in UTC: ``quarter`` of the year, ``day_of_week`` by name,
    ``hour``, ``minute``; ``tick`` counts intervals since the epoch, so it increases
    and is the same from every ticker), and ours (``tick_id``, ``interval_ms``,
    ``quarter_of_day``). ``source.type`` is ``scheduled``, as from Bloodbank's tick
    publisher."""
    utc = datetime.fromtimestamp(slot_ms / 1000, UTC)
    return envelope(
        TICK_KEY,
        {
            "tick": slot_ms // every_ms,
            "tick_id": str(slot_ms // every_ms),
            "timestamp": iso(slot_ms),
            "epoch_ms": slot_ms,
            "interval_ms": every_ms,
            "quarter": quarter_at(slot_ms, zone("UTC"), "year"),
            "quarter_of_day": quarter_at(slot_ms, zone("UTC")),
            "day_of_week": _DAYS[utc.weekday()],
            "hour": utc.hour,
            "minute": utc.minute,
        },
        timestamp_ms=slot_ms,
        event_id=tick_event_id(exchange, slot_ms),
        source_type="scheduled",
        component="ticker",
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
    declare: bool = True,
) -> dict[str, Any]:
    """Publish one event (a manual tick, a command) with publisher confirms; ``declare``
    the exchanges first (else, or if refused, check that they exist). The envelope's
    ``event_type`` is ``routing_key`` (Bloodbank's convention); ``event_type`` is not
    used any more (it was the fixed word sent before) and stays for callers."""
    broker = make_broker(rabbit_url, tls=tls)
    connection = await connect(broker, rabbit_url)
    try:
        exchange = topic_exchange(exchange_name)
        await declare_exchanges(connection, exchange_name, declare=declare)
        event = envelope(
            routing_key,
            payload,
            timestamp_ms=wall_clock_ms() if now_ms is None else now_ms,
            event_id=str(uuid.uuid4()),
            source_type="manual",
            component="cli",
        )
        await publish_json(broker, exchange, routing_key, event)
        return event
    finally:
        await broker.stop()


_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
"""English names, whatever the locale (strftime's %A is the locale's)."""


def manual_tick_key(agent: str | None) -> str:
    return TICK_KEY if agent is None else agent_key(agent, "tick")


class Ticker:
    """Publishes a tick at every boundary; a failed publish (broker down) is logged and
    the ticker carries on with the next slot while the connection reconnects by itself."""

    def __init__(
        self,
        *,
        rabbit_url: str = DEFAULT_URL,
        exchange_name: str = DEFAULT_EXCHANGE,
        every_ms: int = 60_000,
        clock: Callable[[], int] = wall_clock_ms,
        tls: TlsFiles | None = None,
        declare_exchanges: bool = True,
    ) -> None:
        self.rabbit_url = rabbit_url
        self.exchange_name = exchange_name
        self.every_ms = every_ms
        self.clock = clock
        self.metrics = Metrics()
        self.broker = make_broker(rabbit_url, tls=tls)
        self.exchange = topic_exchange(exchange_name)
        self.declare_topology = declare_exchanges
        self.sent = 0
        self.last_slot: int | None = None

    async def start(self) -> None:
        log.info(
            "ticker: %s, exchange %s, every %d ms",
            mask_url(self.rabbit_url),
            self.exchange_name,
            self.every_ms,
        )
        connection = await connect(self.broker, self.rabbit_url)
        async with closed_on_failure(self.broker):
            # The dead-letter exchange too: least-privileged agents only check it exists.
            await declare_exchanges(connection, self.exchange_name, declare=self.declare_topology)

    async def stop(self) -> None:
        await self.broker.stop()

    async def health(self) -> Health:
        connected = await self.broker.ping(timeout=2)
        last = iso(self.last_slot) if self.last_slot is not None else None
        return Health(connected, connected, {"ticks_sent": self.sent, "last_tick": last})

    def describe(self) -> str:
        return f"ticking {self.exchange_name} every {self.every_ms} ms; {self.sent} sent"

    async def publish(self, slot_ms: int) -> None:
        event = tick_envelope(self.exchange_name, slot_ms, self.every_ms)
        await publish_json(self.broker, self.exchange, TICK_KEY, event, expiration_ms=self.every_ms)
        self.sent += 1
        self.last_slot = slot_ms
        self.metrics.ticks_published.inc()

    async def tick_until(self, stop: asyncio.Event, max_ticks: int | None = None) -> int:
        """Tick at every boundary until ``stop`` (or ``max_ticks``); the number sent."""
        now = self.clock()
        slot = now - now % self.every_ms + self.every_ms  # the next boundary
        while not stop.is_set():
            delay = (slot - self.clock()) / 1000
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                if stop.is_set():
                    break
            try:
                await self.publish(slot)
            except Exception as exc:
                self.metrics.tick_publish_errors.inc()
                log.error("tick for slot %d not published: %s", slot, exc)
            if max_ticks is not None and self.sent >= max_ticks:
                break
            slot = next_slot(slot, self.clock(), self.every_ms)
        return self.sent


async def run_ticker(
    *,
    rabbit_url: str = DEFAULT_URL,
    exchange_name: str = DEFAULT_EXCHANGE,
    every_ms: int = 60_000,
    stop: asyncio.Event | None = None,
    max_ticks: int | None = None,
    clock: Callable[[], int] = wall_clock_ms,
    tls: TlsFiles | None = None,
    declare_exchanges: bool = True,
    health_port: int | None = None,
    health_host: str = "127.0.0.1",
) -> int:
    """Run a :class:`Ticker` as a service until ``stop``; returns the number published."""
    stop = stop or asyncio.Event()
    ticker = Ticker(
        rabbit_url=rabbit_url,
        exchange_name=exchange_name,
        every_ms=every_ms,
        clock=clock,
        tls=tls,
        declare_exchanges=declare_exchanges,
    )
    await run_service(
        ticker,
        stop,
        health_port=health_port,
        health_host=health_host,
        main=lambda: ticker.tick_until(stop, max_ticks),
    )
    return ticker.sent
