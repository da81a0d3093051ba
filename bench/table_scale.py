"""ctstream table-scale benchmark: a table of 10 million IPv4 entries.

Measures, in one run (see bench/README.md, "Table scale"):

  * memory: the kernel's own accounting of every map of the datapath (the
    `memlock:` line of /proc/self/fdinfo/<map fd>, htab_map_mem_usage and
    friends) once the table holds 10M entries, per map and per entry, index
    included; beside it the change of /proc/meminfo and /proc/slabinfo;
  * expiry: 1M of the entries are due; the sweeper (ct_sweep4) runs the way
    the daemon runs it (test runs, budget 2 records per run, repeat 512 per
    syscall, the ring read between syscalls) until nothing is due; kernel
    and wall time per expiry; then the daemon's ack of the 1M outbox copies
    (ct_ack4, 64 per syscall), timed on its own;
  * packet path: hit and create ns/packet with the 10M table, and the same
    cases on a second datapath (its own pin dir) that holds 10k entries,
    interleaved round by round.

The table is filled by bench/table_fill.c, a tc program that shares the
datapath's pinned maps and runs ct_handle() (the datapath's own parse, lookup
and create) on a frame it rewrites to a new flow each run, under
BPF_PROG_TEST_RUN with a large repeat. Run as root.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import re
import shutil
import signal
import statistics
import struct
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

from streamer.datapath import abi
from streamer import bpfsys  # noqa: E402
from streamer.datapath.config import DatapathConfig, Timeouts  # noqa: E402

from datapath import establish, machine, stat_delta, stats, tcp_packet  # noqa: E402

XDP_PASS = 2
TC_ACT_OK = 0
SWEEP_BATCH = 2          # CT_SWEEP_BATCH (bpf/ct_maps.h), as streamer/datapath/sweeper.py
SWEEP_REPEAT = 512       # streamer/datapath/sweeper.py CALL_REPEAT
EVENT_REC = abi.EVENT_SIZE + 8   # a ring record: 8-byte header + the event
TIME_LIMIT_S = 300
LONG_S = 3600.0          # every timeout but UDP: nothing else becomes due
UDP_S = 2.0              # the expiring set

FULL = dict(entries=10_000_000, small=10_000, expire=1_000_000, rounds=3, repeat=1_000_000,
            batch_creates=4_000, calls=1_000)
QUICK = dict(entries=1_000_000, small=10_000, expire=100_000, rounds=2, repeat=200_000,
             batch_creates=2_000, calls=500)

# Flows (addresses from 198.18.0.0/15 only). Flow number idx of a template:
# source 198.18.0.0 | (idx & 0x1ffff), source port 1024 + (idx >> 17) (the
# same rule as bench/table_fill.c). The destination tells the sets apart.
DST_FILL = "198.19.255.254"     # UDP :53 (expiring set) and TCP :80 (the bulk)
DST_BATCH = "198.19.255.253"    # TCP SYN :443, batched creates
DST_CALL = "198.19.255.252"     # TCP SYN :443, one-per-syscall creates

MAP_GROUPS = ("ct4", "ct6", "ct_wslots", "ct_wheel4", "ct_wheel6", "ct_events")
MAP_OTHERS = ("ct_config", "ct_global", "ct_stats", "ct_zero")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class OutOfTime(Exception):
    pass


def flow_frame(dst: str, dport: int, proto: str, flags: str = "") -> bytes:
    """A 64-byte IPv4 frame of flow 0 of a template."""
    if proto == "tcp":
        return tcp_packet(4, "198.18.0.0", dst, 1024, dport, flags, b"d" * 10)
    from scapy.all import IP, UDP, Ether, Raw
    return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
                 / IP(src="198.18.0.0", dst=dst) / UDP(sport=1024, dport=dport) / Raw(b"x" * 22))


def patch_flow(template: bytes, idx: int) -> bytes:
    b = bytearray(template)
    b[26:30] = (0xC6120000 | (idx & 0x1FFFF)).to_bytes(4, "big")
    b[34:36] = (1024 + (idx >> 17)).to_bytes(2, "big")
    return bytes(b)


# ---- the event ring -----------------------------------------------------------

class Ring:
    """The datapath's event ring: skip() discards everything in it at once by
    moving the consumer position to the producer's (through the ring's mmap
    pages; test runs are synchronous, so every record is committed), for the
    fill; read() hands each record to a callback (libbpf's consumer), as the
    daemon reads it."""

    def __init__(self, map_fd: int, on_record=None):
        self.counts: dict[int, int] = {}
        self.on_record = on_record
        self.rb = bpfsys.RingBuffer(map_fd, self._on)
        page = mmap.PAGESIZE
        self.cons = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self.prod = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        self.skipped = 0

    def _on(self, rec) -> None:
        self.counts[rec[0]] = self.counts.get(rec[0], 0) + 1
        if self.on_record is not None:
            self.on_record(rec)

    def skip(self) -> int:
        prod = struct.unpack_from("<Q", self.prod, 0)[0]
        cons = struct.unpack_from("<Q", self.cons, 0)[0]
        struct.pack_into("<Q", self.cons, 0, prod)
        n = (prod - cons) // EVENT_REC
        self.skipped += n
        return n

    def drain(self) -> int:  # datapath.establish() calls it
        return self.rb.consume()

    def close(self) -> None:
        self.rb.close()
        self.cons.close()
        self.prod.close()


# ---- one datapath with its filler -------------------------------------------

def fill_source() -> str:
    """bench/table_fill.c with our quoted includes expanded from bpf/, as the
    loader does for bpf/ctstream.bpf.c (streamer.datapath.loader.expand_source)."""
    from streamer.datapath.loader import expand_source

    path = HERE / "table_fill.c"
    out = [f'#line 1 "{path}"']
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        m = re.match(r'\s*#\s*include\s+"([A-Za-z0-9_.]+)"\s*$', line)
        if m:
            out.append(expand_source(m.group(1)))
            out.append(f'#line {lineno + 1} "{path}"')
        else:
            out.append(line)
    return "\n".join(out) + "\n"


def map_fdinfo(fd: int) -> dict:
    info = {}
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        k, _, v = line.partition(":")
        v = v.strip()
        info[k.strip()] = int(v, 16) if v.startswith("0x") else (int(v) if v.isdigit() else v)
    return info


def bpf_map_fds() -> dict[int, int]:
    """map_id -> one fd of this process that holds it."""
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            text = Path(f"/proc/self/fdinfo/{name}").read_text()
        except OSError:
            continue
        m = re.search(r"^map_id:\s*(\d+)", text, re.M)
        if m:
            out.setdefault(int(m.group(1)), int(name))
    return out


class Table:
    """A loaded datapath (its own pin dir), its fill program and its ring."""

    def __init__(self, label: str, pin_dir: str, limit: int, ring_bytes: int):
        self.label = label
        self.pin_dir = pin_dir
        self.cfg = DatapathConfig(pin_dir=pin_dir, table_limit=limit, ring_bytes=ring_bytes,
                                  report_interval=LONG_S,
                                  timeouts=Timeouts(syn=LONG_S, established=LONG_S, fin=LONG_S,
                                                    udp=UDP_S, icmp=LONG_S, other=LONG_S))
        self.dp = None
        self.fill_bpf = None
        self.ring = None
        self.map_ids: dict[int, int] = {}
        self.next_idx: dict[str, int] = {}

    def load(self, on_record=None) -> "Table":
        from bcc import BPF
        from streamer.datapath.loader import Datapath, cflags

        before = set(bpf_map_fds())
        t0 = time.monotonic()
        self.dp = Datapath(self.cfg)
        self.dp.load()
        self.load_s = time.monotonic() - t0
        # Every map BCC created for the datapath (opened at load): the ones
        # the benchmark names and any others, by id.
        self.map_ids = {i: fd for i, fd in bpf_map_fds().items() if i not in before}
        t0 = time.monotonic()
        self.fill_bpf = BPF(text=fill_source(), cflags=cflags(self.cfg))
        self.fill_fd = self.fill_bpf.load_func("ct_bench_fill", BPF.SCHED_CLS).fd
        self.fill_ctl = self.fill_bpf["fill_ctl"].map_fd
        self.fill_compile_s = time.monotonic() - t0
        self.ring = Ring(self.dp.fd("ct_events"), on_record)
        self.prog = self.dp.prog_fd("ct_xdp_ingress")
        self.templates = {
            "udp": flow_frame(DST_FILL, 53, "udp"),
            "tcp": flow_frame(DST_FILL, 80, "tcp", "A"),     # pickup: ESTABLISHED
            "batch": flow_frame(DST_BATCH, 443, "tcp", "S"),
            "call": flow_frame(DST_CALL, 443, "tcp", "S"),
        }
        return self

    def events_per_call(self) -> int:
        return self.cfg.ring_bytes // EVENT_REC - 64

    def fill_run(self, template: str, mode: int, base: int, rng: int, repeat: int) -> int:
        """One test run of the filler; returns the kernel's mean ns per run."""
        bpfsys.map_update(self.fill_ctl, b"\0" * 4, struct.pack("<QIIII", 0, mode, base, rng, 0))
        rv, dur, _ = bpfsys.test_run(self.fill_fd, self.templates[template], repeat)
        if rv != TC_ACT_OK:
            raise SystemExit(f"{self.label}: fill program returned {rv}")
        return dur

    def fill(self, template: str, first: int, n: int, deadline: float) -> dict:
        """Create flows first .. first+n-1 of a template, as many per syscall
        as the ring holds events (skipped between syscalls)."""
        per = self.events_per_call()
        kernel_ns = calls = 0
        t0 = time.monotonic()
        done = 0
        while done < n:
            if time.monotonic() > deadline:
                raise OutOfTime(f"{self.label}: fill stopped at {done} of {n}")
            k = min(per, n - done)
            self.ring.skip()
            kernel_ns += self.fill_run(template, 0, first + done, 0, k) * k
            done += k
            calls += 1
        self.ring.skip()
        return {"flows": n, "calls": calls, "kernel_s": kernel_ns / 1e9,
                "wall_s": time.monotonic() - t0}

    def entries(self) -> int:
        return self.dp.global_state()["entries"]

    def memory(self) -> dict:
        names = {}
        for name in MAP_GROUPS + MAP_OTHERS:
            fd = self.dp.fd(name)
            names[map_fdinfo(fd)["map_id"]] = name
        maps = []
        for mid, fd in sorted(self.map_ids.items()):
            info = map_fdinfo(fd)
            maps.append({"name": names.get(mid, f"(unnamed map id {mid})"), "map_id": mid,
                         "type": info.get("map_type"), "key_size": info.get("key_size"),
                         "value_size": info.get("value_size"),
                         "max_entries": info.get("max_entries"),
                         "flags": info.get("map_flags"), "memlock": info.get("memlock", 0)})
        missing = set(names.values()) - {m["name"] for m in maps}
        if missing:
            raise SystemExit(f"{self.label}: maps not found among the new fds: {sorted(missing)}")
        return {"maps": maps, "total": sum(m["memlock"] for m in maps)}

    def close(self) -> None:
        for what in (self.ring, self.fill_bpf):
            if what is not None:
                try:
                    what.close() if hasattr(what, "close") else what.cleanup()
                except Exception as exc:  # keep cleaning up
                    log(f"  cleanup of {self.label}: {exc}")
        self.ring = self.fill_bpf = None
        if self.dp is not None:
            self.dp.close()
            self.dp = None
        shutil.rmtree(self.pin_dir, ignore_errors=True)


KMALLOC_SIZES = (8, 16, 32, 64, 96, 128, 192, 256, 512, 1024, 2048, 4096, 8192)


def wheel_chunks(t: "Table") -> dict[int, int]:
    """Index chunks in use per family, from the slot records: ceil(n / per chunk)
    for every slot not yet done (done slots have dropped theirs)."""
    out = {4: 0, 6: 0}
    fd = t.dp.fd("ct_wslots")
    for k in set(bpfsys.map_keys(fd, 8)):
        raw = bpfsys.map_lookup(fd, k, 16)
        if raw is None:
            continue
        _, fam = struct.unpack("<II", k)
        n, done = struct.unpack("<QQ", raw)
        per = abi.WHEEL4_PER_CHUNK if fam == 4 else abi.WHEEL6_PER_CHUNK
        out[fam] = out.get(fam, 0) + -(-n // per) - done // per
    return out


def slab_view(mem: dict, chunks: dict[int, int]) -> dict:
    """The index chunks as the allocator hands them out: a no-prealloc hash
    element is kmalloc'ed at elem_size + 8 (bpf_mem_alloc's llist node), and
    kmalloc rounds up to its size class; memlock counts elem_size + 8."""
    out = {}
    for name, fam in (("ct_wheel4", 4), ("ct_wheel6", 6)):
        mp = next(m for m in mem["maps"] if m["name"] == name)
        unit = 48 + 8 + (mp["value_size"] + 7) // 8 * 8 + 8  # htab_elem + key + value + llist
        cls = next(c for c in KMALLOC_SIZES if c >= unit)
        out[name] = {"chunks": chunks.get(fam, 0), "accounted_unit": unit, "kmalloc_class": cls,
                     "extra_bytes": chunks.get(fam, 0) * (cls - unit)}
    return out


# ---- system view --------------------------------------------------------------

MEMINFO_KEYS = ("MemAvailable", "Slab", "SUnreclaim", "VmallocUsed", "Percpu")


def meminfo() -> dict[str, int]:
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in MEMINFO_KEYS:
            out[k] = int(v.split()[0]) * 1024
    return out


def slabinfo() -> dict[str, int]:
    out = {}
    try:
        lines = Path("/proc/slabinfo").read_text().splitlines()[2:]
    except OSError:
        return out
    for line in lines:
        f = line.split()
        out[f[0]] = int(f[2]) * int(f[3])  # num_objs * objsize
    return out


# ---- measurements ------------------------------------------------------------

class Checks:
    def __init__(self):
        self.problems: list[str] = []

    def expect(self, case: str, d: dict, **want) -> None:
        for k, v in want.items():
            if d.get(k, 0) != v:
                self.problems.append(f"{case}: stat {k} moved by {d.get(k, 0)}, expected {v}")
        for k in ("invalid", "table_full", "untracked_packets", "wheel_full", "ring_full"):
            if k not in want and d.get(k, 0):
                self.problems.append(f"{case}: stat {k} moved by {d[k]}")


CASES = (
    ("hit_xdp_same", "hit, one flow, ct_xdp_ingress, repeat {repeat}"),
    ("hit_tc_same", "hit, one flow, filler (tc), repeat {repeat}"),
    ("hit_tc_random", "hit, random flow of the table, filler, repeat {repeat}"),
    ("create_tc", "create, new flows, filler, repeat {batch_creates}"),
    ("hit_xdp_call", "hit, one flow, ct_xdp_ingress, repeat 1"),
    ("create_xdp_call", "create, new flows, ct_xdp_ingress, repeat 1"),
)


def measure_round(t: Table, p: dict, hit: bytes, checks: Checks) -> dict[str, float]:
    r = p["repeat"]
    out = {}
    prog = t.prog
    bulk_first, bulk_n = t.bulk  # the TCP flows of the fill: random hits land there

    s0 = stats(t.dp)
    rv, dur, _ = bpfsys.test_run(prog, hit, r)
    if rv != XDP_PASS:
        raise SystemExit(f"hit returned {rv}")
    out["hit_xdp_same"] = dur
    checks.expect(f"{t.label} hit_xdp_same", stat_delta(s0, stats(t.dp)), packets=r, created=0)

    for case, base, rng in (("hit_tc_same", bulk_first + bulk_n // 2, 1),
                            ("hit_tc_random", bulk_first, bulk_n)):
        s0 = stats(t.dp)
        out[case] = t.fill_run("tcp", 1, base, rng, r)
        checks.expect(f"{t.label} {case}", stat_delta(s0, stats(t.dp)), packets=r, created=0)

    n = p["batch_creates"]
    t.ring.skip()
    s0 = stats(t.dp)
    out["create_tc"] = t.fill_run("batch", 0, t.next_idx["batch"], 0, n)
    t.next_idx["batch"] += n
    checks.expect(f"{t.label} create_tc", stat_delta(s0, stats(t.dp)), packets=n, created=n,
                  events=n)
    t.ring.skip()

    calls = p["calls"]
    hits, creates = [], []
    first = t.next_idx["call"]
    s0 = stats(t.dp)
    for i in range(calls):
        rv, dur, _ = bpfsys.test_run(prog, hit, 1)
        hits.append(dur)
        rv2, dur2, _ = bpfsys.test_run(prog, patch_flow(t.templates["call"], first + i), 1)
        creates.append(dur2)
        if rv != XDP_PASS or rv2 != XDP_PASS:
            raise SystemExit(f"per-call run returned {rv}/{rv2}")
        if i % 1000 == 999:
            t.ring.skip()
    t.ring.skip()
    t.next_idx["call"] += calls
    checks.expect(f"{t.label} per-call", stat_delta(s0, stats(t.dp)), packets=2 * calls,
                  created=calls, events=calls)
    out["hit_xdp_call"] = statistics.median(hits)
    out["create_xdp_call"] = statistics.median(creates)
    return out


def sweep(t: Table, expect: int, acks: list, deadline: float) -> dict:
    """Run ct_sweep4 as the daemon does until nothing is due."""
    req = abi.pack_sweep_req(4, SWEEP_BATCH)
    fd = t.dp.prog_fd("ct_sweep4")
    s0 = stats(t.dp)
    kernel_ns = wall_ns = read_ns = 0
    calls = runs = 0
    pending = 1
    while pending:
        if time.monotonic() > deadline:
            raise OutOfTime(f"sweep stopped after {calls} calls")
        a = time.perf_counter_ns()
        rv, dur, out = bpfsys.test_run(fd, req, SWEEP_REPEAT)
        b = time.perf_counter_ns()
        t.ring.drain()
        c = time.perf_counter_ns()
        if rv != TC_ACT_OK:
            raise SystemExit(f"sweeper returned {rv}")
        kernel_ns += dur * SWEEP_REPEAT
        wall_ns += b - a
        read_ns += c - b
        calls += 1
        runs += SWEEP_REPEAT
        pending = abi.unpack_sweep_req(out)["pending"]
    d = stat_delta(s0, stats(t.dp))
    expired = d.get("destroyed", 0)
    res = {"expected": expect, "expired": expired, "calls": calls, "runs": runs,
           "swept_records": d.get("swept", 0), "rescheduled": d.get("rescheduled", 0),
           "ring_full": d.get("ring_full", 0), "outbox_full": d.get("outbox_full", 0),
           "destroy_events_read": len(acks),
           "kernel_s": kernel_ns / 1e9, "wall_s": wall_ns / 1e9, "ring_read_s": read_ns / 1e9}
    if expired:
        res |= {"ns_per_expiry_kernel": kernel_ns / expired,
                "expiries_per_s_kernel": expired / (kernel_ns / 1e9),
                "ns_per_expiry_wall": wall_ns / expired,
                "expiries_per_s_wall": expired / (wall_ns / 1e9),
                "expiries_per_s_wall_with_ring_read": expired / ((wall_ns + read_ns) / 1e9)}
    return res


def ack_all(t: Table, acks: list, deadline: float) -> dict:
    """Ack the outbox copies as streamer/datapath/outbox.py does: 64 per syscall."""
    fd = t.dp.prog_fd("ct_ack4")
    kernel_ns = wall_ns = 0
    calls = acked = 0
    t0 = time.perf_counter_ns()
    for i in range(0, len(acks), abi.ACK_BATCH):
        if time.monotonic() > deadline:
            raise OutOfTime(f"ack stopped at {i} of {len(acks)}")
        req = abi.pack_acks(4, acks[i:i + abi.ACK_BATCH])
        a = time.perf_counter_ns()
        rv, dur, out = bpfsys.test_run(fd, req, 1)
        wall_ns += time.perf_counter_ns() - a
        if rv != TC_ACT_OK:
            raise SystemExit(f"ack program returned {rv}")
        kernel_ns += dur
        calls += 1
        acked += abi.unpack_ack_hdr(out)["acked"]
    loop_ns = time.perf_counter_ns() - t0
    res = {"sent": len(acks), "acked": acked, "calls": calls, "kernel_s": kernel_ns / 1e9,
           "wall_s": wall_ns / 1e9, "loop_s": loop_ns / 1e9}
    if acked:
        res |= {"ns_per_ack_kernel": kernel_ns / acked, "acks_per_s_kernel": acked / (kernel_ns / 1e9),
                "ns_per_ack_wall": wall_ns / acked, "acks_per_s_wall": acked / (wall_ns / 1e9)}
    return res


# ---- the run --------------------------------------------------------------------

def run(p: dict, checks: Checks, pins: list[str], deadline: float, ring_bytes: int,
        perf_out: str = "", cpu: int | None = None) -> dict:
    res: dict = {}
    n, e, small = p["entries"], p["expire"], p["small"]
    reserve = 1 + p["rounds"] * (p["batch_creates"] + p["calls"])
    if not 0 < e < n - reserve:
        raise SystemExit(f"--expire must be below entries minus the {reserve} measured flows")
    acks: list[tuple[bytes, int]] = []
    acks_small: list[tuple[bytes, int]] = []
    sample: list[bytes] = []

    def on_destroy_small(rec) -> None:
        if rec[0] == abi.EV_DESTROY:
            acks_small.append(b"")

    def on_destroy(rec) -> None:
        if rec[0] != abi.EV_DESTROY:
            return
        r = bytes(rec)
        if not sample:
            sample.append(r)
        # The outbox key (ct_key4) and ct_id: what RawEvent.outbox_key() makes.
        acks.append((r[80:84] + r[96:100] + r[112:116] + r[5:6] + r[118:119] + r[116:118],
                     int.from_bytes(r[8:16], "little")))

    tables: list[Table] = []
    try:
        mem0, slab0 = meminfo(), slabinfo()
        log(f"loading the {n:,}-entry datapath ({pins[0]})")
        big = Table(f"{n // 1_000_000}M" if n >= 1_000_000 else f"{n // 1000}k",
                    pins[0], n, ring_bytes)
        tables.append(big)
        big.load(on_destroy)
        mem1 = meminfo()
        log(f"  datapath loaded in {big.load_s:.1f} s, filler compiled in {big.fill_compile_s:.1f} s")
        fill_n = n - reserve
        s0 = stats(big.dp)
        fu = big.fill("udp", 0, e, deadline)
        udp_done_ns = time.monotonic_ns()
        log(f"  {e:,} UDP flows (timeout {UDP_S:g} s, the expiring set) in {fu['wall_s']:.1f} s")
        ft = big.fill("tcp", e, fill_n - e, deadline)
        big.bulk = (e, fill_n - e)
        log(f"  {fill_n - e:,} TCP flows (ESTABLISHED, timeout {LONG_S:g} s) in {ft['wall_s']:.1f} s")
        d = stat_delta(s0, stats(big.dp))
        checks.expect("fill", d, packets=fill_n, created=fill_n, events=fill_n)
        if big.entries() != fill_n:
            checks.problems.append(f"fill: {big.entries()} entries, expected {fill_n}")
        mem2, slab2 = meminfo(), slabinfo()
        res["fill"] = {"flows": fill_n, "udp": fu, "tcp": ft,
                       "kernel_ns_per_create": (fu["kernel_s"] + ft["kernel_s"]) * 1e9 / fill_n,
                       "events_skipped": big.ring.skipped}

        log(f"loading the {small:,}-entry datapath ({pins[1]})")
        sm = Table(f"{small // 1000}k", pins[1], small + reserve, ring_bytes)
        tables.append(sm)
        sm.load(on_destroy_small)
        e_small = small // 10
        sm.fill("udp", 0, e_small, deadline)
        sm_udp_done_ns = time.monotonic_ns()
        sm.fill("tcp", e_small, small - e_small, deadline)
        sm.bulk = (e_small, small - e_small)

        hits = {}
        for t in (big, sm):
            t.next_idx = {"batch": 0, "call": 0}
            hits[t.label], _ = establish(t.dp, 4, t.ring)
            t.ring.skip()
        samples = {t.label: {c: [] for c, _ in CASES} for t in (big, sm)}
        for rnd in range(p["rounds"]):
            for t in (big, sm):
                if time.monotonic() > deadline:
                    raise OutOfTime("packet-path rounds")
                for c, v in measure_round(t, p, hits[t.label], checks).items():
                    samples[t.label][c].append(v)
            log(f"  round {rnd + 1}/{p['rounds']}: " + "; ".join(
                f"{t.label}: hit {samples[t.label]['hit_xdp_same'][-1]}, random hit "
                f"{samples[t.label]['hit_tc_random'][-1]}, create {samples[t.label]['create_tc'][-1]}"
                for t in (big, sm)))
        res["packet_path"] = {
            "labels": [big.label, sm.label],
            "entries_at_end": {big.label: big.entries(), sm.label: sm.entries()},
            "limits": {big.label: big.cfg.table_limit, sm.label: sm.cfg.table_limit},
            "cases": {c: {t.label: {"median": statistics.median(samples[t.label][c]),
                                    "min": min(samples[t.label][c]),
                                    "samples": samples[t.label][c]} for t in (big, sm)}
                      for c, _ in CASES},
        }

        # Memory: the table is now exactly full.
        ents = big.entries()
        if ents != n:
            checks.problems.append(f"memory: {ents} entries, expected {n}")
        m = big.memory()
        groups = {g: 0 for g in MAP_GROUPS + ("others",)}
        for mp in m["maps"]:
            groups[mp["name"] if mp["name"] in MAP_GROUPS else "others"] += mp["memlock"]
        chunk_bytes = next(x for x in m["maps"] if x["name"] == "ct_wheel4")
        res["memory"] = {
            "entries": ents, "table_limit": n, "ring_bytes": ring_bytes,
            "maps": m["maps"], "groups": groups, "total": m["total"],
            "bytes_per_entry": m["total"] / ents,
            "groups_per_entry": {g: v / ents for g, v in groups.items()},
            "meminfo_before_load": mem0, "meminfo_after_load": mem1, "meminfo_after_fill": mem2,
            "meminfo_delta_fill": {k: mem2[k] - mem0[k] for k in mem0},
            "entries_at_meminfo_after_fill": fill_n,
            "slab_delta_fill_top": sorted(((k, slab2.get(k, 0) - slab0.get(k, 0)) for k in slab2),
                                          key=lambda kv: -kv[1])[:5],
            "wheel4_value_size": chunk_bytes["value_size"],
        }
        sv = slab_view(m, wheel_chunks(big))
        extra = sum(v["extra_bytes"] for v in sv.values())
        res["memory"]["slab_view"] = sv
        res["memory"]["allocator_total"] = m["total"] + extra
        res["memory"]["allocator_bytes_per_entry"] = (m["total"] + extra) / ents
        sm_mem = sm.memory()
        res["memory_small"] = {"entries": sm.entries(), "total": sm_mem["total"],
                               "bytes_per_entry": sm_mem["total"] / sm.entries()}

        # Expiry: the UDP flows have long been due; make sure their slots
        # are past the sweeper's two-slot guard, then sweep. The small
        # table's first, for comparison.
        slot = 1 << abi.SLOT_SHIFT
        done_ns = max(udp_done_ns, sm_udp_done_ns)
        due = max((done_ns + int(UDP_S * 1e9)) // slot, done_ns // slot + 1)
        wait = (due + 2) * slot + 5_000_000 - time.monotonic_ns()
        if wait > 0:
            time.sleep(wait / 1e9)
        sm.ring.skip()
        res["expiry_small"] = sweep(sm, e_small, acks_small, deadline)
        if res["expiry_small"]["expired"] != e_small:
            checks.problems.append(f"small expiry: destroyed {res['expiry_small']['expired']}, "
                                   f"expected {e_small}")
        sm.close()
        tables.remove(sm)
        big.ring.skip()
        g0 = big.dp.global_state()
        log(f"sweeping: {e:,} of {g0['entries']:,} entries are due")
        perf = None
        if perf_out:
            import subprocess
            perf = subprocess.Popen(["perf", "record", "-q", "-g", "-o", perf_out]
                                    + (["-C", str(cpu)] if cpu is not None else ["-a"]),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
        try:
            res["expiry"] = sweep(big, e, acks, deadline)
        finally:
            if perf is not None:
                perf.send_signal(signal.SIGINT)
                perf.wait(timeout=60)
        g1 = big.dp.global_state()
        ex = res["expiry"]
        if ex["expired"] != e:
            checks.problems.append(f"expiry: destroyed {ex['expired']}, expected {e}")
        if len(acks) != e or ex["ring_full"]:
            checks.problems.append(f"expiry: {len(acks)} DESTROYs read, ring_full {ex['ring_full']}")
        if g1["dying"] != e or g1["entries"] != n:
            checks.problems.append(f"expiry: global state after the sweep {g1}")
        if sample:
            want = abi.decode_event(sample[0])
            if (want.outbox_key(), want.ct_id) != acks[0]:
                checks.problems.append("ack records differ from RawEvent.outbox_key()")
        log(f"  {ex['expired']:,} expired, kernel {ex['kernel_s'] * 1e3:.0f} ms, "
            f"wall {ex['wall_s'] * 1e3:.0f} ms; acking them")
        res["ack"] = ack_all(big, acks, deadline)
        g2 = big.dp.global_state()
        if res["ack"]["acked"] != e or g2["dying"] != 0 or g2["entries"] != n - e:
            checks.problems.append(f"ack: acked {res['ack']['acked']}, global state {g2}")
        res["global_after"] = g2
        return res
    finally:
        for t in tables:
            t.close()


# ---- report ---------------------------------------------------------------------

def mb(v: float) -> str:
    return f"{v / 2**20:,.1f} MiB"


def verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


def table(res: dict, targets: dict) -> str:
    L = []
    mch = res["machine"]
    p = res["params"]
    L.append(f"ctstream table scale: kernel {mch['kernel']}, {mch['cpus']} CPUs ({mch['cpu_model']}), "
             f"pinned to CPU {mch['pinned_cpu']}, load average at start {mch['loadavg']}")
    r = res.get("run", {})
    if "fill" in r:
        f = r["fill"]
        L.append(f"fill: {f['flows']:,} flows through ct_handle() by bench/table_fill.c "
                 f"({f['udp']['calls'] + f['tcp']['calls']} test-run calls, ring skipped between them), "
                 f"{(f['udp']['wall_s'] + f['tcp']['wall_s']):.1f} s wall, "
                 f"{f['kernel_ns_per_create']:.0f} ns/create in the kernel")
    if "memory" in r:
        m = r["memory"]
        n = m["entries"]
        L.append("")
        L.append(f"memory with {n:,} entries (table limit {m['table_limit']:,}), as the kernel accounts it "
                 "(memlock in /proc/self/fdinfo/<map fd>):")
        L.append(f"  {'map':12} {'type':>5} {'max_entries':>12} {'value':>6} {'memlock':>14} {'B/entry':>8}")
        for mp in sorted(m["maps"], key=lambda x: -x["memlock"]):
            L.append(f"  {mp['name']:12} {mp['type']:>5} {mp['max_entries']:>12,} {mp['value_size']:>6} "
                     f"{mb(mp['memlock']):>14} {mp['memlock'] / n:>8.1f}")
        L.append(f"  {'total':12} {'':>5} {'':>12} {'':>6} {mb(m['total']):>14} {m['bytes_per_entry']:>8.1f}"
                 f"   target <= {targets['bytes']} B/entry: {verdict(m['bytes_per_entry'] <= targets['bytes'])}")
        sv = m["slab_view"]["ct_wheel4"]
        L.append(f"  allocator view: the {sv['chunks']:,} IPv4 index chunks are accounted at "
                 f"{sv['accounted_unit']} B but kmalloc gives each {sv['kmalloc_class']} B: "
                 f"+{mb(sv['extra_bytes'])}, {m['allocator_bytes_per_entry']:.1f} B/entry in all")
        gp = m["groups_per_entry"]
        L.append("  per entry by part: " + ", ".join(f"{k} {v:.1f}" for k, v in gp.items()))
        dm = m["meminfo_delta_fill"]
        fe = m["entries_at_meminfo_after_fill"]
        L.append(f"  system view, /proc/meminfo from before load to after the fill ({fe:,} entries; "
                 "other jobs on the machine add noise): "
                 + ", ".join(f"{k} {dm[k] / 2**20:+,.0f} MiB" for k in MEMINFO_KEYS)
                 + f"; (VmallocUsed+Slab+Percpu)/entry {(dm['VmallocUsed'] + dm['Slab'] + dm['Percpu']) / fe:.1f} B")
        L.append("  slab caches that grew most: " + ", ".join(
            f"{k} {v / 2**20:+,.0f} MiB" for k, v in m["slab_delta_fill_top"] if v > 0))
        if "memory_small" in r:
            ms = r["memory_small"]
            L.append(f"  (the small datapath: {ms['entries']:,} entries, {mb(ms['total'])}, "
                     f"{ms['bytes_per_entry']:.0f} B/entry: fixed costs dominate)")
    if "expiry" in r:
        x = r["expiry"]
        L.append("")
        L.append(f"expiry (ct_sweep4, budget {SWEEP_BATCH} records/run, repeat {SWEEP_REPEAT}/syscall, "
                 f"ring read between syscalls): {x['expired']:,} of {x['expected']:,} expired in "
                 f"{x['calls']} syscalls")
        if x["expired"]:
            L.append(f"  kernel {x['kernel_s'] * 1e3:,.0f} ms: {x['ns_per_expiry_kernel']:.0f} ns/expiry, "
                     f"{x['expiries_per_s_kernel'] / 1e6:.2f} M expiries/s   target >= "
                     f"{targets['expiries'] / 1e6:g} M/s: {verdict(x['expiries_per_s_kernel'] >= targets['expiries'])}")
            L.append(f"  wall of the syscalls {x['wall_s'] * 1e3:,.0f} ms: "
                     f"{x['expiries_per_s_wall'] / 1e6:.2f} M/s; reading the {x['destroy_events_read']:,} "
                     f"DESTROYs in Python {x['ring_read_s'] * 1e3:,.0f} ms (with it "
                     f"{x['expiries_per_s_wall_with_ring_read'] / 1e6:.2f} M/s)")
        L.append(f"  records swept {x['swept_records']:,}, rescheduled {x['rescheduled']}, "
                 f"ring_full {x['ring_full']}, outbox_full {x['outbox_full']}")
        xs = r.get("expiry_small")
        if xs and xs["expired"]:
            L.append(f"  for comparison, the small table ({xs['expired']:,} of its entries due): "
                     f"{xs['ns_per_expiry_kernel']:.0f} ns/expiry kernel, "
                     f"{xs['expiries_per_s_kernel'] / 1e6:.2f} M/s")
    if "ack" in r:
        a = r["ack"]
        if a["acked"]:
            L.append(f"ack (ct_ack4, {abi.ACK_BATCH}/syscall): {a['acked']:,} outbox copies in {a['calls']:,} "
                     f"syscalls; kernel {a['kernel_s'] * 1e3:,.0f} ms ({a['ns_per_ack_kernel']:.0f} ns/ack, "
                     f"{a['acks_per_s_kernel'] / 1e6:.2f} M/s), wall of the syscalls {a['wall_s'] * 1e3:,.0f} ms "
                     f"({a['acks_per_s_wall'] / 1e6:.2f} M/s), whole Python loop {a['loop_s'] * 1e3:,.0f} ms")
        x = r.get("expiry", {})
        if x.get("expired") and a["acked"]:
            k = x["kernel_s"] + a["kernel_s"]
            w = x["wall_s"] + a["wall_s"]
            L.append(f"expire + ack: kernel {k * 1e3:,.0f} ms ({x['expired'] / k / 1e6:.2f} M/s), "
                     f"wall of the syscalls {w * 1e3:,.0f} ms ({x['expired'] / w / 1e6:.2f} M/s)")
    if "packet_path" in r:
        pp = r["packet_path"]
        b, s = pp["labels"]
        L.append("")
        L.append(f"packet path, ns/packet as BPF_PROG_TEST_RUN reports it, median of {p['rounds']} rounds "
                 f"(entries at the end: {b} table {pp['entries_at_end'][b]:,}, {s} table "
                 f"{pp['entries_at_end'][s]:,}):")
        L.append(f"  {'case':58} {b:>7} {s:>7} {'ratio':>6}")
        for c, label in CASES:
            v = pp["cases"][c]
            L.append(f"  {label.format(**p):58} {v[b]['median']:>7.0f} {v[s]['median']:>7.0f} "
                     f"{v[b]['median'] / max(v[s]['median'], 1):>6.2f}")
    L.append("")
    if res.get("error"):
        L.append(f"ERROR: {res['error']}")
    if res["problems"]:
        L.append("PROBLEMS:")
        L += [f"  {x}" for x in res["problems"]]
    else:
        L.append("checks: the counters moved as each case should (fill/create: one create and one "
                 "event per run; hits: none; no invalid/untracked/table_full/wheel_full/ring_full; "
                 "every due entry expired, every DESTROY read and acked)")
    L.append(f"total time {res['elapsed_s']:.0f} s; command: {res['command']}")
    return "\n".join(L)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="1M entries, 100k expiries, 2 rounds (about 15 s)")
    ap.add_argument("--entries", type=int, help="size of the big table (10000000)")
    ap.add_argument("--expire", type=int, help="entries made due and expired (1000000)")
    ap.add_argument("--rounds", type=int, help="rounds of the packet-path cases (3)")
    ap.add_argument("--ring-bytes", type=int, default=DatapathConfig.ring_bytes,
                    help="event ring of both datapaths (default: the daemon's, 4 MiB)")
    ap.add_argument("--out", default=str(HERE / "results" / "table_scale.json"),
                    help="JSON file for the results ('' = none)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    ap.add_argument("--perf", default="", metavar="FILE",
                    help="record `perf record -g` of the 10M sweep into FILE")
    ap.add_argument("--cpu", type=int, default=-2,
                    help="CPU to pin to (default: the last one allowed; -1: no pinning)")
    args = ap.parse_args(argv)
    p = dict(QUICK if args.quick else FULL)
    for k in ("entries", "expire", "rounds"):
        if getattr(args, k) is not None:
            p[k] = getattr(args, k)
    if not 100_000 <= p["entries"] <= 1 << 27 or p["rounds"] < 1 or p["expire"] < 1:
        ap.error("entries must be in [100000, 2^27] (the table limit's range), rounds and expire >= 1")
    if os.geteuid() != 0:
        log("needs root (BPF_PROG_TEST_RUN, bpffs): run it with sudo")
        return 2
    cpu = None
    if args.cpu != -1:
        allowed = sorted(os.sched_getaffinity(0))
        cpu = allowed[-1] if args.cpu == -2 else args.cpu
        os.sched_setaffinity(0, {cpu})

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)

    start = time.monotonic()
    checks = Checks()
    pins = [f"/sys/fs/bpf/ctsscale_{os.getpid()}_big", f"/sys/fs/bpf/ctsscale_{os.getpid()}_small"]
    targets = {"bytes": 192, "expiries": 1_000_000}
    res = {"params": p, "ring_bytes": args.ring_bytes, "machine": machine(cpu), "targets": targets,
           "command": " ".join(["sudo", ".venv/bin/python", "bench/table_scale.py"] + sys.argv[1:])}
    rc = 0
    try:
        res["run"] = run(p, checks, pins, start + TIME_LIMIT_S, args.ring_bytes, args.perf, cpu)
    except OutOfTime as exc:
        res["error"] = f"out of time ({TIME_LIMIT_S} s): {exc}"
        rc = 1
    finally:
        for pin in pins:
            shutil.rmtree(pin, ignore_errors=True)
    res["elapsed_s"] = round(time.monotonic() - start, 1)
    res["problems"] = checks.problems
    r = res.get("run", {})
    res["targets_met"] = {
        "bytes_per_entry": r.get("memory", {}).get("bytes_per_entry", 1e9) <= targets["bytes"],
        "expiries_per_s_kernel": r.get("expiry", {}).get("expiries_per_s_kernel", 0) >= targets["expiries"],
    }
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2) + "\n")
        log(f"results written to {out}")
    print(json.dumps(res, indent=2) if args.json else table(res, targets))
    return 1 if (rc or checks.problems) else 0


if __name__ == "__main__":
    sys.exit(main())
