"""The RabbitMQ consumer: one agent's inbox on a FastStream broker.

Topology (see :mod:`.provision`, which declares it or checks that an admin did):

- exchange ``EXCHANGE_NAME`` (topic, durable) and its dead-letter exchange ``<exchange>.dlx``
  (topic too, so that topic permissions can confine each agent to its own keys);
- queue ``agent.<name>.inbox`` (durable) with exactly two bindings, ``agent.<name>.#`` and
  ``system.heartbeat.#``, and **one** consumer that dispatches on the delivery's routing
  key (two subscribers on one queue would compete for messages); its dead letters go to
  ``agent.<name>.dlq``, always with a reason, sent by this consumer.

Every delivery ends in an ack or a dead letter, whatever its headers or body: the body
is taken raw and decoded here; a delivery that cannot be used is dead-lettered with the
reason; one that fails on the broker or the disk is requeued, and dead-lettered after
:data:`MAX_ATTEMPTS` such failures (held longer before each retry). A tick is
acknowledged only after its result is published (with publisher confirms, persistent)
and the state is saved; prefetch 1 makes one check run at a time per agent while later
ticks wait in the queue.

Every command, and every tick that is not stale or a repeat of one already handled
(same event id), gets an answer correlated with it (AMQP ``correlation_id`` = its event
id): a command and a tick sent to this agent alone (``agent.<name>.heartbeat.tick``) get
``heartbeat.<agent>._command.ack`` (done, accepted, nothing due; with the reason) or
``.error`` (refused; with the reason); a tick to every agent is answered by the runs'
events, or the ``alive`` status with the reason nothing was due, or ``config_invalid``.

Commands are coalesced: when one arrives, the commands queued behind it are read too
(up to :data:`READ_AHEAD` of them, stopping at a tick). Their pauses and resumes are
applied with one state save, the tick (if one was reached) is handled next, then the
runs, one per check. A flood of commands costs a save per batch, not per command, and
cannot hold the ticks back for long. (Not on an inbox with a single active consumer,
where reading ahead is not allowed: there each command is handled on its own.)

With a replica name (``--standby``) the agent's state follows the bus
(:mod:`.follower`): a run's result carries the change it made, pauses and resumes are
published before they are made, and before any delivery is handled, the changes other
replicas published are applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import orjson
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from faststream import AckPolicy
from faststream.rabbit import Channel, RabbitBroker, RabbitQueue
from faststream.rabbit.annotations import RabbitMessage

from ..core.config import Pause
from ..core.envelope import (
    Command,
    EnvelopeError,
    Tick,
    envelope,
    parse_command,
    parse_tick,
    result_event_id,
)
from ..core.timeutil import floor_to, iso
from ..core.topology import (
    COMMANDS,
    TICK_KEY,
    agent_key,
    check_name,
    dead_letter_exchange,
    dead_letter_queue,
    inbox_bindings,
    inbox_queue,
    mask_url,
    reply_key,
    result_key,
    status_key,
)
from ..ops.health import Health
from ..ops.metrics import Metrics
from ..ops.service import run_service
from ..ops.settings import ServeSettings
from ..runtime.engine import (
    AgentRunner,
    RunResult,
    StartedRun,
    TickReport,
    local_envelope,
    wall_clock_ms,
)
from ..runtime.local import stop_on_signals
from ..runtime.store import AgentBusy, AgentLock, StateError
from .connection import (
    Redeliveries,
    closed_on_failure,
    connect,
    dead_letter,
    drop_test_recorder,
    is_transient,
    make_broker,
    publish_json,
    queue_health,
    raw_body,
    topic_exchange,
    unreachable,
)
from .follower import SYNC_WAIT_S, Follower
from .provision import TopologyError, provision_agent
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

__all__ = ["AgentBusy", "AgentConsumer", "HeartbeatConsumer", "TopologyError"]

log = logging.getLogger("heartbeat_consumer.consumer")

FUTURE_TOLERANCE_MS = 60_000
"""A tick up to this far (or one interval, if longer) ahead of our clock is taken as
clock skew; further ahead it is dead-lettered: run at its slot, it would record a run
in the future and hold the check (and every earlier tick) back until then."""
MAX_ATTEMPTS = 5
"""Transient failures (broker, disk) of one delivery before it is dead-lettered."""
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 8.0
"""A delivery that failed for a transient reason is held this long before it goes back
to the queue, doubling per attempt (0.5, 1, 2, 4 s): the attempts span longer than the
connection's reconnect interval (5 s), so a broker that went away for a moment costs a
confirmed tick no dead letter. Held, the agent handles nothing else meanwhile."""
COALESCED = ("run", "pause", "resume")
READ_AHEAD = 500
"""Commands read (and coalesced) behind the one delivered, at most."""
MAX_HOLD_S = 60.0
"""A batch whose runs have taken this long returns the deliveries it has not handled
yet to the queue before starting another run: no delivery waits unacknowledged for
longer than this plus one handler's timeout (at most 25 min), under RabbitMQ's
consumer_timeout (30 min)."""
SEEN_TICKS = 64
"""Event ids of recent ticks remembered (a repeat is not evaluated nor answered again);
an id is remembered once its tick was handled, so a redelivery after a failure is
evaluated."""


def retry_delay_s(attempts: int) -> float:
    """How long a delivery that failed ``attempts`` times is held before it is requeued."""
    return min(RETRY_FIRST_S * 2.0 ** (attempts - 1), RETRY_MAX_S)


class AgentConsumer:
    """One agent's inbox, tick handling and result publishing on a shared broker."""

    def __init__(
        self,
        broker: RabbitBroker,
        *,
        agent: str,
        heartbeat_path: str | os.PathLike[str],
        state_path: str | os.PathLike[str] | None = None,
        bus: BusSettings = DEFAULT_BUS,
        inbox: InboxSettings = DEFAULT_INBOX,
        channel: Channel | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        """Of ``bus``, the exchange and ``declare`` are used (``broker`` is connected to
        its URL). ``declare=False`` declares nothing and only checks that the exchanges
        and queues exist (a passive declare, which needs no configure permission: see
        deploy/rabbitmq/permissions.sh); a refused declaration falls back to that too."""
        self.broker = broker
        self.agent = check_name(agent, "agent name")
        self.metrics = metrics or Metrics()
        self.exchange = topic_exchange(bus.exchange)
        self.dead_letters = topic_exchange(dead_letter_exchange(bus.exchange))
        self.dead_letter_limits = inbox.dead_letters
        self.declare_topology = bus.declare
        self.exchanges_ready = False
        """Set by a fleet that ensured the exchanges just before opening this agent."""
        self.inbox_options = inbox.queue_options()
        self.single_active = "x-single-active-consumer" in self.inbox_options.arguments()
        """One consumer of the inbox at a time: this one may be a standby. Commands are
        not read ahead (basic.get) there: RabbitMQ refuses basic.get on a quorum one by
        closing the channel (which would fail every command, again and again)."""
        self.tick_interval_ms = inbox.tick_interval_ms
        self.alive_every_ms = inbox.alive_every_ms
        self._heard_at: int | None = None
        """The slot of our last run or ``alive``: an idle agent says ``alive`` when its
        last word is ``alive_every_ms`` old (not on every tick)."""
        # Passive for FastStream: provision_agent declared it (or an admin did).
        self.queue = RabbitQueue(
            inbox_queue(agent), durable=True, declare=False, routing_key=inbox_bindings(agent)[0]
        )
        self.follower = (
            None
            if inbox.replica is None
            else Follower(
                self.agent,
                inbox.replica,
                publish=self._publish_state,
                dead_letter=self._dead_letter,
                connect=self.broker.connect,
                missing=self._state_queue_missing,
            )
        )
        """With a replica name: the agent's state follows the bus (:mod:`.follower`)."""
        self.runner = AgentRunner(
            heartbeat_path,
            state_path=state_path,
            on_result=self._on_result,
            on_start=self._on_start,
            agent=agent,
            publish=self._publish_event,
            on_state=None if self.follower is None else self.follower.publish,
        )
        self._routes = {TICK_KEY: "tick", **{agent_key(agent, c): c for c in COMMANDS}}
        """Routing key -> what it is; anything else on the inbox is acked and ignored."""
        self.last_slot: int | None = None
        self._state_problem: str | None = None
        self._others = False
        """A replica: the inbox had an active consumer when we opened."""
        self._inflight: set[asyncio.Future[None]] = set()
        self._lock = asyncio.Lock()
        self._correlation: list[str] = []
        self._redeliveries = Redeliveries(MAX_ATTEMPTS)
        self._seen_ticks: OrderedDict[str, None] = OrderedDict()
        self._inbox: AbstractQueue | None = None
        self._channel = channel or Channel(prefetch_count=1)
        self.subscriber = broker.subscriber(
            self.queue,
            self.exchange,
            ack_policy=AckPolicy.MANUAL,
            channel=self._channel,
            decoder=raw_body,
            no_reply=True,  # a reply_to on a delivery is never answered
            persistent=False,  # held here, so a fleet can drop a removed agent
        )
        self.subscriber(self.on_message)
        drop_test_recorder(self.subscriber)
        self.lock = AgentLock(self.runner.store.path.parent, self.agent)
        state = self.runner.store.path
        if self.lock.path in (state, state.with_name(state.name + ".lock")):
            raise StateError(
                f"the state file {state} would be (or be locked by) the agent's lock file "
                f"{self.lock.path}: give it another name (default: <config>.state.json)"
            )

    # --- start-up -------------------------------------------------------------------------

    async def declare(self, lent: AbstractChannel | None = None) -> None:
        """Declare (or check) exchanges, the dead-letter queue, the inbox and its two
        bindings (on ``lent`` first, a channel a fleet lends to the agents it starts).
        Needs a connected broker; raises :class:`TopologyError`."""
        await self._provision(exchanges=not self.exchanges_ready, lent=lent)
        # On the subscriber's channel: FastStream keeps the first declared queue object
        # and consumes through it, so declaring it on the broker's default channel would
        # consume there, without our prefetch. Commands are read ahead through it too.
        self._inbox = await self.broker.config.declarer.declare_queue(
            self.queue, channel=self._channel
        )

    async def _provision(self, *, exchanges: bool, lent: AbstractChannel | None = None) -> None:
        """Declare (or check) the agent's queues (and with ``exchanges`` the exchanges)."""
        await provision_agent(
            await self.broker.connect(),
            self.agent,
            self.exchange.name,
            inbox=self.inbox_options,
            dead_letters=self.dead_letter_limits,
            declare=self.declare_topology,
            exchanges=exchanges,
            channel=lent,
        )

    def discard(self) -> None:
        """Take the subscriber off the broker (an agent that failed to open: the broker's
        start must not consume its inbox) and let go of the agent's lock."""
        self.broker._subscribers.discard(self.subscriber)
        self.stop_following()
        self.lock.release()

    def stop_following(self) -> None:
        if self.follower is not None:
            self.follower.stop()

    async def open(
        self, *, evaluate: bool = True, lent: AbstractChannel | None = None, wait: bool = True
    ) -> None:
        """Load the state, declare the topology (on ``lent`` first), say ``online`` and,
        with ``evaluate``, evaluate once (a fleet does that once its agents consume). A
        replica asks the others for the state and, with ``wait``, waits for it
        (:meth:`wait_for_state`: a fleet does that apart, not holding up the agents that
        start after it).

        An unusable state file does not stop the agent: it is reported (a
        ``state_error`` status event) and the state is kept in memory meanwhile. Raises
        :class:`~.store.AgentBusy` when another consumer of the agent runs with the same
        state directory."""
        # In a worker thread: a fleet starting many agents at once does their file
        # system work side by side, and the event loop goes on with their declarations.
        opening = asyncio.ensure_future(asyncio.to_thread(self._open_files))
        try:
            problem = await asyncio.shield(opening)
        except asyncio.CancelledError:  # the thread goes on: let go of what it takes
            with contextlib.suppress(BaseException):
                await opening
            self.lock.release()
            raise
        await self.declare(lent)
        await self.publish_status("online", pid=os.getpid())
        if problem is not None:
            log.error("%s: %s; running with the state in memory", self.agent, problem)
            await self._report_state(problem)
        if self.follower is not None:
            await self.catch_up()
            await self.follower.ask_for_state()
            self._others = bool(
                getattr(getattr(self._inbox, "declaration_result", None), "consumer_count", 0)
            )
            if wait:
                await self.wait_for_state()
        if evaluate:
            await self.evaluate_now()

    def _open_files(self) -> StateError | None:
        self.lock.acquire()
        try:
            return self.runner.start(require_writable=False)
        except BaseException:
            self.lock.release()
            raise

    async def _report_state(self, problem: Exception | None) -> None:
        """``state_error`` while saving fails; ``state_ok`` once it works again."""
        if problem is not None:
            self._state_problem = str(problem)
            await self.publish_status("state_error", error=self._state_problem)
        elif self._state_problem is not None:
            self._state_problem = None
            await self.publish_status("state_ok")

    async def evaluate_now(self, *, again: bool = False) -> TickReport | None:
        """Evaluate once at start-up, for the slot containing now, without a tick; None
        when a tick for that slot (or a later one) came first, unless ``again``. Not on
        an inbox with a single active consumer (a replica, ``--single-active-consumer``):
        this one may be a standby, and only the active consumer runs, on the ticks it
        is given."""
        if self.single_active and not again:
            return None
        slot = floor_to(wall_clock_ms(), self.tick_interval_ms)
        env = local_envelope(slot, source_type="startup")
        return await self._tick(slot, env, again=again)

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
        return Health(ok=health.ok, connected=health.connected, detail=detail)

    # --- publishing ------------------------------------------------------------------------

    async def _send(self, routing_key: str, event: dict[str, Any], correlation: str = "") -> None:
        await publish_json(
            self.broker, self.exchange, routing_key, event, correlation_id=correlation or None
        )

    async def _publish_event(self, routing_key: str, payload: dict[str, Any]) -> None:
        """An event a handler publishes (``publish``), under its own routing key."""
        event = envelope(
            routing_key,
            payload,
            timestamp_ms=wall_clock_ms(),
            correlation_ids=list(self._correlation),
        )
        await self._send(routing_key, event, self._correlation[0] if self._correlation else "")

    async def _send_run_event(self, run: StartedRun, word: str, at_ms: int) -> None:
        """A run's started or result event, correlated with the tick or command that
        caused it (``correlation_ids``: as UUIDs; the AMQP ``correlation_id``: the first
        id as it came), under ``heartbeat.<agent>.<check>.<word>``, its event_type. A
        replica's result carries the change of the state (``state_change``)."""
        key = result_key(self.agent, run.check, word)
        payload = run.to_payload()
        if isinstance(run, RunResult) and run.change is not None and self.follower is not None:
            payload["state_change"] = self.follower.payload(run.change)
        event = envelope(
            key,
            payload,
            timestamp_ms=at_ms,
            event_id=result_event_id(run.idempotency_key, word, run.started_at),
            correlation_ids=list(self._correlation),
        )
        await self._send(key, event, self._correlation[0] if self._correlation else "")

    async def wait_for_state(self) -> None:
        """A replica that opened: when the inbox had an active consumer (another
        replica), wait for the others' state before consuming; then follow every few
        seconds."""
        if self.follower is None:
            return
        if self._others and not await self.follower.wait_for_state(self.catch_up):
            log.warning(
                "%s: no other replica sent its state within %g s; going on with ours",
                self.agent,
                SYNC_WAIT_S,
            )
        self.follower.start(self.catch_up)

    async def _state_queue_missing(self) -> None:
        """Our state queue is gone (deleted, expired): declare it again if we may, and
        ask the others for the state, which we may have missed meanwhile."""
        if self.follower is None:
            return
        try:
            await self._provision(exchanges=False)
        except TopologyError as exc:
            log.error("%s: %s", self.agent, exc)
            return
        await self.follower.ask_for_state()

    async def _publish_state(self, routing_key: str, payload: dict[str, Any]) -> None:
        """A state event or sync request of our :class:`~.follower.Follower`."""
        event = envelope(routing_key, payload, timestamp_ms=wall_clock_ms())
        await self._send(routing_key, event)

    async def catch_up(self) -> int:
        """Apply the state changes other replicas published and we have not applied."""
        if self.follower is None:
            return 0
        async with self._lock:
            applied = await self.follower.catch_up(self.runner)
        if applied:
            log.info("%s: applied %d change(s) of the state from the bus", self.agent, applied)
        return applied

    async def _on_start(self, run: StartedRun) -> None:
        await self._send_run_event(run, "started", run.started_at)

    async def _on_result(self, result: RunResult) -> None:
        self.metrics.run(result)
        await self._send_run_event(result, result.status, result.finished_at)

    async def publish_status(self, status: str, *, correlation: str = "", **details: Any) -> None:
        key = status_key(self.agent, status)
        event = envelope(
            key,
            {"agent": self.agent, "status": status, **details},
            timestamp_ms=wall_clock_ms(),
            correlation_ids=[correlation],
        )
        await self._send(key, event, correlation)

    async def reply(
        self,
        command: str,
        command_id: str,
        outcome: Literal["done", "accepted", "nothing_due", "rejected"],
        reason: str,
        **details: Any,
    ) -> None:
        """Answer a command (or a tick sent to this agent alone), correlated with it:
        ``heartbeat.<agent>._command.ack``, or ``.error`` when it was refused."""
        key = reply_key(self.agent, "error" if outcome == "rejected" else "ack")
        event = envelope(
            key,
            {
                "agent": self.agent,
                "command": command,
                "command_id": command_id,
                "outcome": outcome,
                "reason": reason,
                **details,
            },
            timestamp_ms=wall_clock_ms(),
            correlation_ids=[command_id],
        )
        await self._send(key, event, command_id)

    # --- deliveries ------------------------------------------------------------------------

    async def on_message(self, msg: RabbitMessage) -> None:
        """Handle one delivery to its end even if the connection drops meanwhile (the
        delivery's task is then cancelled): a run half done would run again on the
        redelivery; finished, its result is published or kept to be re-sent."""
        task = asyncio.ensure_future(self._handle(msg.raw_message))
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

    async def _handle(self, first: AbstractIncomingMessage) -> None:
        batch = [first]
        if not self.single_active and self._routes.get(first.routing_key or "") in COALESCED:
            batch += await self._read_ahead()
        try:
            # A replica that just became the active consumer knows what the old one did.
            await self.catch_up()
            await self._process(batch)
        except Exception as exc:  # never leave a delivery of the batch unsettled
            await self._fail(batch, exc)

    async def _read_ahead(self) -> list[AbstractIncomingMessage]:
        """The deliveries queued behind a command (basic.get), up to the first tick."""
        got: list[AbstractIncomingMessage] = []
        if self._inbox is None:
            return got
        with contextlib.suppress(Exception):  # unsettled ones come back with the channel
            while len(got) < READ_AHEAD:
                message = await self._inbox.get(no_ack=False, fail=False, timeout=5)
                if message is None:
                    break
                got.append(message)
                if self._routes.get(message.routing_key or "") == "tick":
                    break
        return got

    async def _process(self, batch: Sequence[AbstractIncomingMessage]) -> None:
        """Pauses and resumes first (one save), then ticks, then runs (one per check)."""
        switches: list[tuple[AbstractIncomingMessage, Command]] = []
        ticks: list[tuple[AbstractIncomingMessage, Tick, bool]] = []
        runs: dict[str, list[tuple[AbstractIncomingMessage, Command]]] = {}
        for message in batch:
            kind = self._routes.get(message.routing_key or "")
            try:
                if kind is None:
                    log.debug("%s: ignoring %s", self.agent, message.routing_key)
                    await message.ack()
                elif kind == "tick":
                    alone = message.routing_key != TICK_KEY  # sent to this agent only
                    ticks.append((message, self._parse_tick(message), alone))
                else:
                    command = parse_command(message.body, kind, message.content_type)
                    if kind == "run":
                        runs.setdefault(command.check, []).append((message, command))
                    else:
                        switches.append((message, command))
            except Exception as exc:
                await self._fail([message], exc)
                if kind in ("run", "pause", "resume") and isinstance(exc, EnvelopeError):
                    await self._answer_unreadable(message, kind, exc)
        if runs:  # a run of a check the config does not have is refused here, at once
            known = await self.runner.check_names()
            unknown = [(m, c) for name in set(runs) - known for m, c in runs.pop(name)]
            await asyncio.gather(*(self._refuse(m, c, self._no_such_check(c)) for m, c in unknown))
        if switches:
            await self._guard([m for m, _ in switches], self._switch(switches))
        work: list[tuple[list[AbstractIncomingMessage], Callable[[], Awaitable[None]]]] = [
            ([message], functools.partial(self._on_tick, tick, alone))
            for message, tick, alone in ticks
        ]
        work += [([m for m, _ in g], functools.partial(self._run, g)) for g in runs.values()]
        held = asyncio.get_running_loop().time()
        for number, (messages, step) in enumerate(work):
            if number and asyncio.get_running_loop().time() - held > MAX_HOLD_S:
                # The rest has waited unacknowledged long enough (RabbitMQ closes channels
                # whose deliveries stay unacked for its consumer_timeout): back it goes.
                rest = [m for later, _ in work[number:] for m in later]
                log.info("%s: %d deliveries back to the queue (batch held)", self.agent, len(rest))
                for message in rest:
                    with contextlib.suppress(Exception):
                        await message.nack(requeue=True)
                return
            await self._guard(messages, step())

    async def _guard(
        self,
        messages: Sequence[AbstractIncomingMessage],
        work: Awaitable[Sequence[AbstractIncomingMessage] | None],
    ) -> None:
        """Await ``work``; ack the messages it returns (all of them if it returns None),
        or settle every message by the failure."""
        try:
            done = await work
        except Exception as exc:
            await self._fail(messages, exc)
            return
        for message in messages if done is None else done:
            if not message.processed:
                await message.ack()
                self._redeliveries.forget(message)

    async def _fail(self, messages: Sequence[AbstractIncomingMessage], exc: BaseException) -> None:
        """Settle deliveries that failed: requeue after a broker or disk failure (up to
        :data:`MAX_ATTEMPTS`), else dead-letter with the reason. Never raises."""
        transient = is_transient(exc)
        unsettled = [
            (m, self._redeliveries.failed(m) if transient else 0)
            for m in messages
            if not m.processed
        ]
        retried = [n for _, n in unsettled if 0 < n < MAX_ATTEMPTS]
        if retried:
            await asyncio.sleep(retry_delay_s(max(retried)))
        for message, attempts in unsettled:
            if message.processed:
                continue
            if 0 < attempts < MAX_ATTEMPTS:
                log.warning(
                    "%s: %s failed (%s: %s); returned to the queue (attempt %d of %d)",
                    self.agent,
                    message.routing_key,
                    type(exc).__name__,
                    exc,
                    attempts,
                    MAX_ATTEMPTS,
                )
                with contextlib.suppress(Exception):
                    await message.nack(requeue=True)
                continue
            if isinstance(exc, EnvelopeError):
                reason, kind = str(exc), exc.kind
            elif attempts:
                reason, kind = f"gave up after {attempts} attempts: {_describe(exc)}", "gave_up"
            else:
                log.error("%s: %s not processed: %s", self.agent, message.routing_key, exc)
                log.debug("%s: the failure", self.agent, exc_info=exc)
                reason, kind = f"not processed: {_describe(exc)}", "processing_error"
            await self._dead_letter(message, reason, kind)

    async def _dead_letter(self, message: AbstractIncomingMessage, reason: str, kind: str) -> None:
        self.metrics.dead_letter(self.agent, kind)
        await dead_letter(
            self.broker,
            self.dead_letters,
            dead_letter_queue(self.agent),
            message,
            reason,
            redeliveries=self._redeliveries,
            max_body_bytes=self.dead_letter_limits.max_body_bytes,
        )

    async def _refuse(self, message: AbstractIncomingMessage, command: Command, why: str) -> None:
        """Dead-letter a refused command and tell its sender why."""
        await self._dead_letter(message, why, "invalid_command")
        with contextlib.suppress(Exception):  # the dead letter keeps the reason anyway
            await self.reply(command.name, command.event_id, "rejected", why, check=command.check)

    async def _answer_unreadable(
        self, message: AbstractIncomingMessage, kind: str, exc: EnvelopeError
    ) -> None:
        """A command that could not be used was dead-lettered; if its event id can be
        read, its sender hears why too."""
        if len(message.body) > 65536:
            return
        try:
            event = orjson.loads(message.body)
        except orjson.JSONDecodeError:
            return
        event_id = event.get("event_id") if isinstance(event, dict) else None
        if isinstance(event_id, str) and 0 < len(event_id.encode()) <= 200:
            with contextlib.suppress(Exception):
                await self.reply(kind, event_id, "rejected", str(exc))

    def _parse_tick(self, message: AbstractIncomingMessage) -> Tick:
        tick = parse_tick(
            message.body, interval_ms=self.tick_interval_ms, content_type=message.content_type
        )
        now = wall_clock_ms()
        tolerance = max(self.tick_interval_ms, FUTURE_TOLERANCE_MS)
        if tick.slot_ms > now + tolerance:
            raise EnvelopeError(
                f"tick for {iso(tick.slot_ms)} is {(tick.slot_ms - now) / 1000:.0f} s ahead of "
                f"this host's clock (at most {tolerance / 1000:g} s is taken as clock skew); "
                "check the clocks of the ticker and this host",
                "from_future",
            )
        return tick

    async def _on_tick(self, tick: Tick, alone: bool = False) -> None:
        """Evaluate a tick; answer it (unless stale or seen before). ``alone``: it was
        sent to this agent only (answered with a reply, not only the runs' events)."""
        if tick.slot_ms < wall_clock_ms() - 2 * self.tick_interval_ms:
            log.debug(
                "%s: stale tick %s (%s) ignored", self.agent, tick.event_id, iso(tick.slot_ms)
            )
            self.metrics.tick(self.agent, "stale")
            return
        if tick.event_id in self._seen_ticks:
            log.debug("%s: tick %s seen before", self.agent, tick.event_id)
            self.metrics.tick(self.agent, "duplicate")
            return
        await self._evaluate_tick(tick, alone)
        self._seen_ticks[tick.event_id] = None  # handled: a repeat is not answered again
        while len(self._seen_ticks) > SEEN_TICKS:
            self._seen_ticks.popitem(last=False)

    async def _evaluate_tick(self, tick: Tick, alone: bool) -> None:
        report = await self._tick(tick.slot_ms, tick.envelope, answer=not alone)
        if report is None:  # evaluated already (by a tick, or at start-up meanwhile)
            latest = self.last_slot if self.last_slot is not None else tick.slot_ms
            log.debug("%s: tick for %s already handled", self.agent, iso(tick.slot_ms))
            self.metrics.tick(self.agent, "duplicate")
            if not alone:  # a tick to every agent: no answer from each (a flood of them)
                return
            later = "" if tick.slot_ms == latest else f"; the latest: {iso(latest)}"
            why = (
                f"the slot {iso(tick.slot_ms)} was evaluated already (at start-up or by an "
                f"earlier tick{later}): a check runs once per slot; run one now with "
                "run-check --force"
            )
            await self.reply("tick", tick.event_id, "nothing_due", why, slot=iso(tick.slot_ms))
            return
        self.metrics.tick(self.agent, "evaluated")
        if alone:
            await self._answer_tick(tick, report)

    async def _answer_tick(self, tick: Tick, report: TickReport) -> None:
        slot = iso(tick.slot_ms)
        if report.results:
            ran = [{"check": r.check, "status": r.status} for r in report.results]
            what = ", ".join(f"{r.check}: {r.status}" for r in report.results)
            await self.reply("tick", tick.event_id, "done", f"ran {what}", slot=slot, ran=ran)
        elif report.config_error is not None and report.plan is None:
            why = f"config invalid: {report.config_error}"
            await self.reply("tick", tick.event_id, "rejected", why, slot=slot)
        else:
            why = report.plan.why_nothing() if report.plan else "nothing due"
            await self.reply("tick", tick.event_id, "nothing_due", why, slot=slot)

    async def _tick(
        self, slot_ms: int, env: dict[str, Any], *, answer: bool = True, again: bool = False
    ) -> TickReport | None:
        """Evaluate a slot, unless it (or a later one) was evaluated already: then None
        (each slot once, whichever comes first of the start-up evaluation and a tick).
        ``answer``: the status events (``alive``, ``config_invalid``) carry the tick's
        event id as their correlation: the answer to a tick sent to every agent.
        ``again``: evaluate it even so (by hand)."""
        async with self._lock:
            if not again and self.last_slot is not None and slot_ms <= self.last_slot:
                return None
            self._correlation = [str(env.get("event_id", ""))]
            report = await self.runner.tick(slot_ms, env)
            self.last_slot = max(slot_ms, self.last_slot or slot_ms)
        self.metrics.config(self.agent, valid=report.config_error is None)
        self.metrics.not_due(self.agent, report.plan)
        if report.results:
            await self._report_state(report.state_error)
        correlation = str(env.get("event_id", "")) if answer else ""
        if report.config_error is not None:
            await self.publish_status(
                "config_invalid", correlation=correlation, error=str(report.config_error)
            )
        elif report.results:
            self._heard_at = slot_ms
        elif self._heard_at is None or slot_ms - self._heard_at >= self.alive_every_ms:
            # The monitor's dead-man's switch hears from an idle agent, now and then.
            why = report.plan.why_nothing() if report.plan else "nothing due"
            await self.publish_status(
                "alive", correlation=correlation, slot=iso(slot_ms), reason=why
            )
            self._heard_at = slot_ms
        return report

    async def _switch(
        self, items: Sequence[tuple[AbstractIncomingMessage, Command]]
    ) -> Sequence[AbstractIncomingMessage]:
        """Apply pauses and resumes in order, with one state save; refused ones are
        dead-lettered with the reason."""
        changes = [
            (c.check, Pause(until=c.until_ms, reason=c.reason) if c.name == "pause" else None)
            for _, c in items
        ]
        async with self._lock:
            self._correlation = [items[-1][1].event_id]
            refusals, error = await self.runner.apply_pauses(changes)
        accepted = []
        refused = []
        for (message, command), refusal in zip(items, refusals, strict=True):
            if refusal is None:
                accepted.append((message, command))
                log.info("%s: %sd %s", self.agent, command.name, command.check)
            else:
                refused.append(self._refuse(message, command, refusal))
        await asyncio.gather(*refused)
        if accepted:
            await self._report_state(error)
        saved = "" if error is None else f" (held in memory: the state was not saved: {error})"
        await asyncio.gather(  # a batch of up to READ_AHEAD answers, confirmed together
            *(
                self.reply(
                    command.name,
                    command.event_id,
                    "accepted",
                    f"{command.name}d {_what(command)}{saved}",
                    check=command.check,
                )
                for _, command in accepted
            )
        )
        return [message for message, _ in accepted]

    def _no_such_check(self, command: Command) -> str:
        return f"no check named {command.check!r} in the config of {self.agent}"

    async def _run(self, group: Sequence[tuple[AbstractIncomingMessage, Command]]) -> None:
        """One run of a check for every run command of it in the batch (forced if any is)."""
        first = group[0][1]
        force = any(command.force for _, command in group)
        async with self._lock:
            self._correlation = [command.event_id for _, command in group][:20]
            slot = floor_to(wall_clock_ms(), self.tick_interval_ms)
            outcome = await self.runner.run_check(
                first.check,
                slot,
                first.envelope,
                force=force,
                request_ids=[command.event_id for _, command in group],
            )
        if isinstance(outcome, str):
            log.warning("%s: run %s not done: %s", self.agent, first.check, outcome)
            if outcome.startswith("already run for request"):
                return  # a redelivery of a run that was done (and answered) before
            await asyncio.gather(
                *(
                    self.reply("run", command.event_id, "rejected", outcome, check=first.check)
                    for _, command in group
                )
            )
            return
        done = f"{first.check}: {outcome.status}" + (f" ({outcome.error})" if outcome.error else "")
        await asyncio.gather(
            *(
                self.reply(
                    "run",
                    command.event_id,
                    "done",
                    done,
                    check=first.check,
                    status=outcome.status,
                    idempotency_key=outcome.idempotency_key,
                    duration_ms=outcome.duration_ms,
                )
                for _, command in group
            )
        )


def _what(command: Command) -> str:
    if command.name == "pause" and command.until_ms is not None:
        return f"{command.check} until {iso(command.until_ms)}"
    return command.check


def _describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class HeartbeatConsumer:
    """One agent's consumer with its own broker connection (the programmatic API).

    ``HeartbeatConsumer(agent_name, heartbeat_path, bus=BusSettings(url=...,
    exchange=...)).run_sync()`` runs until SIGINT or SIGTERM. With
    ``serve=ServeSettings(port=...)`` it serves ``/health`` and ``/metrics``; under
    systemd it sends READY and WATCHDOG. The arguments these settings replace
    (``rabbit_url``, ``exchange_name``, also by position, ``tick_interval_ms``, ...,
    ``health_port``) still work, each with a DeprecationWarning.
    """

    def __init__(
        self,
        agent_name: str,
        heartbeat_path: str | os.PathLike[str],
        *old_positional: Any,
        bus: BusSettings = DEFAULT_BUS,
        inbox: InboxSettings = DEFAULT_INBOX,
        serve: ServeSettings = DEFAULT_SERVE,
        state_path: str | os.PathLike[str] | None = None,
        graceful_timeout_s: float = 60.0,
        **old: Any,
    ) -> None:
        deprecated = Deprecated(
            "HeartbeatConsumer",
            old,
            accepts=(*BUS_ARGUMENTS, *INBOX_ARGUMENTS, *SERVE_ARGUMENTS),
            positional=old_positional,
            positional_names=BUS_ARGUMENTS[:2],
        )
        self.bus = deprecated.settle(bus, DEFAULT_BUS)
        self.inbox = deprecated.settle(inbox, DEFAULT_INBOX)
        self.serve = deprecated.settle(serve, DEFAULT_SERVE)
        self.rabbit_url = self.bus.url
        self.graceful_timeout_s = graceful_timeout_s
        self.metrics = Metrics()
        self.broker = make_broker(
            self.bus.url, tls=self.bus.tls, graceful_timeout_s=graceful_timeout_s
        )
        self.agent_consumer = AgentConsumer(
            self.broker,
            agent=agent_name,
            heartbeat_path=Path(heartbeat_path),
            state_path=state_path,
            bus=self.bus,
            inbox=self.inbox,
            metrics=self.metrics,
        )

    @property
    def agent(self) -> AgentConsumer:
        """The same as :attr:`agent_consumer` (its old name; the agent's name is
        :attr:`agent_name`)."""
        return self.agent_consumer

    @property
    def agent_name(self) -> str:
        return self.agent_consumer.agent

    async def start(self) -> None:
        log.info("connecting to %s", mask_url(self.rabbit_url))
        await connect(self.broker, self.rabbit_url)
        try:
            async with closed_on_failure(self.broker):
                await self.agent_consumer.open()
                await self.broker.start()
        except BaseException:
            self.agent_consumer.stop_following()
            self.agent_consumer.lock.release()
            raise
        log.info("%s: consuming %s", self.agent_consumer.agent, self.agent_consumer.queue.name)

    async def stop(self) -> None:
        """Stop taking deliveries, let the running handler finish (up to the graceful
        timeout; it acks and saves state), publish ``offline``, close."""
        await self.agent_consumer.subscriber.stop()
        self.agent_consumer.stop_following()
        await self.agent_consumer.finish_inflight(self.graceful_timeout_s)
        try:
            await self.agent_consumer.publish_status("offline", pid=os.getpid())
        except Exception as exc:
            log.warning("%s: offline status not published: %s", self.agent_consumer.agent, exc)
        await self.broker.stop()
        self.agent_consumer.lock.release()

    async def health(self) -> Health:
        return await unreachable(self.broker, self.rabbit_url) or await self.agent_consumer.health()

    def describe(self) -> str:
        return f"agent {self.agent_consumer.agent}: consuming {self.agent_consumer.queue.name}"

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Run until ``stop`` is set, or SIGINT/SIGTERM."""
        await run_service(
            self, stop_on_signals(stop), health_port=self.serve.port, health_host=self.serve.host
        )

    def run_sync(self) -> None:
        """Run until SIGINT or SIGTERM, in a new event loop."""
        asyncio.run(self.run())
