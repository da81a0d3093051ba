"""The real `ctstream` command as a subprocess, against a network namespace.

`events` attaches to the server's veth of a test-bed pair, real traffic
runs, `list` and `stats` read the pinned maps beside it, and a signal ends
it; afterwards nothing may be left: no pins, no XDP program, no clsact
qdisc, no attachment record. Bad input fails with one line on stderr and
leaves nothing behind either; `detach` cleans up after a SIGKILLed `events`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from streamer.demo import testbed
from streamer.datapath.loader import STATE_DIR
from tests.wire_records import flow_key, read_json_lines

pytestmark = pytest.mark.root

CTSTREAM = str(Path(sys.executable).with_name("ctstream"))
ATTACH_TIMEOUT = 30  # compile (BCC) + load + attach
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def state_file(pin_dir: str, suffix: str) -> Path:
    return STATE_DIR / (pin_dir.strip("/").replace("/", "_") + suffix)


def ctstream(*args: str, prefix: tuple[str, ...] = (), timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, CTSTREAM, *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout)


def xdp_attached(host: testbed.Host) -> bool:
    return "xdp" in host.run(["ip", "link", "show", host.ifname]).stdout


def clsact_present(host: testbed.Host) -> bool:
    return "clsact" in host.run(["tc", "qdisc", "show", "dev", host.ifname]).stdout


def assert_nothing_left(host: testbed.Host, pin_dir: str) -> None:
    assert not os.path.exists(pin_dir), f"{pin_dir} still exists: {os.listdir(pin_dir)}"
    assert not xdp_attached(host), host.run(["ip", "link", "show", host.ifname]).stdout
    assert not clsact_present(host), host.run(["tc", "qdisc", "show", "dev", host.ifname]).stdout
    assert not state_file(pin_dir, ".json").exists(), "attachment record left behind"


def one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("ctstream: error: "), stderr
    return lines[0]


@pytest.fixture(scope="module")
def pair():
    assert os.access(CTSTREAM, os.X_OK), f"{CTSTREAM} is not installed (pip install -e .)"
    with testbed.make_pair(prefix="ctscli", offloads=False, conntrack=False, index=2) as p:
        yield p


@pytest.fixture
def pin(pin_dir, pair):
    """A private pin dir; whatever a failed test left attached or pinned
    there is detached and removed afterwards."""
    yield pin_dir
    detach_and_remove(pin_dir)


def detach_and_remove(pin_dir: str) -> None:
    """Detach whatever a test left attached at pin_dir and remove its pins and
    state files (the daemon's flock file stays by design; do not pile them up)."""
    if os.path.exists(pin_dir) or state_file(pin_dir, ".json").exists():
        with contextlib.suppress(subprocess.TimeoutExpired):
            ctstream("detach", "--pin-dir", pin_dir, timeout=30)
    shutil.rmtree(pin_dir, ignore_errors=True)
    state_file(pin_dir, ".json").unlink(missing_ok=True)
    state_file(pin_dir, ".lock").unlink(missing_ok=True)


class Events:
    """A running `ctstream events` whose stderr has been read up to the
    line that says it is attached."""

    def __init__(self, proc: subprocess.Popen, early_stderr: bytes):
        self.proc = proc
        self.early_stderr = early_stderr

    def stop(self, sig: int, timeout: float = 10) -> tuple[int, float, list[dict], str]:
        """Send `sig`, wait; returns (exit code, seconds to exit, the wire
        records of stdout, each checked with wire.validate, stderr)."""
        t0 = time.monotonic()
        self.proc.send_signal(sig)
        out, err = self.proc.communicate(timeout=timeout)
        took = time.monotonic() - t0
        objs, torn = read_json_lines(out.decode())
        assert torn == 0, out.decode()[-2000:]
        return self.proc.returncode, took, objs, (self.early_stderr + err).decode(errors="replace")


@pytest.fixture
def start_events(pair, pin):
    procs: list[subprocess.Popen] = []

    def start(*extra: str) -> Events:
        argv = [CTSTREAM, "events", "-n", pair.server.netns, "-i", pair.server.ifname,
                "--egress", "-o", "json", "--pin-dir", pin, *extra]
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, bufsize=0)
        procs.append(p)
        fd, buf = p.stderr.fileno(), b""
        deadline = time.monotonic() + ATTACH_TIMEOUT
        while b"tracking on" not in buf:
            left = deadline - time.monotonic()
            assert left > 0, f"not attached after {ATTACH_TIMEOUT} s: {buf.decode()}"
            r, _, _ = select.select([fd], [], [], left)
            chunk = os.read(fd, 65536) if r else b""
            if r and not chunk:
                p.wait(timeout=10)
                pytest.fail(f"ctstream events exited (rc={p.returncode}): {buf.decode()}")
            buf += chunk
        return Events(p, buf)

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.communicate(timeout=10)


