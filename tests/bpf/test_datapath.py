"""The datapath (ct_xdp_ingress, ct_tc_egress) case by case, in Katran's way.

Each case is a description, the frames (and the program each goes through),
the verdicts, the table afterwards (which entries exist, their state, flags,
packets and L3 bytes per direction), the events in order, and the counter
deltas. Counters a case does not name must stay 0, except packets (one per
frame), events, created and destroyed, which follow from the frames and the
events. One datapath is loaded for the module and reset between cases.

Invariants checked for every case besides: every event of one connection
carries that connection's ct_id and consecutive seq numbers from 0, a reused
tuple gets a new ct_id, the entry's seq counter equals its events, and every
live entry is filed in the expiry index under its due slot.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_NOP
from scapy.layers.inet6 import (ICMPv6ND_NS, IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment,
                                IPv6ExtHdrHopByHop, IPv6ExtHdrRouting)
from scapy.layers.l2 import ARP
from scapy.packet import Raw

from streamer.datapath import abi
from streamer.datapath.selection import PrefixSet, Selection
from tests.bpf.packets import VERDICTS, Flow, Pkt, frame, l2, loaded_bench, swap16

pytestmark = pytest.mark.root

TABLE_LIMIT = 16

A, R, FR, P = abi.F_ASSURED, abi.F_SEEN_REPLY, abi.F_FIN_REPLY, abi.F_PICKUP

T4 = Flow("10.1.0.1", "10.1.0.2", "tcp", 40000, 80)
T6 = Flow("2001:db8::1", "2001:db8::2", "tcp", 40000, 443)
U4 = Flow("10.1.0.1", "10.1.0.2", "udp", 5353, 53)
U6 = Flow("2001:db8::1", "2001:db8::2", "udp", 5353, 53)
I4 = Flow("10.1.0.1", "10.1.0.2", "icmp", 0x1234)
I6 = Flow("2001:db8::1", "2001:db8::2", "icmp", 0x1234)


# ---- the table's vocabulary ------------------------------------------------------

@dataclass(frozen=True)
class Want:
    """An entry expected in the table after the case. gen tells connections
    on the same tuple apart (1 = the one after a reuse)."""

    flow: Flow
    state: str
    flags: int
    pkts: tuple[int, int]
    bytes: tuple[int, int]
    gen: int = 0


@dataclass(frozen=True)
class Ev:
    type: str          # "NEW" | "UPDATE" | "DESTROY"
    flow: Flow
    state: str
    flags: int
    reason: str = "none"
    gen: int = 0
    pkts: tuple[int, int] | None = None   # counters the event carries, if checked


def NEW(flow, state="NONE", flags=0, gen=0):
    return Ev("NEW", flow, state, flags, gen=gen)


def UPD(flow, state, flags, gen=0):
    return Ev("UPDATE", flow, state, flags, gen=gen)


def DESTROY(flow, state, flags, reason, gen=0, pkts=None):
    return Ev("DESTROY", flow, state, flags, reason, gen, pkts)


@dataclass
class Case:
    name: str
    packets: list[Pkt]
    table: list[Want] = field(default_factory=list)
    events: list[Ev] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)
    verdicts: list[str] | None = None     # per frame; default all "pass"
    config: dict = field(default_factory=dict)
    xfail: str | None = None              # a known bug, reported with a reproducer
    ack_before: int | None = None         # ack the DESTROYs so far before this frame
    # A live apply before frame i: configure(**reconfigure) on top of config.
    reconfigure_before: int | None = None
    reconfigure: dict = field(default_factory=dict)


def untracked(*pkts: Pkt, **extra) -> dict:
    """Counter deltas of frames that pass without an entry."""
    return {"untracked_packets": len(pkts),
            "untracked_bytes": sum(p.l3_len for p in pkts), **extra}


def malformed(name: str, pkt: Pkt, xfail: str | None = None) -> Case:
    return Case(f"malformed: {name}", [pkt], stats={"invalid": 1}, xfail=xfail)


def patched(pkt: Pkt, offset: int, data: bytes) -> Pkt:
    b = bytearray(pkt.data)
    b[offset:offset + len(data)] = data
    return Pkt(bytes(b), pkt.hook)


def truncated(pkt: Pkt, n: int) -> Pkt:
    return Pkt(pkt.data[:n], pkt.hook)


def handshake(f: Flow) -> list[Pkt]:
    return [f.orig("S"), f.reply("SA"), f.orig("A")]


HS_EVENTS = [NEW(T4, "SYN_SENT"), UPD(T4, "SYN_RECV", R), UPD(T4, "ESTABLISHED", A | R)]
ETH, IP4, IP6 = 14, 20, 40


# ---- TCP: every transition of ct_tcp_next -----------------------------------------

TCP_CASES = [
    Case("tcp: SYN creates SYN_SENT", [T4.orig("S")],
         [Want(T4, "SYN_SENT", 0, (1, 0), (40, 0))],
         [NEW(T4, "SYN_SENT")]),
    Case("tcp: retransmitted SYN stays SYN_SENT, no event", [T4.orig("S"), T4.orig("S")],
         [Want(T4, "SYN_SENT", 0, (2, 0), (80, 0))],
         [NEW(T4, "SYN_SENT")]),
    Case("tcp: SYN/ACK reply -> SYN_RECV", [T4.orig("S"), T4.reply("SA")],
         [Want(T4, "SYN_RECV", R, (1, 1), (40, 40))],
         HS_EVENTS[:2]),
    Case("tcp: simultaneous open, SYN from the reply side -> SYN_RECV",
         [T4.orig("S"), T4.reply("S")],
         [Want(T4, "SYN_RECV", R, (1, 1), (40, 40))],
         HS_EVENTS[:2]),
    Case("tcp: ACK of the handshake -> ESTABLISHED, ASSURED", handshake(T4),
         [Want(T4, "ESTABLISHED", A | R, (2, 1), (80, 40))],
         HS_EVENTS),
    Case("tcp: data in ESTABLISHED counts, no event",
         handshake(T4) + [T4.orig("PA", b"x" * 100), T4.reply("A")],
         [Want(T4, "ESTABLISHED", A | R, (3, 2), (220, 80))],
         HS_EVENTS),
    Case("tcp: ACK+FIN closing the handshake -> FIN_WAIT, ASSURED",
         [T4.orig("S"), T4.reply("SA"), T4.orig("FA")],
         [Want(T4, "FIN_WAIT", A | R, (2, 1), (80, 40))],
         HS_EVENTS[:2] + [UPD(T4, "FIN_WAIT", A | R)]),
    Case("tcp: FIN from the original side -> FIN_WAIT",
         handshake(T4) + [T4.orig("FA")],
         [Want(T4, "FIN_WAIT", A | R, (3, 1), (120, 40))],
         HS_EVENTS + [UPD(T4, "FIN_WAIT", A | R)]),
    Case("tcp: ACK from the FIN's own side keeps FIN_WAIT",
         handshake(T4) + [T4.orig("FA"), T4.orig("A")],
         [Want(T4, "FIN_WAIT", A | R, (4, 1), (160, 40))],
         HS_EVENTS + [UPD(T4, "FIN_WAIT", A | R)]),
    Case("tcp: ACK from the other side -> CLOSE_WAIT",
         handshake(T4) + [T4.orig("FA"), T4.reply("A")],
         [Want(T4, "CLOSE_WAIT", A | R, (3, 2), (120, 80))],
         HS_EVENTS + [UPD(T4, "FIN_WAIT", A | R), UPD(T4, "CLOSE_WAIT", A | R)]),
    Case("tcp: FIN from the other side -> LAST_ACK",
         handshake(T4) + [T4.orig("FA"), T4.reply("A"), T4.reply("FA")],
         [Want(T4, "LAST_ACK", A | R, (3, 3), (120, 120))],
         HS_EVENTS + [UPD(T4, "FIN_WAIT", A | R), UPD(T4, "CLOSE_WAIT", A | R),
                      UPD(T4, "LAST_ACK", A | R)]),
    Case("tcp: FIN+ACK from the other side in FIN_WAIT -> LAST_ACK at once",
         handshake(T4) + [T4.orig("FA"), T4.reply("FA")],
         [Want(T4, "LAST_ACK", A | R, (3, 2), (120, 80))],
         HS_EVENTS + [UPD(T4, "FIN_WAIT", A | R), UPD(T4, "LAST_ACK", A | R)]),
    Case("tcp: last ACK from the original side -> TIME_WAIT",
         handshake(T4) + [T4.orig("FA"), T4.reply("A"), T4.reply("FA"), T4.orig("A")],
         [Want(T4, "TIME_WAIT", A | R, (4, 3), (160, 120))],
         HS_EVENTS + [UPD(T4, "FIN_WAIT", A | R), UPD(T4, "CLOSE_WAIT", A | R),
                      UPD(T4, "LAST_ACK", A | R), UPD(T4, "TIME_WAIT", A | R)]),
    Case("tcp: FIN from the reply side first -> FIN_WAIT with FIN_REPLY",
         handshake(T4) + [T4.reply("FA")],
         [Want(T4, "FIN_WAIT", A | R | FR, (2, 2), (80, 80))],
         HS_EVENTS + [UPD(T4, "FIN_WAIT", A | R | FR)]),
    Case("tcp: close begun by the reply side runs to TIME_WAIT",
         handshake(T4) + [T4.reply("FA"), T4.orig("A"), T4.orig("FA"), T4.reply("A")],
         [Want(T4, "TIME_WAIT", A | R | FR, (4, 3), (160, 120))],
         HS_EVENTS + [UPD(T4, "FIN_WAIT", A | R | FR), UPD(T4, "CLOSE_WAIT", A | R | FR),
                      UPD(T4, "LAST_ACK", A | R | FR), UPD(T4, "TIME_WAIT", A | R | FR)]),
    Case("tcp: RST in ESTABLISHED -> CLOSE", handshake(T4) + [T4.orig("R")],
         [Want(T4, "CLOSE", A | R, (3, 1), (120, 40))],
         HS_EVENTS + [UPD(T4, "CLOSE", A | R)]),
    Case("tcp: RST answering a SYN -> CLOSE", [T4.orig("S"), T4.reply("RA")],
         [Want(T4, "CLOSE", R, (1, 1), (40, 40))],
         [NEW(T4, "SYN_SENT"), UPD(T4, "CLOSE", R)]),
    Case("tcp: RST in FIN_WAIT -> CLOSE", handshake(T4) + [T4.orig("FA"), T4.reply("R")],
         [Want(T4, "CLOSE", A | R, (3, 2), (120, 80))],
         HS_EVENTS + [UPD(T4, "FIN_WAIT", A | R), UPD(T4, "CLOSE", A | R)]),
    Case("tcp: mid-stream ACK picked up -> ESTABLISHED, PICKUP, not ASSURED",
         [T4.orig("A"), T4.orig("PA", b"y" * 10)],
         [Want(T4, "ESTABLISHED", P, (2, 0), (90, 0))],
         [NEW(T4, "ESTABLISHED", P)]),
    Case("tcp: picked-up flow is ASSURED once the other side answers",
         [T4.orig("A"), T4.reply("A")],
         [Want(T4, "ESTABLISHED", P | A | R, (1, 1), (40, 40))],
         [NEW(T4, "ESTABLISHED", P), UPD(T4, "ESTABLISHED", P | A | R)]),
    Case("tcp: mid-stream FIN+ACK picked up -> FIN_WAIT", [T4.orig("FA")],
         [Want(T4, "FIN_WAIT", P, (1, 0), (40, 0))],
         [NEW(T4, "FIN_WAIT", P)]),
    Case("tcp: SYN/ACK with no entry is not tracked", [T4.reply("SA")],
         stats=untracked(T4.reply("SA"), invalid=1)),
    Case("tcp: RST with no entry is not tracked", [T4.orig("R")],
         stats=untracked(T4.orig("R"), invalid=1)),
    Case("tcp: RST+ACK with no entry is not tracked", [T4.orig("RA")],
         stats=untracked(T4.orig("RA"), invalid=1)),
    Case("tcp: a segment without SYN or ACK starts nothing", [T4.orig("P", b"z")],
         stats=untracked(T4.orig("P", b"z"), invalid=1)),
    Case("tcp: new SYN on a TIME_WAIT tuple ends the old connection, starts a new one",
         handshake(T4) + [T4.orig("FA"), T4.reply("FA"), T4.orig("A"), T4.orig("S")],
         [Want(T4, "SYN_SENT", 0, (1, 0), (40, 0), gen=1)],
         HS_EVENTS + [UPD(T4, "FIN_WAIT", A | R), UPD(T4, "LAST_ACK", A | R),
                      UPD(T4, "TIME_WAIT", A | R),
                      DESTROY(T4, "TIME_WAIT", A | R, "fin", pkts=(4, 2)),
                      NEW(T4, "SYN_SENT", gen=1)]),
    Case("tcp: new SYN on a reset tuple ends the old connection (reason rst)",
         handshake(T4) + [T4.reply("R"), T4.orig("S")],
         [Want(T4, "SYN_SENT", 0, (1, 0), (40, 0), gen=1)],
         HS_EVENTS + [UPD(T4, "CLOSE", A | R), DESTROY(T4, "CLOSE", A | R, "rst", pkts=(2, 2)),
                      NEW(T4, "SYN_SENT", gen=1)]),
    Case("tcp: SYN+ACK on a TIME_WAIT tuple does not restart it",
         handshake(T4) + [T4.orig("FA"), T4.reply("FA"), T4.orig("A"), T4.orig("SA")],
         [Want(T4, "TIME_WAIT", A | R, (5, 2), (200, 80))],
         HS_EVENTS + [UPD(T4, "FIN_WAIT", A | R), UPD(T4, "LAST_ACK", A | R),
                      UPD(T4, "TIME_WAIT", A | R)]),
    Case("tcp over IPv6: handshake -> ESTABLISHED", handshake(T6),
         [Want(T6, "ESTABLISHED", A | R, (2, 1), (120, 60))],
         [NEW(T6, "SYN_SENT"), UPD(T6, "SYN_RECV", R), UPD(T6, "ESTABLISHED", A | R)]),
    Case("tcp: tc ingress in place of XDP: the client's packets in, the replies out",
         [T4.orig("S").via_tc_ingress(), T4.reply("SA").via_tc(),
          T4.orig("A").via_tc_ingress()],
         [Want(T4, "ESTABLISHED", A | R, (2, 1), (80, 40))],
         HS_EVENTS),
    Case("tcp over IPv6 through tc ingress and egress, closed with RST",
         [T6.orig("S").via_tc_ingress(), T6.reply("SA").via_tc(),
          T6.orig("A").via_tc_ingress(), T6.orig("R").via_tc_ingress()],
         [Want(T6, "CLOSE", A | R, (3, 1), (180, 60))],
         [NEW(T6, "SYN_SENT"), UPD(T6, "SYN_RECV", R), UPD(T6, "ESTABLISHED", A | R),
          UPD(T6, "CLOSE", A | R)]),
    Case("tcp: host-initiated, SYN through tc egress, reply through XDP",
         [T4.orig("S").via_tc(), T4.reply("SA"), T4.orig("A").via_tc()],
         [Want(T4, "ESTABLISHED", A | R, (2, 1), (80, 40))],
         HS_EVENTS),
    Case("tcp: zero-length TCP option (ignored, like the kernel) is tracked normally",
         [patched(T4.orig("S", l4={"options": [("NOP", None)] * 4}),
                  ETH + IP4 + 20, b"\x02\x00\x00\x00")],
         [Want(T4, "SYN_SENT", 0, (1, 0), (44, 0))],
         [NEW(T4, "SYN_SENT")]),
]


# ---- UDP and ICMP ----------------------------------------------------------------

OTHER_ICMP = frame(l2() / IP(src=I4.src, dst=I4.dst) / ICMP(type=3, code=1) / Raw(bytes(28)))
NS6 = frame(l2() / IPv6(src=I6.src, dst=I6.dst) / ICMPv6ND_NS(tgt=I6.dst))
GRE4 = frame(l2() / IP(src=U4.src, dst=U4.dst, proto=47) / Raw(bytes(8)))
ARP_FRAME = frame(l2(dst="ff:ff:ff:ff:ff:ff") / ARP(psrc=U4.src, pdst=U4.dst))

L4_CASES = [
    Case("udp: first datagram creates an entry", [U4.orig(payload=bytes(10))],
         [Want(U4, "NONE", 0, (1, 0), (38, 0))],
         [NEW(U4)]),
    Case("udp: a reply makes it ASSURED", [U4.orig(payload=bytes(10)), U4.reply(payload=bytes(20))],
         [Want(U4, "NONE", A | R, (1, 1), (38, 48))],
         [NEW(U4), UPD(U4, "NONE", A | R)]),
    Case("udp: counters per direction",
         [U4.orig(payload=bytes(n)) for n in (1, 2, 3)] +
         [U4.reply(payload=bytes(n)) for n in (100, 200)],
         [Want(U4, "NONE", A | R, (3, 2), (29 + 30 + 31, 128 + 228))],
         [NEW(U4), UPD(U4, "NONE", A | R)]),
    Case("udp over IPv6: create and reply", [U6.orig(payload=bytes(4)), U6.reply(payload=bytes(8))],
         [Want(U6, "NONE", A | R, (1, 1), (52, 56))],
         [NEW(U6), UPD(U6, "NONE", A | R)]),
    Case("icmp: echo request creates an entry keyed by the echo id", [I4.orig()],
         [Want(I4, "NONE", 0, (1, 0), (28, 0))],
         [NEW(I4)]),
    Case("icmp: echo reply matches and makes it ASSURED", [I4.orig(), I4.reply()],
         [Want(I4, "NONE", A | R, (1, 1), (28, 28))],
         [NEW(I4), UPD(I4, "NONE", A | R)]),
    Case("icmp: two echo ids are two entries",
         [I4.orig(), Flow(I4.src, I4.dst, "icmp", 0x4321).orig()],
         [Want(I4, "NONE", 0, (1, 0), (28, 0)),
          Want(Flow(I4.src, I4.dst, "icmp", 0x4321), "NONE", 0, (1, 0), (28, 0))],
         [NEW(I4), NEW(Flow(I4.src, I4.dst, "icmp", 0x4321))]),
    Case("icmp: a lone echo reply creates nothing", [I4.reply()],
         stats=untracked(I4.reply(), invalid=1)),
    Case("icmpv6: echo request and reply", [I6.orig(), I6.reply()],
         [Want(I6, "NONE", A | R, (1, 1), (48, 48))],
         [NEW(I6), UPD(I6, "NONE", A | R)]),
    Case("icmpv6: a lone echo reply creates nothing", [I6.reply()],
         stats=untracked(I6.reply(), invalid=1)),
    Case("icmp: other types are counted other_l4, not tracked", [OTHER_ICMP],
         stats=untracked(OTHER_ICMP, other_l4=1)),
    Case("icmpv6: neighbour solicitation is other_l4, not tracked", [NS6],
         stats=untracked(NS6, other_l4=1)),
    Case("ip: a protocol we do not track (GRE) is other_l4", [GRE4],
         stats=untracked(GRE4, other_l4=1)),
    Case("arp is not IP: counted not_ip, nothing else", [ARP_FRAME],
         stats={"not_ip": 1}),
]


# ---- fragments, extension headers, IPv4 options --------------------------------------

HBH, RTG, DST = IPv6ExtHdrHopByHop(), IPv6ExtHdrRouting(), IPv6ExtHdrDestOpt()
FRAG0_MORE = IPv6ExtHdrFragment(offset=0, m=1, id=7)
FRAG0_ATOMIC = IPv6ExtHdrFragment(offset=0, m=0, id=8)
FRAG_LATER = IPv6ExtHdrFragment(offset=10, m=0, id=7)
AH = Raw(bytes([17, 4, 0, 0]) + bytes(8) + bytes(12))  # next UDP, (4+2)*4 = 24 bytes
V4_LATER_FRAG = U4.orig(payload=bytes(40), ip={"frag": 185})
V6_LATER_FRAG = U6.orig(payload=bytes(40), ext=(FRAG_LATER,))
SEVEN_EXT = U6.orig(payload=bytes(4), ext=(HBH, DST, DST, DST, DST, DST, DST))

FRAGMENT_CASES = [
    Case("ipv4: first fragment (MF, offset 0) is tracked by its ports",
         [U4.orig(payload=bytes(100), ip={"flags": "MF"}, l4={"len": 1008})],
         [Want(U4, "NONE", 0, (1, 0), (128, 0))],
         [NEW(U4)]),
    Case("ipv4: a later fragment is counted, not tracked", [V4_LATER_FRAG],
         stats=untracked(V4_LATER_FRAG, fragments=1)),
    Case("ipv4: options (IHL 6) are skipped to find the ports",
         [U4.orig(payload=bytes(4), ip={"options": [IPOption_NOP()] * 4})],
         [Want(U4, "NONE", 0, (1, 0), (36, 0))],
         [NEW(U4)]),
    Case("ipv6: hop-by-hop options are walked",
         [U6.orig(payload=bytes(4), ext=(HBH,))],
         [Want(U6, "NONE", 0, (1, 0), (60, 0))],
         [NEW(U6)]),
    Case("ipv6: routing header is walked", [U6.orig(payload=bytes(4), ext=(RTG,))],
         [Want(U6, "NONE", 0, (1, 0), (60, 0))],
         [NEW(U6)]),
    Case("ipv6: destination options are walked", [U6.orig(payload=bytes(4), ext=(DST,))],
         [Want(U6, "NONE", 0, (1, 0), (60, 0))],
         [NEW(U6)]),
    Case("ipv6: AH is walked", [U6.orig(payload=bytes(4), ip={"nh": 51}, ext=(AH,))],
         [Want(U6, "NONE", 0, (1, 0), (76, 0))],
         [NEW(U6)]),
    Case("ipv6: hop-by-hop, routing, dest opts and a first fragment: tracked by ports",
         [T6.orig("S", ext=(HBH, RTG, DST, FRAG0_MORE))],
         [Want(T6, "SYN_SENT", 0, (1, 0), (92, 0))],
         [NEW(T6, "SYN_SENT")]),
    Case("ipv6: atomic fragment (offset 0, no M) is tracked",
         [U6.orig(payload=bytes(4), ext=(FRAG0_ATOMIC,))],
         [Want(U6, "NONE", 0, (1, 0), (60, 0))],
         [NEW(U6)]),
    Case("ipv6: a later fragment is counted, not tracked", [V6_LATER_FRAG],
         stats=untracked(V6_LATER_FRAG, fragments=1)),
    Case("ipv6: more extension headers than the parser walks: other_l4", [SEVEN_EXT],
         stats=untracked(SEVEN_EXT, other_l4=1)),
]


# ---- VLANs -------------------------------------------------------------------------

V100, V200 = U4.on_vlans(100), U4.on_vlans(200)
QINQ = U4.on_vlans(300, 100)

VLAN_CASES = [
    Case("vlan: 802.1Q tagged flow is tracked, key has the VLAN id",
         [V100.orig(payload=bytes(2)), V100.reply(payload=bytes(2))],
         [Want(V100, "NONE", A | R, (1, 1), (30, 30))],
         [NEW(V100), UPD(V100, "NONE", A | R)]),
    Case("vlan: QinQ (802.1ad outer, 802.1Q inner): key has the outer id",
         [QINQ.orig(payload=bytes(2)), QINQ.reply(payload=bytes(2))],
         [Want(QINQ, "NONE", A | R, (1, 1), (30, 30))],
         [NEW(QINQ), UPD(QINQ, "NONE", A | R)]),
    Case("vlan: the same tuple on two VLANs is two entries",
         [V100.orig(payload=bytes(2)), V200.orig(payload=bytes(2)), U4.orig(payload=bytes(2))],
         [Want(V100, "NONE", 0, (1, 0), (30, 0)), Want(V200, "NONE", 0, (1, 0), (30, 0)),
          Want(U4, "NONE", 0, (1, 0), (30, 0))],
         [NEW(V100), NEW(V200), NEW(U4)]),
    Case("vlan: priority bits are not part of the id",
         [patched(V100.orig(payload=bytes(2)), ETH, b"\xa0\x64")],  # PCP 5, VID 100
         [Want(V100, "NONE", 0, (1, 0), (30, 0))],
         [NEW(V100)]),
    Case("vlan: IPv6 on 802.1Q, key has the VLAN id",
         [U6.on_vlans(7).orig(payload=bytes(2)), U6.on_vlans(7).reply(payload=bytes(2))],
         [Want(U6.on_vlans(7), "NONE", A | R, (1, 1), (50, 50))],
         [NEW(U6.on_vlans(7)), UPD(U6.on_vlans(7), "NONE", A | R)]),
    Case("vlan: a reply on another VLAN is another connection",
         [V100.orig(payload=bytes(2)), V200.reply(payload=bytes(2))],
         [Want(V100, "NONE", 0, (1, 0), (30, 0)),
          Want(Flow(U4.dst, U4.src, "udp", U4.dport, U4.sport, (200,)), "NONE", 0,
               (1, 0), (30, 0))],
         [NEW(V100), NEW(Flow(U4.dst, U4.src, "udp", U4.dport, U4.sport, (200,)))]),
]


# ---- malformed frames: all pass, all count invalid, none creates anything ----------------

def _v4(proto=UDP(sport=1, dport=2), payload=bytes(8), **ip) -> Pkt:
    return frame(l2() / IP(src=U4.src, dst=U4.dst, **ip) / proto / Raw(payload))


def _v6(l4=UDP(sport=1, dport=2), payload=bytes(8), ext=(), **ip6) -> Pkt:
    pkt = IPv6(src=U6.src, dst=U6.dst, **ip6)
    for h in ext:
        pkt = pkt / h
    return frame(l2() / pkt / l4 / Raw(payload))


ICMP4_SHORT = frame(l2() / IP(src=I4.src, dst=I4.dst, proto=1) / Raw(b"\x08\x00\xf7\xff"))
ICMP6_SHORT = frame(l2() / IPv6(src=I6.src, dst=I6.dst, nh=58) / Raw(b"\x80\x00\x7f\xff"))

MALFORMED_CASES = [
    malformed("empty frame", Pkt(b"")),
    malformed("truncated Ethernet header", Pkt(l2().build()[:10])),
    malformed("802.1Q tag cut short", Pkt(bytes(l2((100,)) / IP())[:ETH + 2])),
    malformed("truncated IPv4 header", truncated(_v4(), ETH + 12)),
    malformed("IPv4 IHL < 5", _v4(ihl=4)),
    malformed("IPv4 IHL pointing beyond the packet", _v4(ihl=15)),
    malformed("IPv4 tot_len < IHL*4", _v4(len=12)),
    malformed("IPv4 tot_len > frame", _v4(len=1000)),
    malformed("IPv4 tot_len 0", _v4(len=0)),
    malformed("IPv4 header with version 6", patched(_v4(), ETH, b"\x65")),
    malformed("truncated TCP header", truncated(_v4(TCP(sport=1, dport=2), b"", len=30), ETH + 30)),
    malformed("TCP header cut by tot_len (Ethernet padding after it)",
              _v4(TCP(sport=1, dport=2, flags="S"), b"", len=30)),
    malformed("TCP doff < 5", _v4(TCP(sport=1, dport=2, flags="S", dataofs=4), b"")),
    malformed("TCP doff beyond the segment", _v4(TCP(sport=1, dport=2, flags="S", dataofs=15), b"")),
    malformed("UDP length < 8", _v4(UDP(sport=1, dport=2, len=4))),
    malformed("UDP length > IP payload", _v4(UDP(sport=1, dport=2, len=100))),
    malformed("truncated UDP header", truncated(_v4(UDP(sport=1, dport=2), b"", len=24), ETH + 24)),
    malformed("truncated ICMP echo header", ICMP4_SHORT),
    malformed("ICMP shorter than an echo header, Ethernet padding after it",
              frame(l2() / IP(src=I4.src, dst=I4.dst, proto=1) / Raw(b"\x08\x00\xf7\xff"),
                    pad=b"\x12\x34\x00\x01" + bytes(22))),
    malformed("truncated ICMPv6 echo header", ICMP6_SHORT),
    malformed("truncated IPv6 header", truncated(_v6(), ETH + 20)),
    malformed("IPv6 payload_len > frame", _v6(plen=1000)),
    malformed("IPv6 header with version 4", patched(_v6(), ETH, b"\x40")),
    malformed("IPv6 extension header running past the payload",
              _v6(ext=(IPv6ExtHdrHopByHop(len=10),))),
    malformed("IPv6 extension header cut by the frame",
              truncated(_v6(ext=(IPv6ExtHdrDestOpt(),), plen=4), ETH + IP6 + 4)),
    malformed("truncated TCP header over IPv6",
              truncated(_v6(TCP(sport=1, dport=2), b"", plen=10), ETH + IP6 + 10)),
    malformed("UDP length > IPv6 payload", _v6(UDP(sport=1, dport=2, len=200))),
]


# ---- bytes are L3 ---------------------------------------------------------------------

BYTES_CASES = [
    Case("bytes: L3 length (tot_len), not the padded Ethernet frame",
         [U4.orig(payload=b"x", pad=bytes(60 - ETH - 29)), U4.reply(payload=b"yy", pad=bytes(40))],
         [Want(U4, "NONE", A | R, (1, 1), (29, 30))],
         [NEW(U4), UPD(U4, "NONE", A | R)]),
    Case("bytes: the same through tc egress (skb->len includes the padding)",
         [U4.orig(payload=b"x", pad=bytes(17), hook="tc")],
         [Want(U4, "NONE", 0, (1, 0), (29, 0))],
         [NEW(U4)]),
    Case("bytes: IPv6 is 40 + payload_len, trailing bytes ignored",
         [U6.orig(payload=b"x", pad=bytes(10))],
         [Want(U6, "NONE", 0, (1, 0), (49, 0))],
         [NEW(U6)]),
    Case("bytes: untracked bytes are L3 too",
         [U4.orig(payload=bytes(40), ip={"frag": 185}, pad=bytes(30))],
         stats={"fragments": 1, "untracked_packets": 1, "untracked_bytes": 68}),
]


# ---- table limit ------------------------------------------------------------------------

def _udp_flow(i: int, family: int = 4) -> Flow:
    if family == 6:
        return Flow(f"2001:db8::{i + 1:x}", "2001:db8::ffff", "udp", 10000 + i, 53)
    return Flow(f"10.2.0.{i + 1}", "10.2.255.1", "udp", 10000 + i, 53)


FILL = [_udp_flow(i) for i in range(TABLE_LIMIT)]
OVER = _udp_flow(TABLE_LIMIT)
HALF4 = [_udp_flow(i) for i in range(TABLE_LIMIT // 2)]
HALF6 = [_udp_flow(i, 6) for i in range(TABLE_LIMIT // 2)]
FULL_TCP = [Flow(f"10.3.0.{i + 1}", "10.3.255.1", "tcp", 20000 + i, 80) for i in range(TABLE_LIMIT)]
TW = FULL_TCP[0]

LIMIT_CASES = [
    Case("table limit: the 17th flow is not tracked, existing flows still update",
         [f.orig(payload=bytes(4)) for f in FILL] +
         [OVER.orig(payload=bytes(4)), FILL[0].reply(payload=bytes(4)), FILL[1].orig(payload=bytes(4))],
         [Want(FILL[0], "NONE", A | R, (1, 1), (32, 32)),
          Want(FILL[1], "NONE", 0, (2, 0), (64, 0))] +
         [Want(f, "NONE", 0, (1, 0), (32, 0)) for f in FILL[2:]],
         [NEW(f) for f in FILL] + [UPD(FILL[0], "NONE", A | R)],
         stats=untracked(OVER.orig(payload=bytes(4)), table_full=1)),
    Case("table limit counts both families together",
         [f.orig(payload=bytes(4)) for f in HALF4 + HALF6] +
         [OVER.orig(payload=bytes(4)), _udp_flow(99, 6).orig(payload=bytes(4))],
         [Want(f, "NONE", 0, (1, 0), (32 if f.family == 4 else 52, 0)) for f in HALF4 + HALF6],
         [NEW(f) for f in HALF4 + HALF6],
         stats=untracked(OVER.orig(payload=bytes(4)), _udp_flow(99, 6).orig(payload=bytes(4)),
                         table_full=2)),
    Case("table limit with drop_untracked: XDP drops and tc shoots what cannot be tracked",
         [f.orig(payload=bytes(4)) for f in FILL] +
         [OVER.orig(payload=bytes(4)), OVER.orig(payload=bytes(4), hook="tc"),
          FILL[0].reply(payload=bytes(4), hook="tc")],
         [Want(FILL[0], "NONE", A | R, (1, 1), (32, 32))] +
         [Want(f, "NONE", 0, (1, 0), (32, 0)) for f in FILL[1:]],
         [NEW(f) for f in FILL] + [UPD(FILL[0], "NONE", A | R)],
         stats=untracked(OVER.orig(payload=bytes(4)), OVER.orig(payload=bytes(4)), table_full=2),
         verdicts=["pass"] * TABLE_LIMIT + ["drop", "drop", "pass"],
         config={"drop_untracked": True}),
    Case("table limit: an unacked DESTROY keeps its place, so a full table turns a reused "
         "tuple away",
         [f.orig("S") for f in FULL_TCP] + [TW.reply("SA"), TW.orig("A"), TW.orig("FA"),
                                           TW.reply("FA"), TW.orig("A"), TW.orig("S")],
         [Want(f, "SYN_SENT", 0, (1, 0), (40, 0)) for f in FULL_TCP[1:]],
         [NEW(f, "SYN_SENT") for f in FULL_TCP] +
         [UPD(TW, "SYN_RECV", R), UPD(TW, "ESTABLISHED", A | R), UPD(TW, "FIN_WAIT", A | R),
          UPD(TW, "LAST_ACK", A | R), UPD(TW, "TIME_WAIT", A | R),
          DESTROY(TW, "TIME_WAIT", A | R, "fin", pkts=(4, 2))],
         stats=untracked(TW.orig("S"), table_full=1)),
    Case("table limit: once the DESTROY is acked, the retransmitted SYN of the reused tuple "
         "is tracked",
         [f.orig("S") for f in FULL_TCP] + [TW.reply("SA"), TW.orig("A"), TW.orig("FA"),
                                           TW.reply("FA"), TW.orig("A"), TW.orig("S"),
                                           TW.orig("S")],
         [Want(TW, "SYN_SENT", 0, (1, 0), (40, 0), gen=1)] +
         [Want(f, "SYN_SENT", 0, (1, 0), (40, 0)) for f in FULL_TCP[1:]],
         [NEW(f, "SYN_SENT") for f in FULL_TCP] +
         [UPD(TW, "SYN_RECV", R), UPD(TW, "ESTABLISHED", A | R), UPD(TW, "FIN_WAIT", A | R),
          UPD(TW, "LAST_ACK", A | R), UPD(TW, "TIME_WAIT", A | R),
          DESTROY(TW, "TIME_WAIT", A | R, "fin", pkts=(4, 2)), NEW(TW, "SYN_SENT", gen=1)],
         stats=untracked(TW.orig("S"), table_full=1, acked=1), ack_before=TABLE_LIMIT + 6),
]

DROP_CFG = {"drop_untracked": True}
RST_NONE = T4.orig("R")

DROP_CASES = [
    Case("drop_untracked, table not full: new flows are tracked and pass",
         [U4.orig(payload=bytes(4))],
         [Want(U4, "NONE", 0, (1, 0), (32, 0))], [NEW(U4)], config=DROP_CFG),
    Case("drop_untracked, table not full: malformed frames still pass",
         [_v4(ihl=4)], stats={"invalid": 1}, config=DROP_CFG),
] + [
    Case(f"drop_untracked, table not full: {what} passes", [pkt], stats=stats,
         config=DROP_CFG)
    for what, pkt, stats in [
        ("a later IPv4 fragment", V4_LATER_FRAG, untracked(V4_LATER_FRAG, fragments=1)),
        ("an ICMP error", OTHER_ICMP, untracked(OTHER_ICMP, other_l4=1)),
        ("IPv6 neighbour discovery", NS6, untracked(NS6, other_l4=1)),
        ("GRE", GRE4, untracked(GRE4, other_l4=1)),
        ("a RST with no entry", RST_NONE, untracked(RST_NONE, invalid=1)),
    ]
]

# ---- the event mask: events left out take no seq; a DESTROY is always emitted ----------

RUN_MASK = dict(event_mask=("new", "assured", "destroy"))   # `run`'s default
CLOSE_AND_REUSE = handshake(T4) + [T4.orig("FA"), T4.reply("FA"), T4.orig("A"), T4.orig("S")]
MASK_CASES = [
    Case("event mask new,assured,destroy: a closed connection takes 3 events",
         CLOSE_AND_REUSE, [Want(T4, "SYN_SENT", 0, (1, 0), (40, 0), gen=1)],
         [NEW(T4, "SYN_SENT"), UPD(T4, "ESTABLISHED", A | R),
          DESTROY(T4, "TIME_WAIT", A | R, "fin", pkts=(4, 2)), NEW(T4, "SYN_SENT", gen=1)],
         config=RUN_MASK),
    Case("event mask destroy: no CREATE, no UPDATE, the DESTROY takes seq 0",
         CLOSE_AND_REUSE, [Want(T4, "SYN_SENT", 0, (1, 0), (40, 0), gen=1)],
         [DESTROY(T4, "TIME_WAIT", A | R, "fin", pkts=(4, 2))],
         stats={"created": 2}, config=dict(event_mask=("destroy",))),
    Case("event mask new,state,destroy: the change to ASSURED is left out, others stay",
         handshake(T4) + [T4.orig("FA")], [Want(T4, "FIN_WAIT", A | R, (3, 1), (120, 40))],
         [NEW(T4, "SYN_SENT"), UPD(T4, "SYN_RECV", R), UPD(T4, "FIN_WAIT", A | R)],
         config=dict(event_mask=("new", "state", "destroy"))),
    Case("event mask new,assured,destroy: udp gets its ASSURED update",
         [U4.orig(payload=bytes(10)), U4.reply(payload=bytes(20)), U4.reply(payload=bytes(2))],
         [Want(U4, "NONE", A | R, (1, 2), (38, 48 + 30))],
         [NEW(U4), UPD(U4, "NONE", A | R)], config=RUN_MASK),
]



def sel(track=(), ignore=(), **interfaces) -> dict:
    """config= of a selection: top-level lists, and per interface
    name=(track, ignore). The bench's frames arrive on lo (ifindex 1)."""
    return dict(selection=Selection(PrefixSet.parse(track, ignore), tuple(
        (name, PrefixSet.parse(*lists)) for name, lists in interfaces.items())))


