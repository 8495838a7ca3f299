"""Bloodbank's ``EventEnvelope``, typed again here from its public definition (the
repository delorenj/bloodbank, ``event_producers/events/base.py``), to check that every
event we publish is one a Bloodbank consumer accepts.

What the definition asks for, and so this model:

- ``event_id``: a UUID; ``event_type``: a string (by convention the routing key);
  ``timestamp``: a datetime; ``version``: a string; ``correlation_ids``: a list of UUIDs
  (the parent events' ids); ``agent_context``: optional; ``payload``: anything, but
  present.
- ``source``: ``host`` (a string) and ``type`` (a :class:`TriggerType`) required; ``app``
  a string and ``meta`` an object, both optional.
- ``agent_context``: ``type`` (an :class:`AgentType`) required, the rest optional.

Pydantic's default (lax) validation, as there: a UUID or a datetime may come as its JSON
string (an ISO 8601 time for the datetime), but a number is no string and a string that is
not a UUID no UUID. No ``extra`` setting there, so unknown fields are ignored at every
level. ``event_id``, ``timestamp``, ``version`` and ``correlation_ids`` have defaults
there, so an envelope without them still validates; :func:`assert_bloodbank_envelope`
asks for them on top (our own consumers need an id and a time).
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any
from uuid import UUID, uuid4

import orjson
from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "AgentContext",
    "AgentType",
    "CodeState",
    "EventEnvelope",
    "Source",
    "TriggerType",
    "assert_bloodbank_envelope",
]


class TriggerType(StrEnum):
    """What set the event off."""

    MANUAL = "manual"
    AGENT = "agent"
    SCHEDULED = "scheduled"
    HEARTBEAT = "heartbeat"
    FILE_WATCH = "file_watch"
    HOOK = "hook"
    WEBHOOK = "webhook"
    SERVICE = "service"


class AgentType(StrEnum):
    """The agents the ecosystem knows of (``agent_context.type``)."""

    CLAUDE_CODE = "claude-code"
    CLAUDE_CHAT = "claude-chat"
    GEMINI_CLI = "gemini-cli"
    GEMINI_CODE = "gemini-code"
    LETTA = "letta"
    AGNO = "agno"
    SMOLAGENT = "smolagent"
    ATOMIC_AGENT = "atomic-agent"
    CUSTOM = "custom"


class _Lax(BaseModel):
    """Unknown fields are dropped, not refused (the definition sets no ``extra``)."""

    model_config = ConfigDict(extra="ignore")


class Source(_Lax):
    host: str
    type: TriggerType
    app: str | None = None
    meta: dict[str, Any] | None = None


class CodeState(_Lax):
    repo_url: str | None = None
    branch: str | None = None
    working_diff: str | None = None
    branch_diff: str | None = None
    last_commit_hash: str | None = None


class AgentContext(_Lax):
    type: AgentType
    name: str | None = None
    system_prompt: str | None = None
    instance_id: str | None = None
    mcp_servers: list[str] | None = None
    file_references: list[str] | None = None
    url_references: list[str] | None = None
    code_state: CodeState | None = None
    checkpoint_id: str | None = None
    meta: dict[str, Any] | None = None


def _now() -> datetime:
    return datetime.now(UTC)


class EventEnvelope(_Lax):
    event_id: UUID = Field(default_factory=uuid4)
    event_type: str
    timestamp: datetime = Field(default_factory=_now)
    version: str = "1.0.0"
    source: Source
    correlation_ids: list[UUID] = Field(default_factory=list)
    agent_context: AgentContext | None = None
    payload: Any


ALWAYS_SENT = ("event_id", "timestamp", "version", "correlation_ids")
"""Fields with a default in the model that every event of ours carries anyway."""


def assert_bloodbank_envelope(event: dict[str, Any] | bytes, routing_key: str) -> EventEnvelope:
    """Assert that ``event`` (a message body, or the dict it decodes to), published under
    ``routing_key``, is a Bloodbank envelope as we send them: it validates against
    :class:`EventEnvelope` (as its JSON, the way it travels), carries
    :data:`ALWAYS_SENT`, its ``event_type`` is ``routing_key``, and a payload that names
    an ``agent`` names it as ``agent_name`` too. Returns the validated model."""
    body = event if isinstance(event, bytes) else orjson.dumps(event)
    data = orjson.loads(body)
    assert isinstance(data, dict), f"an envelope is a JSON object, not {type(data).__name__}"
    model = EventEnvelope.model_validate_json(body)
    EventEnvelope.model_validate(data)  # as a consumer that decodes first sees it
    missing = [name for name in ALWAYS_SENT if name not in data]
    assert not missing, f"{routing_key}: no {', '.join(missing)}"
    assert data["event_type"] == routing_key, (
        f"event_type {data['event_type']!r} is not the routing key {routing_key!r}"
    )
    payload = data["payload"]
    if isinstance(payload, dict) and "agent" in payload:
        assert payload.get("agent_name") == payload["agent"], (
            f"{routing_key}: payload.agent_name {payload.get('agent_name')!r} is not "
            f"payload.agent {payload['agent']!r}"
        )
    return model
