"""Bus events: parsing what arrives, building what is sent (pure).

Every event is an envelope ``{event_id, event_type, timestamp, version, source,
correlation_ids, payload}``. What is sent is a valid Bloodbank ``EventEnvelope``: a UUID
``event_id``, ``event_type`` the routing key it is published under, ``source.type`` one
of Bloodbank's trigger types (:data:`TRIGGER_TYPES`), only UUIDs in ``correlation_ids``
(:func:`correlation_uuid`), and ``payload.agent_name`` beside ``payload.agent``.

What arrives is read as before: any non-empty string id, and an ``event_type`` that is
either a routing key or one of the fixed words sent before (``heartbeat.result``,
``heartbeat.status``, ...): :func:`event_kind` and :func:`event_type_fits` read both.
Parsing is lenient where it can be (extra fields, missing optional ones, the manual tick
snippet's ``{"tick_id": ...}`` payload, the bloodbank publisher's ``{tick, epoch_ms,
quarter, ...}``) and exact where it must be: a body that is not a JSON object, or lacks
an ``event_id``, ``event_type`` or a usable time, is an :class:`EnvelopeError` whose
text is the dead-letter reason.

The body is decoded here, never by the transport: a ``charset`` in the content type is
honoured when Python knows it, and anything else about the content type is only a hint.
Times must lie in 1970..9999 (see :mod:`.timeutil`); booleans must be JSON booleans;
names must be names (``^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$``, or ``*`` where it means all).
"""

from __future__ import annotations

import codecs
import functools
import re
import socket
import uuid
from dataclasses import dataclass
from typing import Any, Literal, get_args

import orjson

from .state import STATUSES
from .timeutil import floor_to, iso, parse_instant_ms
from .topology import NAME_PATTERN, REPLY_WORDS, TICK_KEY

__all__ = [
    "APP",
    "LEGACY_EVENT_TYPES",
    "TRIGGER_TYPES",
    "Command",
    "EnvelopeError",
    "EventKind",
    "Tick",
    "TriggerType",
    "correlation_uuid",
    "decode_body",
    "envelope",
    "event_kind",
    "event_type_fits",
    "key_kind",
    "local_event_id",
    "parse_command",
    "parse_envelope",
    "parse_tick",
    "tick_event_id",
]

VERSION = "1.0.0"
MAX_BODY_BYTES = 1_000_000
MAX_REASON_CHARS = 500
"""A pause reason longer than this is cut (with an ellipsis)."""
_NAME = re.compile(NAME_PATTERN)
_UTF8 = frozenset({"utf-8", "utf8", "us-ascii", "ascii"})
_NAMESPACE = uuid.UUID("6f1c1f4e-4b7e-4f53-9a55-8c1e0b2a7d10")
APP = "heartbeat-consumer"
"""``source.app`` of every event we send; ``source.meta.component`` says which part."""

TriggerType = Literal[
    "manual", "agent", "scheduled", "heartbeat", "file_watch", "hook", "webhook", "service"
]
"""Bloodbank's ``TriggerType``: what ``source.type`` may be. Ours: ``heartbeat`` (the
consumer: results, started, status, replies; start-up and local runs), ``scheduled``
(the ticker, as Bloodbank's own tick publisher), ``manual`` (the CLI's commands and
ticks), ``service`` (the monitor's alerts)."""
TRIGGER_TYPES: tuple[str, ...] = get_args(TriggerType)

EventKind = Literal["tick", "command", "result", "started", "status", "reply", "alert", "state"]
LEGACY_EVENT_TYPES: dict[str, EventKind] = {
    TICK_KEY: "tick",
    "heartbeat.command.run": "command",
    "heartbeat.command.pause": "command",
    "heartbeat.command.resume": "command",
    "heartbeat.result": "result",
    "heartbeat.started": "started",
    "heartbeat.status": "status",
    "heartbeat.reply": "reply",
    "heartbeat.alert": "alert",
}
"""The fixed ``event_type`` words sent before it became the routing key: still read."""
AGENT_COMMANDS = frozenset({"run", "pause", "resume"})


