"""streamer.export: the IPFIX encoder byte for byte against values worked out
by hand from RFC 7011/5103 and the IANA registry (and against scapy's IPFIX
parser where it can read them), the collector connection against real
loopback sockets, and the exporter's batch step (export, then commit)
against a fake consumer."""

from __future__ import annotations

import asyncio
import socket
import struct
import subprocess
import sys
import threading

import pytest

from streamer.delivery import wire
from streamer.errors import ConfigError, ExportError, WireError
from streamer.export import collector as collector_mod
from streamer.export import exporter, ipfix
from streamer.export.collector import Collector, CollectorAddress

TCP_V4 = dict(
    eventType="DESTROY", sourceIPv4Address="198.18.0.1", destinationIPv4Address="198.18.0.2",
    sourceTransportPort=40000, destinationTransportPort=80, protocolIdentifier=6, vlanId=7,
    flowStartMilliseconds=1700000000123, flowEndMilliseconds=1700000004567, flowEndReason=3,
    tcpControlBitsInitiator=0x1B, tcpControlBitsResponder=0x12,
    initiatorOctets=1234, initiatorPackets=12, responderOctets=99999, responderPackets=77)
ICMP_V6 = dict(
    eventType="DESTROY", sourceIPv6Address="2001:2::1", destinationIPv6Address="2001:2::2",
    sourceTransportPort=4321, destinationTransportPort=4321, protocolIdentifier=58, vlanId=0,
    flowStartMilliseconds=1700000000123, flowEndMilliseconds=1700000004567, flowEndReason=1,
    tcpControlBitsInitiator=0, tcpControlBitsResponder=0,
    initiatorOctets=208, initiatorPackets=2, responderOctets=104, responderPackets=1)

# Field specifiers (id, length), the reverse ones with PEN 29305 = 0x7279.
V4_TEMPLATE_RECORD = bytes.fromhex(
    "0100 0011"                      # template 256, 17 fields
    "0008 0004 000c 0004"            # sourceIPv4Address, destinationIPv4Address
    "0007 0002 000b 0002"            # ports
    "0004 0001 0020 0002"            # protocolIdentifier, icmpTypeCodeIPv4
    "003a 0002"                      # vlanId
    "0098 0008 0099 0008"            # flowStart/EndMilliseconds
    "0088 0001 00ef 0001"            # flowEndReason, biflowDirection
    "8006 0001 00007279"             # reverse tcpControlBits
    "0006 0001"                      # tcpControlBits
    "0001 0008 0002 0008"            # octetDeltaCount, packetDeltaCount
    "8001 0008 00007279 8002 0008 00007279")  # their reverses
V6_TEMPLATE_RECORD = bytes.fromhex(
    "0101 0011 001b 0010 001c 0010 0007 0002 000b 0002 0004 0001 008b 0002 003a 0002"
    "0098 0008 0099 0008 0088 0001 00ef 0001 8006 0001 00007279 0006 0001"
    "0001 0008 0002 0008 8001 0008 00007279 8002 0008 00007279")
TCP_V4_DATA = bytes.fromhex(
    "c6120001 c6120002"              # 198.18.0.1 -> 198.18.0.2
    "9c40 0050 06 0000 0007"         # 40000 -> 80, TCP, no ICMP type, VLAN 7
    "0000018bcfe5687b 0000018bcfe579d7"   # 1700000000123, 1700000004567 ms
    "03 01 12 1b"                    # endOfFlowDetected, initiator, flags SA / ACK|PSH|SYN|FIN
    "00000000000004d2 000000000000000c"   # 1234 octets, 12 packets
    "000000000001869f 000000000000004d")  # 99999 octets, 77 packets
ICMP_V6_DATA = bytes.fromhex(
    "20010002000000000000000000000001 20010002000000000000000000000002"
    "0000 0000 3a 8000 0000"         # no ports, ICMPv6, echo request 128/0, untagged
    "0000018bcfe5687b 0000018bcfe579d7 01 01 00 00"
    "00000000000000d0 0000000000000002 0000000000000068 0000000000000001")
EXPORT_TIME = 0x6553F10A             # 1700000010


def test_template_records_byte_for_byte():
    assert ipfix.TEMPLATES[4].record() == V4_TEMPLATE_RECORD
    assert ipfix.TEMPLATES[6].record() == V6_TEMPLATE_RECORD
    assert len(V4_TEMPLATE_RECORD) == 4 + 17 * 4 + 3 * 4


