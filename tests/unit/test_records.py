"""streamer.delivery.records: every event the datapath makes becomes a record that the
v2 schema accepts and that survives the msgpack round trip; keys group the
events of a connection; a sink's events and LOST reports become the same
records."""

from __future__ import annotations

import random
import struct

import pytest

from streamer.datapath import abi
from streamer.delivery import records
from streamer.delivery import wire
from streamer.errors import ConfigError
from streamer.datapath.events import Clock, Event, LostReport

NODE = "gw-1"
U64_MAX = 2**64 - 1

V4 = (bytes([198, 18, 0, 1]) + bytes(12), bytes([198, 18, 0, 2]) + bytes(12))
V6 = (bytes.fromhex("20010002000000000000000000000001"),
      bytes.fromhex("20010002000000000000000000000002"))


def raw_event(**over) -> bytes:
    """One ct_event as the ring holds it (a TCP DESTROY unless changed)."""
    f = dict(type=abi.EV_DESTROY, version=abi.ABI_VERSION, len=abi.EVENT_SIZE, family=4, proto=6,
             state=abi.S_TIME_WAIT, flags=abi.F_ASSURED, ct_id=77, seq=5, end_reason=abi.END_FIN,
             missed=0, tcp_flags_orig=0x1B, tcp_flags_reply=0x13, ts_ns=3_000_000_000,
             first_ns=1_000_000_000, last_ns=2_000_000_000, pkts_orig=10, pkts_reply=8,
             bytes_orig=1000, bytes_reply=5000, saddr=V4[0], daddr=V4[1],
             sport=0x3930, dport=0x8913, vlan=0, dying=0, retries=0)
    f.update(over)
    return struct.pack(abi.EVENT.fmt, *[f[name] for name, _ in abi.EVENT.fields])


def event(**over) -> Event:
    """An Event decoded from the kernel's bytes, the way the daemon gets it."""
    if over.get("family") == 6:
        over.setdefault("saddr", V6[0])
        over.setdefault("daddr", V6[1])
    return Event.from_raw(abi.decode_event(raw_event(**over)), Clock())


TYPES = {abi.EV_CREATE: "CREATE", abi.EV_UPDATE: "UPDATE", abi.EV_DESTROY: "DESTROY"}
PROTOS = {6: abi.S_ESTABLISHED, 17: 0, 1: 0, 58: 0}

CASES = [
    pytest.param(dict(type=t, family=fam, proto=p, state=s), id=f"{TYPES[t]}-v{fam}-{p}")
    for t in TYPES for fam in (4, 6) for p, s in PROTOS.items()
]


def checked(ev: Event) -> dict:
    record = records.record_of(ev, NODE)
    wire.validate(record)
    assert wire.decode(wire.encode(record)) == record
    return record


@pytest.mark.parametrize("over", CASES)
def test_every_event_type_family_and_protocol(over):
    ev = event(**over)
    record = checked(ev)
    assert record["eventType"] == TYPES[over["type"]]
    assert record["protocolIdentifier"] == over["proto"]
    assert record["nodeId"] == NODE and record["ctId"] == 77 and record["seq"] == 5
    fam = "IPv4" if over["family"] == 4 else "IPv6"
    other = "IPv6" if fam == "IPv4" else "IPv4"
    assert record[f"source{fam}Address"] == ev.src and record[f"destination{fam}Address"] == ev.dst
    assert f"source{other}Address" not in record and f"destination{other}Address" not in record
    if over["proto"] == 6:
        assert record["tcpState"] == "ESTABLISHED"
    else:
        assert record["tcpState"] is None
    if over["type"] == abi.EV_DESTROY:
        assert record["flowEndReason"] == 3  # FIN: endOfFlowDetected
    else:
        assert record["flowEndReason"] is None