# --- a whole session ----------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_events_list_stats_then_signal(pair, pin, start_events, sig):
    ev = start_events()
    assert xdp_attached(pair.server) and clsact_present(pair.server)
    assert os.path.isdir(pin)

    sport, _ = pair.tcp_exchange(2_000, 6_000, family=4)
    uport = pair.udp_exchange(2, 100, family=6)
    echo_id = pair.ping(1, family=4)
    tcp = (4, "tcp", pair.client.ipv4, pair.server.ipv4, sport, 5001)
    udp = (6, "udp", pair.client.ipv6, pair.server.ipv6, uport, 5002)
    icmp = (4, "icmp", pair.client.ipv4, pair.server.ipv4, echo_id, echo_id)

    ls = ctstream("list", "-o", "json", "--pin-dir", pin)
    assert ls.returncode == 0, ls.stderr
    live = {(e["family"], e["proto"], e["src"], e["dst"], e["sport"], e["dport"]): e
            for e in map(json.loads, ls.stdout.splitlines())}
    assert set(live) == {tcp, udp, icmp}
    t = live[tcp]
    assert t["state"] == "TIME_WAIT" and t["assured"]
    assert t["packets_orig"] >= 5 and t["packets_reply"] >= 5
    assert t["bytes_orig"] > 2_000 and t["bytes_reply"] > 6_000  # payload + headers
    assert (live[udp]["packets_orig"], live[udp]["packets_reply"]) == (2, 2)
    assert live[udp]["bytes_orig"] == live[udp]["bytes_reply"] == 2 * (40 + 8 + 100)
    assert (live[icmp]["packets_orig"], live[icmp]["packets_reply"]) == (1, 1)

    st = ctstream("stats", "-o", "json", "--pin-dir", pin)
    assert st.returncode == 0, st.stderr
    stats = json.loads(st.stdout)
    assert stats["created"] == 3 and stats["entries"] == 3
    assert stats["packets"] >= sum(e["packets_orig"] + e["packets_reply"] for e in live.values())

    rc, took, objs, err = ev.stop(sig)
    assert rc == 0, err
    assert took < 5
    assert "Traceback" not in err
    # -o json writes the Kafka records: CREATE, nodeId (the host name by default)
    new = {flow_key(o): o for o in objs if o["eventType"] == "CREATE"}
    assert set(new) == {tcp, udp, icmp}
    assert {o["nodeId"] for o in objs} == {socket.gethostname()}
    for k, e in live.items():
        assert new[k]["ctId"] == e["ct_id"] and new[k]["seq"] == 0
    assert_nothing_left(pair.server, pin)


def test_detach_after_sigkill(pair, pin, start_events):
    ev = start_events()
    pair.ping(1, family=6)
    ev.proc.kill()
    ev.proc.wait(timeout=10)
    # a killed process leaves everything in place ...
    assert os.path.isdir(pin) and xdp_attached(pair.server) and clsact_present(pair.server)
    assert state_file(pin, ".json").exists() and state_file(pin, ".ctl").exists()
    # ... until `ctstream detach` removes it (the control socket nobody listens at too)
    res = ctstream("detach", "--pin-dir", pin)
    assert res.returncode == 0, res.stderr
    assert "detached 2 program(s)" in res.stderr
    assert_nothing_left(pair.server, pin)
    assert not state_file(pin, ".ctl").exists()


