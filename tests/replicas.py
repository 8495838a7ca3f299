"""Replicas of an agent in tests (test_standby, test_cluster): the plugin their
processes load, how they are started, and their results."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import aio_pika
import orjson

from .broker import Bus, drain_all
from .helpers import BIN

SLOT = 1000
"""Tick interval of these tests (ms): each tick is a new slot, and the check (cadence
1 ms) is due at every one of them. Its timeout is 10 s: by default it would be the
cadence, and a run that a busy machine holds up for a millisecond would time out."""


def replicas_of(bus: Bus, agent: str, *names: str) -> None:
    """Clean-up of the replicas' state queues."""
    bus.queues |= {f"agent.{agent}.state.{name}" for name in names}


async def results_of(queue: aio_pika.abc.AbstractQueue) -> list[dict[str, Any]]:
    """The payloads waiting in ``queue``, run announcements (``.started``) left out."""
    return [
        orjson.loads(m.body)["payload"]
        for m in await drain_all(queue)
        if not (m.routing_key or "").endswith(".started")
    ]


async def wait_results(queue: aio_pika.abc.AbstractQueue, n: int, within: float = 15) -> list[Any]:
    got: list[dict[str, Any]] = []

    async def enough() -> bool:
        got.extend(await results_of(queue))
        return len(got) >= n

    deadline = asyncio.get_running_loop().time() + within
    while not await enough():
        assert asyncio.get_running_loop().time() < deadline, f"{len(got)} of {n} results: {got}"
        await asyncio.sleep(0.05)
    return got


KILL_AFTER_RESULT = """
import os, signal
from heartbeat_consumer import register_handler
from heartbeat_consumer.bus.consumer import AgentConsumer

_on_result = AgentConsumer._on_result

async def _die_after_the_result(self, result):
    await _on_result(self, result)  # published and confirmed, with the state change
    if os.environ.get("DIE_AT_SLOT") == str(result.slot):
        os.kill(os.getpid(), signal.SIGKILL)  # before the tick is acknowledged

AgentConsumer._on_result = _die_after_the_result

@register_handler("keys")
async def keys(payload, check):
    with open(check.meta["calls"], "a") as out:
        out.write(payload["idempotency_key"] + "\\n")
    return {"status": "success"}
"""


async def spawn(
    bus: Bus, config: Path, tmp_path: Path, name: str, *, url: str = "", **env: str
) -> asyncio.subprocess.Process:
    """``heartbeat-consumer run --standby --replica NAME`` (on ``url``, else the bus's),
    with the plugin of ``tmp_path``; its output goes to ``<tmp_path>/<name>/log``."""
    directory = tmp_path / name
    directory.mkdir(exist_ok=True)
    argv = [BIN, "run", str(config), "--rabbit-url", url or bus.url]
    argv += ["--exchange", bus.exchange_name]
    argv += ["--handlers", str(tmp_path / "plugin.py"), "--state", str(directory / "state.json")]
    argv += ["--every", f"{SLOT}ms", "--queue-type", "quorum", "--standby", "--replica", name]
    log = (directory / "log").open("wb")
    return await asyncio.create_subprocess_exec(
        *argv, stderr=log, stdout=log, env={**os.environ, **env}
    )


async def until_consuming(tmp_path: Path, name: str, within: float = 30) -> None:
    """Until replica ``name`` (started by :func:`spawn`) consumes its inbox: it says so
    in its log, once it has the other replicas' state. (The broker counts only the
    active consumer of a single active consumer queue.)"""
    log = tmp_path / name / "log"
    deadline = asyncio.get_running_loop().time() + within
    while b"consuming agent." not in (log.read_bytes() if log.exists() else b""):
        assert asyncio.get_running_loop().time() < deadline, f"{name} does not consume"
        await asyncio.sleep(0.1)
