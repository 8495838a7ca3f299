"""Sending a command (or a manual tick) and waiting for its answer: ``run-check``, ``tick``.

The message is published as mandatory on a channel with publisher confirms: a routing
key no queue is bound to (a misspelt agent, an agent never started) comes back, and is
reported as such instead of vanishing. To hear the answer, an exclusive, server-named
queue is bound to ``heartbeat.<agent>.#`` *before* publishing; the events correlated
with the message's event id are the answer (see :mod:`.consumer`): the run's
``started`` and result events, and the final ``heartbeat.<agent>._command.ack`` or
``.error``. A user that may not declare queues (no configure permission) cannot wait:
the message is sent, and this is said.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from aio_pika import DeliveryMode, Message
from aio_pika.abc import AbstractIncomingMessage
from aio_pika.exceptions import DeliveryError
from aiormq.exceptions import ChannelAccessRefused

from ..core.envelope import correlation_uuid, envelope, event_kind, event_type_fits, key_kind
from ..core.topology import DEFAULT_EXCHANGE, DEFAULT_URL
from ..runtime.engine import wall_clock_ms
from .connection import TlsFiles, connect, make_broker, quiet_reconnects
from .provision import declare_exchanges

__all__ = ["Answer", "send_and_wait"]

Outcome = Literal[
    "done",
    "accepted",
    "nothing_due",
    "rejected",
    "answered",
    "started",
    "sent",
    "unroutable",
    "unanswered",
    "lost",
]


@dataclass
class Answer:
    """What became of a command: the final reply's outcome (done, accepted, nothing_due,
    rejected), ``answered`` (a correlated event other than a reply: a status or result),
    ``started`` (the run started; no result within the wait), ``sent`` (not waited
    for), ``unroutable``, ``unanswered`` or ``lost`` (the connection went away while
    waiting)."""

    event_id: str
    outcome: Outcome
    reason: str = ""
    status: str | None = None
    """A run's status, when the answer carries one."""
    events: list[dict[str, Any]] = field(default_factory=list)
    """The correlated events, in order of arrival."""


LOST: dict[str, Any] = {"event_type": "lost"}
"""Put in the queue of arrivals when the reply channel closes (the broker went away)."""


def _correlated(
    message: AbstractIncomingMessage, event_id: str, agent: str
) -> dict[str, Any] | None:
    """The event, if it is an answer to ``event_id`` from ``agent``: under the agent's
    own keys (which topic permissions vouch for; a copy sent by CC keeps its sender's
    key) and of the type its key says (its ``event_type`` is the key, or the old word
    for its kind), naming the agent (and, for a reply, the command); else None.
    Correlated by the AMQP ``correlation_id`` (the id as sent) or ``correlation_ids``
    (the id, or :func:`~.envelope.correlation_uuid` of it). An id is not a secret: the
    monitor sees every one."""
    key = message.routing_key or ""
    parts = key.split(".")
    kind = key_kind(key, any_status=True)  # the event_type says if it is one (below)
    if parts[0] != "heartbeat" or parts[1:2] != [agent] or kind in (None, "alert", "state"):
        return None  # alerts, state events and other families: never an agent's answer
    try:
        event = orjson.loads(message.body)
    except orjson.JSONDecodeError:
        return None
    payload = event.get("payload") if isinstance(event, dict) else None
    if not isinstance(payload, dict) or payload.get("agent") != agent:
        return None
    if kind == "reply" and payload.get("command_id") != event_id:
        return None
    if kind in ("started", "result") and payload.get("check") != parts[2]:
        return None
    if not event_type_fits(event.get("event_type"), key):
        return None
    ids = event.get("correlation_ids")
    if message.correlation_id == event_id or (
        isinstance(ids, list) and (event_id in ids or correlation_uuid(event_id) in ids)
    ):
        found: dict[str, Any] = event
        return found
    return None


