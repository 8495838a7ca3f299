"""The RabbitMQ consumer: one agent's inbox on a FastStream broker.

Topology, declared identically by every component:

- exchange ``EXCHANGE_NAME`` (topic, durable) and its dead-letter exchange ``<exchange>.dlx``
  (topic too, so that topic permissions can confine each agent to its own keys);
- queue ``agent.<name>.inbox`` (durable, dead-lettering to ``agent.<name>.dlq``) with
  exactly two bindings, ``agent.<name>.#`` and ``system.heartbeat.#``, and **one**
  consumer that dispatches on the delivery's routing key (the second binding is made
  by hand after declaring: two subscribers on one queue would compete for messages).

Each delivery is acknowledged only after its result is published (with publisher
confirms, persistent) and the state is saved; prefetch 1 makes one check run at a time
per agent while later ticks wait in the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Literal

from aio_pika.abc import AbstractChannel
from aiormq.exceptions import ChannelPreconditionFailed
from faststream import AckPolicy
from faststream.rabbit import Channel, QueueType, RabbitBroker, RabbitQueue
from faststream.rabbit.annotations import RabbitMessage

from .config import Pause
from .connection import (
    TlsFiles,
    dead_letter,
    declare_with_dead_letters,
    make_broker,
    publish_json,
    queue_health,
    topic_exchange,
    unreachable,
)
from .engine import (
    AgentRunner,
    RunResult,
    StartedRun,
    TickReport,
    local_envelope,
    wall_clock_ms,
)
from .envelope import (
    Command,
    EnvelopeError,
    envelope,
    parse_command,
    parse_tick,
    result_event_id,
)
from .health import Health
from .local import stop_on_signals
from .metrics import Metrics
from .service import run_service
from .timeutil import floor_to, iso
from .topology import (
    COMMANDS,
    DEFAULT_EXCHANGE,
    DEFAULT_URL,
    TICK_KEY,
    agent_key,
    dead_letter_exchange,
    dead_letter_queue,
    inbox_bindings,
    inbox_queue,
    mask_url,
    result_key,
    status_key,
)

__all__ = ["AgentConsumer", "HeartbeatConsumer", "TopologyError"]

log = logging.getLogger("heartbeat_consumer.consumer")

DEFAULT_TICK_INTERVAL_MS = 60_000
FUTURE_TOLERANCE_MS = 60_000
"""A tick up to this far (or one interval, if longer) ahead of our clock is taken as
clock skew; further ahead it is dead-lettered: run at its slot, it would record a run
in the future and hold the check (and every earlier tick) back until then."""
QueueKind = Literal["classic", "quorum"]


class TopologyError(Exception):
    """The broker has an exchange or queue of this name with other settings."""


class AgentConsumer:
    """One agent's inbox, tick handling and result publishing on a shared broker."""

    def __init__(
        self,
        broker: RabbitBroker,
        *,
        agent: str,
        heartbeat_path: str | os.PathLike[str],
        state_path: str | os.PathLike[str] | None = None,
        exchange_name: str = DEFAULT_EXCHANGE,
        tick_interval_ms: int = DEFAULT_TICK_INTERVAL_MS,
        queue_type: QueueKind = "classic",
        single_active_consumer: bool = False,
        channel: Channel | None = None,
        declare_exchanges: bool = True,
        metrics: Metrics | None = None,
    ) -> None:
        """``declare_exchanges=False`` only checks that the exchanges exist (a passive
        declare, which needs no configure permission: see deploy/rabbitmq/permissions.sh)."""
        self.broker = broker
        self.agent = agent
        self.metrics = metrics or Metrics()
        self.exchange = topic_exchange(exchange_name, declare=declare_exchanges)
        self.dead_letters = topic_exchange(
            dead_letter_exchange(exchange_name), declare=declare_exchanges
        )
        self.tick_interval_ms = tick_interval_ms
        arguments: dict[str, Any] = {
            "x-dead-letter-exchange": self.dead_letters.name,
            "x-dead-letter-routing-key": dead_letter_queue(agent),
        }
        if single_active_consumer:
            arguments["x-single-active-consumer"] = True
        self.queue = RabbitQueue(  # type: ignore[call-overload]
            inbox_queue(agent),
            queue_type=QueueType.QUORUM if queue_type == "quorum" else QueueType.CLASSIC,
            durable=True,
            routing_key=inbox_bindings(agent)[0],
            arguments=arguments,
        )
        self.runner = AgentRunner(
            heartbeat_path,
            state_path=state_path,
            on_result=self._on_result,
            on_start=self._on_start,
            agent=agent,
        )
        self._routes = {TICK_KEY: "tick", **{agent_key(agent, c): c for c in COMMANDS}}
        """Routing key -> what it is; anything else on the inbox is acked and ignored."""
        self.last_slot: int | None = None
        self._state_problem: str | None = None
        self._inflight: set[asyncio.Future[None]] = set()
        self._lock = asyncio.Lock()
        self._correlation: list[str] = []
        self._channel = channel or Channel(prefetch_count=1)
        self.subscriber = broker.subscriber(
            self.queue,
            self.exchange,
            ack_policy=AckPolicy.MANUAL,
            channel=self._channel,
            persistent=False,  # held here, so a fleet can drop a removed agent
        )
        self.subscriber(self.on_message)

    # --- start-up -------------------------------------------------------------------------

    async def declare(self) -> None:
        """Declare exchanges, the dead-letter queue, the inbox and its second binding.

        Needs a connected broker; raises :class:`TopologyError` on a settings mismatch.
        """
        try:
            exchange = await declare_with_dead_letters(
                self.broker, self.exchange, self.dead_letters, dead_letter_queue(self.agent)
            )
            # On the subscriber's channel: FastStream keeps the first declared queue
            # object and consumes through it, so declaring it on the broker's default
            # channel would consume there, without our prefetch.
            inbox = await self.broker.config.declarer.declare_queue(
                self.queue, channel=self._channel
            )
            await inbox.bind(exchange, routing_key=inbox_bindings(self.agent)[1])
        except ChannelPreconditionFailed as exc:
            raise TopologyError(
                f"the broker already has exchange {self.exchange.name!r} or queue "
                f"{self.queue.name!r} with other settings than ours (exchange: topic, durable; "
                f"queue: durable, dead-lettering to {self.dead_letters.name!r}, "
                f"type {self.queue.arguments.get('x-queue-type') if self.queue.arguments else '?'}"
                f"): {exc}"
            ) from None

    async def open(self) -> None:
        """Load the state, declare the topology, say ``online`` and evaluate once.

        An unusable state file does not stop the agent: it is reported (a
        ``state_error`` status event) and the state is kept in memory meanwhile."""
        problem = self.runner.start(require_writable=False)
        await self.declare()
        await self.publish_status("online", pid=os.getpid())
        if problem is not None:
            log.error("%s: %s; running with the state in memory", self.agent, problem)
            await self._report_state(problem)
        await self.evaluate_now()

    async def _report_state(self, problem: Exception | None) -> None:
        """``state_error`` while saving fails; ``state_ok`` once it works again."""
        if problem is not None:
            self._state_problem = str(problem)
            await self.publish_status("state_error", error=self._state_problem)
        elif self._state_problem is not None:
            self._state_problem = None
            await self.publish_status("state_ok")

    async def evaluate_now(self) -> TickReport:
        """Evaluate once at start-up, for the slot containing now, without a tick."""
        slot = floor_to(wall_clock_ms(), self.tick_interval_ms)
        env = local_envelope(slot, source_type="startup")
        return await self._tick(slot, env)

    async def health(self, channel: AbstractChannel | None = None) -> Health:
        """Healthy when our subscriber runs and the broker counts a consumer on the inbox
        (asked on ``channel``, or on a short-lived one)."""
        health = await queue_health(
            self.broker, self.queue.name, consuming=self.subscriber.running, channel=channel
        )
        last = iso(self.last_slot) if self.last_slot is not None else None
        detail = {**health.detail, "last_slot": last}
        if self._state_problem is not None:  # reported, not a reason to restart
            detail["state_error"] = self._state_problem
        return Health(health.ok, health.connected, detail)

    # --- publishing ------------------------------------------------------------------------

    async def _send(self, routing_key: str, event: dict[str, Any], correlation: str = "") -> None:
        await publish_json(
            self.broker, self.exchange, routing_key, event, correlation_id=correlation or None
        )

    async def _send_run_event(
        self, event_type: str, run: StartedRun, word: str, at_ms: int
    ) -> None:
        """A run's started or result event, correlated with the tick or command that
        caused it, under ``heartbeat.<agent>.<check>.<word>``."""
        event = envelope(
            event_type,
            run.to_payload(),
            timestamp_ms=at_ms,
            event_id=result_event_id(run.idempotency_key, word),
            correlation_ids=list(self._correlation),
        )
        key = result_key(self.agent, run.check, word)
        await self._send(key, event, self._correlation[0] if self._correlation else "")

    async def _on_start(self, run: StartedRun) -> None:
        await self._send_run_event("heartbeat.started", run, "started", run.started_at)

    async def _on_result(self, result: RunResult) -> None:
        self.metrics.run(result)
        await self._send_run_event("heartbeat.result", result, result.status, result.finished_at)

    async def publish_status(self, status: str, **details: Any) -> None:
        event = envelope(
            "heartbeat.status",
            {"agent": self.agent, "status": status, **details},
            timestamp_ms=wall_clock_ms(),
        )
        await self._send(status_key(self.agent, status), event)

    # --- deliveries ------------------------------------------------------------------------

    async def on_message(self, msg: RabbitMessage) -> None:
        """Handle one delivery to its end even if the connection drops meanwhile (the
        delivery's task is then cancelled): a run half done would run again on the
        redelivery; finished, its result is published or kept to be re-sent."""
        task = asyncio.ensure_future(self._handle(msg))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                log.warning("%s: connection lost mid-delivery; finishing the run", self.agent)
            raise

    async def finish_inflight(self, timeout_s: float) -> None:
        """Wait (up to ``timeout_s``) for deliveries still being handled."""
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=timeout_s)

    async def _handle(self, msg: RabbitMessage) -> None:
        key = msg.raw_message.routing_key or ""
        kind = self._routes.get(key)
        try:
            if kind == "tick":
                await self._on_tick(msg)
            elif kind is not None:
                await self._on_command(msg, kind)
            else:
                log.debug("%s: ignoring %s", self.agent, key)
                await msg.ack()
        except EnvelopeError as exc:
            self.metrics.dead_letter(self.agent, exc.kind)
            await dead_letter(
                self.broker, self.dead_letters, dead_letter_queue(self.agent), msg, str(exc)
            )
        except Exception:
            log.exception("%s: %s not processed; returned to the queue", self.agent, key)
            with contextlib.suppress(Exception):
                await msg.nack(requeue=True)

    async def _on_tick(self, msg: RabbitMessage) -> None:
        tick = parse_tick(msg.body, interval_ms=self.tick_interval_ms)
        now = wall_clock_ms()
        tolerance = max(self.tick_interval_ms, FUTURE_TOLERANCE_MS)
        if tick.slot_ms > now + tolerance:
            raise EnvelopeError(
                f"tick for {iso(tick.slot_ms)} is {(tick.slot_ms - now) / 1000:.0f} s ahead of "
                f"this host's clock (at most {tolerance / 1000:g} s is taken as clock skew); "
                "check the clocks of the ticker and this host",
                "from_future",
            )
        if tick.slot_ms < now - 2 * self.tick_interval_ms:
            log.debug(
                "%s: stale tick %s (%s) ignored", self.agent, tick.event_id, iso(tick.slot_ms)
            )
            self.metrics.tick(self.agent, "stale")
        elif self.last_slot is not None and tick.slot_ms <= self.last_slot:
            log.debug("%s: tick for %s already handled", self.agent, iso(tick.slot_ms))
            self.metrics.tick(self.agent, "duplicate")
        else:
            await self._tick(tick.slot_ms, tick.envelope)
            self.metrics.tick(self.agent, "evaluated")
        await msg.ack()

    async def _tick(self, slot_ms: int, env: dict[str, Any]) -> TickReport:
        async with self._lock:
            self._correlation = [str(env.get("event_id", ""))]
            report = await self.runner.tick(slot_ms, env)
            self.last_slot = max(slot_ms, self.last_slot or slot_ms)
        self.metrics.config(self.agent, valid=report.config_error is None)
        self.metrics.not_due(self.agent, report.plan)
        if report.results:
            await self._report_state(report.state_error)
        if report.config_error is not None:
            await self.publish_status("config_invalid", error=str(report.config_error))
        elif not report.results:  # the monitor's dead-man's switch hears from us anyway
            await self.publish_status("alive", slot=iso(slot_ms))
        return report

    async def _on_command(self, msg: RabbitMessage, name: str) -> None:
        command: Command = parse_command(msg.body, name)
        async with self._lock:
            self._correlation = [command.event_id]
            if name == "run":
                slot = floor_to(wall_clock_ms(), self.tick_interval_ms)
                outcome = await self.runner.run_check(
                    command.check, slot, command.envelope, force=command.force
                )
                if isinstance(outcome, str):
                    log.warning("%s: run %s not done: %s", self.agent, command.check, outcome)
            elif name == "pause":
                pause = Pause(until=command.until_ms, reason=command.reason)
                await self._report_state(self.runner.set_pause(command.check, pause))
                log.info("%s: paused %s", self.agent, command.check)
            else:
                await self._report_state(self.runner.set_pause(command.check, None))
                log.info("%s: resumed %s", self.agent, command.check)
        await msg.ack()


