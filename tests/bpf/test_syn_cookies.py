"""SYN cookies in XDP (bpf/syn_cookie.h), frame by frame through the real
program with BPF_PROG_TEST_RUN.

The socket lookup the program makes sees this process's network namespace,
and test runs arrive on its loopback device: a real listener on 127.0.0.1
is the local listener, and clients are other loopback addresses. The
cookies are the kernel's own (its secret, its encoding), so the ACK a test
builds from a SYN-ACK is checked by the kernel's own helper.
"""

from __future__ import annotations

import socket
import time

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Dot1Q, Ether

from streamer.datapath import abi, bpfsys

from .packets import XDP_DROP, XDP_PASS, Flow, frame, l2, loaded_bench


XDP_TX = 3
SYN_STAT = {n: i for i, n in enumerate(abi.SYN_STAT_NAMES)}
# A Linux client's SYN options, with and without timestamps.
OPTS_TS = [("MSS", 1460), ("SAltOK", b""), ("Timestamp", (123456, 0)), ("NOP", None),
           ("WScale", 7)]
OPTS_TS_NOWS = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (123456, 0))]
OPTS_PLAIN = [("MSS", 1460), ("NOP", None), ("NOP", None), ("SAckOK", b""), ("NOP", None),
              ("WScale", 7)]
OPTS_TS[1] = ("SAckOK", b"")
# The kernel's cookie is valid for two of its minute counters: one made at
# least this long before its check is stale, whatever the minute it was made in.
STALE_AFTER_S = 125
# A cookie's ACK made by this module for tests/netns/test_syn_cookies.py,
# which runs minutes later in the suite and checks that it is refused then.
STALE: dict = {}


@pytest.fixture(scope="module")
def listeners():
    """Listening sockets on loopback, IPv4 and IPv6, closed after the module."""
    s4 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s4.bind(("127.0.0.1", 0))
    s4.listen(16)
    s6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s6.bind(("::1", 0))
    s6.listen(16)
    try:
        yield {4: s4.getsockname()[1], 6: s6.getsockname()[1]}
    finally:
        s4.close()
        s6.close()


@pytest.fixture(scope="module")
def bench():
    with loaded_bench(table_limit=4096) as b:
        yield b


@pytest.fixture
def cookies(bench):
    bench.reset()
    _reset_cookie_state(bench)
    bench.configure(syn_cookies="on")
    yield bench
    bench.reset()
    _reset_cookie_state(bench)


def _reset_cookie_state(bench) -> None:
    fd = bench.dp.fd("ct_syn_stats")
    for i in range(abi.SYN_STAT_MAX):
        bpfsys.map_update(fd, i.to_bytes(4, "little"), b"\0" * 8 * bench.ncpu)
    fd = bench.dp.fd("ct_sc_listeners")
    for k in set(bpfsys.map_keys(fd, 20)):
        bpfsys.map_delete(fd, k)
    forget_handshakes(bench)


def forget_handshakes(bench) -> None:
    """Empty the handshake map, as a flood that churned it would."""
    for name, key_size in (("ct_sc_hs4", 16), ("ct_sc_hs6", 40)):
        fd = bench.dp.fd(name)
        for k in set(bpfsys.map_keys(fd, key_size)):
            bpfsys.map_delete(fd, k)


def syn_stats(bench) -> dict[str, int]:
    fd = bench.dp.fd("ct_syn_stats")
    return {n: sum(int.from_bytes(v, "little")
                   for v in bpfsys.percpu_lookup(fd, i.to_bytes(4, "little"), 8))
            for n, i in SYN_STAT.items()}


def client(family: int, port: int, sport: int = 40000, vlans=()) -> Flow:
    if family == 4:
        return Flow("127.0.0.2", "127.0.0.1", "tcp", sport, port, vlans)
    return Flow("::2", "::1", "tcp", sport, port, vlans)


def syn(flow: Flow, opts=OPTS_TS, seq=1000, flags="S"):
    return flow.orig(flags, l4={"seq": seq, "options": opts, "window": 64240})


def run(bench, pkt):
    """(verdict, frame out) of one XDP run."""
    retval, _, out = bpfsys.test_run(bench.dp.prog_fd("ct_xdp_ingress"), pkt.data)
    return retval, out


def warm(bench, flow: Flow) -> None:
    """The first SYN to a listener goes to the kernel (it keeps the kernel's
    cookie window open); after it, XDP answers."""
    v, _ = run(bench, syn(flow, seq=1))
    assert v == XDP_PASS
    assert syn_stats(bench)["syn_cookie_kernel_syns"] == 1