async def send_and_wait(
    routing_key: str,
    event_type: str,
    payload: dict[str, Any],
    *,
    agent: str | None,
    wait_s: float,
    rabbit_url: str = DEFAULT_URL,
    exchange_name: str = DEFAULT_EXCHANGE,
    tls: TlsFiles | None = None,
    declare: bool = True,
    now_ms: int | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> Answer:
    """Publish one event as mandatory and, given ``agent`` and ``wait_s > 0``, wait up to
    ``wait_s`` for the final answer of that agent. ``on_event`` sees each correlated
    event as it arrives. The envelope's ``event_type`` (and the AMQP ``type``) is
    ``routing_key``, Bloodbank's convention, and its ``source.type`` ``manual``;
    ``event_type`` is not used any more (it was the fixed word sent before) and stays
    for callers."""
    with quiet_reconnects():  # a lost connection is said once, by the answer
        broker = make_broker(rabbit_url, tls=tls)
        connection = await connect(broker, rabbit_url)
        try:
            await declare_exchanges(connection, exchange_name, declare=declare)
            now = wall_clock_ms() if now_ms is None else now_ms
            event = envelope(
                routing_key,
                payload,
                timestamp_ms=now,
                event_id=str(uuid.uuid4()),
                source_type="manual",
                component="cli",
            )
            event_id = event["event_id"]
            arrived: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
            listening = False
            if agent is not None and wait_s > 0:
                listening = await _listen(connection, exchange_name, agent, event_id, arrived)
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            exchange = await channel.get_exchange(exchange_name, ensure=False)
            try:
                await exchange.publish(
                    Message(
                        orjson.dumps(event),
                        content_type="application/json",
                        delivery_mode=DeliveryMode.PERSISTENT,
                        message_id=event_id,
                        type=routing_key,
                    ),
                    routing_key,
                    mandatory=True,
                )
            except DeliveryError:  # returned: no queue is bound to the key
                return Answer(event_id, "unroutable")
            if not listening:
                why = (
                    ""
                    if agent is None or wait_s <= 0
                    else "no permission to declare, bind or consume a reply queue"
                )
                return Answer(event_id, "sent", why)
            return await _wait(event_id, arrived, wait_s, on_event)
        finally:
            await broker.stop()


async def _listen(
    connection: Any,
    exchange_name: str,
    agent: str,
    event_id: str,
    arrived: asyncio.Queue[dict[str, Any]],
) -> bool:
    """Bind a reply queue to the agent's events; False when this user may not."""
    channel = await connection.channel()

    async def take(message: AbstractIncomingMessage) -> None:
        if (event := _correlated(message, event_id, agent)) is not None:
            arrived.put_nowait(event)

    try:
        queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
        await queue.bind(exchange_name, f"heartbeat.{agent}.#")
        await queue.consume(take, no_ack=True)
    except ChannelAccessRefused:
        return False
    channel.close_callbacks.add(lambda *_: arrived.put_nowait(LOST))
    return True


async def _wait(
    event_id: str,
    arrived: asyncio.Queue[dict[str, Any]],
    wait_s: float,
    on_event: Callable[[dict[str, Any]], None] | None,
) -> Answer:
    answer = Answer(event_id, "unanswered")
    deadline = asyncio.get_running_loop().time() + wait_s
    while (left := deadline - asyncio.get_running_loop().time()) > 0:
        try:
            event = await asyncio.wait_for(arrived.get(), left)
        except TimeoutError:
            break
        if event is LOST:
            answer.outcome = "lost"
            return answer
        answer.events.append(event)
        if on_event is not None:
            on_event(event)
        raw = event.get("payload")
        payload: dict[str, Any] = raw if isinstance(raw, dict) else {}
        kind = event_kind(event.get("event_type"))
        reason = str(payload.get("reason") or payload.get("error") or "")
        if kind == "reply":
            outcome = payload.get("outcome")
            if outcome in ("done", "accepted", "nothing_due", "rejected"):
                answer.outcome = outcome
                answer.reason = reason
                status = payload.get("status")
                answer.status = status if isinstance(status, str) else None
                return answer
        elif kind == "started":
            answer.outcome = "started"
        elif answer.outcome == "unanswered":  # a status or result: an answer, not the last
            answer.outcome = "answered"
            answer.reason = reason
            with contextlib.suppress(Exception):
                answer.status = str(payload["status"])
    return answer
