from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import orjson
import pytest
from aio_pika import RobustConnection

from heartbeat_consumer.bus import connection
from heartbeat_consumer.bus.connection import NodesConnection, TlsError, TlsFiles, make_broker
from heartbeat_consumer.bus.consumer import HeartbeatConsumer
from heartbeat_consumer.cli import main
from heartbeat_consumer.core.timeutil import floor_to, iso
from heartbeat_consumer.core.topology import InvalidUrl, check_url, mask_url, node_urls

from .broker import Bus, proxy_to, take
from .helpers import now_ms, slot_tick
from .requires import need_file, need_tool

SYSTEM_CA = Path(ssl.get_default_verify_paths().cafile or "/etc/ssl/certs/ca-certificates.crt")


def test_no_tls_files_means_plain_settings() -> None:
    assert not TlsFiles()
    make_broker("amqp://guest:guest@localhost:5672/", tls=None)


def test_ca_file_builds_a_verifying_context() -> None:
    need_file(SYSTEM_CA, "the system CA bundle", "apt-get install ca-certificates")
    context = TlsFiles(ca_file=str(SYSTEM_CA)).context()
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    make_broker("amqps://u:p@broker.example:5671/", tls=TlsFiles(ca_file=str(SYSTEM_CA)))


def test_unusable_tls_files_are_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(TlsError, match="TLS files unusable"):
        TlsFiles(ca_file=str(tmp_path / "missing.pem")).context()
    (tmp_path / "garbage.pem").write_text("not a certificate")
    with pytest.raises(TlsError):
        TlsFiles(cert_file=str(tmp_path / "garbage.pem")).context()
    assert main(["tick", "--ca-file", str(tmp_path / "missing.pem")]) == 1
    err = capsys.readouterr().err
    assert "TLS files unusable" in err
    assert "Traceback" not in err


def _make_ca_and_server_cert(directory: Path, openssl: str) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for localhost, made with the openssl CLI."""
    ca_key, ca_crt = directory / "ca.key", directory / "ca.crt"
    key, csr, crt = directory / "server.key", directory / "server.csr", directory / "server.crt"
    ext = directory / "ext.cnf"
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    steps = [
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
         "-keyout", str(ca_key), "-out", str(ca_crt)],
        ["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
         "-keyout", str(key), "-out", str(csr)],
        ["x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key),
         "-CAcreateserial", "-days", "1", "-extfile", str(ext), "-out", str(crt)],
    ]  # fmt: skip
    for step in steps:
        subprocess.run([openssl, *step], check=True, capture_output=True)
    return ca_crt, crt, key


async def test_amqps_with_a_private_ca_end_to_end(bus: Bus, tmp_path: Path) -> None:
    """A TLS proxy with a private CA in front of the broker: the consumer connects over
    amqps:// with --ca-file, and a plain default context would refuse it."""
    openssl = need_tool("openssl", "makes a private CA for the TLS test", "apt-get install openssl")
    ca, crt, key = _make_ca_and_server_cert(tmp_path, openssl)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(crt, key)
    upstream = urlsplit(bus.url)
    proxy, _ = await proxy_to(bus.url, tls=server_ctx)
    port = proxy.sockets[0].getsockname()[1]
    url = f"amqps://{upstream.username}:{upstream.password}@localhost:{port}/"
    agent = bus.agent()
    config = tmp_path / f"{agent}.heartbeat.json"
    config.write_bytes(
        orjson.dumps({"agent": agent, "checks": {"c": {"cadenceMs": 1, "handler": "default"}}})
    )
    results = await bus.collector(f"heartbeat.{agent}.c.*")
    try:
        plain = HeartbeatConsumer(agent, config, url, bus.exchange_name, state_path=tmp_path / "s1")
        with pytest.raises(Exception):  # noqa: B017 - the certificate is not trusted
            await asyncio.wait_for(plain.broker.connect(), 10)
        with contextlib.suppress(Exception):
            await plain.broker.stop()
        consumer = HeartbeatConsumer(
            agent, config, url, bus.exchange_name,
            state_path=tmp_path / "s2", tls=TlsFiles(ca_file=str(ca)),
        )  # fmt: skip
        await consumer.start()
        try:
            (result,) = await take(results, 1)
            assert result.routing_key == f"heartbeat.{agent}.c.success"
        finally:
            await consumer.stop()
    finally:
        proxy.close()


# --- a list of broker nodes --------------------------------------------------------------


