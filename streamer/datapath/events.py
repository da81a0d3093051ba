"""Events as users see them: wall-clock times, addresses, names; one line of
text in the manner of `conntrack -E`. Their JSON form is their wire record
(streamer/delivery/records.py), the same for every output."""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass

from . import abi


class Clock:
    """Turns CLOCK_MONOTONIC nanoseconds (bpf_ktime_get_ns) into wall-clock
    nanoseconds. The offset is re-read now and then, so that a clock step
    (NTP) reaches the events within a minute."""

    def __init__(self, refresh_s: float = 60.0):
        self._refresh_s = refresh_s
        self._next = 0.0
        self._offset = 0
        self._read()

    def _read(self) -> None:
        m1 = time.monotonic_ns()
        w = time.time_ns()
        m2 = time.monotonic_ns()
        self._offset = w - (m1 + m2) // 2
        self._next = time.monotonic() + self._refresh_s

    def wall_ns(self, mono_ns: int) -> int:
        if time.monotonic() >= self._next:
            self._read()
        return mono_ns + self._offset


def flow_text(x) -> str:
    """The flow part of a line, shared by events and `ctstream list`: protocol,
    TCP state, tuple (echo id for ICMP), VLAN, counters o/r, ASSURED."""
    icmp = x.proto in ("icmp", "icmpv6")
    parts = [x.proto.ljust(6)]
    if x.state:
        parts.append(x.state)
    parts.append(f"src={x.src} dst={x.dst}")
    parts.append(f"id={x.sport}" if icmp else f"sport={x.sport} dport={x.dport}")
    if x.vlan:
        parts.append(f"vlan={x.vlan}")
    parts.append(f"packets={x.packets_orig}/{x.packets_reply}")
    parts.append(f"bytes={x.bytes_orig}/{x.bytes_reply}")
    if x.assured:
        parts.append("[ASSURED]")
    return " ".join(parts)


@dataclass(slots=True)
class Flow:
    """What an event and a table entry both say of a connection: its tuple,
    state and counters."""

    family: int
    proto: str
    src: str
    dst: str
    sport: int
    dport: int
    vlan: int
    state: str | None    # TCP only
    assured: bool
    ct_id: int
    seq: int
    packets_orig: int
    packets_reply: int
    bytes_orig: int
    bytes_reply: int


@dataclass(slots=True)
class Event(Flow):
    type: str            # NEW | UPDATE | DESTROY
    time_ms: int         # when the event was made
    first_ms: int
    last_ms: int
    end_reason: str | None
    missed: int          # bit mask of event types of this flow lost before (abi.MISSED_*)
    retries: int = 0     # DESTROY: how often it was emitted before
    tcp_flags_orig: int = 0   # TCP: OR of the flags seen from the initiator
    tcp_flags_reply: int = 0  # and from the responder
    # DESTROY: (family, outbox key, ct_id), what an ack names; not shown.
    ack_ref: tuple[int, bytes, int] | None = None

    @classmethod
    def from_raw(cls, r: abi.RawEvent, clock: Clock) -> "Event":
        ip = ipaddress.IPv4Address if r.family == 4 else ipaddress.IPv6Address
        return cls(
            type=abi.EVENT_NAMES[r.type],
            family=r.family,
            proto=abi.PROTO_NAMES.get(r.proto, str(r.proto)),
            src=str(ip(r.saddr)), dst=str(ip(r.daddr)),
            sport=r.sport, dport=r.dport, vlan=r.vlan,
            state=abi.STATE_NAMES.get(r.state) if r.proto == 6 else None,
            assured=bool(r.flags & abi.F_ASSURED),
            ct_id=r.ct_id, seq=r.seq,
            packets_orig=r.pkts_orig, packets_reply=r.pkts_reply,
            bytes_orig=r.bytes_orig, bytes_reply=r.bytes_reply,
            time_ms=clock.wall_ns(r.ts_ns) // 1_000_000,
            first_ms=clock.wall_ns(r.first_ns) // 1_000_000,
            last_ms=clock.wall_ns(r.last_ns) // 1_000_000,
            end_reason=abi.END_NAMES.get(r.end_reason) if r.type == abi.EV_DESTROY else None,
            missed=r.missed,
            retries=r.retries,
            tcp_flags_orig=r.tcp_flags_orig if r.proto == 6 else 0,
            tcp_flags_reply=r.tcp_flags_reply if r.proto == 6 else 0,
            ack_ref=(r.family, r.outbox_key(), r.ct_id) if r.type == abi.EV_DESTROY else None,
        )

    @property
    def is_icmp(self) -> bool:
        return self.proto in ("icmp", "icmpv6")

    def text(self) -> str:
        parts = [f"[{self.type}]".ljust(10), flow_text(self)]
        if self.end_reason:
            parts.append(f"reason={self.end_reason}")
        if self.missed:
            parts.append(f"missed={missed_text(self.missed)}")
        if self.retries:
            parts.append(f"retry={self.retries}")
        parts.append(f"ct_id={self.ct_id} seq={self.seq}")
        return " ".join(parts)


def missed_text(mask: int) -> str:
    names = [n for bit, n in ((abi.MISSED_CREATE, "NEW"), (abi.MISSED_UPDATE, "UPDATE"),
                              (abi.MISSED_DESTROY, "DESTROY")) if mask & bit]
    return ",".join(names) or str(mask)


@dataclass(slots=True)
class LostReport:
    """The in-band LOST summary: what the datapath could not account for or
    deliver since the previous report (counter deltas, non-zero only)."""

    time_ms: int
    interval_s: float
    lost: dict[str, int]
    type: str = "LOST"
    totals: dict[str, int] | None = None  # the counters since the datapath was loaded

    def text(self) -> str:
        what = " ".join(f"{k}={v}" for k, v in self.lost.items())
        return f"{'[LOST]'.ljust(10)} {what} in the last {self.interval_s:.0f}s"
