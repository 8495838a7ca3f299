"""CPU cost of evaluating one tick when nothing is due, for a 50-check config.

Run: make bench   (or .venv/bin/python bench/bench_evaluate.py)
Prints microseconds of CPU per evaluation: the pure rules (``plan``), and the engine's
whole tick (``AgentRunner.tick``: the config file's stat, which finds it unchanged and
does not re-parse it, then the plan; nothing runs, nothing is written).
"""

from __future__ import annotations

import asyncio
import os
import platform
import tempfile
import time
from pathlib import Path

import orjson

from heartbeat_consumer.core.config import parse_config
from heartbeat_consumer.core.schedule import plan
from heartbeat_consumer.core.state import AgentState, record_run
from heartbeat_consumer.runtime.engine import AgentRunner

NOW = 1_795_000_000_000
ROUNDS = 5
PER_ROUND = 2000


def config_with_50_checks() -> bytes:
    zones = ["Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "UTC", "Asia/Tokyo"]
    checks = {}
    for i in range(50):
        check: dict[str, object] = {
            "cadenceMs": 900_000 + i * 1000,
            "handler": "default",
            "priority": i % 7,
        }
        if i % 2:
            check["window"] = {"start": "00:00", "end": "23:59", "tz": zones[i % len(zones)]}
        if i % 3 == 0:
            check["triggerOnQuarters"] = ["Q1", "Q2", "Q3", "Q4"]
        checks[f"check_{i:02d}"] = check
    return orjson.dumps({"agent": "bench", "checks": checks})


def main() -> None:
    loaded = parse_config(config_with_50_checks())
    state = AgentState()
    for name, check in loaded.config.checks.items():  # every check just ran: nothing due
        state = record_run(
            state,
            check=name,
            cadence_ms=check.cadence_ms,
            slot_ms=NOW - 60_000,
            status="success",
            finished_ms=NOW,
            duration_ms=1,
            key="k",
        )
    assert not plan(loaded.config, state, NOW).selected
    results = []
    for _ in range(ROUNDS):
        start = time.process_time_ns()
        for i in range(PER_ROUND):
            plan(loaded.config, state, NOW + i, known_handlers={"default"})
        results.append((time.process_time_ns() - start) / PER_ROUND / 1000)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}"
    )
    print("evaluation of a 50-check config, nothing due (CPU us per tick)")
    show("plan (pure rules)", results)
    show("AgentRunner.tick (stat + plan)", asyncio.run(engine_ticks(state)))


def show(name: str, results: list[float]) -> None:
    median = sorted(results)[ROUNDS // 2]
    print(f"  {name:32} best {min(results):6.1f}  median {median:6.1f}  worst {max(results):6.1f}")


async def engine_ticks(state: AgentState) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "bench.heartbeat.json")
        path.write_bytes(config_with_50_checks())  # noqa: ASYNC240
        runner = AgentRunner(path, state_path=Path(tmp, "state.json"), clock=lambda: NOW)
        runner.start()
        runner.state = state
        first = await runner.tick(NOW)
        assert first.config_error is None and not first.results
        results = []
        for _ in range(ROUNDS):
            start = time.process_time_ns()
            for i in range(PER_ROUND):
                await runner.tick(NOW + i)
            results.append((time.process_time_ns() - start) / PER_ROUND / 1000)
        assert not Path(tmp, "state.json").exists(), "nothing written"  # noqa: ASYNC240
        return results


if __name__ == "__main__":
    main()