def test_a_url_may_list_the_nodes_of_a_cluster() -> None:
    two = "amqp://u:p1@a:5672/, amqps://u:p2@b:5671/v"
    assert node_urls(two) == ["amqp://u:p1@a:5672/", "amqps://u:p2@b:5671/v"]
    assert check_url(two) == two
    assert mask_url(two) == "amqp://u:***@a:5672/,amqps://u:***@b:5671/v"
    # A comma splits only before a scheme: a password with one stays whole, and masked.
    assert node_urls("amqp://u:pa,ss@a/") == ["amqp://u:pa,ss@a/"]
    assert mask_url("amqp://u:pa,ss@a/") == "amqp://u:***@a/"
    with pytest.raises(InvalidUrl, match=r"amqp://u:\*\*\*@b:0/ has port 0"):
        check_url("amqp://u:p1@a/,amqp://u:secret@b:0/")
    with pytest.raises(InvalidUrl, match="empty"):
        check_url(" ")
    for wrong in ("amqp://u:p1@a/;amqp://u:p2@b/", "amqp://u:p1@a/ amqp://u:p2@b/"):
        with pytest.raises(InvalidUrl, match="separate the nodes of a cluster with commas") as e:
            check_url(wrong)
        assert "p2" not in str(e.value) and "p1" not in str(e.value)
    assert node_urls("amqp://u:p@a/,AMQP://u:p@b/") == ["amqp://u:p@a/", "AMQP://u:p@b/"]


def test_with_tls_files_every_node_must_be_amqps(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("")  # not read: the URLs are refused first
    with pytest.raises(InvalidUrl, match="every node must be amqps://"):
        make_broker("amqps://u:p@a/,amqp://u:p@b/", tls=TlsFiles(ca_file=str(ca)))


def test_the_connection_attempt_that_a_node_list_wraps_exists() -> None:
    """NodesConnection wraps aio-pika's private attempt method: an aio-pika that renames
    it fails here, not by connecting to the first node only."""
    assert callable(getattr(RobustConnection, connection._CONNECT_TRANSPORT, None))
    broker = make_broker("amqp://guest:guest@127.0.0.1:1/,amqp://guest:guest@127.0.0.1:2/")
    made = broker._connection_kwargs["connection_class"]
    assert issubclass(made, NodesConnection)
    assert made.node_list == ("amqp://guest:guest@127.0.0.1:1/", "amqp://guest:guest@127.0.0.1:2/")
    assert "connection_class" not in make_broker()._connection_kwargs


async def test_a_consumer_takes_the_first_node_that_answers_and_moves_on_when_it_goes(
    bus: Bus, tmp_path: Path
) -> None:
    """Nodes: a port nobody listens on, a proxy to the broker (a node that will go away),
    the broker itself. The consumer connects through the proxy; when the proxy and its
    connections go, it reconnects to the broker and goes on answering ticks."""
    upstream = urlsplit(bus.url)
    proxy, connections = await proxy_to(bus.url)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: refused
    user = f"{upstream.username}:{upstream.password}"
    nodes = [
        f"amqp://{user}@127.0.0.1:{port}/"
        for port in (closed.getsockname()[1], proxy.sockets[0].getsockname()[1])
    ] + [bus.url]
    agent = bus.agent()
    config = tmp_path / f"{agent}.heartbeat.json"
    config.write_bytes(
        orjson.dumps({"agent": agent, "checks": {"c": {"cadenceMs": 1, "handler": "default"}}})
    )
    results = await bus.collector(f"heartbeat.{agent}.c.success")
    consumer = HeartbeatConsumer(
        agent, config, ",".join(nodes), bus.exchange_name, state_path=tmp_path / "s"
    )
    try:
        await consumer.start()
        await take(results, 1)  # the start-up run, through the proxy
        connection = await consumer.broker.connect()
        assert isinstance(connection, NodesConnection) and connection.node == 1
        assert connections, "the consumer did not connect through the second node"
        proxy.close()
        for writer in connections:
            writer.close()
        for _ in range(150):  # the reconnect interval is 5 s
            await asyncio.sleep(0.1)
            if connection.node == 2 and (await consumer.health()).ok:
                break
        assert connection.node == 2, "the consumer did not move to the third node"
        tick = slot_tick(floor_to(now_ms(), 60_000) + 60_000)  # the start-up run's next slot
        await bus.publish("system.heartbeat.tick", tick)
        (answer,) = await take(results, 1)  # answered through the third node
        assert orjson.loads(answer.body)["payload"]["slot"].startswith(iso(tick["timestamp"])[:16])
    finally:
        await consumer.stop()
        closed.close()
        proxy.close()


def test_a_node_list_that_cannot_be_reached_is_one_line_without_passwords() -> None:
    from heartbeat_consumer.bus.connection import describe_connect_error

    two = "amqp://u:s3cret@a/v,amqp://u:s3cret@b/v"
    text = describe_connect_error(two, ConnectionRefusedError(111, "refused"))
    assert "s3cret" not in text and "\n" not in text
    assert text.startswith("cannot reach RabbitMQ at amqp://u:***@a/v,amqp://u:***@b/v")
    refused = describe_connect_error(two, ConnectionError("ACCESS_REFUSED"))
    assert "user 'u'" in refused and "s3cret" not in refused