def test_template_message_byte_for_byte():
    enc = ipfix.MessageEncoder(domain=7, max_message=1400)
    msg = enc.templates(EXPORT_TIME)
    body = bytes.fromhex("0002 00ac") + V4_TEMPLATE_RECORD + V6_TEMPLATE_RECORD   # set 2, 172 bytes
    assert msg == bytes.fromhex("000a 00bc 6553f10a 00000000 00000007") + body
    assert enc.sequence == 0          # template records are not counted


def test_data_records_byte_for_byte():
    assert ipfix.biflow_of(TCP_V4).encode() == TCP_V4_DATA
    assert ipfix.biflow_of(ICMP_V6).encode() == ICMP_V6_DATA
    assert len(TCP_V4_DATA) == ipfix.TEMPLATES[4].layout.size == 69


def test_data_message_sets_and_sequence():
    enc = ipfix.MessageEncoder(domain=7, max_message=1400)
    enc.sequence = 5
    [msg] = enc.data([ipfix.biflow_of(TCP_V4), ipfix.biflow_of(TCP_V4),
                      ipfix.biflow_of(ICMP_V6)], EXPORT_TIME)
    v4_set = bytes.fromhex("0100 008e") + TCP_V4_DATA * 2      # 4 + 2 * 69 = 142
    v6_set = bytes.fromhex("0101 0061") + ICMP_V6_DATA         # 4 + 93 = 97
    assert msg == bytes.fromhex("000a 00ff 6553f10a 00000005 00000007") + v4_set + v6_set
    assert enc.sequence == 8


def test_messages_split_at_the_size_limit_and_count_every_record():
    enc = ipfix.MessageEncoder(domain=1, max_message=400)
    flows = [ipfix.biflow_of(TCP_V4 if i % 3 else ICMP_V6) for i in range(50)]
    msgs = enc.data(flows, EXPORT_TIME)
    seqs, records = [], 0
    for m in msgs:
        version, length, _, seq, _ = struct.unpack("!HHIII", m[:16])
        assert (version, length) == (10, len(m)) and len(m) <= 400
        seqs.append(seq)
        off = 16
        while off < len(m):
            set_id, set_len = struct.unpack("!HH", m[off:off + 4])
            size = ipfix.TEMPLATES[4 if set_id == 256 else 6].layout.size
            assert (set_len - 4) % size == 0
            records += (set_len - 4) // size
            off += set_len
        assert off == len(m)
    assert records == 50 and enc.sequence == 50
    # Each header counts the records of the messages before it.
    sizes = [b - a for a, b in zip(seqs, seqs[1:] + [50])]
    assert seqs[0] == 0 and all(s > 0 for s in sizes) and len(msgs) > 5


def test_sequence_wraps_modulo_2_32():
    enc = ipfix.MessageEncoder(domain=1, max_message=1400)
    enc.sequence = 2**32 - 1
    [m] = enc.data([ipfix.biflow_of(TCP_V4)] * 2, EXPORT_TIME)
    assert struct.unpack("!I", m[8:12])[0] == 2**32 - 1 and enc.sequence == 1


def test_scapy_reads_the_header_and_the_templates():
    from scapy.layers.netflow import (NetflowDataflowsetV9, NetflowFlowsetV9, NetflowHeader,
                                      NetflowHeaderV10)

    enc = ipfix.MessageEncoder(domain=7, max_message=1400)
    t = NetflowHeader(enc.templates(EXPORT_TIME))
    assert t.version == 10 and t[NetflowHeaderV10].ObservationDomainID == 7
    fields = {tpl.templateID: [(f.enterpriseBit, f.fieldType, f.fieldLength,
                                f.enterpriseNumber if f.enterpriseBit else 0)
                               for f in tpl.template_fields]
              for tpl in t[NetflowFlowsetV9].templates}
    assert sorted(fields) == [256, 257]
    assert fields[256][-3:] == [(0, 2, 8, 0), (1, 1, 8, 29305), (1, 2, 8, 29305)]
    assert (0, 27, 16, 0) in fields[257] and (0, 139, 2, 0) in fields[257]
    d = NetflowHeader(enc.data([ipfix.biflow_of(TCP_V4)] * 3, EXPORT_TIME)[0])
    assert d[NetflowHeaderV10].length == 16 + 4 + 3 * 69
    ds = d[NetflowDataflowsetV9]
    assert (ds.templateID, ds.length) == (256, 4 + 3 * 69)
    # scapy cannot name two fields alike (a reverse element beside its
    # forward one): read the record bytes, not scapy's record layer.
    assert bytes(ds.records[0].fieldValue) == TCP_V4_DATA * 3


