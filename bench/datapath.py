"""ctstream datapath benchmark: nanoseconds per packet through BPF_PROG_TEST_RUN.

Everything runs in one process, side by side and interleaved round by round,
so that the ratios between the cases mean something on a small, noisy machine:

  * bare:   bench/bare_pass.c, an XDP program that only returns XDP_PASS;
            the floor (test-run loop, timer, program call).
  * hit:    ct_xdp_ingress on a packet of an ESTABLISHED+ASSURED TCP flow,
            in the original direction (first lookup hits), in the reply
            direction (first lookup misses, the reversed key hits), and IPv6.
  * create: ct_xdp_ingress on packets of distinct new UDP flows. `repeat`
            would only create on its first run, so these are one packet per
            syscall (repeat=1), the kernel-reported duration of each call,
            beside bare and hit measured the same way.
  * sweeper: ct_sweep4 expiring a table of short-lived UDP flows.

The figures are the kernel's: BPF_PROG_TEST_RUN reports the mean duration
of one run, measured inside the kernel, so the syscall itself is not in them.
Run as root; see bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import struct
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from streamer.datapath import abi, bpfsys  # noqa: E402
from streamer.datapath.config import DatapathConfig, Timeouts  # noqa: E402

XDP_PASS = 2
TC_ACT_OK = 0  # the sweepers are tc programs
SLOT_NS = 1 << abi.SLOT_SHIFT
TIME_LIMIT_S = 170          # the whole bench must end within 3 minutes
SWEEP_BATCH = 2             # CT_SWEEP_BATCH in bpf/ct_maps.h: records per run at most

FULL = dict(rounds=5, repeat=1_000_000, calls=20_000, sweep_flows=100_000, sweep_repeat=1024)
QUICK = dict(rounds=3, repeat=100_000, calls=2_000, sweep_flows=10_000, sweep_repeat=1024)

# Addresses from the benchmarking ranges only (198.18.0.0/15, 2001:2::/48).
HIT4 = ("198.19.0.1", "198.19.0.2")
HIT6 = ("2001:2:0:1::1", "2001:2:0:1::2")
HIT_PORTS = (40000, 80)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- packets ----------------------------------------------------------------

def tcp_packet(fam: int, src: str, dst: str, sport: int, dport: int, flags: str,
               payload: bytes = b"") -> bytes:
    from scapy.all import IP, TCP, Ether, IPv6, Raw

    l3 = IP(src=src, dst=dst) if fam == 4 else IPv6(src=src, dst=dst)
    pkt = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / l3 / \
        TCP(sport=sport, dport=dport, flags=flags, seq=1000, ack=2000 if "A" in flags else 0)
    if payload:
        pkt = pkt / Raw(payload)
    return bytes(pkt)


class UdpFlows:
    """Packets of distinct UDP flows, made by patching the addresses and the
    source port of one scapy-built template (building 100,000 packets with
    scapy would take longer than the whole bench). The checksums are then
    stale; the datapath does not check them."""

    PAYLOAD = b"x" * 22  # IPv4: 14 + 20 + 8 + 22 = 64 bytes on the wire (no FCS)

    def __init__(self, fam: int, first: int = 0):
        from scapy.all import IP, UDP, Ether, IPv6, Raw

        self.fam = fam
        self.next = first
        if fam == 4:
            l3 = IP(src="198.18.0.0", dst="198.19.255.1")
            self.saddr_off, self.sport_off = 14 + 12, 14 + 20
        else:
            l3 = IPv6(src="2001:2::", dst="2001:2:0:ffff::1")
            self.saddr_off, self.sport_off = 14 + 8, 14 + 40
        self.template = bytearray(bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
                                        / l3 / UDP(sport=1, dport=53) / Raw(self.PAYLOAD)))
        self.size = len(self.template)

    def take(self, n: int) -> list[bytes]:
        """n packets of flows never used before by this object."""
        out = []
        buf = self.template
        for i in range(self.next, self.next + n):
            if self.fam == 4:  # 198.18.0.0/16 x source ports 20000..
                buf[self.saddr_off + 2: self.saddr_off + 4] = (i & 0xFFFF).to_bytes(2, "big")
                buf[self.sport_off: self.sport_off + 2] = (20000 + (i >> 16)).to_bytes(2, "big")
            else:              # 2001:2::/64, low 32 bits of the address
                buf[self.saddr_off + 12: self.saddr_off + 16] = i.to_bytes(4, "big")
                buf[self.sport_off: self.sport_off + 2] = (20000).to_bytes(2, "big")
            out.append(bytes(buf))
        self.next += n
        return out


# ---- datapath helpers -----------------------------------------------------

def stats(dp) -> dict[str, int]:
    fd = dp.fd("ct_stats")
    out = {}
    for idx, name in enumerate(abi.STAT_NAMES):
        vals = bpfsys.percpu_lookup(fd, idx.to_bytes(4, "little"), 8)
        out[name] = sum(int.from_bytes(v, "little") for v in vals)
    return out


def stat_delta(before: dict, after: dict) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


class Ring:
    """Drains the event ring and counts what it held, by event type."""

    def __init__(self, dp):
        self.counts = {t: 0 for t in abi.EVENT_NAMES}
        self.rb = bpfsys.RingBuffer(dp.fd("ct_events"), self._on)

    def _on(self, rec) -> None:
        self.counts[rec[0]] = self.counts.get(rec[0], 0) + 1

    def drain(self) -> int:
        return self.rb.consume()

    def close(self) -> None:
        self.rb.close()


def live_entries(dp) -> int:
    """Entries not yet expired: an expired one waits in the outbox (counted in
    entries until acked, which this bench leaves to the daemon's side)."""
    g = dp.global_state()
    return g["entries"] - g["dying"]


def entry(dp, fam: int, src: str, dst: str, sport: int, dport: int, proto: int = 6) -> dict | None:
    import socket

    af = socket.AF_INET if fam == 4 else socket.AF_INET6
    key = (socket.inet_pton(af, src) + socket.inet_pton(af, dst) + sport.to_bytes(2, "big")
           + dport.to_bytes(2, "big") + bytes([proto, 0]) + (0).to_bytes(2, "little"))
    raw = bpfsys.map_lookup(dp.fd("ct4" if fam == 4 else "ct6"), key, abi.ENTRY.size)
    if raw is None:
        return None
    ct_id, first, last, po, pr, bo, br, status_seq, sched = struct.unpack(abi.ENTRY.fmt, raw)
    return {"state": status_seq & 0xFF, "flags": (status_seq >> 8) & 0xFF,
            "pkts": (po, pr), "bytes": (bo, br)}


def establish(dp, fam: int, ring: Ring) -> tuple[bytes, bytes]:
    """Take one TCP flow through SYN, SYN/ACK, ACK; return a data packet of
    each direction. The IPv4 original-direction one is 64 bytes."""
    c, s = HIT4 if fam == 4 else HIT6
    cp, sp = HIT_PORTS
    prog = dp.prog_fd("ct_xdp_ingress")
    for pkt in (tcp_packet(fam, c, s, cp, sp, "S"), tcp_packet(fam, s, c, sp, cp, "SA"),
                tcp_packet(fam, c, s, cp, sp, "A")):
        rv, _, _ = bpfsys.test_run(prog, pkt, 1)
        if rv != XDP_PASS:
            raise SystemExit(f"handshake packet returned {rv}, not XDP_PASS")
    e = entry(dp, fam, c, s, cp, sp)
    if e is None or e["state"] != abi.S_ESTABLISHED or not e["flags"] & abi.F_ASSURED:
        raise SystemExit(f"IPv{fam} flow is not ESTABLISHED+ASSURED after the handshake: {e}")
    ring.drain()
    payload = b"d" * 10
    return (tcp_packet(fam, c, s, cp, sp, "PA", payload),
            tcp_packet(fam, s, c, sp, cp, "PA", payload))


def load_bare():
    """The bare XDP program's BCC object and fd, and the bare tc program's fd."""
    from bcc import BPF

    b = BPF(src_file=str(HERE / "bare_pass.c"))
    return b, b.load_func("bare_pass", BPF.XDP).fd, b.load_func("bare_cls", BPF.SCHED_CLS).fd


# ---- measurements -----------------------------------------------------------

def run_batched(prog: int, pkt: bytes, repeat: int) -> int:
    rv, dur, _ = bpfsys.test_run(prog, pkt, repeat)
    if rv != XDP_PASS:
        raise SystemExit(f"test run returned {rv}, not XDP_PASS")
    return dur


def run_calls(prog: int, pkts: list[bytes]) -> list[int]:
    """One syscall per packet; the kernel-reported duration of each."""
    out = []
    for pkt in pkts:
        rv, dur, _ = bpfsys.test_run(prog, pkt, 1)
        if rv != XDP_PASS:
            raise SystemExit(f"test run returned {rv}, not XDP_PASS")
        out.append(dur)
    return out


def syscall_wall(bare_xdp: int, bare_cls: int, pkt: bytes, n: int = 9) -> list[dict]:
    """Wall-clock time of one whole test-run syscall of a bare program (the
    ctypes call included), median of n. With repeat > 1 the kernel installs an
    XDP program in its XDP dispatcher for the run and removes it afterwards
    (net/bpf/test_run.c, bpf_prog_change_xdp), which waits for RCU grace
    periods: the calling thread sleeps for milliseconds, whatever the repeat."""
    out = []
    for name, fd, repeat in (("XDP", bare_xdp, 1), ("XDP", bare_xdp, 2), ("XDP", bare_xdp, 1024),
                             ("tc", bare_cls, 1), ("tc", bare_cls, 1024)):
        walls, kern = [], []
        for _ in range(n):
            a = time.perf_counter_ns()
            _, dur, _ = bpfsys.test_run(fd, pkt, repeat)
            walls.append(time.perf_counter_ns() - a)
            kern.append(dur * repeat)
        out.append({"prog": name, "repeat": repeat, "wall_us": statistics.median(walls) / 1e3,
                    "kernel_us": statistics.median(kern) / 1e3})
    return out


class Checks:
    """What each case must have done to the datapath's counters, so that a
    figure cannot silently come from the wrong path."""

    def __init__(self):
        self.problems: list[str] = []

    def expect(self, case: str, d: dict, **want) -> None:
        for k, v in want.items():
            if d.get(k, 0) != v:
                self.problems.append(f"{case}: stat {k} moved by {d.get(k, 0)}, expected {v}")
        for k in ("invalid", "table_full", "untracked_packets", "wheel_full"):
            if k not in want and d.get(k, 0):
                self.problems.append(f"{case}: stat {k} moved by {d[k]}")


def summarize(samples: list[float]) -> dict:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples),
            "samples": samples}


