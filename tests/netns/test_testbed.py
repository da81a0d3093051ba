"""streamer.demo.testbed against the real kernel: namespaces, veth, traffic, and
the kernel's own conntrack as the reference (no mocks).  Needs root."""

import os
import shutil
import subprocess
import sys
import time

import pytest

from streamer.demo import testbed as tb

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
]

L3L4 = {4: 20 + 8, 6: 40 + 8}  # IP + UDP/ICMP header bytes per packet


def netns_list() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                         timeout=10, check=True).stdout
    return {ln.split()[0] for ln in out.splitlines() if ln.strip()}


def flow(flows, proto, sport, family):
    found = [f for f in flows if f.proto == proto and f.sport == sport and f.family == family]
    assert len(found) == 1, f"expected one {proto}/{family} flow from port {sport}: {flows}"
    return found[0]


@pytest.fixture(scope="module")
def pair():
    with tb.make_pair() as p:
        yield p


@pytest.fixture
def fresh(pair):
    """The module's pair with an empty conntrack table."""
    pair.conntrack_flush()
    assert pair.conntrack_flows() == []
    return pair


# --- layout ----------------------------------------------------------------


def test_layout(pair):
    c, s = pair.client, pair.server
    assert {c.netns, s.netns} <= netns_list()
    assert c.netns.startswith(f"cts{os.getpid()}-") and c.netns.endswith("c")
    assert s.netns.startswith(f"cts{os.getpid()}-") and s.netns.endswith("s")
    assert (c.ipv4, s.ipv4, c.ipv6, s.ipv6) == ("198.18.0.1", "198.18.0.2", "2001:2::1", "2001:2::2")
    for h in (c, s):
        assert h.ifname == "veth0" and h.ifindex > 0
        assert h.run(["cat", f"/sys/class/net/{h.ifname}/ifindex"]).stdout.strip() == str(h.ifindex)
        # no default routes, only the connected /24 and /64
        for fam in ("-4", "-6"):
            assert h.run(["ip", fam, "route", "show", "default"]).stdout.strip() == ""
        assert h.run(["ip", "-4", "route"]).stdout.split()[0] == "198.18.0.0/24"
        feats = h.run(["ethtool", "-k", h.ifname]).stdout
        for name in ("tcp-segmentation-offload", "generic-segmentation-offload",
                     "generic-receive-offload", "tx-checksumming", "rx-checksumming"):
            assert f"{name}: off" in feats
        assert "gso_max_segs 1 " in h.run(["ip", "-d", "link", "show", h.ifname]).stdout
    # the veth pair never appears in the root namespace
    root_links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True,
                                timeout=10, check=True).stdout
    assert c.netns not in root_links and s.netns not in root_links
    assert s.run(["sysctl", "-n", "net.netfilter.nf_conntrack_acct"]).stdout.strip() == "1"


@pytest.mark.parametrize("family", [4, 6])
def test_ping_both_ways(pair, family):
    pair.client.ping(pair.server.addr(family), 1)
    pair.server.ping(pair.client.addr(family), 1)


def test_ping_fails_cleanly_to_an_unreachable_address(pair):
    with pytest.raises(tb.TestbedError, match="0/1 replies"):
        pair.client.ping("198.18.0.99", 1, wait=0.3)


# --- traffic vs. the kernel's conntrack ---------------------------------------


@pytest.mark.parametrize("family", [4, 6])
def test_ping_counters(fresh, family):
    ident = fresh.ping(3, family=family)
    f = flow(fresh.conntrack_flows(), "icmp" if family == 4 else "icmpv6", ident, family)
    per_packet = L3L4[family] + 56
    assert (f.src, f.dst, f.dport) == (fresh.client.addr(family), fresh.server.addr(family), ident)
    assert (f.packets_orig, f.bytes_orig) == (3, 3 * per_packet)
    assert (f.packets_reply, f.bytes_reply) == (3, 3 * per_packet)
    assert f.state is None