def test_v2_flag_names_win_over_v1():
    v2 = dict(TCP_V4, tcpControlBits=0x02, reverseTcpControlBits=0x12)
    flow = ipfix.biflow_of(v2)
    assert (flow.tcp_flags, flow.reverse_tcp_flags) == (0x02, 0x12)
    bare = {k: v for k, v in TCP_V4.items() if not k.startswith("tcpControlBits")}
    assert (ipfix.biflow_of(bare).tcp_flags, ipfix.biflow_of(bare).reverse_tcp_flags) == (0, 0)


def test_icmp_v4_is_an_echo_request_without_ports():
    rec = dict(TCP_V4, protocolIdentifier=1, sourceTransportPort=777, destinationTransportPort=777)
    flow = ipfix.biflow_of(rec)
    assert (flow.source_port, flow.destination_port, flow.icmp_type_code) == (0, 0, 0x0800)
    assert ipfix.biflow_of(dict(TCP_V4, protocolIdentifier=17)).icmp_type_code == 0


@pytest.mark.parametrize("change, words", [
    ({"initiatorOctets": None}, "initiatorOctets None"),
    ({"initiatorOctets": -1}, "initiatorOctets -1"),
    ({"responderPackets": 2**64}, "responderPackets"),
    ({"flowEndReason": True}, "flowEndReason True"),
    ({"sourceIPv4Address": "2001:2::1"}, "not an IPv4 address"),
    ({"destinationIPv4Address": "nope"}, "not an IP address"),
    ({"sourceTransportPort": 65536}, "sourceTransportPort"),
])
def test_bad_destroys_are_wire_errors(change, words):
    with pytest.raises(WireError, match=words):
        ipfix.biflow_of(dict(TCP_V4, **change))


def test_a_missing_field_is_a_wire_error():
    rec = dict(TCP_V4)
    del rec["flowStartMilliseconds"]
    with pytest.raises(WireError, match="without 'flowStartMilliseconds'"):
        ipfix.biflow_of(rec)


def test_encoder_refuses_what_it_cannot_carry():
    with pytest.raises(ValueError):
        ipfix.MessageEncoder(domain=2**32, max_message=1400)
    with pytest.raises(ValueError):
        ipfix.MessageEncoder(domain=1, max_message=150)      # the templates need 188


# --- the collector connection (real loopback sockets) ------------------------------------

@pytest.mark.parametrize("text, transport, words", [
    ("127.0.0.1", "udp", "not HOST:PORT"),
    ("127.0.0.1:0", "udp", "not HOST:PORT"),
    ("[::1]:70000", "tcp", "not HOST:PORT"),
    ("127.0.0.1:4739", "sctp", "not one of udp, tcp"),
])
def test_bad_collector_addresses(text, transport, words):
    with pytest.raises(ConfigError, match=words):
        CollectorAddress.parse(text, transport)


def test_collector_address_forms():
    assert CollectorAddress.parse("[::1]:4739", "tcp") == CollectorAddress("::1", 4739, "tcp")
    assert str(CollectorAddress.parse("[::1]:4739", "tcp")) == "[::1]:4739 over TCP"


def closed_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tcp_collector_that_refuses_fails_at_open():
    col = Collector(CollectorAddress("127.0.0.1", closed_port(socket.SOCK_STREAM), "tcp"), 1, 60)
    with pytest.raises(ExportError, match="cannot reach the IPFIX collector at 127.0.0.1:.* "
                                          "over TCP: Connection refused"):
        asyncio.run(col.open())


def test_udp_port_unreachable_is_reported_at_open():
    """Nothing listens: the kernel answers the templates' datagram with ICMP
    port unreachable, which the connected socket reports."""
    col = Collector(CollectorAddress("127.0.0.1", closed_port(socket.SOCK_DGRAM), "udp"), 1, 60)
    with pytest.raises(ExportError, match="is not listening .ICMP port unreachable"):
        asyncio.run(col.open())
    col.close()


