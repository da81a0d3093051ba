"""Python mirror of bpf/ct_abi.h.

The C header is the truth. tests/bpf/test_abi.py compiles static assertions
generated from the layouts below against it, and a round trip through a BPF
program checks every field, so the two cannot drift apart unnoticed.

struct ct_event is spelled once, as the table EVENT_FIELDS; its layout,
RawEvent, decode_event and the daemon's one-step encoder
(streamer/delivery/ring_records.py) are all derived from it at import.
"""

from __future__ import annotations

import builtins
import dataclasses
import functools
import itertools
import keyword
import linecache
import struct
from dataclasses import dataclass
from typing import Callable

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

END_NONE, END_IDLE, END_FIN, END_RST, END_REUSE, END_EARLY, END_IGNORED = 0, 1, 2, 3, 4, 5, 6
END_NAMES = {0: "none", 1: "idle", 2: "fin", 3: "rst", 4: "reuse", 5: "early", 6: "ignored"}

MISSED_CREATE, MISSED_UPDATE, MISSED_DESTROY = 0x01, 0x02, 0x04
KEY_DYING = 0x80
OUTBOX_TRIES = 4

TO_SYN, TO_EST, TO_FIN, TO_UDP, TO_ICMP, TO_OTHER = 0, 1, 2, 3, 4, 5
TO_MAX = 8

CFG_DROP_UNTRACKED = 0x1
CFG_QUIET_CREATE, CFG_QUIET_ASSURED, CFG_QUIET_STATE = 0x2, 0x4, 0x8
CFG_SELECT, CFG_SELECT_IFACE = 0x10, 0x20
CFG_SYNCOOKIE, CFG_SYNCOOKIE_AUTO = 0x40, 0x80
CONFIG_SLOTS = 2          # ct_config slots; the one in force: ct_meta.generation & 1
LAYOUT_VERSION = 2        # of the pinned maps (layout 1: no ct_meta, one ct_config slot)
LAYOUT_NEXT = 3           # the next layout, built with -DCT_LAYOUT=3 (bpf/ct_abi.h)
MERGE_BATCH = 4
SEL_TRACK, SEL_IGNORE = 1, 2

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
    "ignored_packets", "ignored_bytes", "held",
)
STAT_MAX = 24
# The SYN-cookie counters (ct_syn_stats, CT_SYN_* in ct_abi.h).
SYN_STAT_NAMES = (
    "syn_cookies_sent", "syn_cookie_kernel_syns", "syn_cookie_acks_valid",
    "syn_cookie_acks_invalid", "syn_cookie_no_listener", "syn_cookie_auto", "syn_cookie_errors",
    "syn_cookie_handshakes_estimated",
)
SYN_STAT_MAX = 8

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


@dataclass(frozen=True)
class EventField:
    """One member of struct ct_event.

    kind says what the decoders make of it: "int" is handed on as it is;
    "header" is checked and not handed on (version, len); "port" is a
    uint16 in network order, which RawEvent holds in host order and the
    encoder copies as its two bytes; "addr" is 16 bytes, of which an IPv4
    address uses the first 4. default is RawEvent's default for it: fields
    added after code that builds RawEvents by keyword have one."""

    name: str
    code: str
    kind: str = "int"
    default: int | None = None

    def __post_init__(self):
        if self.kind not in ("int", "header", "port", "addr"):
            raise ValueError(f"ct_event.{self.name}: unknown kind {self.kind!r}")
        if self.kind == "port" and self.code != "H":
            raise ValueError(f"ct_event.{self.name}: a port is a uint16")

    @property
    def ring_code(self) -> str:
        """Its struct code for the encoder, which keeps a port's bytes as stored."""
        return "2s" if self.kind == "port" else self.code

    @property
    def local(self) -> str:
        """Its name as a local of generated code (type_ and len_: not builtins)."""
        clash = keyword.iskeyword(self.name) or hasattr(builtins, self.name)
        return self.name + "_" if clash else self.name


