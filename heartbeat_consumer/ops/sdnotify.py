"""systemd's notify protocol (``Type=notify``, ``WatchdogSec=``), without a dependency.

The protocol (sd_notify(3)): send newline-separated ``KEY=VALUE`` assignments as one
datagram to the AF_UNIX socket named by ``$NOTIFY_SOCKET`` (a leading ``@`` means the
abstract namespace). ``$WATCHDOG_USEC`` asks for ``WATCHDOG=1`` more often than that;
``$WATCHDOG_PID``, when set, names the process that must send them. Outside systemd
(no ``$NOTIFY_SOCKET``) every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket

__all__ = ["notify", "watchdog_interval_s"]

log = logging.getLogger("heartbeat_consumer.sdnotify")

_warned = False


def _address() -> str | None:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return None
    return "\0" + path[1:] if path.startswith("@") else path


def notify(*assignments: str) -> bool:
    """Send ``READY=1``, ``WATCHDOG=1``, ``STATUS=...``, ``STOPPING=1``; True when sent.

    Never blocks the event loop: a full receive queue drops the message (logged once)."""
    global _warned
    address = _address()
    if address is None:
        return False
    message = "\n".join(a.replace("\n", " ") for a in assignments).encode()
    try:
        with socket.socket(
            socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
        ) as sock:
            sock.sendto(message, address)
    except OSError as exc:
        if not _warned:
            log.warning("systemd notification to %s failed: %s", address.lstrip("\0"), exc)
            _warned = True
        return False
    return True


def watchdog_interval_s() -> float | None:
    """How often to send ``WATCHDOG=1`` (half of ``$WATCHDOG_USEC``), or None."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid.isdigit() and int(pid) != os.getpid()):
        return None
    return int(usec) / 2_000_000
