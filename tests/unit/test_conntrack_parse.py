"""parse_conntrack_output() against real `conntrack -L` output.

Every line below was captured on the project's test machine (Linux 6.18,
conntrack-tools 1.4.7) from the server namespace of a streamer.demo.testbed pair
(nf_conntrack_acct=1 unless noted), after tcp_exchange(1000, 3000),
udp_exchange(3, 100), ping(2) in both families, a held-open TCP connection, a
SYN and a datagram that the peer dropped, and raw GRE / protocol-253 packets.
"""

import pytest

from streamer.demo.testbed import KernelFlow, parse_conntrack_output

EXTENDED = """\
ipv4     2 icmp     1 29 src=198.18.0.1 dst=198.18.0.2 type=8 code=0 id=19460 packets=2 bytes=168 src=198.18.0.2 dst=198.18.0.1 type=0 code=0 id=19460 packets=2 bytes=168 mark=0 use=1
ipv4     2 tcp      6 431998 ESTABLISHED src=198.18.0.1 dst=198.18.0.2 sport=60284 dport=6000 packets=3 bytes=169 src=198.18.0.2 dst=198.18.0.1 sport=6000 dport=60284 packets=2 bytes=112 [ASSURED] mark=0 use=1
ipv4     2 tcp      6 118 SYN_SENT src=198.18.0.2 dst=198.18.0.1 sport=40606 dport=7 packets=1 bytes=60 [UNREPLIED] src=198.18.0.1 dst=198.18.0.2 sport=7 dport=40606 packets=0 bytes=0 mark=0 use=1
ipv4     2 udp      17 28 src=198.18.0.2 dst=198.18.0.1 sport=55246 dport=7 packets=1 bytes=48 [UNREPLIED] src=198.18.0.1 dst=198.18.0.2 sport=7 dport=55246 packets=0 bytes=0 mark=0 use=1
ipv4     2 udp      17 29 src=198.18.0.1 dst=198.18.0.2 sport=51572 dport=5002 packets=3 bytes=384 src=198.18.0.2 dst=198.18.0.1 sport=5002 dport=51572 packets=3 bytes=384 mark=0 use=1
ipv4     2 tcp      6 119 TIME_WAIT src=198.18.0.1 dst=198.18.0.2 sport=48980 dport=5001 packets=8 bytes=1424 src=198.18.0.2 dst=198.18.0.1 sport=5001 dport=48980 packets=6 bytes=3320 [ASSURED] mark=0 use=1
ipv6     10 tcp      6 119 TIME_WAIT src=2001:2::1 dst=2001:2::2 sport=55686 dport=5001 packets=8 bytes=1584 src=2001:2::2 dst=2001:2::1 sport=5001 dport=55686 packets=6 bytes=3440 [ASSURED] mark=0 use=1
ipv6     10 icmpv6   58 29 src=2001:2::1 dst=2001:2::2 type=128 code=0 id=44569 packets=2 bytes=208 src=2001:2::2 dst=2001:2::1 type=129 code=0 id=44569 packets=2 bytes=208 mark=0 use=1
ipv6     10 tcp      6 118 SYN_SENT src=2001:2::2 dst=2001:2::1 sport=44332 dport=7 packets=1 bytes=80 [UNREPLIED] src=2001:2::1 dst=2001:2::2 sport=7 dport=44332 packets=0 bytes=0 mark=0 use=1
ipv6     10 tcp      6 431998 ESTABLISHED src=2001:2::1 dst=2001:2::2 sport=41350 dport=6000 packets=3 bytes=230 src=2001:2::2 dst=2001:2::1 sport=6000 dport=41350 packets=2 bytes=152 [ASSURED] mark=0 use=1
ipv6     10 udp      17 28 src=2001:2::2 dst=2001:2::1 sport=53583 dport=7 packets=1 bytes=68 [UNREPLIED] src=2001:2::1 dst=2001:2::2 sport=7 dport=53583 packets=0 bytes=0 mark=0 use=1
ipv6     10 udp      17 29 src=2001:2::1 dst=2001:2::2 sport=34684 dport=5002 packets=3 bytes=444 src=2001:2::2 dst=2001:2::1 sport=5002 dport=34684 packets=3 bytes=444 mark=0 use=1
"""

