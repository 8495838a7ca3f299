"""heartbeat-consumer: keeps fleets of agents doing their periodic work on time."""

from __future__ import annotations

__version__ = "0.1.0"

from . import agent_turn as _agent_turn
from . import builtin_handlers as _builtin_handlers
from . import openclaw as _openclaw
from .config import (
    CheckConfig,
    ConfigError,
    HeartbeatConfig,
    LoadedConfig,
    Problem,
    load_config,
    parse_config,
)
from .consumer import HeartbeatConsumer, TopologyError
from .deadman import Alert, WatchConfig, WatchState
from .engine import AgentRunner, RunResult, TickReport
from .fleet import Fleet
from .handlers import (
    HandlerError,
    RunContext,
    current_run,
    register_handler,
)
from .health import Health
from .metrics import Metrics
from .monitor import Monitor
from .schedule import Evaluation, Plan, evaluate, overdue_ratio, plan, select
from .simulate import simulate
from .state import AgentState, CheckState
from .store import StateError
from .ticker import Ticker

del _agent_turn, _builtin_handlers, _openclaw

__all__ = [
    "AgentRunner",
    "Alert",
    "AgentState",
    "CheckConfig",
    "CheckState",
    "ConfigError",
    "Evaluation",
    "Fleet",
    "HandlerError",
    "Health",
    "HeartbeatConfig",
    "HeartbeatConsumer",
    "LoadedConfig",
    "Metrics",
    "Monitor",
    "Plan",
    "Problem",
    "RunContext",
    "RunResult",
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
