"""State that follows the bus: one replica of an agent publishes and follows its state.

Every replica of an agent (``--standby``; the inbox has a single active consumer) has
its own durable queue ``agent.<agent>.state.<replica>``, bound to
``heartbeat.<agent>._state.#``. The active one publishes every change of the agent's
state there (:mod:`..core.follow`; persistent, confirmed, before the delivery that
caused it is acknowledged), and each replica applies the changes the others published:
every few seconds, and before it handles any delivery of the inbox. A standby that
becomes the active consumer therefore knows every run the old one confirmed: a tick the
old one ran but did not acknowledge comes again and finds its slot done.

A replica that starts asks for the whole state (``agent.<agent>.heartbeat.sync``, which
only the active consumer of the inbox receives): it then knows what was run before its
queue existed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from ..core.follow import StateChange, StateEventError, parse_state_event
from ..core.topology import SYNC_COMMAND, agent_key, follow_queue, state_key
from ..runtime.engine import AgentRunner

__all__ = ["CATCH_UP_EVERY_S", "Follower"]

log = logging.getLogger("heartbeat_consumer.follower")

CATCH_UP_EVERY_S = 2.0
"""How often a replica applies what is waiting in its queue when no delivery made it."""
BATCH = 500
"""State events applied with one save, at most."""

Publish = Callable[[str, dict[str, Any]], Awaitable[None]]
DeadLetter = Callable[[AbstractIncomingMessage, str, str], Awaitable[None]]


class Follower:
    """The state events of one agent for one replica: publishing ours, applying theirs."""

    def __init__(
        self, agent: str, replica: str, *, publish: Publish, dead_letter: DeadLetter
    ) -> None:
        self.agent = agent
        self.replica = replica
        self.origin = uuid.uuid4().hex
        """This process: the events it published are not applied again."""
        self.queue_name = follow_queue(agent, replica)
        self.queue: AbstractQueue | None = None
        """Set by the consumer once declared (on its channel)."""
        self.applied = 0
        self._publish = publish
        self._dead_letter = dead_letter
        self._task: asyncio.Task[None] | None = None

    def payload(self, change: StateChange | None = None) -> dict[str, Any]:
        """A state event's payload (a run's goes in its result as ``state_change``)."""
        fields = {} if change is None else change.to_json()
        return {"agent": self.agent, "origin": self.origin, "replica": self.replica, **fields}

    async def publish(self, change: StateChange) -> None:
        """Publish a change of the pauses, or a snapshot (confirmed; raises if not)."""
        await self._publish(state_key(self.agent, change.word), self.payload(change))

    async def ask_for_state(self) -> None:
        """Ask the active replica for the whole state (it comes as a snapshot event)."""
        await self._publish(agent_key(self.agent, SYNC_COMMAND), self.payload())

    def is_ours(self, body: bytes) -> bool:
        """A sync request this process sent (the active one is us: nothing to send)."""
        with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
            payload = orjson.loads(body).get("payload")
            return isinstance(payload, dict) and payload.get("origin") == self.origin
        return False

    async def catch_up(self, runner: AgentRunner) -> int:
        """Apply every state event waiting in our queue that another replica published
        (in order, a save per batch), then acknowledge them; how many were applied. One
        that cannot be used is dead-lettered with the reason. Raises when the broker
        fails (then nothing may run on a state that is perhaps behind)."""
        if self.queue is None:
            return 0
        applied = 0
        while True:
            taken: list[AbstractIncomingMessage] = []
            changes: list[StateChange] = []
            while len(taken) < BATCH:
                message = await self.queue.get(no_ack=False, fail=False, timeout=5)
                if message is None:
                    break
                try:
                    found = parse_state_event(message.body, self.agent, message.routing_key)
                except StateEventError as exc:
                    await self._dead_letter(message, str(exc), "invalid_state_event")
                    continue
                taken.append(message)
                if found is not None and found[0] != self.origin:
                    changes.append(found[1])
            if changes:
                error = await runner.follow(changes)
                if error is not None:  # held in memory, as a run's state is
                    log.error("%s: followed state not saved: %s", self.agent, error)
                applied += len(changes)
            for message in taken:
                await message.ack()
            if len(taken) < BATCH:
                break
        self.applied += applied
        return applied

    def start(self, catch_up: Callable[[], Awaitable[int]]) -> None:
        """Catch up every :data:`CATCH_UP_EVERY_S` until :meth:`stop`."""
        if self._task is None:
            self._task = asyncio.create_task(self._every(catch_up))

    async def _every(self, catch_up: Callable[[], Awaitable[int]]) -> None:
        while True:
            await asyncio.sleep(CATCH_UP_EVERY_S)
            try:
                await catch_up()
            except Exception as exc:  # the broker is away: the next round tries again
                log.debug("%s: catching up failed (%s)", self.agent, exc)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
