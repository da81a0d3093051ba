"""systemd's readiness protocol (sd_notify(3)), without libsystemd: one
datagram of newline-separated VAR=VALUE lines to the AF_UNIX socket named
by $NOTIFY_SOCKET.

systemd/ctstream.service is Type=notify: `systemctl start` returns, and
units ordered After= it start, only once READY=1 came, which the daemon
sends when its programs are attached (streamer/daemon.py). STOPPING=1 says
a stop began; STATUS= is the line `systemctl status` shows.

Without $NOTIFY_SOCKET (not started by systemd) nothing is sent. A socket
that refuses the datagram is logged and never fails the daemon: the
service manager's trouble is not a reason to stop tracking.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"


def socket_address(value: str | None) -> str | bytes | None:
    """The address $NOTIFY_SOCKET names: a path, or an abstract name
    ('@name', which is '\\0name' on the wire); None for what this module
    does not speak (unset, empty, vsock:...)."""
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None


def notify(*lines: str) -> bool:
    """Send `lines` (e.g. "READY=1", "STATUS=...") as one message; True if
    it was sent. Newlines inside a line would start a new variable: they
    become spaces."""
    raw = os.environ.get(NOTIFY_SOCKET_ENV)
    address = socket_address(raw)
    if address is None:
        if raw:
            log.warning("NOTIFY_SOCKET=%s: not an AF_UNIX socket; systemd is not told", raw)
        return False
    message = "\n".join(line.replace("\n", " ") for line in lines).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(message, address)
    except OSError as exc:
        log.warning("telling systemd %s through NOTIFY_SOCKET=%s failed: %s",
                    lines[0] if lines else "", raw, exc.strerror or exc)
        return False
    return True


def ready(status: str) -> bool:
    return notify("READY=1", f"STATUS={status}")


def stopping(status: str) -> bool:
    return notify("STOPPING=1", f"STATUS={status}")
