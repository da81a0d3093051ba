"""Ring records straight to Kafka records: the daemon's hot path.

A ct_event read from the ring becomes its message key and msgpack value in
one step, with no abi.RawEvent, no dict and no msgpack.Packer in between:
one struct unpack, one struct pack of the fixed part, and a few precomputed
pieces for the rest. At about 100k records/s every microsecond per record
is a tenth of a core.

How the value is laid out: the map's keys are constants, and every integer
is written at the width of its kernel field (uint8/16/32/64, msgpack's
0xcc/0xcd/0xce/0xcf). msgpack lets an encoder use any width that holds the
value and every decoder reads them all, so the fixed part of a record is
one struct format. Ports are copied as the kernel stored them: network
order is msgpack's big-endian uint16. The variable part (event type, TCP
state, end reason, the address texts) comes from small lookup tables.

The unpack follows abi.EVENT_FIELDS, the one table of the kernel's struct,
and the pack follows _FIXED below: encode() is generated from the two when
this module is imported, never per record.

The decoded record equals records.record_of_raw(abi.decode_event(...)),
field for field (key order aside); tests/unit/test_ring_records.py checks
that on random events of every type, family and protocol. The bytes are
about 50 longer than msgpack's smallest encoding (fixed-width integers).
"""

from __future__ import annotations

import socket
import struct
from typing import Callable

import msgpack

from ..datapath import abi
from ..datapath.events import Clock
from .records import FORCED_END, RAW_END_REASONS, RAW_EVENT_TYPES, _ipv6_text
from .wire import SCHEMA_VERSION

# The event as the ring holds it (abi.EVENT_FIELDS), with the ports left as
# the bytes the kernel stored (network order).
_RING = struct.Struct("<" + "".join(f.ring_code for f in abi.EVENT_FIELDS))
assert _RING.size == abi.EVENT_SIZE
_RING_CODES = {f.local: f.ring_code for f in abi.EVENT_FIELDS}
# An outbox key from the event's own bytes (ports as stored: network order).
_OUTBOX_KEY = {4: struct.Struct("<4s4s2s2sBBH"), 6: struct.Struct("<16s16s2s2sBBH")}
assert _OUTBOX_KEY[4].size == abi.KEY4.size and _OUTBOX_KEY[6].size == abi.KEY6.size

_MARK = {"B": 0xCC, "H": 0xCD, "I": 0xCE, "Q": 0xCF}
_NIL, _FALSE = 0xC0, 0xC2


def _s(text: str) -> bytes:
    return msgpack.packb(text)


# The fixed part, in map order: (key, value) or (key, value, struct code).
# The value is an expression in encode()'s names: the event's fields as
# abi.EVENT_FIELDS names them (their .local), off (monotonic to wall ns),
# time_ms, assured (abi.F_ASSURED) and FALSE (msgpack's false); a field copied as it is needs no code: it is written at its
# kernel width. "2s" is a port in network order behind a uint16 marker;
# "?" is a bool byte (0xc2 + value).
_FIXED = (
    ("ctId", "ct_id"),
    ("seq", "seq"),
    ("observationTimeMilliseconds", "time_ms", "Q"),
    ("sourceTransportPort", "sport"),
    ("destinationTransportPort", "dport"),
    ("protocolIdentifier", "proto"),
    ("vlanId", "vlan"),
    ("assured", "FALSE | (flags & assured)", "?"),
    ("initiatorPackets", "pkts_orig"),
    ("responderPackets", "pkts_reply"),
    ("initiatorOctets", "bytes_orig"),
    ("responderOctets", "bytes_reply"),
    ("flowStartMilliseconds", "(first_ns + off) // 1_000_000", "Q"),
    ("flowEndMilliseconds", "(last_ns + off) // 1_000_000", "Q"),
    ("missedEvents", "missed"),
    ("retries", "retries"),
    ("tcpControlBits", "tcp_flags_orig"),              # 0 unless TCP (encode)
    ("reverseTcpControlBits", "tcp_flags_reply"),
)