# struct ct_event, member by member in the header's order. A new field is a
# line in bpf/ct_abi.h and a row here; then, if it goes on the wire, the
# schema (schemas/) and the record's mapping (streamer/delivery/records.py,
# streamer/delivery/ring_records.py _FIXED).
EVENT_FIELDS = (
    EventField("type", "B"),                  # CT_EV_*
    EventField("version", "B", "header"),     # CT_ABI_VERSION
    EventField("len", "H", "header"),         # sizeof(struct ct_event)
    EventField("family", "B"),
    EventField("proto", "B"),
    EventField("state", "B"),
    EventField("flags", "B"),
    EventField("ct_id", "Q"),
    EventField("seq", "I"),
    EventField("end_reason", "B"),
    EventField("missed", "B"),
    EventField("tcp_flags_orig", "B"),
    EventField("tcp_flags_reply", "B"),
    EventField("ts_ns", "Q"),
    EventField("first_ns", "Q"),
    EventField("last_ns", "Q"),
    EventField("pkts_orig", "Q"),
    EventField("pkts_reply", "Q"),
    EventField("bytes_orig", "Q"),
    EventField("bytes_reply", "Q"),
    EventField("saddr", "16s", "addr"),
    EventField("daddr", "16s", "addr"),
    EventField("sport", "H", "port"),
    EventField("dport", "H", "port"),
    EventField("vlan", "H"),
    EventField("dying", "B", default=0),
    EventField("retries", "B", default=0),
)


def event_layout(fields: tuple[EventField, ...] = EVENT_FIELDS) -> Layout:
    names = [f.name for f in fields]
    if len(set(names)) != len(names):
        raise ValueError(f"ct_event fields named twice: {names}")
    missing = {"type", "version", "len", "family"}.difference(names)
    if missing:     # the decoders check these
        raise ValueError(f"ct_event without {sorted(missing)}")
    return Layout("ct_event", tuple((f.name, f.code) for f in fields))


EVENT = event_layout()
CONFIG = Layout("ct_config", (
    ("timeout_ns", f"{TO_MAX}Q"), ("report_interval_ns", "Q"), ("table_limit", "I"),
    ("flags", "I"), ("grace_ns", "Q"), ("early_low", "I"), ("ipv6_limit", "I"),
    ("syn_rate", "I"), ("syn_high_pct", "B"), ("syn_wscale", "B"), ("_pad_cfg", "H"),
))
GLOBAL = Layout("ct_global", (
    ("next_ct_id", "Q"), ("entries", "Q"), ("cursor", "2I"), ("dying", "Q"), ("early", "2Q"),
    ("entries6", "Q"),
))
META = Layout("ct_meta", (("generation", "Q"), ("layout", "I"), ("frozen", "I")))
HOLD = Layout("ct_hold", (("pkts", "Q"), ("bytes", "Q"), ("first_ns", "Q"), ("last_ns", "Q"),
                          ("tcp_flags", "Q")))
MERGE_HDR = Layout("ct_merge_hdr", (("count", "I"), ("merged", "I"), ("created", "I"),
                                    ("lost", "I")))
SEL_KEY4 = Layout("ct_sel_key4", (("prefixlen", "I"), ("slot", "I"), ("ifindex", "I"),
                                  ("addr", "4s")))
SEL_KEY6 = Layout("ct_sel_key6", (("prefixlen", "I"), ("slot", "I"), ("ifindex", "I"),
                                  ("addr", "16s")))
SEL = Layout("ct_sel", (("verdict", "B"), ("plen", "B"), ("_pad", "H")))
SWEEP_REQ = Layout("ct_sweep_req", (
    ("family", "B"), ("stalled", "B"), ("_pad0", "2s"), ("budget", "I"), ("pending", "I"),
    ("horizon", "I"), ("room", "I"), ("_pad1", "I"),
))
ACK_HDR = Layout("ct_ack_hdr", (("count", "I"), ("acked", "I")))
ACK4 = Layout("ct_ack4", (("key", f"{KEY4.size}s"), ("ct_id", "Q")))
ACK6 = Layout("ct_ack6", (("key", f"{KEY6.size}s"), ("ct_id", "Q")))
LAYOUTS = (KEY4, KEY6, ENTRY, EVENT, CONFIG, GLOBAL, SWEEP_REQ, ACK_HDR, ACK4, ACK6, META,
           SEL_KEY4, SEL_KEY6, SEL, HOLD, MERGE_HDR)


