"""Receive the fleet monitor's alerts: print each one, and POST it to a webhook if given.

    python examples/alert_subscriber.py [--webhook URL] [--queue alerts.ops]

Its own durable queue (default ``alerts.ops``) is bound to ``heartbeat.*._alert.#``, so
alerts published while it is down wait for it. A delivery is acknowledged only after
the webhook accepted it (2xx); otherwise it goes back to the queue and is tried again
in 5 s. Alerts sent twice (the monitor re-sends after a broker outage) carry the same
``event_id``: a webhook can drop repeats by it.

Environment: RABBIT_URL, EXCHANGE_NAME, ALERT_WEBHOOK_URL.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import urllib.request

import aio_pika

BINDING = "heartbeat.*._alert.#"


def post(url: str, body: bytes) -> None:
    request = urllib.request.Request(  # noqa: S310 (the operator's own webhook URL)
        url, data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        response.read()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rabbit-url", default=os.environ.get("RABBIT_URL", "amqp://guest:guest@localhost:5672/")
    )
    parser.add_argument(
        "--exchange", default=os.environ.get("EXCHANGE_NAME", "bloodbank.events.v1")
    )
    parser.add_argument("--queue", default="alerts.ops")
    parser.add_argument("--webhook", default=os.environ.get("ALERT_WEBHOOK_URL"))
    args = parser.parse_args()

    connection = await aio_pika.connect_robust(args.rabbit_url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=10)
        exchange = await channel.declare_exchange(
            args.exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(args.queue, durable=True)
        await queue.bind(exchange, routing_key=BINDING)
        print(f"waiting for alerts on {args.queue} ({BINDING})", flush=True)
        async with queue.iterator() as deliveries:
            async for message in deliveries:
                alert = json.loads(message.body)
                p = alert["payload"]
                where = p["agent"] + (f"/{p['check']}" if p.get("check") else "")
                print(f"{p['severity'].upper():7} {p['kind']:8} {where}: {p['detail']}", flush=True)
                if args.webhook:
                    try:
                        await asyncio.to_thread(post, args.webhook, message.body)
                    except OSError as exc:
                        print(f"webhook failed ({exc}); retrying in 5 s", flush=True)
                        await asyncio.sleep(5)
                        await message.nack(requeue=True)
                        continue
                await message.ack()


if __name__ == "__main__":
    asyncio.run(main())
