"""Running a long-lived component as a service: start, tell systemd, serve health, stop.

The lifecycle shared by the consumer, the fleet and the ticker:

1. the health and metrics endpoint, if a port was given (first: a port in use is an
   error before anything is connected, declared or run); ``start()`` (connect, declare,
   consume); then ``READY=1`` to systemd;
2. while running, ``WATCHDOG=1`` at half of ``WatchdogSec``. The ping stops only when the
   broker connection is up but the component has been unhealthy for ``grace_s`` (its
   consumer was cancelled, say): a restart fixes that. While the broker is unreachable
   the pings go on, because a restart cannot help and the connection reconnects itself;
3. on the stop event: ``STOPPING=1``, then ``stop()`` (graceful: the running handler
   finishes and is acknowledged).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Protocol

from .health import Health, probe_with_timeout
from .metrics import Metrics
from .sdnotify import notify, watchdog_interval_s

if TYPE_CHECKING:
    from .http import Route

__all__ = ["Service", "run_service"]

log = logging.getLogger("heartbeat_consumer.service")

WATCHDOG_GRACE_S = 60.0


class Service(Protocol):
    @property
    def metrics(self) -> Metrics: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def health(self) -> Health: ...

    def describe(self) -> str:
        """One line for ``systemctl status`` (STATUS=)."""
        ...


async def run_service(
    service: Service,
    stop: asyncio.Event,
    *,
    health_port: int | None = None,
    health_host: str = "127.0.0.1",
    main: Callable[[], Awaitable[object]] | None = None,
    grace_s: float = WATCHDOG_GRACE_S,
    routes: Mapping[str, Route] | None = None,
) -> None:
    """Run ``service`` until ``stop`` is set, or, given ``main``, until ``main()`` returns.
    ``routes`` adds GET paths to the health port's server."""
    server = None
    if health_port is not None:  # bound first: a busy port fails before anything happens
        from .http import HealthServer  # noqa: PLC0415 (loads aiohttp only when serving)

        server = HealthServer(
            service.health, service.metrics, port=health_port, host=health_host, routes=routes
        )
        await server.start()
    try:
        await service.start()
    except BaseException:
        if server is not None:
            await server.stop()
        raise
    try:
        notify("READY=1", f"STATUS={service.describe()}")
        interval = watchdog_interval_s()
        watchdog = asyncio.create_task(_watchdog(service, interval, grace_s)) if interval else None
        try:
            if main is not None:
                await main()
            else:
                await stop.wait()
        finally:
            if watchdog is not None:
                watchdog.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watchdog
    finally:
        notify("STOPPING=1", "STATUS=stopping")
        if server is not None:
            await server.stop()
        await service.stop()


async def _watchdog(service: Service, interval_s: float, grace_s: float) -> None:
    unhealthy_since: float | None = None
    withheld = False
    status = ""
    while True:
        health = await probe_with_timeout(service.health, timeout_s=interval_s)
        if health.ok or not health.connected:
            unhealthy_since = None
        elif unhealthy_since is None:
            unhealthy_since = time.monotonic()
        stuck = unhealthy_since is not None and time.monotonic() - unhealthy_since >= grace_s
        line = service.describe() if health.ok else f"unhealthy: {health.to_json()}"
        if stuck:
            if not withheld:
                log.error(
                    "unhealthy for %.0f s with the broker connected (%s); "
                    "withholding the watchdog ping so that systemd restarts this service",
                    grace_s,
                    health.to_json(),
                )
                withheld = True
            notify(f"STATUS={line}")
        else:
            withheld = False
            notify("WATCHDOG=1", *([f"STATUS={line}"] if line != status else []))
        status = line
        await asyncio.sleep(interval_s)
