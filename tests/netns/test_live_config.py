"""Live configuration with a real daemon and real traffic.

`ctstream events` tracks the server end of a test-bed pair; the client
makes short TCP connections, without pause, from three kinds of source
addresses (IPv4 and IPv6 each) while `ctstream config apply` switches
between two files 50 times:

    A: track-prefixes = X          every event type, timeout-fin 2
    B: ignore-prefixes = Y         new,assured,destroy, timeout-fin 3

so X is tracked under both, Y ignored under both, and Z (in neither list)
ignored under A and tracked under B. The checker proves that every packet
was classified by A or by B as a whole: an X connection is always tracked,
from its NEW to its DESTROY, and never ended as ignored; a Y connection
makes no event at all; a Z connection never carries a TCP state UPDATE (only
A emits those, and only B tracks Z: one would take B's prefixes with A's
event mask). Every tracked connection has its DESTROY. The generations the
applies print rise by one each, and `config show` reads the last one back.

Beside it: a bad file, a setting that needs a restart, and an apply with no
daemon change nothing and say why; SIGHUP re-reads --config.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import pytest

from streamer.demo import testbed
from tests.netns.test_cli import CTSTREAM, ctstream, detach_and_remove, one_error_line, start_events  # noqa: F401
from tests.wire_records import read_json_lines

pytestmark = pytest.mark.root

PAIR_INDEX = 43
APPLIES = 50
PORT = 5120
RUN_LIMIT_S = 120          # the client stops by then whatever happens
# host parts of the client's extra addresses: X tracked by both files, Y
# ignored by both, Z only tracked by B.
KINDS = {"X": 10, "Y": 20, "Z": 30}

SERVER = r"""
import socket, sys, threading
port = int(sys.argv[1])
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", port)); s.listen(512)
print("ready", flush=True)
def serve(c):
    with c:
        c.settimeout(10)
        try:
            while True:
                b = c.recv(4096)
                if not b:
                    break
                c.sendall(b)
        except OSError:
            pass
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

# Connections from each source in turn until the stop file appears (or the
# time limit): connect, 32 bytes, half-close, read the echo, close. One
# JSON line per connection: source, source port, bytes echoed.
CLIENT = r"""
import json, os, socket, sys, time
stop, limit, port = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
server = {4: sys.argv[4], 6: sys.argv[5]}
sources = json.loads(sys.argv[6])
deadline = time.monotonic() + limit
n = 0
while time.monotonic() < deadline and not os.path.exists(stop):
    kind, fam, src = sources[n % len(sources)]
    n += 1
    af = socket.AF_INET if fam == 4 else socket.AF_INET6
    try:
        with socket.socket(af, socket.SOCK_STREAM) as c:
            c.settimeout(5)
            c.bind((src, 0))
            sport = c.getsockname()[1]
            c.connect((server[fam], port))
            c.sendall(b"x" * 32)
            c.shutdown(socket.SHUT_WR)
            got = b""
            while True:
                b = c.recv(4096)
                if not b:
                    break
                got += b
        print(json.dumps([kind, fam, src, sport, len(got)]), flush=True)
    except OSError as exc:
        print(json.dumps([kind, fam, src, -1, str(exc)]), flush=True)
    time.sleep(0.004)
"""


def addr(pair, kind: str, fam: int) -> str:
    base = pair.client.ipv4.rsplit(".", 1)[0] if fam == 4 else pair.client.ipv6.rsplit(":", 1)[0]
    host = KINDS[kind]
    return f"{base}.{host}" if fam == 4 else f"{base}:{host:x}"


def files(pair, tmp_path: Path) -> tuple[Path, Path]:
    v4 = pair.client.ipv4.rsplit(".", 1)[0]
    x6, y6 = addr(pair, "X", 6), addr(pair, "Y", 6)
    a = tmp_path / "a.toml"
    a.write_text(f"""# A: only X is tracked
track-prefixes = ["{v4}.8/29", "{x6}/128"]
event-mask = ["new", "assured", "state", "destroy"]
timeout-fin = 2
timeout-syn = 5
report-interval = 0
""")
    b = tmp_path / "b.toml"
    b.write_text(f"""# B: everything but Y
ignore-prefixes = ["{v4}.16/28", "{y6}/128"]
event-mask = ["new", "assured", "destroy"]
timeout-fin = 3
timeout-syn = 6
report-interval = 0
""")
    return a, b


