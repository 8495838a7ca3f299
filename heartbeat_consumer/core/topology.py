"""The wire contract's names: exchanges, queues and routing keys (pure).

- Ticks: ``system.heartbeat.tick`` to every agent, ``agent.<name>.heartbeat.tick`` to one.
- Commands: ``agent.<name>.heartbeat.run|pause|resume``.
- Results: ``heartbeat.<agent>.<check>.<status>``, run announcements
  ``heartbeat.<agent>.<check>.started`` and status events
  ``heartbeat.<agent>._status.<word>`` (:data:`STATUS_EVENTS`). None matches an inbox
  binding, so results never flow back into any agent's inbox.
- State events (replicas, :mod:`.follow`): ``heartbeat.<agent>._state.<word>`` and the
  results, into each replica's ``agent.<agent>.state.<replica>``.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

__all__ = [
    "COMMANDS",
    "CONFIG_SUFFIX",
    "DEFAULT_MONITOR_QUEUE",
    "DEFAULT_EXCHANGE",
    "DEFAULT_URL",
    "DISPATCH_WORD",
    "NAME_PATTERN",
    "STATUS_EVENTS",
    "TICK_BINDING",
    "TICK_KEY",
    "InvalidName",
    "InvalidUrl",
    "agent_key",
    "check_name",
    "check_resource",
    "check_url",
    "dead_letter_exchange",
    "dead_letter_queue",
    "dispatch_key",
    "follow_queue",
    "inbox_bindings",
    "inbox_queue",
    "mask_url",
    "reply_key",
    "result_key",
    "state_bindings",
    "state_key",
    "status_key",
]

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
"""Agent and check names (heartbeat.v1): routing-key words without dots or wildcards."""
DEFAULT_URL = "amqp://guest:guest@localhost:5672/"
DEFAULT_EXCHANGE = "bloodbank.events.v1"
TICK_KEY = "system.heartbeat.tick"
TICK_BINDING = "system.heartbeat.#"
COMMANDS = ("tick", "run", "pause", "resume")
STATUS_EVENTS = (
    "online",
    "offline",
    "config_invalid",
    "state_error",
    "state_ok",
    "alive",
    "start_failed",
)
"""``alive``: a tick was evaluated and ran nothing (the monitor hears from idle agents)."""
ALERT_KINDS = ("stale", "timeout", "missed", "config_invalid", "resolved")
REPLY_WORDS = ("ack", "error")
"""``heartbeat.<agent>._command.ack`` (a command or addressed tick done, accepted, or
with nothing due) and ``.error`` (refused, with the reason)."""
MONITOR_BINDING = "heartbeat.#"
DEFAULT_MONITOR_QUEUE = "heartbeat.monitor"
CONFIG_SUFFIX = ".heartbeat.json"
"""A fleet's agents by default: ``<agent>.heartbeat.json``."""
"""The monitor's queue hears every result, started, status and alert event."""


_NAME = re.compile(NAME_PATTERN)


class InvalidName(ValueError):
    """An agent or check name that cannot be a routing-key word."""


class InvalidUrl(ValueError):
    """A broker URL that cannot be used (the text names it with its password masked)."""


def check_name(name: object, what: str = "name") -> str:
    """``name`` if it is an agent or check name, else :class:`InvalidName`."""
    if isinstance(name, str) and _NAME.fullmatch(name):
        return name
    raise InvalidName(
        f"invalid {what} {str(name)[:80]!r}: use letters, digits, '_' or '-', starting with a "
        "letter or digit, at most 64 characters (it becomes a routing-key word)"
    )


_RESOURCE = re.compile(r"[A-Za-z0-9_.:-]{1,250}")
_HOST_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_TLS_QUERY = frozenset({"ssl", "ssl_options", "cafile", "capath", "cadata", "keyfile", "certfile"})


def check_resource(name: object, what: str = "exchange name") -> str:
    """``name`` if it can name an exchange or queue here (letters, digits, ``_.:-``, at
    most 250 characters, so that ``<name>.dlx`` and ``<name>.dlq`` fit; not ``amq.*``),
    else :class:`InvalidName`."""
    if isinstance(name, str) and _RESOURCE.fullmatch(name) and not name.startswith("amq."):
        return name
    raise InvalidName(
        f"invalid {what} {str(name)[:80]!r}: use letters, digits and _ . : -, at most 250 "
        "characters, not starting with amq."
    )


_NODE_SEPARATOR = re.compile(r"\s*,\s*(?=amqps?://)", re.IGNORECASE)


def node_urls(url: str) -> list[str]:
    """The node URLs of ``url``: one URL, or a comma-separated list of them (the nodes of
    one cluster, tried in order). A comma splits only before ``amqp://`` or
    ``amqps://``, so a password with a comma stays whole (percent-encode it as %2C all
    the same)."""
    return [part for part in _NODE_SEPARATOR.split(url.strip()) if part]