@dataclass(frozen=True)
class TableLayout:
    """What a layout of the pinned maps means for the connection tables:
    their pin names and the entry's size (its first ENTRY.size bytes are
    struct ct_entry of layout 2 in every layout so far)."""

    layout: int
    pin4: str
    pin6: str
    entry_size: int


TABLE_LAYOUTS = {
    LAYOUT_VERSION: TableLayout(LAYOUT_VERSION, "ct4", "ct6", ENTRY.size),
    LAYOUT_NEXT: TableLayout(LAYOUT_NEXT, "ct4_l3", "ct6_l3", ENTRY.size + 8),  # + moved_ns
}

_EVENT = struct.Struct(EVENT.fmt)
_KEY4 = struct.Struct(KEY4.fmt)
_KEY6 = struct.Struct(KEY6.fmt)
EVENT_SIZE = _EVENT.size


def _ntohs(v: int) -> int:
    return ((v & 0xFF) << 8) | (v >> 8)


# ---- code generated from EVENT_FIELDS ----------------------------------------
#
# The decoders unpack a record in one struct call straight into locals named
# after the table (a positional unpack is the fastest Python has), so their
# code is generated from the table, once, when this module is imported.

_generated = itertools.count()


def compile_function(source: str, name: str, namespace: dict,
                     fields: tuple[EventField, ...] = (), own=()) -> Callable:
    """Define `name` from generated `source`, with `namespace` as its
    globals. A field may not take the name of a global or of one of the
    `own` names the template uses for itself. The source goes into
    linecache: tracebacks and inspect show it."""
    clash = {f.local for f in fields} & (set(namespace) | set(own))
    if clash:
        raise ValueError(f"ct_event fields named as the generated {name}'s names: {clash}")
    filename = f"<ctstream generated {name} #{next(_generated)}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    exec(compile(source, filename, "exec"), namespace)
    return namespace[name]


def listing(items, indent: int, width: int = 96) -> str:
    """Comma-separated items in parentheses for generated code, lines broken
    between items; the parenthesis stands at column `indent`."""
    lines, line = [], ""
    for item in items:
        if line and indent + 1 + len(line) + len(item) + 2 > width:
            lines.append(line + ",")
            line = ""
        line = f"{line}, {item}" if line else item
    lines.append(line)
    return "(" + ("\n" + " " * (indent + 1)).join(lines) + ")"


def unpack_targets(fields: tuple[EventField, ...] = EVENT_FIELDS, indent: int = 4) -> str:
    """The target list of a positional unpack of the whole event, in the
    table's order, each field by its .local name."""
    return listing([f.local for f in fields], indent)


def _outbox_key(self) -> bytes:
    """The key of this DESTROY's outbox copy (what an ack names)."""
    return (_KEY4 if self.family == 4 else _KEY6).pack(
        self.saddr, self.daddr, _ntohs(self.sport), _ntohs(self.dport), self.proto,
        self.dying, self.vlan)


def raw_event_class(fields: tuple[EventField, ...] = EVENT_FIELDS) -> type:
    """RawEvent of a table: its fields but the header's, in the table's order."""
    spec = []
    for f in fields:
        if f.kind == "header":
            continue
        kind = bytes if f.code.endswith("s") else int
        spec.append((f.name, kind) if f.default is None
                    else (f.name, kind, dataclasses.field(default=f.default)))
    cls = dataclasses.make_dataclass("RawEvent", spec, slots=True, namespace={
        "__doc__": "One ct_event as the kernel wrote it, fields decoded to Python ints "
                   "and bytes, ports in host order, addresses still packed (4 bytes for "
                   "IPv4). Its fields are abi.EVENT_FIELDS' but version and len.",
        "outbox_key": _outbox_key})
    cls.__module__ = __name__
    return cls


RawEvent = raw_event_class()

