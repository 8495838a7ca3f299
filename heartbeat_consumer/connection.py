"""Making the broker connection: URL, TLS files, graceful timeout (one place for all)."""

from __future__ import annotations

import contextlib
import logging
import ssl
from dataclasses import dataclass
from typing import Any

import orjson
from aio_pika.abc import AbstractChannel, AbstractRobustExchange
from faststream.rabbit import ExchangeType, RabbitBroker, RabbitExchange, RabbitQueue
from faststream.rabbit.annotations import RabbitMessage
from faststream.security import BaseSecurity

from .health import Health
from .topology import DEFAULT_URL, mask_url

__all__ = [
    "REASON_HEADER",
    "TlsFiles",
    "dead_letter",
    "declare_with_dead_letters",
    "make_broker",
    "publish_json",
    "queue_health",
    "topic_exchange",
    "unreachable",
]

log = logging.getLogger("heartbeat_consumer.connection")

REASON_HEADER = "x-heartbeat-dead-letter-reason"


class TlsError(Exception):
    """A CA, certificate or key file cannot be used."""


@dataclass(frozen=True)
class TlsFiles:
    """For ``amqps://`` with a private CA and/or client certificates."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def __bool__(self) -> bool:
        return any((self.ca_file, self.cert_file, self.key_file))

    def context(self) -> ssl.SSLContext:
        try:
            context = ssl.create_default_context(cafile=self.ca_file)
            if self.cert_file:
                context.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise TlsError(f"TLS files unusable ({self}): {exc}") from None
        return context


def make_broker(
    url: str = DEFAULT_URL,
    *,
    tls: TlsFiles | None = None,
    graceful_timeout_s: float | None = None,
) -> RabbitBroker:
    security = BaseSecurity(ssl_context=tls.context(), use_ssl=True) if tls else None
    return RabbitBroker(
        url, security=security, graceful_timeout=graceful_timeout_s, logger=None, fail_fast=True
    )


def topic_exchange(name: str, *, declare: bool = True) -> RabbitExchange:
    """The exchange as every component declares it: topic, durable. ``declare=False``
    only checks that it exists (passive), which needs no configure permission."""
    return RabbitExchange(name, type=ExchangeType.TOPIC, durable=True, declare=declare)


async def publish_json(
    broker: RabbitBroker,
    exchange: RabbitExchange,
    routing_key: str,
    event: dict[str, Any],
    *,
    correlation_id: str | None = None,
    expiration_ms: int | None = None,
) -> None:
    """Publish an event envelope: persistent, with confirms, not mandatory (results and
    ticks with nobody bound to them are normal)."""
    await broker.publish(
        orjson.dumps(event),
        exchange=exchange,
        routing_key=routing_key,
        persist=True,
        mandatory=False,
        content_type="application/json",
        message_id=event["event_id"],
        correlation_id=correlation_id,
        message_type=event["event_type"],
        expiration=None if expiration_ms is None else expiration_ms / 1000,
    )


async def declare_with_dead_letters(
    broker: RabbitBroker, exchange: RabbitExchange, dead_letters: RabbitExchange, dlq: str
) -> AbstractRobustExchange:
    """Declare the exchange, its dead-letter exchange and the queue ``dlq`` bound to it
    under its own name (every consumer's first steps); the declared exchange."""
    declared = await broker.declare_exchange(exchange)
    dlx = await broker.declare_exchange(dead_letters)
    queue = await broker.declare_queue(RabbitQueue(dlq, durable=True))
    await queue.bind(dlx, routing_key=dlq)
    return declared


async def unreachable(broker: RabbitBroker, url: str) -> Health | None:
    """The health of a broker connection that does not answer a ping (naming the masked
    URL), or None when it answers."""
    if await broker.ping(timeout=2):
        return None
    return Health(False, False, {"error": f"broker {mask_url(url)} unreachable"})


async def queue_health(
    broker: RabbitBroker,
    queue_name: str,
    *,
    consuming: bool,
    channel: AbstractChannel | None = None,
) -> Health:
    """Healthy when our subscriber runs (``consuming``) and the broker counts a consumer
    on the queue. A passive declare (it needs no permission) on ``channel``, or on a
    short-lived one: a missing queue closes the channel it was asked on."""
    detail: dict[str, Any] = {"queue": queue_name, "consuming": consuming}
    own = channel is None
    if channel is None:
        channel = await (await broker.connect()).channel()
    try:
        queue = await channel.declare_queue(queue_name, passive=True)
        consumers = queue.declaration_result.consumer_count or 0
    except Exception as exc:
        return Health(False, True, {**detail, "error": f"queue not usable: {exc}"})
    finally:
        if own:
            with contextlib.suppress(Exception):
                await channel.close()
    detail["consumers"] = consumers
    return Health(consuming and consumers > 0, True, detail)


async def dead_letter(
    broker: RabbitBroker,
    exchange: RabbitExchange,
    routing_key: str,
    msg: RabbitMessage,
    reason: str,
) -> None:
    """Send a message that cannot be processed, with its reason in a header, to a
    dead-letter queue (``routing_key`` on the dead-letter ``exchange``), then ack it.
    If that publish fails, reject it: the queue's own dead-lettering, without reason."""
    original = msg.raw_message.routing_key or ""
    log.warning("dead-lettering %s to %s: %s", original, routing_key, reason)
    try:
        await broker.publish(
            msg.body,
            exchange=exchange,
            routing_key=routing_key,
            persist=True,
            headers={REASON_HEADER: reason, "x-original-routing-key": original},
        )
    except Exception:
        await msg.reject()
        return
    await msg.ack()
