"""Python mirror of bpf/ct_abi.h.

The C header is the truth. tests/bpf/test_abi.py compiles static assertions
generated from the layouts below against it, and a round trip through a BPF
program checks every field, so the two cannot drift apart unnoticed.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass

ABI_VERSION = 2

EV_CREATE, EV_UPDATE, EV_DESTROY = 1, 2, 3
EVENT_NAMES = {EV_CREATE: "NEW", EV_UPDATE: "UPDATE", EV_DESTROY: "DESTROY"}

DIR_ORIG, DIR_REPLY = 0, 1

STATE_NAMES = {
    0: "NONE", 1: "SYN_SENT", 2: "SYN_RECV", 3: "ESTABLISHED", 4: "FIN_WAIT",
    5: "CLOSE_WAIT", 6: "LAST_ACK", 7: "TIME_WAIT", 8: "CLOSE",
}
S_NONE, S_SYN_SENT, S_SYN_RECV, S_ESTABLISHED, S_FIN_WAIT = 0, 1, 2, 3, 4
S_CLOSE_WAIT, S_LAST_ACK, S_TIME_WAIT, S_CLOSE = 5, 6, 7, 8

F_ASSURED, F_SEEN_REPLY, F_FIN_REPLY, F_PICKUP = 0x01, 0x02, 0x04, 0x08

END_NONE, END_IDLE, END_FIN, END_RST, END_REUSE, END_EARLY = 0, 1, 2, 3, 4, 5
END_NAMES = {0: "none", 1: "idle", 2: "fin", 3: "rst", 4: "reuse", 5: "early"}

MISSED_CREATE, MISSED_UPDATE, MISSED_DESTROY = 0x01, 0x02, 0x04
KEY_DYING = 0x80
OUTBOX_TRIES = 4

TO_SYN, TO_EST, TO_FIN, TO_UDP, TO_ICMP, TO_OTHER = 0, 1, 2, 3, 4, 5
TO_MAX = 8

CFG_DROP_UNTRACKED = 0x1

# Flags in the top bits of an entry's last_ns (bpf/ct_abi.h, CT_LAST_*).
LAST_DEAD, LAST_OUTBOX, LAST_BUSY = 1 << 63, 1 << 62, 1 << 61
LAST_FLAGS = LAST_DEAD | LAST_OUTBOX | LAST_BUSY
SLOT_SHIFT = 30
SCHED_MISSED_SHIFT, SCHED_REASON_SHIFT = 56, 48
WHEEL4_PER_CHUNK, WHEEL6_PER_CHUNK = 59, 23
ACK_BATCH = 64

# Per-CPU counters, in index order (bpf/ct_abi.h CT_STAT_*).
STAT_NAMES = (
    "packets", "invalid", "ring_full", "table_full", "created", "destroyed",
    "fragments", "untracked_packets", "untracked_bytes", "not_ip", "events",
    "wheel_full", "rescheduled", "swept", "other_l4", "missed_redelivered",
    "destroy_retries", "early_drops", "acked", "ack_stale", "outbox_full",
)
STAT_MAX = 24

PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6"}


@dataclass(frozen=True)
class Layout:
    """A C struct spelled as (field, struct format) pairs, little-endian and
    without implicit padding: the C side spells its padding out too."""

    c_name: str
    fields: tuple[tuple[str, str], ...]

    @functools.cached_property
    def fmt(self) -> str:
        return "<" + "".join(f for _, f in self.fields)

    @functools.cached_property
    def size(self) -> int:
        return struct.calcsize(self.fmt)

    def offsets(self) -> dict[str, int]:
        out, off = {}, 0
        for name, f in self.fields:
            out[name] = off
            off += struct.calcsize("<" + f)
        return out


KEY4 = Layout("ct_key4", (
    ("saddr", "4s"), ("daddr", "4s"), ("sport", "H"), ("dport", "H"),
    ("proto", "B"), ("dying", "B"), ("vlan", "H"),
))
KEY6 = Layout("ct_key6", (
    ("saddr", "16s"), ("daddr", "16s"), ("sport", "H"), ("dport", "H"),
    ("proto", "B"), ("dying", "B"), ("vlan", "H"),
))
ENTRY = Layout("ct_entry", (
    ("ct_id", "Q"), ("first_ns", "Q"), ("last_ns", "Q"),
    ("pkts", "2Q"), ("bytes", "2Q"), ("status_seq", "Q"), ("sched", "Q"),
))
EVENT = Layout("ct_event", (
    ("type", "B"), ("version", "B"), ("len", "H"), ("family", "B"), ("proto", "B"),
    ("state", "B"), ("flags", "B"), ("ct_id", "Q"), ("seq", "I"), ("end_reason", "B"),
    ("missed", "B"), ("tcp_flags_orig", "B"), ("tcp_flags_reply", "B"), ("ts_ns", "Q"),
    ("first_ns", "Q"), ("last_ns", "Q"), ("pkts_orig", "Q"), ("pkts_reply", "Q"),
    ("bytes_orig", "Q"), ("bytes_reply", "Q"), ("saddr", "16s"), ("daddr", "16s"),
    ("sport", "H"), ("dport", "H"), ("vlan", "H"), ("dying", "B"), ("retries", "B"),
))
CONFIG = Layout("ct_config", (
    ("timeout_ns", f"{TO_MAX}Q"), ("report_interval_ns", "Q"), ("table_limit", "I"),
    ("flags", "I"), ("grace_ns", "Q"), ("early_low", "I"), ("ipv6_limit", "I"),
    ("_reserved", "Q"),
))
GLOBAL = Layout("ct_global", (
    ("next_ct_id", "Q"), ("entries", "Q"), ("cursor", "2I"), ("dying", "Q"), ("early", "2Q"),
    ("entries6", "Q"),
))
SWEEP_REQ = Layout("ct_sweep_req", (
    ("family", "B"), ("stalled", "B"), ("_pad0", "2s"), ("budget", "I"), ("pending", "I"),
    ("horizon", "I"), ("room", "I"), ("_pad1", "I"),
))
ACK_HDR = Layout("ct_ack_hdr", (("count", "I"), ("acked", "I")))
ACK4 = Layout("ct_ack4", (("key", f"{KEY4.size}s"), ("ct_id", "Q")))
ACK6 = Layout("ct_ack6", (("key", f"{KEY6.size}s"), ("ct_id", "Q")))
LAYOUTS = (KEY4, KEY6, ENTRY, EVENT, CONFIG, GLOBAL, SWEEP_REQ, ACK_HDR, ACK4, ACK6)

_EVENT = struct.Struct(EVENT.fmt)
_KEY4 = struct.Struct(KEY4.fmt)
_KEY6 = struct.Struct(KEY6.fmt)
EVENT_SIZE = _EVENT.size


def _ntohs(v: int) -> int:
    return ((v & 0xFF) << 8) | (v >> 8)


@dataclass(slots=True)
class RawEvent:
    """One ct_event as the kernel wrote it, fields decoded to Python ints and
    bytes, ports in host order, addresses still packed."""

    type: int
    family: int
    proto: int
    state: int
    flags: int
    ct_id: int
    seq: int
    end_reason: int
    missed: int
    tcp_flags_orig: int
    tcp_flags_reply: int
    ts_ns: int
    first_ns: int
    last_ns: int
    pkts_orig: int
    pkts_reply: int
    bytes_orig: int
    bytes_reply: int
    saddr: bytes
    daddr: bytes
    sport: int
    dport: int
    vlan: int
    dying: int = 0
    retries: int = 0

    def outbox_key(self) -> bytes:
        """The key of this DESTROY's outbox copy (what an ack names)."""
        return (_KEY4 if self.family == 4 else _KEY6).pack(
            self.saddr, self.daddr, _ntohs(self.sport), _ntohs(self.dport), self.proto,
            self.dying, self.vlan)