@pytest.fixture(scope="module")
def pair():
    with testbed.make_pair(prefix="ctslive", offloads=False, conntrack=False,
                           index=PAIR_INDEX) as p:
        for kind in KINDS:
            p.client.run(["ip", "addr", "add", f"{addr(p, kind, 4)}/24", "dev", p.client.ifname])
            p.client.run(["ip", "addr", "add", f"{addr(p, kind, 6)}/64", "dev",
                          p.client.ifname, "nodad"])
        yield p


@pytest.fixture
def pin(pin_dir, pair):
    yield pin_dir
    detach_and_remove(pin_dir)


def stats(pin: str) -> dict:
    st = ctstream("stats", "-o", "json", "--pin-dir", pin)
    assert st.returncode == 0, st.stderr
    return json.loads(st.stdout)


def show(pin: str) -> dict:
    cp = ctstream("config", "show", "--pin-dir", pin, "-o", "json")
    assert cp.returncode == 0, cp.stderr
    return json.loads(cp.stdout)


def apply(path: Path, pin: str) -> int:
    cp = ctstream("config", "apply", str(path), "--pin-dir", pin)
    assert cp.returncode == 0, cp.stderr
    last = cp.stdout.strip().splitlines()[-1]
    assert last.startswith("generation ") and last.endswith(" in force"), cp.stdout
    return int(last.split()[1])


def brief(evs: list[dict]) -> list[tuple]:
    return [(e["eventType"], e["tcpState"], e["kind"], e.get("sourceIPv4Address") or
             e.get("sourceIPv6Address"), e["sourceTransportPort"], e["flowEndReason"])
            for e in evs]