def test_udp_collector_gets_templates_first_and_again_after_the_interval():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        server.settimeout(5)
        addr = CollectorAddress("127.0.0.1", server.getsockname()[1], "udp")

        async def run() -> None:
            col = Collector(addr, 9, template_interval_s=3600)
            await col.open()
            await col.send([ipfix.biflow_of(TCP_V4)])
            col.templates_at -= 3600          # as if the interval had passed
            await col.send([ipfix.biflow_of(ICMP_V6)])
            await col.confirm()
            col.close()

        asyncio.run(run())
        got = [server.recv(65535) for _ in range(4)]
    set_ids = [struct.unpack("!H", m[16:18])[0] for m in got]
    assert set_ids == [2, 256, 2, 257]
    assert [struct.unpack("!I", m[8:12])[0] for m in got] == [0, 0, 1, 1]
    assert all(struct.unpack("!I", m[12:16])[0] == 9 for m in got)


def test_tcp_confirm_returns_once_the_collector_has_every_byte():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        addr = CollectorAddress("127.0.0.1", server.getsockname()[1], "tcp")
        received = bytearray()

        def serve() -> None:
            conn, _ = server.accept()
            with conn:
                while chunk := conn.recv(65536):
                    received.extend(chunk)

        t = threading.Thread(target=serve, daemon=True)
        t.start()

        async def run() -> tuple[int, int]:
            col = Collector(addr, 1, 60)
            await col.open()
            messages = await col.send([ipfix.biflow_of(TCP_V4)] * 1000)
            await col.confirm()
            unacked = collector_mod._outq(col.sock)
            col.close()
            return unacked, messages

        unacked, messages = asyncio.run(run())
        t.join(10)
    assert unacked == 0
    # One family: each data message is a header and one set.
    assert len(received) == 188 + messages * (16 + 4) + 1000 * 69
    assert received[16:18] == b"\x00\x02"      # the templates open the session


def test_tcp_confirm_fails_when_the_collector_resets():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        addr = CollectorAddress("127.0.0.1", server.getsockname()[1], "tcp")

        async def run() -> None:
            col = Collector(addr, 1, 60)
            await col.open()
            conn, _ = server.accept()
            # Close with unread data: the kernel sends a reset.
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()
            try:
                for _ in range(50):
                    await col.send([ipfix.biflow_of(TCP_V4)] * 100)
                    await col.confirm()
            finally:
                col.close()

        with pytest.raises(ExportError, match="(failed|closed the connection)"):
            asyncio.run(run())


# --- the batch step: export, then commit ---------------------------------------------------

class FakeMessage:
    def __init__(self, partition: int, offset: int, record: dict | bytes):
        self.partition, self.offset = partition, offset
        self.value = record if isinstance(record, bytes) else wire.encode(record)


class FakeTP:
    def __init__(self, partition: int):
        self.topic, self.partition = "t", partition

    def __hash__(self):
        return hash(self.partition)

    def __eq__(self, other):
        return self.partition == other.partition


class FakeConsumer:
    def __init__(self, log: list):
        self.log = log

    async def commit(self, offsets):
        self.log.append(("commit", {tp.partition: o for tp, o in offsets.items()}))


class FakeCollector:
    def __init__(self, log: list, fail: bool = False):
        self.log, self.fail = log, fail
        self.encoder = ipfix.MessageEncoder(1, 1400)

    async def send(self, flows):
        self.log.append(("send", len(flows)))
        return 1

    async def confirm(self):
        if self.fail:
            raise ExportError("collector gone")
        self.log.append(("confirm",))


def batch_of(*items) -> dict:
    out: dict = {}
    for partition, offset, record in items:
        out.setdefault(FakeTP(partition), []).append(FakeMessage(partition, offset, record))
    return out


def test_a_batch_is_committed_after_its_export_and_other_types_are_skipped():
    log: list = []
    stats = exporter.ExportStats()
    batch = batch_of((0, 10, TCP_V4), (0, 11, dict(TCP_V4, eventType="UPDATE")),
                     (2, 4, ICMP_V6), (2, 5, b"\xc1 not msgpack"),
                     (2, 6, dict(TCP_V4, initiatorOctets=-5)))
    asyncio.run(exporter._export_batch(FakeConsumer(log), FakeCollector(log), batch, stats, None))
    assert log == [("send", 2), ("confirm",), ("commit", {0: 12, 2: 7})]
    assert (stats.records, stats.exported, stats.skipped, stats.rejected) == (5, 2, 1, 2)


def test_a_failed_export_commits_nothing():
    log: list = []
    with pytest.raises(ExportError):
        asyncio.run(exporter._export_batch(FakeConsumer(log), FakeCollector(log, fail=True),
                                           batch_of((0, 0, TCP_V4)), exporter.ExportStats(), None))
    assert not [e for e in log if e[0] == "commit"]


