"""Tolerant decoding of AMQP frame fields, so that no message can kill a connection.

pamqp (under aiormq and aio-pika) decodes each delivery's properties inside the
connection's reader. A value the broker accepted but Python cannot represent raises
there, and the connection dies; it reconnects, receives the same message, and dies
again, for ever, for every consumer on it (a whole fleet, the monitor). Seen: a
``timestamp`` property in epoch microseconds or past the year 9999, and invalid UTF-8 in
a short-string property (``content_type``, ``message_id``, ``reply_to``, ...) or in a
header name.

:func:`install` (called when :mod:`.connection` is imported) replaces three of pamqp's
decoders with tolerant ones:

- a timestamp Python cannot represent decodes as None;
- a short string that is not UTF-8 decodes with replacement characters;
- a field table (the headers) that cannot be decoded at all, for whatever reason
  (a bad name, a nesting too deep), decodes as an empty table: its length is known,
  so the rest of the frame is read as usual.

The message then reaches the consumer like any other and ends in an ack or a dead
letter. Encoding is not touched.
"""

from __future__ import annotations

import datetime
import struct
from typing import Any

from pamqp import common
from pamqp import decode as pamqp_decode

__all__ = ["install"]

_timestamp = pamqp_decode.timestamp
_short_str = pamqp_decode.short_str
_field_table = pamqp_decode.field_table


def timestamp(value: bytes) -> tuple[int, datetime.datetime | None]:
    try:
        return _timestamp(value)
    except (ValueError, OverflowError, OSError):
        if len(value) < 8:
            raise ValueError("Could not unpack timestamp value") from None
        return 8, None


def short_str(value: bytes) -> tuple[int, str]:
    try:
        return _short_str(value)
    except UnicodeDecodeError:
        length = value[0]
        return length + 1, value[1 : length + 1].decode("utf-8", errors="replace")


def field_table(value: bytes) -> tuple[int, Any]:
    try:
        return _field_table(value)
    except (ValueError, OverflowError, RecursionError):  # UnicodeDecodeError included
        try:
            length = common.Struct.integer.unpack(value[0:4])[0]
        except struct.error:
            raise ValueError("Could not unpack data") from None
        if 4 + length > len(value):
            raise ValueError("Field table length exceeds available data") from None
        return 4 + length, {}


_REPLACEMENTS = {"timestamp": timestamp, "short_str": short_str, "field_table": field_table}


def install() -> None:
    """Put the tolerant decoders in place (idempotent)."""
    for name, function in _REPLACEMENTS.items():
        setattr(pamqp_decode, name, function)
    pamqp_decode.METHODS.update(
        {"timestamp": timestamp, "shortstr": short_str, "table": field_table}
    )
    pamqp_decode.TABLE_MAPPING.update({b"T": timestamp, b"F": field_table})
