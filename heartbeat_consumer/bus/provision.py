"""Declaring the topology, or checking that an admin declared it (least privilege).

Every queue and exchange of the wire contract is declared here, with its arguments, on
short-lived channels of an aio-pika connection (a refused or mismatched declaration
closes the channel it was made on, never the channel a consumer runs on):

- the exchange (topic, durable) and its dead-letter exchange ``<exchange>.dlx``;
- per agent the dead-letter queue ``agent.<name>.dlq`` (bound to the DLX under its own
  name, with a length limit and a TTL) and the inbox ``agent.<name>.inbox`` (bound to
  ``agent.<name>.#`` and ``system.heartbeat.#``). The inbox has no dead-letter exchange:
  only the consumer dead-letters, always with a reason, so the broker never re-publishes
  anything on its own (expired ticks simply go);
- for the monitor its queue (bound to ``heartbeat.#``) and its DLQ.

Components that may not declare (agents and the monitor hold no configure permission,
see ``deploy/rabbitmq/permissions.sh``) check passively that everything exists: a
declaration refused for lack of permission falls back to that check by itself. A queue
that exists with other arguments (declared by an older version) is used as it is, with
a warning; an exchange with other settings is a :class:`TopologyError`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from aiormq.exceptions import (
    AMQPError,
    ChannelAccessRefused,
    ChannelInvalidStateError,
    ChannelNotFoundEntity,
    ChannelPreconditionFailed,
)

from ..core.timeutil import MS_PER_DAY, check_duration, format_duration
from ..core.topology import (
    check_name,
    check_resource,
    dead_letter_exchange,
    dead_letter_queue,
    follow_queue,
    inbox_bindings,
    inbox_queue,
    state_bindings,
)

__all__ = [
    "DeadLetterLimits",
    "InboxOptions",
    "TopologyError",
    "declare_exchanges",
    "provision_agent",
    "provision_monitor",
]

log = logging.getLogger("heartbeat_consumer.provision")

QueueKind = Literal["classic", "quorum"]
STATE_QUEUE_EXPIRES_MS = 7 * MS_PER_DAY
"""A replica's state queue that nobody has read for this long is deleted by the broker
(a replica retired for good; a running one reads it every few seconds)."""
PROVISION_HINT = (
    "an admin provisions it: deploy/rabbitmq/permissions.sh, or "
    "'heartbeat-consumer provision' with a user that may declare"
)


class TopologyError(Exception):
    """The broker has an exchange of this name with other settings, or a queue or
    exchange this user needs is missing and it may not declare it."""


@dataclass(frozen=True)
class DeadLetterLimits:
    """A dead-letter queue's bounds: at most ``max_length`` messages (the oldest go
    first) and each kept for ``ttl_ms``; bodies are cut to ``max_body_bytes``."""

    max_length: int = 10_000
    ttl_ms: int = 7 * MS_PER_DAY
    max_body_bytes: int = 64 * 1024

    def __post_init__(self) -> None:
        if not 1 <= self.max_length <= 100_000_000:
            raise ValueError(f"dead-letter queue length {self.max_length} is out of range")
        check_duration(self.ttl_ms, "dead-letter TTL")

    def arguments(self) -> dict[str, Any]:
        return {"x-max-length": self.max_length, "x-message-ttl": self.ttl_ms}

    def describe(self) -> str:
        return f"at most {self.max_length} messages, each kept {format_duration(self.ttl_ms)}"


@dataclass(frozen=True)
class InboxOptions:
    """The inbox's type and whether one consumer at a time takes it; ``replica``: this
    consumer is one of the agent's replicas (single active consumer, whatever
    ``single_active_consumer`` says) and follows the agent's state through its own queue
    :func:`~..core.topology.follow_queue` (of the inbox's type)."""

    queue_type: QueueKind = "classic"
    single_active_consumer: bool = False
    replica: str | None = None

    def __post_init__(self) -> None:
        if self.replica is not None:
            check_name(self.replica, "replica name")

    def arguments(self) -> dict[str, Any]:
        arguments: dict[str, Any] = {"x-queue-type": self.queue_type}
        if self.single_active_consumer or self.replica is not None:
            arguments["x-single-active-consumer"] = True
        return arguments


def _classic(limits: DeadLetterLimits) -> dict[str, Any]:
    return {"x-queue-type": "classic", **limits.arguments()}


@contextlib.asynccontextmanager
async def _channel(connection: AbstractRobustConnection) -> AsyncIterator[AbstractChannel]:
    channel = await connection.channel()
    try:
        yield channel
    finally:
        with contextlib.suppress(Exception):
            await channel.close()


Step = Callable[[AbstractChannel], Awaitable[object]]


async def _ensure(
    connection: AbstractRobustConnection,
    what: str,
    *,
    declare: Step | None,
    check: Step,
    mismatch: Callable[[ChannelPreconditionFailed], None],
    require: bool,
) -> bool:
    """``declare`` (if given) on a channel of its own; if that is refused, or not asked
    for, ``check`` (a passive declare). True if declared. A declaration that finds other
    settings calls ``mismatch`` (which raises, or warns and lets the check run); with
    ``require`` a refusal is an error rather than a reason to check."""
    if declare is not None:
        try:
            async with _channel(connection) as channel:
                await declare(channel)
            return True
        except ChannelPreconditionFailed as exc:
            mismatch(exc)
        except ChannelAccessRefused:
            if require:
                raise TopologyError(f"this user may not declare {what}") from None
            log.info("no permission to declare %s: checking that it exists", what)
    try:
        async with _channel(connection) as channel:
            await check(channel)
    except ChannelNotFoundEntity:
        raise TopologyError(f"{what} does not exist; {PROVISION_HINT}") from None
    return False


async def _exchange(
    connection: AbstractRobustConnection, name: str, declare: bool, require: bool = False
) -> bool:
    """Declare (or check) a topic exchange; True if declared. Other settings: an error."""

    def mismatch(exc: ChannelPreconditionFailed) -> None:
        raise TopologyError(
            f"the broker already has exchange {name!r} with other settings than ours "
            f"(topic, durable): {exc}"
        ) from None

    async def active(channel: AbstractChannel) -> None:
        await channel.declare_exchange(name, "topic", durable=True)

    async def passive(channel: AbstractChannel) -> None:
        await channel.declare_exchange(name, "topic", durable=True, passive=True)

    return await _ensure(
        connection,
        f"exchange {name!r}",
        declare=active if declare else None,
        check=passive,
        mismatch=mismatch,
        require=require,
    )


async def declare_exchanges(
    connection: AbstractRobustConnection,
    exchange: str,
    *,
    declare: bool = True,
    require: bool = False,
) -> bool:
    """The exchange and its dead-letter exchange; True if this user declared them."""
    check_resource(exchange)
    declared = await _exchange(connection, exchange, declare, require)
    await _exchange(connection, dead_letter_exchange(exchange), declare and declared, require)
    return declared


async def _declare_bound(
    channel: AbstractChannel,
    name: str,
    arguments: dict[str, Any],
    bindings: Iterable[tuple[str, str]],
) -> None:
    """Declare a durable queue with ``arguments`` and bind it by (exchange, key)."""
    queue = await channel.declare_queue(name, durable=True, arguments=arguments)
    for exchange, key in bindings:
        await queue.bind(exchange, routing_key=key)


async def _queue(
    connection: AbstractRobustConnection,
    name: str,
    *,
    arguments: dict[str, Any],
    bindings: Iterable[tuple[str, str]],
    declare: bool,
    require: bool = False,
    strict: bool = False,
) -> bool:
    """Declare a durable queue with ``arguments`` and its (exchange, key) bindings, or
    check that it exists; True if declared. One that exists with other arguments is used
    as it is, with a warning (``strict``: it is an error)."""

    def mismatch(exc: ChannelPreconditionFailed) -> None:
        if strict:
            raise TopologyError(
                f"queue {name} exists with other arguments than {arguments} "
                f"({exc.args[0] if exc.args else exc}); a replica needs them (to re-create "
                "it: stop its consumers, let it drain, delete it, start again)"
            ) from None
        log.warning(
            "queue %s exists with other arguments than %s (%s); using it as it is "
            "(to re-create it: let it drain, delete it, start again)",
            name,
            arguments,
            exc.args[0] if exc.args else exc,
        )

    async def active(channel: AbstractChannel) -> None:
        await _declare_bound(channel, name, arguments, bindings)

    mismatched = False

    def warn(exc: ChannelPreconditionFailed) -> None:
        nonlocal mismatched
        mismatched = True
        mismatch(exc)

    async def passive(channel: AbstractChannel) -> None:
        queue = await channel.declare_queue(name, passive=True)
        if mismatched:  # used as it is, but bound as ours is (a binding is idempotent)
            for exchange, key in bindings:
                await queue.bind(exchange, routing_key=key)

    return await _ensure(
        connection,
        f"queue {name!r}",
        declare=active if declare else None,
        check=passive,
        mismatch=warn,
        require=require,
    )


async def provision_agent(
    connection: AbstractRobustConnection,
    agent: str,
    exchange: str,
    *,
    inbox: InboxOptions | None = None,
    dead_letters: DeadLetterLimits | None = None,
    declare: bool = True,
    require: bool = False,
    exchanges: bool = True,
    channel: AbstractChannel | None = None,
) -> None:
    """Everything an agent's consumer needs: exchanges, DLQ, inbox and bindings.
    ``require``: a declaration refused is an error (an admin provisioning).
    ``exchanges=False``: the exchanges were just ensured (a fleet does it once for all
    the agents it starts together). ``channel``: tried first for all of it at once (a
    fleet lends one to each agent it starts: five round trips instead of eleven); if
    anything is refused there, which closes that channel, each step is done again on a
    channel of its own, to tell a refusal from a mismatch and fall back as above."""
    if exchanges:
        await declare_exchanges(connection, exchange, declare=declare, require=require)
    dlx = dead_letter_exchange(exchange)
    dlq = dead_letter_queue(agent)
    limits = dead_letters or DeadLetterLimits()
    bindings = [(exchange, key) for key in inbox_bindings(agent)]
    options = inbox or InboxOptions()
    arguments = options.arguments()
    follow = [] if options.replica is None else [follow_queue(agent, options.replica)]
    follow_arguments = {"x-queue-type": options.queue_type, "x-expires": STATE_QUEUE_EXPIRES_MS}
    follow_bindings = [(exchange, key) for key in state_bindings(agent)]
    if channel is not None and not channel.is_closed:
        try:
            if declare:
                await _declare_bound(channel, dlq, _classic(limits), [(dlx, dlq)])
                await _declare_bound(channel, inbox_queue(agent), arguments, bindings)
                for name in follow:
                    await _declare_bound(channel, name, follow_arguments, follow_bindings)
            else:
                for name in [dlq, inbox_queue(agent), *follow]:
                    await channel.declare_queue(name, passive=True)
                if follow:
                    _unverified(agent)
            return
        except (AMQPError, ChannelInvalidStateError) as exc:
            # That closed the channel (its lender opens another): step by step instead.
            log.debug("%s: declaring on the shared channel failed (%s); step by step", agent, exc)
    await _queue(
        connection,
        dlq,
        arguments=_classic(limits),
        bindings=[(dlx, dlq)],
        declare=declare,
        require=require,
    )
    declared = await _queue(
        connection,
        inbox_queue(agent),
        arguments=arguments,
        bindings=bindings,
        declare=declare,
        require=require,
        strict=options.replica is not None,  # two replicas consuming at once would both run
    )
    if options.replica is not None and not declared:
        _unverified(agent)
    for name in follow:
        await _queue(
            connection,
            name,
            arguments=follow_arguments,
            bindings=follow_bindings,
            declare=declare,
            require=require,
        )


def _unverified(agent: str) -> None:
    log.warning(
        "%s: cannot check that %s has a single active consumer (this user may not "
        "declare); replicas need it, or more than one would run: provision it with "
        "--replica (deploy/rabbitmq/permissions.sh with REPLICAS)",
        agent,
        inbox_queue(agent),
    )


async def provision_monitor(
    connection: AbstractRobustConnection,
    queue: str,
    exchange: str,
    binding: str,
    *,
    dead_letters: DeadLetterLimits | None = None,
    declare: bool = True,
    require: bool = False,
) -> None:
    """The monitor's queue (bound to ``binding``) and its DLQ ``<queue>.dlq``."""
    check_resource(queue, "queue name")
    await declare_exchanges(connection, exchange, declare=declare, require=require)
    dlx = dead_letter_exchange(exchange)
    dlq = f"{queue}.dlq"
    limits = dead_letters or DeadLetterLimits()
    await _queue(
        connection,
        dlq,
        arguments=_classic(limits),
        bindings=[(dlx, dlq)],
        declare=declare,
        require=require,
    )
    await _queue(
        connection,
        queue,
        arguments={"x-queue-type": "classic"},
        bindings=[(exchange, binding)],
        declare=declare,
        require=require,
    )