def bench_packet_path(p: dict, checks: Checks, pin_dir: str) -> dict:
    from streamer.datapath.loader import Datapath

    t0 = time.monotonic()
    dp = Datapath(DatapathConfig(pin_dir=pin_dir, table_limit=1 << 20)).load()
    bare_bpf, bare, bare_cls = load_bare()
    log(f"  loaded datapath and bare program in {time.monotonic() - t0:.1f} s")
    ring = Ring(dp)
    try:
        prog = dp.prog_fd("ct_xdp_ingress")
        hit4, hit4r = establish(dp, 4, ring)
        hit6, _ = establish(dp, 6, ring)
        bare_pkt = hit4
        assert len(bare_pkt) == 64, len(bare_pkt)
        flows4, flows6 = UdpFlows(4), UdpFlows(6)
        r = p["repeat"]
        batched = {k: [] for k in ("bare", "hit4", "hit4_reply", "hit6")}
        percall = {k: [] for k in ("bare", "hit4", "create4", "create6")}
        percall_all = {k: [] for k in percall}
        created = 0
        chunk = 1000
        for rnd in range(p["rounds"]):
            # repeat=R: one syscall, R runs of the same packet
            for case, fd, pkt, want in (("bare", bare, bare_pkt, None),
                                        ("hit4", prog, hit4, r),
                                        ("hit4_reply", prog, hit4r, r),
                                        ("hit6", prog, hit6, r)):
                s0 = stats(dp)
                batched[case].append(run_batched(fd, pkt, r))
                d = stat_delta(s0, stats(dp))
                if want is None:
                    checks.expect(case, d, packets=0)
                else:
                    checks.expect(case, d, packets=want, created=0)
            ring.drain()
            # repeat=1: one syscall per packet, interleaved in chunks
            rnd_calls = {k: [] for k in percall}
            left = p["calls"]
            while left > 0:
                n = min(chunk, left)
                left -= n
                new4, new6 = flows4.take(n), flows6.take(n)
                for case, fd, pkts, want in (("bare", bare, [bare_pkt] * n, None),
                                             ("hit4", prog, [hit4] * n, 0),
                                             ("create4", prog, new4, n),
                                             ("create6", prog, new6, n)):
                    s0 = stats(dp)
                    rnd_calls[case] += run_calls(fd, pkts)
                    d = stat_delta(s0, stats(dp))
                    if want is None:
                        checks.expect(case, d, packets=0)
                    else:
                        extra = {"events": n} if want else {}
                        checks.expect(case, d, packets=n, created=want, **extra)
                    created += want or 0
                    ring.drain()
            for k, v in rnd_calls.items():
                percall[k].append(statistics.median(v))
                percall_all[k] += v
            log(f"  round {rnd + 1}/{p['rounds']}: bare {batched['bare'][-1]} ns, "
                f"hit {batched['hit4'][-1]} ns (repeat={r}); per call: "
                + ", ".join(f"{k} {percall[k][-1]:.0f}" for k in percall))
        g = dp.global_state()
        st = stats(dp)
        if st["created"] != created + 2:  # + the two handshake flows
            checks.problems.append(f"created stat {st['created']}, expected {created + 2}")
        if g["entries"] != created + 2:
            checks.problems.append(f"ct_global entries {g['entries']}, expected {created + 2}")
        out = {
            "packets": {"bare": len(bare_pkt), "hit4": len(hit4), "hit4_reply": len(hit4r),
                        "hit6": len(hit6), "create4": flows4.size, "create6": flows6.size},
            "batched": {k: summarize(v) for k, v in batched.items()},
            "per_call": {},
            "table_entries_at_end": g["entries"],
            "stats": {k: v for k, v in st.items() if v},
            "ring_events_read": {abi.EVENT_NAMES[t]: c for t, c in ring.counts.items()},
        }
        for k, v in percall.items():
            allv = sorted(percall_all[k])
            out["per_call"][k] = summarize(v) | {
                "calls": len(allv), "p10_all": allv[len(allv) // 10],
                "p90_all": allv[len(allv) * 9 // 10], "min_all": allv[0]}
        out["syscall_wall"] = syscall_wall(bare, bare_cls, bare_pkt)
        return out
    finally:
        ring.close()
        bare_bpf.cleanup()
        dp.close()


def bench_sweeper(p: dict, checks: Checks, pin_dir: str, deadline: float) -> dict:
    from streamer.datapath.loader import Datapath

    cfg = DatapathConfig(pin_dir=pin_dir, table_limit=1 << 20, ring_bytes=1 << 26,
                         timeouts=Timeouts(udp=1))
    dp = Datapath(cfg).load()
    ring = Ring(dp)
    try:
        prog, sweep = dp.prog_fd("ct_xdp_ingress"), dp.prog_fd("ct_sweep4")
        req = abi.pack_sweep_req(4, SWEEP_BATCH)
        n = p["sweep_flows"]
        flows = UdpFlows(4)
        s0 = stats(dp)
        t0 = time.monotonic()
        for i in range(0, n, 4096):
            run_calls(prog, flows.take(min(4096, n - i)))
            ring.drain()
        t_last = time.monotonic_ns()
        create_s = time.monotonic() - t0
        g = dp.global_state()
        d = stat_delta(s0, stats(dp))
        checks.expect("sweeper setup", d, packets=n, created=n)
        if g["entries"] != n:
            checks.problems.append(f"sweeper setup: {g['entries']} entries, expected {n}")
        # Every entry is filed under slot(last + 1 s) (at least the slot after
        # its creation) and a slot is consumed once two more have begun: wait
        # for that, so that the sweep below finds all of them due.
        due = max((t_last + 1_000_000_000) // SLOT_NS, t_last // SLOT_NS + 1)
        ready = (due + 2) * SLOT_NS + 5_000_000
        wait_s = max(0.0, (ready - time.monotonic_ns()) / 1e9)
        log(f"  created {n} UDP flows in {create_s:.1f} s; waiting {wait_s:.2f} s for them to be due")
        time.sleep(wait_s)
        s1 = stats(dp)
        kernel_ns = wall_ns = drain_ns = 0
        calls = runs = 0
        remaining = live_entries(dp)
        while remaining and time.monotonic() < deadline:
            a = time.perf_counter_ns()
            rv, dur, out = bpfsys.test_run(sweep, req, p["sweep_repeat"])
            b = time.perf_counter_ns()
            ring.drain()
            c = time.perf_counter_ns()
            if rv != TC_ACT_OK:
                raise SystemExit(f"sweeper returned {rv}, not TC_ACT_OK")
            kernel_ns += dur * p["sweep_repeat"]
            wall_ns += b - a
            drain_ns += c - b
            calls += 1
            runs += p["sweep_repeat"]
            remaining = live_entries(dp)
        d = stat_delta(s1, stats(dp))
        expired = d.get("destroyed", 0)
        if remaining:
            checks.problems.append(f"sweeper: {remaining} entries left when time ran out")
        if expired != n:
            checks.problems.append(f"sweeper: destroyed {expired}, expected {n}")
        res = {
            "flows": n, "udp_timeout_s": 1, "ring_bytes": cfg.ring_bytes,
            "create_wall_s": round(create_s, 3), "wait_s": round(wait_s, 3),
            "budget_per_run": SWEEP_BATCH, "repeat_per_call": p["sweep_repeat"],
            "calls": calls, "runs": runs, "expired": expired,
            "swept_records": d.get("swept", 0), "rescheduled": d.get("rescheduled", 0),
            "ring_full": d.get("ring_full", 0), "wheel_full": d.get("wheel_full", 0),
            "destroy_events_read": ring.counts.get(abi.EV_DESTROY, 0),
            "entries_left": remaining,
            "kernel_ms": kernel_ns / 1e6, "wall_ms": wall_ns / 1e6, "drain_ms": drain_ns / 1e6,
        }
        if expired:
            res |= {
                "ns_per_expiry_kernel": kernel_ns / expired,
                "expiries_per_s_kernel": expired / (kernel_ns / 1e9),
                "ns_per_expiry_wall": wall_ns / expired,
                "expiries_per_s_wall": expired / (wall_ns / 1e9),
            }
        return res
    finally:
        ring.close()
        dp.close()


# ---- report -------------------------------------------------------------------

LABELS = {
    "bare": "bare XDP_PASS",
    "hit4": "hit, TCP/IPv4, original dir",
    "hit4_reply": "hit, TCP/IPv4, reply dir",
    "hit6": "hit, TCP/IPv6, original dir",
    "create4": "create, UDP/IPv4",
    "create6": "create, UDP/IPv6",
}


def table(res: dict) -> str:
    pp = res["packet_path"]
    lines = []
    m = res["machine"]
    lines.append(f"ctstream datapath benchmark: kernel {m['kernel']}, {m['cpus']} CPUs "
                 f"({m['cpu_model']}), pinned to CPU {m['pinned_cpu']}, "
                 f"load average at start {m['loadavg']}")
    lines.append("ns per packet as BPF_PROG_TEST_RUN reports it (mean duration per run, "
                 f"measured in the kernel); {res['params']['rounds']} rounds, median and min over rounds")
    hdr = f"{'case':30} {'bytes':>5} {'repeat':>9} {'median':>8} {'min':>8} {'x bare':>7} {'- bare':>7}"

    def rows(group: dict, repeat: str, note: str):
        lines.append("")
        lines.append(note)
        lines.append(hdr)
        base = group["bare"]["median"]
        for k, v in group.items():
            lines.append(f"{LABELS[k]:30} {pp['packets'][k]:>5} {repeat:>9} {v['median']:>8.0f} "
                         f"{v['min']:>8.0f} {v['median'] / base:>7.2f} {v['median'] - base:>7.0f}")

    rows(pp["batched"], str(res["params"]["repeat"]),
         f"same packet, repeat={res['params']['repeat']} runs in one syscall:")
    rows(pp["per_call"], "1",
         f"one packet per syscall (repeat=1), median over {res['params']['calls']} calls per round "
         "(create: a new flow each call):")
    lines.append("")
    lines.append("wall clock of one test-run syscall of a bare program (Python call included), "
                 "median of 9:")
    for w in pp["syscall_wall"]:
        lines.append(f"  {w['prog']:3} repeat={w['repeat']:<5} wall {w['wall_us']:>9.1f} us   "
                     f"(kernel-reported run time {w['kernel_us']:.1f} us)")
    sw = res.get("sweeper")
    if sw:
        lines.append("")
        lines.append(f"sweeper (ct_sweep4, budget {sw['budget_per_run']} records/run, "
                     f"repeat {sw['repeat_per_call']}/syscall): {sw['expired']} of {sw['flows']} "
                     f"UDP flows expired in {sw['calls']} syscalls, {sw['runs']} runs")
        if sw["expired"]:
            lines.append(f"  kernel time {sw['kernel_ms']:.1f} ms: {sw['ns_per_expiry_kernel']:.0f} ns "
                         f"per expiry, {sw['expiries_per_s_kernel'] / 1e6:.2f} M expiries/s")
            lines.append(f"  wall time of the syscalls {sw['wall_ms']:.1f} ms: "
                         f"{sw['ns_per_expiry_wall']:.0f} ns per expiry, "
                         f"{sw['expiries_per_s_wall'] / 1e6:.2f} M expiries/s; "
                         f"ring drained between syscalls ({sw['drain_ms']:.0f} ms in Python)")
        lines.append(f"  ring_full {sw['ring_full']}, DESTROY events read {sw['destroy_events_read']}, "
                     f"records swept {sw['swept_records']}, rescheduled {sw['rescheduled']}, "
                     f"entries left {sw['entries_left']}")
    lines.append("")
    if res["problems"]:
        lines.append("PROBLEMS:")
        lines += [f"  {x}" for x in res["problems"]]
    else:
        lines.append("checks: every case moved the datapath counters as expected "
                     "(hit: no creates; create: one per packet; no invalid/untracked/table_full)")
    lines.append(f"total time {res['elapsed_s']:.0f} s; command: {res['command']}")
    return "\n".join(lines)


def machine(cpu: int | None) -> dict:
    model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"kernel": os.uname().release, "cpus": os.cpu_count(), "cpu_model": model,
            "pinned_cpu": cpu if cpu is not None else "none",
            "loadavg": Path("/proc/loadavg").read_text().split()[0]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer rounds and packets (about 20 s)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    ap.add_argument("--rounds", type=int, help="rounds of every measurement (default 5)")
    ap.add_argument("--repeat", type=int, help="runs per syscall of the batched cases (1000000)")
    ap.add_argument("--calls", type=int, help="one-packet syscalls per case and round (20000)")
    ap.add_argument("--sweep-flows", type=int, help="flows for the sweeper to expire (100000); 0 = skip")
    ap.add_argument("--cpu", type=int, default=-2,
                    help="CPU to pin the bench to (default: the last one allowed; -1: no pinning)")
    args = ap.parse_args(argv)
    p = dict(QUICK if args.quick else FULL)
    for k in ("rounds", "repeat", "calls", "sweep_flows"):
        if getattr(args, k) is not None:
            p[k] = getattr(args, k)
    if p["rounds"] < 1 or p["repeat"] < 1 or p["calls"] < 1 or p["sweep_flows"] < 0:
        ap.error("rounds, repeat and calls must be positive")
    if p["sweep_flows"] > 1 << 17:
        ap.error("at most 131072 sweeper flows (the IPv4 benchmarking range)")
    if os.geteuid() != 0:
        log("bench needs root (BPF_PROG_TEST_RUN, bpffs): run it with sudo")
        return 2

    cpu = None
    if args.cpu != -1:
        allowed = sorted(os.sched_getaffinity(0))
        cpu = allowed[-1] if args.cpu == -2 else args.cpu
        os.sched_setaffinity(0, {cpu})

    start = time.monotonic()
    deadline = start + TIME_LIMIT_S
    checks = Checks()
    pins = [f"/sys/fs/bpf/ctsbench_{os.getpid()}", f"/sys/fs/bpf/ctsbench_{os.getpid()}_sweep"]
    res = {"params": p, "machine": machine(cpu),
           "command": " ".join(["sudo", ".venv/bin/python", "bench/run.py"] + sys.argv[1:])}
    try:
        log(f"packet path: {p['rounds']} rounds, repeat={p['repeat']}, {p['calls']} calls per case")
        res["packet_path"] = bench_packet_path(p, checks, pins[0])
        if p["sweep_flows"]:
            log(f"sweeper: {p['sweep_flows']} UDP flows, udp timeout 1 s")
            res["sweeper"] = bench_sweeper(p, checks, pins[1], deadline)
    finally:
        for pin in pins:
            shutil.rmtree(pin, ignore_errors=True)
    res["elapsed_s"] = round(time.monotonic() - start, 1)
    res["problems"] = checks.problems
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(table(res))
    return 1 if checks.problems else 0


if __name__ == "__main__":
    sys.exit(main())
