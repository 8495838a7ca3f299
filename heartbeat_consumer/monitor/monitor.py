"""The fleet monitor: a dead-man's switch over the bus, a status API and a dashboard.

``heartbeat-consumer monitor`` reads every agent's events from its own durable queue
(default ``heartbeat.monitor``, bound to ``heartbeat.#``): the ``started`` and result
events of each check run and the ``_status`` events (online, alive, config_invalid,
offline). The rules of :mod:`.deadman` turn them into incidents (``stale``,
``timeout``, ``missed``, ``config_invalid``), published as
``heartbeat.<agent>._alert.<kind>`` and ``heartbeat.<agent>._alert.resolved``.

- Every ``check_every`` the monitor evaluates, publishes the alerts (persistent, with
  confirms), then saves its state atomically. If a publish fails, the incidents are not
  recorded, so the next evaluation sends them again: an alert may repeat across a broker
  outage, it is never lost. Each alert's ``event_id`` is derived from its incident, so a
  repeat is recognisable.
- The first evaluation waits one interval after start-up, so the events queued while
  the monitor was down are read first. Events are dated by their own timestamp (never
  later than their arrival), so that backlog is dated correctly.
- Events are acknowledged once folded into the in-memory state; a crash loses at most
  the observations since the last save, and the next event of each agent repairs them.
- Its own alerts come back through ``heartbeat.#``; they are acknowledged and ignored.
  Unreadable events go to ``<queue>.dlq`` with the reason; so does any event whose
  handling fails (bodies are taken raw, whatever their content type says).
- An event is the agent's that its routing key names (``heartbeat.<agent>.*``, which the
  broker's topic permissions vouch for): a payload that claims another agent, check or
  status is dropped and counted (``heartbeat_monitor_events_dropped_total``), and so are
  new agents beyond :data:`MAX_AGENTS` and new checks beyond :data:`MAX_CHECKS_PER_AGENT`.

The HTTP port serves ``/`` (the dashboard), ``/api/heartbeat/status``, ``/health`` and
``/metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
from aio_pika.abc import AbstractIncomingMessage
from faststream import AckPolicy
from faststream.rabbit import Channel, RabbitQueue
from faststream.rabbit.annotations import RabbitMessage

from ..bus.connection import (
    Redeliveries,
    closed_on_failure,
    connect,
    dead_letter,
    is_transient,
    make_broker,
    publish_json,
    queue_health,
    raw_body,
    topic_exchange,
    unreachable,
)
from ..bus.provision import DeadLetterLimits, provision_monitor
from ..bus.settings import BUS_ARGUMENTS, DEFAULT_BUS, DEFAULT_SERVE, BusSettings, Deprecated
from ..core.envelope import EnvelopeError, envelope, event_kind, parse_envelope
from ..core.timeutil import instant_or_none, iso, iso_or_none
from ..core.topology import (
    DEFAULT_MONITOR_QUEUE,
    MONITOR_BINDING,
    alert_key,
    check_resource,
    dead_letter_exchange,
    mask_url,
)
from ..ops.health import Health
from ..ops.http import Response, Route
from ..ops.metrics import MonitorMetrics
from ..ops.service import run_service
from ..ops.settings import ServeSettings
from ..runtime.engine import wall_clock_ms
from ..runtime.local import stop_on_signals
from ..runtime.store import StateError, StateStore, atomic_write, corrupt_path, load_file
from .rules import (
    SEVERITY,
    AgentView,
    Alert,
    WatchConfig,
    WatchState,
    evaluate,
    event_source,
    next_due_at,
    observe_agent,
    repair,
)

__all__ = [
    "ALERT_EVENT",
    "DEFAULT_MONITOR_QUEUE",
    "Monitor",
    "alert_envelope",
    "status_document",
]

log = logging.getLogger("heartbeat_consumer.monitor")

ALERT_EVENT = "heartbeat.alert"
"""The ``event_type`` alerts had before it became their routing key (still read)."""
ALERT_SEGMENT = "._alert."
STATUS_CACHE_S = 1.0
MAX_AGENTS = 100_000
MAX_CHECKS_PER_AGENT = 1_000
MAX_CHECK_VIEWS = 300_000
"""Checks watched over the whole fleet (about 1 KB each): new ones beyond are dropped."""
_ALERT_NAMESPACE = uuid.UUID("0b8f5a52-3f0e-4d59-a3c3-6d2a4a1f9e21")


def dashboard_html() -> bytes:
    return importlib.resources.files(__package__).joinpath("dashboard.html").read_bytes()


class Monitor:
    """Watches the fleet's events; see the module documentation.

    ``Monitor(state_path=..., bus=BusSettings(...), serve=ServeSettings(port=...))``
    serves the dashboard, the status API, ``/health`` and ``/metrics`` on ``serve``'s
    port. The arguments ``bus`` replaces (``rabbit_url``, ``exchange_name``, ``tls``,
    ``declare_exchanges``), and :meth:`run`'s ``port`` and ``host``, still work, each
    with a DeprecationWarning."""

    def __init__(
        self,
        *,
        state_path: str | Path,
        bus: BusSettings = DEFAULT_BUS,
        serve: ServeSettings = DEFAULT_SERVE,
        config: WatchConfig | None = None,
        queue_name: str = DEFAULT_MONITOR_QUEUE,
        check_every_ms: int = 30_000,
        prefetch: int = 200,
        clock: Callable[[], int] = wall_clock_ms,
        dead_letters: DeadLetterLimits | None = None,
        **old: Any,
    ) -> None:
        """``bus.declare=False`` declares nothing and checks that its queues and the
        exchanges exist (as when the user may not declare: see permissions.sh)."""
        self.bus = Deprecated("Monitor", old, accepts=BUS_ARGUMENTS).settle(bus, DEFAULT_BUS)
        self.serve = serve
        self.rabbit_url = self.bus.url
        self.declare_topology = self.bus.declare
        self.dead_letter_limits = dead_letters or DeadLetterLimits()
        self.config = config or WatchConfig()
        self.check_every_ms = check_every_ms
        self.clock = clock
        self.path = Path(state_path)
        self.metrics = MonitorMetrics()
        self.broker = make_broker(self.bus.url, tls=self.bus.tls)
        self.exchange = topic_exchange(self.bus.exchange)
        self.dead_letters = topic_exchange(dead_letter_exchange(self.bus.exchange))
        self.dlq_name = f"{check_resource(queue_name, 'queue name')}.dlq"
        # Passive for FastStream: provision_monitor declared it (or an admin did).
        self.queue = RabbitQueue(
            queue_name, durable=True, declare=False, routing_key=MONITOR_BINDING
        )
        self.subscriber = self.broker.subscriber(
            self.queue,
            self.exchange,
            ack_policy=AckPolicy.MANUAL,
            channel=Channel(prefetch_count=prefetch),
            decoder=raw_body,
            no_reply=True,  # a reply_to on a delivery is never answered
        )
        self.subscriber(self.on_message)
        self.state = WatchState()
        self._redeliveries = Redeliveries()
        self._views = 0
        """Check views held (recounted at each evaluation)."""
        self.events = 0
        self.last_evaluation: int | None = None
        self.save_error: str | None = None
        self.running = False
        self._status_cache: tuple[float, bytes] | None = None

    # --- lifecycle -------------------------------------------------------------------------

    def load(self) -> None:
        """The saved state, if any; a corrupt file is set aside and reported."""
        StateStore(self.path).check_writable()
        state, reason = load_file(self.path, WatchState.from_json)
        if reason is not None:
            aside = corrupt_path(self.path)
            log.error("monitor state %s unreadable (%s); moved to %s", self.path, reason, aside)
        if state is None:
            return
        self.state, fixed = repair(state)
        if fixed:
            log.warning("monitor state %s: %d values out of range dropped", self.path, fixed)
        log.info(
            "monitor state: %d agents, %d open incidents from %s",
            len(self.state.agents),
            len(self.state.incidents),
            self.path,
        )

    async def start(self) -> None:
        self.load()
        log.info(
            "monitor: %s, exchange %s, queue %s",
            mask_url(self.rabbit_url),
            self.exchange.name,
            self.queue.name,
        )
        connection = await connect(self.broker, self.rabbit_url)
        async with closed_on_failure(self.broker):
            await provision_monitor(
                connection,
                self.queue.name,
                self.exchange.name,
                MONITOR_BINDING,
                dead_letters=self.dead_letter_limits,
                declare=self.declare_topology,
            )
            await self.broker.start()
        self.running = True
        self._gauges()

    async def stop(self) -> None:
        self.running = False
        await self.subscriber.stop()
        await self._save()
        await self.broker.stop()

    async def health(self) -> Health:
        down = await unreachable(self.broker, self.rabbit_url)
        if down is not None:
            return down
        health = await queue_health(self.broker, self.queue.name, consuming=self.subscriber.running)
        detail = {**health.detail, "agents": len(self.state.agents)}
        if self.save_error:
            detail["state_error"] = self.save_error
        return Health(ok=health.ok, connected=health.connected, detail=detail)

    def describe(self) -> str:
        return (
            f"monitoring {len(self.state.agents)} agents on {self.queue.name}; "
            f"{len(self.state.incidents)} open incidents"
        )

    def routes(self) -> dict[str, Route]:
        async def page() -> Response:
            return 200, "text/html; charset=utf-8", dashboard_html()

        async def status() -> Response:
            # Cached for a second: a 10,000-agent document takes about half a second to
            # build (bench/bench_monitor_memory.py), and every open dashboard polls it.
            cached = self._status_cache
            if cached is None or time.monotonic() - cached[0] >= STATUS_CACHE_S:
                connected = await self.broker.ping(timeout=1)
                body = orjson.dumps(self.status(connected=connected))
                self._status_cache = cached = (time.monotonic(), body)
            return 200, "application/json", cached[1]

        return {"/": page, "/index.html": page, "/api/heartbeat/status": status}

    async def run(self, stop: asyncio.Event | None = None, **old: Any) -> None:
        """Run until ``stop`` is set, or SIGINT/SIGTERM; serve HTTP on ``serve``'s port.
        (``port=`` and ``host=`` are deprecated: pass ``serve=`` to the constructor.)"""
        deprecated = Deprecated("Monitor.run", old, accepts=("port", "host"), where=" to Monitor()")
        serve = deprecated.settle(self.serve, DEFAULT_SERVE)
        stop = stop_on_signals(stop)
        await run_service(
            self,
            stop,
            health_port=serve.port,
            health_host=serve.host,
            routes=self.routes(),
            main=lambda: self.watch_until(stop),
        )

    def run_sync(self) -> None:
        """Run until SIGINT or SIGTERM, in a new event loop."""
        asyncio.run(self.run())

    # --- events ----------------------------------------------------------------------------

    async def on_message(self, msg: RabbitMessage) -> None:
        message = msg.raw_message
        try:
            await self._on_event(message)
        except Exception as exc:  # whatever it was: dead-lettered with the reason
            if is_transient(exc):  # the broker went away: it redelivers the event
                log.warning("monitor: event on %s not settled: %s", message.routing_key, exc)
                return
            kind = exc.kind if isinstance(exc, EnvelopeError) else "processing_error"
            reason = str(exc) if isinstance(exc, EnvelopeError) else f"not processed: {exc!r}"
            self.metrics.monitor_dead_lettered.labels(kind).inc()
            await dead_letter(
                self.broker,
                self.dead_letters,
                self.dlq_name,
                message,
                reason,
                redeliveries=self._redeliveries,
                max_body_bytes=self.dead_letter_limits.max_body_bytes,
            )

    async def _on_event(self, message: AbstractIncomingMessage) -> None:
        key = message.routing_key or ""
        if ALERT_SEGMENT in key:  # ours (or another monitor's) coming back
            self.metrics.events.labels("ignored").inc()
            await message.ack()
            return
        received = self.clock()
        event = parse_envelope(message.body, message.content_type)
        agent, dropped = event_source(key, event)
        if agent is not None and agent not in self.state.agents:
            dropped = "too_many_agents" if len(self.state.agents) >= MAX_AGENTS else None
        if agent is not None and dropped is None:
            dropped = self._fold(agent, event, _dated(event, received, self.config.forget_ms))
        if dropped is not None:
            self.metrics.events_dropped.labels(dropped).inc()
            log.debug("monitor: event on %s dropped (%s)", key, dropped)
        self.events += 1
        # A status, started or result event (event_source checked its event_type).
        kind = (event_kind(event["event_type"]) or "ignored") if agent else "ignored"
        self.metrics.events.labels(kind).inc()
        await message.ack()

    def _fold(self, agent: str, event: dict[str, Any], at_ms: int) -> str | None:
        """Fold an event into the agent's view, in place (copying the fleet per event
        would be O(agents)); why it was dropped instead, if it was."""
        before = self.state.agents.get(agent)
        folded = observe_agent(self.state.agents, event, at_ms, agent)
        if folded is None:
            return None
        grew = len(folded[1].checks) > (len(before.checks) if before else 0)
        if grew and (
            len(folded[1].checks) > MAX_CHECKS_PER_AGENT or self._views >= MAX_CHECK_VIEWS
        ):
            return "too_many_checks"
        self.state.agents[folded[0]] = folded[1]
        self._views += grew
        return None

    # --- evaluation ------------------------------------------------------------------------

    async def watch_until(self, stop: asyncio.Event) -> None:
        """Evaluate every ``check_every_ms`` (the first after one interval) until ``stop``."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.check_every_ms / 1000)
            if stop.is_set():
                break
            try:
                await self.evaluate_once()
            except Exception:
                log.exception("monitor evaluation failed; trying again next interval")

    async def evaluate_once(self) -> list[Alert]:
        """Evaluate now, publish the alerts, save the state; the alerts published."""
        now = self.clock()
        after, alerts = evaluate(self.state, self.config, now)
        # The views evaluate forgot; events that arrive while the alerts are published
        # update self.state.agents in place, and an agent heard from again is kept.
        gone = {n: v for n, v in self.state.agents.items() if n not in after.agents}
        try:
            for alert in alerts:
                await self._publish(alert)
        except Exception as exc:
            self.metrics.alert_errors.inc()
            log.error("alerts not published (%s); they are sent again next time", exc)
            self.last_evaluation = now
            return []
        for name, view in gone.items():
            if self.state.agents.get(name) is view:
                del self.state.agents[name]
        self.state = replace(self.state, incidents=after.incidents)
        for alert in alerts:
            log.log(
                logging.INFO if alert.kind == "resolved" else logging.WARNING,
                "alert %s %s%s: %s",
                alert.kind,
                alert.agent,
                f"/{alert.check}" if alert.check else "",
                alert.detail,
                extra={"event": "alert", "agent": alert.agent, "kind": alert.kind},
            )
        self._gauges()
        self.last_evaluation = now
        await self._save()
        return alerts

    async def _publish(self, alert: Alert) -> None:
        key, event = alert_envelope(alert)
        await publish_json(self.broker, self.exchange, key, event)
        self.metrics.alerts.labels(alert.kind).inc()

    async def _save(self) -> None:
        # A shallow copy (the views are immutable): events may arrive while it is written.
        state = replace(self.state, agents=dict(self.state.agents))
        try:
            await asyncio.to_thread(lambda: atomic_write(self.path, state.to_json()))
            self.save_error = None
        except StateError as exc:
            if self.save_error is None:
                log.error("monitor state not saved: %s", exc)
            self.save_error = str(exc)

    def _gauges(self) -> None:
        self._views = sum(len(view.checks) for view in self.state.agents.values())
        stale = {i.agent for i in self.state.incidents.values() if i.kind == "stale"}
        counts = {"online": 0, "offline": 0, "stale": 0}
        for name, view in self.state.agents.items():
            state = "stale" if name in stale else "online" if view.online else "offline"
            counts[state] += 1
        for label, count in counts.items():
            self.metrics.agents.labels(label).set(count)
        kinds = dict.fromkeys(SEVERITY, 0)
        for incident in self.state.incidents.values():
            kinds[incident.kind] += 1
        for label, count in kinds.items():
            self.metrics.incidents.labels(label).set(count)

    def status(self, *, connected: bool = True, now: int | None = None) -> dict[str, Any]:
        return status_document(
            self.state,
            self.config,
            self.clock() if now is None else now,
            running=self.running and connected,
            monitor={
                "queue": self.queue.name,
                "check_interval_ms": self.check_every_ms,
                "events_received": self.events,
                "last_evaluation": iso(self.last_evaluation) if self.last_evaluation else None,
                "state_error": self.save_error,
            },
        )


