"""Handler plugins: the registry, plugin loading, and running one handler safely.

A handler is ``async def h(tick_payload: dict, check_config: CheckConfig) -> dict``
(a plain ``def`` runs in a thread of its own). It returns a dict whose ``status`` is one
of success | alert | failed | skipped, plus free fields. An exception becomes status
``failed`` with the error text; exceeding the check's timeout becomes ``timeout``; a
result over :data:`MAX_RESULT_BYTES` of JSON is replaced by a preview.

A thread cannot be stopped: a plain ``def`` that outlives its timeout is left running
(as a daemon thread, so it does not hold up shutdown), and the check fails without
starting another until it ends. An ``async def`` must not block the event loop: blocking
or CPU-heavy work belongs in a plain ``def`` or in a ``command`` handler's process.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import inspect
import logging
import os
import sys
import threading
from collections.abc import Awaitable, Callable, Iterable
from contextvars import ContextVar, copy_context
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, TypeVar, cast

import orjson

from ..core.config import CheckConfig, HeartbeatConfig
from ..core.state import AgentState, Status

__all__ = [
    "ENTRY_POINT_GROUP",
    "EventSink",
    "Handler",
    "HandlerError",
    "Outcome",
    "RunContext",
    "current_run",
    "default_handler",
    "get_handler",
    "handler_names",
    "invoke",
    "load_entry_points",
    "load_plugins",
    "plugin_modules_from_env",
    "register_handler",
    "set_default_handler",
]

log = logging.getLogger("heartbeat_consumer.handlers")

ENTRY_POINT_GROUP = "heartbeat_consumer.handlers"
HANDLER_STATUSES = frozenset({"success", "alert", "failed", "skipped"})
MAX_ERROR_CHARS = 2000
MAX_RESULT_BYTES = 64 * 1024
"""A result bigger than this (as JSON) is sent and stored as a preview."""
RESULT_PREVIEW_CHARS = 1000

EventSink = Callable[[str, dict[str, Any]], Awaitable[None]]
Handler = Callable[[dict[str, Any], CheckConfig], Awaitable[dict[str, Any]] | dict[str, Any]]
H = TypeVar("H", bound=Handler)

_registry: dict[str, Handler] = {}


class HandlerError(Exception):
    """A plugin could not be loaded or registered."""


def _origin(func: Handler) -> str:
    return f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', repr(func))}"


def register_handler(name: str) -> Callable[[H], H]:
    """Register a handler under ``name``: ``@register_handler("ping")``.

    Registering the same function again (a re-import) is fine; a different function
    under a taken name is an error, so two plugins cannot silently replace each other.
    """
    if not isinstance(name, str) or not name:
        raise HandlerError("register_handler needs a non-empty name")

    def decorate(func: H) -> H:
        if not callable(func):
            raise HandlerError(f"handler {name!r} is not callable")
        existing = _registry.get(name)
        if existing is not None and _origin(existing) != _origin(func):
            raise HandlerError(
                f"handler {name!r} is already registered by {_origin(existing)}; "
                f"{_origin(func)} cannot take the name"
            )
        _registry[name] = func
        return func

    return decorate


def unregister_handler(name: str) -> None:
    """Remove a handler (for tests and plugin reloads)."""
    _registry.pop(name, None)


def get_handler(name: str) -> Handler | None:
    return _registry.get(name)


def handler_names() -> frozenset[str]:
    return frozenset(_registry)


_default_handler: str | None = None


def set_default_handler(name: str | None) -> None:
    """The process-wide ``--default-handler``: where checks go whose handler is not
    registered, in files without a ``defaultHandler`` of their own."""
    global _default_handler
    _default_handler = name


def default_handler() -> str | None:
    return _default_handler


def _import(spec: str) -> None:
    if spec.endswith(".py"):
        path = Path(spec).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"no such file {spec}")
        module_spec = importlib.util.spec_from_file_location(f"_heartbeat_plugin_{path.stem}", path)
        if module_spec is None or module_spec.loader is None:
            raise ImportError(f"cannot load {spec}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_spec.name] = module
        module_spec.loader.exec_module(module)
        return
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.append(cwd)
    importlib.import_module(spec)


def load_plugins(modules: Iterable[str]) -> list[str]:
    """Import plugin modules (``pkg.module``, importable from the working directory too,
    or a ``path/to/file.py``); their decorators register handlers. Raises HandlerError."""
    loaded = []
    for name in modules:
        module = name.strip()
        if not module:
            continue
        try:
            _import(module)
        except Exception as exc:
            raise HandlerError(
                f"cannot import handler module {module!r}: {type(exc).__name__}: {exc}"
            ) from None
        loaded.append(module)
    return loaded


def load_entry_points() -> list[str]:
    """Load plugins of the ``heartbeat_consumer.handlers`` entry-point group.

    An entry point naming a module registers through its decorators; one naming a
    function that is not registered yet is registered under the entry point's name.
    A broken plugin is logged and skipped: it must not stop the others.
    """
    names = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            target = ep.load()
        except Exception as exc:
            log.error("handler plugin %s (%s) failed to load: %s", ep.name, ep.value, exc)
            continue
        if callable(target) and not inspect.isclass(target) and ep.name not in _registry:
            register_handler(ep.name)(cast(Handler, target))
        names.append(ep.name)
    return names


def plugin_modules_from_env(environ: dict[str, str] | None = None) -> list[str]:
    """Modules listed in HEARTBEAT_HANDLERS (comma or whitespace separated)."""
    value = (environ if environ is not None else dict(os.environ)).get("HEARTBEAT_HANDLERS", "")
    return [m for m in value.replace(",", " ").split() if m]


@dataclass
class RunContext:
    """What the engine shares with the handler it is running (see :func:`current_run`).

    A handler may replace ``state`` (built-ins do, to compact history); the engine
    records the run on top of it.
    """

    agent: str
    check: CheckConfig
    config: HeartbeatConfig
    state: AgentState
    slot_ms: int
    process_started_ms: int
    extra: dict[str, Any] = field(default_factory=dict)
    publish: EventSink | None = None
    """Publishes ``(routing_key, payload)`` as an event to the bus; None without one."""


_current: ContextVar[RunContext | None] = ContextVar("heartbeat_run", default=None)


def current_run() -> RunContext | None:
    """The context of the run in progress (inside a handler), else None."""
    return _current.get()


@dataclass(frozen=True)
class Outcome:
    status: Status
    result: dict[str, Any]
    error: str | None = None


def _truncate(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 15] + "... [truncated]"


def _check_result(value: object) -> Outcome:
    if not isinstance(value, dict):
        return Outcome(
            "failed", {}, f"handler returned {type(value).__name__}, expected a dict with 'status'"
        )
    status = value.get("status")
    if status not in HANDLER_STATUSES:
        allowed = " | ".join(sorted(HANDLER_STATUSES))
        return Outcome("failed", {}, f"handler returned status {status!r}; expected {allowed}")
    try:
        encoded = orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS)
    except (TypeError, orjson.JSONEncodeError) as exc:
        return Outcome("failed", {}, f"handler result is not JSON-serialisable: {exc}")
    if len(encoded) > MAX_RESULT_BYTES:
        result: dict[str, Any] = {
            "status": status,
            "truncated": True,
            "bytes": len(encoded),
            "preview": encoded[:RESULT_PREVIEW_CHARS].decode(errors="replace"),
        }
    else:
        result = orjson.loads(encoded)
    error = value.get("error")
    return Outcome(
        cast(Status, status), result, _truncate(str(error)) if error is not None else None
    )


_threads: dict[tuple[str, str], threading.Thread] = {}
"""The thread of each (agent, check)'s plain-``def`` run while it runs."""