def ignored(*pkts: Pkt) -> dict:
    return {"ignored_packets": len(pkts), "ignored_bytes": sum(p.l3_len for p in pkts)}


HS4, HS6 = handshake(T4), handshake(T6)
TRACKED4 = [Want(T4, "ESTABLISHED", A | R, (2, 1), (80, 40))]
SELECT_CASES = [
    Case("selection: track-prefixes naming the flow tracks it", HS4, TRACKED4, HS_EVENTS,
         config=sel(track=["10.1.0.0/16"])),
    Case("selection: ignore-prefixes: no entry, no event, counted as ignored", HS4,
         stats=ignored(*HS4), config=sel(ignore=["10.1.0.2/32"])),
    Case("selection: either address decides (the reply's source is ignored too)",
         HS4, stats=ignored(*HS4), config=sel(ignore=["10.1.0.1/32"])),
    Case("selection: with track-prefixes set, an address in none of them is ignored",
         HS4, stats=ignored(*HS4), config=sel(track=["10.9.0.0/16"])),
    Case("selection: the longest prefix wins (track /16 inside ignore /8)", HS4, TRACKED4,
         HS_EVENTS, config=sel(track=["10.1.0.0/16"], ignore=["10.0.0.0/8"])),
    Case("selection: the longest prefix wins (ignore /16 inside track /8)", HS4,
         stats=ignored(*HS4), config=sel(track=["10.0.0.0/8"], ignore=["10.1.0.0/16"])),
    Case("selection: a tie between the two addresses goes to ignore", HS4,
         stats=ignored(*HS4), config=sel(track=["10.1.0.1/32"], ignore=["10.1.0.2/32"])),
    Case("selection: ipv6 prefixes select ipv6 flows, ipv4 ones keep their default",
         HS6 + HS4, TRACKED4, HS_EVENTS, stats=ignored(*HS6),
         config=sel(ignore=["2001:db8::/32"])),
    Case("selection: an interface's own set applies on it (lo)", HS4, stats=ignored(*HS4),
         config=sel(lo=((), ["10.1.0.0/24"]))),
    Case("selection: the interface's statement wins over the top level's", HS4, TRACKED4,
         HS_EVENTS, config=sel(ignore=["10.1.0.0/24"], lo=(["10.1.0.0/24"], ()))),
    Case("selection: another interface's set does not apply here", HS4, TRACKED4, HS_EVENTS,
         config=sel(other0=((), ["10.1.0.0/24"]))),
    Case("selection: via tc egress the same", [p.via_tc() for p in HS4],
         stats=ignored(*HS4), config=sel(ignore=["10.1.0.2/32"])),
    Case("selection: a flow an apply makes ignored ends at its next packet, with its DESTROY",
         HS4 + [T4.orig(payload=bytes(10)), T4.reply(payload=bytes(5))], [],
         HS_EVENTS + [DESTROY(T4, "ESTABLISHED", A | R, "ignored", pkts=(2, 1))],
         stats=ignored(T4.orig(payload=bytes(10)), T4.reply(payload=bytes(5))),
         reconfigure_before=3, reconfigure=sel(ignore=["10.1.0.0/16"])),
    Case("selection: a flow an apply selects again starts anew (picked up mid-stream)",
         HS4 + [T4.orig("A", payload=bytes(10))], [Want(T4, "ESTABLISHED", P, (1, 0), (50, 0))],
         [NEW(T4, "ESTABLISHED", P)], stats=ignored(*HS4),
         config=sel(ignore=["10.1.0.0/16"]), reconfigure_before=3, reconfigure=sel()),
]