def test_fields_map_one_to_one():
    ev = event(family=6, proto=17, state=0, ct_id=123_456_789_012, seq=9, pkts_orig=11,
               pkts_reply=12, bytes_orig=1_300, bytes_reply=1_400, vlan=0x0FFF,
               sport=0x3930, dport=0x3500, flags=0, end_reason=abi.END_IDLE)
    record = checked(ev)
    assert record == {
        "schemaVersion": 2, "eventType": "DESTROY", "nodeId": NODE,
        "ctId": 123_456_789_012, "seq": 9, "observationTimeMilliseconds": ev.time_ms,
        "sourceIPv6Address": "2001:2::1", "destinationIPv6Address": "2001:2::2",
        "sourceTransportPort": 12345, "destinationTransportPort": 53,
        "protocolIdentifier": 17, "vlanId": 4095, "tcpState": None, "assured": False,
        "initiatorPackets": 11, "responderPackets": 12,
        "initiatorOctets": 1_300, "responderOctets": 1_400,
        "flowStartMilliseconds": ev.first_ms, "flowEndMilliseconds": ev.last_ms,
        "flowEndReason": 1, "missedEvents": 0, "retries": 0,
        "tcpControlBits": 0, "reverseTcpControlBits": 0,
    }
    assert record["flowEndMilliseconds"] - record["flowStartMilliseconds"] == 1000


def test_tcp_flags_follow_the_event():
    ev = Event.from_raw(abi.decode_event(raw_event()), Clock())
    assert (ev.tcp_flags_orig, ev.tcp_flags_reply) == (0x1B, 0x13)
    record = checked(ev)
    assert record["tcpControlBits"] == 0x1B            # IPFIX IE 6, the initiator's
    assert record["reverseTcpControlBits"] == 0x13     # RFC 5103's reverse, the responder's
    assert "tcpControlBitsInitiator" not in record and "tcpControlBitsResponder" not in record
    udp = Event.from_raw(abi.decode_event(raw_event(proto=17, state=0)), Clock())
    assert checked(udp)["tcpControlBits"] == 0


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("proto", [1, 58])
def test_icmp_echo_id_is_the_source_port(family, proto):
    ev = event(family=family, proto=proto, state=0, type=abi.EV_CREATE, sport=0x0700, dport=0x0700)
    record = checked(ev)
    assert ev.is_icmp and ev.sport == 7
    assert record["sourceTransportPort"] == 7 and record["destinationTransportPort"] == 7
    assert record["tcpState"] is None and record["tcpControlBits"] == 0


@pytest.mark.parametrize("code, ipfix", [
    (abi.END_IDLE, 1), (abi.END_FIN, 3), (abi.END_RST, 3), (abi.END_REUSE, 3),
    (abi.END_EARLY, 5), (abi.END_NONE, records.FORCED_END), (42, records.FORCED_END),
])
def test_end_reasons_are_ipfix_codes(code, ipfix):
    record = checked(event(end_reason=code))
    assert record["flowEndReason"] == ipfix


def test_update_ignores_a_stray_end_reason():
    assert checked(event(type=abi.EV_UPDATE, end_reason=abi.END_RST))["flowEndReason"] is None


@pytest.mark.parametrize("missed", range(8))
def test_missed_events_mask(missed):
    assert checked(event(missed=missed))["missedEvents"] == missed


@pytest.mark.parametrize("retries", [0, 1, 17, 255])
def test_destroy_retries(retries):
    assert checked(event(retries=retries))["retries"] == retries


def test_extreme_counters_and_ids():
    record = checked(event(ct_id=U64_MAX, seq=2**32 - 1, pkts_orig=U64_MAX, bytes_reply=U64_MAX,
                           type=abi.EV_UPDATE))
    assert record["ctId"] == U64_MAX and record["seq"] == 2**32 - 1
    assert record["initiatorPackets"] == U64_MAX and record["responderOctets"] == U64_MAX


def test_unknown_protocol_number():
    record = checked(event(proto=47, state=0, type=abi.EV_CREATE))  # GRE, tracked as "other"
    assert record["protocolIdentifier"] == 47 and record["tcpState"] is None