def synack_of(out: bytes, family: int):
    eth = Ether(out)
    return eth, eth[TCP], eth[IP] if family == 4 else eth[IPv6]


def checksums_ok(eth, family: int) -> bool:
    """scapy recomputes what it finds deleted; equal bytes: equal checksums."""
    again = eth.copy()
    del again[TCP].chksum
    if family == 4:
        del again[IP].chksum
    return bytes(Ether(bytes(again))) == bytes(eth)


def ack_for(flow: Flow, tcp_synack, opts=None, delta=0, payload=b""):
    """The client's third packet for a SYN-ACK (echoing its timestamp)."""
    ts = dict(o for o in tcp_synack.options if o[0] == "Timestamp").get("Timestamp")
    if opts is None:
        opts = [("NOP", None), ("NOP", None), ("Timestamp", (123460, ts[0]))] if ts else []
    return flow.orig("A", payload, l4={"seq": tcp_synack.ack, "ack": tcp_synack.seq + 1 + delta,
                                       "options": opts, "window": 502})


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("opts,want", [
    (OPTS_TS, {"MSS", "SAckOK", "Timestamp", "WScale"}),
    (OPTS_TS_NOWS, {"MSS", "SAckOK", "Timestamp"}),
    (OPTS_PLAIN, {"MSS"}),          # no timestamp: nothing but the MSS survives
], ids=["ts-ws-sack", "ts-sack", "no-ts"])
def test_syn_is_answered_with_a_cookie_syn_ack_and_creates_nothing(cookies, listeners, family,
                                                                   opts, want):
    f = client(family, listeners[family])
    warm(cookies, f)
    v, out = run(cookies, syn(f, opts))
    assert v == XDP_TX
    eth, tcp, ip = synack_of(out, family)
    assert (eth.src, eth.dst) == ("02:00:00:00:00:0b", "02:00:00:00:00:0a")
    assert (ip.src, ip.dst) == (f.dst, f.src)
    assert (tcp.sport, tcp.dport) == (f.dport, f.sport)
    assert tcp.flags == "SA" and tcp.ack == 1001
    assert checksums_ok(eth, family)
    got = dict(tcp.options)
    assert set(got) - {"NOP"} == want
    assert got["MSS"] == 65536 - (40 if family == 4 else 60)   # loopback's MTU
    if "Timestamp" in want:
        tsval, tsecr = got["Timestamp"]
        assert tsecr == 123456
        bits = tsval & 0x3F
        assert bits & 0xF == (7 if "WScale" in want else 0xF)
        assert bits & 0x10                         # SACK-permitted
        assert got.get("WScale", 7) == 7           # the kernel's scale (config)
    assert cookies.table(family) == {}
    assert cookies.events() == []
    assert syn_stats(cookies)["syn_cookies_sent"] == 1


def handshake(bench, f: Flow, opts=OPTS_TS, syns: int = 1, forget: bool = False,
              warmed: bool = False):
    """SYN (sent `syns` times, as a client retransmits it), SYN-ACK, ACK:
    (the entry, the SYN, the last SYN-ACK frame, the ACK, ns before the first
    SYN, ns after it)."""
    if not warmed:
        warm(bench, f)
    synp = syn(f, opts)
    t0 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    _, out = run(bench, synp)
    t1 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    for _ in range(syns - 1):
        time.sleep(0.01)
        v, out = run(bench, synp)
        assert v == XDP_TX
    if forget:
        forget_handshakes(bench)
    _, tcp, _ = synack_of(out, family_of(f))
    ack = ack_for(f, tcp)
    time.sleep(0.02)
    v, _ = run(bench, ack)
    assert v == XDP_PASS
    e = bench.entry(f)
    assert e is not None
    assert e.state_name == "ESTABLISHED"
    assert e.flags & abi.F_ASSURED and not e.flags & abi.F_PICKUP
    return e, synp, out, ack, t0, t1


def family_of(f: Flow) -> int:
    return 6 if ":" in f.src else 4


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("opts", [OPTS_TS, OPTS_TS_NOWS, OPTS_PLAIN,
                                  [("MSS", 1460), ("SAckOK", b"")], [("MSS", 1460)]],
                         ids=["ts-ws-sack", "ts-sack", "ws-sack", "sack", "mss"])
