"""The ``openclaw`` handler: wake an OpenClaw agent through its gateway's webhook API.

Endpoints (``meta.endpoint``):

- ``agent`` (default): ``POST <hooks>/agent``, one agent turn with ``message`` = the
  prompt, ``name`` (``meta.name``, default ``heartbeat:<check>``), ``sessionKey``
  (``meta.sessionKey``, default ``agent:<agent>:main``; ``null`` leaves it out),
  ``wakeMode`` (``meta.wakeMode``, default ``now``), ``deliver`` (``meta.deliver``,
  default false) and, when set in meta, ``agentId``, ``channel``, ``to``, ``model``,
  ``thinking`` and ``timeoutSeconds``. A gateway refuses a request's ``sessionKey``
  unless it sets ``hooks.allowRequestSessionKey`` (and, with
  ``hooks.allowedSessionKeyPrefixes``, a prefix such as ``agent:``), or
  ``meta.sessionKey`` is null;
- ``wake``: ``POST <hooks>/wake``, a system event for the main session with ``text`` =
  the prompt and ``mode`` (``meta.mode``, else ``meta.wakeMode``, default ``now``).

The prompt is ``meta.prompt``, else the check's ``description``, else
:data:`~.heartbeat_md.DEFAULT_PROMPT` (one of only whitespace does not count).

Where the gateway is, and its hook token, come from the environment only, never from
heartbeat.json (meta carrying ``url``, ``token``, ``tokenFile`` or the like fails the
check): ``OPENCLAW_URL`` (default ``http://127.0.0.1:18789``), ``OPENCLAW_HOOKS_PATH``
(default ``/hooks``), or the ecosystem's ``OPENCLAW_HOOK_URL`` (a whole endpoint such as
``http://host:18789/hooks/agent``, used when ``OPENCLAW_URL`` is unset: without a
trailing ``/agent`` or ``/wake`` it is the base and the hooks path, though a set
``OPENCLAW_HOOKS_PATH`` wins); the token is ``OPENCLAW_HOOK_TOKEN``, else the content of
the file ``OPENCLAW_HOOK_TOKEN_FILE``. It goes as ``Authorization: Bearer``
(as ``x-openclaw-token`` when the URL carries a proxy's user and password), never in the
query string; the tick's idempotency key goes as ``Idempotency-Key``. The token is
masked (``***``) in every result, error and log line; URLs are shown without userinfo.

Each request may take ``meta.requestTimeoutMs`` (30000). Connection errors, timeouts,
5xx and 429 are retried up to ``meta.retries`` (3) more times after 0.5 s, 1 s, 2 s...
(a numeric ``Retry-After``, at most 30 s, instead), as long as the next attempt can start
within the check's timeout; other answers are final, and redirects are not followed.
A 2xx is a success; the result has ``endpoint``, ``url``, ``http_status``,
``session_key``, ``run_id`` (the gateway's ``runId``) and ``attempts``, a failure the
same with a one-line ``error``.

The HEARTBEAT_OK contract does not apply: a 200 means queued, and the agent's reply never
comes back here, so there is nothing to filter (the gateway itself does not deliver a
reply that is only the heartbeat acknowledgement).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import reprlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit, urlunsplit

import orjson

from ..core.config import CheckConfig, read_bounded
from .heartbeat_md import DEFAULT_PROMPT
from .registry import current_run, register_handler

if TYPE_CHECKING:
    import aiohttp

__all__ = [
    "BACKOFF_BASE_S",
    "DEFAULT_HOOKS_PATH",
    "DEFAULT_URL",
    "Gateway",
    "GatewayError",
    "gateway_from_env",
    "openclaw",
]

log = logging.getLogger("heartbeat_consumer.openclaw")

DEFAULT_URL = "http://127.0.0.1:18789"
MAX_RETRIES = 10
DEFAULT_HOOKS_PATH = "/hooks"
DEFAULT_REQUEST_TIMEOUT_MS = 30_000
DEFAULT_RETRIES = 3
BACKOFF_BASE_S = 0.5
"""The first retry's delay; each next one doubles it (tests make it small)."""
MAX_RETRY_AFTER_S = 30.0
BUDGET_MARGIN_S = 1.0
"""Retrying stops when the next attempt could not start this long (at most a tenth of
the check's timeout) before the check's timeout."""
MAX_TOKEN_FILE_BYTES = 64 * 1024
MAX_RESPONSE_BYTES = 64 * 1024
MAX_DETAIL_CHARS = 200
USER_AGENT = "heartbeat-consumer"
MODES = ("now", "next-heartbeat")
ENDPOINTS = ("agent", "wake")
NO_TOKEN = "no OpenClaw hook token: set OPENCLAW_HOOK_TOKEN or OPENCLAW_HOOK_TOKEN_FILE"  # noqa: S105

_sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
"""How the handler waits between attempts (tests replace it)."""

_SECRET_KEY = re.compile(r"url|token|secret|passw|authori[sz]|header|credential|apikey")
_LOCATION_KEYS = frozenset({"uri", "host", "port", "path", "hookspath", "base", "gateway"})
_STRING_FIELDS = ("agentId", "channel", "to", "model", "thinking")


class GatewayError(ValueError):
    """The environment does not say usably where the gateway is or what its token is."""


@dataclass(frozen=True)
class Gateway:
    """Where the hooks are (``base_url`` + ``hooks_path``) and the hook token."""

    base_url: str
    hooks_path: str
    token: str = field(repr=False)
    source: str
    """The variable the token came from (named in a refused-token error)."""

    def url(self, endpoint: str) -> str:
        return f"{self.base_url}{self.hooks_path}/{endpoint}"


def _env(environ: Mapping[str, str], name: str) -> str:
    return environ.get(name, "").strip()


def _hooks_path(value: str) -> str:
    path = value.strip().rstrip("/")
    return path if not path or path.startswith("/") else f"/{path}"


def _split_url(value: str, variable: str) -> tuple[str, str]:
    """``scheme://netloc`` and the path of a gateway URL; GatewayError if unusable."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
    except ValueError:  # urllib's text may quote the URL, and with it a secret
        raise GatewayError(f"{variable} is not a URL (check its host and port)") from None
    shown = _display_url(urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")))
    if parts.scheme not in ("http", "https"):
        raise GatewayError(f"{variable} must be an http:// or https:// URL, not {shown!r}")
    if not parts.hostname:
        raise GatewayError(f"{variable} has no host: {shown!r}")
    if parts.query or parts.fragment:
        raise GatewayError(
            f"{variable} must not carry a query string or fragment (shown without them: "
            f"{shown!r}; the token goes in OPENCLAW_HOOK_TOKEN)"
        )
    return urlunsplit((parts.scheme, parts.netloc, "", "", "")), parts.path.rstrip("/")


def _read_token(environ: Mapping[str, str]) -> tuple[str, str]:
    token = _env(environ, "OPENCLAW_HOOK_TOKEN")
    if token:
        return token, "OPENCLAW_HOOK_TOKEN"
    path = _env(environ, "OPENCLAW_HOOK_TOKEN_FILE")
    if not path:
        raise GatewayError(NO_TOKEN)
    try:
        raw = read_bounded(path, MAX_TOKEN_FILE_BYTES)
    except OSError as exc:
        raise GatewayError(
            f"cannot read OPENCLAW_HOOK_TOKEN_FILE {path}: {exc.strerror or exc}"
        ) from None
    except ValueError as exc:
        raise GatewayError(f"cannot use OPENCLAW_HOOK_TOKEN_FILE {path}: {exc}") from None
    token = raw.decode("utf-8", errors="replace").strip()
    if not token:
        raise GatewayError(f"OPENCLAW_HOOK_TOKEN_FILE {path} is empty")
    return token, "OPENCLAW_HOOK_TOKEN_FILE"


def gateway_from_env(environ: Mapping[str, str] | None = None) -> Gateway:
    """The gateway the environment names (see the module documentation).

    Reads the token file, if that is where the token is. Raises :class:`GatewayError`
    with a one-line reason, never with the token in it.
    """
    env = os.environ if environ is None else environ
    url = _env(env, "OPENCLAW_URL")
    hook_url = _env(env, "OPENCLAW_HOOK_URL")
    if url or not hook_url:
        base, path = _split_url(url or DEFAULT_URL, "OPENCLAW_URL")
        hooks_path = path + _hooks_path(_env(env, "OPENCLAW_HOOKS_PATH") or DEFAULT_HOOKS_PATH)
    else:
        base, path = _split_url(hook_url, "OPENCLAW_HOOK_URL")
        for endpoint in ENDPOINTS:
            if path.endswith(f"/{endpoint}"):
                path = path[: -len(endpoint) - 1]
                break
        explicit = _env(env, "OPENCLAW_HOOKS_PATH")
        hooks_path = _hooks_path(explicit) if explicit else path
    token, source = _read_token(env)
    if any(ch.isspace() or not ch.isprintable() for ch in token):
        raise GatewayError(f"{source} holds whitespace or control characters inside the token")
    return Gateway(base, hooks_path, token, source)


# --- masking ------------------------------------------------------------------------------


def _display_url(url: str) -> str:
    """The URL without its userinfo (``user:password@`` becomes ``***@``)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<invalid URL>"
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"***@{host}"))


