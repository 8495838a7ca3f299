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

from ..core.envelope import envelope, tick_event_id
from ..core.schedule import quarter_at
from ..core.timeutil import iso, zone
from ..core.topology import (
    DEFAULT_EXCHANGE,
    DEFAULT_URL,
    TICK_KEY,
    agent_key,
    mask_url,
)
from ..ops.health import Health
from ..ops.metrics import Metrics
from ..ops.service import run_service
from ..ops.settings import ServeSettings
from ..runtime.engine import wall_clock_ms
from ..runtime.local import next_slot, stop_on_signals
from .connection import (
    TlsFiles,
    closed_on_failure,
    connect,
    make_broker,
    publish_json,
    topic_exchange,
)
from .provision import declare_exchanges
from .settings import (
    BUS_ARGUMENTS,
    DEFAULT_BUS,
    DEFAULT_SERVE,
    SERVE_ARGUMENTS,
    BusSettings,
    Deprecated,
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
    the ticker carries on with the next slot while the connection reconnects by itself.

    ``Ticker(bus=BusSettings(...), every_ms=..., serve=ServeSettings(...)).run_sync()``;
    the arguments ``bus`` replaces (``rabbit_url``, ``exchange_name``, ``tls``,
    ``declare_exchanges``) still work, each with a DeprecationWarning."""

    def __init__(
        self,
        *,
        bus: BusSettings = DEFAULT_BUS,
        every_ms: int = 60_000,
        clock: Callable[[], int] = wall_clock_ms,
        serve: ServeSettings = DEFAULT_SERVE,
        **old: Any,
    ) -> None:
        deprecated = Deprecated("Ticker", old, accepts=BUS_ARGUMENTS)
        self.bus = deprecated.settle(bus, DEFAULT_BUS)
        self.serve = serve
        self.rabbit_url = self.bus.url
        self.exchange_name = self.bus.exchange
        self.every_ms = every_ms
        self.clock = clock
        self.metrics = Metrics()
        self.broker = make_broker(self.bus.url, tls=self.bus.tls)
        self.exchange = topic_exchange(self.bus.exchange)
        self.declare_topology = self.bus.declare
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
        return Health(
            ok=connected,
            connected=connected,
            detail={"ticks_sent": self.sent, "last_tick": last},
        )

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

    async def serve_until(self, stop: asyncio.Event, max_ticks: int | None = None) -> None:
        """Run as a service (health endpoint, systemd) until ``stop`` or ``max_ticks``."""
        await run_service(
            self,
            stop,
            health_port=self.serve.port,
            health_host=self.serve.host,
            main=lambda: self.tick_until(stop, max_ticks),
        )

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Run until ``stop`` is set, or SIGINT/SIGTERM."""
        await self.serve_until(stop_on_signals(stop))

    def run_sync(self) -> None:
        """Run until SIGINT or SIGTERM, in a new event loop."""
        asyncio.run(self.run())


async def run_ticker(
    *,
    bus: BusSettings = DEFAULT_BUS,
    serve: ServeSettings = DEFAULT_SERVE,
    every_ms: int = 60_000,
    stop: asyncio.Event | None = None,
    max_ticks: int | None = None,
    clock: Callable[[], int] = wall_clock_ms,
    **old: Any,
) -> int:
    """Run a :class:`Ticker` as a service until ``stop`` (or ``max_ticks``); returns the
    number published. The arguments ``bus`` and ``serve`` replace (``rabbit_url``, ...,
    ``health_port``, ``health_host``) still work, each with a DeprecationWarning."""
    deprecated = Deprecated("run_ticker", old, accepts=(*BUS_ARGUMENTS, *SERVE_ARGUMENTS))
    ticker = Ticker(
        bus=deprecated.settle(bus, DEFAULT_BUS),
        every_ms=every_ms,
        clock=clock,
        serve=deprecated.settle(serve, DEFAULT_SERVE),
    )
    await ticker.serve_until(stop or asyncio.Event(), max_ticks)
    return ticker.sent