class EnvelopeError(ValueError):
    """The message cannot be used; the text says why (it becomes the dead-letter reason).

    ``kind`` is one of a few fixed words (a bounded metrics label)."""

    def __init__(self, message: str, kind: str = "invalid_envelope") -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Tick:
    event_id: str
    slot_ms: int
    """The tick's scheduled time, rounded down to the consumer's tick interval."""
    envelope: dict[str, Any]


@dataclass(frozen=True)
class Command:
    event_id: str
    name: str
    """run | pause | resume"""
    check: str
    force: bool
    until_ms: int | None
    reason: str | None
    envelope: dict[str, Any]


def tick_event_id(exchange: str, slot_ms: int) -> str:
    """The same id for the same slot on the same exchange, whichever ticker sends it."""
    return str(uuid.uuid5(_NAMESPACE, f"tick:{exchange}:{slot_ms}"))


def result_event_id(idempotency_key: str, status: str, started_ms: int) -> str:
    """The id of a run's event: the same when the same run's result is sent again (after
    a failed publish), another for another run of the check in the same slot (a forced
    one), whose idempotency key is the same."""
    return str(uuid.uuid5(_NAMESPACE, f"result:{idempotency_key}:{started_ms}:{status}"))


def correlation_uuid(event_id: str) -> str:
    """``event_id`` as it goes in ``correlation_ids``, which Bloodbank types as UUIDs: the
    id itself (in canonical form) if it is a UUID, else a UUID derived from it (uuid5),
    the same for the same id. The raw id is the message's AMQP ``correlation_id``."""
    try:
        return str(uuid.UUID(event_id))
    except ValueError:
        return str(uuid.uuid5(_NAMESPACE, f"correlation:{event_id}"))


def local_event_id(slot_ms: int) -> str:
    """The id of the tick made up when no broker delivers one (start-up, local runs)."""
    return str(uuid.uuid5(_NAMESPACE, f"local:{slot_ms}"))


@functools.cache
def host_name() -> str:
    """This host's name, read once per process, not with a system call per event."""
    return socket.gethostname()


def envelope(
    event_type: str,
    payload: dict[str, Any],
    *,
    timestamp_ms: int,
    event_id: str | None = None,
    correlation_ids: list[str] | None = None,
    source_type: TriggerType = "heartbeat",
    component: str = "consumer",
) -> dict[str, Any]:
    """An event as Bloodbank's ``EventEnvelope`` has it. ``event_type``: the routing key
    it is published under. ``correlation_ids``: the ids of the events that caused it, as
    they came (each is sent as :func:`correlation_uuid`; empty ones are left out).
    ``source_type``: one of :data:`TRIGGER_TYPES`. ``component``: which part of
    heartbeat-consumer sends it (``source.meta.component``). A payload naming an
    ``agent`` gets ``agent_name`` too (the ecosystem's name for it)."""
    if source_type not in TRIGGER_TYPES:
        raise ValueError(f"source type {source_type!r} is not one of {', '.join(TRIGGER_TYPES)}")
    if "agent" in payload and "agent_name" not in payload:
        payload = _with_agent_name(payload)
    return {
        "event_id": event_id or str(uuid.uuid4()),
        "event_type": event_type,
        "timestamp": iso(timestamp_ms),
        "version": VERSION,
        "source": {
            "host": host_name(),
            "type": source_type,
            "app": APP,
            "meta": {"component": component},
        },
        "correlation_ids": [correlation_uuid(c) for c in correlation_ids or () if c],
        "payload": payload,
    }


def _with_agent_name(payload: dict[str, Any]) -> dict[str, Any]:
    """``payload`` with ``agent_name`` right after ``agent``."""
    named: dict[str, Any] = {}
    for key, value in payload.items():
        named[key] = value
        if key == "agent":
            named["agent_name"] = value
    return named


