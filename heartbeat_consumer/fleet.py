"""Fleet mode: every ``*.heartbeat.json`` of a directory in one process.

One broker connection, one channel for all inboxes (prefetch 1 per consumer), one
queue and consumer per agent. The agent of ``cack.heartbeat.json`` is ``cack``. The
directory is re-scanned periodically: added files start an agent, removed files stop
theirs (its queue stays, so nothing sent to it is lost).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

from faststream.rabbit import Channel

from .connection import TlsFiles, make_broker
from .consumer import DEFAULT_TICK_INTERVAL_MS, AgentConsumer, QueueKind
from .topology import DEFAULT_EXCHANGE, DEFAULT_URL, mask_url

__all__ = ["Fleet", "agent_files"]

log = logging.getLogger("heartbeat_consumer.fleet")

SUFFIX = ".heartbeat.json"


def agent_files(directory: Path) -> dict[str, Path]:
    """Agent name -> config file, for every ``<agent>.heartbeat.json`` in ``directory``."""
    return {
        path.name[: -len(SUFFIX)]: path
        for path in sorted(directory.glob(f"*{SUFFIX}"))
        if path.is_file() and len(path.name) > len(SUFFIX)
    }


class Fleet:
    def __init__(
        self,
        directory: str | os.PathLike[str],
        rabbit_url: str = DEFAULT_URL,
        exchange_name: str = DEFAULT_EXCHANGE,
        *,
        state_dir: str | os.PathLike[str] | None = None,
        tick_interval_ms: int = DEFAULT_TICK_INTERVAL_MS,
        queue_type: QueueKind = "classic",
        single_active_consumer: bool = False,
        rescan_s: float = 5.0,
        graceful_timeout_s: float = 60.0,
        tls: TlsFiles | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.state_dir = Path(state_dir) if state_dir else None
        self.rabbit_url = rabbit_url
        self.exchange_name = exchange_name
        self.tick_interval_ms = tick_interval_ms
        self.queue_type: QueueKind = queue_type
        self.single_active_consumer = single_active_consumer
        self.rescan_s = rescan_s
        self.broker = make_broker(rabbit_url, tls=tls, graceful_timeout_s=graceful_timeout_s)
        self.channel = Channel(prefetch_count=1)
        self.agents: dict[str, AgentConsumer] = {}
        self._started = False

    def _consumer(self, agent: str, path: Path) -> AgentConsumer:
        state = self.state_dir / f"{agent}.state.json" if self.state_dir else None
        return AgentConsumer(
            self.broker,
            agent=agent,
            heartbeat_path=path,
            state_path=state,
            exchange_name=self.exchange_name,
            tick_interval_ms=self.tick_interval_ms,
            queue_type=self.queue_type,
            single_active_consumer=self.single_active_consumer,
            channel=self.channel,
        )

    async def _add(self, agent: str, path: Path) -> None:
        consumer = self._consumer(agent, path)
        consumer.runner.start()
        await consumer.declare()
        await consumer.publish_status("online", pid=os.getpid())
        await consumer.evaluate_now()
        if self._started:
            await consumer.subscriber.start()
        self.agents[agent] = consumer
        log.info("fleet: %s added (%s)", agent, path.name)

    async def _remove(self, agent: str) -> None:
        consumer = self.agents.pop(agent)
        await consumer.subscriber.stop()
        with contextlib.suppress(Exception):
            await consumer.publish_status("offline", pid=os.getpid())
        log.info("fleet: %s removed", agent)

    async def rescan(self) -> None:
        """Start agents whose files appeared, stop those whose files went."""
        found = agent_files(self.directory)
        for agent in sorted(set(self.agents) - set(found)):
            await self._remove(agent)
        for agent in sorted(set(found) - set(self.agents)):
            try:
                await self._add(agent, found[agent])
            except Exception as exc:
                log.error("fleet: %s not started: %s", agent, exc)

    async def start(self) -> None:
        log.info("fleet: %s on %s", self.directory, mask_url(self.rabbit_url))
        await self.broker.connect()
        await self.rescan()
        await self.broker.start()
        self._started = True

    async def stop(self) -> None:
        for consumer in self.agents.values():
            await consumer.subscriber.stop()
        for consumer in self.agents.values():
            with contextlib.suppress(Exception):
                await consumer.publish_status("offline", pid=os.getpid())
        await self.broker.stop()

    async def run(self, stop: asyncio.Event) -> None:
        await self.start()
        try:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.rescan_s)
                if not stop.is_set():
                    await self.rescan()
        finally:
            await self.stop()