class _Masker:
    """Replaces every secret (the token, the URL's password) with ``***``."""

    def __init__(self, *secrets: str | None) -> None:
        variants = set()
        for secret in secrets:
            if secret:
                variants.update({secret, quote(secret, safe=""), quote(secret)})
        self._secrets = sorted(variants, key=len, reverse=True)

    def __call__(self, text: object) -> str:
        out = str(text)
        for secret in self._secrets:
            out = out.replace(secret, "***")
        return out


# --- the request ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Request:
    endpoint: str
    body: dict[str, Any]
    session_key: str | None
    timeout_s: float
    retries: int


def _string(meta: dict[str, Any], key: str) -> str | None:
    value = meta.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"meta.{key} must be a non-empty string")
    return value


def _mode(meta: dict[str, Any], key: str) -> str | None:
    value = meta.get(key)
    if value is None:
        return None
    if value not in MODES:
        raise ValueError(f'meta.{key} must be "now" or "next-heartbeat", not {value!r}')
    return str(value)


def _positive(meta: dict[str, Any], key: str, default: float) -> float:
    value = meta.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"meta.{key} must be a positive number")
    return float(value)


def _prompt(meta: dict[str, Any], description: str | None) -> str:
    configured = meta.get("prompt")
    if configured is not None and not isinstance(configured, str):
        raise ValueError("meta.prompt must be a string")
    for text in (configured, description):
        if text and text.strip():
            return text.strip()
    return DEFAULT_PROMPT


def _forbidden(meta: dict[str, Any]) -> str | None:
    for key in meta:
        normal = str(key).lower().replace("_", "").replace("-", "")
        if _SECRET_KEY.search(normal) or normal in _LOCATION_KEYS:
            return (
                f"meta.{key} is not allowed: the OpenClaw gateway URL and token come from the "
                "environment only (OPENCLAW_URL or OPENCLAW_HOOK_URL, and OPENCLAW_HOOK_TOKEN "
                "or OPENCLAW_HOOK_TOKEN_FILE), never from heartbeat.json"
            )
    return None


def _build(tick_payload: dict[str, Any], check: CheckConfig) -> _Request:
    """The request a check asks for; ValueError naming the meta field that is wrong."""
    meta = check.meta
    endpoint = meta.get("endpoint", "agent")
    if endpoint not in ENDPOINTS:
        raise ValueError(f'meta.endpoint must be "agent" or "wake", not {reprlib.repr(endpoint)}')
    prompt = _prompt(meta, check.description)
    timeout_s = _positive(meta, "requestTimeoutMs", DEFAULT_REQUEST_TIMEOUT_MS) / 1000
    retries = meta.get("retries", DEFAULT_RETRIES)
    if isinstance(retries, float) and retries.is_integer():
        retries = int(retries)
    if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= MAX_RETRIES:
        raise ValueError(f"meta.retries must be a whole number from 0 to {MAX_RETRIES}")
    if endpoint == "wake":
        mode = _mode(meta, "mode") or _mode(meta, "wakeMode") or "now"
        return _Request("wake", {"text": prompt, "mode": mode}, None, timeout_s, retries)

    name = _string(meta, "name") or f"heartbeat:{check.name}"
    body: dict[str, Any] = {"message": prompt, "name": name}
    session_key: str | None
    if "sessionKey" in meta:
        session_key = _string(meta, "sessionKey")
    else:
        ctx = current_run()
        agent = tick_payload.get("agent") or (ctx.agent if ctx is not None else None)
        if not isinstance(agent, str) or not agent:
            raise ValueError("the tick names no agent: set meta.sessionKey (or null)")
        session_key = f"agent:{agent}:main"
    if session_key is not None:
        body["sessionKey"] = session_key
    body["wakeMode"] = _mode(meta, "wakeMode") or "now"
    deliver = meta.get("deliver", False)
    if not isinstance(deliver, bool):
        raise ValueError("meta.deliver must be true or false")
    body["deliver"] = deliver
    for key in _STRING_FIELDS:
        value = _string(meta, key)
        if value is not None:
            body[key] = value
    seconds = meta.get("timeoutSeconds")
    if seconds is not None:
        if isinstance(seconds, float) and seconds.is_integer():
            seconds = int(seconds)
        if isinstance(seconds, bool) or not isinstance(seconds, int) or seconds <= 0:
            raise ValueError("meta.timeoutSeconds must be a whole number > 0")
        body["timeoutSeconds"] = seconds
    return _Request("agent", body, session_key, timeout_s, retries)