def decode_event(buf) -> RawEvent:
    """Decode one ring record; reject what this version does not know."""
    if len(buf) < 4:
        raise _abi_error(f"event record of {len(buf)} bytes is too short")
    (etype, version, length, family, proto, state, flags, ct_id, seq, end_reason,
     missed, tfo, tfr, ts_ns, first_ns, last_ns, po, pr, bo, br, saddr, daddr,
     sport, dport, vlan, dying, retries) = _EVENT.unpack_from(buf) if len(buf) >= EVENT_SIZE else _short(buf)
    if version != ABI_VERSION:
        raise _abi_error(f"event ABI version {version}, this ctstream knows {ABI_VERSION}")
    if length != EVENT_SIZE:
        raise _abi_error(f"event length {length}, ABI {ABI_VERSION} has {EVENT_SIZE}")
    if etype not in EVENT_NAMES:
        raise _abi_error(f"unknown event type {etype}")
    if family not in (4, 6):
        raise _abi_error(f"unknown address family {family}")
    alen = 4 if family == 4 else 16
    return RawEvent(etype, family, proto, state, flags, ct_id, seq, end_reason, missed,
                    tfo, tfr, ts_ns, first_ns, last_ns, po, pr, bo, br,
                    saddr[:alen], daddr[:alen], _ntohs(sport), _ntohs(dport), vlan,
                    dying, retries)


