from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from heartbeat_consumer.handlers import (
    default_handler,
    handler_names,
    set_default_handler,
    unregister_handler,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[..., Path]:
    """Write a heartbeat.json (dict or raw text) into tmp_path and return its path."""

    def write(data: dict[str, Any] | str | bytes, name: str = "heartbeat.json") -> Path:
        path = tmp_path / name
        if isinstance(data, dict):
            path.write_bytes(orjson.dumps(data))
        elif isinstance(data, str):
            path.write_text(data)
        else:
            path.write_bytes(data)
        return path

    return write


@pytest.fixture(autouse=True)
def _restore_registry() -> Iterator[None]:
    """Handlers a test registers are removed afterwards, and the default handler is
    what it was."""
    before, default = handler_names(), default_handler()
    yield
    set_default_handler(default)
    for name in handler_names() - before:
        unregister_handler(name)


@pytest.fixture
async def bus():  # type: ignore[no-untyped-def]
    """A real RabbitMQ connection with unique names; everything declared is deleted after."""
    from .broker import open_bus

    async with open_bus() as opened:
        yield opened
