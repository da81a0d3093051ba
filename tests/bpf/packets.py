"""Packets for the BPF tests, built with scapy, and the bench that runs them
through the real datapath with BPF_PROG_TEST_RUN.

A `Flow` names a connection by its original-direction tuple and builds its
frames both ways (`orig`, `reply`); `Pkt` is one frame plus the entry point it
goes through. `Bench` owns one loaded datapath (its own pin directory, always
removed), sends frames, reads the tables, the expiry index, the counters and
the event ring, and resets all of that between cases.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import socket
import struct
import time
import uuid
from dataclasses import dataclass, replace

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest, IPv6
from scapy.layers.l2 import Dot1AD, Dot1Q, Ether
from scapy.packet import Packet, Raw

from streamer.datapath import abi
from streamer.datapath import bpfsys

XDP_ABORTED, XDP_DROP, XDP_PASS = 0, 1, 2
TC_ACT_OK, TC_ACT_SHOT = 0, 2
VERDICTS = {"xdp": {"pass": XDP_PASS, "drop": XDP_DROP},
            "tc": {"pass": TC_ACT_OK, "drop": TC_ACT_SHOT},
            "tc-ingress": {"pass": TC_ACT_OK, "drop": TC_ACT_SHOT}}
PROGS = {"xdp": "ct_xdp_ingress", "tc": "ct_tc_egress", "tc-ingress": "ct_tc_ingress"}

PROTO = {"tcp": 6, "udp": 17, "icmp": 1}
MAC_A, MAC_B = "02:00:00:00:00:0a", "02:00:00:00:00:0b"
ETH_HLEN = 14

# The expiry index's structs. Python does not use them outside the tests, so
# they live here; test_abi.py checks them against ct_abi.h like abi.LAYOUTS.
WHEEL_SLOT_KEY = abi.Layout("ct_wheel_slot_key", (("slot", "I"), ("family", "I")))
WHEEL_SLOT = abi.Layout("ct_wheel_slot", (("n", "Q"), ("done", "Q")))
WHEEL_KEY = abi.Layout("ct_wheel_key", (("slot", "I"), ("chunk", "I")))
WHEEL_CHUNK4 = abi.Layout("ct_wheel_chunk4", (
    ("filled", "Q"), ("keys", f"{abi.WHEEL4_PER_CHUNK * abi.KEY4.size}s")))
WHEEL_CHUNK6 = abi.Layout("ct_wheel_chunk6", (
    ("filled", "Q"), ("keys", f"{abi.WHEEL6_PER_CHUNK * abi.KEY6.size}s")))
INDEX_LAYOUTS = (WHEEL_SLOT_KEY, WHEEL_SLOT, WHEEL_KEY, WHEEL_CHUNK4, WHEEL_CHUNK6)

STAT = {name: i for i, name in enumerate(abi.STAT_NAMES)}


def swap16(v: int) -> int:
    return ((v & 0xFF) << 8) | (v >> 8)


# ---- frames ------------------------------------------------------------------

@dataclass(frozen=True)
class Pkt:
    """One frame and the program it is handed to: "xdp" (ct_xdp_ingress),
    "tc" (ct_tc_egress) or "tc-ingress" (ct_tc_ingress)."""

    data: bytes
    hook: str = "xdp"

    def via_tc(self) -> "Pkt":
        return replace(self, hook="tc")

    def via_tc_ingress(self) -> "Pkt":
        return replace(self, hook="tc-ingress")

    @property
    def l3_len(self) -> int:
        """IP header and payload, as the frame's IP header states it."""
        eth = Ether(self.data)
        ip = eth.getlayer(IP) or eth.getlayer(IPv6)
        return ip.len if isinstance(ip, IP) else 40 + ip.plen


