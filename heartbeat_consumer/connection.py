"""Making the broker connection: URL, TLS files, graceful timeout (one place for all)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from faststream.rabbit import RabbitBroker
from faststream.security import BaseSecurity

from .topology import DEFAULT_URL

__all__ = ["TlsFiles", "make_broker"]


class TlsError(Exception):
    """A CA, certificate or key file cannot be used."""


@dataclass(frozen=True)
class TlsFiles:
    """For ``amqps://`` with a private CA and/or client certificates."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def __bool__(self) -> bool:
        return any((self.ca_file, self.cert_file, self.key_file))

    def context(self) -> ssl.SSLContext:
        try:
            context = ssl.create_default_context(cafile=self.ca_file)
            if self.cert_file:
                context.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise TlsError(f"TLS files unusable ({self}): {exc}") from None
        return context


def make_broker(
    url: str = DEFAULT_URL,
    *,
    tls: TlsFiles | None = None,
    graceful_timeout_s: float | None = None,
) -> RabbitBroker:
    security = BaseSecurity(ssl_context=tls.context(), use_ssl=True) if tls else None
    return RabbitBroker(
        url, security=security, graceful_timeout=graceful_timeout_s, logger=None, fail_fast=True
    )
