from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_asyncio

from heartbeat_consumer.handlers.registry import (
    default_handler,
    handler_names,
    set_default_handler,
    unregister_handler,
)

ROOT = Path(__file__).resolve().parent.parent

BROKER_FIXTURES = frozenset({"bus", "cluster", "cluster_bus", "anybus"})
"""Fixtures that open a connection to the broker; a test using one, directly or through
another fixture, is marked ``rabbit``."""


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "rabbit: needs a real RabbitMQ")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark ``rabbit`` every test that reaches the broker through a fixture: with the
    module-level ``pytestmark`` of the all-broker modules and the ``@pytest.mark.rabbit``
    of the few that reach it otherwise (the CLI, a consumer of their own), ``-m "not
    rabbit"`` runs what needs no broker and ``-m rabbit`` the rest."""
    for item in items:
        if BROKER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.rabbit)


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


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """The root logger's handlers and level are what they were after a test that ran
    the CLI in-process (``setup_logging`` points a handler at the test's captured
    stderr, which is closed afterwards: every later record would print a "Logging
    error" with its whole stack, slowing and cluttering the tests after it)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
async def bus():  # type: ignore[no-untyped-def]
    """A real RabbitMQ connection with unique names; everything declared is deleted after."""
    from .broker import open_bus

    async with open_bus() as opened:
        yield opened


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def cluster():  # type: ignore[no-untyped-def]
    """The test session's 3-node RabbitMQ cluster (tests/cluster.py), started when a test
    first asks for it (about 20 s) and removed at the end. A test that stops a node
    starts it again."""
    from .cluster import make_cluster

    made = make_cluster()
    try:
        await made.start()
        yield made
    finally:
        await made.remove()


@pytest.fixture
async def cluster_bus(cluster):  # type: ignore[no-untyped-def]
    """A :func:`bus` on the 3-node cluster: the components are given the node list
    (1, 2, 3), the test's own connection goes to node 3."""
    from .broker import open_bus

    async with open_bus(cluster.url(1, 2, 3), through=cluster.nodes[2].url()) as opened:
        yield opened


@pytest.fixture(params=["broker", "cluster"])
def anybus(request: pytest.FixtureRequest) -> Any:
    """:func:`bus`, then :func:`cluster_bus`: a test of both."""
    return request.getfixturevalue("bus" if request.param == "broker" else "cluster_bus")
