"""Receive the fleet monitor's alerts: print each one, and POST it to a webhook if given.

    python examples/alert_subscriber.py [--webhook URL] [--queue alerts.ops]

Its own durable queue (default ``alerts.ops``) is bound to ``heartbeat.*._alert.#``, so
alerts published while it is down wait for it. A delivery is acknowledged only after
the webhook accepted it (2xx); otherwise it goes back to the queue and is tried again
in 5 s. Alerts sent twice (the monitor re-sends after a broker outage) carry the same
``event_id``: a webhook can drop repeats by it.

An alert is about the agent its routing key names (``heartbeat.<agent>._alert.<kind>``):
permissions.sh lets only the monitor's user publish alerts; one whose payload names
another agent or kind, or that cannot be read, is acknowledged and skipped, never
forwarded (and never stops this subscriber).

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


def describe(routing_key: str, body: bytes) -> str | None:
    """The alert as a line, or None when it is unreadable or its payload disagrees
    with its routing key ``heartbeat.<agent>._alert.<kind>``."""
    parts = routing_key.split(".")
    try:
        p = json.loads(body)["payload"]
        agent, kind, severity, detail = p["agent"], p["kind"], p["severity"], p["detail"]
        check = p.get("check")
    except (ValueError, KeyError, TypeError):
        return None
    if len(parts) != 4 or parts[1] != agent or parts[3] != kind:
        return None
    where = f"{agent}/{check}" if check else str(agent)
    return f"{str(severity).upper():7} {kind:8} {where}: {detail}"


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
                line = describe(message.routing_key or "", message.body)
                if line is None:
                    print(f"skipped an alert that is not one ({message.routing_key})", flush=True)
                    await message.ack()
                    continue
                print(line, flush=True)
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