# --- bad input -----------------------------------------------------------------------


def _events(ns, pin, *extra):
    return ["events", "-n", ns, "-i", "veth0", "--egress", "--pin-dir", pin, *extra]


# (id, argv from (server netns, pin dir), what the error line must mention,
# "{pin}" standing for the pin dir, exit status: 2 for a bad value, 1 for a
# failure of the environment)
BAD_INPUT = [
    ("unknown-interface",
     lambda ns, pin: ["events", "-n", ns, "-i", "nosuchif0", "--pin-dir", pin], "nosuchif0", 1),
    ("unknown-netns",
     lambda ns, pin: _events("ctsnosuchns0", pin), "ctsnosuchns0", 1),
    ("negative-timeout", lambda ns, pin: _events(ns, pin, "--timeout-udp", "-5"), "udp", 2),
    ("zero-timeout", lambda ns, pin: _events(ns, pin, "--timeout-icmp", "0"), "icmp", 2),
    ("nan-timeout", lambda ns, pin: _events(ns, pin, "--timeout-fin", "nan"), "fin", 2),
    ("ring-not-power-of-two", lambda ns, pin: _events(ns, pin, "--ring-size", "5000"),
     "power of two", 2),
    ("list-nothing-pinned", lambda ns, pin: ["list", "-o", "json", "--pin-dir", pin], "{pin}", 1),
    ("stats-nothing-pinned", lambda ns, pin: ["stats", "-o", "json", "--pin-dir", pin], "{pin}", 1),
]


@pytest.mark.parametrize("argv,mention,code", [(a, m, c) for _, a, m, c in BAD_INPUT],
                         ids=[i for i, _, _, _ in BAD_INPUT])
def test_bad_input_fails_with_one_line_and_leaves_nothing(pair, pin, argv, mention, code):
    res = ctstream(*argv(pair.server.netns, pin))
    assert res.returncode == code, res.stderr
    assert mention.format(pin=pin) in one_error_line(res.stderr)
    assert res.stdout == ""
    assert_nothing_left(pair.server, pin)


def test_run_on_an_unknown_interface_touches_neither_kafka_nor_the_spool(pair, pin, tmp_path):
    """The interface is checked first: no word about Kafka (port 1 on
    loopback answers nobody), no spool directory made."""
    spool = tmp_path / "spool"
    res = ctstream("run", "-n", pair.server.netns, "-i", "nosuchif0", "--pin-dir", pin,
                   "--kafka", "127.0.0.1:1", "--topic", "t", "--spool", str(spool))
    assert res.returncode == 1, res.stderr
    assert "nosuchif0" in one_error_line(res.stderr)
    assert "Kafka" not in res.stderr
    assert not spool.exists()
    assert_nothing_left(pair.server, pin)


def test_timeout_that_is_not_a_number_is_an_argparse_error(pair, pin):
    res = ctstream(*_events(pair.server.netns, pin, "--timeout-syn", "abc"))
    assert res.returncode == 2
    last = res.stderr.strip().splitlines()[-1]
    assert re.match(r"ctstream( events)?: error: argument --timeout-syn: .*'abc'", last), res.stderr
    assert_nothing_left(pair.server, pin)


def test_not_root(pair, pin):
    """Refused before anything is made, the lock file included."""
    res = ctstream("events", "-i", "lo", "--pin-dir", pin, prefix=tuple(NOBODY))
    assert res.returncode == 1
    assert "needs root" in one_error_line(res.stderr)
    assert not state_file(pin, ".lock").exists()
    assert_nothing_left(pair.server, pin)
