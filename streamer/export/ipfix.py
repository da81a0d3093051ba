"""IPFIX (RFC 7011) messages of ctstream's DESTROY records, one biflow
(RFC 5103) per connection. Pure: no sockets, no clock (the caller gives the
export time), so every byte can be checked by a test.

What a data record carries, and why so (tests/ipfix reads it back with
Debian 12's nfdump 1.7.1 and libfixbuf's ipfixDump):
- the tuple: addresses (8/12 or 27/28), ports (7/11), protocolIdentifier (4);
  one template per address family (TEMPLATE_V4, TEMPLATE_V6);
- counters as octetDeltaCount/packetDeltaCount (1/2) for the initiator's
  direction and their RFC 5103 reverse elements (same id, enterprise bit,
  PEN 29305) for the responder's. A DESTROY carries the flow's final
  counters and each flow is exported once, so the "delta" since the last
  export is the whole flow. nfdump reads biflows from exactly these and
  reads 0 from initiatorOctets/responderOctets (231/232) and the packet
  variants (298/299), which are therefore not sent;
- flowStartMilliseconds/flowEndMilliseconds (152/153), flowEndReason (136,
  the record's own IPFIX code), biflowDirection (239) = 1: the source is
  the initiator, vlanId (58, 0 when untagged);
- tcpControlBits (6) and its reverse, one octet each (reduced-size encoding
  of the unsigned16 of RFC 7125; the datapath keeps 8 bits). The reverse
  comes first in the template: nfdump 1.7.1 maps a reverse element it has
  no reverse slot for onto the forward one, and the later field wins;
- icmpTypeCodeIPv4/IPv6 (32/139) = type * 256 + code. The datapath tracks
  ICMP echo only and keys it by the echo id (records carry it as
  sourceTransportPort); the initiator sends the requests, so the flow's
  type is echo request (8 or 128), code 0. The echo id has no IANA element
  and the port elements are defined for TCP/UDP/SCTP only: ICMP flows are
  exported with both ports 0 (nfdump would otherwise take a non-zero source
  port for a Cisco-style type/code). The field is 0 for other protocols.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from ..errors import WireError

VERSION = 10
HEADER = struct.Struct("!HHIII")      # version, length, export time, sequence, domain
SET_HEADER = struct.Struct("!HH")      # set id, length
TEMPLATE_SET_ID = 2
TEMPLATE_V4, TEMPLATE_V6 = 256, 257    # data set ids are template ids (>= 256)
REVERSE_PEN = 29305                    # RFC 5103's private enterprise number
ENTERPRISE_BIT = 0x8000
MAX_MESSAGE = 65535                    # the header's length field
ICMP_ECHO_REQUEST = {1: 8 << 8, 58: 128 << 8}
BIFLOW_INITIATOR = 1                   # biflowDirection: the source is the initiator
U32 = 1 << 32


@dataclass(frozen=True)
class Field:
    """One field specifier of a template: an IANA element, or its RFC 5103
    reverse (the same id with the enterprise bit and PEN 29305)."""

    name: str
    element_id: int
    length: int
    reverse: bool = False

    def specifier(self) -> bytes:
        if self.reverse:
            return struct.pack("!HHI", self.element_id | ENTERPRISE_BIT, self.length, REVERSE_PEN)
        return struct.pack("!HH", self.element_id, self.length)


_CODES = {1: "B", 2: "H", 4: "4s", 8: "Q", 16: "16s"}   # addresses go as packed bytes


@dataclass(frozen=True)
class Template:
    template_id: int
    fields: tuple[Field, ...]

    @property
    def layout(self) -> struct.Struct:
        return struct.Struct("!" + "".join(_CODES[f.length] for f in self.fields))

    def record(self) -> bytes:
        """The template record: id, field count, the field specifiers."""
        return struct.pack("!HH", self.template_id, len(self.fields)) + b"".join(
            f.specifier() for f in self.fields)


def _template(template_id: int, src: Field, dst: Field, icmp: Field) -> Template:
    return Template(template_id, (
        src, dst,
        Field("sourceTransportPort", 7, 2),
        Field("destinationTransportPort", 11, 2),
        Field("protocolIdentifier", 4, 1),
        icmp,
        Field("vlanId", 58, 2),
        Field("flowStartMilliseconds", 152, 8),
        Field("flowEndMilliseconds", 153, 8),
        Field("flowEndReason", 136, 1),
        Field("biflowDirection", 239, 1),
        Field("reverseTcpControlBits", 6, 1, reverse=True),
        Field("tcpControlBits", 6, 1),
        Field("octetDeltaCount", 1, 8),
        Field("packetDeltaCount", 2, 8),
        Field("reverseOctetDeltaCount", 1, 8, reverse=True),
        Field("reversePacketDeltaCount", 2, 8, reverse=True),
    ))


TEMPLATES = {
    4: _template(TEMPLATE_V4, Field("sourceIPv4Address", 8, 4),
                 Field("destinationIPv4Address", 12, 4), Field("icmpTypeCodeIPv4", 32, 2)),
    6: _template(TEMPLATE_V6, Field("sourceIPv6Address", 27, 16),
                 Field("destinationIPv6Address", 28, 16), Field("icmpTypeCodeIPv6", 139, 2)),
}


@dataclass(frozen=True)
class Biflow:
    """What one data record says, in template order but the address family."""

    family: int
    source: bytes              # packed address
    destination: bytes
    source_port: int
    destination_port: int
    protocol: int
    icmp_type_code: int
    vlan: int
    start_ms: int
    end_ms: int
    end_reason: int
    tcp_flags: int             # initiator -> responder
    reverse_tcp_flags: int
    octets: int
    packets: int
    reverse_octets: int
    reverse_packets: int

    def values(self) -> tuple:
        return (self.source, self.destination, self.source_port, self.destination_port,
                self.protocol, self.icmp_type_code, self.vlan, self.start_ms, self.end_ms,
                self.end_reason, BIFLOW_INITIATOR, self.reverse_tcp_flags, self.tcp_flags,
                self.octets, self.packets, self.reverse_octets, self.reverse_packets)

    def encode(self) -> bytes:
        try:
            return TEMPLATES[self.family].layout.pack(*self.values())
        except struct.error as exc:
            raise WireError(f"a value does not fit its IPFIX field: {exc}") from exc


# Schema v2 names the TCP flags as IPFIX does; v1 records use the older names.
_FLAG_NAMES = (("tcpControlBits", "tcpControlBitsInitiator"),
               ("reverseTcpControlBits", "tcpControlBitsResponder"))


def biflow_of(record: dict) -> Biflow:
    """The biflow of a DESTROY record (a decoded Kafka value); WireError
    when it lacks a field or holds a value IPFIX cannot carry."""
    try:
        if "sourceIPv4Address" in record:
            family, src, dst = 4, record["sourceIPv4Address"], record["destinationIPv4Address"]
        else:
            family, src, dst = 6, record["sourceIPv6Address"], record["destinationIPv6Address"]
        proto = _uint(record, "protocolIdentifier", 8)
        icmp = ICMP_ECHO_REQUEST.get(proto, 0)
        flags = [_flags(record, *names) for names in _FLAG_NAMES]
        return Biflow(
            family=family, source=_packed(src, family), destination=_packed(dst, family),
            source_port=0 if icmp else _uint(record, "sourceTransportPort", 16),
            destination_port=0 if icmp else _uint(record, "destinationTransportPort", 16),
            protocol=proto, icmp_type_code=icmp, vlan=_uint(record, "vlanId", 12),
            start_ms=_uint(record, "flowStartMilliseconds", 64),
            end_ms=_uint(record, "flowEndMilliseconds", 64),
            end_reason=_uint(record, "flowEndReason", 8),
            tcp_flags=flags[0], reverse_tcp_flags=flags[1],
            octets=_uint(record, "initiatorOctets", 64),
            packets=_uint(record, "initiatorPackets", 64),
            reverse_octets=_uint(record, "responderOctets", 64),
            reverse_packets=_uint(record, "responderPackets", 64))
    except KeyError as exc:
        raise WireError(f"DESTROY record without {exc.args[0]!r}") from exc


def _uint(record: dict, name: str, bits: int) -> int:
    value = record[name]
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << bits:
        raise WireError(f"{name} {value!r} is not an unsigned {bits}-bit integer")
    return value


def _flags(record: dict, name: str, v1_name: str) -> int:
    if name in record:
        return _uint(record, name, 8)
    return _uint(record, v1_name, 8) if v1_name in record else 0


def _packed(text, family: int) -> bytes:
    try:
        addr = ipaddress.ip_address(text)
    except (ValueError, TypeError) as exc:
        raise WireError(f"{text!r} is not an IP address") from exc
    if addr.version != family:
        raise WireError(f"{text!r} is not an IPv{family} address")
    return addr.packed


def message(sets: list[bytes], *, export_time: int, sequence: int, domain: int) -> bytes:
    """One IPFIX message: the header and its sets. `sequence` counts the data
    records sent before this message in this session (modulo 2^32)."""
    length = HEADER.size + sum(len(s) for s in sets)
    if length > MAX_MESSAGE:
        raise WireError(f"an IPFIX message of {length} bytes exceeds {MAX_MESSAGE}")
    return HEADER.pack(VERSION, length, export_time % U32, sequence % U32, domain) + b"".join(sets)


def set_of(set_id: int, records: list[bytes]) -> bytes:
    body = b"".join(records)
    return SET_HEADER.pack(set_id, SET_HEADER.size + len(body)) + body


def template_set() -> bytes:
    """The set that announces both templates."""
    return set_of(TEMPLATE_SET_ID, [t.record() for t in TEMPLATES.values()])


class MessageEncoder:
    """The messages of one transport session (RFC 7011's sequence numbers
    count per session and observation domain): templates on demand, data
    records packed into messages of at most `max_message` bytes, the
    records of each family in a data set of its template."""

    def __init__(self, domain: int, max_message: int):
        if not 0 <= domain < U32:
            raise ValueError(f"observation domain {domain} is not a 32-bit unsigned integer")
        smallest = HEADER.size + SET_HEADER.size + max(t.layout.size for t in TEMPLATES.values())
        if not max(smallest, len(template_set()) + HEADER.size) <= max_message <= MAX_MESSAGE:
            raise ValueError(f"max message size {max_message} cannot hold the templates or a record")
        self.domain = domain
        self.max_message = max_message
        self.sequence = 0           # data records sent in this session

    def templates(self, export_time: int) -> bytes:
        return message([template_set()], export_time=export_time, sequence=self.sequence,
                       domain=self.domain)

    def data(self, flows: list[Biflow], export_time: int) -> list[bytes]:
        """The messages that carry `flows`, in order; the sequence moves on."""
        out: list[bytes] = []
        sets: list[bytes] = []
        run: list[bytes] = []          # records of the set being filled
        run_family = 0
        size = HEADER.size
        in_message = 0                 # data records in the message being filled

        def close_set() -> None:
            if run:
                sets.append(set_of(TEMPLATES[run_family].template_id, run))

        for flow in flows:
            rec = flow.encode()
            extra = len(rec) + (SET_HEADER.size if flow.family != run_family or not run else 0)
            if size + extra > self.max_message:
                close_set()
                out.append(message(sets, export_time=export_time, sequence=self.sequence,
                                   domain=self.domain))
                self.sequence = (self.sequence + in_message) % U32
                sets, run, size, in_message = [], [], HEADER.size, 0
                extra = SET_HEADER.size + len(rec)
            if flow.family != run_family or not run:
                close_set()
                run, run_family = [], flow.family
            run.append(rec)
            size += extra
            in_message += 1
        if in_message:
            close_set()
            out.append(message(sets, export_time=export_time, sequence=self.sequence,
                               domain=self.domain))
            self.sequence = (self.sequence + in_message) % U32
        return out
