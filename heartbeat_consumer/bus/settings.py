"""Settings objects: built once (by the command line, or by a program) and passed to every
service, instead of the same options repeated in each constructor.

- :class:`BusSettings`: the broker and the exchange (every service);
- :class:`InboxSettings`: an agent's inbox and its ticks (the consumer and the fleet);
- :class:`~heartbeat_consumer.ops.settings.ServeSettings`: the health endpoint.

``HeartbeatConsumer(agent, path, bus=BusSettings(url=...), inbox=InboxSettings(...))``.
The keywords the services took before (``rabbit_url=``, ``tick_interval_ms=``,
``health_port=``, ...) still work for one release, each with a :class:`DeprecationWarning`
naming its replacement (:class:`Deprecated` maps them, for every service).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from ..core.topology import DEFAULT_EXCHANGE, DEFAULT_URL, mask_url
from ..ops.settings import ServeSettings
from .connection import TlsFiles
from .provision import DeadLetterLimits, InboxOptions, QueueKind

__all__ = [
    "BUS_ARGUMENTS",
    "DEFAULT_ALIVE_EVERY_MS",
    "DEFAULT_BUS",
    "DEFAULT_INBOX",
    "DEFAULT_SERVE",
    "DEFAULT_TICK_INTERVAL_MS",
    "BusSettings",
    "Deprecated",
    "INBOX_ARGUMENTS",
    "InboxSettings",
    "SERVE_ARGUMENTS",
    "ServeSettings",
]

DEFAULT_TICK_INTERVAL_MS = 60_000
DEFAULT_ALIVE_EVERY_MS = 300_000
"""An idle agent says ``alive`` at most this often (the monitor's default stale
threshold, 10 min, is twice as long)."""


@dataclass(frozen=True, repr=False)
class BusSettings:
    """The broker (``url``, with ``tls`` files for a private CA or client certificates)
    and the exchange. ``declare=False`` declares nothing and only checks that the
    exchanges and queues exist (a user without configure permission: see
    deploy/rabbitmq/permissions.sh). Its repr masks the URL's password."""

    url: str = DEFAULT_URL
    exchange: str = DEFAULT_EXCHANGE
    tls: TlsFiles | None = None
    declare: bool = True

    def describe(self) -> str:
        """For logs: the URL with its password masked, and the exchange."""
        return f"{mask_url(self.url)}, exchange {self.exchange}"

    def __repr__(self) -> str:
        return (
            f"BusSettings(url={mask_url(self.url)!r}, exchange={self.exchange!r}, "
            f"tls={self.tls!r}, declare={self.declare!r})"
        )


@dataclass(frozen=True)
class InboxSettings:
    """An agent's inbox: the tick interval its slots fall on, the queue's type,
    whether one consumer at a time takes it (standby consumers wait), how often an idle
    agent says ``alive``, and the bounds of its dead-letter queue."""

    tick_interval_ms: int = DEFAULT_TICK_INTERVAL_MS
    queue_type: QueueKind = "classic"
    single_active_consumer: bool = False
    alive_every_ms: int = DEFAULT_ALIVE_EVERY_MS
    dead_letters: DeadLetterLimits = field(default_factory=DeadLetterLimits)
    replica: str | None = None
    """This consumer is one replica of the agent, named so (its host, say): one consumes
    at a time, and each follows the agent's state through its own queue
    ``agent.<agent>.state.<replica>`` (see :mod:`.follower`)."""

    def __post_init__(self) -> None:
        if self.tick_interval_ms < 1:
            raise ValueError(f"tick interval {self.tick_interval_ms} ms: at least 1 ms")
        if self.alive_every_ms < 0:
            raise ValueError(f"alive interval {self.alive_every_ms} ms is negative")
        if self.queue_type not in ("classic", "quorum"):
            raise ValueError(f"queue type {self.queue_type!r}: 'classic' or 'quorum'")
        self.queue_options()  # checks the replica name

    def queue_options(self) -> InboxOptions:
        """The inbox queue's arguments (see :mod:`.provision`)."""
        return InboxOptions(self.queue_type, self.single_active_consumer, self.replica)


DEFAULT_BUS = BusSettings()
DEFAULT_INBOX = InboxSettings()
DEFAULT_SERVE = ServeSettings()
"""The services' defaults. A settings object counts as given unless it is one of these
very objects (``bus=BusSettings()`` is given, and equal to the default)."""

Settings = BusSettings | InboxSettings | ServeSettings
S = TypeVar("S", BusSettings, InboxSettings, ServeSettings)

