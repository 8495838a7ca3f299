"""The health and metrics HTTP server (aiohttp.web) over real connections, no broker."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import orjson
import pytest

from heartbeat_consumer.ops import http as http_module
from heartbeat_consumer.ops.health import Health, probe_with_timeout
from heartbeat_consumer.ops.http import HealthServer, Response, Route, ServeError
from heartbeat_consumer.ops.metrics import CONTENT_TYPE, Metrics


async def healthy() -> Health:
    return Health(ok=True, connected=True, detail={"queue": "q"})


@contextlib.asynccontextmanager
async def serving(
    probe: Any = healthy, routes: Mapping[str, Route] | None = None, **kw: Any
) -> AsyncIterator[HealthServer]:
    server = HealthServer(probe, kw.pop("metrics", Metrics()), port=0, routes=routes, **kw)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def get(
    server: HealthServer, path: str, method: str = "GET"
) -> tuple[int, Mapping[str, str], bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, f"http://127.0.0.1:{server.port}{path}") as response,
    ):
        return response.status, response.headers, await response.read()


def test_health_takes_keywords_and_positions() -> None:
    assert Health(ok=False, connected=True, detail={"x": 1}) == Health(False, True, {"x": 1})
    assert Health(ok=True, connected=True).to_json() == {"status": "ok", "connected": True}


async def test_health_is_200_when_healthy_and_503_when_not() -> None:
    ok = True

    async def probe() -> Health:
        return Health(ok=ok, connected=True, detail={"queue": "q"})

    async with serving(probe, cache_s=0) as server:
        assert server.port != 0
        status, headers, body = await get(server, "/health")
        assert status == 200
        assert headers["Content-Type"] == "application/json"
        assert headers["Cache-Control"] == "no-store"
        assert orjson.loads(body) == {"status": "ok", "connected": True, "queue": "q"}
        ok = False
        status, headers, body = await get(server, "/health")
        assert status == 503
        assert headers["Content-Type"] == "application/json"
        assert orjson.loads(body)["status"] == "unhealthy"
        status, _, body = await get(server, "/health", "HEAD")
        assert (status, body) == (503, b"")


async def test_the_probe_is_cached_for_cache_s_and_shared_by_concurrent_requests() -> None:
    calls = 0

    async def probe() -> Health:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.1)
        return Health(ok=True, connected=True)

    async with serving(probe, cache_s=0.5) as server:
        statuses = await asyncio.gather(*(get(server, "/health") for _ in range(10)))
        assert [s for s, _, _ in statuses] == [200] * 10
        for _ in range(3):
            assert (await get(server, "/health"))[0] == 200
        assert calls == 1
        await asyncio.sleep(0.6)
        assert (await get(server, "/health"))[0] == 200
        assert calls == 2


async def test_a_probe_that_hangs_or_raises_is_a_503_with_the_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        http_module, "probe_with_timeout", functools.partial(probe_with_timeout, timeout_s=0.2)
    )

    async def hangs() -> Health:
        await asyncio.sleep(30)
        raise AssertionError

    async def raises() -> Health:
        raise RuntimeError("boom")

    async with serving(hangs, cache_s=0) as server:
        started = time.monotonic()
        status, _, body = await get(server, "/health")
        assert time.monotonic() - started < 2
        report = orjson.loads(body)
        assert status == 503
        assert report["connected"] is False
        assert "took over 0.2 s" in report["error"]
    async with serving(raises, cache_s=0) as server:
        status, _, body = await get(server, "/health")
        assert status == 503
        assert "health probe failed: boom" in orjson.loads(body)["error"]


async def test_a_client_that_goes_away_does_not_cancel_the_shared_probe() -> None:
    calls = 0

    async def probe() -> Health:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.3)
        return Health(ok=True, connected=True)

    async with serving(probe, cache_s=60) as server:
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.transport.abort()  # gone while the probe runs
        assert (await get(server, "/health"))[0] == 200
        assert calls == 1


async def test_metrics_are_prometheus_text() -> None:
    metrics = Metrics()
    metrics.config_valid.labels(agent="a").set(1)
    async with serving(metrics=metrics) as server:
        status, headers, body = await get(server, "/metrics")
        assert status == 200
        assert headers["Content-Type"] == CONTENT_TYPE
        assert 'heartbeat_config_valid{agent="a"} 1.0' in body.decode()
        assert body == metrics.render()


async def test_unknown_paths_are_404_and_other_methods_405() -> None:
    async with serving() as server:
        status, headers, body = await get(server, "/nope?x=1")
        assert status == 404
        assert headers["Content-Type"] == "text/plain"
        assert body == b"not found: try /health, /metrics\n"
        for path in ("/health", "/metrics", "/nope"):
            status, headers, body = await get(server, path, "POST")
            assert (status, body) == (405, b"only GET and HEAD\n"), path
            assert headers["Allow"] == "GET, HEAD"
        assert (await get(server, "/health", "DELETE"))[0] == 405
        assert (await get(server, "/health?verbose=1"))[0] == 200


async def test_extra_routes_like_the_monitor_s() -> None:
    page_html = b"<!doctype html><title>dashboard</title>"

    async def page() -> Response:
        return 200, "text/html; charset=utf-8", page_html

    async def status() -> Response:
        return 200, "application/json", orjson.dumps({"agents": []})

    async def broken() -> Response:
        raise TypeError("Integer exceeds 64-bit range")

    routes = {"/": page, "/index.html": page, "/api/heartbeat/status": status, "/broken": broken}
    async with serving(routes=routes) as server:
        for path in ("/", "/index.html"):
            code, headers, body = await get(server, path)
            assert (code, body) == (200, page_html)
            assert headers["Content-Type"] == "text/html; charset=utf-8"
        code, headers, body = await get(server, "/api/heartbeat/status")
        assert code == 200
        assert headers["Content-Type"] == "application/json"
        assert orjson.loads(body) == {"agents": []}
        assert (await get(server, "/broken"))[:3:2] == (500, b"internal error\n")
        assert (await get(server, "/api/heartbeat/status", "POST"))[0] == 405
        _, _, body = await get(server, "/api/nope")
        assert body == (
            b"not found: try /health, /metrics, /, /index.html, /api/heartbeat/status, /broken\n"
        )
        assert (await get(server, "/health"))[0] == 200


async def test_a_port_in_use_is_a_serve_error() -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        server = HealthServer(healthy, Metrics(), port=port)
        with pytest.raises(ServeError) as caught:
            await server.start()
        assert str(caught.value) == (
            f"cannot serve HTTP on 127.0.0.1:{port}: Address already in use "
            "(another process has the port? choose another one)"
        )
        await server.stop()  # nothing to stop: no error


async def test_an_address_that_does_not_resolve_is_a_serve_error() -> None:
    server = HealthServer(healthy, Metrics(), port=0, host="no-such-host.invalid")
    with pytest.raises(ServeError, match=r"^cannot serve HTTP on no-such-host\.invalid:0: "):
        await server.start()


async def test_stop_frees_the_port() -> None:
    async with serving() as server:
        port = server.port
    again = HealthServer(healthy, Metrics(), port=port)
    await again.start()
    try:
        assert again.port == port
        assert (await get(again, "/health"))[0] == 200
    finally:
        await again.stop()


async def test_many_slow_clients_do_not_stop_health_and_are_closed_after_the_read_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(http_module, "READ_TIMEOUT_S", 1.0)
    async with serving() as server:
        slow = []
        try:
            for _ in range(50):
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                writer.write(b"GET /hea")  # half a request line, and never the rest
                await writer.drain()
                slow.append((reader, writer))
            await asyncio.sleep(0.1)
            for _ in range(3):
                started = time.monotonic()
                status, _, _ = await asyncio.wait_for(get(server, "/health"), 2)
                assert status == 200
                assert time.monotonic() - started < 1
            assert server.connections >= 50
            # Past the read timeout, the server has closed them all.
            closed = await asyncio.wait_for(
                asyncio.gather(*(reader.read() for reader, _ in slow)), 5
            )
            assert all(data == b"" for data in closed)
        finally:
            for _, writer in slow:
                writer.close()


async def test_a_header_too_long_is_a_400() -> None:
    async with serving() as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert answer.split(b"\r\n", 1)[0].split(b" ")[1] in (b"400", b"431")


async def test_a_big_response_beyond_the_in_flight_budget_is_a_503_with_retry_after() -> None:
    big = b"x" * (256 * 1024)

    async def document() -> Response:
        return 200, "application/json", big

    async with serving(routes={"/big": document}, max_bytes_in_flight=128 * 1024) as server:
        status, headers, body = await get(server, "/big")
        assert (status, body) == (503, b"busy: retry in a second\n")
        assert headers["Retry-After"] == "1"
        assert (await get(server, "/big", "HEAD"))[0] == 200  # no body to hold
        assert (await get(server, "/health"))[0] == 200  # small ones are always answered
        assert server.bytes_in_flight == 0


async def test_a_client_that_does_not_read_is_dropped_after_the_write_timeout() -> None:
    big = b"x" * (32 * 1024 * 1024)

    async def document() -> Response:
        return 200, "application/json", big

    async with serving(routes={"/big": document}, write_timeout_s=0.5) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.transport.pause_reading()  # never read: the server's writes back up
        writer.write(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.3)
        assert server.bytes_in_flight == len(big)
        await asyncio.sleep(0.7)
        assert server.bytes_in_flight == 0
        assert (await get(server, "/health"))[0] == 200
        writer.transport.resume_reading()
        data = b""
        with contextlib.suppress(ConnectionError):
            data = await asyncio.wait_for(reader.read(), 5)
        assert len(data) < len(big)  # aborted, not completed
        writer.close()
