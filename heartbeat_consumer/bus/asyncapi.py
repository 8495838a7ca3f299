"""The AsyncAPI 3.0 document of the wire contract, built from :mod:`topology` (pure).

It lists every channel, including the inbox's manually bound ``system.heartbeat.#``
key, which FastStream's own generator cannot see. Every message is a Bloodbank
``EventEnvelope`` (UUID ids, ``event_type`` the routing key, ``source.type`` a trigger
type, ``payload.agent_name`` beside ``payload.agent``).
"""

from __future__ import annotations

from typing import Any

import yaml

from ..core.envelope import APP, TRIGGER_TYPES
from ..core.follow import PAUSES, SNAPSHOT, SYNC
from ..core.state import STATUSES
from ..core.topology import (
    ALERT_KINDS,
    COMMANDS,
    DEFAULT_EXCHANGE,
    REPLY_WORDS,
    STATUS_EVENTS,
    TICK_BINDING,
    TICK_KEY,
    agent_key,
    alert_key,
    reply_key,
    result_key,
    state_key,
    status_key,
)
from ..core.version import __version__

__all__ = ["build", "render"]

AGENT = {"description": "Agent name, ^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"}
CHECK = {"description": "Check name, ^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"}
AGENT_NAME = {"type": "string", "description": "the same as agent (the ecosystem's name)"}
EXAMPLE, EXAMPLE_CHECK = "pm", "triage"
"""The agent and check named in the examples."""
SOURCE_TYPES = (
    "heartbeat: the consumer (results, started, status, replies); scheduled: the ticker; "
    "manual: the CLI (run-check, tick); service: the monitor (alerts)"
)


EVENT_ID = {
    "type": "string",
    "format": "uuid",
    "description": "a UUID in what is sent; any non-empty string is read",
}
SOURCE = {
    "type": "object",
    "required": ["host", "type"],
    "properties": {
        "host": {"type": "string"},
        "type": {"enum": list(TRIGGER_TYPES), "description": SOURCE_TYPES},
        "app": {"type": "string", "examples": [APP]},
        "meta": {
            "type": "object",
            "properties": {
                "component": {
                    "type": "string",
                    "description": "consumer, fleet, ticker, cli, monitor, startup, local or "
                    "run-once",
                }
            },
        },
    },
}
CORRELATION_IDS = {
    "type": "array",
    "items": {"type": "string", "format": "uuid"},
    "description": "the causing events' ids as UUIDs (an id that is not a UUID as its "
    "uuid5); the AMQP correlation_id carries the first id as it came",
}
"""The parts every envelope shares (one object each: the YAML names them once)."""


def _envelope(
    event_types: list[str], legacy: str | None, payload: dict[str, Any]
) -> dict[str, Any]:
    before = f"; {legacy} (sent before) is still read" if legacy else ""
    return {
        "type": "object",
        "required": ["event_id", "event_type", "payload"],
        "properties": {
            "event_id": EVENT_ID,
            "event_type": {
                "type": "string",
                "description": f"the routing key the event is published under{before}",
                "examples": event_types,
            },
            "timestamp": {"type": "string", "format": "date-time"},
            "version": {"type": "string", "examples": ["1.0.0"]},
            "source": SOURCE,
            "correlation_ids": CORRELATION_IDS,
            "payload": payload,
        },
    }


def _message(
    name: str,
    summary: str,
    event_types: list[str],
    payload: dict[str, Any],
    legacy: str | None = None,
) -> dict[str, Any]:
    return {
        "name": name,
        "summary": summary,
        "contentType": "application/json",
        "payload": _envelope(event_types, legacy, payload),
    }


def _routing(exchange: str) -> dict[str, Any]:
    return {
        "amqp": {
            "is": "routingKey",
            "exchange": {"name": exchange, "type": "topic", "durable": True, "autoDelete": False},
        }
    }


def _channel(address: str, exchange: str, message: str, params: dict[str, Any] | None = None,
             description: str = "") -> dict[str, Any]:  # fmt: skip
    channel: dict[str, Any] = {
        "address": address,
        "description": description,
        "messages": {message: {"$ref": f"#/components/messages/{message}"}},
        "bindings": _routing(exchange),
    }
    if params:
        channel["parameters"] = params
    return channel