@pytest.mark.parametrize("family", [4, 6])
def test_udp_exchange_counters(fresh, family):
    sport = fresh.udp_exchange(3, 100, family=family)
    f = flow(fresh.conntrack_flows(), "udp", sport, family)
    assert (f.src, f.dst, f.dport) == (fresh.client.addr(family), fresh.server.addr(family), 5002)
    expect = 3 * (L3L4[family] + 100)
    assert (f.packets_orig, f.bytes_orig, f.packets_reply, f.bytes_reply) == (3, expect, 3, expect)
    assert not f.unreplied


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("up,down", [(1000, 3000), (20000, 50000)])
def test_tcp_exchange_counters_match_the_wire(fresh, family, up, down):
    with fresh.server.capture() as cap:
        sport, dport = fresh.tcp_exchange(up, down, family=family)
    assert dport == 5001
    f = flow(fresh.conntrack_flows(), "tcp", sport, family)
    assert (f.src, f.dst, f.dport) == (fresh.client.addr(family), fresh.server.addr(family), 5001)
    assert f.state in ("TIME_WAIT", "CLOSE")
    assert f.assured
    assert f.packets_orig >= 5 and f.packets_reply >= 4
    # the payload plus at least 20 (40) bytes of IP and 20 of TCP header a packet
    hdr = 40 if family == 4 else 60
    assert f.bytes_orig >= up + hdr * f.packets_orig
    assert f.bytes_reply >= down + hdr * f.packets_reply
    # exact: the kernel counted every packet at its wire size (L3)
    assert cap.dropped == 0
    assert (f.packets_orig, f.bytes_orig, f.packets_reply, f.bytes_reply) == cap.flow_counters(f)
    assert max(p.length for p in cap.packets) <= 1500


def test_tcp_many(fresh):
    ports = fresh.tcp_many(60, concurrency=8)
    assert len(ports) == 60 and len(set(ports)) == 60
    flows = {f.sport: f for f in fresh.conntrack_flows() if f.proto == "tcp" and f.dport == 5003}
    assert set(flows) == set(ports)
    for f in flows.values():
        assert f.state in ("TIME_WAIT", "CLOSE") and f.assured
        assert f.packets_orig >= 5


def test_tcp_many_v6(fresh):
    ports = fresh.tcp_many(10, family=6, concurrency=4)
    flows = {f.sport for f in fresh.conntrack_flows() if f.family == 6 and f.proto == "tcp"}
    assert flows == set(ports)


@pytest.mark.skipif(shutil.which("iperf3") is None, reason="iperf3 not installed")
def test_iperf3(fresh):
    res = fresh.iperf3(1, family=6, reverse=True)
    assert res["end"]["sum_received"]["bytes"] > 0
    assert res["start"]["test_start"]["reverse"] == 1
    flows = [f for f in fresh.conntrack_flows() if f.proto == "tcp" and f.dport == 5201]
    assert len(flows) == 2  # control and data connection
    assert all(f.family == 6 and f.assured for f in flows)
    # reverse: the server sent the data
    assert max(f.bytes_reply for f in flows) > res["end"]["sum_received"]["bytes"]


def test_conntrack_flush(fresh):
    fresh.udp_exchange(1, 10)
    fresh.ping(1, family=6)
    assert len(fresh.conntrack_flows()) == 2
    fresh.conntrack_flush()
    assert fresh.conntrack_flows() == []


# --- lifecycle ------------------------------------------------------------------


def test_everything_is_gone_after_the_block():
    with tb.make_pair(index=1) as p:
        names = {p.client.netns, p.server.netns}
        assert names <= netns_list()
        assert p.client.ipv4 == "198.18.1.1" and p.server.ipv6 == "2001:2:0:1::2"
        p.ping(1)
        registered = p.client.popen(["sleep", "30"])
        # a process the pair does not know about must not pin the namespace
        stray = subprocess.Popen(["ip", "netns", "exec", p.server.netns, "sleep", "30"])
        time.sleep(0.1)
    assert not names & netns_list()
    assert registered.poll() is not None
    stray.wait(timeout=5)  # killed (and reaped) by the destroy


def test_everything_is_gone_when_the_body_raises():
    with pytest.raises(RuntimeError, match="boom"):
        with tb.make_pair(conntrack=False) as p:
            names = {p.client.netns, p.server.netns}
            raise RuntimeError("boom")
    assert not names & netns_list()


def test_two_pairs_side_by_side(pair):
    with tb.make_pair(index=2, offloads=True, conntrack=False) as q:
        assert {q.client.netns, q.server.netns}.isdisjoint({pair.client.netns, pair.server.netns})
        assert q.server.ipv4 == "198.18.2.2"
        assert "tcp-segmentation-offload: on" in q.client.run(["ethtool", "-k", "veth0"]).stdout
        q.ping(1, family=6)
        pair.ping(1, family=6)
        assert q.server.run(["conntrack", "-L"]).stdout == ""


def test_cleanup_stale_removes_only_dead_owners():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=10)
    stale, alive = f"ctz{dead.pid}-0c", f"ctz{os.getpid()}-99s"
    try:
        for ns in (stale, alive):
            subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
        removed = tb.cleanup_stale("ctz")
        assert removed == [stale]
        left = netns_list()
        assert stale not in left and alive in left
    finally:
        for ns in (stale, alive):
            subprocess.run(["ip", "netns", "delete", ns], timeout=10, capture_output=True)


def test_bad_arguments():
    with pytest.raises(ValueError):
        tb.make_pair(index=512)
    with pytest.raises(ValueError):
        tb.make_pair(prefix="far-too-long-prefix")
