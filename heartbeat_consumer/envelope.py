"""Bus events: parsing what arrives, building what is sent (pure).

Every event is an envelope ``{event_id, event_type, timestamp, version, source,
correlation_ids, payload}``. Parsing is lenient where it can be (extra fields, missing
optional ones, the manual tick snippet's ``{"tick_id": ...}`` payload, the bloodbank
publisher's ``{tick, epoch_ms, quarter, ...}``) and exact where it must be: a body that is
not a JSON object, or lacks an ``event_id``, ``event_type`` or a usable time, is an
:class:`EnvelopeError` whose text is the dead-letter reason.

The body is decoded here, never by the transport: a ``charset`` in the content type is
honoured when Python knows it, and anything else about the content type is only a hint.
Times must lie in 1970..9999 (see :mod:`.timeutil`); booleans must be JSON booleans;
names must be names (``^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$``, or ``*`` where it means all).
"""

from __future__ import annotations

import codecs
import re
import socket
import uuid
from dataclasses import dataclass
from typing import Any

import orjson

from .timeutil import floor_to, iso, parse_instant_ms
from .topology import NAME_PATTERN

__all__ = [
    "Command",
    "EnvelopeError",
    "Tick",
    "decode_body",
    "envelope",
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


def envelope(
    event_type: str,
    payload: dict[str, Any],
    *,
    timestamp_ms: int,
    event_id: str | None = None,
    correlation_ids: list[str] | None = None,
    source_type: str = "heartbeat-consumer",
) -> dict[str, Any]:
    return {
        "event_id": event_id or str(uuid.uuid4()),
        "event_type": event_type,
        "timestamp": iso(timestamp_ms),
        "version": VERSION,
        "source": {"host": socket.gethostname(), "type": source_type, "app": "heartbeat-consumer"},
        "correlation_ids": correlation_ids or [],
        "payload": payload,
    }


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
