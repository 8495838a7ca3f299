"""A fake OpenClaw gateway: the hooks API (``/hooks/agent``, ``/hooks/wake``) as its
documentation describes it, on 127.0.0.1, recording every request.

Usage::

    async with FakeGateway(token="t0ken") as gw:
        ...  # point OPENCLAW_URL at gw.url
        assert gw.requests[0].body["message"]

What it enforces, in the gateway's order: a ``token`` query parameter is 400; the
token (``Authorization: Bearer`` or ``x-openclaw-token``) else 401; POST only (405);
a JSON object body (400); ``agent`` needs a non-empty ``message``, ``wake`` a non-empty
``text`` (400); ``wakeMode``/``mode`` now | next-heartbeat, ``deliver`` a bool,
``timeoutSeconds`` a positive integer (400); a ``sessionKey`` only with
``allow_request_session_key`` (and a listed prefix); an ``agentId`` only from
``allowed_agent_ids`` when set. Other fields are accepted. Any other path is 404.

Knobs (attributes, changeable while it runs): ``delay_s`` before every answer;
``script``, status codes answered first, one per request, before any check (a 429 or
503 among them carries ``Retry-After: retry_after`` when that is set). A client that
gives up cancels its answer, so closing never waits for a slow one.
"""

from __future__ import annotations

import asyncio
import hmac
import socket
import uuid
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import orjson
from aiohttp import web

__all__ = ["FakeGateway", "Recorded", "closed_port"]

MODES = ("now", "next-heartbeat")


@dataclass(frozen=True)
class Recorded:
    """One request as the gateway saw it (header names in lower case)."""

    method: str
    path: str
    headers: dict[str, str]
    query: dict[str, str]
    body: Any
    """The parsed JSON body, or None when it was not JSON."""


@dataclass
class FakeGateway:
    token: str = "fake-hook-token"  # noqa: S105
    hooks_path: str = "/hooks"
    allow_request_session_key: bool = False
    allowed_session_key_prefixes: list[str] | None = None
    allowed_agent_ids: list[str] | None = None
    delay_s: float = 0.0
    script: list[int] = field(default_factory=list)
    retry_after: str | None = None
    requests: list[Recorded] = field(default_factory=list)
    _runner: web.AppRunner | None = field(default=None, init=False, repr=False)
    _port: int = field(default=0, init=False, repr=False)

    @property
    def url(self) -> str:
        """The base URL (OPENCLAW_URL); the hooks are under :attr:`hooks_path`."""
        return f"http://127.0.0.1:{self._port}"

    def hook_url(self, endpoint: str) -> str:
        """A whole endpoint URL (OPENCLAW_HOOK_URL), e.g. ``hook_url("agent")``."""
        return f"{self.url}{self.hooks_path}/{endpoint}"

    async def start(self) -> FakeGateway:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self._port = self._runner.addresses[0][1]
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeGateway:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # --- the contract -------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            body: Any = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        self.requests.append(
            Recorded(
                method=request.method,
                path=request.path,
                headers={k.lower(): v for k, v in request.headers.items()},
                query=dict(request.query),
                body=body,
            )
        )
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.script:
            status = self.script.pop(0)
            headers = {}
            if self.retry_after is not None and status in (429, 503):
                headers["Retry-After"] = self.retry_after
            return _error(status, f"scripted {status}", headers)
        if "token" in request.query:
            return _error(400, "hook token in the query string is not accepted; use a header")
        if not self._authorized(request):
            return _error(401, "Unauthorized")
        if request.method != "POST":
            return _error(405, "Method Not Allowed")
        if not isinstance(body, dict):
            return _error(400, "body must be a JSON object")
        if request.path == f"{self.hooks_path}/agent":
            return self._agent(body)
        if request.path == f"{self.hooks_path}/wake":
            return self._wake(body)
        return _error(404, "Not Found")

    def _authorized(self, request: web.Request) -> bool:
        given = ""
        authorization = request.headers.get("Authorization", "")
        if authorization.lower().startswith("bearer "):
            given = authorization[7:].strip()
        else:
            given = request.headers.get("x-openclaw-token", "").strip()
        return bool(given) and hmac.compare_digest(given.encode(), self.token.encode())

    def _agent(self, body: dict[str, Any]) -> web.Response:
        message = body.get("message")
        if not isinstance(message, str) or not message.strip():
            return _error(400, "message required")
        problem = _mode_problem(body, "wakeMode")
        if problem:
            return _error(400, problem)
        if "deliver" in body and not isinstance(body["deliver"], bool):
            return _error(400, "deliver must be a boolean")
        seconds = body.get("timeoutSeconds")
        if seconds is not None and (
            isinstance(seconds, bool) or not isinstance(seconds, int) or seconds <= 0
        ):
            return _error(400, "timeoutSeconds must be a positive integer")
        key = body.get("sessionKey")
        if key is not None:
            if not self.allow_request_session_key:
                return _error(
                    400,
                    "sessionKey is disabled for externally supplied hook payloads; "
                    "set hooks.allowRequestSessionKey=true to enable it",
                )
            prefixes = self.allowed_session_key_prefixes
            if not isinstance(key, str) or (
                prefixes is not None and not any(key.startswith(p) for p in prefixes)
            ):
                return _error(
                    400, "sessionKey must start with one of hooks.allowedSessionKeyPrefixes"
                )
        agent_id = body.get("agentId")
        allowed = self.allowed_agent_ids
        if (
            agent_id is not None
            and allowed is not None
            and "*" not in allowed
            and agent_id not in allowed
        ):
            return _error(400, "agentId is not allowed by hooks.allowedAgentIds")
        return web.json_response({"ok": True, "runId": str(uuid.uuid4())})

    def _wake(self, body: dict[str, Any]) -> web.Response:
        text = body.get("text")
        if not isinstance(text, str) or not text.strip():
            return _error(400, "text required")
        problem = _mode_problem(body, "mode")
        if problem:
            return _error(400, problem)
        return web.json_response({"ok": True, "mode": body.get("mode", "now")})


def _mode_problem(body: dict[str, Any], key: str) -> str | None:
    if key in body and body[key] not in MODES:
        return f"{key} must be now or next-heartbeat"
    return None


def _error(status: int, text: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"ok": False, "error": text}, status=status, headers=headers)


def closed_port() -> int:
    """A local port nothing listens on (connecting to it is refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port
