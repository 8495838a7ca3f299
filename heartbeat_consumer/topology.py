"""The wire contract's names: exchanges, queues and routing keys (pure).

- Ticks: ``system.heartbeat.tick`` to every agent, ``agent.<name>.heartbeat.tick`` to one.
- Commands: ``agent.<name>.heartbeat.run|pause|resume``.
- Results: ``heartbeat.<agent>.<check>.<status>``, run announcements
  ``heartbeat.<agent>.<check>.started`` and status events
  ``heartbeat.<agent>._status.<word>`` (:data:`STATUS_EVENTS`). None matches an inbox
  binding, so results never flow back into any agent's inbox.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "COMMANDS",
    "DEFAULT_EXCHANGE",
    "DEFAULT_URL",
    "STATUS_EVENTS",
    "TICK_BINDING",
    "TICK_KEY",
    "agent_key",
    "dead_letter_exchange",
    "dead_letter_queue",
    "inbox_bindings",
    "inbox_queue",
    "mask_url",
    "result_key",
    "status_key",
]

DEFAULT_URL = "amqp://guest:guest@localhost:5672/"
DEFAULT_EXCHANGE = "bloodbank.events.v1"
TICK_KEY = "system.heartbeat.tick"
TICK_BINDING = "system.heartbeat.#"
COMMANDS = ("tick", "run", "pause", "resume")
STATUS_EVENTS = ("online", "offline", "config_invalid", "state_error", "state_ok", "alive")
"""``alive``: a tick was evaluated and ran nothing (the monitor hears from idle agents)."""
ALERT_KINDS = ("stale", "timeout", "missed", "resolved")
MONITOR_BINDING = "heartbeat.#"
"""The monitor's queue hears every result, started, status and alert event."""


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


def status_key(agent: str, status: str) -> str:
    return f"heartbeat.{agent}._status.{status}"


def alert_key(agent: str, kind: str) -> str:
    """The monitor's alerts: ``heartbeat.<agent>._alert.<kind>``."""
    return f"heartbeat.{agent}._alert.{kind}"


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***`` (for logs)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
