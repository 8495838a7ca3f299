"""Making the broker connection: URL, TLS files, graceful timeout (one place for all)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import ssl
import stat
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import orjson
from aio_pika import RobustConnection
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from aiormq.exceptions import AMQPError, ChannelInvalidStateError, ProbableAuthenticationError
from faststream.message import StreamMessage
from faststream.rabbit import ExchangeType, RabbitBroker, RabbitExchange
from faststream.security import BaseSecurity
from yarl import URL

from ..core.topology import (
    DEFAULT_URL,
    InvalidUrl,
    check_resource,
    check_url,
    mask_url,
    node_urls,
)
from ..ops.health import Health
from ..ops.logs import first_line
from . import amqp_decoding

amqp_decoding.install()  # no delivery's properties can kill a connection (see there)

__all__ = [
    "REASON_HEADER",
    "BrokerError",
    "closed_on_failure",
    "first_line",
    "Redeliveries",
    "TlsFiles",
    "dead_letter",
    "drop_test_recorder",
    "is_transient",
    "connect",
    "make_broker",
    "NodesConnection",
    "publish_json",
    "queue_health",
    "raw_body",
    "topic_exchange",
    "unreachable",
]

log = logging.getLogger("heartbeat_consumer.connection")

REASON_HEADER = "x-heartbeat-dead-letter-reason"


class BrokerError(Exception):
    """The broker cannot be used: unreachable, a refused login, an unknown virtual host,
    a lost connection. The one exception type for broker failures; its text is one line
    that names the (masked) URL and what to check."""


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
        for path in (self.ca_file, self.cert_file, self.key_file):
            _regular_file(path)
        try:
            context = ssl.create_default_context(cafile=self.ca_file)
            if self.cert_file:
                context.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise TlsError(f"TLS files unusable ({self}): {exc}") from None
        return context


def _regular_file(path: str | None) -> None:
    """TLS files are read by OpenSSL, which would wait on a FIFO for ever: refuse
    anything but a regular file first."""
    if path is None:
        return
    try:
        mode = Path(path).stat().st_mode
    except OSError as exc:
        raise TlsError(f"TLS files unusable ({path}): {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        raise TlsError(f"TLS files unusable ({path} is not a regular file)")


NODE_TIMEOUT_S = 5.0
"""How long a connection attempt waits for one node of a list before it tries the next
(a node cut off by a partition does not refuse, it does not answer)."""

_CONNECT_TRANSPORT = "_RobustConnection__connect_transport"
"""aio-pika's one connection attempt of a robust connection (its first connect and each
reconnect), which :class:`NodesConnection` wraps; tested to exist."""

_CONNECT_TIMEOUT = "_RobustConnection__connect_timeout"
"""The timeout aio-pika gives that attempt's handshake (None: none was given)."""


class NodesConnection(RobustConnection):
    """A robust connection to one node of a list (the nodes of one cluster): each attempt,
    the first connect and every reconnect, tries the node it was last connected to first,
    then the others in order, and takes the first that answers. A node that goes away
    is left for the next one at the next reconnect."""

    node_list: tuple[str, ...] = ()
    """The nodes' URLs (set on a subclass per broker: :func:`nodes_connection`)."""

    def __init__(
        self, url: URL, loop: asyncio.AbstractEventLoop | None = None, **kwargs: Any
    ) -> None:
        super().__init__(url, loop=loop, **kwargs)
        query = self.url.query  # the connection's parameters, the same for every node
        nodes = [URL(node) for node in self.node_list]
        self.nodes = [node.with_query(query) if query else node for node in nodes] or [self.url]
        self.node = 0
        """Index of the node connected to (or tried first next time)."""

    async def _RobustConnection__connect_transport(self) -> None:
        attempt = getattr(RobustConnection, _CONNECT_TRANSPORT)
        # The handshake's timeout (not the restore of channels and consumers after it).
        if getattr(self, _CONNECT_TIMEOUT, None) is None:
            setattr(self, _CONNECT_TIMEOUT, NODE_TIMEOUT_S)
        failure: BaseException | None = None
        for step in range(len(self.nodes)):
            index = (self.node + step) % len(self.nodes)
            self.url = self.nodes[index]
            try:
                await attempt(self)
            except (*CONNECTION_EXCEPTIONS, TimeoutError) as exc:
                failure = exc
                log.warning(
                    "broker node %s did not answer (%s)%s",
                    mask_url(str(self.url)),
                    first_line(exc),
                    "; trying the next" if step + 1 < len(self.nodes) else "",
                )
                continue
            if index != self.node:
                log.warning("connected to broker node %s", mask_url(str(self.url)))
            self.node = index
            return
        raise failure or ConnectionError("no broker node to connect to")


