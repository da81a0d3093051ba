"""A requested stop of `ctstream run` gives up nothing: `systemctl restart`
and upgrades lose no flow.

Long TCP connections are open through the tracker; the daemon is stopped
with SIGTERM (as systemd stops it), the connections carry traffic while no
daemon runs, a new daemon adopts the pinned table, and the connections then
close. Each must have exactly one logical DESTROY in Kafka with the kernel's
own counters. `--detach-on-stop` is the explicit way out: it leaves nothing
attached or pinned. Bounds are bounds, never measurements.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid

import pytest

from streamer.demo import testbed
from tests.kafka.pipeline_support import (
    TopicContents,
    check_tcp_connections,
    check_topic,
    make_pipeline,
    read_topic,
    report,
)
from tests.netns.test_reliability import kernel_flows, wait_drained, xdp_attached

PARTITIONS = 3
PAIR_INDEX = 32           # 198.18.32.0/24, 2001:2:0:20::/64 (the index in hex)
PORT = 5031
CONNECTIONS = 20          # per family
LONG = ["--timeout-established", "120"]   # none may expire while the test runs

# An echo server: every connection is echoed until the client closes it.
_SERVER = r"""
import selectors, socket, sys
sel = selectors.DefaultSelector()
for fam, addr in ((socket.AF_INET, sys.argv[2]), (socket.AF_INET6, sys.argv[3])):
    ls = socket.socket(fam, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if fam == socket.AF_INET6:
        ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    ls.bind((addr, int(sys.argv[4])))
    ls.listen(128)
    sel.register(ls, selectors.EVENT_READ, "listen")
print("ready", flush=True)
while True:
    for key, _ in sel.select(timeout=120):
        if key.data == "listen":
            conn, _ = key.fileobj.accept()
            sel.register(conn, selectors.EVENT_READ, "conn")
            continue
        data = key.fileobj.recv(65536)
        if data:
            key.fileobj.sendall(data)
        else:
            sel.unregister(key.fileobj)
            key.fileobj.close()
"""

# The client: opens n connections per family and exchanges `size` bytes on
# each, then obeys stdin: "send SIZE" exchanges again, "close" closes all
# (client FIN first). Prints one JSON line per command.
_CLIENT = r"""
import json, socket, sys
n, port = int(sys.argv[3]), int(sys.argv[4])
conns = []
for fam, addr in ((socket.AF_INET, sys.argv[1]), (socket.AF_INET6, sys.argv[2])):
    for _ in range(n):
        s = socket.create_connection((addr, port), timeout=10)
        conns.append((4 if fam == socket.AF_INET else 6, s))

def exchange(size):
    for _, s in conns:
        s.sendall(b"x" * size)
        got = 0
        while got < size:
            chunk = s.recv(size - got)
            if not chunk:
                raise SystemExit("server closed early")
            got += len(chunk)

exchange(100)
print(json.dumps([[fam, s.getsockname()[1]] for fam, s in conns]), flush=True)
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "send":
        exchange(int(cmd[1]))
    elif cmd[0] == "close":
        for _, s in conns:
            s.close()
    print(json.dumps(cmd), flush=True)
    if cmd[0] == "close":
        break
"""


class LongConnections:
    """CONNECTIONS per family held open between the pair's hosts."""

    def __init__(self, pair: testbed.Pair):
        self.server = pair.server._server(_SERVER, "-", pair.server.addr(4),
                                          pair.server.addr(6), PORT)
        self.client = pair.client.python(_CLIENT, pair.server.addr(4), pair.server.addr(6),
                                         CONNECTIONS, PORT, stdin=subprocess.PIPE)
        self.ports = {4: [], 6: []}
        for fam, port in json.loads(self._line()):
            self.ports[fam].append(port)

    def _line(self) -> str:
        line = testbed._read_line(self.client, 30)
        if not line:
            err = self.client.stderr.read().decode(errors="replace")
            pytest.fail(f"long-connection client failed: {err}")
        return line.decode()

    def command(self, text: str) -> None:
        self.client.stdin.write(text.encode() + b"\n")
        self.client.stdin.flush()
        assert json.loads(self._line()) == text.split()

    def close(self) -> None:
        for p in (self.client, self.server):
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)


def pins(pin: str) -> list[str]:
    return sorted(os.listdir(pin)) if os.path.isdir(pin) else []


@pytest.mark.root
@pytest.mark.kafka
def test_sigterm_and_restart_keep_every_long_connection(pin_dir, tmp_path, kafka_broker):
    node = f"ctsrestart-{uuid.uuid4().hex[:8]}"
    topic = f"ctstream.restart.{uuid.uuid4().hex[:12]}"
    kafka_broker.topic_create(topic, PARTITIONS)
    with make_pipeline(pin_dir, tmp_path, PAIR_INDEX, node) as pipe:
        pair = pipe.pair
        first = pipe.start(kafka_broker.bootstrap, topic, *LONG)
        conns = LongConnections(pair)
        try:
            pipe.wait_status("the connections' CREATEs acked by Kafka",
                             lambda st: st["kafka_acked"] >= 2 * CONNECTIONS, 30)
            tracked = pipe.stats()["entries"]
            assert tracked >= 2 * CONNECTIONS, pipe.stats()

            rc, _ = first.terminate(timeout=60)               # systemctl stop/restart
            assert rc == 0, first.output()[-3000:]
            assert "stay attached and the maps pinned" in first.output(), first.output()
            assert xdp_attached(pair.server), "a stopped daemon detached XDP"
            assert pins(pipe.pin), "a stopped daemon removed its pins"
            alone = pipe.stats()
            assert alone["entries"] == tracked, (tracked, alone)

            conns.command("send 3000")       # traffic with no daemon: the kernel counts it
            second = pipe.start(kafka_broker.bootstrap, topic, *LONG)
            assert "(adopted the pinned table)" in second.output(), second.output()
            conns.command("send 500")
            conns.command("close")
        finally:
            conns.close()
        stats = wait_drained(pipe.pin, timeout=60)
        pipe.wait_spool_drained(60)
        kernel = kernel_flows(pair)
        contents = TopicContents(read_topic(kafka_broker.bootstrap, topic, PARTITIONS))
        figures = check_topic(contents, node)     # one DESTROY seq per connection, one ct_id per flow

        # The explicit way out: --detach-on-stop leaves nothing behind.
        rc, _ = second.terminate(timeout=60)
        assert rc == 0, second.output()[-3000:]
        third = pipe.start(kafka_broker.bootstrap, topic, *LONG, "--detach-on-stop")
        rc, _ = third.terminate(timeout=60)
        assert rc == 0, third.output()[-3000:]
        assert not xdp_attached(pair.server) and pins(pipe.pin) == [], pins(pipe.pin)

    for fam in (4, 6):
        check_tcp_connections(contents, pair, fam, conns.ports[fam], PORT, kernel)
    assert figures["connections"] == 2 * CONNECTIONS, figures
    assert stats["created"] == stats["destroyed"] == 2 * CONNECTIONS, stats
    report("restart", {"connections": 2 * CONNECTIONS, **figures})