def alert_envelope(alert: Alert) -> tuple[str, dict[str, Any]]:
    """An alert's routing key, ``heartbeat.<agent>._alert.<kind>``, and its event: that
    key as its event_type, ``source.type`` ``service``, and an event id derived from the
    alert (the same alert sent again has the same one)."""
    key = alert_key(alert.agent, alert.kind)
    event = envelope(
        key,
        alert.to_payload(),
        timestamp_ms=alert.sent_at,
        event_id=str(uuid.uuid5(_ALERT_NAMESPACE, alert.key)),
        source_type="service",
        component="monitor",
    )
    return key, event


def _dated(event: dict[str, Any], received: int, oldest_ms: int) -> int:
    """The event's own time, never later than its arrival (clocks drift), nor earlier
    than ``oldest_ms`` before it (a backlog older than that is dated by its arrival)."""
    stamp = instant_or_none(event.get("timestamp"))
    if stamp is None or not received - oldest_ms <= stamp <= received:
        return received
    return stamp


def status_document(
    state: WatchState,
    config: WatchConfig,
    now: int,
    *,
    running: bool,
    monitor: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``GET /api/heartbeat/status``: the reference monitor's shape (``success``,
    ``status``, ``monitor``, ``in_flight_agents``, ``timestamp``) plus ``agents`` (per
    check detail) and ``incidents``. Pure: a view of ``state`` at ``now``."""
    by_agent: dict[str, list[dict[str, Any]]] = {}
    incidents = []
    for key, incident in sorted(state.incidents.items()):
        item = {
            "id": key,
            "agent": incident.agent,
            "kind": incident.kind,
            "check": incident.check,
            "severity": SEVERITY[incident.kind],
            "opened_at": _iso(incident.opened_at),
            "open_for_ms": now - incident.opened_at,
            "detail": incident.detail,
        }
        incidents.append(item)
        by_agent.setdefault(incident.agent, []).append(item)

    agents = []
    in_flight = []
    for name in sorted(state.agents):
        view = state.agents[name]
        alerts = by_agent.get(name, [])
        idle = _since(now, view.last_seen)
        stale = any(a["kind"] == "stale" for a in alerts)
        checks = {}
        active: tuple[str | None, int] | None = None
        for check_name in sorted(view.checks):
            check = view.checks[check_name]
            due = next_due_at(check)
            running_since = check.started_at
            status = check.last_status or "unknown"
            if running_since is not None:
                status = "running"
                active = active or (check.running_key or None, running_since)
            checks[check_name] = {
                "status": status,
                "last_status": check.last_status,
                "last_result_at": _iso(check.last_result_at),
                "last_success_at": _iso(check.last_success_at),
                "since_last_run_ms": _since(now, check.last_result_at),
                "next_due_at": _iso(due),
                "due_in_ms": None if due is None else due - now,
                "cadence_ms": check.cadence_ms,
                "duration_ms": check.duration_ms,
                "running_for_ms": _since(now, running_since),
                "error": check.last_error,
                "failures": check.failures,
                "alerts": [a["kind"] for a in alerts if a["check"] == check_name],
            }
        state_word = _state_word(view, stale=stale, running=active is not None)
        agents.append(
            {
                "agent_id": name,
                "state": state_word,
                "online": view.online,
                "status": view.status,
                "config_error": view.config_error,
                "last_seen": _iso(view.last_seen),
                "idle_for_ms": idle,
                "checks": checks,
                "alerts": alerts,
            }
        )
        in_flight.append(
            {
                "agent_id": name,
                "task_id": active[0] if active else None,
                "status": state_word,
                "running_for_ms": now - active[1] if active else None,
                "idle_for_ms": idle,
            }
        )
    return {
        "success": True,
        "status": "online" if running else "offline",
        "monitor": {
            "running": running,
            "agents_monitoring": len(state.agents),
            "agents": sorted(state.agents),
            "config": {
                "stale_threshold_ms": config.stale_ms,
                "stale_threshold_ms_by_agent": config.stale_ms_by_agent,
                "timeout_grace_ms": config.timeout_grace_ms,
                "missed_grace_ms": config.missed_grace_ms,
                "repeat_ms": config.repeat_ms,
                "forget_ms": config.forget_ms,
            },
            **(monitor or {}),
        },
        "in_flight_agents": in_flight,
        "agents": agents,
        "incidents": incidents,
        "timestamp": iso(now),
    }


def _state_word(view: AgentView, *, stale: bool, running: bool) -> str:
    """An unusable config first (the agent cannot do its work, whether it still answers
    or not: red on the dashboard), then liveness."""
    if view.config_error is not None:
        return "config_invalid"
    if stale:
        return "stale"
    if not view.online:
        return "offline"
    return "running" if running else "idle"


def _iso(ms: int | None) -> str | None:
    return iso_or_none(ms)


def _since(now: int, ms: int | None) -> int | None:
    return None if ms is None else now - ms