def nodes_connection(nodes: Sequence[str]) -> type[NodesConnection]:
    """A :class:`NodesConnection` class for ``nodes`` (aio-pika makes the connection
    from its class and one URL; the list must not go into that URL's query, where
    the libraries would log it with the passwords)."""
    return type("NodesConnection", (NodesConnection,), {"node_list": tuple(nodes)})


def make_broker(
    url: str = DEFAULT_URL,
    *,
    tls: TlsFiles | None = None,
    graceful_timeout_s: float | None = None,
) -> RabbitBroker:
    """The broker of ``url``: one node, or a comma-separated list of a cluster's nodes
    (:class:`NodesConnection`)."""
    check_url(url)
    nodes = node_urls(url)
    if tls and len(nodes) > 1 and not all(n.lower().startswith("amqps://") for n in nodes):
        raise InvalidUrl(  # FastStream makes only the first node amqps:// for the TLS files
            f"broker URL {mask_url(url)}: with TLS files every node must be amqps://"
        )
    security = BaseSecurity(ssl_context=tls.context(), use_ssl=True) if tls else None
    # serializer=None: our handlers take the raw message, so FastStream need not build
    # a pydantic model per subscriber (0.3 ms of CPU per agent of a starting fleet).
    broker = RabbitBroker(
        nodes[0],
        security=security,
        graceful_timeout=graceful_timeout_s,
        logger=None,
        fail_fast=True,
        serializer=None,
    )
    if len(nodes) > 1:  # FastStream hands these to aio_pika.connect_robust
        broker._connection_kwargs["connection_class"] = nodes_connection(nodes)
    return broker


class _QuietReconnects(logging.Filter):
    """Drops the AMQP libraries' lines about the first connection attempt ("Reconnecting
    after 5 seconds", "error when creating transport"): with ``fail_fast`` nothing
    reconnects, and :func:`connect` says what failed in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return False


@contextlib.contextmanager
def quiet_reconnects() -> Iterator[None]:
    """Within: the AMQP libraries' reconnect lines are dropped (a short-lived command,
    or a first connection attempt, says what failed itself)."""
    quiet = _QuietReconnects()
    loggers = [logging.getLogger(n) for n in ("aio_pika.robust_connection", "aiormq.connection")]
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)


@contextlib.asynccontextmanager
async def closed_on_failure(broker: RabbitBroker) -> AsyncIterator[None]:
    """Within: a start-up step that fails closes ``broker`` before the error goes on, so
    the process ends with the connection closed, not "Reconnecting after 5 seconds"."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            await broker.stop()
        raise


async def connect(broker: RabbitBroker, url: str) -> AbstractRobustConnection:
    """Connect ``broker`` (to ``url``, for the messages); raises :class:`BrokerError`
    with one line naming the masked URL and what to check."""
    with quiet_reconnects():
        try:
            return await broker.connect()
        except (AMQPError, OSError, TimeoutError) as exc:
            raise BrokerError(describe_connect_error(url, exc)) from None


def describe_connect_error(url: str, exc: BaseException) -> str:
    """What a failed connection attempt means, in one line."""
    where = mask_url(url)
    parts = urlsplit((node_urls(url) or [url])[0])  # a cluster's nodes share user and vhost
    user = unquote(parts.username or "guest")
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    text = str(exc.args[-1] if exc.args else exc)
    if isinstance(exc, ProbableAuthenticationError) or "ACCESS_REFUSED" in text:
        return (
            f"RabbitMQ at {where} refused the login of user {user!r}: check the user name "
            "and password (RABBIT_URL)"
        )
    if "Connection.Close" in text:  # the broker closed the handshake: the vhost
        return (
            f"RabbitMQ at {where} has no virtual host {vhost!r} that user {user!r} may "
            "use: check the URL's path (RABBIT_URL) or the user's permissions"
        )
    if isinstance(exc, TimeoutError):
        text = "timed out"
    return f"cannot reach RabbitMQ at {where}: {text} (is it running, and are host and port right?)"


def topic_exchange(name: str) -> RabbitExchange:
    """The exchange as FastStream publishes to it: topic, durable, checked passively
    (:mod:`.provision` declared it, or an admin did: no configure permission needed).
    Raises :class:`~.topology.InvalidName` for a name that cannot be one."""
    check_resource(name.removesuffix(".dlx"))
    return RabbitExchange(name, type=ExchangeType.TOPIC, durable=True, declare=False)


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


async def unreachable(broker: RabbitBroker, url: str) -> Health | None:
    """The health of a broker connection that does not answer a ping (naming the masked
    URL), or None when it answers."""
    if await broker.ping(timeout=2):
        return None
    return Health(
        ok=False, connected=False, detail={"error": f"broker {mask_url(url)} unreachable"}
    )


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
        return Health(
            ok=False, connected=True, detail={**detail, "error": f"queue not usable: {exc}"}
        )
    finally:
        if own:
            with contextlib.suppress(Exception):
                await channel.close()
    detail["consumers"] = consumers
    return Health(ok=consuming and consumers > 0, connected=True, detail=detail)