CASES = (TCP_CASES + L4_CASES + FRAGMENT_CASES + VLAN_CASES + MALFORMED_CASES + BYTES_CASES +
         LIMIT_CASES + DROP_CASES + MASK_CASES + SELECT_CASES)


# ---- running a case ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bench():
    with loaded_bench(table_limit=TABLE_LIMIT, report_interval=0) as b:
        yield b


def event_key(ev: abi.RawEvent) -> bytes:
    """The flow's live key (a DESTROY names its outbox copy by ev.dying)."""
    if ev.family == 4:
        return struct.pack(abi.KEY4.fmt, ev.saddr, ev.daddr, swap16(ev.sport), swap16(ev.dport),
                           ev.proto, 0, ev.vlan)
    return struct.pack(abi.KEY6.fmt, ev.saddr, ev.daddr, swap16(ev.sport), swap16(ev.dport),
                       ev.proto, 0, ev.vlan)


def _describe(ev: abi.RawEvent) -> tuple:
    return (abi.EVENT_NAMES[ev.type], abi.STATE_NAMES[ev.state], ev.flags,
            abi.END_NAMES[ev.end_reason])


def _want_stats(case: Case) -> dict[str, int]:
    kinds = [e.type for e in case.events]
    want = {name: 0 for name in abi.STAT_NAMES}
    want.update(packets=len(case.packets), events=len(case.events),
                created=kinds.count("NEW"), destroyed=kinds.count("DESTROY"))
    want.update(case.stats)
    return want


