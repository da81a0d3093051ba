#!/usr/bin/env python3
"""Is the broker at HOST:PORT serving? Used by scripts/kafka.sh to decide
readiness; standard library only, so it runs before the venv exists.

A KRaft broker opens its listener before it has caught up with the metadata
log, so an accepted connection proves little. This asks ApiVersions (v0, which
every broker answers) for the Metadata versions it supports, then sends a
Metadata request for no topics and succeeds only when the answer lists a
broker on PORT and names an active controller.

Exit status: 0 ready; 1 not ready (reason on stderr); 2 bad usage.
"""

from __future__ import annotations

import socket
import struct
import sys

API_METADATA = 3
API_VERSIONS = 18
# Metadata v4..v8 share the request fields we send (v8 adds two booleans) and
# the response prefix we read; v9 and later use the flexible encoding.
METADATA_MIN, METADATA_MAX = 4, 8
CLIENT_ID = b"ctstream-probe"


class NotReady(Exception):
    pass


def _request(sock: socket.socket, api_key: int, version: int, corr: int, body: bytes) -> bytes:
    header = struct.pack(">hhih", api_key, version, corr, len(CLIENT_ID)) + CLIENT_ID
    payload = header + body
    sock.sendall(struct.pack(">i", len(payload)) + payload)
    size = struct.unpack(">i", _read(sock, 4))[0]
    reply = _read(sock, size)
    if struct.unpack(">i", reply[:4])[0] != corr:
        raise NotReady("reply with a foreign correlation id")
    return reply[4:]


def _read(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise NotReady("connection closed by the broker")
        buf += chunk
    return buf


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, fmt: str):
        vals = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return vals if len(vals) > 1 else vals[0]

    def string(self) -> str | None:
        n = self.take(">h")
        if n < 0:
            return None
        s = self.data[self.pos:self.pos + n].decode()
        self.pos += n
        return s


def metadata_version(sock: socket.socket) -> int:
    r = _Reader(_request(sock, API_VERSIONS, 0, 1, b""))
    error = r.take(">h")
    if error:
        raise NotReady(f"ApiVersions error code {error}")
    for _ in range(r.take(">i")):
        key, lo, hi = r.take(">hhh")
        if key == API_METADATA:
            if lo > METADATA_MAX or hi < METADATA_MIN:
                raise NotReady(f"broker speaks Metadata v{lo}..v{hi} only; probe speaks v4..v8")
            return min(hi, METADATA_MAX)
    raise NotReady("broker does not offer the Metadata API")


def probe(host: str, port: int, timeout: float) -> str:
    with socket.create_connection((host, port), timeout=timeout) as sock:
        version = metadata_version(sock)
        body = struct.pack(">i?", 0, False)  # no topics; no auto-creation
        if version >= 8:
            body += struct.pack(">??", False, False)
        r = _Reader(_request(sock, API_METADATA, version, 2, body))
        r.take(">i")  # throttle_time_ms
        ports = []
        for _ in range(r.take(">i")):
            r.take(">i")  # node id
            r.string()  # host
            ports.append(r.take(">i"))
            r.string()  # rack
        cluster_id = r.string()
        controller = r.take(">i")
    if port not in ports:
        raise NotReady(f"no broker on port {port} in the metadata yet (brokers on {ports})")
    if controller < 0:
        raise NotReady("no active controller yet")
    return f"cluster {cluster_id}, controller {controller}"


def main(argv: list[str]) -> int:
    if len(argv) not in (3, 4):
        print(f"usage: {argv[0]} HOST PORT [TIMEOUT_S]", file=sys.stderr)
        return 2
    host, port = argv[1], int(argv[2])
    timeout = float(argv[3]) if len(argv) == 4 else 2.0
    try:
        print(probe(host, port, timeout))
    except (OSError, NotReady, struct.error, UnicodeDecodeError) as exc:
        print(f"not ready: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
