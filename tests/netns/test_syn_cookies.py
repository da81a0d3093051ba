"""SYN cookies under a spoofed SYN flood, with real connections before and
during it (issue: SYN cookies in XDP).

The server end of a test-bed pair runs the datapath with syn-cookies on
(XDP and tc egress, the host use). hping3 sends SYNs from random sources
(--rand-source) to the server's listening port as fast as it can for 20 s;
XDP answers each with a cookie SYN-ACK (XDP_TX), which the client's
namespace drops (the spoofed addresses are not its own). Real connections
from the client, IPv4 and IPv6, with the client's timestamps and window
scaling on and off (its sysctls, per batch), run before and during the
flood: each sends 16 KiB of random bytes and checks the echo.

Checked:
- the flood created no entry and no event: every event belongs to a real
  connection, and the table never held more than they;
- every real connection completed, its data came back intact, and it was
  tracked from its cookie ACK to its DESTROY (one ct_id, NEW already
  ESTABLISHED and ASSURED, reason fin) with the counters of the client's own
  conntrack, which saw the whole handshake: the SYN and SYN-ACK that XDP
  answered and sent are in ours too, with the SYN's own length and time
  (the handshake map; no handshake fell back to the cookie's estimate), and
  the NEW's start time lies within the client's connect();
- the sysctls the daemon set (tcp_syncookies=2, tcp_timestamps=2) are back
  to the namespace's own values after it stopped.

The reference is the client's conntrack, not the server's: XDP_TX bypasses
the server's netfilter, which then picks each connection up from its ACK,
and under the flood a picked-up connection's first packets can arrive in
one receive batch, each making its own unconfirmed conntrack; the later
ones are dropped at confirmation (seen as SKB_DROP_REASON_NETFILTER_DROP),
after XDP counted them. Bounded: 20 s of flood, 10 million SYNs at most.
"""

from __future__ import annotations

import asyncio
import collections
import json
import signal
import socket
import subprocess
from dataclasses import dataclass, field

import pytest

from streamer.daemon import Session, Target
from streamer.datapath.config import DatapathConfig, Timeouts
from streamer.datapath.events import Event
from streamer.demo import testbed
from tests.netns.test_cli import ctstream, detach_and_remove, start_events  # noqa: F401
from tests.netns.test_live_config import SERVER, stats   # SERVER: an echo server, IPv4 and IPv6
from tests.netns.test_tracking import key, recorded_run
from tests.wire_records import read_json_lines

pytestmark = pytest.mark.root

PAIR_INDEX = 47
PORT = 5140
FLOOD_S = 20
FLOOD_MAX = 10_000_000
CLOCK_SLACK_MS = 5
LIMIT = 16384
TIMEOUTS = Timeouts(syn=8, established=30, fin=2, udp=5, icmp=5, other=5)
# (timestamps, window scaling) of the client, by sysctl, one batch each.
VARIANTS = [(1, 1), (1, 0), (0, 1), (0, 0)]
PER_BATCH = 16               # connections per variant, family and phase: 256 in all
PAYLOAD = 16384

# count connections to host:port, one at a time: PAYLOAD random bytes up,
# half-close, the echo back, compared. One JSON line: source ports and errors.
CLIENT = r"""
import hashlib, json, os, socket, sys, time
fam, host, port, count, size = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
ports, errors, times = [], [], {}
for _ in range(count):
    data = os.urandom(size)
    try:
        with socket.socket(socket.AF_INET if fam == 4 else socket.AF_INET6) as c:
            c.settimeout(20)
            t0 = time.time_ns() // 1000000
            c.connect((host, port))
            t1 = time.time_ns() // 1000000 + 1
            sport = c.getsockname()[1]
            times[sport] = (t0, t1)
            c.sendall(data)
            c.shutdown(socket.SHUT_WR)
            got = bytearray()
            while True:
                b = c.recv(65536)
                if not b:
                    break
                got += b
        if hashlib.sha256(got).digest() != hashlib.sha256(data).digest():
            errors.append(f"{sport}: echo differs ({len(got)} of {size} bytes)")
        else:
            ports.append(sport)
    except OSError as exc:
        errors.append(repr(exc))
print(json.dumps({"ports": ports, "errors": errors, "times": times}))
"""