def _params():
    for c in CASES:
        marks = [pytest.mark.xfail(strict=True, reason=c.xfail)] if c.xfail else []
        yield pytest.param(c, id=c.name, marks=marks)


@pytest.mark.parametrize("case", list(_params()))
def test_case(bench, case: Case):
    bench.reset()
    if case.config:
        bench.configure(**case.config)

    verdicts, events, acked = [], [], []
    for i, p in enumerate(case.packets):
        if i == case.reconfigure_before:
            bench.configure(**case.reconfigure)
        if i == case.ack_before:
            events += bench.events()
            acked = [e for e in events if e.type == abi.EV_DESTROY]
            assert bench.ack(acked) == len(acked)
        verdicts.append(bench.send(p))
    want_verdicts = case.verdicts or ["pass"] * len(case.packets)
    assert verdicts == [VERDICTS[p.hook][v] for p, v in zip(case.packets, want_verdicts)]

    table = {**bench.table(4), **bench.table(6)}
    check_table(bench, case, table, len(acked))
    events += bench.events()
    ids = check_events(case, events)
    check_entries_against_events_and_index(bench, case, table, events, ids)
    assert bench.stats() == _want_stats(case)


def check_table(bench, case: Case, table: dict, acked: int = 0) -> None:
    want = {w.flow.key(): w for w in case.table}
    assert set(table) == set(want)
    for key, w in want.items():
        e = table[key]
        assert (e.state_name, e.flags, e.pkts, e.bytes) == (w.state, w.flags, w.pkts, w.bytes), w
    # Every DESTROY left a copy in the outbox, under the flow's key with the
    # dying byte set, counted in entries until acked.
    ended = [w.flow for w in case.events if w.type == "DESTROY"]
    outbox = {**bench.outbox(4), **bench.outbox(6)}
    assert sorted(_live_key(k) for k in outbox) == sorted(f.key() for f in ended[acked:])
    g = bench.glob()
    assert (g["entries"], g["dying"]) == (len(case.table) + len(ended) - acked, len(ended) - acked)