def test_valid_ack_creates_the_entry_with_the_handshake_in_it(cookies, listeners, family, opts):
    e, synp, out, ack, t0, t1 = handshake(cookies, client(family, listeners[family]), opts)
    # The handshake map gave the SYN's own time and length, whatever options
    # the client offered; the SYN-ACK as sent.
    assert t0 <= e.first_ns <= t1
    assert (e.pkts[0], e.pkts[1]) == (2, 1)
    assert e.bytes[0] == synp.l3_len + ack.l3_len
    assert e.bytes[1] == len(out) - 14
    evs = cookies.events()
    assert [ev.type for ev in evs] == [abi.EV_CREATE]
    s = syn_stats(cookies)
    assert (s["syn_cookie_acks_valid"], s["syn_cookie_handshakes_estimated"]) == (1, 0)
    # the record was the ACK's: taken
    assert list(bpfsys.map_keys(cookies.dp.fd(f"ct_sc_hs{family}"), 16 if family == 4 else 40)) == []


@pytest.mark.parametrize("family", [4, 6])
def test_a_retransmitted_syn_is_counted_from_the_first(cookies, listeners, family):
    e, synp, out, ack, t0, t1 = handshake(cookies, client(family, listeners[family]), syns=3)
    assert t0 <= e.first_ns <= t1
    assert (e.pkts[0], e.pkts[1]) == (4, 3)
    assert e.bytes[0] == 3 * synp.l3_len + ack.l3_len
    assert e.bytes[1] == 3 * (len(out) - 14)


@pytest.mark.parametrize("family", [4, 6])
def test_a_new_isn_on_the_same_tuple_starts_a_new_handshake(cookies, listeners, family):
    f = client(family, listeners[family])
    warm(cookies, f)
    assert run(cookies, syn(f, seq=5000))[0] == XDP_TX      # an abandoned attempt
    e, synp, out, ack, t0, t1 = handshake(cookies, f, warmed=True)   # ISN 1000
    assert t0 <= e.first_ns <= t1
    assert (e.pkts[0], e.pkts[1]) == (2, 1)
    assert e.bytes[0] == synp.l3_len + ack.l3_len


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("opts", [OPTS_TS, OPTS_PLAIN], ids=["ts", "no-ts"])
def test_without_the_handshake_record_the_cookie_tells_what_it_can(cookies, listeners, family,
                                                                   opts):
    """A handshake whose record a flood evicted: a Linux client's SYN length
    from the options the cookie carries, the time from the echoed timestamp
    (within 65 ms) or, without timestamps, the ACK's; counted."""
    e, synp, out, ack, t0, t1 = handshake(cookies, client(family, listeners[family]), opts,
                                          forget=True)
    assert (e.pkts[0], e.pkts[1]) == (2, 1)
    assert e.bytes[0] == synp.l3_len + ack.l3_len
    assert e.bytes[1] == len(out) - 14
    if opts is OPTS_TS:
        # TSval is whole ms with its low 6 bits the options; the ACK's
        # sub-millisecond part stands for the SYN's
        assert t0 - 65_000_000 <= e.first_ns <= t1 + 1_000_000
    else:
        assert e.first_ns > t1 and e.first_ns == e.last_ns
    assert syn_stats(cookies)["syn_cookie_handshakes_estimated"] == 1


@pytest.mark.parametrize("family", [4, 6])
def test_forged_ack_is_dropped_and_counted(cookies, listeners, family):
    f = client(family, listeners[family])
    warm(cookies, f)
    _, out = run(cookies, syn(f))
    _, tcp, _ = synack_of(out, family)
    # a wrong hash (the low bits are the MSS index: +1 may be another valid MSS)
    v, _ = run(cookies, ack_for(f, tcp, delta=0x10000))
    assert v == XDP_DROP
    other = client(family, listeners[family], sport=40001)
    v, _ = run(cookies, ack_for(other, tcp))            # another tuple's cookie
    assert v == XDP_DROP
    assert cookies.table(family) == {}
    assert cookies.events() == []
    assert syn_stats(cookies)["syn_cookie_acks_invalid"] == 2


def test_vlan_tagged_syn_keeps_its_tag(cookies, listeners):
    f = client(4, listeners[4], vlans=(42,))
    warm(cookies, f)
    v, out = run(cookies, syn(f))
    assert v == XDP_TX
    eth = Ether(out)
    assert eth[Dot1Q].vlan == 42
    assert checksums_ok(eth, 4)
    _, tcp, _ = synack_of(out, 4)
    assert run(cookies, ack_for(f, tcp))[0] == XDP_PASS
    assert cookies.entry(f) is not None


