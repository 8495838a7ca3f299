"""Where a service serves ``/health`` and ``/metrics``: built once, passed to every service."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ServeSettings"]


@dataclass(frozen=True)
class ServeSettings:
    """The health and metrics endpoint: ``port`` None serves nothing; ``host`` is the
    address it listens on (loopback by default: the metrics are not for everyone)."""

    port: int | None = None
    host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        if self.port is not None and not 0 <= self.port <= 65535:
            raise ValueError(f"health port {self.port} is out of range (0-65535)")

    def describe(self) -> str:
        return "no health endpoint" if self.port is None else f"http://{self.host}:{self.port}"