def drop_test_recorder(subscriber: object) -> None:
    """Let go of the MagicMock that FastStream makes for each handler, for its test
    broker's assertions: 11 KB an agent (a fifth of a fleet agent's memory), never used
    here (the project's tests use a real broker; FastStream's ``TestRabbitBroker``,
    which needs it, cannot drive such a subscriber). Looked up defensively: a
    FastStream without it is left as it is."""
    for call in getattr(subscriber, "calls", ()):
        recorder = getattr(getattr(call, "handler", None), "_recorder", None)
        if recorder is not None and hasattr(recorder, "mock"):
            recorder.mock = None


async def raw_body(message: StreamMessage[Any]) -> bytes:
    """A FastStream decoder that does not decode: the handler takes the raw body and
    decodes it itself. (FastStream's own decoder parses by content type before the
    handler runs; with manual acks a body that does not match its content type would
    stay unacknowledged for ever.) A coroutine: FastStream runs a plain function in a
    worker thread, a thread hop per delivery."""
    return message.body


TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    AMQPError,
    ConnectionError,
    TimeoutError,
    OSError,
    ChannelInvalidStateError,
)
"""Failures of the broker or the disk: worth another attempt. Anything else a delivery
raises is about the delivery itself and dead-letters it."""


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, TRANSIENT_ERRORS)


class Redeliveries:
    """How often each delivery was handed back after a transient failure (the broker
    says it for quorum queues, in ``x-delivery-count``; this counts it for classic
    ones). After ``limit`` attempts a delivery is dead-lettered instead of requeued."""

    def __init__(self, limit: int = 5, remember: int = 10_000) -> None:
        self.limit = limit
        self.remember = remember
        self._counts: OrderedDict[str, int] = OrderedDict()

    @staticmethod
    def key(message: AbstractIncomingMessage) -> str:
        digest = hashlib.sha256((message.routing_key or "").encode())
        digest.update(message.body)
        return f"{message.message_id or ''}:{digest.hexdigest()}"

    def failed(self, message: AbstractIncomingMessage) -> int:
        """Count one more failed attempt; the attempts so far."""
        key = self.key(message)
        header = (message.headers or {}).get("x-delivery-count")
        count = max(self._counts.pop(key, 0), header if isinstance(header, int) else 0) + 1
        self._counts[key] = count
        while len(self._counts) > self.remember:
            self._counts.popitem(last=False)
        return count

    def forget(self, message: AbstractIncomingMessage) -> None:
        if self._counts:
            self._counts.pop(self.key(message), None)


MAX_REASON_CHARS = 1000


async def dead_letter(
    broker: RabbitBroker,
    exchange: RabbitExchange,
    routing_key: str,
    message: AbstractIncomingMessage,
    reason: str,
    *,
    redeliveries: Redeliveries,
    max_body_bytes: int = 64 * 1024,
) -> None:
    """Send a delivery that cannot be processed, with its reason in a header, to a
    dead-letter queue (``routing_key`` on the dead-letter ``exchange``), then ack it.
    Bodies over ``max_body_bytes`` are cut (``x-original-size`` tells the size). If the
    publish fails, the delivery is requeued (dropped, with an error logged, once that
    happened ``redeliveries.limit`` times: a dead-letter exchange that is gone must not
    make it loop for ever)."""
    original = message.routing_key or ""
    reason = reason if len(reason) <= MAX_REASON_CHARS else reason[: MAX_REASON_CHARS - 1] + "…"
    log.warning("dead-lettering %s to %s: %s", original, routing_key, reason)
    headers: dict[str, Any] = {REASON_HEADER: reason, "x-original-routing-key": original}
    body = message.body
    if len(body) > max_body_bytes:
        headers["x-original-size"] = len(body)
        body = body[:max_body_bytes]
    try:
        await broker.publish(
            body,
            exchange=exchange,
            routing_key=routing_key,
            persist=True,
            headers=headers,
            content_type=message.content_type,
            message_id=message.message_id,
        )
    except Exception as exc:
        attempts = redeliveries.failed(message)
        with contextlib.suppress(Exception):
            if attempts < redeliveries.limit:
                await message.nack(requeue=True)
            else:
                log.error("%s dropped, it cannot be dead-lettered: %s (%s)", original, reason, exc)
                await message.reject(requeue=False)
        return
    redeliveries.forget(message)
    with contextlib.suppress(Exception):  # unacked, it comes back: and is dead-lettered again
        await message.ack()
