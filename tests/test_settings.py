"""Settings objects (BusSettings, InboxSettings, ServeSettings) passed to every service, the
old arguments they replace (deprecated: they warn and map onto the same settings), and the
same run(stop=None) / run_sync() on every service."""

from __future__ import annotations

import asyncio
import inspect
import ssl
import warnings
from pathlib import Path
from typing import Any

import orjson
import pytest

import heartbeat_consumer
from heartbeat_consumer import (
    BusSettings,
    Fleet,
    HeartbeatConsumer,
    InboxSettings,
    Monitor,
    ServeSettings,
    Ticker,
)
from heartbeat_consumer.bus import ticker as ticker_module
from heartbeat_consumer.bus.connection import TlsFiles
from heartbeat_consumer.bus.provision import DeadLetterLimits
from heartbeat_consumer.bus.ticker import run_ticker
from heartbeat_consumer.core.envelope import correlation_uuid
from heartbeat_consumer.monitor import monitor as monitor_module

from .broker import Bus, take
from .helpers import tick, write

URL = "amqp://user:s3cret@rabbit.example:5672/vhost"
LIMITS = DeadLetterLimits(max_length=5, ttl_ms=60_000)
BUS = BusSettings(url=URL, exchange="ex.settings", declare=False)
INBOX = InboxSettings(
    tick_interval_ms=1000,
    queue_type="quorum",
    single_active_consumer=True,
    alive_every_ms=5000,
    dead_letters=LIMITS,
)
SERVE = ServeSettings(port=8099, host="0.0.0.0")
OLD_INBOX: dict[str, Any] = {
    "tick_interval_ms": 1000,
    "queue_type": "quorum",
    "single_active_consumer": True,
    "alive_every_ms": 5000,
    "dead_letters": LIMITS,
}
OLD_SERVE: dict[str, Any] = {"health_port": 8099, "health_host": "0.0.0.0"}


@pytest.fixture
def ca_file() -> str:
    """A CA bundle that exists (TLS files are opened when the broker object is made)."""
    path = ssl.get_default_verify_paths().cafile
    if path is None or not Path(path).is_file():
        pytest.skip("no system CA bundle here")
    return path


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "agent1.heartbeat.json"
    path.write_bytes(orjson.dumps({"agent": "agent1", "checks": {}}))
    return path


def _messages(record: pytest.WarningsRecorder) -> list[str]:
    return sorted(str(w.message) for w in record if issubclass(w.category, DeprecationWarning))


# --- the settings objects --------------------------------------------------------------------


def test_bus_settings_repr_and_describe_mask_the_password() -> None:
    settings = BusSettings(url=URL, tls=TlsFiles(ca_file="/ca.pem"))
    for text in (repr(settings), str(settings), settings.describe(), repr(SERVE), repr(INBOX)):
        assert "s3cret" not in text
    assert repr(settings).startswith("BusSettings(url='amqp://user:***@rabbit.example:5672/")
    assert "tls=TlsFiles(ca_file='/ca.pem'" in repr(settings)
    assert settings.describe() == "amqp://user:***@rabbit.example:5672/vhost, exchange " + (
        "bloodbank.events.v1"
    )
    assert "guest:***@" in repr(BusSettings())  # even the well-known default's


def test_settings_are_frozen_values_with_the_old_defaults() -> None:
    assert BusSettings() == BusSettings(
        url="amqp://guest:guest@localhost:5672/", exchange="bloodbank.events.v1"
    )
    assert InboxSettings() == InboxSettings(60_000, "classic", False, 300_000, DeadLetterLimits())
    assert ServeSettings() == ServeSettings(None, "127.0.0.1")
    with pytest.raises(AttributeError):
        BUS.url = "amqp://elsewhere/"  # type: ignore[misc]
    assert len({BUS, BusSettings(url=URL, exchange="ex.settings", declare=False)}) == 1