def l2(vlans: tuple[int, ...] = (), src: str = MAC_A, dst: str = MAC_B) -> Packet:
    """Ethernet with no tag, one 802.1Q tag, or an 802.1ad outer tag and an
    802.1Q inner one (QinQ); vlans lists the outer id first."""
    eth = Ether(src=src, dst=dst)
    if not vlans:
        return eth
    if len(vlans) == 1:
        return eth / Dot1Q(vlan=vlans[0])
    outer, inner = vlans
    return eth / Dot1AD(vlan=outer) / Dot1Q(vlan=inner)


def frame(pkt: Packet, pad: bytes = b"", hook: str = "xdp") -> Pkt:
    return Pkt(bytes(pkt) + pad, hook)


@dataclass(frozen=True)
class Flow:
    """A connection by its original-direction tuple. ICMP: sport is the echo
    id (dport is ignored and keyed as the id too)."""

    src: str
    dst: str
    proto: str            # "tcp" | "udp" | "icmp" (ICMPv6 for IPv6 addresses)
    sport: int = 0
    dport: int = 0
    vlans: tuple[int, ...] = ()

    @property
    def family(self) -> int:
        return 6 if ":" in self.src else 4

    @property
    def proto_num(self) -> int:
        if self.proto == "icmp" and self.family == 6:
            return 58
        return PROTO[self.proto]

    @property
    def ports(self) -> tuple[int, int]:
        return (self.sport, self.sport) if self.proto == "icmp" else (self.sport, self.dport)

    def on_vlans(self, *vlans: int) -> "Flow":
        return replace(self, vlans=vlans)

    def key(self) -> bytes:
        """The table key of the connection (original direction)."""
        af = socket.AF_INET6 if self.family == 6 else socket.AF_INET
        sport, dport = self.ports
        layout = abi.KEY6 if self.family == 6 else abi.KEY4
        return struct.pack(layout.fmt, socket.inet_pton(af, self.src),
                           socket.inet_pton(af, self.dst), swap16(sport), swap16(dport),
                           self.proto_num, 0, self.vlans[0] if self.vlans else 0)

    def orig(self, flags: str = "", payload: bytes = b"", **kw) -> Pkt:
        return self._build(False, flags, payload, **kw)

    def reply(self, flags: str = "", payload: bytes = b"", **kw) -> Pkt:
        return self._build(True, flags, payload, **kw)

    def _build(self, reply: bool, flags: str, payload: bytes, *, ip: dict | None = None,
               l4: dict | None = None, ext: tuple[Packet, ...] = (), pad: bytes = b"",
               hook: str = "xdp") -> Pkt:
        """ip: extra IP/IPv6 header fields; l4: extra L4 fields; ext: IPv6
        extension headers between the IPv6 header and L4; pad: bytes after
        the IP packet (Ethernet padding)."""
        src, dst = (self.dst, self.src) if reply else (self.src, self.dst)
        sport, dport = (self.dport, self.sport) if reply else (self.sport, self.dport)
        l3 = (IPv6 if self.family == 6 else IP)(src=src, dst=dst, **(ip or {}))
        for h in ext:
            l3 = l3 / h.copy()
        l4 = dict(l4 or {})
        if self.proto == "tcp":
            seg = TCP(sport=sport, dport=dport, flags=flags, **l4)
        elif self.proto == "udp":
            seg = UDP(sport=sport, dport=dport, **l4)
        elif self.family == 4:
            seg = ICMP(type=0 if reply else 8, id=self.sport, seq=1, **l4)
        else:
            seg = (ICMPv6EchoReply if reply else ICMPv6EchoRequest)(id=self.sport, seq=1, **l4)
        pkt = l2(self.vlans) / l3 / seg
        if payload:
            pkt = pkt / Raw(payload)
        return frame(pkt, pad, hook)


# ---- the bench ----------------------------------------------------------------

class XdpMd(ctypes.Structure):
    """struct xdp_md as BPF_PROG_TEST_RUN takes it for a context."""

    _fields_ = [(n, ctypes.c_uint32) for n in (
        "data", "data_end", "data_meta", "ingress_ifindex", "rx_queue_index", "egress_ifindex")]


