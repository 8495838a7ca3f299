"""Fleet mode: every ``*.heartbeat.json`` of a directory in one process.

One broker connection, one channel for all inboxes (prefetch 1 per consumer: a channel
per agent would cost the broker memory and hit the user's channel limit of
deploy/rabbitmq/permissions.sh), one queue and consumer per agent. Each agent's topology
is declared, or checked, on a channel of its own first (:mod:`.provision`), so that a
refusal closes nothing the others use. The agent of ``cack.heartbeat.json`` is ``cack``;
a file whose name is not an agent name (``a.b.heartbeat.json``, ``#.heartbeat.json``)
is reported once and skipped. The directory is re-scanned periodically: added files
start an agent, removed files stop theirs (its queue stays, so nothing sent to it is
lost).

An agent that fails to start (its queue or lock, a broker refusal) is that agent's
problem: it is logged, announced (``start_failed`` status event), shown in ``/health``'s
detail and in ``heartbeat_agent_up``, and retried with backoff (5 s doubling to 5 min)
while the others run. The fleet is healthy only when it runs at least one agent and
none failed to start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from faststream.rabbit import Channel

from ..core.envelope import envelope
from ..core.topology import (
    CONFIG_SUFFIX,
    InvalidName,
    check_name,
    mask_url,
    status_key,
)
from ..ops.health import Health
from ..ops.metrics import Metrics
from ..ops.service import run_service
from ..ops.settings import ServeSettings
from ..runtime.engine import wall_clock_ms
from ..runtime.local import stop_on_signals
from .connection import (
    closed_on_failure,
    connect,
    first_line,
    make_broker,
    publish_json,
    topic_exchange,
    unreachable,
)
from .consumer import AgentConsumer
from .provision import declare_exchanges
from .settings import (
    BUS_ARGUMENTS,
    DEFAULT_BUS,
    DEFAULT_INBOX,
    DEFAULT_SERVE,
    INBOX_ARGUMENTS,
    SERVE_ARGUMENTS,
    BusSettings,
    Deprecated,
    InboxSettings,
)

__all__ = ["Fleet", "FleetError", "agent_files", "pattern_suffix"]

log = logging.getLogger("heartbeat_consumer.fleet")

SUFFIX = CONFIG_SUFFIX
STATE_SUFFIX = ".state.json"
START_CONCURRENCY = 16
"""Agents started at once (each declares on a channel lent to it, says ``online`` and
starts its consumer; as many are evaluated at once): well under the 64 channels that
deploy/rabbitmq/permissions.sh allows a user, with the fleet's shared channel beside
them."""
EVALUATE_WITHIN_S = 30.0
"""Agents starting together are evaluated once all of them consume, or after this long
at the latest (one that takes longer to start holds up the others no further)."""
RETRY_FIRST_S = 5.0
RETRY_MAX_S = 300.0


class StartTimes(NamedTuple):
    """The last batch of agents started: how many, and seconds until all of them
    consumed and until all of them were evaluated once."""

    agents: int
    consuming_s: float
    evaluated_s: float


class _Lender:
    """Channels lent to the agents starting together, one to each at a time, for their
    declarations (five round trips on an open channel instead of eleven on two new
    ones); a channel that a refusal closed is replaced. Closed when they have started,
    so that no channel re-declares their queues after a reconnection."""

    def __init__(self, connection: AbstractRobustConnection) -> None:
        self.connection = connection
        self.idle: list[AbstractChannel] = []
        self.opened: list[AbstractChannel] = []

    @contextlib.asynccontextmanager
    async def lend(self) -> AsyncIterator[AbstractChannel | None]:
        channel = self.idle.pop() if self.idle else None
        if channel is None or channel.is_closed:
            try:
                channel = await self.connection.channel()
            except Exception:  # the agent declares on channels of its own, and fails there
                yield None
                return
            self.opened.append(channel)
        try:
            yield channel
        finally:
            if not channel.is_closed:
                self.idle.append(channel)

    async def close(self) -> None:
        for channel in self.opened:
            with contextlib.suppress(Exception):
                await channel.close()
        self.idle.clear()
        self.opened.clear()


class _FirstEvaluations:
    """The start-up evaluations of agents starting together: held back until
    :meth:`begin`, then run (``concurrency`` at a time) as agents are added."""

    def __init__(self, concurrency: int) -> None:
        self.limit = asyncio.Semaphore(concurrency)
        self.tasks: list[asyncio.Task[None]] = []
        self.waiting: list[AgentConsumer] = []
        self.begun = False
        self.count = 0

    def add(self, consumer: AgentConsumer) -> None:
        self.count += 1
        if self.begun:
            self.tasks.append(asyncio.create_task(self._evaluate(consumer)))
        else:
            self.waiting.append(consumer)

    def begin(self) -> None:
        self.begun = True
        waiting, self.waiting = self.waiting, []
        self.tasks += [asyncio.create_task(self._evaluate(c)) for c in waiting]

    async def done(self) -> None:
        await asyncio.gather(*self.tasks)

    def cancel(self) -> None:
        for task in self.tasks:
            task.cancel()

    async def _evaluate(self, consumer: AgentConsumer) -> None:
        async with self.limit:
            try:
                await consumer.evaluate_now()
            except Exception as exc:  # it consumes: the next tick evaluates it again
                log.warning("fleet: %s: first evaluation failed: %s", consumer.agent, exc)


class FleetError(Exception):
    """The fleet cannot start: its directory or state directory cannot be used."""


@dataclass
class _Failed:
    """An agent that failed to start, and when to try again."""

    error: str
    attempts: int
    retry_at: float


def pattern_suffix(pattern: str) -> str:
    """The SUFFIX of a ``*SUFFIX`` pattern; raises ValueError for any other pattern."""
    suffix = pattern[1:]
    if not pattern.startswith("*") or not suffix or any(c in suffix for c in "*?[]/"):
        raise ValueError(
            f"fleet pattern {pattern!r}: use '*SUFFIX' (such as '*.heartbeat.json' or "
            "'*.json'); the agent is the file name without SUFFIX"
        )
    return suffix


def agent_files(
    directory: Path,
    rejected: dict[str, str] | None = None,
    *,
    pattern: str = f"*{SUFFIX}",
) -> dict[str, Path]:
    """Agent name -> config file, for every file matching ``pattern`` (``*SUFFIX``) in
    ``directory`` whose name without SUFFIX is an agent name (state files,
    ``*.state.json``, are never agents); the others go into ``rejected`` (file name ->
    why), if given."""
    suffix = pattern_suffix(pattern)
    found = {}
    for path in sorted(directory.glob(f"*{suffix}")):
        name = path.name[: -len(suffix)]
        if not path.is_file() or not name or path.name.endswith(STATE_SUFFIX):
            continue
        try:
            found[check_name(name, "agent name")] = path
        except InvalidName as exc:
            if rejected is not None:
                rejected[path.name] = str(exc)
    return found


class Fleet:
    """Every agent config of a directory, in one process (see the module documentation).

    ``Fleet(directory, bus=BusSettings(...), inbox=InboxSettings(...),
    serve=ServeSettings(...)).run_sync()``; the arguments these settings replace
    (``rabbit_url``, ``exchange_name``, also by position, ``tick_interval_ms``, ...,
    ``health_port``) still work, each with a DeprecationWarning."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *old_positional: Any,
        bus: BusSettings = DEFAULT_BUS,
        inbox: InboxSettings = DEFAULT_INBOX,
        serve: ServeSettings = DEFAULT_SERVE,
        state_dir: str | os.PathLike[str] | None = None,
        rescan_s: float = 5.0,
        graceful_timeout_s: float = 60.0,
        pattern: str = f"*{SUFFIX}",
        start_concurrency: int = START_CONCURRENCY,
        **old: Any,
    ) -> None:
        deprecated = Deprecated(
            "Fleet",
            old,
            accepts=(*BUS_ARGUMENTS, *INBOX_ARGUMENTS, *SERVE_ARGUMENTS),
            positional=old_positional,
            positional_names=BUS_ARGUMENTS[:2],
        )
        self.bus = deprecated.settle(bus, DEFAULT_BUS)
        self.inbox = deprecated.settle(inbox, DEFAULT_INBOX)
        self.serve = deprecated.settle(serve, DEFAULT_SERVE)
        self.directory = Path(directory)
        pattern_suffix(pattern)  # a bad pattern is an error before anything starts
        self.pattern = pattern
        self._skipped_reported = False
        self.state_dir = Path(state_dir) if state_dir else None
        self.rabbit_url = self.bus.url
        self.exchange = topic_exchange(self.bus.exchange)
        self.rescan_s = rescan_s
        if start_concurrency < 1:
            raise ValueError(f"start_concurrency must be at least 1, not {start_concurrency}")
        self.start_concurrency = start_concurrency
        self.graceful_timeout_s = graceful_timeout_s
        self.metrics = Metrics()
        self.broker = make_broker(
            self.bus.url, tls=self.bus.tls, graceful_timeout_s=graceful_timeout_s
        )
        self.channel = Channel(prefetch_count=1)
        self.agents: dict[str, AgentConsumer] = {}
        self.failed: dict[str, _Failed] = {}
        """Agents that failed to start, retried with backoff."""
        self._empty_reported = False
        self._reported: set[str] = set()
        """File names already reported as not agent names (reported once each)."""
        self.last_start = StartTimes(0, 0.0, 0.0)

    def _consumer(self, agent: str, path: Path) -> AgentConsumer:
        state = self.state_dir / f"{agent}.state.json" if self.state_dir else None
        return AgentConsumer(
            self.broker,
            agent=agent,
            heartbeat_path=path,
            state_path=state,
            bus=self.bus,
            inbox=self.inbox,
            channel=self.channel,
            metrics=self.metrics,
        )

    async def _open(
        self, agent: str, path: Path, exchanges_ready: bool, lender: _Lender | None
    ) -> AgentConsumer:
        """Open the agent (declarations, state); :meth:`_consume` starts its consumer,
        and the caller evaluates it once the agents starting with it consume too."""
        consumer = self._consumer(agent, path)
        consumer.exchanges_ready = exchanges_ready
        try:
            if lender is None:
                await consumer.open(evaluate=False, wait=False)
            else:
                async with lender.lend() as channel:
                    await consumer.open(evaluate=False, lent=channel, wait=False)
        except BaseException:
            consumer.discard()  # the broker's start must not consume its inbox
            raise
        return consumer

    async def _consume(self, consumer: AgentConsumer) -> AgentConsumer:
        """Start the consumer of an opened agent (a replica first has the others' state)."""
        agent, path = consumer.agent, consumer.runner.config_path
        try:
            await consumer.wait_for_state()
            await consumer.subscriber.start()
        except BaseException:
            consumer.discard()
            with contextlib.suppress(Exception):
                await consumer.subscriber.stop()
            raise
        self.agents[agent] = consumer
        self.metrics.agent_up.labels(agent).set(1)
        if self.failed.pop(agent, None) is not None:
            log.info("fleet: %s started after all (%s)", agent, path.name)
        else:
            log.info("fleet: %s added (%s)", agent, path.name)
        return consumer

    async def _start_failed(self, agent: str, exc: Exception) -> None:
        """Report an agent that did not start; it is tried again after a backoff."""
        earlier = self.failed.get(agent)
        attempts = earlier.attempts + 1 if earlier else 1
        delay = min(RETRY_FIRST_S * 2 ** (attempts - 1), RETRY_MAX_S)
        error = first_line(exc)
        self.failed[agent] = _Failed(error, attempts, time.monotonic() + delay)
        self.metrics.agent_up.labels(agent).set(0)
        self.metrics.agent_start_failures.labels(agent).inc()
        log.error("fleet: %s not started: %s (trying again in %.0f s)", agent, error, delay)
        if earlier is None or earlier.error != error:  # announced once per distinct error
            key = status_key(agent, "start_failed")
            event = envelope(
                key,
                {"agent": agent, "status": "start_failed", "error": error},
                timestamp_ms=wall_clock_ms(),
                component="fleet",
            )
            with contextlib.suppress(Exception):  # not an AgentConsumer: none is registered
                await publish_json(self.broker, self.exchange, key, event)

    async def _remove(self, agent: str) -> None:
        consumer = self.agents.pop(agent)
        await consumer.subscriber.stop()
        await consumer.finish_inflight(self.graceful_timeout_s)
        consumer.discard()
        self.metrics.forget_agent(agent)
        with contextlib.suppress(Exception):
            await consumer.publish_status("offline", pid=os.getpid())
        log.info("fleet: %s removed", agent)

    async def rescan(self) -> None:
        """Start agents whose files appeared, stop those whose files went."""
        rejected: dict[str, str] = {}
        found = agent_files(self.directory, rejected, pattern=self.pattern)
        self._report_skipped(found)
        for name, why in rejected.items():
            if name not in self._reported:
                log.error("fleet: %s skipped: %s", name, why)
        self._reported = set(rejected)
        for agent in sorted(set(self.agents) - set(found)):
            await self._remove(agent)
        for agent in sorted(set(self.failed) - set(found)):
            del self.failed[agent]
            self.metrics.forget_agent(agent)
        now = time.monotonic()
        due = [
            agent
            for agent in sorted(set(found) - set(self.agents))
            if agent not in self.failed or self.failed[agent].retry_at <= now
        ]
        if due:
            await self._start_agents({agent: found[agent] for agent in due})
        if not self.agents and not self.failed and not self._empty_reported:
            log.warning(
                "fleet: no agents: %s has no *%s file (it is read again every %g s)",
                self.directory,
                SUFFIX,
                self.rescan_s,
            )
        self._empty_reported = not self.agents and not self.failed

    async def _start_agents(self, due: dict[str, Path]) -> None:
        """Start ``due``, ``start_concurrency`` at a time, each declaring on a channel
        lent to it; evaluate each once, when all of them consume (their start-up is not
        slowed by evaluations), or when :data:`EVALUATE_WITHIN_S` have passed (one slow
        agent holds up no other's evaluation for longer). A tick that comes meanwhile is
        handled as usual: each slot is evaluated once, whichever comes first."""
        began = time.monotonic()
        # FastStream's channel cache is not safe against concurrent first use (two
        # callers that both miss it open two channels): open the agents' shared channel
        # once, before they declare through it together. If that fails (the broker went
        # away), each agent's start fails, and is retried, alone.
        with contextlib.suppress(Exception):
            await self.broker.config.channel_manager.get_channel(self.channel)
        ready = await self._exchanges_ready()
        starting = asyncio.Semaphore(self.start_concurrency)
        evaluations = _FirstEvaluations(self.start_concurrency)
        lender = None
        with contextlib.suppress(Exception):  # without it, each agent declares alone
            lender = _Lender(await self.broker.connect())

        async def add(agent: str) -> None:
            try:
                async with starting:
                    opened = await self._open(agent, due[agent], ready, lender)
                # Apart from the others: a replica may wait a moment for the state.
                consumer = await self._consume(opened)
            except Exception as exc:
                await self._start_failed(agent, exc)
                return
            evaluations.add(consumer)

        adding = asyncio.ensure_future(asyncio.gather(*(add(agent) for agent in due)))
        try:
            try:
                await asyncio.wait({adding}, timeout=EVALUATE_WITHIN_S)
                evaluations.begin()
                await adding
            finally:
                if lender is not None:
                    await lender.close()
            consuming = time.monotonic() - began
            await evaluations.done()
        except BaseException:
            adding.cancel()
            evaluations.cancel()
            raise
        self.last_start = StartTimes(evaluations.count, consuming, time.monotonic() - began)
        if evaluations.count:
            log.info(
                "fleet: %d agent(s) consuming after %.2f s, evaluated after %.2f s",
                *self.last_start,
            )

    async def _exchanges_ready(self) -> bool:
        """Ensure the exchanges once for the agents about to start (not once per agent:
        two declarations and two channels each). False when that fails: then every agent
        ensures them itself, and fails alone with the reason, as it would have."""
        try:
            connection = await self.broker.connect()
            await declare_exchanges(connection, self.bus.exchange, declare=self.bus.declare)
        except Exception as exc:
            log.debug("fleet: exchanges not ensured for all (%s); each agent tries", exc)
            return False
        return True

    def _report_skipped(self, found: dict[str, Path]) -> None:
        """Once: JSON files the pattern leaves out (a directory laid out for another
        pattern, such as Bloodbank's ``<agent>.json``, would run no agent at all)."""
        if self._skipped_reported:
            return
        taken = {path.name for path in found.values()}
        skipped = sorted(
            path.name
            for path in self.directory.glob("*.json")
            if path.name not in taken
            and not path.name.endswith(STATE_SUFFIX)
            and not path.match(self.pattern)
        )
        if skipped:
            shown = ", ".join(skipped[:5]) + (
                f" and {len(skipped) - 5} more" if skipped[5:] else ""
            )
            log.warning(
                "fleet: %d JSON file(s) in %s do not match --pattern %s and are not agents: "
                "%s (--pattern '*.json' takes <agent>.json files)",
                len(skipped),
                self.directory,
                self.pattern,
                shown,
            )
            self._skipped_reported = True

    def prepare(self) -> None:
        """Check the directory and create the state directory (mode 0700) before anything
        is connected or declared; raises :class:`FleetError`."""
        if not self.directory.is_dir():
            what = "is not a directory" if self.directory.exists() else "does not exist"
            raise FleetError(f"fleet directory {self.directory} {what}")
        if self.state_dir is not None:
            if self.state_dir.exists() and not self.state_dir.is_dir():
                raise FleetError(f"state directory {self.state_dir} is not a directory")
            try:
                self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as exc:
                raise FleetError(
                    f"cannot create the state directory {self.state_dir}: {exc.strerror or exc}"
                ) from None
            if not self.state_dir.is_dir():
                raise FleetError(f"state directory {self.state_dir} is not a directory")

    async def start(self) -> None:
        self.prepare()
        log.info("fleet: %s on %s", self.directory, mask_url(self.rabbit_url))
        await connect(self.broker, self.rabbit_url)
        async with closed_on_failure(self.broker):
            # Started with no subscriber: each agent starts its own as it is added (the
            # broker's start would start them one after another).
            await self.broker.start()
            await self.rescan()

    async def stop(self) -> None:
        for consumer in self.agents.values():
            await consumer.subscriber.stop()
            consumer.stop_following()
        for consumer in self.agents.values():
            await consumer.finish_inflight(self.graceful_timeout_s)
        for consumer in self.agents.values():
            with contextlib.suppress(Exception):
                await consumer.publish_status("offline", pid=os.getpid())
        await self.broker.stop()
        for consumer in self.agents.values():
            consumer.discard()

    async def health(self) -> Health:
        """Healthy when connected, running at least one agent, none failed to start, and
        every agent's consumer is registered on its inbox; the detail names the agents
        that are not (one channel serves every probe)."""
        if down := await unreachable(self.broker, self.rabbit_url):
            return down
        connection = await self.broker.connect()
        channel = await connection.channel()
        unhealthy: dict[str, Any] = {}
        try:
            for name, consumer in list(self.agents.items()):
                if channel.is_closed:
                    channel = await connection.channel()
                health = await consumer.health(channel)
                if not health.ok:
                    unhealthy[name] = health.detail
        finally:
            with contextlib.suppress(Exception):
                await channel.close()
        failed = {name: f.error for name, f in self.failed.items()}
        detail: dict[str, Any] = {"agents": len(self.agents), "unhealthy": unhealthy}
        if failed:
            detail["failed_to_start"] = failed
        if not self.agents:
            detail["error"] = f"no agent runs (directory {self.directory})"
        return Health(
            ok=bool(self.agents) and not unhealthy and not failed,
            connected=True,
            detail=detail,
        )

    def describe(self) -> str:
        failed = f", {len(self.failed)} failed to start" if self.failed else ""
        return f"fleet {self.directory}: {len(self.agents)} agent(s){failed}"

    async def _rescan_until(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.rescan_s)
            if not stop.is_set():
                await self.rescan()

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Run until ``stop`` is set, or SIGINT/SIGTERM."""
        stop = stop_on_signals(stop)
        await run_service(
            self,
            stop,
            health_port=self.serve.port,
            health_host=self.serve.host,
            main=lambda: self._rescan_until(stop),
        )

    def run_sync(self) -> None:
        """Run until SIGINT or SIGTERM, in a new event loop."""
        asyncio.run(self.run())