def _headers(gateway: Gateway, tick_payload: dict[str, Any], basic_auth: bool) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
    if basic_auth:  # the URL's user:password is the proxy's Authorization
        headers["x-openclaw-token"] = gateway.token
    else:
        headers["Authorization"] = f"Bearer {gateway.token}"
    key = tick_payload.get("idempotency_key")
    if isinstance(key, str) and key and key.isprintable():
        headers["Idempotency-Key"] = key
    return headers


# --- the answer -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Answer:
    status: int
    text: str
    data: object
    retry_after: float | None


async def _read(response: aiohttp.ClientResponse) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < MAX_RESPONSE_BYTES:
        chunk = await response.content.read(MAX_RESPONSE_BYTES - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _retry_after(value: str | None) -> float | None:
    """A numeric Retry-After in seconds (capped); None for none or an HTTP date."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    if math.isnan(seconds) or seconds < 0:
        return None
    return min(seconds, MAX_RETRY_AFTER_S)


def _detail(answer: _Answer, mask: _Masker) -> str:
    """The gateway's error text: first line, at most 200 characters, secrets masked."""
    text: object = answer.text
    if isinstance(answer.data, dict):
        text = answer.data.get("error") or answer.data.get("message") or answer.text
    line = next((ln.strip() for ln in mask(text).splitlines() if ln.strip()), "")
    if len(line) > MAX_DETAIL_CHARS:
        line = line[: MAX_DETAIL_CHARS - 3] + "..."
    return line or "no error text"


def _refusal(answer: _Answer, gateway: Gateway, mask: _Masker, location: str) -> str:
    """The one-line error for a final 3xx or 4xx answer."""
    status = answer.status
    if status in (401, 403):
        return f"OpenClaw gateway refused the hook token (HTTP {status}): check {gateway.source}"
    detail = _detail(answer, mask)
    if 300 <= status < 400:
        return (
            f"OpenClaw gateway answered with a redirect (HTTP {status}) to {location or '?'}; "
            "redirects are not followed: point OPENCLAW_URL at the gateway itself"
        )
    if status == 400:
        error = f"OpenClaw gateway rejected the request (HTTP 400): {detail}"
        lowered = detail.lower()
        if "sessionkey" in lowered:
            error += (
                "; set hooks.allowRequestSessionKey=true (and hooks.allowedSessionKeyPrefixes "
                '["agent:"]) in the gateway\'s config, or set meta.sessionKey to null'
            )
        elif "agentid" in lowered:
            error += "; add the agent to the gateway's hooks.allowedAgentIds or fix meta.agentId"
        return error
    error = f"OpenClaw gateway rejected the request (HTTP {status}): {detail}"
    if status == 404:
        error += "; are hooks enabled (hooks.enabled) and is OPENCLAW_HOOKS_PATH its hooks.path?"
    return error


def _retryable(status: int) -> bool:
    return status == 429 or status >= 500


# --- the handler ---------------------------------------------------------------------------


@register_handler("openclaw")
async def openclaw(tick_payload: dict[str, Any], check_config: CheckConfig) -> dict[str, Any]:
    """Wake an OpenClaw agent through the gateway's hooks (see the module documentation)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    forbidden = _forbidden(check_config.meta)
    if forbidden is not None:
        return {"status": "failed", "error": forbidden}
    try:
        request = _build(tick_payload, check_config)
    except ValueError as exc:
        return {"status": "failed", "error": str(exc)}
    try:
        gateway = await asyncio.to_thread(gateway_from_env)
    except GatewayError as exc:
        return {"status": "failed", "endpoint": request.endpoint, "error": str(exc)}

    mask = _Masker(gateway.token, urlsplit(gateway.url(request.endpoint)).password)
    result: dict[str, Any] = {
        "endpoint": request.endpoint,
        "url": mask(_display_url(gateway.url(request.endpoint))),
    }
    try:
        sent = await _send(
            gateway=gateway,
            request=request,
            tick_payload=tick_payload,
            check=check_config,
            started=started,
            mask=mask,
        )
        return {**result, **sent}
    except Exception as exc:  # never the token in a traceback or an engine error
        return {**result, "status": "failed", "error": mask(f"{type(exc).__name__}: {exc}")}


async def _send(
    *,
    gateway: Gateway,
    request: _Request,
    tick_payload: dict[str, Any],
    check: CheckConfig,
    started: float,
    mask: _Masker,
) -> dict[str, Any]:
    """Post the request, retrying as the module documentation says."""
    # Imported here: at the top it would cost every start of the CLI a quarter second.
    import aiohttp  # noqa: PLC0415

    loop = asyncio.get_running_loop()
    url = gateway.url(request.endpoint)
    shown = mask(_display_url(url))
    headers = _headers(gateway, tick_payload, basic_auth=urlsplit(url).username is not None)
    data = orjson.dumps(request.body)
    budget_s = check.effective_timeout_ms / 1000
    end = started + budget_s - min(BUDGET_MARGIN_S, budget_s / 10)
    attempts = 0
    error = ""
    http_status: int | None = None

    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        while True:
            attempts += 1
            timeout_s = max(min(request.timeout_s, end - loop.time()), 0.001)
            delay: float | None = None
            try:
                async with session.post(
                    url,
                    data=data,
                    headers=headers,
                    allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=timeout_s),
                ) as response:
                    raw = await _read(response)
                    answer = _answer(response, raw)
                    location = mask(_display_url(response.headers.get("Location", "")))
            except TimeoutError:
                http_status = None
                limit = "meta.requestTimeoutMs"
                if timeout_s < request.timeout_s:
                    limit = "what was left of the check's timeout"
                error = (
                    f"no answer from the OpenClaw gateway at {shown} within {timeout_s:g}s "
                    f"({limit})"
                )
            except (aiohttp.ClientError, OSError) as exc:
                http_status = None
                detail = mask(str(exc) or type(exc).__name__)
                error = f"cannot reach the OpenClaw gateway at {shown}: {detail}"
            else:
                http_status = answer.status
                if 200 <= answer.status < 300:
                    return _success(request, answer, attempts, mask)
                if not _retryable(answer.status):
                    return {
                        "status": "failed",
                        "http_status": answer.status,
                        "attempts": attempts,
                        "error": _refusal(answer, gateway, mask, location),
                    }
                kind = "is rate limiting" if answer.status == 429 else "failed"
                error = f"OpenClaw gateway {kind} (HTTP {answer.status}): {_detail(answer, mask)}"
                delay = answer.retry_after

            if attempts > request.retries:
                return _gave_up(error, http_status, attempts, "")
            if delay is None:
                delay = BACKOFF_BASE_S * 2 ** (attempts - 1)
            if loop.time() + delay >= end:
                why = (
                    f"; not retrying: an attempt in {delay:g}s would not start "
                    "within the check's timeout"
                )
                return _gave_up(error, http_status, attempts, why)
            log.info(
                "openclaw %s: attempt %d: %s; retrying in %gs",
                check.name,
                attempts,
                error,
                delay,
            )
            await _sleep(delay)


def _answer(response: aiohttp.ClientResponse, raw: bytes) -> _Answer:
    text = raw.decode("utf-8", errors="replace")
    try:
        data: object = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        data = None
    return _Answer(response.status, text, data, _retry_after(response.headers.get("Retry-After")))


def _success(request: _Request, answer: _Answer, attempts: int, mask: _Masker) -> dict[str, Any]:
    data = answer.data if isinstance(answer.data, dict) else {}
    run_id = data.get("runId")
    result: dict[str, Any] = {
        "status": "success",
        "http_status": answer.status,
        "session_key": request.session_key,
        "run_id": mask(run_id) if isinstance(run_id, str) else None,
        "attempts": attempts,
    }
    if request.endpoint == "wake":
        result["mode"] = request.body["mode"]
    if data.get("ok") is False:
        result["status"] = "failed"
        result["error"] = f"OpenClaw gateway answered ok=false: {_detail(answer, mask)}"
    return result


def _gave_up(error: str, http_status: int | None, attempts: int, why: str) -> dict[str, Any]:
    plural = "s" if attempts != 1 else ""
    return {
        "status": "failed",
        "http_status": http_status,
        "attempts": attempts,
        "error": f"{error} (after {attempts} attempt{plural}){why}",
    }
