"""The health and metrics endpoint: ``GET /health`` and ``GET /metrics`` over HTTP/1.1.

A deliberately small server on asyncio streams (a few read-only routes need no
framework; the monitor adds its status API and dashboard as extra routes).
``/health`` answers 200 only when the component says it is healthy (for a consumer:
broker connected **and** its consumer registered on its queue), else 503; the probe's
answer is cached for ``cache_s`` so a busy scraper cannot flood the broker with probes.

Bounded against clients that connect and never read: at most :data:`MAX_CONNECTIONS`
at once (a new one beyond them takes the place of the one that has been sending its
request the longest, so slow clients cannot lock out ``/health``), a request must arrive within
:data:`READ_TIMEOUT_S` and a response be taken within :data:`WRITE_TIMEOUT_S` (else the
connection is aborted and its buffer freed), and at most :data:`MAX_BYTES_IN_FLIGHT` of
response bodies wait in buffers: a big response beyond that is a 503 with
``Retry-After`` (small ones, like ``/health``, are always answered).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from .metrics import CONTENT_TYPE, Metrics

__all__ = ["Health", "HealthServer", "Response", "Route", "ServeError"]

log = logging.getLogger("heartbeat_consumer.health")

MAX_HEADER_LINES = 100
READ_TIMEOUT_S = 5.0
WRITE_TIMEOUT_S = 10.0
PROBE_TIMEOUT_S = 5.0
MAX_CONNECTIONS = 100
MAX_BYTES_IN_FLIGHT = 64 * 1024 * 1024
SMALL_RESPONSE_BYTES = 64 * 1024
"""Responses up to this size are sent even when the in-flight budget is spent."""


@dataclass(frozen=True)
class Health:
    ok: bool
    connected: bool
    """The broker connection is up (a restart would not help while it is down)."""
    detail: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "status": "ok" if self.ok else "unhealthy",
            "connected": self.connected,
            **self.detail,
        }


Probe = Callable[[], Awaitable[Health]]
Response = tuple[int, str, bytes]
"""Status code, content type, body."""
Route = Callable[[], Awaitable[Response]]


async def probe_with_timeout(probe: Probe, timeout_s: float = PROBE_TIMEOUT_S) -> Health:
    """The probe's answer; a probe that raises or hangs is an unhealthy, unconnected one."""
    try:
        return await asyncio.wait_for(probe(), timeout_s)
    except TimeoutError:
        return Health(False, False, {"error": f"health probe took over {timeout_s:g} s"})
    except Exception as exc:
        return Health(False, False, {"error": f"health probe failed: {exc}"})


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
        """``routes``: more GET paths (``/health`` and ``/metrics`` always exist)."""
        self.probe = probe
        self.write_timeout_s = write_timeout_s
        self.max_bytes_in_flight = max_bytes_in_flight
        self.max_connections = max_connections
        self.connections = 0
        self._reading: dict[asyncio.StreamWriter, None] = {}
        """Connections still sending their request, oldest first."""
        self.bytes_in_flight = 0
        """Bytes of responses written and not yet taken by their clients."""
        self.routes = dict(routes or {})
        self.metrics = metrics
        self.host = host
        self.port = port
        self.cache_s = cache_s
        self._cached: tuple[float, Health] | None = None
        self._lock = asyncio.Lock()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Listen; raises :class:`ServeError` when the address cannot be had."""
        try:
            self._server = await asyncio.start_server(self._serve, self.host, self.port)
        except OSError as exc:
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            raise ServeError(
                f"cannot serve HTTP on {self.host}:{self.port}: {why} "
                "(another process has the port? choose another one)"
            ) from None
        if self.port == 0:  # an ephemeral port: report the one we got
            self.port = self._server.sockets[0].getsockname()[1]
        log.info(
            "serving http://%s:%d: %s",
            self.host,
            self.port,
            ", ".join(["/health", "/metrics", *self.routes]),
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None

    async def health(self) -> Health:
        async with self._lock:  # concurrent requests share one probe
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] >= self.cache_s:
                self._cached = (now, await probe_with_timeout(self.probe))
            return self._cached[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.connections >= self.max_connections:
            # Full: make room by dropping the connection that has been sending its
            # request the longest (a slow or stuck client; a real one sends it at once).
            if not self._reading:
                writer.transport.abort()
                return
            oldest = next(iter(self._reading))
            del self._reading[oldest]
            oldest.transport.abort()
        self.connections += 1
        self._reading[writer] = None
        try:
            await self._answer(reader, writer)
        finally:
            self._reading.pop(writer, None)
            self.connections -= 1

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        method = ""
        extra = ""
        try:
            method, path = await asyncio.wait_for(_read_request(reader), READ_TIMEOUT_S)
        except (TimeoutError, ValueError, ConnectionError, asyncio.IncompleteReadError):
            method, path = "", ""
        self._reading.pop(writer, None)
        if not method:
            status, content_type, body = 400, "text/plain", b"bad request\n"
        else:
            try:
                status, content_type, body = await self._route(method, path)
            except Exception as exc:  # a bug or bad data behind a route: an answer anyway
                log.error("http: %s %s failed: %s: %s", method, path, type(exc).__name__, exc)
                status, content_type, body = 500, "text/plain", b"internal error\n"
        room = self.max_bytes_in_flight - self.bytes_in_flight
        if method != "HEAD" and len(body) > SMALL_RESPONSE_BYTES and len(body) > room:
            status, content_type, body = 503, "text/plain", b"busy: retry in a second\n"
            extra = "Retry-After: 1\r\n"
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            f"Cache-Control: no-store\r\nConnection: close\r\n{extra}\r\n"
        ).encode()
        payload = head if method == "HEAD" else head + body
        self.bytes_in_flight += len(payload)
        try:
            writer.write(payload)
            await asyncio.wait_for(writer.drain(), self.write_timeout_s)
        except TimeoutError:
            log.debug("http: a client took no response for %g s; dropped", self.write_timeout_s)
            writer.transport.abort()  # frees the buffer now, not when the client reads
        except ConnectionError:
            pass
        finally:
            self.bytes_in_flight -= len(payload)
            writer.close()

    async def _route(self, method: str, path: str) -> Response:
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"only GET and HEAD\n"
        if path == "/health":
            health = await self.health()
            body = orjson.dumps(health.to_json(), option=orjson.OPT_APPEND_NEWLINE)
            return (200 if health.ok else 503), "application/json", body
        if path == "/metrics":
            return 200, CONTENT_TYPE, self.metrics.render()
        route = self.routes.get(path)
        if route is not None:
            return await route()
        paths = ", ".join(["/health", "/metrics", *self.routes])
        return 404, "text/plain", f"not found: try {paths}\n".encode()


_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str]:
    line = (await reader.readline()).decode("latin-1").strip()
    method, target, _version = line.split(" ", 2)
    for _ in range(MAX_HEADER_LINES):
        if (await reader.readline()) in (b"\r\n", b"\n", b""):
            break
    else:
        raise ValueError("too many header lines")
    return method, target.split("?", 1)[0]