def _fixed_code(row: tuple) -> str:
    return row[2] if len(row) > 2 else _RING_CODES[row[1]]


# The variable part: eventType, tcpState, flowEndReason, and two addresses.
_ENTRIES = 2 + len(_FIXED) + 3 + 2     # schemaVersion and nodeId lead


def _fixed_struct(node_id: str) -> tuple[struct.Struct, tuple[bytes, ...]]:
    """The struct of the fixed part and its constant pieces: piece i holds
    what comes before value i (keys, type markers). Piece 0 starts the map."""
    pieces = []
    head = (bytes((0xDE,)) + _ENTRIES.to_bytes(2, "big") + _s("schemaVersion")
            + msgpack.packb(SCHEMA_VERSION) + _s("nodeId") + _s(node_id))
    fmt = ">"
    for row in _FIXED:
        key, code = row[0], _fixed_code(row)
        piece = head + _s(key)
        head = b""
        if code == "2s":
            piece += bytes((_MARK["H"],))
        elif code == "?":
            code = "B"
        else:
            piece += bytes((_MARK[code],))
        pieces.append(piece)
        fmt += f"{len(piece)}s{code}"
    return struct.Struct(fmt), tuple(pieces)


def _middle(etype: int, tcp: bool, state: int, reason: int) -> bytes:
    """eventType, tcpState and flowEndReason of one kind of event."""
    name = RAW_EVENT_TYPES[etype]
    state_name = abi.STATE_NAMES.get(state) if tcp else None
    end = RAW_END_REASONS.get(reason, FORCED_END) if name == "DESTROY" else None
    return (_s("eventType") + _s(name) + _s("tcpState") + msgpack.packb(state_name)
            + _s("flowEndReason") + msgpack.packb(end))


# The addresses, each a msgpack str of its text (an IPv6 text can be longer
# than a fixstr's 31 bytes: str8 then). Texts are kept per packed address,
# up to ADDRESS_CACHE of them: a host's own address, its gateways and busy
# peers recur in most flows.
_V4_TAIL = _s("sourceIPv4Address") + b"%s" + _s("destinationIPv4Address") + b"%s"
_V6_TAIL = _s("sourceIPv6Address") + b"%s" + _s("destinationIPv6Address") + b"%s"
ADDRESS_CACHE = 1 << 16


def _v4_text(packed: bytes) -> bytes:
    return _s(socket.inet_ntop(socket.AF_INET, packed))


def _v6_text(packed: bytes) -> bytes:
    return _s(_ipv6_text(packed))


# encode() of a RingEncoder, compiled once at import from the template below:
# the ring record is unpacked straight into locals named after
# abi.EVENT_FIELDS (in its order) and the fixed part is packed from _FIXED.
# make_encode's parameters and locals are encode()'s closure cells, as in a
# hand-written closure. The template may reassign a field (the TCP-only ones
# are zeroed for other protocols); its other names are listed in `own`
# below, and a field may not take one of them.
_ENCODE = '''\
def make_encode(encoder, unpack, pack, pieces, prefix, middles, middle_of, texts, text,
                key4, key6):
    {pieces} = pieces
    abi_version, size, destroy, assured = ABI_VERSION, EVENT_SIZE, EV_DESTROY, F_ASSURED
    v4_tail, v6_tail = V4_TAIL, V6_TAIL

    def encode(view):
        try:
            {targets} = unpack(view)
        except struct_error:
            type_ = version = len_ = family = None
        if version != abi_version or len_ != size or type_ not in RAW_EVENT_TYPES \\
                or family not in (4, 6):
            abi.decode_event(view)      # raises with the reason
            raise AssertionError("decode_event accepted a record encode refused")
        tcp = proto == 6
        if not tcp:
            tcp_flags_orig = tcp_flags_reply = state = 0
        if type_ != destroy:
            end_reason = 0
        mkey = (type_ << 17) | (tcp << 16) | (state << 8) | end_reason
        middle = middles.get(mkey) or middle_of(mkey, type_, tcp, state, end_reason)
        off = encoder._offset
        if family == 4:
            s, d = saddr[:4], daddr[:4]
            tail = v4_tail
        else:
            s, d = saddr, daddr
            tail = v6_tail
        tail = tail % (texts.get(s) or text(s, family), texts.get(d) or text(d, family))
        time_ms = (ts_ns + off) // 1_000_000
        value = pack{fixed} + middle + tail
        if type_ == destroy:
            okey = (key4 if family == 4 else key6)(s, d, sport, dport, proto, dying, vlan)
            ref = (family, okey, ct_id)
        else:
            ref = None
        return (prefix + b"%d" % ct_id, value, time_ms), ref, type_, missed, retries

    return encode
'''