def _live_key(key: bytes) -> bytes:
    at = abi.KEY4.offsets()["dying"] if len(key) == abi.KEY4.size else abi.KEY6.offsets()["dying"]
    return key[:at] + b"\0" + key[at + 1:]


def check_events(case: Case, events: list) -> dict[tuple[bytes, int], int]:
    """Events in order; returns the ct_id of each (flow key, gen)."""
    assert [_describe(e) for e in events] == [(w.type, w.state, w.flags, w.reason)
                                              for w in case.events]
    assert [event_key(e) for e in events] == [w.flow.key() for w in case.events]
    ids: dict[tuple[bytes, int], int] = {}
    for e, w in zip(events, case.events):
        assert ids.setdefault((w.flow.key(), w.gen), e.ct_id) == e.ct_id, w
        assert e.first_ns <= e.last_ns <= e.ts_ns
        if w.pkts is not None:
            assert (e.pkts_orig, e.pkts_reply) == w.pkts, w
    assert len(set(ids.values())) == len(ids), "two connections share a ct_id"
    for ct_id in set(ids.values()):
        seqs = [e.seq for e in events if e.ct_id == ct_id]
        assert seqs == list(range(len(seqs)))
    return ids


def check_entries_against_events_and_index(bench, case: Case, table: dict, events: list,
                                           ids: dict) -> None:
    for w in case.table:
        key = w.flow.key()
        e = table[key]
        mine = [ev for ev in events if ev.ct_id == e.ct_id]
        # (an entry whose events the mask left out has none to name it)
        assert ids.get((key, w.gen), None if mine else e.ct_id) == e.ct_id
        assert e.seq == len(mine)  # the next seq: every event took one
        assert not mine or mine[0].first_ns == e.first_ns
        assert e.sched_slot > e.last_ns >> abi.SLOT_SHIFT
        assert key in bench.wheel(w.flow.family).get(e.sched_slot, []), \
            "entry not filed in the expiry index under its due slot"


