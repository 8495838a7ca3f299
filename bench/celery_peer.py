"""The peer of bench_bus.py: the same job done by Celery, as a careful user sets it up.

Runs in its own environment (``make bench`` makes ``bench/.peers`` with Celery in it; the
project does not depend on Celery). Started by bench_bus.py as

    bench/.peers/bin/celery -A celery_peer worker --pool solo|threads -Q QUEUE

with BENCH_URL (the broker), BENCH_EXCHANGE (the bench's topic exchange) and
BENCH_QUEUE set. Each task is one agent's due check on one tick: it publishes the
result under ``heartbeat.<agent>.c.success`` (persistent, with publisher confirms) for
the bench's collector, and its delivery is acked after it returns (``task_acks_late``,
prefetch 1 per worker thread). Celery keeps no state per agent and sends no started
event: what it does per task is a subset of what heartbeat-consumer does per tick.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from celery import Celery
from celery.signals import worker_ready
from kombu import Exchange

URL = os.environ.get("BENCH_URL", "amqp://guest:guest@localhost:5672/")
EXCHANGE = Exchange(os.environ.get("BENCH_EXCHANGE", "bench"), type="topic", durable=True)

app = Celery("celery_peer", broker=URL)
app.conf.update(
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    task_default_delivery_mode="persistent",
    task_ignore_result=True,  # the result is the event the task publishes
    broker_transport_options={"confirm_publish": True},
    worker_hijack_root_logger=False,
    worker_redirect_stdouts=False,  # READY goes to bench_bus.py on stdout
    broker_connection_retry_on_startup=True,
    worker_enable_remote_control=False,  # no pidbox exchanges left on the broker
    worker_send_task_events=False,
)


@app.task(name="peer.beat")
def beat(agent: str, slot_ms: int) -> None:
    body = json.dumps({"agent": agent, "check": "c", "slot": slot_ms, "status": "success"})
    with app.producer_or_acquire() as producer:
        producer.publish(
            body,
            exchange=EXCHANGE,
            routing_key=f"heartbeat.{agent}.c.success",
            delivery_mode=2,
            content_type="application/json",
            content_encoding="utf-8",
            declare=[],
            retry=False,
        )


@worker_ready.connect
def ready(**_: Any) -> None:
    sys.stdout.write("READY\n")
    sys.stdout.flush()
