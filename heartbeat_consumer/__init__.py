"""heartbeat-consumer: keeps fleets of agents doing their periodic work on time.

Layers, each a subpackage that imports only the ones before it (a test checks):

- :mod:`.core`: the pure rules and models (config, schedule, state, envelope, ...);
- :mod:`.handlers`: the handler registry and the built-in handlers;
- :mod:`.runtime`: one agent's ticks, its state file and the local clock;
- :mod:`.ops`: service lifecycle, HTTP, metrics, logs, systemd;
- :mod:`.bus`: RabbitMQ (consumer, fleet, ticker, requests, topology);
- :mod:`.monitor`: the fleet monitor;
- :mod:`.cli`: the command line.

The public names below are loaded when first used (PEP 562), so that importing the
core, or running ``validate``, ``plan``, ``simulate`` or ``run-once``, never loads the
broker's libraries. The built-in handlers are registered on import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .core.version import __version__
from .handlers import agent_turn as _agent_turn
from .handlers import builtin as _builtin
from .handlers import openclaw as _openclaw

del _agent_turn, _builtin, _openclaw

_PUBLIC = {
    "AgentRunner": "runtime.engine",
    "Alert": "monitor.rules",
    "AgentState": "core.state",
    "BusSettings": "bus.settings",
    "CheckConfig": "core.config",
    "CheckState": "core.state",
    "ConfigError": "core.config",
    "Evaluation": "core.schedule",
    "Fleet": "bus.fleet",
    "HandlerError": "handlers.registry",
    "Health": "ops.health",
    "HeartbeatConfig": "core.config",
    "HeartbeatConsumer": "bus.consumer",
    "InboxSettings": "bus.settings",
    "LoadedConfig": "core.config",
    "Metrics": "ops.metrics",
    "Monitor": "monitor.monitor",
    "Plan": "core.schedule",
    "Problem": "core.problems",
    "RunContext": "handlers.registry",
    "RunResult": "runtime.engine",
    "ServeSettings": "ops.settings",
    "StateError": "runtime.store",
    "TickReport": "runtime.engine",
    "Ticker": "bus.ticker",
    "TopologyError": "bus.provision",
    "WatchConfig": "monitor.rules",
    "WatchState": "monitor.rules",
    "current_run": "handlers.registry",
    "evaluate": "core.schedule",
    "load_config": "core.config",
    "overdue_ratio": "core.schedule",
    "parse_config": "core.config",
    "plan": "core.schedule",
    "register_handler": "handlers.registry",
    "select": "core.schedule",
    "simulate": "core.simulate",
}

__all__ = [
    "AgentRunner",
    "AgentState",
    "Alert",
    "BusSettings",
    "CheckConfig",
    "CheckState",
    "ConfigError",
    "Evaluation",
    "Fleet",
    "HandlerError",
    "Health",
    "HeartbeatConfig",
    "HeartbeatConsumer",
    "InboxSettings",
    "LoadedConfig",
    "Metrics",
    "Monitor",
    "Plan",
    "Problem",
    "RunContext",
    "RunResult",
    "ServeSettings",
    "StateError",
    "TickReport",
    "Ticker",
    "TopologyError",
    "WatchConfig",
    "WatchState",
    "__version__",
    "current_run",
    "evaluate",
    "load_config",
    "overdue_ratio",
    "parse_config",
    "plan",
    "register_handler",
    "select",
    "simulate",
]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:
    from .bus.consumer import HeartbeatConsumer
    from .bus.fleet import Fleet
    from .bus.provision import TopologyError
    from .bus.settings import BusSettings, InboxSettings
    from .bus.ticker import Ticker
    from .core.config import (
        CheckConfig,
        ConfigError,
        HeartbeatConfig,
        LoadedConfig,
        load_config,
        parse_config,
    )
    from .core.problems import Problem
    from .core.schedule import Evaluation, Plan, evaluate, overdue_ratio, plan, select
    from .core.simulate import simulate
    from .core.state import AgentState, CheckState
    from .handlers.registry import HandlerError, RunContext, current_run, register_handler
    from .monitor.monitor import Monitor
    from .monitor.rules import Alert, WatchConfig, WatchState
    from .ops.health import Health
    from .ops.metrics import Metrics
    from .ops.settings import ServeSettings
    from .runtime.engine import AgentRunner, RunResult, TickReport
    from .runtime.store import StateError
