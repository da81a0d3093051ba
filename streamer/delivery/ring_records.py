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

# The event as the ring holds it, with the ports and addresses left as bytes
# (abi.EVENT spells them the same way; only the ports are read differently).
_FIELDS = dict(abi.EVENT.fields)
_RING = struct.Struct("<" + "".join("2s" if name in ("sport", "dport") else f
                                    for name, f in abi.EVENT.fields))
assert _RING.size == abi.EVENT_SIZE
# An outbox key from the event's own bytes (ports as stored: network order).
_OUTBOX_KEY = {4: struct.Struct("<4s4s2s2sBBH"), 6: struct.Struct("<16s16s2s2sBBH")}
assert _OUTBOX_KEY[4].size == abi.KEY4.size and _OUTBOX_KEY[6].size == abi.KEY6.size

_MARK = {"B": 0xCC, "H": 0xCD, "I": 0xCE, "Q": 0xCF}
_NIL, _FALSE = 0xC0, 0xC2


def _s(text: str) -> bytes:
    return msgpack.packb(text)


# The fixed part: (key, struct code) in map order. "2s" is a port in network
# order behind a uint16 marker; "?" is a bool byte (0xc2 + value).
_FIXED = (
    ("ctId", "Q"), ("seq", "I"), ("observationTimeMilliseconds", "Q"),
    ("sourceTransportPort", "2s"), ("destinationTransportPort", "2s"),
    ("protocolIdentifier", "B"), ("vlanId", "H"), ("assured", "?"),
    ("initiatorPackets", "Q"), ("responderPackets", "Q"),
    ("initiatorOctets", "Q"), ("responderOctets", "Q"),
    ("flowStartMilliseconds", "Q"), ("flowEndMilliseconds", "Q"),
    ("missedEvents", "B"), ("retries", "B"),
    ("tcpControlBitsInitiator", "B"), ("tcpControlBitsResponder", "B"),
)
# The variable part: eventType, tcpState, flowEndReason, and two addresses.
_ENTRIES = 2 + len(_FIXED) + 3 + 2     # schemaVersion and nodeId lead


def _fixed_struct(node_id: str) -> tuple[struct.Struct, tuple[bytes, ...]]:
    """The struct of the fixed part and its constant pieces: piece i holds
    what comes before value i (keys, type markers). Piece 0 starts the map."""
    pieces = []
    head = (bytes((0xDE,)) + _ENTRIES.to_bytes(2, "big") + _s("schemaVersion")
            + msgpack.packb(SCHEMA_VERSION) + _s("nodeId") + _s(node_id))
    fmt = ">"
    for key, code in _FIXED:
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
        unpack = _RING.unpack_from
        pack = self._struct.pack
        (p_ct, p_seq, p_ts, p_sp, p_dp, p_proto, p_vlan, p_as, p_po, p_pr, p_bo, p_br,
         p_first, p_last, p_miss, p_retr, p_tfo, p_tfr) = self._pieces
        prefix = self._prefix
        middles = self._middles
        middle_of = self._middle_of
        key4, key6 = _OUTBOX_KEY[4].pack, _OUTBOX_KEY[6].pack
        v4_tail, v6_tail = _V4_TAIL, _V6_TAIL
        texts = self._texts
        cache_max = ADDRESS_CACHE

        def text(packed: bytes, family: int) -> bytes:
            if len(texts) >= cache_max:
                texts.clear()
            t = texts[packed] = _v4_text(packed) if family == 4 else _v6_text(packed)
            return t
        version, size, destroy = abi.ABI_VERSION, abi.EVENT_SIZE, abi.EV_DESTROY
        assured = abi.F_ASSURED
        encoder = self

        def encode(view):
            try:
                (etype, ver, length, family, proto, state, flags, ct_id, seq, reason, missed,
                 tfo, tfr, ts, first, last, po, pr, bo, br, saddr, daddr, sport, dport, vlan,
                 dying, retries) = unpack(view)
            except struct.error:
                etype = ver = length = family = None
            if ver != version or length != size or etype not in RAW_EVENT_TYPES \
                    or family not in (4, 6):
                abi.decode_event(view)      # raises with the reason
                raise AssertionError("decode_event accepted a record encode refused")
            tcp = proto == 6
            if not tcp:
                tfo = tfr = state = 0
            if etype != destroy:
                reason = 0
            mkey = (etype << 17) | (tcp << 16) | (state << 8) | reason
            middle = middles.get(mkey) or middle_of(mkey, etype, tcp, state, reason)
            off = encoder._offset
            if family == 4:
                s, d = saddr[:4], daddr[:4]
                tail = v4_tail
            else:
                s, d = saddr, daddr
                tail = v6_tail
            tail = tail % (texts.get(s) or text(s, family), texts.get(d) or text(d, family))
            time_ms = (ts + off) // 1_000_000
            value = pack(
                p_ct, ct_id, p_seq, seq, p_ts, time_ms, p_sp, sport, p_dp, dport,
                p_proto, proto, p_vlan, vlan, p_as, _FALSE | (flags & assured),
                p_po, po, p_pr, pr, p_bo, bo, p_br, br,
                p_first, (first + off) // 1_000_000, p_last, (last + off) // 1_000_000,
                p_miss, missed, p_retr, retries, p_tfo, tfo, p_tfr, tfr) + middle + tail
            if etype == destroy:
                okey = (key4 if family == 4 else key6)(s, d, sport, dport, proto, dying, vlan)
                ref = (family, okey, ct_id)
            else:
                ref = None
            return (prefix + b"%d" % ct_id, value, time_ms), ref, etype, missed, retries

        return encode

    def _middle_of(self, mkey: int, etype: int, tcp: bool, state: int, reason: int) -> bytes:
        piece = self._middles[mkey] = _middle(etype, tcp, state, reason)
        return piece
