"""Prometheus metrics of one process (a consumer, a fleet or a ticker).

Every label set is bounded: ``agent`` by the agents this process runs, ``check`` by the
checks of their configs, ``status``, ``outcome`` and ``reason`` by the fixed sets below.
Each process has its own registry, so several consumers can live in one test process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..core.state import AVOIDED_REASONS

if TYPE_CHECKING:
    from ..core.schedule import Plan
    from ..runtime.engine import RunResult

__all__ = ["CONTENT_TYPE", "Metrics", "MonitorMetrics", "TickOutcome"]

CONTENT_TYPE = CONTENT_TYPE_LATEST

TickOutcome = Literal["evaluated", "stale", "duplicate"]
"""What a received tick led to: an evaluation, or nothing (too old, slot already done)."""

DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1500)
"""Seconds; the last bucket is the longest timeout a check may have (25 min)."""


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.ticks = Counter(
            "heartbeat_ticks_received",
            "Ticks received from the bus, by what they led to",
            ["agent", "outcome"],
            registry=r,
        )
        self.runs = Counter(
            "heartbeat_checks_run",
            "Check runs, by result status",
            ["agent", "check", "status"],
            registry=r,
        )
        self.duration = Histogram(
            "heartbeat_handler_duration_seconds",
            "Wall time of a check's handler",
            ["agent", "check"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.last_success = Gauge(
            "heartbeat_last_success_timestamp_seconds",
            "When a check last finished with success, alert or skipped (Unix time)",
            ["agent", "check"],
            registry=r,
        )
        self.config_errors = Counter(
            "heartbeat_config_errors",
            "Ticks that found heartbeat.json unusable (the last good config, if any, ran)",
            ["agent"],
            registry=r,
        )
        self.config_valid = Gauge(
            "heartbeat_config_valid",
            "1 when heartbeat.json is valid, 0 when not",
            ["agent"],
            registry=r,
        )
        self.dead_lettered = Counter(
            "heartbeat_dead_lettered",
            "Messages sent to the agent's dead-letter queue, by reason",
            ["agent", "reason"],
            registry=r,
        )
        self.avoided = Counter(
            "heartbeat_runs_avoided",
            "Runs not made, by reason: not-due (a tick found it not due), empty-checklist, "
            "duplicate (agent_turn)",
            ["agent", "check", "reason"],
            registry=r,
        )
        self.agent_up = Gauge(
            "heartbeat_agent_up",
            "1 while an agent's consumer runs on its inbox, 0 while it failed to start "
            "(a fleet retries it with backoff)",
            ["agent"],
            registry=r,
        )
        self.agent_start_failures = Counter(
            "heartbeat_agent_start_failures",
            "Failed starts of an agent's consumer (declaration, lock, channel)",
            ["agent"],
            registry=r,
        )
        self.ticks_published = Counter(
            "heartbeat_ticks_published", "Ticks published by this ticker", registry=r
        )
        self.tick_publish_errors = Counter(
            "heartbeat_tick_publish_errors", "Ticks this ticker failed to publish", registry=r
        )

    def tick(self, agent: str, outcome: TickOutcome) -> None:
        self.ticks.labels(agent, outcome).inc()

    def config(self, agent: str, *, valid: bool) -> None:
        self.config_valid.labels(agent).set(1 if valid else 0)
        if not valid:
            self.config_errors.labels(agent).inc()

    def run(self, result: RunResult) -> None:
        self.runs.labels(result.agent, result.check, result.status).inc()
        self.duration.labels(result.agent, result.check).observe(result.duration_ms / 1000)
        if result.status in ("success", "alert", "skipped"):
            self.last_success.labels(result.agent, result.check).set(result.finished_at / 1000)
        reason = result.result.get("reason")
        if result.status == "skipped" and reason in AVOIDED_REASONS:
            self.avoided.labels(result.agent, result.check, reason).inc()

    def not_due(self, agent: str, plan: Plan | None) -> None:
        """Count the checks a tick found not due (and nothing else in the way)."""
        for name in plan.not_due() if plan else ():
            self.avoided.labels(agent, name, "not-due").inc()

    def dead_letter(self, agent: str, reason: str) -> None:
        self.dead_lettered.labels(agent, reason).inc()

    def forget_agent(self, agent: str) -> None:
        """Drop every series of an agent that left the fleet (keeps label sets bounded)."""
        for metric in (
            self.ticks,
            self.runs,
            self.duration,
            self.last_success,
            self.config_errors,
            self.config_valid,
            self.dead_lettered,
            self.avoided,
            self.agent_up,
            self.agent_start_failures,
        ):
            metric.remove_by_labels({"agent": agent})

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MonitorMetrics(Metrics):
    """The fleet monitor's series on top of the common ones. Labels: ``event_type`` and
    ``reason`` from fixed sets, ``kind`` one of stale, timeout, missed, config_invalid, resolved."""

    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.events = Counter(
            "heartbeat_monitor_events",
            "Events read from the bus, by type (status, started, result, ignored)",
            ["type"],
            registry=r,
        )
        self.agents = Gauge(
            "heartbeat_monitor_agents",
            "Agents tracked, by state (online, offline, stale)",
            ["state"],
            registry=r,
        )
        self.incidents = Gauge(
            "heartbeat_monitor_incidents_open", "Open incidents, by kind", ["kind"], registry=r
        )
        self.alerts = Counter(
            "heartbeat_monitor_alerts_published", "Alerts published, by kind", ["kind"], registry=r
        )
        self.alert_errors = Counter(
            "heartbeat_monitor_alert_publish_errors",
            "Evaluations whose alerts could not all be published (retried next time)",
            registry=r,
        )
        self.events_dropped = Counter(
            "heartbeat_monitor_events_dropped",
            "Readable events not believed, by reason (a payload that claims another agent, "
            "check or status than its routing key; too many agents or checks)",
            ["reason"],
            registry=r,
        )
        self.monitor_dead_lettered = Counter(
            "heartbeat_monitor_dead_lettered",
            "Unreadable events sent to the monitor's dead-letter queue, by reason",
            ["reason"],
            registry=r,
        )