def key_kind(routing_key: str, *, any_status: bool = False) -> EventKind | None:
    """What an event under ``routing_key`` is, by the key's shape (see :mod:`.topology`):
    ``tick`` (``system.heartbeat.tick``, ``agent.<a>.heartbeat.tick``), ``command``
    (``agent.<a>.heartbeat.run|pause|resume``), ``result`` (``heartbeat.<a>.<check>.
    <status>``, a run's status), ``started`` (``heartbeat.<a>.<check>.started``),
    ``status`` (``heartbeat.<a>._status.<word>``), ``reply``
    (``heartbeat.<a>._command.ack|error``), ``alert`` (``heartbeat.<a>._alert.<kind>``),
    ``state`` (``heartbeat.<a>._state.<word>``, a replica's state event);
    None for any other key (``heartbeat.<a>.<check>.dispatch``, a handler's own event,
    is no result). ``any_status``: any last word is a status (after a check, a result's),
    as keys were read with the old ``event_type`` words."""
    if routing_key == TICK_KEY:
        return "tick"
    parts = routing_key.split(".")
    if len(parts) != 4 or not _NAME.fullmatch(parts[1]):
        return None
    first, second, word = parts[0], parts[2], parts[3]
    if first == "heartbeat" and second == "_state":
        return "state"
    if first == "agent":
        if second != "heartbeat":
            return None
        return "tick" if word == "tick" else "command" if word in AGENT_COMMANDS else None
    if first != "heartbeat" or not (any_status or _NAME.fullmatch(word)):
        return None
    if second == "_status":
        return "status"
    if second == "_command":
        return "reply" if word in REPLY_WORDS else None
    if second == "_alert":
        return "alert"
    if _NAME.fullmatch(second):
        if word == "started":
            return "started"
        return "result" if any_status or word in STATUSES else None
    return None


def event_kind(event_type: object) -> EventKind | None:
    """What an ``event_type`` says the event is: a routing key (what we send) by its
    shape (:func:`key_kind`), or one of the words sent before (:data:`LEGACY_EVENT_TYPES`)."""
    if not isinstance(event_type, str):
        return None
    return LEGACY_EVENT_TYPES.get(event_type) or key_kind(event_type)


def event_type_fits(event_type: object, routing_key: str) -> bool:
    """True when an event's ``event_type`` says what its routing key says: it is the key
    (Bloodbank's convention, and ours) and the key is one of :func:`key_kind`'s, or it is
    the old word for the key's kind (read as before: any status word after a check)."""
    if not isinstance(event_type, str):
        return False
    if event_type == routing_key:
        return key_kind(routing_key) is not None
    legacy = LEGACY_EVENT_TYPES.get(event_type)
    return legacy is not None and legacy == key_kind(routing_key, any_status=True)


_CHARSETS = frozenset(
    {"utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"}
    | {f"iso8859-{n}" for n in range(1, 17)}
    | {f"cp{n}" for n in range(1250, 1259)}
)
"""Charsets a content type may name to be honoured: the other UTF encodings and the
single-byte ones, each decoded in linear time. Any other name (punycode, base64, zlib,
...) is ignored, and the body is parsed as it is."""


def _charset(content_type: str | None) -> str | None:
    """The charset a content type names, if it is one of :data:`_CHARSETS`."""
    for part in (content_type or "").split(";")[1:]:
        key, _, value = part.partition("=")
        if key.strip().lower() == "charset":
            name = value.strip().strip('"').lower()
            if name in _UTF8 or len(name) > 40:
                return None
            try:
                normal = codecs.lookup(name).name
            except LookupError:
                return None
            return normal if normal in _CHARSETS else None
    return None