def _short(buf):
    raise _abi_error(f"event record of {len(buf)} bytes, expected {EVENT_SIZE}")


def _abi_error(msg: str):
    from ..errors import AbiError
    return AbiError(msg)


def pack_config(timeouts_ns: list[int], report_interval_ns: int, table_limit: int,
                flags: int, grace_ns: int = 15_000_000_000, early_low: int = 0,
                ipv6_limit: int | None = None) -> bytes:
    to = list(timeouts_ns) + [0] * (TO_MAX - len(timeouts_ns))
    v6 = table_limit if ipv6_limit is None else ipv6_limit
    return struct.pack(CONFIG.fmt, *to, report_interval_ns, table_limit, flags, grace_ns,
                       early_low, v6, 0)


def unpack_global(buf: bytes) -> dict:
    next_id, entries, c4, c6, dying, e4, e6, n6 = struct.unpack(GLOBAL.fmt, buf[:GLOBAL.size])
    return {"next_ct_id": next_id, "entries": entries, "cursor4": c4, "cursor6": c6,
            "dying": dying, "early4": e4, "early6": e6, "entries6": n6}


def pack_global(g: dict) -> bytes:
    return struct.pack(GLOBAL.fmt, g["next_ct_id"], g["entries"], g["cursor4"], g["cursor6"],
                       g["dying"], g["early4"], g["early6"], g.get("entries6", 0))


ROOM_UNLIMITED = 0xFFFFFFFF


def pack_sweep_req(family: int, budget: int, horizon: int = 0,
                   room: int = ROOM_UNLIMITED) -> bytes:
    return struct.pack(SWEEP_REQ.fmt, family, 0, b"\0\0", budget, 0, horizon,
                       max(0, min(room, ROOM_UNLIMITED)), 0)


def unpack_sweep_req(buf: bytes) -> dict:
    family, stalled, _, budget, pending, horizon, room, _ = struct.unpack(
        SWEEP_REQ.fmt, buf[:SWEEP_REQ.size])
    return {"family": family, "stalled": stalled, "budget": budget, "pending": pending,
            "horizon": horizon, "room": room}


def pack_acks(family: int, acks: list[tuple[bytes, int]]) -> bytes:
    """An ack request: (outbox key, ct_id) pairs of one family, at most
    ACK_BATCH of them."""
    if len(acks) > ACK_BATCH:
        raise ValueError(f"at most {ACK_BATCH} acks per request, got {len(acks)}")
    rec = struct.Struct(ACK4.fmt if family == 4 else ACK6.fmt)
    body = b"".join(rec.pack(key, ct_id) for key, ct_id in acks)
    out = struct.pack(ACK_HDR.fmt, len(acks), 0) + body
    return out + b"\0" * max(0, 14 - len(out))  # a test packet holds an Ethernet header


def unpack_ack_hdr(buf: bytes) -> dict:
    count, acked = struct.unpack_from(ACK_HDR.fmt, buf)
    return {"count": count, "acked": acked}