def xdp_pass_on(host: testbed.Host):
    """An XDP program that passes everything, on host's interface; it goes
    with the namespace."""
    from bcc import BPF

    from streamer.datapath import bpfsys, netns
    from streamer.datapath.loader import XDP_FLAGS_DRV_MODE, ifindex

    b = BPF(text="int xdp_pass(struct xdp_md *ctx) { return XDP_PASS; }")
    fn = b.load_func("xdp_pass", BPF.XDP)
    with netns.entered(host.netns):
        bpfsys.xdp_attach(ifindex(host.ifname), fn.fd, XDP_FLAGS_DRV_MODE)
    b.cleanup()


@dataclass
class Conn:
    family: int
    sport: int
    ts: int
    ws: int
    connect_ms: tuple[int, int]   # wall clock before connect() and after it returned


@dataclass
class CookieRun:
    events: list[Event]
    real: list[Conn]
    errors: list[str]
    kernel: dict[tuple, testbed.KernelFlow]
    counters: dict
    max_entries: int
    client: dict[int, str]
    flood_rc: int | None
    sysctls_during: str
    sysctls_after: str
    sysctls_before: str
    by_ct_id: dict = field(default_factory=dict)


async def _batch(pair, phase_real: list, errors: list) -> None:
    for ts, ws in VARIANTS:
        pair.client.run(["sysctl", "-qw", f"net.ipv4.tcp_timestamps={ts}",
                         f"net.ipv4.tcp_window_scaling={ws}"])
        for fam in (4, 6):
            p = pair.client.python(CLIENT, fam, pair.server.addr(fam), PORT, PER_BATCH, PAYLOAD)
            out, err = await asyncio.to_thread(p.communicate, timeout=120)
            res = json.loads(out.decode().strip().splitlines()[-1])
            phase_real += [Conn(fam, sp, ts, ws, tuple(res["times"][str(sp)]))
                           for sp in res["ports"]]
            errors += res["errors"]