def test_tcp_states_by_name():
    for code, name in abi.STATE_NAMES.items():
        assert checked(event(state=code))["tcpState"] == name


def test_unknown_event_type_is_a_wire_error():
    ev = event()
    ev.type = "BOGUS"
    with pytest.raises(wire.WireError, match="BOGUS"):
        records.record_of(ev, NODE)


def test_snapshot_passes_through():
    ev = event(type=abi.EV_UPDATE)
    ev.type = "SNAPSHOT"
    assert checked(ev)["eventType"] == "SNAPSHOT"


# ---- LOST -------------------------------------------------------------------

def test_lost_record_fills_every_required_counter():
    rep = LostReport(time_ms=1_763_800_012_345, interval_s=10.0,
                     lost={"ring_full": 3, "outbox_full": 2})
    record = records.lost_record(rep, NODE)
    wire.validate(record)
    assert wire.decode(wire.encode(record)) == record
    assert record["ctId"] == 0 and record["eventType"] == "LOST"
    assert record["seq"] == 1_763_800_012
    assert record["observationTimeMilliseconds"] == 1_763_800_012_345
    assert record["lost"] == {"ring_full": 3, "table_full": 0, "untracked_packets": 0,
                              "untracked_bytes": 0, "early_drops": 0, "destroy_retries": 0,
                              "outbox_full": 2}
    assert rep.lost == {"ring_full": 3, "outbox_full": 2}  # the report is not changed


def test_lost_record_takes_the_totals_of_a_report_that_has_them():
    # The daemon's reports carry the growth (for the text line) and the
    # totals since load; the record holds the totals.
    rep = LostReport(1_763_800_020_000, 10.0, {"ring_full": 2},
                     totals={"ring_full": 9, "table_full": 4, "outbox_full": 0})
    record = wire.validate(records.lost_record(rep, NODE))
    assert record["lost"]["ring_full"] == 9 and record["lost"]["table_full"] == 4
    assert records.sink_record(rep, NODE) == record


def test_sink_record_of_an_event_is_its_record():
    ev = event(family=6, type=abi.EV_CREATE)
    assert records.sink_record(ev, NODE) == records.record_of(ev, NODE)
    assert records.sink_record(ev, NODE)["eventType"] == "CREATE" and ev.type == "NEW"


def test_lost_seq_grows_across_reports_and_can_be_given():
    a = records.lost_record(LostReport(1_763_800_000_000, 10.0, {}), NODE)
    b = records.lost_record(LostReport(1_763_800_010_000, 10.0, {}), NODE)
    assert b["seq"] > a["seq"]
    assert wire.dedupe_key(a) != wire.dedupe_key(b)
    c = records.lost_record(LostReport(1_763_800_010_000, 10.0, {}), NODE, seq=7)
    assert wire.validate(c)["seq"] == 7


# ---- keys -------------------------------------------------------------------

def test_all_events_of_a_connection_share_a_key():
    events = [event(type=abi.EV_CREATE, seq=1), event(type=abi.EV_UPDATE, seq=2),
              event(type=abi.EV_DESTROY, seq=3), event(type=abi.EV_DESTROY, seq=3, retries=1)]
    keys = {records.message_key(records.record_of(ev, NODE)) for ev in events}
    assert keys == {b"gw-1/77"}


def test_keys_differ_between_connections_and_nodes():
    a = records.record_of(event(ct_id=77), NODE)
    b = records.record_of(event(ct_id=78), NODE)
    c = records.record_of(event(ct_id=77), "gw-2")
    assert len({records.message_key(r) for r in (a, b, c)}) == 3


def test_lost_records_have_their_own_stable_key():
    k1 = records.message_key(records.lost_record(LostReport(1_000, 1.0, {}), NODE))
    k2 = records.message_key(records.lost_record(LostReport(9_000, 1.0, {"ring_full": 1}), NODE))
    assert k1 == k2 == b"gw-1/0"
    # ct_id 0 is never a connection's, so no flow shares it.
    assert k1 != records.message_key(records.record_of(event(ct_id=1), NODE))