# The same table, `conntrack -L` without -o extended (no "ipv4 2" prefix).
PLAIN = """\
tcp      6 119 TIME_WAIT src=2001:2::1 dst=2001:2::2 sport=55686 dport=5001 packets=8 bytes=1584 src=2001:2::2 dst=2001:2::1 sport=5001 dport=55686 packets=6 bytes=3440 [ASSURED] mark=0 use=1
icmpv6   58 29 src=2001:2::1 dst=2001:2::2 type=128 code=0 id=44569 packets=2 bytes=208 src=2001:2::2 dst=2001:2::1 type=129 code=0 id=44569 packets=2 bytes=208 mark=0 use=1
icmp     1 29 src=198.18.0.1 dst=198.18.0.2 type=8 code=0 id=19460 packets=2 bytes=168 src=198.18.0.2 dst=198.18.0.1 type=0 code=0 id=19460 packets=2 bytes=168 mark=0 use=1
tcp      6 431998 ESTABLISHED src=198.18.0.1 dst=198.18.0.2 sport=60284 dport=6000 packets=3 bytes=169 src=198.18.0.2 dst=198.18.0.1 sport=6000 dport=60284 packets=2 bytes=112 [ASSURED] mark=0 use=1
tcp      6 118 SYN_SENT src=198.18.0.2 dst=198.18.0.1 sport=40606 dport=7 packets=1 bytes=60 [UNREPLIED] src=198.18.0.1 dst=198.18.0.2 sport=7 dport=40606 packets=0 bytes=0 mark=0 use=1
tcp      6 118 SYN_SENT src=2001:2::2 dst=2001:2::1 sport=44332 dport=7 packets=1 bytes=80 [UNREPLIED] src=2001:2::1 dst=2001:2::2 sport=7 dport=44332 packets=0 bytes=0 mark=0 use=1
tcp      6 431998 ESTABLISHED src=2001:2::1 dst=2001:2::2 sport=41350 dport=6000 packets=3 bytes=230 src=2001:2::2 dst=2001:2::1 sport=6000 dport=41350 packets=2 bytes=152 [ASSURED] mark=0 use=1
udp      17 28 src=198.18.0.2 dst=198.18.0.1 sport=55246 dport=7 packets=1 bytes=48 [UNREPLIED] src=198.18.0.1 dst=198.18.0.2 sport=7 dport=55246 packets=0 bytes=0 mark=0 use=1
udp      17 29 src=198.18.0.1 dst=198.18.0.2 sport=51572 dport=5002 packets=3 bytes=384 src=198.18.0.2 dst=198.18.0.1 sport=5002 dport=51572 packets=3 bytes=384 mark=0 use=1
udp      17 28 src=2001:2::2 dst=2001:2::1 sport=53583 dport=7 packets=1 bytes=68 [UNREPLIED] src=2001:2::1 dst=2001:2::2 sport=7 dport=53583 packets=0 bytes=0 mark=0 use=1
udp      17 29 src=2001:2::1 dst=2001:2::2 sport=34684 dport=5002 packets=3 bytes=444 src=2001:2::2 dst=2001:2::1 sport=5002 dport=34684 packets=3 bytes=444 mark=0 use=1
tcp      6 119 TIME_WAIT src=198.18.0.1 dst=198.18.0.2 sport=48980 dport=5001 packets=8 bytes=1424 src=198.18.0.2 dst=198.18.0.1 sport=5001 dport=48980 packets=6 bytes=3320 [ASSURED] mark=0 use=1
"""