def xdp_run_short(prog_fd: int, data: bytes) -> int:
    """Run an XDP program on a frame shorter than an Ethernet header.
    BPF_PROG_TEST_RUN refuses input under ETH_HLEN bytes, but (since 6.x) takes
    an xdp_md whose data_end ends the linear part early; the program then sees
    only `data` (the zero bytes after it go to a fragment it does not read)."""
    buf = data + b"\0" * (ETH_HLEN - len(data))
    buf_in = ctypes.create_string_buffer(buf, len(buf))
    md = XdpMd(data=0, data_end=len(data))
    o = bpfsys.TestRunOpts()
    o.sz = ctypes.sizeof(o)
    o.data_in = ctypes.cast(buf_in, ctypes.c_void_p)
    o.data_size_in = len(buf)
    o.ctx_in = ctypes.cast(ctypes.pointer(md), ctypes.c_void_p)
    o.ctx_size_in = ctypes.sizeof(md)
    o.repeat = 1
    rc = bpfsys.lib().bpf_prog_test_run_opts(prog_fd, ctypes.byref(o))
    if rc != 0:
        raise OSError(-rc, f"BPF_PROG_TEST_RUN of a {len(data)}-byte frame: {os.strerror(-rc)}")
    return o.retval


@dataclass
class EntryView:
    """A ct_entry decoded, its status word split into its parts."""

    ct_id: int
    first_ns: int
    last_ns: int
    pkts: tuple[int, int]
    bytes: tuple[int, int]
    state: int
    flags: int
    tcp_flags_orig: int
    tcp_flags_reply: int
    seq: int
    sched_slot: int
    report_slot: int

    @classmethod
    def decode(cls, raw: bytes) -> "EntryView":
        (ct_id, first, last, p0, p1, b0, b1, status_seq, sched) = struct.unpack(
            abi.ENTRY.fmt, raw[:abi.ENTRY.size])
        status = status_seq & 0xFFFFFFFF
        return cls(ct_id, first, last, (p0, p1), (b0, b1), status & 0xFF, (status >> 8) & 0xFF,
                   (status >> 16) & 0xFF, status >> 24, status_seq >> 32,
                   sched & 0xFFFFFFFF, sched >> 32)

    @property
    def state_name(self) -> str:
        return abi.STATE_NAMES[self.state]


