"""What ``/health`` reports: :class:`Health`, and :func:`probe_with_timeout` for probes.

A component's probe answers 200-worthy only when it is healthy (for a consumer: broker
connected **and** its consumer registered on its queue). The HTTP server that serves it
is :mod:`.http`; this module stays free of it (and of aiohttp), so the components and
the systemd watchdog can share it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["PROBE_TIMEOUT_S", "Health", "Probe", "probe_with_timeout"]

PROBE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Health:
    """``Health(ok=..., connected=..., detail={...})`` (positional arguments work too)."""

    ok: bool
    connected: bool
    """The broker connection is up (a restart would not help while it is down)."""
    detail: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "status": "ok" if self.ok else "unhealthy",
            "connected": self.connected,
            **self.detail,
        }


Probe = Callable[[], Awaitable[Health]]


async def probe_with_timeout(probe: Probe, timeout_s: float = PROBE_TIMEOUT_S) -> Health:
    """The probe's answer; a probe that raises or hangs is an unhealthy, unconnected one."""
    try:
        return await asyncio.wait_for(probe(), timeout_s)
    except TimeoutError:
        return Health(
            ok=False, connected=False, detail={"error": f"health probe took over {timeout_s:g} s"}
        )
    except Exception as exc:
        return Health(ok=False, connected=False, detail={"error": f"health probe failed: {exc}"})