@pytest.mark.parametrize(
    "bad",
    [
        {"tick_interval_ms": 0},
        {"alive_every_ms": -1},
        {"queue_type": "stream"},
    ],
)
def test_inbox_settings_refuse_nonsense(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        InboxSettings(**bad)


def test_serve_settings_refuse_a_port_out_of_range() -> None:
    with pytest.raises(ValueError, match="70000"):
        ServeSettings(port=70000)


def test_the_package_exports_them_lazily() -> None:
    for name in ("BusSettings", "InboxSettings", "ServeSettings"):
        assert name in heartbeat_consumer.__all__
        assert name in dir(heartbeat_consumer)
    assert heartbeat_consumer.ServeSettings is ServeSettings


# --- the old arguments: they warn and map onto the same settings -----------------------------


def test_heartbeat_consumer_old_arguments_warn_and_map(config: Path, tmp_path: Path) -> None:
    with pytest.warns(DeprecationWarning) as record:
        old = HeartbeatConsumer(
            "agent1",
            config,
            URL,
            "ex.settings",
            state_path=tmp_path / "old.json",
            declare_exchanges=False,
            **OLD_INBOX,
            **OLD_SERVE,
        )
    assert _messages(record) == sorted(
        [
            "HeartbeatConsumer taking rabbit_url by position is deprecated; "
            "pass bus=BusSettings(url=...)",
            "HeartbeatConsumer taking exchange_name by position is deprecated; "
            "pass bus=BusSettings(exchange=...)",
            "HeartbeatConsumer(declare_exchanges=...) is deprecated; "
            "pass bus=BusSettings(declare=...)",
            "HeartbeatConsumer(tick_interval_ms=...) is deprecated; "
            "pass inbox=InboxSettings(tick_interval_ms=...)",
            "HeartbeatConsumer(queue_type=...) is deprecated; "
            "pass inbox=InboxSettings(queue_type=...)",
            "HeartbeatConsumer(single_active_consumer=...) is deprecated; "
            "pass inbox=InboxSettings(single_active_consumer=...)",
            "HeartbeatConsumer(alive_every_ms=...) is deprecated; "
            "pass inbox=InboxSettings(alive_every_ms=...)",
            "HeartbeatConsumer(dead_letters=...) is deprecated; "
            "pass inbox=InboxSettings(dead_letters=...)",
            "HeartbeatConsumer(health_port=...) is deprecated; pass serve=ServeSettings(port=...)",
            "HeartbeatConsumer(health_host=...) is deprecated; pass serve=ServeSettings(host=...)",
        ]
    )
    assert all(w.filename == __file__ for w in record)  # the caller's line, not ours
    new = HeartbeatConsumer(
        "agent1", config, bus=BUS, inbox=INBOX, serve=SERVE, state_path=tmp_path / "new.json"
    )
    assert (old.bus, old.inbox, old.serve) == (new.bus, new.inbox, new.serve) == (BUS, INBOX, SERVE)
    for consumer in (old, new):  # and what the agent's consumer uses of them
        agent = consumer.agent
        assert agent.exchange.name == "ex.settings"
        assert not agent.declare_topology
        assert agent.tick_interval_ms == 1000
        assert agent.alive_every_ms == 5000
        assert agent.inbox_options.arguments() == {
            "x-queue-type": "quorum",
            "x-single-active-consumer": True,
        }
        assert agent.dead_letter_limits == LIMITS
        assert consumer.rabbit_url == URL


def test_the_old_tls_and_dead_letters_none_map_too(
    config: Path, tmp_path: Path, ca_file: str
) -> None:
    tls = TlsFiles(ca_file=ca_file)
    with pytest.warns(DeprecationWarning, match=r"pass bus=BusSettings\(tls=\.\.\.\)"):
        consumer = HeartbeatConsumer(
            "agent1", config, tls=tls, dead_letters=None, state_path=tmp_path / "s.json"
        )
    assert consumer.bus == BusSettings(tls=tls)
    assert consumer.inbox == InboxSettings()  # None meant the default limits


def test_fleet_old_arguments_warn_and_map(tmp_path: Path) -> None:
    with pytest.warns(DeprecationWarning) as record:
        old = Fleet(
            tmp_path,
            URL,
            "ex.settings",
            declare_exchanges=False,
            rescan_s=9,
            **OLD_INBOX,
            **OLD_SERVE,
        )
    assert len(record) == 10
    assert "Fleet taking rabbit_url by position is deprecated; pass bus=BusSettings(url=...)" in (
        _messages(record)
    )
    assert all(w.filename == __file__ for w in record)
    new = Fleet(tmp_path, bus=BUS, inbox=INBOX, serve=SERVE, rescan_s=9)
    assert (old.bus, old.inbox, old.serve) == (new.bus, new.inbox, new.serve) == (BUS, INBOX, SERVE)
    assert old.rescan_s == new.rescan_s == 9
    agent = new._consumer("agent1", tmp_path / "agent1.heartbeat.json")
    assert agent.tick_interval_ms == 1000
    assert agent.exchange.name == "ex.settings"
    assert agent._channel is new.channel


def test_ticker_old_arguments_warn_and_map(ca_file: str) -> None:
    tls = TlsFiles(ca_file=ca_file)
    with pytest.warns(DeprecationWarning) as record:
        old = Ticker(
            rabbit_url=URL, exchange_name="ex.settings", declare_exchanges=False, every_ms=5
        )
    assert _messages(record) == [
        "Ticker(declare_exchanges=...) is deprecated; pass bus=BusSettings(declare=...)",
        "Ticker(exchange_name=...) is deprecated; pass bus=BusSettings(exchange=...)",
        "Ticker(rabbit_url=...) is deprecated; pass bus=BusSettings(url=...)",
    ]
    new = Ticker(bus=BUS, every_ms=5)
    assert old.bus == new.bus == BUS
    assert old.exchange_name == "ex.settings"
    assert not old.declare_topology
    with pytest.warns(DeprecationWarning, match="Ticker"):
        assert Ticker(tls=tls).bus == BusSettings(tls=tls)


def test_monitor_old_arguments_warn_and_map(tmp_path: Path) -> None:
    with pytest.warns(DeprecationWarning) as record:
        old = Monitor(
            state_path=tmp_path / "m.json",
            rabbit_url=URL,
            exchange_name="ex.settings",
            declare_exchanges=False,
            dead_letters=LIMITS,  # the monitor's own: not deprecated
        )
    assert len(record) == 3
    assert all(w.filename == __file__ for w in record)
    new = Monitor(state_path=tmp_path / "m.json", bus=BUS, dead_letters=LIMITS)
    assert old.bus == new.bus == BUS
    assert old.exchange.name == "ex.settings"
    assert old.dead_letters.name == "ex.settings.dlx"
    assert old.dead_letter_limits == new.dead_letter_limits == LIMITS


async def test_monitor_run_port_and_host_warn_and_map(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    served: list[tuple[int | None, str]] = []

    async def fake_run_service(
        *args: Any, health_port: int | None, health_host: str, **kw: Any
    ) -> None:
        served.append((health_port, health_host))

    monkeypatch.setattr(monitor_module, "run_service", fake_run_service)
    monitor = Monitor(state_path=tmp_path / "m.json")
    with pytest.warns(DeprecationWarning) as record:
        await monitor.run(asyncio.Event(), port=8099, host="0.0.0.0")
    assert _messages(record) == [
        "Monitor.run(host=...) is deprecated; pass serve=ServeSettings(host=...) to Monitor()",
        "Monitor.run(port=...) is deprecated; pass serve=ServeSettings(port=...) to Monitor()",
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        await Monitor(state_path=tmp_path / "m.json", serve=SERVE).run(asyncio.Event())
    assert served == [(8099, "0.0.0.0"), (8099, "0.0.0.0")]
    with pytest.raises(TypeError, match="serve="):
        await Monitor(state_path=tmp_path / "m.json", serve=SERVE).run(port=1)
    with pytest.raises(TypeError, match="'prt'"):
        await monitor.run(prt=1)


async def test_run_ticker_old_arguments_warn_and_map(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[BusSettings, ServeSettings, int | None]] = []

    async def fake_serve_until(
        self: Ticker, stop: asyncio.Event, max_ticks: int | None = None
    ) -> None:
        seen.append((self.bus, self.serve, max_ticks))

    monkeypatch.setattr(ticker_module.Ticker, "serve_until", fake_serve_until)
    with pytest.warns(DeprecationWarning) as record:
        sent = await run_ticker(
            rabbit_url=URL,
            exchange_name="ex.settings",
            declare_exchanges=False,
            max_ticks=3,
            **OLD_SERVE,
        )
    assert sent == 0
    assert len(record) == 5
    assert "run_ticker(health_port=...) is deprecated; pass serve=ServeSettings(port=...)" in (
        _messages(record)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        await run_ticker(bus=BUS, serve=SERVE, max_ticks=3)
    assert seen == [(BUS, SERVE, 3), (BUS, SERVE, 3)]
    with pytest.raises(TypeError):
        await run_ticker(bus=BUS, rabbit_url=URL)


def test_the_new_way_does_not_warn(config: Path, tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HeartbeatConsumer("agent1", config, state_path=tmp_path / "s.json")
        HeartbeatConsumer(
            "agent1",
            config,
            bus=BUS,
            inbox=INBOX,
            serve=SERVE,
            state_path=tmp_path / "s.json",
            graceful_timeout_s=5,
        )
        Fleet(tmp_path)
        Fleet(tmp_path, bus=BUS, inbox=INBOX, serve=SERVE, state_dir=tmp_path, rescan_s=1)
        Ticker()
        Ticker(bus=BUS, every_ms=1000, serve=SERVE)
        Monitor(state_path=tmp_path / "m.json")
        Monitor(state_path=tmp_path / "m.json", bus=BUS, serve=SERVE, dead_letters=LIMITS)


# --- never old and new mixed, nor unknown arguments ------------------------------------------


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda c, t: HeartbeatConsumer("agent1", c, URL, bus=BUS), "rabbit_url= and bus="),
        (
            lambda c, t: HeartbeatConsumer("agent1", c, bus=BUS, exchange_name="x"),
            "exchange_name= and bus=",
        ),
        (
            lambda c, t: HeartbeatConsumer("agent1", c, inbox=INBOX, tick_interval_ms=5),
            "tick_interval_ms= and inbox=",
        ),
        (
            lambda c, t: HeartbeatConsumer("agent1", c, serve=SERVE, health_port=1),
            "health_port= and serve=",
        ),
        (
            lambda c, t: HeartbeatConsumer("agent1", c, bus=BusSettings(), tls=None),
            "tls= and bus=",  # an explicit default counts as given
        ),
        (lambda c, t: Fleet(t, URL, bus=BUS), "rabbit_url= and bus="),
        (lambda c, t: Fleet(t, inbox=INBOX, dead_letters=LIMITS), "dead_letters= and inbox="),
        (lambda c, t: Ticker(bus=BUS, declare_exchanges=True), "declare_exchanges= and bus="),
        (lambda c, t: Monitor(state_path=t / "m", bus=BUS, rabbit_url=URL), "rabbit_url= and bus="),
    ],
)
def test_old_and_new_together_are_refused(
    make: Any, match: str, config: Path, tmp_path: Path
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused before anything is announced
        with pytest.raises(TypeError, match=match):
            make(config, tmp_path)


def test_unknown_or_repeated_arguments_are_type_errors(config: Path, tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument 'rabit_url'"):
        HeartbeatConsumer("agent1", config, rabit_url=URL)
    with pytest.raises(TypeError, match="unexpected keyword argument 'health_port'"):
        Ticker(health_port=1)  # the Ticker never took it
    with pytest.raises(TypeError, match="unexpected keyword argument 'tick_interval_ms'"):
        Monitor(state_path=tmp_path / "m", tick_interval_ms=5)
    with pytest.raises(TypeError, match="multiple values for argument 'rabbit_url'"):
        HeartbeatConsumer("agent1", config, URL, rabbit_url=URL)
    with pytest.raises(TypeError, match="takes 2 deprecated positional arguments"):
        Fleet(tmp_path, URL, "ex", "third")


# --- the same run(stop=None) and run_sync() everywhere ---------------------------------------


@pytest.mark.parametrize("service", [HeartbeatConsumer, Fleet, Ticker, Monitor])
def test_every_service_runs_the_same_way(service: Any) -> None:
    run = inspect.signature(service.run)
    _self, stop, *rest = run.parameters.values()
    assert stop.name == "stop"
    assert stop.default is None
    assert all(p.kind is p.VAR_KEYWORD for p in rest)  # Monitor.run's deprecated port, host
    assert inspect.iscoroutinefunction(service.run)
    assert list(inspect.signature(service.run_sync).parameters) == ["self"]
    assert not inspect.iscoroutinefunction(service.run_sync)
    init = inspect.signature(service.__init__).parameters
    assert init["bus"].default == BusSettings()
    if "serve" in init:
        assert init["serve"].default == ServeSettings()


# --- on the broker ---------------------------------------------------------------------------


async def test_a_consumer_built_with_settings_consumes_a_tick(bus: Bus, tmp_path: Path) -> None:
    agent = bus.agent()
    config = write(tmp_path, agent, {"c": {"cadenceMs": 1, "handler": "default"}})
    results = await bus.collector(f"heartbeat.{agent}.#")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        consumer = HeartbeatConsumer(
            agent,
            config,
            bus=BusSettings(url=bus.url, exchange=bus.exchange_name),
            inbox=InboxSettings(tick_interval_ms=1000),
        )
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    try:
        await take(results, 1)  # the start-up evaluation
        await asyncio.sleep(1.1)  # the next 1 s slot
        event = tick()
        await bus.publish("system.heartbeat.tick", event)
        (result,) = await take(results, 1)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    assert result.routing_key == f"heartbeat.{agent}.c.success"
    assert orjson.loads(result.body)["correlation_ids"] == [correlation_uuid(event["event_id"])]


async def test_a_ticker_built_with_settings_runs_until_stopped(bus: Bus) -> None:
    ticks = await bus.collector("system.heartbeat.#")
    ticker = Ticker(bus=BusSettings(url=bus.url, exchange=bus.exchange_name), every_ms=200)
    stop = asyncio.Event()
    task = asyncio.create_task(ticker.run(stop))
    try:
        (first,) = await take(ticks, 1)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert orjson.loads(first.body)["payload"]["interval_ms"] == 200
    assert ticker.sent >= 1


async def test_a_fleet_built_with_settings_runs_until_stopped(bus: Bus, tmp_path: Path) -> None:
    agent = bus.agent("f")
    write(tmp_path, agent, {"c": {"cadenceMs": 3_600_000, "handler": "default"}})
    results = await bus.collector(f"heartbeat.{agent}.#")
    fleet = Fleet(
        tmp_path,
        bus=BusSettings(url=bus.url, exchange=bus.exchange_name),
        inbox=InboxSettings(tick_interval_ms=1000),
        rescan_s=3600,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(fleet.run(stop))
    try:
        (result,) = await take(results, 1)  # the agent's start-up run
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    assert result.routing_key == f"heartbeat.{agent}.c.success"
    assert fleet.agents[agent].tick_interval_ms == 1000
