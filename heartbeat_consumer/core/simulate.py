"""Pure simulation of a config over a time range: which runs would happen, and when.

Every run is assumed to succeed. Useful for checking windows and quarters over a DST
weekend before deploying (``heartbeat-consumer simulate``).
"""

from __future__ import annotations

import math
from collections.abc import Container, Iterator
from dataclasses import dataclass
from typing import Any

from .config import HeartbeatConfig
from .schedule import plan
from .state import AgentState, idempotency_key, record_run
from .timeutil import iso, local_time

__all__ = ["SimulatedRun", "simulate"]


@dataclass(frozen=True)
class SimulatedRun:
    slot: int
    check: str
    handler: str
    overdue_ratio: float
    local: str
    """The slot on the check's local wall clock, ISO 8601 with offset."""
    idempotency_key: str

    def to_json(self) -> dict[str, Any]:
        return {
            "slot": iso(self.slot),
            "local": self.local,
            "check": self.check,
            "handler": self.handler,
            "overdue_ratio": None if math.isinf(self.overdue_ratio) else self.overdue_ratio,
            "idempotency_key": self.idempotency_key,
        }


def simulate(
    config: HeartbeatConfig,
    start_ms: int,
    end_ms: int,
    tick_ms: int,
    *,
    state: AgentState | None = None,
    known_handlers: Container[str] | None = None,
) -> Iterator[SimulatedRun]:
    """Runs for ticks at every ``tick_ms`` boundary in ``[start_ms, end_ms)``."""
    current = state or AgentState()
    slot = -(-start_ms // tick_ms) * tick_ms
    while slot < end_ms:
        for chosen in plan(config, current, slot, known_handlers=known_handlers).selected:
            check = config.checks[chosen.check]
            key = idempotency_key(config.agent, check.name, slot)
            current = record_run(
                current,
                check=check.name,
                cadence_ms=check.cadence_ms,
                slot_ms=slot,
                status="success",
                finished_ms=slot,
                duration_ms=0,
                key=key,
                initial_last_run=check.last_run,
            )
            yield SimulatedRun(
                slot=slot,
                check=check.name,
                handler=check.handler,
                overdue_ratio=chosen.ratio,
                local=local_time(slot, check.zoneinfo).isoformat(timespec="minutes"),
                idempotency_key=key,
            )
        slot += tick_ms