_DECODE_EVENT = '''\
def decode_event(buf):
    """Decode one ring record; reject what this version does not know."""
    if len(buf) < EVENT_SIZE:
        raise _short(buf, EVENT_SIZE)
    {targets} = unpack_from(buf)
    if version != ABI_VERSION or len_ != EVENT_SIZE or type_ not in EVENT_NAMES \\
            or family not in (4, 6):
        raise _rejected(version, len_, type_, family, EVENT_SIZE)
    alen = 4 if family == 4 else 16
    return RawEvent{args}
'''
_DECODED = {"int": "{}", "port": "_ntohs({})", "addr": "{}[:alen]"}


def event_decoder(fields: tuple[EventField, ...] = EVENT_FIELDS,
                  raw_class: type | None = None) -> Callable:
    """decode_event of a table (and its RawEvent)."""
    layout = event_layout(fields)
    args = listing([_DECODED[f.kind].format(f.local) for f in fields if f.kind != "header"],
                   4 + len("return RawEvent"))
    source = _DECODE_EVENT.format(targets=unpack_targets(fields), args=args)
    namespace = {
        "unpack_from": struct.Struct(layout.fmt).unpack_from, "EVENT_SIZE": layout.size,
        "ABI_VERSION": ABI_VERSION, "EVENT_NAMES": EVENT_NAMES, "_ntohs": _ntohs,
        "RawEvent": raw_class or raw_event_class(fields), "_short": _short,
        "_rejected": _rejected, "__name__": __name__,
    }
    return compile_function(source, "decode_event", namespace, fields, own=("buf", "alen"))


def _short(buf, size: int):
    if len(buf) < 4:
        return _abi_error(f"event record of {len(buf)} bytes is too short")
    return _abi_error(f"event record of {len(buf)} bytes, expected {size}")


def _rejected(version: int, length: int, etype: int, family: int, size: int):
    """The error for a record whose header this version does not know, the
    first check that fails in this order."""
    if version != ABI_VERSION:
        return _abi_error(f"event ABI version {version}, this ctstream knows {ABI_VERSION}")
    if length != size:
        return _abi_error(f"event length {length}, ABI {ABI_VERSION} has {size}")
    if etype not in EVENT_NAMES:
        return _abi_error(f"unknown event type {etype}")
    return _abi_error(f"unknown address family {family}")


def _abi_error(msg: str):
    from ..errors import AbiError
    return AbiError(msg)


decode_event = event_decoder(EVENT_FIELDS, RawEvent)


def pack_config(timeouts_ns: list[int], report_interval_ns: int, table_limit: int,
                flags: int, grace_ns: int = 15_000_000_000, early_low: int = 0,
                ipv6_limit: int | None = None, syn_rate: int = 0, syn_high_pct: int = 0,
                syn_wscale: int = 0) -> bytes:
    to = list(timeouts_ns) + [0] * (TO_MAX - len(timeouts_ns))
    v6 = table_limit if ipv6_limit is None else ipv6_limit
    return struct.pack(CONFIG.fmt, *to, report_interval_ns, table_limit, flags, grace_ns,
                       early_low, v6, syn_rate, syn_high_pct, syn_wscale, 0)


def unpack_config(buf: bytes) -> dict:
    v = struct.unpack(CONFIG.fmt, buf[:CONFIG.size])
    return {"timeout_ns": list(v[:TO_MAX]), "report_interval_ns": v[TO_MAX],
            "table_limit": v[TO_MAX + 1], "flags": v[TO_MAX + 2], "grace_ns": v[TO_MAX + 3],
            "early_low": v[TO_MAX + 4], "ipv6_limit": v[TO_MAX + 5],
            "syn_rate": v[TO_MAX + 6], "syn_high_pct": v[TO_MAX + 7],
            "syn_wscale": v[TO_MAX + 8]}


def pack_meta(generation: int, layout: int = LAYOUT_VERSION, frozen: int = 0) -> bytes:
    return struct.pack(META.fmt, generation, layout, frozen)


def unpack_meta(buf: bytes) -> dict:
    gen, layout, frozen = struct.unpack(META.fmt, buf[:META.size])
    return {"generation": gen, "layout": layout, "frozen": frozen}


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