def check_url(url: str) -> str:
    """``url`` if each of its nodes (:func:`node_urls`) is an ``amqp://`` or ``amqps://``
    URL with a host and a valid port, else :class:`InvalidUrl` with a one-line reason
    (and the passwords masked)."""
    nodes = node_urls(url)
    if not nodes:
        raise InvalidUrl("broker URL is empty")
    for node in nodes:
        _check_node(node)
    return url


def _check_node(url: str) -> None:
    shown = mask_url(url)
    if "://" in url.partition("://")[2] or any(c.isspace() or c == ";" for c in url):
        raise InvalidUrl(
            f"broker URL {shown} holds more than one URL, or spaces or ';': separate the "
            "nodes of a cluster with commas"
        )
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        why = str(exc) if parts_password_free(url) else "a bad port, or a password with #, / or ?"
        raise InvalidUrl(
            f"broker URL {shown} is malformed: {why} (percent-encode such characters: %23 %2F %3F)"
        ) from None
    if parts.scheme not in ("amqp", "amqps"):
        raise InvalidUrl(
            f"broker URL {shown} must start with amqp:// or amqps://, not {parts.scheme or '?'}://"
        )
    host = parts.hostname
    if not host:
        raise InvalidUrl(f"broker URL {shown} has no host")
    if ":" not in host and (
        len(host) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in host.split("."))
    ):
        raise InvalidUrl(f"broker URL {shown} has an invalid host name")
    if port == 0:
        raise InvalidUrl(f"broker URL {shown} has port 0")
    keys = {key.split("=", 1)[0].lower() for key in parts.query.split("&") if key}
    if keys & _TLS_QUERY:
        raise InvalidUrl(
            f"broker URL {shown}: set TLS with amqps:// and --ca-file/--cert-file/--key-file, "
            "not in the query"
        )


def parts_password_free(url: str) -> bool:
    """True when ``url`` holds no password (an error text about it cannot leak one)."""
    return mask_url(url) == url


def inbox_queue(agent: str) -> str:
    return f"agent.{agent}.inbox"


def inbox_bindings(agent: str) -> tuple[str, str]:
    """The inbox's two bindings: everything for the agent, and every heartbeat tick."""
    return (f"agent.{agent}.#", TICK_BINDING)


def agent_key(agent: str, command: str) -> str:
    """``agent.<name>.heartbeat.<command>``: a tick or command for one agent."""
    return f"agent.{agent}.heartbeat.{command}"


def dead_letter_exchange(exchange: str) -> str:
    return f"{exchange}.dlx"


def dead_letter_queue(agent: str) -> str:
    """Also the dead-letter routing key of the agent's inbox."""
    return f"agent.{agent}.dlq"


def result_key(agent: str, check: str, status: str) -> str:
    return f"heartbeat.{agent}.{check}.{status}"


DISPATCH_WORD = "dispatch"


def dispatch_key(agent: str, check: str) -> str:
    """The default key of the ``publish`` handler's event (``heartbeat.<a>.<c>.dispatch``)."""
    return result_key(agent, check, DISPATCH_WORD)


def state_key(agent: str, word: str) -> str:
    """A change of the agent's state (:mod:`.follow`): ``heartbeat.<agent>._state.<word>``."""
    return f"heartbeat.{agent}._state.{word}"


RUN_STATUSES = ("success", "alert", "failed", "skipped", "timeout")


def state_bindings(agent: str) -> tuple[str, ...]:
    """A replica's state queue: the agent's state events, and its results (a run's change
    travels inside its result)."""
    return (f"heartbeat.{agent}._state.#", *(f"heartbeat.{agent}.*.{s}" for s in RUN_STATUSES))


def follow_queue(agent: str, replica: str) -> str:
    """The replica's own queue of the agent's state events (``agent.<a>.state.<replica>``)."""
    return f"agent.{agent}.state.{replica}"


def reply_key(agent: str, word: str) -> str:
    """The answer to a command or an addressed tick (``word``: ack or error)."""
    return f"heartbeat.{agent}._command.{word}"


def status_key(agent: str, status: str) -> str:
    return f"heartbeat.{agent}._status.{status}"


def alert_key(agent: str, kind: str) -> str:
    """The monitor's alerts: ``heartbeat.<agent>._alert.<kind>``."""
    return f"heartbeat.{agent}._alert.{kind}"


def mask_url(url: str) -> str:
    """``url`` with the password of each of its nodes (:func:`node_urls`) masked."""
    return (
        ",".join(mask_node_url(node) for node in node_urls(url))
        if "," in url
        else mask_node_url(url)
    )


def mask_node_url(url: str) -> str:
    """The URL with its password replaced by ``***`` (for logs): everything between the
    user name and the last ``@`` of the part after ``://``, so that a password with a
    ``#``, ``/`` or ``?`` that was not percent-encoded is masked too."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, hostpart = rest.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{hostpart}"