def _operation(action: str, channel: str, message: str, summary: str) -> dict[str, Any]:
    return {
        "action": action,
        "summary": summary,
        "channel": {"$ref": f"#/channels/{channel}"},
        "messages": [{"$ref": f"#/channels/{channel}/messages/{message}"}],
    }


def build(exchange: str = DEFAULT_EXCHANGE) -> dict[str, Any]:
    obj: dict[str, Any] = {"type": "object"}
    tick_payload = {
        **obj,
        "description": "The slot is payload.epoch_ms if given, else the envelope timestamp.",
        "properties": {
            "tick": {"type": "integer", "description": "intervals since the epoch"},
            "tick_id": {"type": "string"},
            "timestamp": {"type": "string", "format": "date-time"},
            "epoch_ms": {"type": "integer"},
            "interval_ms": {"type": "integer"},
            "quarter": {"enum": ["Q1", "Q2", "Q3", "Q4"], "description": "of the year, UTC"},
            "quarter_of_day": {"enum": ["Q1", "Q2", "Q3", "Q4"], "description": "6 h, UTC"},
            "day_of_week": {"type": "string", "description": "Monday..Sunday, UTC"},
            "hour": {"type": "integer", "description": "0-23, UTC"},
            "minute": {"type": "integer"},
        },
    }
    result_payload = {
        **obj,
        "properties": {
            "agent": {"type": "string"},
            "agent_name": AGENT_NAME,
            "check": {"type": "string"},
            "handler": {"type": "string"},
            "status": {"enum": list(STATUSES)},
            "slot": {"type": "string", "format": "date-time"},
            "started_at": {"type": "string", "format": "date-time"},
            "finished_at": {"type": "string", "format": "date-time"},
            "duration_ms": {"type": "integer"},
            "overdue_ratio": {"type": ["number", "null"]},
            "idempotency_key": {"type": "string", "description": "agent:check:slot"},
            "result": obj,
            "error": {"type": ["string", "null"]},
            "cadence_ms": {"type": ["integer", "null"]},
            "timeout_ms": {"type": ["integer", "null"]},
            "state_change": {
                **obj,
                "description": "from a replica (--standby): the change of the agent's state "
                "this run made (as in the state channel: kind run, check, state, entry, "
                "requests), which the other replicas apply",
            },
        },
    }
    state_payload = {
        **obj,
        "required": ["agent", "origin", "kind"],
        "properties": {
            "agent": {"type": "string"},
            "origin": {"type": "string", "description": "the publishing process"},
            "replica": {"type": "string"},
            "kind": {"enum": ["run", "pauses", "snapshot", "sync"]},
            "version": {"type": "integer", "description": "of the pauses (kind pauses)"},
            "check": {"type": "string"},
            "state": {**obj, "description": "the check's state, as in the state file"},
            "entry": {**obj, "description": "the run's history entry"},
            "requests": {"type": "array", "description": "run commands this run answered"},
            "pauses": {**obj, "description": "every run-time pause (kind pauses)"},
            "snapshot": {**obj, "description": "the whole state file (kind snapshot)"},
        },
    }
    started_payload = {
        **obj,
        "properties": {
            "agent": {"type": "string"},
            "agent_name": AGENT_NAME,
            "check": {"type": "string"},
            "handler": {"type": "string"},
            "slot": {"type": "string", "format": "date-time"},
            "started_at": {"type": "string", "format": "date-time"},
            "idempotency_key": {"type": "string", "description": "agent:check:slot"},
            "cadence_ms": {"type": "integer"},
            "timeout_ms": {"type": "integer"},
        },
    }
    status_payload = {
        **obj,
        "properties": {
            "agent": {"type": "string"},
            "agent_name": AGENT_NAME,
            "status": {"enum": list(STATUS_EVENTS)},
            "error": {"type": "string"},
            "reason": {"type": "string", "description": "alive: why nothing was due"},
        },
    }
    check_ref = {"check": {"type": "string"}}
    messages = {
        "reply": _message(
            "reply",
            "The answer to a command or to a tick sent to one agent",
            [reply_key(EXAMPLE, word) for word in REPLY_WORDS],
            {
                **obj,
                "required": ["agent", "command", "command_id", "outcome", "reason"],
                "properties": {
                    "agent": {"type": "string"},
                    "agent_name": AGENT_NAME,
                    "command": {"enum": list(COMMANDS)},
                    "command_id": {
                        "type": "string",
                        "description": "the event_id of the command (also correlation_id)",
                    },
                    "outcome": {"enum": ["done", "accepted", "nothing_due", "rejected"]},
                    "reason": {"type": "string"},
                    "check": {"type": "string"},
                    "status": {"enum": list(STATUSES), "description": "a run's status"},
                    "ran": {"type": "array", "description": "a tick's runs: check, status"},
                },
            },
            "heartbeat.reply",
        ),
        "tick": _message(
            "tick", "A heartbeat tick", [TICK_KEY, agent_key(EXAMPLE, "tick")], tick_payload
        ),
        "run": _message(
            "run",
            "Run a check now",
            [agent_key(EXAMPLE, "run")],
            {
                **obj,
                "required": ["check"],
                "properties": {**check_ref, "force": {"type": "boolean"}},
            },
            "heartbeat.command.run",
        ),
        "pause": _message(
            "pause",
            "Pause a check, or the agent with '*'",
            [agent_key(EXAMPLE, "pause")],
            {
                **obj,
                "required": ["check"],
                "properties": {
                    **check_ref,
                    "until": {"type": ["string", "integer", "null"]},
                    "reason": {"type": "string", "maxLength": 500},
                },
            },
            "heartbeat.command.pause",
        ),
        "resume": _message(
            "resume",
            "Resume a check",
            [agent_key(EXAMPLE, "resume")],
            {**obj, "properties": check_ref},
            "heartbeat.command.resume",
        ),
        "state": _message(
            "state",
            "A change of an agent's state, for its other replicas",
            [state_key(EXAMPLE, PAUSES), state_key(EXAMPLE, SNAPSHOT), state_key(EXAMPLE, SYNC)],
            state_payload,
        ),
        "result": _message(
            "result",
            "The result of one check run",
            [result_key(EXAMPLE, EXAMPLE_CHECK, "success")],
            result_payload,
            "heartbeat.result",
        ),
        "started": _message(
            "started",
            "A check run is starting",
            [result_key(EXAMPLE, EXAMPLE_CHECK, "started")],
            started_payload,
            "heartbeat.started",
        ),
        "status": _message(
            "status",
            "An agent's consumer status",
            [status_key(EXAMPLE, "alive"), status_key(EXAMPLE, "config_invalid")],
            status_payload,
            "heartbeat.status",
        ),
        "alert": _message(
            "alert",
            "The monitor opened, reminded of or resolved an incident",
            [alert_key(EXAMPLE, "stale"), alert_key(EXAMPLE, "resolved")],
            {
                **obj,
                "required": ["agent", "kind", "severity", "incident", "detail", "opened_at"],
                "properties": {
                    "agent": {"type": "string"},
                    "agent_name": AGENT_NAME,
                    "kind": {"enum": [*ALERT_KINDS]},
                    "check": {"type": ["string", "null"]},
                    "severity": {"enum": ["warning", "error", "info"]},
                    "detail": {"type": "string"},
                    "incident": {
                        "type": "string",
                        "description": "agent:kind:check (* for the agent), stable per incident",
                    },
                    "opened_at": {"type": "integer", "description": "epoch ms"},
                    "repeat": {"type": "boolean", "description": "a reminder (--repeat)"},
                },
            },
            "heartbeat.alert",
        ),
    }
    agent = {"agent": AGENT}
    inbox_text = (
        f"Each agent's queue agent.{{agent}}.inbox (durable, prefetch 1, one consumer) is bound "
        f"to agent.{{agent}}.# and {TICK_BINDING}; it dead-letters to agent.{{agent}}.dlq via "
        f"{exchange}.dlx with the header x-heartbeat-dead-letter-reason."
    )
    channels = {
        "tick": _channel(
            TICK_KEY, exchange, "tick", description="A tick for every agent. " + inbox_text
        ),
        "agentTick": _channel(
            "agent.{agent}.heartbeat.tick", exchange, "tick", agent, "A tick for one agent."
        ),
        "run": _channel("agent.{agent}.heartbeat.run", exchange, "run", agent),
        "pause": _channel("agent.{agent}.heartbeat.pause", exchange, "pause", agent),
        "resume": _channel("agent.{agent}.heartbeat.resume", exchange, "resume", agent),
        "result": _channel(
            "heartbeat.{agent}.{check}.{status}",
            exchange,
            "result",
            {**agent, "check": CHECK, "status": {"enum": list(STATUSES)}},
            "Persistent, published with confirms; never routed to an inbox.",
        ),
        "started": _channel(
            "heartbeat.{agent}.{check}.started",
            exchange,
            "started",
            {**agent, "check": CHECK},
            "Before each check run; its result follows (or the run timed out).",
        ),
        "status": _channel(
            "heartbeat.{agent}._status.{status}",
            exchange,
            "status",
            {**agent, "status": {"enum": list(STATUS_EVENTS)}},
        ),
        "reply": _channel(
            "heartbeat.{agent}._command.{word}",
            exchange,
            "reply",
            {**agent, "word": {"enum": list(REPLY_WORDS)}},
            "Every command, and every tick sent to one agent, is answered (ack: done, "
            "accepted or nothing due; error: refused), correlated by its event_id.",
        ),
        "state": _channel(
            "heartbeat.{agent}._state.{word}",
            exchange,
            "state",
            {**agent, "word": {"enum": [PAUSES, SNAPSHOT, SYNC]}},
            "Replicas (--standby): each has a queue agent.{agent}.state.{replica} bound to "
            "this and to the agent's results (heartbeat.{agent}.*.<status>). A replica that "
            "starts sends _sync; every other one answers with a _snapshot.",
        ),
        "alert": _channel(
            "heartbeat.{agent}._alert.{kind}",
            exchange,
            "alert",
            {**agent, "kind": {"enum": [*ALERT_KINDS]}},
            "From `heartbeat-consumer monitor` (queue heartbeat.monitor, bound to heartbeat.#). "
            "Persistent; the event_id is derived from the incident and the time it was sent.",
        ),
    }
    operations = {
        "receiveTick": _operation("receive", "tick", "tick", "Evaluate and run what is due"),
        "receiveAgentTick": _operation("receive", "agentTick", "tick", "Same, for one agent"),
        "receiveRun": _operation("receive", "run", "run", "Run one check now"),
        "receivePause": _operation("receive", "pause", "pause", "Pause (kept in the state file)"),
        "receiveResume": _operation("receive", "resume", "resume", "Resume"),
        "sendResult": _operation("send", "result", "result", "After each check run"),
        "sendStarted": _operation("send", "started", "started", "Before each check run"),
        "sendStatus": _operation(
            "send", "status", "status", "On start, stop, bad config and idle ticks"
        ),
        "sendReply": _operation("send", "reply", "reply", "After each command or agent tick"),
        "sendState": _operation(
            "send", "state", "state", "A replica: on a pause or resume, on start, on a sync"
        ),
        "sendAlert": _operation(
            "send", "alert", "alert", "The monitor: once per incident, and when it resolves"
        ),
    }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "heartbeat-consumer",
            "version": __version__,
            "description": (
                "Ticks, commands, results, status events and monitor alerts of heartbeat-consumer."
            ),
        },
        "defaultContentType": "application/json",
        "servers": {
            "default": {
                "host": "localhost:5672",
                "protocol": "amqp",
                "description": "Set RABBIT_URL for another broker.",
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages},
    }


def render(exchange: str = DEFAULT_EXCHANGE) -> str:
    return yaml.safe_dump(build(exchange), sort_keys=False, width=100)
