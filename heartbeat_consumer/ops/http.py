"""The health and metrics endpoint, on aiohttp.web: ``GET /health``, ``GET /metrics`` and
the read-only routes a component adds (the monitor: its status API and dashboard).

``/health`` is 200 when the component's probe says it is healthy, else 503 (a JSON
:class:`~.health.Health` either way). The probe's answer is cached for ``cache_s`` and
concurrent requests share one probe, so a busy scraper cannot flood the broker with
probes. A method other than GET and HEAD is a 405, an unknown path a 404, a route that
raises a 500. Every answer is ``Cache-Control: no-store`` and closes its connection.

Bounded against slow and stuck clients, by aiohttp: a connection must send its request
head within :data:`READ_TIMEOUT_S` (the keep-alive timer, which runs from the
connection's start), request lines, header fields and their number are capped
(:data:`MAX_LINE_BYTES`, :data:`MAX_HEADERS`), a request body at
:data:`MAX_REQUEST_BYTES` (no route reads one; an unread one is drained for at most
:data:`LINGER_S`), and a handler whose client goes away is cancelled. By this module: a
response must be taken within ``write_timeout_s`` (else the connection is aborted and
its buffer freed), and at most ``max_bytes_in_flight`` of response bodies wait in
buffers: a big response beyond that is a 503 with ``Retry-After`` (small ones, like
``/health``, are always answered). The number of connections is not capped (a slow one
is closed by the read timeout; new ones are always accepted).

aiohttp is imported here only: a command that serves no HTTP never loads it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from .health import Health, Probe, probe_with_timeout
from .metrics import CONTENT_TYPE, Metrics

__all__ = ["HealthServer", "Response", "Route", "ServeError"]

log = logging.getLogger("heartbeat_consumer.health")

READ_TIMEOUT_S = 5.0
"""A connection's request head must have arrived this long after it opened."""
WRITE_TIMEOUT_S = 10.0
SHUTDOWN_TIMEOUT_S = 2.0
"""How long ``stop()`` lets requests in progress finish."""
LINGER_S = 1.0
MAX_REQUEST_BYTES = 64 * 1024
MAX_LINE_BYTES = 8190
MAX_HEADERS = 100
MAX_CONNECTIONS = 100
"""The default of ``max_connections``, which is no longer enforced (see the module)."""
MAX_BYTES_IN_FLIGHT = 64 * 1024 * 1024
SMALL_RESPONSE_BYTES = 64 * 1024
"""Responses up to this size are sent even when the in-flight budget is spent."""

