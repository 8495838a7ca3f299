"""An example handler plugin: load it with --handlers examples/my_handlers.py
(or --handlers examples.my_handlers from the repository root)."""

from __future__ import annotations

import shutil
from typing import Any

from heartbeat_consumer import CheckConfig, register_handler


@register_handler("disk_space")
async def disk_space(tick_payload: dict[str, Any], check_config: CheckConfig) -> dict[str, Any]:
    """Alert when the file system holding meta.path is fuller than meta.maxPercent."""
    path = str(check_config.meta.get("path", "/"))
    limit = float(check_config.meta.get("maxPercent", 90))
    usage = shutil.disk_usage(path)
    used = round(100 * usage.used / usage.total, 1)
    status = "alert" if used > limit else "success"
    return {"status": status, "path": path, "used_percent": used, "limit_percent": limit}