# nf_conntrack_acct=0: no packets=/bytes= fields.
NO_ACCT = """\
ipv4     2 udp      17 29 src=198.18.0.1 dst=198.18.0.2 sport=45090 dport=5002 src=198.18.0.2 dst=198.18.0.1 sport=5002 dport=45090 mark=0 use=1
ipv6     10 icmpv6   58 29 src=2001:2::1 dst=2001:2::2 type=128 code=0 id=28604 src=2001:2::2 dst=2001:2::1 type=129 code=0 id=28604 mark=0 use=1
"""

# Protocols other than tcp/udp/icmp/icmpv6 (raw GRE and protocol 253).
OTHER_PROTOS = """\
ipv4     2 gre      47 29 src=198.18.0.1 dst=198.18.0.2 srckey=0x0 dstkey=0x0 packets=1 bytes=44 [UNREPLIED] src=198.18.0.2 dst=198.18.0.1 srckey=0x0 dstkey=0x0 packets=0 bytes=0 mark=0 use=1
ipv4     2 unknown  253 599 src=198.18.0.1 dst=198.18.0.2 packets=1 bytes=32 [UNREPLIED] src=198.18.0.2 dst=198.18.0.1 packets=0 bytes=0 mark=0 use=1
"""


def _by(flows, proto, sport):
    (f,) = [f for f in flows if f.proto == proto and f.sport == sport]
    return f


def test_parses_every_line():
    flows = parse_conntrack_output(EXTENDED)
    assert len(flows) == 12
    assert all(isinstance(f, KernelFlow) for f in flows)
    assert sum(f.family == 4 for f in flows) == 6
    assert sum(f.family == 6 for f in flows) == 6


def test_tcp_time_wait_v4():
    f = _by(parse_conntrack_output(EXTENDED), "tcp", 48980)
    assert f == KernelFlow(
        family=4, proto="tcp", src="198.18.0.1", dst="198.18.0.2",
        sport=48980, dport=5001, state="TIME_WAIT",
        packets_orig=8, bytes_orig=1424, packets_reply=6, bytes_reply=3320,
        assured=True, unreplied=False, timeout=119,
    )


def test_tcp_established_v6():
    f = _by(parse_conntrack_output(EXTENDED), "tcp", 41350)
    assert (f.family, f.src, f.dst, f.dport) == (6, "2001:2::1", "2001:2::2", 6000)
    assert f.state == "ESTABLISHED"
    assert (f.packets_orig, f.bytes_orig, f.packets_reply, f.bytes_reply) == (3, 230, 2, 152)
    assert f.assured and not f.unreplied
    assert f.timeout == 431998


@pytest.mark.parametrize("sport,family,nbytes", [(40606, 4, 60), (44332, 6, 80)])
def test_tcp_syn_sent_unreplied(sport, family, nbytes):
    f = _by(parse_conntrack_output(EXTENDED), "tcp", sport)
    assert f.family == family
    assert f.state == "SYN_SENT"
    assert f.dport == 7
    assert f.unreplied and not f.assured
    assert (f.packets_orig, f.bytes_orig, f.packets_reply, f.bytes_reply) == (1, nbytes, 0, 0)


def test_udp_replied_and_unreplied():
    flows = parse_conntrack_output(EXTENDED)
    f = _by(flows, "udp", 51572)
    assert (f.src, f.dst, f.dport, f.state) == ("198.18.0.1", "198.18.0.2", 5002, None)
    assert (f.packets_orig, f.bytes_orig, f.packets_reply, f.bytes_reply) == (3, 384, 3, 384)
    assert not f.assured and not f.unreplied
    u = _by(flows, "udp", 53583)
    assert (u.family, u.src, u.dst, u.dport) == (6, "2001:2::2", "2001:2::1", 7)
    assert u.unreplied and not u.assured
    assert (u.packets_orig, u.bytes_orig, u.packets_reply, u.bytes_reply) == (1, 68, 0, 0)


