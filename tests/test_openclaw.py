"""The openclaw handler against a fake OpenClaw gateway (tests/fake_gateway.py): the
bodies and headers of /hooks/agent and /hooks/wake, where the gateway and its token come
from, the gateway's refusals, retries within the check's timeout, and the token kept out
of every result and log line."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from heartbeat_consumer import CheckConfig
from heartbeat_consumer.core.config import parse_config
from heartbeat_consumer.handlers import openclaw as oc
from heartbeat_consumer.handlers.heartbeat_md import DEFAULT_PROMPT
from heartbeat_consumer.handlers.registry import get_handler, handler_names, invoke

from .fake_gateway import FakeGateway, closed_port

TOKEN = "hk_7f3c9e1a-the-hook-token"  # noqa: S105
OTHER_TOKEN = "hk_another-token"  # noqa: S105
AGENT = "wren"
PAYLOAD: dict[str, Any] = {
    "agent": AGENT,
    "check_name": "ping",
    "timestamp": "2027-01-15T08:00:00Z",
    "envelope": {},
    "idempotency_key": "wren:ping:1800000000000",
}
ENV = (
    "OPENCLAW_URL",
    "OPENCLAW_HOOKS_PATH",
    "OPENCLAW_HOOK_URL",
    "OPENCLAW_HOOK_TOKEN",
    "OPENCLAW_HOOK_TOKEN_FILE",
)


def check(meta: dict[str, Any] | None = None, **fields: Any) -> CheckConfig:
    raw = {"cadenceMs": 60_000, "handler": "openclaw", "meta": meta or {}, **fields}
    loaded = parse_config(orjson.dumps({"agent": AGENT, "checks": {"ping": raw}}))
    assert not loaded.problems, loaded.problems
    return loaded.config.checks["ping"]


async def run(meta: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    result = await oc.openclaw(dict(PAYLOAD), check(meta, **fields))
    json.dumps(result)  # a result is always JSON
    return result


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The delays between attempts, recorded instead of waited."""
    delays: list[float] = []

    async def sleep(seconds: float) -> None:
        delays.append(seconds)

    monkeypatch.setattr(oc, "_sleep", sleep)
    return delays


@asynccontextmanager
async def gateway_env(
    monkeypatch: pytest.MonkeyPatch, **options: Any
) -> AsyncIterator[FakeGateway]:
    """A FakeGateway (token TOKEN unless told) with OPENCLAW_URL and OPENCLAW_HOOK_TOKEN
    (always TOKEN) set for it."""
    async with FakeGateway(**{"token": TOKEN, **options}) as gw:
        monkeypatch.setenv("OPENCLAW_URL", gw.url)
        monkeypatch.setenv("OPENCLAW_HOOK_TOKEN", TOKEN)
        yield gw


@pytest.fixture
async def gw(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeGateway]:
    """A gateway that accepts a request's sessionKey with the prefix ``agent:``."""
    async with gateway_env(
        monkeypatch, allow_request_session_key=True, allowed_session_key_prefixes=["agent:"]
    ) as opened:
        yield opened


