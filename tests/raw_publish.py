"""Publish one message whose AMQP properties hold values Python's AMQP stack cannot
decode (the broker takes them): ``python raw_publish.py URL EXCHANGE KEY KIND``.

The message is built with ordinary values of the right length, and the bytes of those
placeholders are swapped for the bad ones as the frame is written (pamqp encodes only
what it could also decode). Run as a process of its own: nothing here touches the
test process's pamqp.
"""

from __future__ import annotations

import asyncio
import datetime
import struct
import sys

import aiormq
import pamqp.frame
from pamqp import commands

PLACEHOLDER_TIME = datetime.datetime(2001, 2, 3, 4, 5, 6, tzinfo=datetime.UTC)
PLACEHOLDER_STAMP = struct.pack(">Q", int(PLACEHOLDER_TIME.timestamp()))
BODY = b'{"event_id": "raw", "event_type": "system.heartbeat.tick", "timestamp": 0}'

KINDS: dict[str, tuple[dict[str, object], list[tuple[bytes, bytes]]]] = {
    # epoch microseconds, as a careless client sends them: past the year 9999
    "timestamp": (
        {"timestamp": PLACEHOLDER_TIME},
        [(PLACEHOLDER_STAMP, struct.pack(">Q", 1764586000000000))],
    ),
    "header-timestamp": (
        {"headers": {"when": PLACEHOLDER_TIME}},
        [(b"T" + PLACEHOLDER_STAMP, b"T" + struct.pack(">Q", 2**62))],
    ),
    "content-type": (
        {"content_type": "application/jsonX"},
        [(b"application/jsonX", b"application/json\xff")],
    ),
    "message-id": ({"message_id": "XXid"}, [(b"XXid", b"\xc3\x28id")]),
    "reply-to": ({"reply_to": "RRRR"}, [(b"RRRR", b"\xff\xfe\xfd\xfc")]),
    "header-name": ({"headers": {"kX": 1}}, [(b"\x02kX", b"\x02k\xff")]),
}


async def main() -> None:
    url, exchange, routing_key, kind = sys.argv[1:5]
    properties, swaps = KINDS[kind]
    marshal = pamqp.frame.marshal

    def swapping(frame: object, channel_id: int) -> bytes:
        data = marshal(frame, channel_id)  # type: ignore[arg-type]
        for old, new in swaps:
            data = data.replace(old, new)
        return data

    pamqp.frame.marshal = swapping  # type: ignore[assignment]
    connection = await aiormq.connect(url)
    channel = await connection.channel()
    await channel.basic_publish(
        BODY,
        exchange=exchange,
        routing_key=routing_key,
        properties=commands.Basic.Properties(**properties),  # type: ignore[arg-type]
    )
    await connection.close()


if __name__ == "__main__":
    asyncio.run(main())