def test_a_batch_without_destroys_is_committed_without_sending():
    log: list = []
    batch = batch_of((1, 3, dict(TCP_V4, eventType="CREATE")))
    asyncio.run(exporter._export_batch(FakeConsumer(log), FakeCollector(log), batch,
                                       exporter.ExportStats(), None))
    assert log == [("commit", {1: 4})]


@pytest.mark.parametrize("kw, setting", [
    (dict(group=""), "group"),
    (dict(domain=2**32), "observation-domain"),
    (dict(template_interval_s=0.5), "template-interval"),
    (dict(until_idle=0.0), "until-idle"),
    (dict(session_timeout_s=5), "session-timeout"),
])
def test_bad_options_name_their_setting(kw, setting):
    args = dict(group="g", domain=1, template_interval_s=60.0, until_idle=None,
                session_timeout_s=10.0)
    args.update(kw)
    with pytest.raises(ConfigError) as info:
        exporter.check_options(**args)
    assert info.value.setting == setting


# --- the command line ------------------------------------------------------------------------

def ctstream(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamer.cli", *argv], capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("argv, rc, words", [
    (["--topic", "t", "--collector", "127.0.0.1:4739"], 2, "ipfix needs --kafka"),
    (["--kafka", "127.0.0.1:9", "--topic", "t", "--collector", "nohost"], 2,
     "--collector: collector 'nohost' is not HOST:PORT"),
    (["--kafka", "127.0.0.1:9", "--topic", "t", "--collector", "127.0.0.1:4739",
      "--observation-domain", "-1"], 2, "--observation-domain: observation domain must be"),
])
def test_command_line_errors_are_one_line(argv, rc, words):
    res = ctstream("ipfix", *argv)
    assert res.returncode == rc, res.stderr
    assert words in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_a_refused_tcp_collector_ends_the_command_before_kafka():
    """No broker at 127.0.0.1:9 either: the collector is tried first."""
    port = closed_port(socket.SOCK_STREAM)
    res = ctstream("ipfix", "--kafka", "127.0.0.1:9", "--topic", "t",
                   "--collector", f"127.0.0.1:{port}", "--transport", "tcp")
    assert res.returncode == 1, res.stderr
    assert res.stderr.strip() == (f"ctstream: error: cannot reach the IPFIX collector at "
                                  f"127.0.0.1:{port} over TCP: Connection refused")


def test_config_file_values_are_located(tmp_path):
    cfg = tmp_path / "x.toml"
    cfg.write_text('kafka = "127.0.0.1:9"\ntopic = "t"\ncollector = "127.0.0.1:4739"\n'
                   'transport = "udp"\ntemplate-interval = 0.1\n')
    res = ctstream("ipfix", "--config", str(cfg))
    assert res.returncode == 2, res.stderr
    assert f"{cfg}:5: template-interval: template interval must be in [1, 86400]" in res.stderr


def test_a_udp_collector_that_nobody_listens_on_ends_the_command():
    port = closed_port(socket.SOCK_DGRAM)
    res = ctstream("ipfix", "--kafka", "127.0.0.1:9", "--topic", "t",
                   "--collector", f"127.0.0.1:{port}")
    assert res.returncode == 1, res.stderr
    assert res.stderr.strip() == (f"ctstream: error: the IPFIX collector at 127.0.0.1:{port} over "
                                  f"UDP is not listening (ICMP port unreachable: connection refused)")


def test_the_flags_of_a_record_the_daemon_makes_are_exported():
    """Whatever the schema version calls them: records.record_of's own record."""
    from streamer.datapath.events import Event
    from streamer.delivery import records

    ev = Event(type="DESTROY", family=4, proto="tcp", src="198.18.0.1", dst="198.18.0.2",
               sport=40000, dport=80, vlan=0, state="TIME_WAIT", assured=True, ct_id=1, seq=4,
               packets_orig=5, packets_reply=4, bytes_orig=400, bytes_reply=300, time_ms=2000,
               first_ms=1000, last_ms=1900, end_reason="fin", missed=0,
               tcp_flags_orig=0x1B, tcp_flags_reply=0x13)
    flow = ipfix.biflow_of(wire.decode(wire.encode(records.record_of(ev, "n"))))
    assert (flow.tcp_flags, flow.reverse_tcp_flags, flow.end_reason) == (0x1B, 0x13, 3)
    assert (flow.octets, flow.packets, flow.reverse_octets, flow.reverse_packets) == (400, 5, 300, 4)
