"""Conntrack events as wire records (schemas/ctstream-event.v2.json) and
their Kafka message keys. The same records, as JSON, are what `ctstream
events -o json` and its jsonl sink write (sink_record, wire.to_json): one
vocabulary for every output.

This is the daemon's hot path (100k+ records/s): records are built as dict
literals and never validated here. tests/unit/test_records.py validates what
these functions make against the schema, for every event type and family.

Keys: all events of one connection (same nodeId and ctId) share a key, so
that they land in one partition, in order. LOST records use ctId 0, which the
datapath never gives a connection, so their key is stable and their own.
"""

from __future__ import annotations

import ipaddress
import socket

from ..datapath import abi
from ..errors import ConfigError
from ..datapath.events import Clock, Event, LostReport
from .wire import SCHEMA_VERSION, WireError, encode

# events.Event names the kernel's CREATE "NEW", as conntrack -E does (its
# text lines keep that word; records say CREATE).
EVENT_TYPES = {"NEW": "CREATE", "CREATE": "CREATE", "UPDATE": "UPDATE",
               "DESTROY": "DESTROY", "SNAPSHOT": "SNAPSHOT"}

PROTOCOL_NUMBERS = {"icmp": 1, "tcp": 6, "udp": 17, "icmpv6": 58}

# IPFIX flowEndReason (1 idleTimeout, 3 endOfFlowDetected, 4 forcedEnd,
# 5 lackOfResources) of the datapath's end reasons (abi.END_NAMES). A reset
# or a tuple reused after the close is the end of the flow seen in its
# packets, as a FIN is. ctstream has no active timeout (2): long flows get
# periodic UPDATEs and live on.
END_REASONS = {"idle": 1, "fin": 3, "rst": 3, "reuse": 3, "early": 5}
# A DESTROY whose reason the datapath did not record (none, or a code this
# version does not know).
FORCED_END = 4

# The same for the kernel's codes (abi.EV_*, abi.END_*), for record_of_raw.
RAW_EVENT_TYPES = {abi.EV_CREATE: "CREATE", abi.EV_UPDATE: "UPDATE", abi.EV_DESTROY: "DESTROY"}
RAW_END_REASONS = {abi.END_IDLE: 1, abi.END_FIN: 3, abi.END_RST: 3, abi.END_REUSE: 3,
                   abi.END_EARLY: 5}

# Counters every LOST record carries (the schema requires them), 0 when the
# report does not name them.
LOST_COUNTERS = ("ring_full", "table_full", "untracked_packets", "untracked_bytes",
                 "early_drops", "destroy_retries")

# TCP flags per direction are IPFIX tcpControlBits (the initiator's) and RFC
# 5103's reverseTcpControlBits (the responder's), 0 for other protocols. The
# dicts below spell every key out: a literal with constant keys is the
# fastest way CPython builds one.


def check_node_id(node_id: str) -> str:
    """The node id, if the schema accepts it (1..255 characters); ConfigError
    otherwise. Call it once at start: record_of trusts its node_id."""
    if not isinstance(node_id, str) or not 1 <= len(node_id) <= 255:
        raise ConfigError(f"node id must be 1..255 characters, got {node_id!r}")
    return node_id


def record_of(ev: Event, node_id: str) -> dict:
    """The wire record of one conntrack event (CREATE, UPDATE, DESTROY).

    ICMP and ICMPv6 flows carry the echo id as sourceTransportPort, as the
    datapath keys them. flowEndReason is an IPFIX code on DESTROY, null
    otherwise. WireError for an event type the schema does not know.
    """
    try:
        event_type = EVENT_TYPES[ev.type]
    except KeyError as exc:
        raise WireError(f"event type {ev.type!r} has no wire record") from exc
    proto = PROTOCOL_NUMBERS.get(ev.proto)
    if proto is None:
        proto = int(ev.proto)  # events.Event spells unknown protocols as their number
    if event_type == "DESTROY":
        end_reason = END_REASONS.get(ev.end_reason, FORCED_END)
    else:
        end_reason = None
    record = {
        "schemaVersion": SCHEMA_VERSION,
        "eventType": event_type,
        "nodeId": node_id,
        "ctId": ev.ct_id,
        "seq": ev.seq,
        "observationTimeMilliseconds": ev.time_ms,
        "sourceTransportPort": ev.sport,
        "destinationTransportPort": ev.dport,
        "protocolIdentifier": proto,
        "vlanId": ev.vlan,
        "tcpState": ev.state,
        "assured": ev.assured,
        "initiatorPackets": ev.packets_orig,
        "responderPackets": ev.packets_reply,
        "initiatorOctets": ev.bytes_orig,
        "responderOctets": ev.bytes_reply,
        "flowStartMilliseconds": ev.first_ms,
        "flowEndMilliseconds": ev.last_ms,
        "flowEndReason": end_reason,
        "missedEvents": ev.missed,
        "retries": ev.retries,
        "tcpControlBits": ev.tcp_flags_orig,
        "reverseTcpControlBits": ev.tcp_flags_reply,
    }
    if ev.family == 4:
        record["sourceIPv4Address"] = ev.src
        record["destinationIPv4Address"] = ev.dst
    else:
        record["sourceIPv6Address"] = ev.src
        record["destinationIPv6Address"] = ev.dst
    return record


