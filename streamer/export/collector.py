"""The connection to an IPFIX collector, over UDP or TCP: templates as RFC
7011 asks for each transport, and `confirm()`, which says whether what was
sent got there as far as the transport can tell, so that the exporter
commits Kafka offsets only after that.

- TCP: the templates go first in each session (a connection); sequence
  numbers start again with it. confirm() waits until the collector's TCP
  has acknowledged every byte (SIOCOUTQ, the unacknowledged and unsent
  bytes, is 0) on a connection that is still up: bytes in our send buffer
  when a connection breaks are lost, and their offsets must not be
  committed. A collector that refuses the connection is an ExportError at
  once.
- UDP: the templates go at start and again every `template_interval_s`
  (a collector that restarted learns them within that time). The socket
  is connected, so that an ICMP port unreachable comes back as
  ECONNREFUSED on the next send or in SO_ERROR; confirm() waits
  UDP_SETTLE_S for such an error to arrive and fails with it. Nothing
  acknowledges a datagram: one dropped on the way (or by a full socket
  buffer at the collector) is lost once its offset is committed; the
  IPFIX sequence numbers let the collector count such losses.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import re
import socket
import struct
import termios
import time
from dataclasses import dataclass

from ..errors import ConfigError, ExportError
from .ipfix import Biflow, MessageEncoder

TRANSPORTS = ("udp", "tcp")
# Messages fit one datagram without IP fragmentation on an Ethernet path
# (1500 bytes less IPv6 and UDP headers, with room for a tunnel); RFC 7011
# forbids fragmenting exporters. TCP carries larger messages.
MAX_MESSAGE = {"udp": 1400, "tcp": 16384}
CONNECT_TIMEOUT_S = 10.0
# How long an unacknowledged TCP byte may wait before the collector counts
# as gone, and how long a UDP send waits for an ICMP error to come back
# (one round trip on a nearby network; later errors fail the next batch).
ACK_TIMEOUT_S = 30.0
UDP_SETTLE_S = 0.02
_ACK_POLL_S = (0.001, 0.05)     # first and longest pause between SIOCOUTQ reads
_TCP_STATE_UP = (1, 8)           # TCP_ESTABLISHED, TCP_CLOSE_WAIT (peer done sending)
_HOST_PORT = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9._-]+)):(?P<port>[0-9]{1,5})")


@dataclass(frozen=True)
class CollectorAddress:
    host: str
    port: int
    transport: str

    @classmethod
    def parse(cls, text: str, transport: str) -> "CollectorAddress":
        """HOST:PORT or [V6ADDR]:PORT; ConfigError naming the setting."""
        m = _HOST_PORT.fullmatch(text.strip()) if isinstance(text, str) else None
        port = int(m["port"]) if m else 0
        if not m or not 1 <= port <= 65535:
            raise ConfigError(f"collector {text!r} is not HOST:PORT (e.g. 127.0.0.1:4739, "
                              "[::1]:4739)", setting="collector")
        if transport not in TRANSPORTS:
            raise ConfigError(f"transport {transport!r} is not one of {', '.join(TRANSPORTS)}",
                              setting="transport")
        return cls(m["v6"] or m["host"], port, transport)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port} over {self.transport.upper()}"


class Collector:
    """One exporter's connection: open(), send(flows), confirm(), close().
    Errors are ExportError with what to check."""

    def __init__(self, address: CollectorAddress, domain: int, template_interval_s: float):
        self.address = address
        self.template_interval_s = template_interval_s
        self.encoder = MessageEncoder(domain, MAX_MESSAGE[address.transport])
        self.sock: socket.socket | None = None
        self.templates_at = 0.0          # time.monotonic() of the last templates sent
        self.template_messages = 0

    async def open(self) -> None:
        kind = socket.SOCK_STREAM if self.address.transport == "tcp" else socket.SOCK_DGRAM
        infos = await self._resolve(kind)
        last: OSError | None = None
        for family, _, proto, _, sockaddr in infos:
            sock = socket.socket(family, kind, proto)
            sock.setblocking(False)
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    await asyncio.get_running_loop().sock_connect(sock, sockaddr)
            except (OSError, TimeoutError) as exc:
                sock.close()
                last = exc if isinstance(exc, OSError) else OSError(errno.ETIMEDOUT, "no answer")
                continue
            self.sock = sock
            break
        if self.sock is None:
            raise ExportError(f"cannot reach the IPFIX collector at {self.address}: "
                              f"{_reason(last)}") from last
        await self.send_templates()
        await self.confirm()

    async def _resolve(self, kind: int) -> list:
        try:
            return await asyncio.get_running_loop().getaddrinfo(
                self.address.host, self.address.port, type=kind)
        except socket.gaierror as exc:
            raise ExportError(f"cannot resolve the IPFIX collector {self.address.host}: "
                              f"{exc.strerror}") from exc

    async def send_templates(self) -> None:
        await self._send([self.encoder.templates(int(time.time()))])
        self.templates_at = time.monotonic()
        self.template_messages += 1

    async def refresh_templates(self) -> None:
        """UDP: the templates again once template_interval_s has passed."""
        if self.address.transport == "udp" and \
                time.monotonic() - self.templates_at >= self.template_interval_s:
            await self.send_templates()

    async def send(self, flows: list[Biflow]) -> int:
        """Send the flows' data records (after the templates, when they are
        due: encoded first, so that sequence numbers go up on the wire);
        returns the number of messages."""
        await self.refresh_templates()
        messages = self.encoder.data(flows, int(time.time()))
        await self._send(messages)
        return len(messages)

    async def _send(self, messages: list[bytes]) -> None:
        loop = asyncio.get_running_loop()
        try:
            if self.address.transport == "tcp":
                await loop.sock_sendall(self.sock, b"".join(messages))
            else:
                for m in messages:
                    await loop.sock_sendall(self.sock, m)
        except OSError as exc:
            raise self._lost(exc) from exc

    async def confirm(self) -> None:
        """Return once what was sent is acknowledged (TCP) or drew no error
        (UDP); ExportError otherwise."""
        if self.address.transport == "udp":
            await asyncio.sleep(UDP_SETTLE_S)
            self._check_error()
            return
        deadline = time.monotonic() + ACK_TIMEOUT_S
        pause = _ACK_POLL_S[0]
        while True:
            self._check_error()
            unacked = _outq(self.sock)
            if unacked == 0 and _tcp_state(self.sock) in _TCP_STATE_UP:
                return
            if unacked == 0:
                raise ExportError(f"the IPFIX collector at {self.address} closed the connection")
            if time.monotonic() >= deadline:
                raise ExportError(f"the IPFIX collector at {self.address} did not acknowledge "
                                  f"{unacked} bytes within {ACK_TIMEOUT_S:g}s")
            await asyncio.sleep(pause)
            pause = min(pause * 2, _ACK_POLL_S[1])

    def _check_error(self) -> None:
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise self._lost(OSError(err, os.strerror(err)))

    def _lost(self, exc: OSError) -> ExportError:
        if exc.errno == errno.ECONNREFUSED and self.address.transport == "udp":
            return ExportError(f"the IPFIX collector at {self.address} is not listening "
                               "(ICMP port unreachable: connection refused)")
        return ExportError(f"sending to the IPFIX collector at {self.address} failed: "
                           f"{_reason(exc)}")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _reason(exc: OSError | None) -> str:
    if exc is None:
        return "no address"
    return os.strerror(exc.errno) if exc.errno else str(exc)


def _outq(sock: socket.socket) -> int:
    """Bytes sent but not yet acknowledged by the peer, plus those not sent."""
    buf = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    return struct.unpack("i", buf)[0]


def _tcp_state(sock: socket.socket) -> int:
    # struct tcp_info begins with tcpi_state (u8).
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