def _encoder_factory() -> Callable:
    fields = abi.EVENT_FIELDS
    pieces = [f"p{i}" for i in range(len(_FIXED))]
    fixed = [x for piece, row in zip(pieces, _FIXED) for x in (piece, row[1])]
    source = _ENCODE.format(pieces=abi.listing(pieces, 4), targets=abi.unpack_targets(fields, 12),
                            fixed=abi.listing(fixed, 8 + len("value = pack")))
    namespace = {
        "ABI_VERSION": abi.ABI_VERSION, "EVENT_SIZE": abi.EVENT_SIZE,
        "EV_DESTROY": abi.EV_DESTROY, "F_ASSURED": abi.F_ASSURED, "FALSE": _FALSE,
        "V4_TAIL": _V4_TAIL, "V6_TAIL": _V6_TAIL, "RAW_EVENT_TYPES": RAW_EVENT_TYPES,
        "abi": abi, "struct_error": struct.error, "__name__": __name__,
    }
    own = ("encoder", "unpack", "pack", "pieces", "prefix", "middles", "middle_of", "texts",
           "text", "key4", "key6", "abi_version", "size", "destroy", "assured", "v4_tail", "v6_tail",
           "view", "tcp", "mkey", "middle", "off", "s", "d", "tail", "time_ms", "value", "okey",
           "ref", *pieces)
    return abi.compile_function(source, "make_encode", namespace, fields, own)


_make_encode = _encoder_factory()


class RingEncoder:
    """Turns ring records into Kafka records for one node.

    `encode(view)` returns ((key, value, time_ms), ack_ref, type, missed,
    retries): the record, then what the daemon counts and acks. ack_ref is
    a DESTROY's (family, outbox key, ct_id), as events.Event.ack_ref, else
    None. It raises AbiError for a record this version does not know, as
    abi.decode_event does.
    """

    def __init__(self, node_id: str, clock: Clock):
        self._clock = clock
        self._offset = 0
        self.refresh()
        self._struct, self._pieces = _fixed_struct(node_id)
        self._prefix = node_id.encode() + b"/"
        self._middles: dict[int, bytes] = {}
        self._texts: dict[bytes, bytes] = {}    # packed address: its msgpack str
        self.encode: Callable = self._make()

    def refresh(self) -> None:
        """Re-read the clock's monotonic-to-wall offset (call it per batch:
        the wall clock may be stepped)."""
        self._offset = self._clock.wall_ns(0)

    def _make(self) -> Callable:
        texts = self._texts
        cache_max = ADDRESS_CACHE

        def text(packed: bytes, family: int) -> bytes:
            if len(texts) >= cache_max:
                texts.clear()
            t = texts[packed] = _v4_text(packed) if family == 4 else _v6_text(packed)
            return t

        return _make_encode(self, _RING.unpack_from, self._struct.pack, self._pieces,
                            self._prefix, self._middles, self._middle_of, texts, text,
                            _OUTBOX_KEY[4].pack, _OUTBOX_KEY[6].pack)

    def _middle_of(self, mkey: int, etype: int, tcp: bool, state: int, reason: int) -> bytes:
        piece = self._middles[mkey] = _middle(etype, tcp, state, reason)
        return piece