def test_case_table_is_consistent():
    """Guard the table itself: names unique, every verdict list as long as
    its frames, no flow expected twice."""
    names = [c.name for c in CASES]
    assert len(names) == len(set(names))
    for c in CASES:
        assert c.verdicts is None or len(c.verdicts) == len(c.packets), c.name
        assert all(p.hook in VERDICTS for p in c.packets), c.name
        assert len({w.flow.key() for w in c.table}) == len(c.table), c.name


# ---- per-CPU counters ---------------------------------------------------------------------

def test_packets_counter_is_per_cpu_and_equals_frames_sent(bench):
    bench.reset()
    cpus = sorted(os.sched_getaffinity(0))
    saved = set(cpus)
    sent = {}
    try:
        for n, cpu in zip((3, 5), cpus[:2]):
            os.sched_setaffinity(0, {cpu})
            for _ in range(n):
                bench.send(U4.orig(payload=bytes(4)))
            sent[cpu] = n
        os.sched_setaffinity(0, {cpus[0]})
        bench.send(U4.reply(payload=bytes(4)), repeat=100)
        sent[cpus[0]] += 100
    finally:
        os.sched_setaffinity(0, saved)

    per_cpu = bench.stat_per_cpu("packets")
    assert {cpu: per_cpu[cpu] for cpu in sent} == sent
    assert sum(per_cpu) == sum(sent.values())
    e = bench.entry(U4)
    assert e.pkts == (sum(sent.values()) - 100, 100)