def test_icmp_uses_echo_id_as_ports():
    flows = parse_conntrack_output(EXTENDED)
    f = _by(flows, "icmp", 19460)
    assert f == KernelFlow(
        family=4, proto="icmp", src="198.18.0.1", dst="198.18.0.2",
        sport=19460, dport=19460, state=None,
        packets_orig=2, bytes_orig=168, packets_reply=2, bytes_reply=168,
        assured=False, unreplied=False, timeout=29,
    )
    g = _by(flows, "icmpv6", 44569)
    assert (g.family, g.src, g.dst, g.dport, g.state) == (6, "2001:2::1", "2001:2::2", 44569, None)
    assert (g.packets_orig, g.bytes_orig, g.packets_reply, g.bytes_reply) == (2, 208, 2, 208)


def test_plain_format_gives_the_same_flows():
    assert set(parse_conntrack_output(PLAIN)) == set(parse_conntrack_output(EXTENDED))


def test_without_accounting_counters_are_zero():
    u, i = parse_conntrack_output(NO_ACCT)
    assert (u.proto, u.sport, u.dport) == ("udp", 45090, 5002)
    assert (i.proto, i.family, i.sport) == ("icmpv6", 6, 28604)
    for f in (u, i):
        assert (f.packets_orig, f.bytes_orig, f.packets_reply, f.bytes_reply) == (0, 0, 0, 0)


def test_other_protocols_are_skipped():
    assert parse_conntrack_output(OTHER_PROTOS) == []
    mixed = OTHER_PROTOS + EXTENDED.splitlines(keepends=True)[0]
    assert [f.proto for f in parse_conntrack_output(mixed)] == ["icmp"]


def test_skips_blank_lines_and_conntrack_messages():
    text = (
        "\n"
        + EXTENDED.splitlines()[1]
        + "\n\nconntrack v1.4.7 (conntrack-tools): 12 flow entries have been shown.\n"
    )
    (f,) = parse_conntrack_output(text)
    assert f.sport == 60284


def test_empty_output():
    assert parse_conntrack_output("") == []
    assert parse_conntrack_output(
        "conntrack v1.4.7 (conntrack-tools): 0 flow entries have been shown.\n") == []


def test_ipv6_addresses_are_normalised():
    line = EXTENDED.splitlines()[6].replace("src=2001:2::1 ", "src=2001:0002:0000:0000::0001 ", 1)
    (f,) = parse_conntrack_output(line)
    assert f.src == "2001:2::1"


@pytest.mark.parametrize(
    "line",
    [
        # cut after the original tuple: no reply tuple
        "ipv4     2 tcp      6 119 TIME_WAIT src=198.18.0.1 dst=198.18.0.2 sport=48980 dport=5001 packets=8 bytes=1424",
        # tcp without ports
        "ipv4     2 tcp      6 119 TIME_WAIT src=198.18.0.1 dst=198.18.0.2 packets=8 src=198.18.0.2 dst=198.18.0.1 packets=6",
        # bad address
        "ipv4     2 udp      17 29 src=198.18.0.999 dst=198.18.0.2 sport=1 dport=2 src=198.18.0.2 dst=198.18.0.999 sport=2 dport=1",
        # family prefix does not match the addresses
        "ipv6     10 udp      17 29 src=198.18.0.1 dst=198.18.0.2 sport=1 dport=2 src=198.18.0.2 dst=198.18.0.1 sport=2 dport=1",
        # icmp without id
        "ipv4     2 icmp     1 29 src=198.18.0.1 dst=198.18.0.2 type=8 code=0 src=198.18.0.2 dst=198.18.0.1 type=0 code=0",
        # bad timeout
        "ipv4     2 udp      17 xx src=198.18.0.1 dst=198.18.0.2 sport=1 dport=2 src=198.18.0.2 dst=198.18.0.1 sport=2 dport=1",
    ],
)
def test_malformed_lines_raise(line):
    with pytest.raises(ValueError):
        parse_conntrack_output(line)


def test_kernelflow_is_hashable_and_frozen():
    f = parse_conntrack_output(EXTENDED)[0]
    assert f in {f}
    with pytest.raises(AttributeError):
        f.sport = 1  # type: ignore[misc]