def decode_body(body: bytes, content_type: str | None = None) -> bytes:
    """The body as UTF-8 JSON text: re-encoded from the content type's charset when it
    names another one (``application/json; charset=utf-16``), else as it is."""
    charset = _charset(content_type)
    if charset is None:
        return body
    try:
        return body.decode(charset).encode("utf-8", errors="surrogatepass")
    except (UnicodeError, ValueError, LookupError):
        return body  # a wrong hint: the JSON parser has the last word


def parse_envelope(body: bytes, content_type: str | None = None) -> dict[str, Any]:
    """The envelope as a dict with a string ``event_id`` and ``event_type``."""
    if len(body) > MAX_BODY_BYTES:
        raise EnvelopeError(
            f"body of {len(body)} bytes is over the {MAX_BODY_BYTES} limit", "too_large"
        )
    try:
        data = orjson.loads(decode_body(body, content_type))
    except orjson.JSONDecodeError as exc:
        raise EnvelopeError(f"malformed JSON: {exc}", "malformed_json") from None
    if not isinstance(data, dict):
        raise EnvelopeError(f"envelope must be a JSON object, not {type(data).__name__}")
    for field in ("event_id", "event_type"):
        value = data.get(field)
        if not isinstance(value, str) or not value or len(value.encode(errors="replace")) > 200:
            raise EnvelopeError(
                f"envelope field {field!r} must be a non-empty string of at most 200 bytes"
            )
    payload = data.get("payload", {})
    if payload is None:
        payload = {}
    if not isinstance(payload, dict):
        raise EnvelopeError("envelope field 'payload' must be an object")
    correlation = data.get("correlation_ids", [])
    if not isinstance(correlation, list):
        raise EnvelopeError("envelope field 'correlation_ids' must be a list")
    return {**data, "payload": payload}


def _instant(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise EnvelopeError(f"{what} must be an ISO 8601 time or epoch ms")
    try:
        return parse_instant_ms(value)
    except ValueError as exc:
        raise EnvelopeError(f"{what}: {exc}") from None


def parse_tick(body: bytes, *, interval_ms: int, content_type: str | None = None) -> Tick:
    """A tick; its slot is ``payload.epoch_ms`` if given, else the envelope ``timestamp``."""
    data = parse_envelope(body, content_type)
    payload = data["payload"]
    if payload.get("epoch_ms") is not None:
        moment = _instant(payload["epoch_ms"], "payload.epoch_ms")
    elif data.get("timestamp") is not None:
        moment = _instant(data["timestamp"], "timestamp")
    else:
        raise EnvelopeError("a tick needs a 'timestamp' (or payload.epoch_ms)")
    return Tick(event_id=data["event_id"], slot_ms=floor_to(moment, interval_ms), envelope=data)


def parse_command(body: bytes, name: str, content_type: str | None = None) -> Command:
    """``run`` {check, force}; ``pause`` {check or "*", until, reason}; ``resume`` {check}."""
    data = parse_envelope(body, content_type)
    payload = data["payload"]
    check = payload.get("check", "*" if name == "resume" else None)
    if not isinstance(check, str) or not check:
        whole = " or '*' for the whole agent" if name == "pause" else ""
        raise EnvelopeError(f"{name} command needs payload.check (a check name{whole})")
    if name == "run" and check == "*":
        raise EnvelopeError("run command needs one check name, not '*'")
    if check != "*" and not _NAME.fullmatch(check):
        raise EnvelopeError(f"payload.check {check[:80]!r} is not a check name")
    force = payload.get("force", False)
    if force is None:
        force = False
    if not isinstance(force, bool):
        raise EnvelopeError(f"payload.force must be true or false, not {force!r:.40}")
    until = payload.get("until")
    reason = payload.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise EnvelopeError("payload.reason must be a string")
    if reason is not None and len(reason) > MAX_REASON_CHARS:
        reason = reason[: MAX_REASON_CHARS - 1] + "…"
    return Command(
        event_id=data["event_id"],
        name=name,
        check=check,
        force=force,
        until_ms=None if until is None else _instant(until, "payload.until"),
        reason=reason,
        envelope=data,
    )