def monotonic_slot() -> int:
    """The current expiry slot; bpf_ktime_get_ns() is CLOCK_MONOTONIC."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) >> abi.SLOT_SHIFT


class Bench:
    def __init__(self, dp):
        self.dp = dp
        self._cfg0 = replace(dp.cfg, timeouts=replace(dp.cfg.timeouts))
        self.captured: list[abi.RawEvent] = []
        self.ring = bpfsys.RingBuffer(dp.fd("ct_events"), self._on_record)
        self.ncpu = bpfsys.possible_cpus()

    def _on_record(self, mv: memoryview) -> None:
        self.captured.append(abi.decode_event(mv))

    # ---- running programs -------------------------------------------------
    def send(self, pkt: Pkt, repeat: int = 1) -> int:
        """Hand one frame to its program; the program's return value."""
        fd = self.dp.prog_fd(PROGS[pkt.hook])
        if len(pkt.data) < ETH_HLEN:
            assert pkt.hook == "xdp", "tc's BPF_PROG_TEST_RUN needs a whole Ethernet header"
            return xdp_run_short(fd, pkt.data)
        retval, _, _ = bpfsys.test_run(fd, pkt.data, repeat)
        return retval

    def sweep(self, family: int, budget: int = 2, repeat: int = 1) -> dict:
        """One sweeper call as the daemon makes it (the sweepers are tc
        programs); the request as the last run left it."""
        prog = "ct_sweep4" if family == 4 else "ct_sweep6"
        retval, _, out = bpfsys.test_run(self.dp.prog_fd(prog),
                                         abi.pack_sweep_req(family, budget), repeat)
        assert retval == TC_ACT_OK, f"{prog} returned {retval}"
        return abi.unpack_sweep_req(out)

    # ---- reading state ------------------------------------------------------
    def events(self) -> list[abi.RawEvent]:
        """Events that arrived since the last call."""
        self.ring.consume()
        got, self.captured = self.captured, []
        return got

    def stats(self) -> dict[str, int]:
        fd = self.dp.fd("ct_stats")
        return {name: sum(int.from_bytes(v, "little")
                          for v in bpfsys.percpu_lookup(fd, i.to_bytes(4, "little"), 8))
                for name, i in STAT.items()}

    def stat_per_cpu(self, name: str) -> list[int]:
        fd = self.dp.fd("ct_stats")
        return [int.from_bytes(v, "little")
                for v in bpfsys.percpu_lookup(fd, STAT[name].to_bytes(4, "little"), 8)]

    def glob(self) -> dict:
        return self.dp.global_state()

    def table(self, family: int, dying: bool = False) -> dict[bytes, EntryView]:
        """Live entries by key; with dying=True the outbox instead (ended
        entries under their own tuple or moved to a generation key)."""
        name, ksz = ("ct4", abi.KEY4.size) if family == 4 else ("ct6", abi.KEY6.size)
        dying_at = abi.KEY4.offsets()["dying"] if family == 4 else abi.KEY6.offsets()["dying"]
        fd = self.dp.fd(name)
        out = {}
        for k in set(bpfsys.map_keys(fd, ksz)):
            raw = bpfsys.map_lookup(fd, k, abi.ENTRY.size)
            if raw is None:
                continue
            e = EntryView.decode(raw)
            if bool(k[dying_at] & abi.KEY_DYING or e.last_ns & abi.LAST_OUTBOX) == dying:
                out[k] = e
        return out

    def outbox(self, family: int) -> dict[bytes, EntryView]:
        return self.table(family, dying=True)

    def ack(self, events: list[abi.RawEvent], ct_id_delta: int = 0) -> int:
        """Ack DESTROY events as the daemon does; returns how many outbox
        copies went. ct_id_delta names a wrong ct_id on purpose."""
        acked = 0
        for family in (4, 6):
            acks = [(ev.outbox_key(), ev.ct_id + ct_id_delta) for ev in events
                    if ev.family == family and ev.type == abi.EV_DESTROY]
            prog = self.dp.prog_fd("ct_ack4" if family == 4 else "ct_ack6")
            for i in range(0, len(acks), abi.ACK_BATCH):
                retval, _, out = bpfsys.test_run(prog, abi.pack_acks(family, acks[i:i + abi.ACK_BATCH]))
                assert retval == TC_ACT_OK
                acked += abi.unpack_ack_hdr(out)["acked"]
        return acked

    def early_drop(self, family: int, budget: int = 2, repeat: int = 1, horizon: int = 64) -> dict:
        prog = "ct_early4" if family == 4 else "ct_early6"
        retval, _, out = bpfsys.test_run(self.dp.prog_fd(prog),
                                         abi.pack_sweep_req(family, budget, horizon), repeat)
        assert retval == TC_ACT_OK, f"{prog} returned {retval}"
        return abi.unpack_sweep_req(out)

    def entry(self, flow: Flow) -> EntryView | None:
        raw = bpfsys.map_lookup(self.dp.fd("ct6" if flow.family == 6 else "ct4"),
                                flow.key(), abi.ENTRY.size)
        return EntryView.decode(raw) if raw is not None else None

    def slots(self) -> dict[tuple[int, int], tuple[int, int]]:
        """ct_wslots: (slot, family) -> (n, done)."""
        fd = self.dp.fd("ct_wslots")
        out = {}
        for k in set(bpfsys.map_keys(fd, WHEEL_SLOT_KEY.size)):
            raw = bpfsys.map_lookup(fd, k, WHEEL_SLOT.size)
            if raw is not None:
                out[struct.unpack(WHEEL_SLOT_KEY.fmt, k)] = struct.unpack(WHEEL_SLOT.fmt, raw)
        return out

    def wheel(self, family: int) -> dict[int, list[bytes]]:
        """The expiry index of one family: slot -> keys filed under it."""
        name = "ct_wheel4" if family == 4 else "ct_wheel6"
        chunk = WHEEL_CHUNK4 if family == 4 else WHEEL_CHUNK6
        ksz = abi.KEY4.size if family == 4 else abi.KEY6.size
        per = abi.WHEEL4_PER_CHUNK if family == 4 else abi.WHEEL6_PER_CHUNK
        fd = self.dp.fd(name)
        out: dict[int, list[bytes]] = {}
        for k in set(bpfsys.map_keys(fd, WHEEL_KEY.size)):
            raw = bpfsys.map_lookup(fd, k, chunk.size)
            if raw is None:
                continue
            slot, _ = struct.unpack(WHEEL_KEY.fmt, k)
            filled, keys = struct.unpack(chunk.fmt, raw)
            out.setdefault(slot, []).extend(
                keys[i * ksz:(i + 1) * ksz] for i in range(per) if filled >> i & 1)
        return out

    def index_sizes(self) -> dict[str, int]:
        return {name: len(set(bpfsys.map_keys(self.dp.fd(name), 8)))
                for name in ("ct_wslots", "ct_wheel4", "ct_wheel6")}

    # ---- between cases ------------------------------------------------------
    def configure(self, **changes) -> None:
        """Rewrite the run-time configuration (timeouts=..., drop_untracked=...,
        table_limit=... within the maps' size); reset() restores the original."""
        for k, v in changes.items():
            setattr(self.dp.cfg, k, v)
        # Frames under BPF_PROG_TEST_RUN arrive on the loopback device;
        # "other0" names an interface no frame comes from.
        self.dp.ifindexes = {"lo": 1, "other0": 999_999}
        self.dp.configure()

    def reset(self) -> None:
        """Empty tables and index, zero counters and entries, seed the sweeper
        cursors as for a new table (ct ids keep counting), drain the ring,
        restore the configuration."""
        for name, ksz in (("ct4", abi.KEY4.size), ("ct6", abi.KEY6.size),
                          ("ct_wslots", WHEEL_SLOT_KEY.size), ("ct_wheel4", WHEEL_KEY.size),
                          ("ct_wheel6", WHEEL_KEY.size)):
            fd = self.dp.fd(name)
            for k in set(bpfsys.map_keys(fd, ksz)):
                bpfsys.map_delete(fd, k)
        fd = self.dp.fd("ct_stats")
        for i in range(abi.STAT_MAX):
            bpfsys.map_update(fd, i.to_bytes(4, "little"), b"\0" * 8 * self.ncpu)
        # Cursors as the loader seeds them for a new table: two slots back.
        g, start = self.glob(), monotonic_slot() - 2
        g.update(entries=0, cursor4=start, cursor6=start, dying=0, early4=0, early6=0, entries6=0)
        bpfsys.map_update(self.dp.fd("ct_global"), b"\0" * 4, abi.pack_global(g))
        self.dp.cfg = replace(self._cfg0, timeouts=replace(self._cfg0.timeouts))
        self.dp.configure()
        self.events()

    def close(self) -> None:
        self.ring.close()


@contextlib.contextmanager
def loaded_bench(**cfg):
    """A Bench on a freshly loaded datapath in its own pin directory; the
    programs are closed and the pins removed whatever happens."""
    from streamer.datapath.config import DatapathConfig
    from streamer.datapath.loader import Datapath

    pin_dir = f"/sys/fs/bpf/ctsbench_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    dp = Datapath(DatapathConfig(pin_dir=pin_dir, **cfg))
    bench = None
    try:
        dp.load()
        bench = Bench(dp)
        bench.reset()
        yield bench
    finally:
        if bench is not None:
            bench.close()
        dp.detach_all()
        dp.close()
        shutil.rmtree(pin_dir, ignore_errors=True)