async def _cookie_run(pin_dir: str) -> CookieRun:
    events: list[Event] = []
    cfg = DatapathConfig(pin_dir=pin_dir, table_limit=LIMIT, timeouts=TIMEOUTS,
                         report_interval=0, grace=4, sweep_interval=0.1, syn_cookies="on")
    with testbed.make_pair(prefix="ctscook", offloads=False, conntrack=False,
                           index=PAIR_INDEX) as pair:
        # veth hands an XDP_TX frame to its peer's XDP ring, which is served
        # promptly only while the peer has an XDP program of its own (with
        # just GRO on, the frames waited for the peer's next packet: seconds).
        xdp_pass_on(pair.client)
        pair.client.enable_conntrack()
        sysctls = ["sysctl", "net.ipv4.tcp_syncookies", "net.ipv4.tcp_timestamps"]
        before = pair.server.run(sysctls).stdout
        srv = pair.server.python(SERVER, PORT)
        assert srv.stdout.readline().strip() == b"ready"
        target = Target([pair.server.ifname], netns=pair.server.netns, egress=True)
        real: list[Conn] = []
        errors: list[str] = []
        samples: list[int] = []
        try:
            async with Session(cfg, target, events.append, lost_interval=0) as s:
                during = pair.server.run(sysctls).stdout
                await _batch(pair, real, errors)
                flood = pair.client.popen(
                    ["timeout", str(FLOOD_S), "hping3", "-q", "-S", "-p", str(PORT),
                     "--rand-source", "--flood", "-c", str(FLOOD_MAX), pair.server.addr(4)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                try:
                    async def sample() -> None:
                        while flood.poll() is None:
                            samples.append(s.dp.global_state()["entries"])
                            await asyncio.sleep(0.05)

                    sampler = asyncio.create_task(sample())
                    await asyncio.sleep(2.0)          # the flood at full rate first
                    await _batch(pair, real, errors)
                    await asyncio.to_thread(flood.wait, FLOOD_S + 10)
                    await sampler
                finally:
                    if flood.poll() is None:
                        flood.kill()
                        flood.wait()
                kernel = {key(f): f for f in
                          await asyncio.to_thread(pair.client.conntrack_flows)}
                await s.wait_until_empty(timeout=TIMEOUTS.established + 15)
                counters = s.counters()
        finally:
            srv.kill()
            srv.wait()
        after = pair.server.run(sysctls).stdout
        return CookieRun(events, real, errors, kernel, counters, max(samples, default=0),
                         {4: pair.client.addr(4), 6: pair.client.addr(6)}, flood.returncode,
                         during, after, before)


@pytest.fixture(scope="module")
def run():
    return recorded_run(_cookie_run)


def test_it_was_a_flood_answered_with_cookies(run):
    c = run.counters
    assert run.flood_rc in (0, 124)
    assert c["syn_cookies_sent"] >= 100_000, c          # the flood, answered from XDP
    assert c["syn_cookie_errors"] == 0
    assert "tcp_syncookies = 2" in run.sysctls_during and "tcp_timestamps = 2" in run.sysctls_during


def test_the_flood_created_no_entry_and_no_event(run):
    n = len(run.real)
    strangers = [ev for ev in run.events if ev.src not in run.client.values()]
    assert not strangers, strangers[:5]
    assert run.counters["created"] == n
    assert run.max_entries <= n
    assert run.counters["syn_cookie_acks_valid"] == n


def test_every_real_connection_completed_intact_and_was_tracked_to_its_end(run):
    assert not run.errors, run.errors[:5]
    assert len(run.real) == 2 * len(VARIANTS) * 2 * PER_BATCH
    mine = collections.defaultdict(set)
    destroys = collections.defaultdict(list)
    for ev in run.events:
        k = (ev.family, ev.sport)
        if ev.dport == PORT:
            mine[k].add(ev.ct_id)
            if ev.type == "DESTROY":
                destroys[k].append(ev)
    conns = {(c.family, c.sport): c for c in run.real}
    assert set(mine) == set(conns), "real connections the datapath never tracked"
    assert all(len(ids) == 1 for ids in mine.values()), "a real connection split in two"
    compared = 0
    bad = []
    late = []
    for k, c in conns.items():
        ds = destroys[k]
        assert ds, f"no DESTROY for {c}"
        d = ds[0]
        first = run.by_ct_id[d.ct_id][0]
        assert first.type == "NEW" and first.state == "ESTABLISHED" and first.assured, first
        assert (d.end_reason, d.state, d.assured) == ("fin", "TIME_WAIT", True), d
        kf = run.kernel.get(key(d))
        assert kf is not None, f"the kernel has no flow for {c}"
        compared += 1
        got = (d.packets_orig, d.packets_reply, d.bytes_orig, d.bytes_reply)
        want = (kf.packets_orig, kf.packets_reply, kf.bytes_orig, kf.bytes_reply)
        if got != want:
            bad.append((c, d, kf))
        # the SYN's own time, from the handshake map (the clock conversion
        # of the events is good to a few ms: CLOCK_MONOTONIC to wall time)
        t0, t1 = c.connect_ms
        if not t0 - CLOCK_SLACK_MS <= first.first_ms <= t1 + CLOCK_SLACK_MS:
            late.append((c, first.first_ms - t0))
    assert not bad, "\n".join(map(str, bad[:10])) + f"\n{len(bad)} of {len(conns)}"
    assert not late, f"{len(late)} of {len(conns)} started elsewhere: {late[:10]}"
    assert compared == len(conns)
    assert run.counters["syn_cookie_handshakes_estimated"] == 0


def test_the_sysctls_are_put_back(run):
    assert run.sysctls_after == run.sysctls_before
    assert "tcp_syncookies = 2" not in run.sysctls_after


# ---- on and off as a live setting ---------------------------------------------

LIVE_PORT = 5141


@pytest.fixture
def pair():
    """The live test's namespace pair (the flood run makes its own)."""
    with testbed.make_pair(prefix="ctscookl", offloads=False, conntrack=False,
                           index=PAIR_INDEX + 1) as p:
        xdp_pass_on(p.client)
        yield p


@pytest.fixture
def pin(pin_dir, pair):
    yield pin_dir
    detach_and_remove(pin_dir)


def _apply(path, pin: str) -> str:
    cp = ctstream("config", "apply", str(path), "--pin-dir", pin)
    assert cp.returncode == 0, cp.stderr
    return cp.stdout


def test_syn_cookies_go_on_and_off_live(pair, pin, start_events, tmp_path):
    """`config apply` turns cookies on (sysctls set, SYNs answered from XDP,
    no SYN_SENT entry) and off again (sysctls back, SYNs tracked)."""
    sysctls = ["sysctl", "-n", "net.ipv4.tcp_syncookies", "net.ipv4.tcp_timestamps"]
    own = pair.server.run(sysctls).stdout.split()
    off, on = tmp_path / "off.toml", tmp_path / "on.toml"
    off.write_text('syn-cookies = "off"\nevent-mask = ["new", "assured", "state", "destroy"]\n')
    on.write_text('syn-cookies = "on"\nevent-mask = ["new", "assured", "state", "destroy"]\n')
    sink = tmp_path / "events.jsonl"
    ev = start_events("--config", str(off), "--sink", f"jsonl:{sink}")
    phases = []
    for path, want in ((off, "off"), (on, "on"), (off, "off")):
        if phases:
            assert "syn_cookies" in _apply(path, pin)
        assert pair.server.run(sysctls).stdout.split() == (own if want == "off" else ["2", "2"])
        before = stats(pin)
        ports = pair.tcp_many(12, 4, LIVE_PORT, 3)   # its own echo server, one per call
        after = stats(pin)
        phases.append((want, set(ports),
                       after["syn_cookies_sent"] + after["syn_cookie_kernel_syns"]
                       - before["syn_cookies_sent"] - before["syn_cookie_kernel_syns"],
                       after["syn_cookie_acks_valid"] - before["syn_cookie_acks_valid"]))
    rc, _, _, stderr = ev.stop(signal.SIGTERM, timeout=30)
    assert rc == 0, stderr
    assert pair.server.run(sysctls).stdout.split() == own
    records, torn = read_json_lines(sink.read_text())
    assert torn == 0
    first_state = {}
    for r in records:
        if r["eventType"] == "CREATE" and r.get("destinationTransportPort") == LIVE_PORT:
            first_state[r["sourceTransportPort"]] = r["tcpState"]
    for want, ports, syns, acks in phases:
        assert ports <= set(first_state), (want, ports - set(first_state))
        states = {first_state[p] for p in ports}
        if want == "on":
            assert syns == 12 and acks == 12, (syns, acks)
            assert states == {"ESTABLISHED"}, states
        else:
            assert syns == 0 and acks == 0, (want, syns, acks)
            assert states == {"SYN_SENT"}, states


# ---- a stale cookie -------------------------------------------------------------

def test_a_cookie_older_than_two_minutes_is_dropped():
    """The ACK of a cookie tests/bpf/test_syn_cookies.py made minutes ago in
    this run (or one made here, then waited for when this file runs alone):
    the kernel's check refuses a cookie two of its minute counters old."""
    import time

    from tests.bpf import test_syn_cookies as frames
    from tests.bpf.packets import XDP_DROP, loaded_bench

    def listener(port: int) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen(4)
        return s

    with loaded_bench(table_limit=1024, syn_cookies="on") as bench:
        if not frames.STALE:
            with listener(0) as ls:
                f = frames.client(4, ls.getsockname()[1], sport=40700)
                frames.run(bench, frames.syn(f, seq=1))        # the kernel's one
                _, out = frames.run(bench, frames.syn(f))
                _, tcp, _ = frames.synack_of(out, 4)
                frames.STALE.update(ack=frames.ack_for(f, tcp), port=ls.getsockname()[1],
                                    made=time.monotonic())
        st = frames.STALE
        wait = st["made"] + frames.STALE_AFTER_S - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        with listener(st["port"]):
            v, _ = frames.run(bench, st["ack"])
        assert v == XDP_DROP
        assert frames.syn_stats(bench)["syn_cookie_acks_invalid"] == 1
        assert bench.table(4) == {}