@asynccontextmanager
async def serve(
    answer: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> AsyncIterator[str]:
    """A one-handler server (for answers the fake gateway never gives); its base URL."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def test_registered() -> None:
    assert "openclaw" in handler_names()
    assert get_handler("openclaw") is oc.openclaw


# --- bodies and headers ---------------------------------------------------------------------


async def test_agent_turn_body_headers_and_default_session_key(gw: FakeGateway) -> None:
    result = await run()
    assert result == {
        "status": "success",
        "endpoint": "agent",
        "url": f"{gw.url}/hooks/agent",
        "http_status": 200,
        "session_key": f"agent:{AGENT}:main",
        "run_id": result["run_id"],
        "attempts": 1,
    }
    assert isinstance(result["run_id"], str)
    assert len(result["run_id"]) == 36
    [request] = gw.requests
    assert (request.method, request.path, request.query) == ("POST", "/hooks/agent", {})
    assert request.body == {
        "message": DEFAULT_PROMPT,
        "name": "heartbeat:ping",
        "sessionKey": f"agent:{AGENT}:main",
        "wakeMode": "now",
        "deliver": False,
    }
    assert request.headers["authorization"] == f"Bearer {TOKEN}"
    assert "x-openclaw-token" not in request.headers
    assert request.headers["content-type"] == "application/json"
    assert request.headers["user-agent"] == "heartbeat-consumer"
    assert request.headers["idempotency-key"] == PAYLOAD["idempotency_key"]


async def test_through_invoke_the_result_is_accepted(gw: FakeGateway) -> None:
    outcome = await invoke(oc.openclaw, dict(PAYLOAD), check())
    assert outcome.status == "success"
    assert outcome.error is None
    assert outcome.result["session_key"] == f"agent:{AGENT}:main"


@pytest.mark.parametrize(
    ("meta", "description", "expected"),
    [
        ({"prompt": "  Check the inbox.  "}, "described", "Check the inbox."),
        ({}, "Look at the CI.", "Look at the CI."),
        ({"prompt": "   "}, "Look at the CI.", "Look at the CI."),
        ({"prompt": " \n "}, None, DEFAULT_PROMPT),
        ({}, "   ", DEFAULT_PROMPT),
    ],
)
async def test_prompt_from_meta_then_description_then_default(
    gw: FakeGateway, meta: dict[str, Any], description: str | None, expected: str
) -> None:
    fields = {} if description is None else {"description": description}
    assert (await run(meta, **fields))["status"] == "success"
    assert (await run({**meta, "endpoint": "wake"}, **fields))["status"] == "success"
    assert gw.requests[0].body["message"] == expected
    assert gw.requests[1].body["text"] == expected


async def test_session_key_override(gw: FakeGateway) -> None:
    result = await run({"sessionKey": "agent:wren:heartbeat"})
    assert result["status"] == "success"
    assert result["session_key"] == "agent:wren:heartbeat"
    assert gw.requests[0].body["sessionKey"] == "agent:wren:heartbeat"


async def test_null_session_key_is_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    async with gateway_env(monkeypatch) as gw:  # the gateway's defaults: no sessionKey
        result = await run({"sessionKey": None})
    assert result["status"] == "success"
    assert result["session_key"] is None
    assert "sessionKey" not in gw.requests[0].body


async def test_every_documented_agent_field_passes_through(monkeypatch: pytest.MonkeyPatch) -> None:
    meta = {
        "name": "Morning check",
        "agentId": "ops",
        "sessionKey": "agent:ops:main",
        "wakeMode": "next-heartbeat",
        "deliver": True,
        "channel": "telegram",
        "to": "-1001234567890",
        "model": "anthropic/claude-sonnet-4-5",
        "thinking": "low",
        "timeoutSeconds": 120,
    }
    async with gateway_env(
        monkeypatch, allow_request_session_key=True, allowed_agent_ids=["main", "ops"]
    ) as gw:
        result = await run({**meta, "prompt": "Go.", "someOtherSetting": 1})
    assert result["status"] == "success", result
    assert gw.requests[0].body == {"message": "Go.", **meta}


async def test_whole_float_timeout_seconds_is_an_integer(gw: FakeGateway) -> None:
    assert (await run({"timeoutSeconds": 90.0}))["status"] == "success"
    assert gw.requests[0].body["timeoutSeconds"] == 90
    assert isinstance(gw.requests[0].body["timeoutSeconds"], int)


@pytest.mark.parametrize(
    ("meta", "mode"),
    [
        ({}, "now"),
        ({"mode": "next-heartbeat"}, "next-heartbeat"),
        ({"wakeMode": "next-heartbeat"}, "next-heartbeat"),
        ({"mode": "now", "wakeMode": "next-heartbeat"}, "now"),
    ],
)
async def test_wake_endpoint(gw: FakeGateway, meta: dict[str, Any], mode: str) -> None:
    result = await run({"endpoint": "wake", "prompt": "New mail.", "deliver": True, **meta})
    assert result == {
        "status": "success",
        "endpoint": "wake",
        "url": f"{gw.url}/hooks/wake",
        "http_status": 200,
        "session_key": None,
        "run_id": None,
        "attempts": 1,
        "mode": mode,
    }
    [request] = gw.requests
    assert request.path == "/hooks/wake"
    assert request.query == {}
    assert request.body == {"text": "New mail.", "mode": mode}
    assert request.headers["authorization"] == f"Bearer {TOKEN}"
    assert request.headers["idempotency-key"] == PAYLOAD["idempotency_key"]


@pytest.mark.parametrize(
    ("meta", "field"),
    [
        ({"endpoint": "poke"}, "endpoint"),
        ({"endpoint": None}, "endpoint"),
        ({"prompt": 7}, "prompt"),
        ({"name": ""}, "name"),
        ({"sessionKey": ""}, "sessionKey"),
        ({"sessionKey": 5}, "sessionKey"),
        ({"wakeMode": "later"}, "wakeMode"),
        ({"endpoint": "wake", "mode": "soon"}, "mode"),
        ({"deliver": "yes"}, "deliver"),
        ({"agentId": 3}, "agentId"),
        ({"channel": ["telegram"]}, "channel"),
        ({"to": ""}, "to"),
        ({"model": {}}, "model"),
        ({"thinking": True}, "thinking"),
        ({"timeoutSeconds": 0}, "timeoutSeconds"),
        ({"timeoutSeconds": -5}, "timeoutSeconds"),
        ({"timeoutSeconds": 1.5}, "timeoutSeconds"),
        ({"timeoutSeconds": True}, "timeoutSeconds"),
        ({"timeoutSeconds": "60"}, "timeoutSeconds"),
        ({"retries": -1}, "retries"),
        ({"retries": 1.5}, "retries"),
        ({"requestTimeoutMs": 0}, "requestTimeoutMs"),
        ({"requestTimeoutMs": "1000"}, "requestTimeoutMs"),
    ],
)
async def test_invalid_meta_fails_naming_the_field(
    gw: FakeGateway, meta: dict[str, Any], field: str
) -> None:
    result = await run(meta)
    assert result["status"] == "failed"
    assert f"meta.{field} " in result["error"]
    assert "\n" not in result["error"]
    assert gw.requests == []


# --- where the gateway and the token come from ----------------------------------------------


async def test_token_from_a_file(
    gw: FakeGateway, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "hook-token"
    path.write_text(f"  {TOKEN}\n")
    monkeypatch.delenv("OPENCLAW_HOOK_TOKEN")
    monkeypatch.setenv("OPENCLAW_HOOK_TOKEN_FILE", str(path))
    assert (await run())["status"] == "success"
    assert gw.requests[-1].headers["authorization"] == f"Bearer {TOKEN}"

    path.write_text("not-the-token")  # the variable wins over the file
    monkeypatch.setenv("OPENCLAW_HOOK_TOKEN", TOKEN)
    assert (await run())["status"] == "success"
    assert gw.requests[-1].headers["authorization"] == f"Bearer {TOKEN}"


async def test_token_file_problems(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OPENCLAW_HOOK_TOKEN_FILE", str(tmp_path / "missing"))
    result = await run()
    assert result["status"] == "failed"
    assert result["error"].startswith("cannot read OPENCLAW_HOOK_TOKEN_FILE ")
    (tmp_path / "empty").write_text(" \n")
    monkeypatch.setenv("OPENCLAW_HOOK_TOKEN_FILE", str(tmp_path / "empty"))
    assert (await run())["error"].endswith("is empty")
    monkeypatch.setenv("OPENCLAW_HOOK_TOKEN_FILE", str(tmp_path))
    assert "not a regular file" in (await run())["error"]
    (tmp_path / "two").write_text("two words\n")
    monkeypatch.setenv("OPENCLAW_HOOK_TOKEN_FILE", str(tmp_path / "two"))
    error = (await run())["error"]
    assert "whitespace" in error
    assert "two" not in error.replace("OPENCLAW_HOOK_TOKEN_FILE", "")


async def test_no_token_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    async with FakeGateway(token=TOKEN) as gw:
        monkeypatch.setenv("OPENCLAW_URL", gw.url)
        monkeypatch.setenv("OPENCLAW_HOOK_TOKEN", "   ")  # only whitespace: none
        result = await run()
    assert result == {
        "status": "failed",
        "endpoint": "agent",
        "error": "no OpenClaw hook token: set OPENCLAW_HOOK_TOKEN or OPENCLAW_HOOK_TOKEN_FILE",
    }
    assert gw.requests == []


@pytest.mark.parametrize("endpoint", ["agent", "wake"])
async def test_hook_url_gives_base_and_hooks_path(
    monkeypatch: pytest.MonkeyPatch, endpoint: str
) -> None:
    async with gateway_env(monkeypatch, hooks_path="/gw/hooks") as gw:
        monkeypatch.delenv("OPENCLAW_URL")
        monkeypatch.setenv("OPENCLAW_HOOK_URL", gw.hook_url("agent") + "/")
        result = await run({"endpoint": endpoint, "sessionKey": None})
    assert result["status"] == "success", result
    assert result["url"] == gw.hook_url(endpoint)
    assert [r.path for r in gw.requests] == [f"/gw/hooks/{endpoint}"]


async def test_hooks_path_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    async with gateway_env(monkeypatch, hooks_path="/custom") as gw:
        monkeypatch.setenv("OPENCLAW_HOOKS_PATH", "custom/")
        result = await run({"endpoint": "wake"})
    assert result["status"] == "success"
    assert gw.requests[0].path == "/custom/wake"


@pytest.mark.parametrize(
    ("environ", "base", "hooks_path"),
    [
        ({}, "http://127.0.0.1:18789", "/hooks"),
        ({"OPENCLAW_URL": "https://claw.example/"}, "https://claw.example", "/hooks"),
        (
            {"OPENCLAW_URL": "http://h:1/proxy", "OPENCLAW_HOOKS_PATH": "/in"},
            "http://h:1",
            "/proxy/in",
        ),
        ({"OPENCLAW_HOOK_URL": "http://h:18789/hooks/agent"}, "http://h:18789", "/hooks"),
        ({"OPENCLAW_HOOK_URL": "http://h:18789/hooks/wake"}, "http://h:18789", "/hooks"),
        ({"OPENCLAW_HOOK_URL": "http://h:18789/hooks"}, "http://h:18789", "/hooks"),
        (
            {"OPENCLAW_HOOK_URL": "http://h/hooks/agent", "OPENCLAW_HOOKS_PATH": "/x"},
            "http://h",
            "/x",
        ),
        (
            {"OPENCLAW_URL": "http://a:1", "OPENCLAW_HOOK_URL": "http://b:2/hooks/agent"},
            "http://a:1",
            "/hooks",
        ),
    ],
)
def test_gateway_from_env(environ: dict[str, str], base: str, hooks_path: str) -> None:
    gateway = oc.gateway_from_env({**environ, "OPENCLAW_HOOK_TOKEN": TOKEN})
    assert (gateway.base_url, gateway.hooks_path) == (base, hooks_path)
    assert gateway.token == TOKEN
    assert gateway.source == "OPENCLAW_HOOK_TOKEN"
    assert TOKEN not in repr(gateway)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("ftp://claw.example", "must be an http:// or https:// URL"),
        ("claw.example:18789", "must be an http:// or https:// URL"),
        ("http://", "has no host"),
        ("http://h:port", "is not a URL"),
        ("http://h:1/?token=abc", "must not carry a query string"),
    ],
)
async def test_unusable_url_fails(
    monkeypatch: pytest.MonkeyPatch, value: str, message: str
) -> None:
    monkeypatch.setenv("OPENCLAW_HOOK_TOKEN", TOKEN)
    monkeypatch.setenv("OPENCLAW_URL", value)
    result = await run()
    assert result["status"] == "failed"
    assert result["error"].startswith("OPENCLAW_URL ")
    assert message in result["error"]


@pytest.mark.parametrize(
    "key", ["url", "token", "tokenFile", "hookUrl", "hook_token", "Authorization", "headers"]
)
async def test_gateway_settings_in_meta_are_refused(gw: FakeGateway, key: str) -> None:
    result = await run({key: TOKEN})
    assert result["status"] == "failed"
    assert result["error"].startswith(f"meta.{key} is not allowed")
    assert "environment" in result["error"]
    assert TOKEN not in json.dumps(result)
    assert gw.requests == []


async def test_userinfo_is_masked_and_the_token_goes_in_x_openclaw_token(
    gw: FakeGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENCLAW_URL", gw.url.replace("://", "://proxy:pr0xy-pass@"))
    result = await run()
    assert result["status"] == "success", result
    assert result["url"] == gw.url.replace("://", "://***@") + "/hooks/agent"
    headers = gw.requests[0].headers
    assert headers["x-openclaw-token"] == TOKEN
    assert headers["authorization"].startswith("Basic ")  # the proxy's

    monkeypatch.setenv("OPENCLAW_URL", f"http://proxy:pr0xy-pass@127.0.0.1:{closed_port()}")
    result = await run({"retries": 0})
    assert result["status"] == "failed"
    assert "pr0xy-pass" not in json.dumps(result)
    assert "proxy:" not in json.dumps(result)


# --- refusals -------------------------------------------------------------------------------


async def test_wrong_token_is_401_without_retry(
    gw: FakeGateway, monkeypatch: pytest.MonkeyPatch, sleeps: list[float]
) -> None:
    monkeypatch.setenv("OPENCLAW_HOOK_TOKEN", "not-the-token")
    result = await run()
    assert result["status"] == "failed"
    assert result["http_status"] == 401
    assert result["attempts"] == 1
    assert result["error"] == (
        "OpenClaw gateway refused the hook token (HTTP 401): check OPENCLAW_HOOK_TOKEN"
    )
    assert len(gw.requests) == 1
    assert sleeps == []
    assert gw.requests[0].query == {}  # the token never goes in the query string


async def test_session_key_refused_gives_the_hint(
    monkeypatch: pytest.MonkeyPatch, sleeps: list[float]
) -> None:
    async with gateway_env(monkeypatch) as gw:  # the gateway's defaults
        result = await run()
    assert result["status"] == "failed"
    assert result["http_status"] == 400
    assert result["attempts"] == 1
    error = result["error"]
    assert error.startswith("OpenClaw gateway rejected the request (HTTP 400): sessionKey ")
    assert "hooks.allowRequestSessionKey=true" in error
    assert 'hooks.allowedSessionKeyPrefixes ["agent:"]' in error
    assert "set meta.sessionKey to null" in error
    assert len(gw.requests) == 1
    assert sleeps == []


async def test_session_key_outside_the_prefixes(monkeypatch: pytest.MonkeyPatch) -> None:
    async with gateway_env(
        monkeypatch, allow_request_session_key=True, allowed_session_key_prefixes=["hook:"]
    ):
        result = await run()
    assert result["http_status"] == 400
    assert "hooks.allowRequestSessionKey" in result["error"]


async def test_agent_id_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    async with gateway_env(monkeypatch, allowed_agent_ids=["main"]):
        result = await run({"agentId": "ops", "sessionKey": None})
    assert result["status"] == "failed"
    assert result["http_status"] == 400
    assert "agentId is not allowed" in result["error"]
    assert "hooks.allowedAgentIds" in result["error"]


async def test_wrong_hooks_path_is_404_with_a_hint(
    gw: FakeGateway, monkeypatch: pytest.MonkeyPatch, sleeps: list[float]
) -> None:
    monkeypatch.setenv("OPENCLAW_HOOKS_PATH", "/nope")
    result = await run()
    assert result["status"] == "failed"
    assert result["http_status"] == 404
    assert "hooks.enabled" in result["error"]
    assert "OPENCLAW_HOOKS_PATH" in result["error"]
    assert len(gw.requests) == 1
    assert sleeps == []


async def test_long_error_text_is_one_line_of_200(monkeypatch: pytest.MonkeyPatch) -> None:
    async def answer(request: web.Request) -> web.Response:
        return web.Response(status=422, text="x" * 500 + "\nsecond line")

    async with serve(answer) as url:
        monkeypatch.setenv("OPENCLAW_URL", url)
        monkeypatch.setenv("OPENCLAW_HOOK_TOKEN", TOKEN)
        result = await run()
    prefix = "OpenClaw gateway rejected the request (HTTP 422): "
    assert result["error"].startswith(prefix)
    detail = result["error"][len(prefix) :]
    assert len(detail) == 200
    assert detail.endswith("...")
    assert "second" not in detail


async def test_redirects_are_not_followed(monkeypatch: pytest.MonkeyPatch) -> None:
    hits: list[str] = []

    async def answer(request: web.Request) -> web.Response:
        hits.append(request.path)
        raise web.HTTPTemporaryRedirect("/elsewhere")

    async with serve(answer) as url:
        monkeypatch.setenv("OPENCLAW_URL", url)
        monkeypatch.setenv("OPENCLAW_HOOK_TOKEN", TOKEN)
        result = await run()
    assert result["status"] == "failed"
    assert result["http_status"] == 307
    assert "redirect" in result["error"]
    assert "/elsewhere" in result["error"]
    assert hits == ["/hooks/agent"]


async def test_ok_false_is_a_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    async def answer(request: web.Request) -> web.Response:
        return web.json_response({"ok": False, "error": "agent busy"})

    async with serve(answer) as url:
        monkeypatch.setenv("OPENCLAW_URL", url)
        monkeypatch.setenv("OPENCLAW_HOOK_TOKEN", TOKEN)
        result = await run()
    assert result["status"] == "failed"
    assert result["http_status"] == 200
    assert result["error"] == "OpenClaw gateway answered ok=false: agent busy"


# --- retries --------------------------------------------------------------------------------


async def test_503_twice_then_success(gw: FakeGateway, sleeps: list[float]) -> None:
    gw.script = [503, 503]
    result = await run()
    assert result["status"] == "success"
    assert result["attempts"] == 3
    assert sleeps == [0.5, 1.0]
    assert len(gw.requests) == 3
    assert {r.headers["idempotency-key"] for r in gw.requests} == {PAYLOAD["idempotency_key"]}
    assert all(r.body == gw.requests[0].body for r in gw.requests)


async def test_5xx_forever_fails_after_one_plus_retries(
    gw: FakeGateway, sleeps: list[float]
) -> None:
    gw.script = [500] * 10
    result = await run({"retries": 2})
    assert result["status"] == "failed"
    assert result["http_status"] == 500
    assert result["attempts"] == 3
    assert result["error"] == (
        "OpenClaw gateway failed (HTTP 500): scripted 500 (after 3 attempts)"
    )
    assert len(gw.requests) == 3
    assert sleeps == [0.5, 1.0]

    gw.requests.clear()
    result = await run({"retries": 0})
    assert result["attempts"] == 1
    assert len(gw.requests) == 1


async def test_default_retries_with_real_backoff(
    gw: FakeGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(oc, "BACKOFF_BASE_S", 0.01)
    gw.script = [502] * 10
    started = time.monotonic()
    result = await run()
    assert result["status"] == "failed"
    assert result["attempts"] == 4
    assert len(gw.requests) == 4
    assert 0.06 <= time.monotonic() - started < 5  # slept 0.01 + 0.02 + 0.04


async def test_connection_refused_is_retried(
    monkeypatch: pytest.MonkeyPatch, sleeps: list[float]
) -> None:
    port = closed_port()
    monkeypatch.setenv("OPENCLAW_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OPENCLAW_HOOK_TOKEN", TOKEN)
    result = await run({"retries": 2})
    assert result["status"] == "failed"
    assert result["attempts"] == 3
    assert result["http_status"] is None
    assert result["error"].startswith(
        f"cannot reach the OpenClaw gateway at http://127.0.0.1:{port}/hooks/agent: "
    )
    assert result["error"].endswith("(after 3 attempts)")
    assert sleeps == [0.5, 1.0]


async def test_slow_answer_times_out_and_is_retried(gw: FakeGateway) -> None:
    gw.delay_s = 2.0
    started = time.monotonic()
    result = await run({"requestTimeoutMs": 100, "retries": 1})
    assert time.monotonic() - started < 1.5
    assert result["status"] == "failed"
    assert result["attempts"] == 2
    assert result["error"] == (
        f"no answer from the OpenClaw gateway at {gw.url}/hooks/agent within 0.1s "
        "(meta.requestTimeoutMs) (after 2 attempts)"
    )
    assert len(gw.requests) == 2


@pytest.mark.parametrize(
    ("retry_after", "delay"),
    [("2", 2.0), ("0.25", 0.25), ("120", 30.0), ("Wed, 21 Oct 2037 07:28:00 GMT", 0.5)],
)
async def test_429_honours_retry_after(
    gw: FakeGateway, sleeps: list[float], retry_after: str, delay: float
) -> None:
    gw.script, gw.retry_after = [429], retry_after
    result = await run()
    assert result["status"] == "success"
    assert result["attempts"] == 2
    assert sleeps == [delay]


async def test_429_forever_says_rate_limited(gw: FakeGateway, sleeps: list[float]) -> None:
    gw.script, gw.retry_after = [429] * 5, "1"
    result = await run({"retries": 1})
    assert result["status"] == "failed"
    assert result["http_status"] == 429
    assert result["error"].startswith("OpenClaw gateway is rate limiting (HTTP 429)")
    assert sleeps == [1.0]


async def test_no_retry_past_the_checks_timeout(gw: FakeGateway, sleeps: list[float]) -> None:
    gw.script, gw.retry_after = [429], "10"
    result = await run({"retries": 5}, timeoutMs=5000)
    assert result["status"] == "failed"
    assert result["attempts"] == 1
    assert (
        "not retrying: an attempt in 10s would not start within the check's timeout"
        in (result["error"])
    )
    assert sleeps == []
    assert len(gw.requests) == 1


async def test_backoff_stops_within_the_checks_timeout(
    gw: FakeGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(oc, "BACKOFF_BASE_S", 0.4)  # 0.4 s fits in 0.9 s, 0.4 + 0.8 does not
    gw.script = [500] * 10
    started = time.monotonic()
    result = await run({"retries": 5}, timeoutMs=1000)
    assert time.monotonic() - started < 1.0
    assert result["status"] == "failed"
    assert result["attempts"] == 2
    assert "not retrying: an attempt in 0.8s" in result["error"]


# --- the token stays secret ------------------------------------------------------------------


async def test_the_token_appears_in_no_result_and_no_log_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.DEBUG)
    results: list[dict[str, Any]] = []

    async def echo(request: web.Request) -> web.Response:  # a gateway that repeats it
        said = f"{request.headers.get('Authorization')} {request.url}"
        status = 503 if request.path.endswith("/wake") else 400
        return web.json_response({"ok": False, "error": f"bad: {said}"}, status=status)

    monkeypatch.setattr(oc, "BACKOFF_BASE_S", 0.001)
    async with serve(echo) as url:
        monkeypatch.setenv("OPENCLAW_URL", url)
        monkeypatch.setenv("OPENCLAW_HOOK_TOKEN", TOKEN)
        results.append(await run())
        results.append(await run({"endpoint": "wake", "retries": 2}))
        assert TOKEN not in json.dumps(results)
        assert "Bearer ***" in results[0]["error"]
        assert "Bearer ***" in results[1]["error"]

    async with gateway_env(monkeypatch, token=OTHER_TOKEN) as gw:  # a refused token
        gw.script = [503]
        results.append(await run({"retries": 1}))
        assert results[-1]["http_status"] == 401
    monkeypatch.setenv("OPENCLAW_URL", f"http://u:{TOKEN}@127.0.0.1:{closed_port()}")
    results.append(await run({"retries": 1}))  # the token as the URL's password
    results.append(await run({"token": TOKEN}))
    results.append(await run({"tokenFile": str(tmp_path)}))
    assert all(r["status"] == "failed" for r in results)

    assert TOKEN not in json.dumps(results)
    assert caplog.records, "the retries are logged"
    for record in caplog.records:
        assert TOKEN not in record.getMessage()
        assert TOKEN not in repr(record.args)
