"""State that follows the bus: one replica of an agent publishes and follows its state.

Every replica of an agent (``--standby``; the inbox has a single active consumer) has
its own durable queue ``agent.<agent>.state.<replica>``, bound to
``heartbeat.<agent>._state.#`` and to the agent's results. The active one publishes
every change of the agent's state (:mod:`..core.follow`; persistent, confirmed, before
the delivery that caused it is acknowledged: a run's change inside its result), and
each replica applies the changes the others published, where they are newer than what
it has: every few seconds, and before it handles any delivery of the inbox. A standby
that becomes the active consumer therefore knows every run whose result the old one
had confirmed: a tick the old one ran but did not acknowledge comes again and finds
its slot done.

A replica that starts asks every other replica for the whole state (a ``_sync`` event,
in all their queues); each answers with a snapshot, merged check by check. When the
inbox already has consumers, it waits for one (at most :data:`SYNC_WAIT_S`) before it
consumes, so that it knows what was run before its queue existed.

The state queues are read (basic.get) on a channel of their own, one per connection:
a state queue that is missing closes that channel, not the inbox consumers'.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from aiormq.exceptions import ChannelNotFoundEntity

from ..core.follow import StateChange, StateEventError, parse_state_event, sync_request
from ..core.topology import follow_queue, state_key
from ..runtime.engine import AgentRunner

__all__ = ["CATCH_UP_EVERY_S", "SYNC_WAIT_S", "Follower"]

log = logging.getLogger("heartbeat_consumer.follower")

CATCH_UP_EVERY_S = 2.0
"""How often a replica applies what is waiting in its queue when no delivery made it."""
SYNC_WAIT_S = 5.0
"""How long a replica that starts beside others waits for their state."""
BATCH = 500
BATCH_BYTES = 32 * 1024 * 1024
"""State events applied with one save, at most (by count and by size)."""

Publish = Callable[[str, dict[str, Any]], Awaitable[None]]
DeadLetter = Callable[[AbstractIncomingMessage, str, str], Awaitable[None]]
Connect = Callable[[], Awaitable[AbstractRobustConnection]]

_channels: weakref.WeakKeyDictionary[AbstractRobustConnection, AbstractChannel] = (
    weakref.WeakKeyDictionary()
)
_opening: weakref.WeakKeyDictionary[AbstractRobustConnection, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


async def _channel_of(connection: AbstractRobustConnection) -> AbstractChannel:
    """The connection's channel for state queues (opened again once closed; one at a
    time, however many agents of a fleet ask at once)."""
    async with _opening.setdefault(connection, asyncio.Lock()):
        channel = _channels.get(connection)
        if channel is None or channel.is_closed:
            channel = await connection.channel()
            _channels[connection] = channel
        return channel


class Follower:
    """The state events of one agent for one replica: publishing ours, applying theirs."""

    def __init__(
        self,
        agent: str,
        replica: str,
        *,
        publish: Publish,
        dead_letter: DeadLetter,
        connect: Connect,
        missing: Callable[[], Awaitable[None]],
    ) -> None:
        """``missing`` is called when the state queue is not there (it declares it
        again, if it may)."""
        self.agent = agent
        self.replica = replica
        self.origin = uuid.uuid4().hex
        """This process: the events it published are not applied again."""
        self.queue_name = follow_queue(agent, replica)
        self.snapshots = 0
        """Snapshots of other replicas applied (the answers to our sync request)."""
        self._publish = publish
        self._dead_letter = dead_letter
        self._connect = connect
        self._missing = missing
        self._task: asyncio.Task[None] | None = None

    def payload(self, change: StateChange | None = None) -> dict[str, Any]:
        """A state event's payload (a run's goes in its result as ``state_change``)."""
        fields = {} if change is None else change.to_json()
        return {"agent": self.agent, "origin": self.origin, "replica": self.replica, **fields}

    async def publish(self, change: StateChange) -> None:
        """Publish a change of the pauses, a snapshot or a sync request (confirmed)."""
        await self._publish(state_key(self.agent, change.word), self.payload(change))

    async def ask_for_state(self) -> None:
        """Ask every other replica for the whole state (they answer with snapshots)."""
        self.snapshots = 0  # only answers to this request count
        await self.publish(sync_request())

    async def catch_up(self, runner: AgentRunner) -> int:
        """Apply every state event waiting in our queue (in order, a save per batch),
        answer the sync requests of others with a snapshot, then acknowledge them; how
        many changed our state. One that cannot be used is dead-lettered with the
        reason. Raises when the broker fails (then nothing may run on a state that is
        perhaps behind); what it had taken goes back to the queue."""
        channel = await _channel_of(await self._connect())
        queue = await channel.get_queue(self.queue_name, ensure=False)
        applied = 0
        while True:
            taken: list[AbstractIncomingMessage] = []
            try:
                count, more = await self._batch(runner, queue, taken)
            except BaseException:  # what was taken and not settled goes back, in order
                for message in taken:
                    if not message.processed:
                        with contextlib.suppress(Exception):
                            await message.nack(requeue=True)
                raise
            applied += count
            if not more:
                break
        return applied

    async def _batch(
        self, runner: AgentRunner, queue: AbstractQueue, taken: list[AbstractIncomingMessage]
    ) -> tuple[int, bool]:
        """One batch of :meth:`catch_up`, the messages it takes put in ``taken``: how many
        changes it applied, and whether more may wait."""
        changes: list[StateChange] = []
        size = 0
        while len(taken) < BATCH and size < BATCH_BYTES:
            try:
                message = await queue.get(no_ack=False, fail=False, timeout=5)
            except ChannelNotFoundEntity:
                log.warning("%s: state queue %s is missing", self.agent, self.queue_name)
                await self._missing()
                return 0, False
            if message is None:
                break
            size += len(message.body)
            try:
                found = parse_state_event(message.body, self.agent, message.routing_key)
            except Exception as exc:  # whatever it holds: dead-lettered with the reason
                why = str(exc) if isinstance(exc, StateEventError) else repr(exc)[:200]
                await self._dead_letter(message, why, "invalid_state_event")
                continue
            taken.append(message)
            if found is None:
                continue
            origin, change = found
            # Our own changes too (a pause whose confirm was lost is ours only here, and
            # applying one we have changes nothing); not our own requests and answers.
            if origin != self.origin or change.kind not in ("sync", "snapshot"):
                changes.append(change)
        applying = [change for change in changes if change.kind != "sync"]
        changed = 0
        if applying:
            changed, error = await runner.follow(applying)
            if error is not None:  # held in memory, as a run's state is
                log.error("%s: followed state not saved: %s", self.agent, error)
            self.snapshots += sum(change.kind == "snapshot" for change in applying)
        if len(applying) < len(changes):  # a sync request: answered before it is acked
            await self.publish(runner.snapshot())
            log.info("%s: sent the state to a replica that joined", self.agent)
        for message in taken:
            await message.ack()
        return changed, len(taken) >= BATCH or size >= BATCH_BYTES

    def start(self, catch_up: Callable[[], Awaitable[int]]) -> None:
        """Catch up every :data:`CATCH_UP_EVERY_S` until :meth:`stop`."""
        if self._task is None:
            self._task = asyncio.create_task(self._every(catch_up))

    async def _every(self, catch_up: Callable[[], Awaitable[int]]) -> None:
        failing = False
        while True:
            await asyncio.sleep(CATCH_UP_EVERY_S)
            try:
                await catch_up()
            except Exception as exc:  # the broker is away: the next round tries again
                if not failing:
                    log.warning("%s: cannot follow the state for now (%s)", self.agent, exc)
                failing = True
            else:
                if failing:
                    log.info("%s: following the state again", self.agent)
                failing = False

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def wait_for_state(self, catch_up: Callable[[], Awaitable[int]]) -> bool:
        """Catch up until another replica's snapshot came, at most :data:`SYNC_WAIT_S`;
        True if one did."""
        deadline = asyncio.get_running_loop().time() + SYNC_WAIT_S
        while self.snapshots == 0 and asyncio.get_running_loop().time() < deadline:
            with contextlib.suppress(Exception):
                await catch_up()
            if self.snapshots == 0:
                await asyncio.sleep(0.1)
        return self.snapshots > 0
