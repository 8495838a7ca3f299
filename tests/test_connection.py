from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from heartbeat_consumer.cli import main
from heartbeat_consumer.connection import TlsError, TlsFiles, make_broker

SYSTEM_CA = Path(ssl.get_default_verify_paths().cafile or "/etc/ssl/certs/ca-certificates.crt")


def test_no_tls_files_means_plain_settings() -> None:
    assert not TlsFiles()
    make_broker("amqp://guest:guest@localhost:5672/", tls=None)


def test_ca_file_builds_a_verifying_context() -> None:
    if not SYSTEM_CA.exists():
        pytest.skip("no CA bundle on this machine")
    context = TlsFiles(ca_file=str(SYSTEM_CA)).context()
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
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
    assert "TLS files unusable" in err and "Traceback" not in err
