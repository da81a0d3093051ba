"""What the servers the project's scripts start (scripts/kafka.sh,
mosquitto.sh, postgres.sh) need from Python: free loopback ports to give
them, and their live processes, to check that a stop left none behind.
Shared by the demo, the benchmarks and the tests."""

from __future__ import annotations

import socket
from pathlib import Path

from ..errors import EnvironmentProblem


def free_port() -> int:
    """A loopback TCP port that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_pair() -> int:
    """A loopback port P with P + 1 free too (a Kafka broker's controller
    listens on the next port)."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    raise EnvironmentProblem("no two adjacent free loopback ports")


def live_pids(*needles: bytes, argv0: bytes = b"") -> list[int]:
    """Live (not zombie) processes whose NUL-separated command line starts
    with argv0 and contains every needle."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and cmdline.startswith(argv0) and all(n in cmdline for n in needles):
            pids.append(int(proc.name))
    return pids