# ---- entries the sweeper claimed, and a full ring --------------------------------------

def test_packet_for_an_entry_the_sweeper_claimed_passes_untracked(bench):
    """Between the sweeper's claim (CT_LAST_DEAD set on last_ns) and the
    moment the entry is in the outbox, a packet must neither revive the entry
    nor make a second one under its tuple."""
    from streamer.datapath import bpfsys

    bench.reset()
    bench.send(U4.orig(payload=bytes(4)))
    fd = bench.dp.fd("ct4")
    raw = bytearray(bpfsys.map_lookup(fd, U4.key(), abi.ENTRY.size))
    off = abi.ENTRY.offsets()["last_ns"]
    claimed = struct.unpack_from("<Q", raw, off)[0] | abi.LAST_DEAD
    raw[off:off + 8] = struct.pack("<Q", claimed)
    bpfsys.map_update(fd, U4.key(), bytes(raw))
    bench.events()

    pkt = U4.orig(payload=bytes(8))
    assert bench.send(pkt) == VERDICTS["xdp"]["pass"]
    e = bench.entry(U4)
    assert (e.last_ns, e.pkts, e.flags) == (claimed, (1, 0), 0)
    assert bench.events() == []
    stats = bench.stats()
    assert (stats["untracked_packets"], stats["untracked_bytes"], stats["invalid"]) == \
        (1, pkt.l3_len, 0)
    assert bench.glob()["entries"] == 1