def record_of_raw(r: abi.RawEvent, clock: Clock, node_id: str) -> dict:
    """The record of a ring event without making an events.Event first: the
    daemon's fast path (about 4 us less per event than Event.from_raw and
    record_of). Equal to record_of(Event.from_raw(r, clock), node_id)."""
    try:
        event_type = RAW_EVENT_TYPES[r.type]
    except KeyError as exc:
        raise WireError(f"event type {r.type} has no wire record") from exc
    tcp = r.proto == 6
    wall = clock.wall_ns
    record = {
        "schemaVersion": SCHEMA_VERSION,
        "eventType": event_type,
        "nodeId": node_id,
        "ctId": r.ct_id,
        "seq": r.seq,
        "observationTimeMilliseconds": wall(r.ts_ns) // 1_000_000,
        "sourceTransportPort": r.sport,
        "destinationTransportPort": r.dport,
        "protocolIdentifier": r.proto,
        "vlanId": r.vlan,
        "tcpState": abi.STATE_NAMES.get(r.state) if tcp else None,
        "assured": bool(r.flags & abi.F_ASSURED),
        "initiatorPackets": r.pkts_orig,
        "responderPackets": r.pkts_reply,
        "initiatorOctets": r.bytes_orig,
        "responderOctets": r.bytes_reply,
        "flowStartMilliseconds": wall(r.first_ns) // 1_000_000,
        "flowEndMilliseconds": wall(r.last_ns) // 1_000_000,
        "flowEndReason": RAW_END_REASONS.get(r.end_reason, FORCED_END)
        if event_type == "DESTROY" else None,
        "missedEvents": r.missed,
        "retries": r.retries,
        "tcpControlBits": r.tcp_flags_orig if tcp else 0,
        "reverseTcpControlBits": r.tcp_flags_reply if tcp else 0,
    }
    if r.family == 4:
        record["sourceIPv4Address"] = socket.inet_ntop(socket.AF_INET, r.saddr)
        record["destinationIPv4Address"] = socket.inet_ntop(socket.AF_INET, r.daddr)
    else:
        record["sourceIPv6Address"] = _ipv6_text(r.saddr)
        record["destinationIPv6Address"] = _ipv6_text(r.daddr)
    return record


_ZERO10 = bytes(10)


def _ipv6_text(packed: bytes) -> str:
    # inet_ntop is ten times faster than ipaddress, and writes the same text
    # except for ::a.b.c.d and ::ffff:a.b.c.d, which it writes as dotted
    # quads: those go the slow way, so both paths agree (events.Event's too).
    if packed[:10] == _ZERO10:
        return str(ipaddress.IPv6Address(packed))
    return socket.inet_ntop(socket.AF_INET6, packed)


def lost_record(rep: LostReport, node_id: str, *, seq: int | None = None) -> dict:
    """The wire record of a LOST report.

    The schema promises counters that are cumulative since the datapath was
    loaded (so a duplicate or a missing LOST record does no harm): they are
    `rep.totals` (table.read_counters) when the report has them, else
    `rep.lost`, which must then hold such totals, not the growth since the
    last report that the text lines show. Counters the report does not name
    are 0; extra counters (outbox_full, ...) are kept.

    `seq` defaults to the report's time in whole seconds since the epoch: it
    grows from one report to the next also across daemon restarts, so the
    dedupe key (nodeId, 0, seq) of a new report never repeats an old one's
    (a count kept in memory would restart at 1). It fits 32 bits until 2106.
    Reports less than a second apart need an explicit seq.
    """
    lost = dict.fromkeys(LOST_COUNTERS, 0)
    lost.update(rep.lost if rep.totals is None else rep.totals)
    return {
        "schemaVersion": SCHEMA_VERSION,
        "eventType": "LOST",
        "nodeId": node_id,
        "ctId": 0,
        "seq": rep.time_ms // 1000 if seq is None else seq,
        "observationTimeMilliseconds": rep.time_ms,
        "lost": lost,
    }


def sink_record(item: Event | LostReport, node_id: str) -> dict:
    """The record of what a sink is handed: an event or a LOST report."""
    if isinstance(item, LostReport):
        return lost_record(item, node_id)
    return record_of(item, node_id)


def message_key(record: dict) -> bytes:
    """The Kafka message key of a record: b"<nodeId>/<ctId>". Every event of
    one connection has the same key; LOST records have b"<nodeId>/0"."""
    return f"{record['nodeId']}/{record['ctId']}".encode()


def encode_event(ev: Event, node_id: str) -> tuple[bytes, bytes]:
    """(key, value) of one event; producer.Producer.send takes them with
    the event's time_ms, its Kafka timestamp, as a third element."""
    record = record_of(ev, node_id)
    return f"{node_id}/{ev.ct_id}".encode(), encode(record)
