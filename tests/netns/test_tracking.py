"""The datapath against the kernel's own nf_conntrack, with real traffic.

Two namespaces joined by veth (streamer.demo.testbed), the real datapath
attached to the server's veth, and real TCP, UDP, ICMP echo, iperf3 and many
short connections over IPv4 and IPv6. Two setups, each a whole run:
- XDP ingress + tc egress, offloads off, so that every hook sees wire-sized
  packets (XDP runs before GRO, nf_conntrack after it);
- tc ingress + tc egress with offloads on (TSO, GSO, GRO: the default of a
  veth), where ctstream's hooks see the very skbs nf_conntrack sees, merged
  segments and all: the counters must be equal there too. The kernel's conntrack in the server namespace
sees the same packets and is the reference: for every connection, ctstream's
DESTROY must carry the kernel's tuple, TCP state and per-direction packet and
byte counters, and every connection must produce exactly one NEW and one
DESTROY with gap-free sequence numbers.

One datapath session carries all of the traffic (a module fixture); the
checks are separate tests over its record. Gateway mode (XDP on both
interfaces of a router namespace) is not covered: the test bed builds pairs
only.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import shutil
import uuid
from dataclasses import dataclass

import pytest

from streamer.demo import testbed
from streamer.datapath.config import DatapathConfig, Timeouts
from streamer.daemon import Session, Target
from streamer.datapath.events import Event
from streamer.datapath.loader import STATE_DIR
from streamer.datapath.table import PinnedTable

pytestmark = pytest.mark.root

# Short timeouts so that every connection ends, and sends its DESTROY, within
# seconds of its last packet; still long enough that no connection expires
# while its traffic is running (which would split it into two of ours).
TIMEOUTS = Timeouts(syn=3, established=3, fin=1, udp=2, icmp=1, other=2)

# (name, traffic run client -> server, number of connections it makes)
TRAFFIC = [
    ("tcp-small-v4", lambda p: p.tcp_exchange(1_000, 3_000, family=4), 1),
    ("tcp-small-v6", lambda p: p.tcp_exchange(1_000, 3_000, family=6), 1),
    ("tcp-large-v4", lambda p: p.tcp_exchange(300_000, 1_000_000, family=4), 1),
    ("tcp-large-v6", lambda p: p.tcp_exchange(300_000, 1_000_000, family=6), 1),
    ("udp-v4", lambda p: p.udp_exchange(5, 300, family=4), 1),
    ("udp-v6", lambda p: p.udp_exchange(5, 1_200, family=6), 1),
    ("icmp-echo-v4", lambda p: p.ping(3, family=4), 1),
    ("icmpv6-echo", lambda p: p.ping(3, family=6), 1),
    ("iperf3-v4", lambda p: p.iperf3(1, family=4), 2),  # control + data
    ("iperf3-v6-reverse", lambda p: p.iperf3(1, family=6, reverse=True), 2),
    ("tcp-many-v4", lambda p: p.tcp_many(200, family=4, concurrency=8), 200),
    ("tcp-many-v6", lambda p: p.tcp_many(40, family=6, concurrency=8), 40),
]
TRAFFIC_NAMES = [name for name, _, _ in TRAFFIC]
END_REASON = {"TIME_WAIT": "fin", "CLOSE": "rst"}  # TCP; UDP and ICMP end idle


def key(x) -> tuple:
    """The original-direction tuple, the same for KernelFlow and Event."""
    return (x.family, x.proto, x.src, x.dst, x.sport, x.dport)


def lock_file(pin_dir: str) -> str:
    # The daemon keeps an flock file per pin dir in STATE_DIR (it is never
    # removed, by design); remove the ones of our private pin dirs so test
    # runs do not pile them up.
    return str(STATE_DIR / (pin_dir.strip("/").replace("/", "_") + ".lock"))


def private_pin_dir() -> str:
    return f"/sys/fs/bpf/ctstest_{os.getpid()}_{uuid.uuid4().hex[:8]}"


def remove_pin_dir(path: str) -> None:
    """The pin dir and what a daemon of it left in STATE_DIR (a failed run
    keeps its state: its attachments, and the sysctls SYN cookies changed,
    which are put back first)."""
    from streamer.datapath import syncookies

    syncookies.restore(path)
    shutil.rmtree(path, ignore_errors=True)
    stem = lock_file(path)[: -len(".lock")]
    for suffix in (".lock", ".json", ".status.json"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(stem + suffix)


def recorded_run(make):
    """asyncio.run(make(pin_dir)) in a private pin dir (removed after), its
    result's events indexed by ct_id in its by_ct_id: a module's run of
    traffic, recorded once, that its tests then check."""
    pin_dir = private_pin_dir()
    try:
        r = asyncio.run(make(pin_dir))
    finally:
        remove_pin_dir(pin_dir)
    for ev in r.events:
        r.by_ct_id.setdefault(ev.ct_id, []).append(ev)
    return r


@dataclass
class Run:
    events: list[Event]
    kernel: dict[tuple, testbed.KernelFlow]   # newest figures the kernel showed
    flows_of: dict[str, set[tuple]]           # traffic name -> kernel flow keys
    drained: bool
    stats: dict
    rejected: int

    def by_ct_id(self) -> dict[int, list[Event]]:
        out = collections.defaultdict(list)
        for ev in self.events:
            out[ev.ct_id].append(ev)
        return out

    def destroys(self) -> dict[tuple, list[Event]]:
        out = collections.defaultdict(list)
        for ev in self.events:
            if ev.type == "DESTROY":
                out[key(ev)].append(ev)
        return out


async def _record_all_traffic(pin_dir: str, hook: str, offloads: bool, index: int) -> Run:
    events: list[Event] = []
    kernel: dict[tuple, testbed.KernelFlow] = {}
    flows_of: dict[str, set[tuple]] = {}
    cfg = DatapathConfig(pin_dir=pin_dir, timeouts=TIMEOUTS, report_interval=0)
    with testbed.make_pair(prefix="ctstrk", offloads=offloads, conntrack=True,
                           index=index) as pair:
        target = Target([pair.server.ifname], netns=pair.server.netns, egress=True,
                        ingress=hook)
        async with Session(cfg, target, events.append) as s:
            for name, traffic, _ in TRAFFIC:
                await asyncio.to_thread(traffic, pair)
                # read right away: the kernel keeps TIME_WAIT for 120 s, but
                # a reset connection (CLOSE) only 10 s
                snapshot = await asyncio.to_thread(pair.conntrack_flows)
                flows_of[name] = {key(f) for f in snapshot} - set(kernel)
                kernel.update({key(f): f for f in snapshot})
            # a last look, in case a final ACK was still on its way
            kernel.update({key(f): f for f in await asyncio.to_thread(pair.conntrack_flows)})
            drained = await s.wait_until_empty(timeout=20)
            with PinnedTable(pin_dir) as t:
                stats = t.stats()
            rejected = s.reader.rejected
    return Run(events, kernel, flows_of, drained, stats, rejected)


# (ingress hook, offloads, test bed pair index)
SETUPS = {"xdp-offloads-off": ("xdp", False, 0), "tc-ingress-offloads-on": ("tc", True, 2)}


@pytest.fixture(scope="module", params=list(SETUPS))
def run(request):
    pin_dir = private_pin_dir()
    try:
        yield asyncio.run(_record_all_traffic(pin_dir, *SETUPS[request.param]))
    finally:
        remove_pin_dir(pin_dir)


# --- the whole record ------------------------------------------------------------


def test_every_connection_ended_and_no_event_was_lost(run):
    assert run.drained, "connections still in the table 20 s after the traffic"
    assert run.stats["entries"] == 0
    assert run.stats["ring_full"] == 0 and run.rejected == 0
    assert all(ev.missed == 0 for ev in run.events)
    expected = sum(n for _, _, n in TRAFFIC)
    assert run.stats["created"] == expected
    assert run.stats["destroyed"] == expected


def test_one_new_and_one_destroy_per_connection(run):
    new = collections.Counter(ev.ct_id for ev in run.events if ev.type == "NEW")
    destroy = collections.Counter(ev.ct_id for ev in run.events if ev.type == "DESTROY")
    assert set(new.values()) == {1}
    assert set(destroy.values()) == {1}, "a ct_id was destroyed twice"
    assert set(new) == set(destroy)
    assert set(run.by_ct_id()) == set(new), "UPDATE of a connection that never began"
    assert len(new) == len(run.kernel) == sum(n for _, _, n in TRAFFIC)


def test_seq_numbers_are_gap_free_and_destroy_is_last(run):
    for ct_id, evs in run.by_ct_id().items():
        seqs = sorted(ev.seq for ev in evs)
        assert seqs == list(range(len(evs))), f"ct_id {ct_id}: seq {seqs}"
        by_seq = {ev.seq: ev for ev in evs}
        assert by_seq[0].type == "NEW"
        assert by_seq[len(evs) - 1].type == "DESTROY"
        assert all(ev.type == "UPDATE" for ev in evs if 0 < ev.seq < len(evs) - 1)
        # counters only grow along the sequence
        ordered = [by_seq[i] for i in range(len(evs))]
        for a, b in zip(ordered, ordered[1:]):
            for field in ("packets_orig", "packets_reply", "bytes_orig", "bytes_reply"):
                assert getattr(a, field) <= getattr(b, field), \
                    f"ct_id {ct_id}: {field} went down from seq {a.seq} to {b.seq}"


def test_no_connection_the_kernel_did_not_see(run):
    ours = set(run.destroys())
    assert ours == set(run.kernel), (
        f"only ours: {sorted(ours - set(run.kernel))[:5]}, "
        f"only the kernel's: {sorted(set(run.kernel) - ours)[:5]}")


# --- per kind of traffic -------------------------------------------------------------


@pytest.mark.parametrize("name", TRAFFIC_NAMES)
def test_destroy_matches_kernel_conntrack(run, name):
    expected = dict((n, c) for n, _, c in TRAFFIC)[name]
    keys = run.flows_of[name]
    assert len(keys) == expected, f"the kernel saw {len(keys)} connections, expected {expected}"
    destroys = run.destroys()
    by_ct_id = run.by_ct_id()
    for k in sorted(keys):
        kf = run.kernel[k]
        assert len(destroys.get(k, [])) == 1, f"{k}: {len(destroys.get(k, []))} DESTROY events"
        ev = destroys[k][0]
        ours = (ev.packets_orig, ev.bytes_orig, ev.packets_reply, ev.bytes_reply)
        theirs = (kf.packets_orig, kf.bytes_orig, kf.packets_reply, kf.bytes_reply)
        assert ours == theirs, f"{k}: ours (pkts, bytes orig, pkts, bytes reply) {ours}, kernel {theirs}"
        # the replies the server itself sent were seen (tc egress)
        assert ev.packets_reply > 0 and ev.bytes_reply > 0
        if kf.proto == "tcp":
            last_update = max((e for e in by_ct_id[ev.ct_id] if e.type != "DESTROY"),
                              key=lambda e: e.seq)
            assert ev.state == last_update.state == kf.state, \
                f"{k}: our state {last_update.state}/{ev.state}, kernel {kf.state}"
            assert ev.assured == kf.assured
            assert ev.end_reason == END_REASON.get(kf.state, "idle")
        else:
            assert ev.state is None and kf.state is None
            assert ev.assured  # seen both ways
            assert ev.end_reason == "idle"


def test_tcp_closed_by_fin_is_in_time_wait(run):
    """The plain exchanges close cleanly: both sides agree on TIME_WAIT."""
    for name in ("tcp-small-v4", "tcp-small-v6", "tcp-large-v4", "tcp-large-v6",
                 "tcp-many-v4", "tcp-many-v6"):
        for k in run.flows_of[name]:
            assert run.kernel[k].state == "TIME_WAIT"
            assert run.destroys()[k][0].state == "TIME_WAIT"


# --- without the tc egress program --------------------------------------------------


@pytest.fixture
def private_pin(pin_dir):
    yield pin_dir
    remove_pin_dir(pin_dir)


async def test_without_egress_the_servers_replies_are_not_seen(private_pin):
    """XDP sees only what arrives on the server's veth: the server's own
    replies leave through it and are never seen, so a connection that ends
    on the host looks one-way. That is what --egress (tc) is for."""
    timeouts = Timeouts(syn=2, established=2, fin=1, udp=1, icmp=1, other=1)
    cfg = DatapathConfig(pin_dir=private_pin, timeouts=timeouts, report_interval=0)
    events: list[Event] = []
    with testbed.make_pair(prefix="ctstrk", offloads=False, conntrack=True, index=1) as pair:
        target = Target([pair.server.ifname], netns=pair.server.netns, egress=False)
        async with Session(cfg, target, events.append) as s:
            qdiscs = pair.server.run(["tc", "qdisc", "show", "dev", pair.server.ifname]).stdout
            link = pair.server.run(["ip", "link", "show", pair.server.ifname]).stdout
            await asyncio.to_thread(pair.tcp_exchange, 2_000, 5_000, 4)
            await asyncio.to_thread(pair.udp_exchange, 3, 100, 6)
            await asyncio.to_thread(pair.ping, 2, 4)
            kernel = await asyncio.to_thread(pair.conntrack_flows)
            drained = await s.wait_until_empty(timeout=15)
    assert "xdp" in link and "clsact" not in qdiscs
    assert drained
    assert sorted(f.proto for f in kernel) == ["icmp", "tcp", "udp"]
    destroys = {key(ev): ev for ev in events if ev.type == "DESTROY"}
    assert set(destroys) == {key(f) for f in kernel}
    for kf in kernel:
        ev = destroys[key(kf)]
        assert kf.packets_reply > 0  # the replies were there ...
        assert (ev.packets_reply, ev.bytes_reply) == (0, 0)  # ... but not seen
        assert (ev.packets_orig, ev.bytes_orig) == (kf.packets_orig, kf.bytes_orig)
        assert not ev.assured
        if kf.proto == "tcp":
            # the SYN/ACK was never seen: the connection never got past SYN_SENT
            assert kf.state == "TIME_WAIT" and ev.state == "SYN_SENT"
