from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import orjson
import pytest

from heartbeat_consumer.bus.connection import TlsError, TlsFiles, make_broker
from heartbeat_consumer.bus.consumer import HeartbeatConsumer
from heartbeat_consumer.cli import main

from .broker import Bus, take
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

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        broker_r, broker_w = await asyncio.open_connection(upstream.hostname, upstream.port or 5672)
        await asyncio.gather(forward(client_r, broker_w), forward(broker_r, client_w))

    proxy = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
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