class HeartbeatConsumer:
    """One agent's consumer with its own broker connection (the programmatic API).

    ``HeartbeatConsumer(agent_name=..., heartbeat_path=..., rabbit_url=...,
    exchange_name=...).run_sync()`` runs until SIGINT or SIGTERM. With ``health_port``
    it serves ``/health`` and ``/metrics``; under systemd it sends READY and WATCHDOG.
    """

    def __init__(
        self,
        agent_name: str,
        heartbeat_path: str | os.PathLike[str],
        rabbit_url: str = DEFAULT_URL,
        exchange_name: str = DEFAULT_EXCHANGE,
        *,
        state_path: str | os.PathLike[str] | None = None,
        tick_interval_ms: int = DEFAULT_TICK_INTERVAL_MS,
        queue_type: QueueKind = "classic",
        single_active_consumer: bool = False,
        declare_exchanges: bool = True,
        graceful_timeout_s: float = 60.0,
        tls: TlsFiles | None = None,
        health_port: int | None = None,
        health_host: str = "127.0.0.1",
    ) -> None:
        self.rabbit_url = rabbit_url
        self.health_port = health_port
        self.health_host = health_host
        self.graceful_timeout_s = graceful_timeout_s
        self.metrics = Metrics()
        self.broker = make_broker(rabbit_url, tls=tls, graceful_timeout_s=graceful_timeout_s)
        self.agent = AgentConsumer(
            self.broker,
            agent=agent_name,
            heartbeat_path=Path(heartbeat_path),
            state_path=state_path,
            exchange_name=exchange_name,
            tick_interval_ms=tick_interval_ms,
            queue_type=queue_type,
            single_active_consumer=single_active_consumer,
            declare_exchanges=declare_exchanges,
            metrics=self.metrics,
        )

    async def start(self) -> None:
        log.info("connecting to %s", mask_url(self.rabbit_url))
        await self.broker.connect()
        await self.agent.open()
        await self.broker.start()
        log.info("%s: consuming %s", self.agent.agent, self.agent.queue.name)

    async def stop(self) -> None:
        """Stop taking deliveries, let the running handler finish (up to the graceful
        timeout; it acks and saves state), publish ``offline``, close."""
        await self.agent.subscriber.stop()
        await self.agent.finish_inflight(self.graceful_timeout_s)
        try:
            await self.agent.publish_status("offline", pid=os.getpid())
        except Exception as exc:
            log.warning("%s: offline status not published: %s", self.agent.agent, exc)
        await self.broker.stop()

    async def health(self) -> Health:
        return await unreachable(self.broker, self.rabbit_url) or await self.agent.health()

    def describe(self) -> str:
        return f"agent {self.agent.agent}: consuming {self.agent.queue.name}"

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Run until ``stop`` is set, or SIGINT/SIGTERM."""
        await run_service(
            self,
            stop_on_signals(stop),
            health_port=self.health_port,
            health_host=self.health_host,
        )

    def run_sync(self) -> None:
        asyncio.run(self.run())