def wait_until_empty(pin: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while stats(pin)["entries"]:
        assert time.monotonic() < deadline, f"entries left: {stats(pin)}"
        time.sleep(0.5)


def test_fifty_applies_under_traffic_never_mix_the_two_sets(pair, pin, start_events, tmp_path):
    a, b = files(pair, tmp_path)
    sink = tmp_path / "events.jsonl"
    ev = start_events("--config", str(a), "--sink", f"jsonl:{sink}")
    gen0 = show(pin)["generation"]
    srv = pair.server.python(SERVER, PORT)
    assert srv.stdout.readline().strip() == b"ready"
    stop = tmp_path / "stop"
    sources = [[k, fam, addr(pair, k, fam)] for fam in (4, 6) for k in KINDS]
    client = pair.client.python(CLIENT, stop, RUN_LIMIT_S, PORT, pair.server.ipv4,
                                pair.server.ipv6, json.dumps(sources))
    try:
        time.sleep(1.0)
        gens = []
        for i in range(APPLIES):
            gens.append(apply(b if i % 2 == 0 else a, pin))
            time.sleep(0.15)
        time.sleep(0.5)
    finally:
        stop.touch()
        out, err = client.communicate(timeout=30)
    assert client.returncode == 0, err.decode()
    assert gens == list(range(gen0 + 1, gen0 + 1 + APPLIES))
    last = show(pin)
    assert last["generation"] == gens[-1]
    assert last["timeouts"]["fin"] == 2 and last["event_mask"] == ["new", "assured", "state",
                                                                  "destroy"]
    top = last["selection"]["sets"]["0"]
    assert top["default"] == "ignore" and len(top["track-prefixes"]) == 2

    conns = [json.loads(line) for line in out.decode().splitlines()]
    failed = [c for c in conns if c[3] == -1 or c[4] != 32]
    assert not failed, failed[:5]
    by_kind = defaultdict(int)
    for kind, fam, _, _, _ in conns:
        by_kind[(kind, fam)] += 1
    assert min(by_kind.values()) >= 100, by_kind      # traffic ran across the applies

    wait_until_empty(pin, 30)
    counters = stats(pin)
    rc, _, _, stderr = ev.stop(signal.SIGTERM, timeout=30)
    assert rc == 0, stderr
    records, torn = read_json_lines(sink.read_text())
    assert torn == 0

    src_kind = {addr(pair, k, fam): k for k in KINDS for fam in (4, 6)}
    flows: dict[int, list[dict]] = defaultdict(list)
    for r in records:
        if r["eventType"] in ("CREATE", "UPDATE", "DESTROY") and \
                r.get("destinationTransportPort") == PORT:
            src = r.get("sourceIPv4Address") or r.get("sourceIPv6Address")
            assert src in src_kind, r        # only the client's own connections
            r["kind"] = src_kind[src]
            flows[r["ctId"]].append(r)
    tracked = defaultdict(int)
    for ct_id, evs in flows.items():
        kind = evs[0]["kind"]
        assert kind != "Y", f"a Y connection was tracked (neither file tracks Y): {brief(evs)}"
        types = [e["eventType"] for e in evs]
        assert "DESTROY" in types, f"no DESTROY for ct {ct_id}: {brief(evs)}"
        destroy = next(e for e in evs if e["eventType"] == "DESTROY")
        if kind == "X":
            # Tracked under both: from its SYN to its end, never ignored.
            assert types[0] == "CREATE" and evs[0]["tcpState"] == "SYN_SENT", brief(evs)
            assert destroy["flowEndReason"] in (1, 3), brief(evs)
        if kind == "Z":
            # Only B tracks Z, and B emits no state UPDATEs.
            state_updates = [e for e in evs if e["eventType"] == "UPDATE"
                             and e["tcpState"] != "ESTABLISHED"]
            assert not state_updates, f"a mix: B's prefixes with A's event mask: {brief(evs)}"
        tracked[kind] += 1
    x_conns = sum(n for (k, _), n in by_kind.items() if k == "X")
    assert tracked["X"] == x_conns, (tracked, by_kind)
    assert 0 < tracked["Z"] < sum(n for (k, _), n in by_kind.items() if k == "Z"), tracked
    assert counters["ignored_packets"] > 0 and counters["ignored_bytes"] > 0


def test_bad_files_restarts_and_no_daemon_change_nothing(pair, pin, start_events, tmp_path):
    a, b = files(pair, tmp_path)
    # No daemon yet: nothing listens.
    cp = ctstream("config", "apply", str(a), "--pin-dir", pin)
    assert cp.returncode == 1 and "no daemon is running" in cp.stderr, cp.stderr
    ev = start_events("--config", str(a))
    before = show(pin)

    bad = tmp_path / "bad.toml"
    bad.write_text('timeout-fin = 2\ntrack-prefixes = ["198.18.0.0/33"]\ngrace = "soon"\n')
    cp = ctstream("config", "apply", str(bad), "--pin-dir", pin)
    assert cp.returncode == 2, cp.stderr
    lines = [ln for ln in cp.stderr.splitlines() if ln.startswith(str(bad))]
    assert [ln.split(":")[1] for ln in lines] == ["2", "3"], cp.stderr

    restart = tmp_path / "restart.toml"
    restart.write_text(a.read_text() + "table-size = 4096\n")
    cp = ctstream("config", "apply", str(restart), "--pin-dir", pin)
    assert cp.returncode == 2 and "table-size" in cp.stderr and "restart" in cp.stderr, cp.stderr

    elsewhere = tmp_path / "other-iface.toml"
    elsewhere.write_text(a.read_text() + '[interfaces.eth9]\nignore-prefixes = ["10.0.0.0/8"]\n')
    cp = ctstream("config", "apply", str(elsewhere), "--pin-dir", pin)
    assert cp.returncode == 2 and "eth9" in cp.stderr, cp.stderr
    assert show(pin) == before                              # nothing changed

    # SIGHUP: the daemon reads its own --config again.
    a.write_text(b.read_text())
    ev.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while show(pin)["generation"] == before["generation"]:
        assert time.monotonic() < deadline, "SIGHUP applied nothing"
        time.sleep(0.2)
    now = show(pin)
    assert now["generation"] == before["generation"] + 1
    assert now["timeouts"]["fin"] == 3 and now["selection"]["sets"]["0"]["default"] == "track"
    rc, _, _, stderr = ev.stop(signal.SIGTERM)
    assert rc == 0, stderr