def test_syn_to_no_listener_passes_untracked(cookies):
    f = Flow("127.0.0.2", "127.0.0.1", "tcp", 40000, 9)   # discard: nobody listens here
    v, _ = run(cookies, syn(f))
    assert v == XDP_PASS
    assert cookies.table(4) == {}
    assert cookies.events() == []
    assert syn_stats(cookies)["syn_cookie_no_listener"] == 1


def test_other_traffic_is_tracked_as_before(cookies, listeners):
    """UDP, a connection the table already has, and a bare ACK to no
    listener take the usual path with cookies on."""
    u = Flow("127.0.0.2", "127.0.0.1", "udp", 5000, 53)
    assert run(cookies, u.orig())[0] == XDP_PASS
    assert cookies.entry(u) is not None
    t = Flow("127.0.0.2", "127.0.0.1", "tcp", 40010, 9)
    assert run(cookies, t.orig("A"))[0] == XDP_PASS          # mid-stream pickup
    assert cookies.entry(t).flags & abi.F_PICKUP
    assert syn_stats(cookies)["syn_cookies_sent"] == 0


def test_cookies_off_tracks_the_syn(bench, listeners):
    bench.reset()
    _reset_cookie_state(bench)
    f = client(4, listeners[4])
    assert run(bench, syn(f))[0] == XDP_PASS
    assert bench.entry(f).state_name == "SYN_SENT"
    assert syn_stats(bench) == {n: 0 for n in SYN_STAT}
    bench.reset()


def test_auto_answers_a_port_only_above_its_rate(cookies, listeners):
    cookies.configure(syn_cookies="auto", syn_cookie_rate=5, syn_cookie_high=0)
    verdicts = [run(cookies, syn(client(4, listeners[4], sport=41000 + i)))[0]
                for i in range(12)]
    # 5 SYNs a window are tracked; the 6th is above the rate: the first
    # cookie SYN goes to the kernel, the rest are answered from XDP.
    assert verdicts[:6] == [XDP_PASS] * 6
    assert verdicts[6:] == [XDP_TX] * 6
    assert len(cookies.table(4)) == 5
    s = syn_stats(cookies)
    assert s["syn_cookie_auto"] == 6 and s["syn_cookie_kernel_syns"] == 1


def test_ecn_is_offered_back_through_the_timestamp(cookies, listeners):
    f = client(4, listeners[4])
    warm(cookies, f)
    v, out = run(cookies, syn(f, flags="SEC"))      # ECE and CWR: the client asks for ECN
    assert v == XDP_TX
    _, tcp, _ = synack_of(out, 4)
    assert tcp.flags == "SAE"
    assert dict(tcp.options)["Timestamp"][0] & 0x20
    v, out = run(cookies, syn(client(4, listeners[4], sport=40002), OPTS_PLAIN, flags="SEC"))
    _, tcp, _ = synack_of(out, 4)
    assert tcp.flags == "SA"                          # no timestamp to carry it: no ECN


def test_auto_answers_every_port_above_the_table_watermark(cookies, listeners):
    cookies.configure(syn_cookies="auto", syn_cookie_rate=0, syn_cookie_high=0.01)
    f = client(4, listeners[4], sport=42000)
    assert run(cookies, syn(f))[0] == XDP_PASS        # 0 of 4096 entries: tracked
    assert cookies.entry(f).state_name == "SYN_SENT"
    for i in range(41):                                # 42 entries: above 1 % of 4096
        run(cookies, Flow("127.0.0.2", "127.0.0.1", "udp", 20000 + i, 53).orig())
    g = client(4, listeners[4], sport=42001)
    warm(cookies, g)
    assert run(cookies, syn(g))[0] == XDP_TX
    assert cookies.entry(g) is None


def test_a_cookie_made_now_for_the_stale_check(cookies, listeners):
    """Valid now; tests/netns/test_syn_cookies.py sends it again at least
    STALE_AFTER_S later and wants it dropped."""
    f = client(4, listeners[4], sport=40600)
    warm(cookies, f)
    _, out = run(cookies, syn(f))
    _, tcp, _ = synack_of(out, 4)
    ack = ack_for(f, tcp)
    assert run(cookies, ack)[0] == XDP_PASS
    STALE.update(ack=ack, port=listeners[4], made=time.monotonic())