Response = tuple[int, str, bytes]
"""Status code, content type, body."""
Route = Callable[[], Awaitable[Response]]

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _ClientErrors(logging.Filter):
    """aiohttp logs a malformed request (no Host header, a line too long, not HTTP at
    all) as an error with its traceback: the client's mistake, one debug line here."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError) and record.levelno > logging.DEBUG:
            log.debug("http: a bad request: %s", " ".join(str(error.message).split()))
            return False
        return True


_server_log = logging.getLogger("heartbeat_consumer.health.aiohttp")
_server_log.addFilter(_ClientErrors())


class ServeError(Exception):
    """The HTTP port cannot be listened on (in use, not allowed, no such address)."""


class HealthServer:
    def __init__(
        self,
        probe: Probe,
        metrics: Metrics,
        *,
        port: int,
        host: str = "127.0.0.1",
        cache_s: float = 1.0,
        routes: Mapping[str, Route] | None = None,
        write_timeout_s: float = WRITE_TIMEOUT_S,
        max_bytes_in_flight: int = MAX_BYTES_IN_FLIGHT,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        """``routes``: more GET paths (``/health`` and ``/metrics`` always exist).
        ``max_connections`` is accepted for compatibility and not enforced."""
        self.probe = probe
        self.metrics = metrics
        self.port = port
        self.host = host
        self.cache_s = cache_s
        self.routes = dict(routes or {})
        self.write_timeout_s = write_timeout_s
        self.max_bytes_in_flight = max_bytes_in_flight
        self.max_connections = max_connections
        self.bytes_in_flight = 0
        """Bytes of response bodies being written and not yet taken by their clients."""
        self._cached: tuple[float, Health] | None = None
        self._probing: asyncio.Task[Health] | None = None
        self._runner: web.AppRunner | None = None

    @property
    def connections(self) -> int:
        """The connections open now."""
        server = self._runner.server if self._runner is not None else None
        return 0 if server is None else len(server.connections)

    async def start(self) -> None:
        """Listen; raises :class:`ServeError` when the address cannot be had."""
        app = web.Application(client_max_size=MAX_REQUEST_BYTES)
        app.router.add_get("/health", self._handler(self._health))
        app.router.add_get("/metrics", self._handler(self._metrics))
        for path, route in self.routes.items():
            if path not in ("/health", "/metrics"):
                app.router.add_get(path, self._handler(route))
        app.router.add_route("*", "/{path:.*}", self._other)  # 404 and 405
        runner = web.AppRunner(
            app,
            access_log=None,
            logger=_server_log,
            handler_cancellation=True,
            shutdown_timeout=SHUTDOWN_TIMEOUT_S,
            keepalive_timeout=READ_TIMEOUT_S,
            lingering_time=LINGER_S,
            max_line_size=MAX_LINE_BYTES,
            max_field_size=MAX_LINE_BYTES,
            max_headers=MAX_HEADERS,
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
        except OSError as exc:
            await runner.cleanup()
            if exc.errno and exc.errno > 0:
                why = os.strerror(exc.errno)
            else:  # a name that does not resolve: a negative errno, its text in strerror
                why = exc.strerror or str(exc)
            raise ServeError(
                f"cannot serve HTTP on {self.host}:{self.port}: {why} "
                "(another process has the port? choose another one)"
            ) from None
        self._runner = runner
        if self.port == 0:  # an ephemeral port: report the one we got
            self.port = int(runner.addresses[0][1])
        log.info(
            "serving http://%s:%d: %s",
            self.host,
            self.port,
            ", ".join(["/health", "/metrics", *self.routes]),
        )

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(runner.cleanup(), SHUTDOWN_TIMEOUT_S + 3)
        probing = self._probing
        if probing is not None:
            probing.cancel()
            await asyncio.gather(probing, return_exceptions=True)

    async def health(self) -> Health:
        """The probe's answer, at most ``cache_s`` old. Concurrent callers share one
        probe, which runs on (to its answer or its timeout) when they go away."""
        cached = self._cached
        if cached is not None and time.monotonic() - cached[0] < self.cache_s:
            return cached[1]
        if self._probing is None:
            self._probing = asyncio.create_task(self._probe())
        return await asyncio.shield(self._probing)

    async def _probe(self) -> Health:
        started = time.monotonic()
        try:
            health = await probe_with_timeout(self.probe)
            self._cached = (started, health)
            return health
        finally:
            self._probing = None

    async def _health(self) -> Response:
        health = await self.health()
        body = orjson.dumps(health.to_json(), option=orjson.OPT_APPEND_NEWLINE)
        return (200 if health.ok else 503), "application/json", body

    async def _metrics(self) -> Response:
        return 200, CONTENT_TYPE, self.metrics.render()

    def _handler(self, route: Route) -> _Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            try:
                status, content_type, body = await route()
            except Exception as exc:  # a bug or bad data behind a route: an answer anyway
                log.error(
                    "http: %s %s failed: %s: %s",
                    request.method,
                    request.path,
                    type(exc).__name__,
                    exc,
                )
                status, content_type, body = 500, "text/plain", b"internal error\n"
            return await self._send(request, status, content_type, body)

        return handle

    async def _other(self, request: web.Request) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            return await self._send(
                request, 405, "text/plain", b"only GET and HEAD\n", {"Allow": "GET, HEAD"}
            )
        paths = ", ".join(["/health", "/metrics", *self.routes])
        return await self._send(request, 404, "text/plain", f"not found: try {paths}\n".encode())

    async def _send(
        self,
        request: web.Request,
        status: int,
        content_type: str,
        body: bytes,
        extra: Mapping[str, str] | None = None,
    ) -> web.StreamResponse:
        """Write the response here, within the write timeout and the in-flight budget."""
        size = 0 if request.method == "HEAD" else len(body)
        if size > SMALL_RESPONSE_BYTES and size > self.max_bytes_in_flight - self.bytes_in_flight:
            status, content_type, body = 503, "text/plain", b"busy: retry in a second\n"
            size, extra = len(body), {"Retry-After": "1"}
        headers = {"Content-Type": content_type, "Cache-Control": "no-store", **(extra or {})}
        response = web.Response(status=status, body=body, headers=headers)
        response.force_close()
        self.bytes_in_flight += size
        try:
            await asyncio.wait_for(_write(request, response), self.write_timeout_s)
        except TimeoutError:
            log.debug("http: a client took no response for %g s; dropped", self.write_timeout_s)
            if request.transport is not None:
                request.transport.abort()  # frees the buffer now, not when the client reads
        except ConnectionError:
            pass
        finally:
            self.bytes_in_flight -= size
        return response


async def _write(request: web.Request, response: web.Response) -> None:
    await response.prepare(request)
    await response.write_eof()