def test_encode_event_is_key_and_encoded_record():
    ev = event(family=6, type=abi.EV_UPDATE)
    key, value = records.encode_event(ev, NODE)
    record = records.record_of(ev, NODE)
    assert key == records.message_key(record)
    assert wire.validate(wire.decode(value)) == record


def test_check_node_id():
    assert records.check_node_id("gw-1") == "gw-1"
    assert records.check_node_id("n" * 255)
    for bad in ("", "n" * 256, None, 5):
        with pytest.raises(ConfigError, match="node id"):
            records.check_node_id(bad)


# ---- the fast path from the ring ------------------------------------------------

def random_ring_records(count: int, seed: int = 11):
    """Ring records (bytes) of every type, family and protocol, with random
    fields, special IPv6 addresses among them."""
    rng = random.Random(seed)
    special_v6 = [bytes(10) + b"\xff\xff" + bytes([198, 18, 0, 9]),   # ::ffff:198.18.0.9
                  bytes(12) + bytes([198, 18, 0, 9]),                 # ::198.18.0.9
                  bytes(15) + b"\x01",                                # ::1
                  bytes.fromhex("20010002000000010000000000000000")]  # trailing zeros
    for _ in range(count):
        family = rng.choice((4, 6))
        if family == 4:
            saddr, daddr = rng.randbytes(4) + bytes(12), rng.randbytes(4) + bytes(12)
        else:
            saddr = rng.choice(special_v6) if rng.random() < 0.2 else \
                bytes(rng.choice((0, rng.randrange(256))) for _ in range(16))
            daddr = rng.randbytes(16)
        proto = rng.choice((6, 17, 1, 58, 47))
        yield raw_event(
            type=rng.choice(list(TYPES)), family=family, proto=proto,
            state=rng.randrange(9), flags=rng.randrange(16), ct_id=rng.randrange(1, 2**64),
            seq=rng.randrange(2**32), end_reason=rng.randrange(7), missed=rng.randrange(8),
            tcp_flags_orig=rng.randrange(256), tcp_flags_reply=rng.randrange(256),
            ts_ns=rng.randrange(2**50), first_ns=rng.randrange(2**50),
            last_ns=rng.randrange(2**50),
            pkts_orig=rng.randrange(2**64), pkts_reply=rng.randrange(2**64),
            bytes_orig=rng.randrange(2**64), bytes_reply=rng.randrange(2**64),
            saddr=saddr, daddr=daddr, sport=rng.randrange(2**16), dport=rng.randrange(2**16),
            vlan=rng.randrange(4096), dying=rng.randrange(256), retries=rng.randrange(256))


def random_raw_events(count: int, seed: int = 11):
    for buf in random_ring_records(count, seed):
        yield abi.decode_event(buf)


def test_raw_path_equals_the_event_path():
    clock = Clock()
    for raw in random_raw_events(3_000):
        fast = records.record_of_raw(raw, clock, NODE)
        slow = records.record_of(Event.from_raw(raw, clock), NODE)
        wire.validate(fast)
        assert wire.decode(wire.encode(fast)) == fast
        assert fast == slow
        tcp = raw.proto == 6
        assert fast["tcpControlBits"] == (raw.tcp_flags_orig if tcp else 0)
        assert fast["reverseTcpControlBits"] == (raw.tcp_flags_reply if tcp else 0)
        assert records.message_key(fast) == f"{NODE}/{raw.ct_id}".encode()


def test_raw_path_carries_tcp_flags():
    record = records.record_of_raw(abi.decode_event(raw_event()), Clock(), NODE)
    assert record["tcpControlBits"] == 0x1B and record["reverseTcpControlBits"] == 0x13
    udp = records.record_of_raw(abi.decode_event(raw_event(proto=17, state=0)), Clock(), NODE)
    assert udp["tcpControlBits"] == 0 and udp["tcpState"] is None