RING_RECORDS = 4096 // (abi.EVENT_SIZE + 8)  # ring records carry an 8-byte header
OVERFLOW = [Flow(f"10.5.0.{i + 1}", "10.5.255.1", "udp", 30000 + i, 53)
            for i in range(RING_RECORDS + 8)]


@pytest.fixture(scope="module")
def small_ring():
    """A datapath whose event ring holds one page."""
    with loaded_bench(table_limit=64, report_interval=0, ring_bytes=4096) as b:
        for f in OVERFLOW:
            b.send(f.orig(payload=bytes(4)))
        yield b


def test_full_ring_is_counted_and_shows_as_a_seq_gap(small_ring):
    b = small_ring
    stats = b.stats()
    assert stats["created"] == len(OVERFLOW)
    # The kernel keeps the ring from filling to the last byte: 31 of 32 fit.
    assert RING_RECORDS - 1 <= stats["events"] <= RING_RECORDS
    assert stats["ring_full"] == len(OVERFLOW) - stats["events"]
    first = b.events()
    assert [event_key(e) for e in first] == [f.key() for f in OVERFLOW[:stats["events"]]]

    lost = OVERFLOW[-1]
    b.send(lost.reply(payload=bytes(4)))
    (ev,) = b.events()
    assert (ev.type, ev.seq) == (abi.EV_UPDATE, 1)  # seq 0, its NEW, never arrived


def test_event_after_a_loss_says_what_was_missed(small_ring):
    """The NEW that found the ring full stays in the entry's missed mask and
    rides on the flow's next event, which the next packet makes even though
    nothing else changed."""
    lost = OVERFLOW[-2]
    small_ring.events()
    small_ring.send(lost.orig(payload=bytes(4)))  # no state change, no report due
    (ev,) = small_ring.events()
    assert (ev.type, ev.seq, ev.missed) == (abi.EV_UPDATE, 1, abi.MISSED_CREATE)
    assert small_ring.stats()["missed_redelivered"] >= 1
    # Delivered once: the mask is clear, so the next packet makes no event.
    small_ring.send(lost.orig(payload=bytes(4)))
    assert small_ring.events() == []