_PARAMETER = {BusSettings: "bus", InboxSettings: "inbox", ServeSettings: "serve"}


def _dead_letters(value: DeadLetterLimits | None) -> DeadLetterLimits:
    return value or DeadLetterLimits()


OLD_ARGUMENTS: dict[str, tuple[type[Settings], str, Callable[[Any], Any] | None]] = {
    "rabbit_url": (BusSettings, "url", None),
    "exchange_name": (BusSettings, "exchange", None),
    "tls": (BusSettings, "tls", None),
    "declare_exchanges": (BusSettings, "declare", None),
    "tick_interval_ms": (InboxSettings, "tick_interval_ms", None),
    "queue_type": (InboxSettings, "queue_type", None),
    "single_active_consumer": (InboxSettings, "single_active_consumer", None),
    "alive_every_ms": (InboxSettings, "alive_every_ms", None),
    "dead_letters": (InboxSettings, "dead_letters", _dead_letters),
    "health_port": (ServeSettings, "port", None),
    "health_host": (ServeSettings, "host", None),
    "port": (ServeSettings, "port", None),
    "host": (ServeSettings, "host", None),
}
"""Every deprecated argument: the settings class it went into, its field there, and how
its old value converts (``dead_letters=None`` meant the default limits)."""
BUS_ARGUMENTS = ("rabbit_url", "exchange_name", "tls", "declare_exchanges")
"""The old arguments of every service (the first two were positional in some)."""
INBOX_ARGUMENTS = (
    "tick_interval_ms",
    "queue_type",
    "single_active_consumer",
    "alive_every_ms",
    "dead_letters",
)
SERVE_ARGUMENTS = ("health_port", "health_host")


class Deprecated:
    """The deprecated arguments one call was given, checked, announced and mapped.

    ``owner`` names the callable in the messages (``"HeartbeatConsumer"``); ``accepts``
    are the old keyword names it took, ``positional_names`` those it also took by
    position, and ``positional`` the values given so. Unknown names, too many positional
    values, or a name given twice raise :class:`TypeError`, as Python would.
    :meth:`settle` then folds them into each settings object the owner takes: it refuses
    (:class:`TypeError`) to mix them with a settings object given, and emits one
    :class:`DeprecationWarning` per old argument, attributed to the owner's caller (call
    it in the owner itself). ``where`` ends the messages (``" to Monitor()"``)."""

    def __init__(
        self,
        owner: str,
        keywords: Mapping[str, Any],
        *,
        accepts: Sequence[str],
        positional: Sequence[Any] = (),
        positional_names: Sequence[str] = (),
        where: str = "",
    ) -> None:
        self.owner = owner
        if len(positional) > len(positional_names):
            took = f" ({', '.join(positional_names)})" if positional_names else ""
            raise TypeError(
                f"{owner}() takes {len(positional_names)} deprecated positional "
                f"arguments{took} after its own, but {len(positional)} were given"
            )
        by_position = dict(zip(positional_names, positional, strict=False))
        for name in keywords:
            if name not in accepts:
                raise TypeError(f"{owner}() got an unexpected keyword argument {name!r}")
            if name in by_position:
                raise TypeError(f"{owner}() got multiple values for argument {name!r}")
        self.where = where
        self.given: dict[str, Any] = {**by_position, **keywords}
        self.by_position = set(by_position)

    def settle(self, settings: S, default: S) -> S:
        """``settings`` with the old arguments that map onto its class folded in;
        a :class:`TypeError` if there are some and ``settings`` is not ``default`` (the
        caller passed both the old and the new way)."""
        kind = type(default)
        changes = {}
        names = []
        for name, value in self.given.items():
            target, attribute, convert = OLD_ARGUMENTS[name]
            if target is kind:
                changes[attribute] = convert(value) if convert else value
                names.append(name)
        if not changes:
            return settings
        parameter = _PARAMETER[kind]
        if settings is not default:
            old = ", ".join(f"{name}=" for name in names)
            raise TypeError(
                f"{self.owner}() got the deprecated {old} and {parameter}= both: "
                f"pass only {parameter}={kind.__name__}(...){self.where}"
            )
        for name in names:
            how = f" taking {name} by position" if name in self.by_position else f"({name}=...)"
            new = f"{parameter}={kind.__name__}({OLD_ARGUMENTS[name][1]}=...)"
            warnings.warn(
                f"{self.owner}{how} is deprecated; pass {new}{self.where}",
                DeprecationWarning,
                stacklevel=3,  # the owner's caller
            )
        return replace(settings, **changes)