def _in_thread(
    key: tuple[str, str], handler: Handler, payload: dict[str, Any], check: CheckConfig
) -> asyncio.Future[object]:
    """Run a plain ``def`` in a daemon thread (with the caller's context variables)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[object] = loop.create_future()
    context = copy_context()

    def settle(value: object, error: BaseException | None) -> None:
        if future.done():  # timed out meanwhile
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)

    def target() -> None:
        value: object = None
        error: BaseException | None = None
        try:
            value = context.run(handler, payload, check)
        except BaseException as exc:
            error = exc
        if _threads.get(key) is threading.current_thread():
            del _threads[key]
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
            loop.call_soon_threadsafe(settle, value, error)

    thread = threading.Thread(target=target, name=f"handler {key[0]}:{key[1]}", daemon=True)
    _threads[key] = thread
    thread.start()
    return future


async def _call(
    key: tuple[str, str], handler: Handler, payload: dict[str, Any], check: CheckConfig
) -> object:
    if inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
        getattr(handler, "__call__", None)  # noqa: B004
    ):
        return await cast(Awaitable[object], handler(payload, check))
    value = await _in_thread(key, handler, payload, check)
    if inspect.isawaitable(value):
        return await value
    return value


async def invoke(
    handler: Handler,
    payload: dict[str, Any],
    check: CheckConfig,
    context: RunContext | None = None,
) -> Outcome:
    """Run a handler with the check's timeout; never raises (except cancellation)."""
    key = (context.agent if context else "", check.name)
    previous = _threads.get(key)
    if previous is not None and previous.is_alive():
        return Outcome(
            "failed",
            {},
            "the previous run timed out and is still running in its thread; "
            "not starting another until it ends",
        )
    timeout_s = check.effective_timeout_ms / 1000
    token = _current.set(context)
    deadline = asyncio.timeout(timeout_s)
    try:
        async with deadline:
            value = await _call(key, handler, payload, check)
    except TimeoutError as exc:
        if deadline.expired():
            return Outcome("timeout", {}, f"handler timed out after {timeout_s:g}s")
        return Outcome("failed", {}, _truncate(f"{type(exc).__name__}: {exc}"))
    except (Exception, SystemExit) as exc:
        return Outcome("failed", {}, _truncate(f"{type(exc).__name__}: {exc}"))
    finally:
        _current.reset(token)
    return _check_result(value)
