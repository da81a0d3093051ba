"""ctstream SYN cookie benchmark: one spoofed SYN flood, three defences, side
by side.

Every (variant, round) gets a fresh namespace pair from the test bed
(`streamer.demo.testbed.make_pair`, 198.18.49.0/24) with an echo server
listening on port 5160 in the server namespace, the pass-through XDP program
of tests/netns/test_syn_cookies.py on the client's veth (veth hands XDP_TX
frames to its peer promptly only while the peer has an XDP program; every
variant gets it, so the client's side is the same for all), and a route in
the server namespace for the spoofed sources through the client (see
below). Variants, their order rotated every round:

  nocookie  ctstream (an in-process Session, XDP ingress + tc egress on the
            server's veth) with syn_cookies="off": every SYN makes an
            unassured entry and a NEW event; table_limit 262,144, early drop
            at its defaults (90 % / 80 %), the event mask of `ctstream run`
            (new, assured, destroy). The kernel's TCP behind it keeps its
            defaults (tcp_syncookies=1: cookies once the listen queue is
            full).
  cookie    the same with syn_cookies="on": XDP answers each SYN with a
            cookie SYN-ACK (XDP_TX) and creates nothing; the daemon sets
            tcp_syncookies=2 and tcp_timestamps=2 in the namespace.
  kernel    no ctstream: the kernel's own SYN cookies for every SYN
            (tcp_syncookies=2, the fair comparison) and nf_conntrack
            tracking the namespace (the test bed's ruleset, the global
            nf_conntrack_max, 262,144 here, counted per namespace).

One round of a variant: 5 warm-up connections (the cookie path works; XDP
hands each listener's first SYN to the kernel), an idle baseline of the
machine's busy CPU with everything running but no flood, then hping3
--flood --rand-source -S to the port for a fixed time (timeout -s INT, and
-c as a count bound). During the flood a client in the client namespace
makes up to 200 sequential connections from its own address, paced across
the flood: connect() timed (timeout 3 s), a few bytes echoed; success =
connected and echoed.

Measured per sample:
  - SYN rate: packets the server's veth received over the flood (hping3's
    own count and the client veth's drops are kept in the JSON); answered:
    packets the server's veth sent back (SYN-ACKs, XDP_TX or the stack's);
  - flood entries: ctstream `created` minus the successful legitimate
    connections; kernel: the namespace's conntrack count grew by, plus its
    early drops (nothing expires in a flood this short), minus the same;
  - flood events: events the Session delivered whose source is not the
    client's address, from the flood's start to 1 s after its end (kernel:
    n/a). Entries still in the table emit their DESTROY later, not counted;
  - CPU per SYN: the machine's busy time from /proc/stat (user + nice +
    system + irq + softirq; steal and idle excluded) over the flood minus
    the idle baseline's rate times its length, per SYN received. hping3 runs
    on the same machine (2 vCPUs here) and saturates it, so this figure
    includes hping3's own sending and the client's discarding of the
    SYN-ACKs; the softirq share alone (where XDP and the kernel's SYN
    handling run, with the client's receive of the SYN-ACKs) is shown
    beside it. The kernel has no IRQ time accounting here
    (CONFIG_IRQ_TIME_ACCOUNTING off): /proc/stat samples ticks;
  - daemon CPU: this process's CPU time (the Session's threads) over the
    flood, in cores.

Why the route: without one, the server's kernel drops each spoofed SYN at
its route lookup before it makes a cookie (IpOutNoRoutes), so the kernel
variant would answer nothing and look cheap; XDP_TX needs no route. The
route (default via the client's address) leads only into the client
namespace, which forwards nothing. `--no-route` measures without it.

Medians and min..max over rounds. The table goes to stdout, progress to
stderr, every sample to bench/results/syncookies-<timestamp>.json. Run as
root; see bench/README.md ("SYN cookies").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import json
import logging
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PIN_PREFIX = "ctsbsyn_"        # pin dirs: /sys/fs/bpf/ctsbsyn_<bench pid>_<name>
NS_PREFIX = "ctsbsyn"
PAIR_INDEX = 49                # 198.18.49.0/24, 2001:2:0:31::/64
PORT = 5160
TABLE_LIMIT = 262_144
VARIANTS = ("nocookie", "cookie", "kernel")
FLOOD_PPS_BOUND = 600_000      # hping3 -c: at most this many SYNs per second of flood
CONNECT_TIMEOUT_S = 3.0
LEAD_S = 1.0                   # the flood runs alone this long before the client starts
SETTLE_S = 1.0                 # after the flood: events still in the ring arrive
WARMUP = 5

FULL = dict(rounds=5, flood_s=10.0, baseline_s=3.0, legit=200, time_limit=480)
QUICK = dict(rounds=3, flood_s=4.0, baseline_s=1.5, legit=100, time_limit=170)
STATE_SUFFIXES = (".json", ".lock", ".ctl", ".status.json", ".sysctl.json")

# count sequential connections to host:port, paced `gap` s apart, none started
# after `budget` s; each: connect() timed, MSG sent, its echo read back.
# One JSON line: [ok, ms, error] per attempt.
CLIENT = r"""
import json, socket, sys, time
host, port, count, gap, budget, ctimeout = (sys.argv[1], int(sys.argv[2]), int(sys.argv[3]),
                                            float(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6]))
MSG = b"ctstream syn cookie bench"
start = time.monotonic()
out = []
for i in range(count):
    due = start + i * gap
    now = time.monotonic()
    if due > now:
        time.sleep(due - now)
    if time.monotonic() - start > budget:
        break
    c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    c.settimeout(ctimeout)
    t = time.perf_counter()
    ms = None
    try:
        c.connect((host, port))
        ms = (time.perf_counter() - t) * 1000
        c.sendall(MSG)
        got = b""
        while len(got) < len(MSG):
            b = c.recv(len(MSG) - len(got))
            if not b:
                raise OSError("closed before the echo")
            got += b
        if got != MSG:
            raise OSError("echo differs")
        out.append([1, ms, ""])
    except OSError as exc:
        out.append([0, ms if ms is not None else (time.perf_counter() - t) * 1000, repr(exc)])
    finally:
        c.close()
print(json.dumps({"planned": count, "samples": out}))
"""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- measuring helpers ------------------------------------------------------------

def cpu_times() -> dict:
    """The machine's CPU time in seconds from /proc/stat's first line."""
    hz = os.sysconf("SC_CLK_TCK")
    f = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    v = [int(x) / hz for x in f[:8]]
    user, nice, system, idle, iowait, irq, softirq, steal = v
    return {"busy": user + nice + system + irq + softirq, "softirq": softirq,
            "idle": idle + iowait, "steal": steal, "user": user, "system": system}


def cpu_delta(a: dict, b: dict) -> dict:
    return {k: b[k] - a[k] for k in a}


def self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def veth_stats(host) -> dict:
    """rx/tx packets and drops of host's veth (ip -s -j link)."""
    out = host.run(["ip", "-s", "-j", "link", "show", "dev", host.ifname], timeout=10).stdout
    st = json.loads(out)[0]["stats64"]
    return {"rx": st["rx"]["packets"], "rx_dropped": st["rx"]["dropped"],
            "tx": st["tx"]["packets"], "tx_dropped": st["tx"]["dropped"]}


def snmp(host) -> dict:
    """The namespace's TCP and TcpExt counters (/proc/net/snmp, /proc/net/netstat)
    read from inside it; nstat's history file is per user, not per namespace."""
    out = host.run(["cat", "/proc/net/snmp", "/proc/net/netstat"], timeout=10).stdout
    res: dict[str, int] = {}
    lines = out.splitlines()
    for names, values in zip(lines[::2], lines[1::2]):
        kind, _, keys = names.partition(":")
        kind2, _sep, vals = values.partition(":")
        if kind != kind2 or kind not in ("Tcp", "TcpExt", "Ip"):
            continue
        for k, v in zip(keys.split(), vals.split()):
            with contextlib.suppress(ValueError):
                res[f"{kind}{k}"] = int(v)
    return res


def conntrack_state(host) -> dict:
    """The namespace's conntrack entry count and its per-CPU statistics summed."""
    count = int(host.run(["conntrack", "-C"], timeout=15).stdout.split()[0])
    stats: dict[str, int] = {}
    for line in host.run(["conntrack", "-S"], timeout=15).stdout.splitlines():
        for k, v in re.findall(r"(\w+)=(\d+)", line):
            if k != "cpu":
                stats[k] = stats.get(k, 0) + int(v)
    return {"count": count, **stats}


def delta(a: dict, b: dict) -> dict:
    return {k: b.get(k, 0) - a.get(k, 0) for k in sorted(set(a) | set(b))
            if isinstance(b.get(k, 0), int) and b.get(k, 0) != a.get(k, 0)}


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))]


def spread(xs: list[float]) -> dict | None:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


class EventCount:
    """The Session's event callback: counts, keeps nothing (a flood without
    cookies delivers millions of events)."""

    def __init__(self, legit: set[str]):
        self.legit_addrs = legit
        self.legit = 0
        self.flood = 0

    def __call__(self, ev) -> None:
        if ev.src in self.legit_addrs:
            self.legit += 1
        else:
            self.flood += 1


def remove_pin_dir(pin: str) -> None:
    """The pin dir and the daemon's state files beside it in /run/ctstream."""
    from streamer.datapath.loader import STATE_DIR

    shutil.rmtree(pin, ignore_errors=True)
    stem = pin.strip("/").replace("/", "_")
    for suffix in STATE_SUFFIXES:
        with contextlib.suppress(OSError):
            os.unlink(Path(STATE_DIR) / (stem + suffix))


def cleanup_stale() -> None:
    """Pin dirs of a bench process that is gone (namespaces: make_pair does it)."""
    from streamer.demo.testbed import pid_alive

    for path in glob.glob(f"/sys/fs/bpf/{PIN_PREFIX}*"):
        m = re.match(rf"/sys/fs/bpf/{PIN_PREFIX}(\d+)_", path)
        if m and not pid_alive(int(m.group(1))):
            log(f"removing stale pin dir {path}")
            remove_pin_dir(path)


# ---- one (variant, round) ---------------------------------------------------------

class Bench:
    def __init__(self, a, p: dict):
        self.a = a
        self.p = p
        self.pid = os.getpid()
        self.serial = 0
        self.problems: list[str] = []
        self.truncated: list[str] = []

    def pin(self) -> str:
        self.serial += 1
        return f"/sys/fs/bpf/{PIN_PREFIX}{self.pid}_{self.serial}"

    async def legit(self, pair, count: int, gap: float, budget: float) -> dict:
        p = pair.client.python(CLIENT, pair.server.addr(4), PORT, count, gap, budget,
                               CONNECT_TIMEOUT_S)
        limit = budget + 2 * CONNECT_TIMEOUT_S + 15
        try:
            out, err = await asyncio.to_thread(p.communicate, timeout=limit)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
        if p.returncode != 0:
            raise RuntimeError(f"legitimate client exited {p.returncode}: "
                               f"{err.decode(errors='replace')[-500:]}")
        return json.loads(out.decode().strip().splitlines()[-1])

    async def flood_wait(self, flood: subprocess.Popen, limit: float) -> tuple[int, float]:
        """Reap hping3's `timeout` (os.wait4: the CPU of it and of hping3, which
        it waited for); returns (exit code, CPU seconds)."""
        deadline = time.monotonic() + limit
        while True:
            pid, status, ru = os.wait4(flood.pid, os.WNOHANG)
            if pid:
                flood.returncode = os.waitstatus_to_exitcode(status)
                return flood.returncode, ru.ru_utime + ru.ru_stime
            if time.monotonic() > deadline:
                flood.kill()
                _, status, ru = os.wait4(flood.pid, 0)
                flood.returncode = os.waitstatus_to_exitcode(status)
                raise RuntimeError(f"hping3 still running {limit:.0f} s after its start")
            await asyncio.sleep(0.02)

    async def run_one(self, variant: str, rnd: int) -> dict:
        from streamer.daemon import Session, Target
        from streamer.datapath.config import RUN_EVENT_MASK, DatapathConfig
        from streamer.demo import testbed
        from tests.netns.test_syn_cookies import SERVER, xdp_pass_on

        pin = self.pin()
        res: dict = {"variant": variant, "round": rnd, "pin_dir": pin}
        t_start = time.monotonic()
        try:
            with testbed.make_pair(prefix=NS_PREFIX, offloads=False,
                                   conntrack=(variant == "kernel"), index=PAIR_INDEX) as pair:
                cli, srv_host = pair.client, pair.server
                xdp_pass_on(cli)
                if not self.a.no_route:
                    srv_host.run(["ip", "route", "add", "default", "via", cli.addr(4)])
                if variant == "kernel":
                    srv_host.run(["sysctl", "-qw", "net.ipv4.tcp_syncookies=2"])
                srv = srv_host.python(SERVER, PORT)
                srv_host.wait_listening("tcp", PORT, timeout=10, proc=srv)
                count = EventCount({cli.addr(4), cli.addr(6)})
                async with contextlib.AsyncExitStack() as stack:
                    sess = None
                    if variant != "kernel":
                        cfg = DatapathConfig(pin_dir=pin, table_limit=TABLE_LIMIT,
                                             event_mask=RUN_EVENT_MASK,
                                             syn_cookies="on" if variant == "cookie" else "off")
                        target = Target([srv_host.ifname], netns=srv_host.netns, egress=True)
                        sess = await stack.enter_async_context(
                            Session(cfg, target, count, lost_interval=0))
                    res["setup_s"] = round(time.monotonic() - t_start, 2)
                    await self.measure(pair, sess, count, res)
        finally:
            remove_pin_dir(pin)
        res["wall_s"] = round(time.monotonic() - t_start, 2)
        return res

    async def measure(self, pair, sess, count: EventCount, res: dict) -> None:
        p = self.p
        cli, srv = pair.client, pair.server
        variant = res["variant"]
        sysctls = ["sysctl", "-n", "net.ipv4.tcp_syncookies", "net.ipv4.tcp_timestamps"]
        res["server_sysctls"] = srv.run(sysctls).stdout.split()

        warm = await self.legit(pair, WARMUP, 0.0, 30.0)
        bad = [s for s in warm["samples"] if not s[0]]
        if bad or len(warm["samples"]) != WARMUP:
            raise RuntimeError(f"{variant}: warm-up connections failed: {bad[:3]}")

        # Idle baseline: everything running, no flood.
        c0, t0 = cpu_times(), time.monotonic()
        await asyncio.sleep(p["baseline_s"])
        c1, t1 = cpu_times(), time.monotonic()
        base = cpu_delta(c0, c1)
        base_t = t1 - t0
        res["baseline"] = {"seconds": round(base_t, 3), **{k: round(v, 3) for k, v in base.items()}}

        # Before the flood.
        before = {"srv_veth": veth_stats(srv), "cli_veth": veth_stats(cli), "snmp": snmp(srv)}
        if sess is not None:
            before["counters"] = sess.counters()
        else:
            before["conntrack"] = conntrack_state(srv)
        ev0 = (count.legit, count.flood)
        flood_s = p["flood_s"]
        bound = int(FLOOD_PPS_BOUND * flood_s)
        argv = ["timeout", "-s", "INT", f"{flood_s:g}", "hping3", "-q", "-S", "-p", str(PORT),
                "--rand-source", "--flood", "-c", str(bound), srv.addr(4)]
        self_0 = self_cpu()
        cpu_0 = cpu_times()
        t0 = time.monotonic()
        flood = cli.popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            await asyncio.sleep(LEAD_S)
            budget = max(0.5, flood_s - LEAD_S - 1.0)
            client = asyncio.create_task(
                self.legit(pair, p["legit"], budget / p["legit"], budget))
            try:
                rc, flood_cpu = await self.flood_wait(flood, flood_s + 15)
                t1 = time.monotonic()
                cpu_1 = cpu_times()
                self_1 = self_cpu()
            finally:
                legit = await client
        finally:
            if flood.poll() is None:
                flood.kill()
                with contextlib.suppress(ChildProcessError, subprocess.TimeoutExpired):
                    flood.wait(timeout=10)
        err = flood.stderr.read().decode(errors="replace") if flood.stderr else ""
        m = re.search(r"(\d+) packets transmitted", err)
        after = {"srv_veth": veth_stats(srv), "cli_veth": veth_stats(cli), "snmp": snmp(srv)}
        res["server_sysctls_during"] = srv.run(sysctls).stdout.split()
        await asyncio.sleep(SETTLE_S)
        if sess is not None:
            after["counters"] = sess.counters()
        else:
            after["conntrack"] = conntrack_state(srv)
        ev1 = (count.legit, count.flood)

        T = t1 - t0
        cpu = cpu_delta(cpu_0, cpu_1)
        srv_v = delta(before["srv_veth"], after["srv_veth"])
        cli_v = delta(before["cli_veth"], after["cli_veth"])
        syns = srv_v.get("rx", 0)
        samples = legit["samples"]
        ok = [s[1] for s in samples if s[0]]
        res.update({
            "flood_seconds": round(T, 3), "hping3_rc": rc, "hping3_cpu_s": round(flood_cpu, 3),
            "hping3_sent": int(m.group(1)) if m else None, "hping3_count_bound": bound,
            "server_veth": srv_v, "client_veth": cli_v,
            "server_snmp": delta(before["snmp"], after["snmp"]),
            "cpu": {k: round(v, 3) for k, v in cpu.items()},
            "daemon_cpu_s": round(self_1 - self_0, 3),
            "legit": {"planned": legit["planned"], "attempted": len(samples), "ok": len(ok),
                      "ok_connect_ms": [round(ms, 3) for ms in ok],
                      "failed_ms": [round(s[1], 3) for s in samples if not s[0]],
                      "errors": sorted({s[2] for s in samples if not s[0]})[:10]},
            "events_window": {"legit": ev1[0] - ev0[0], "flood": ev1[1] - ev0[1]},
        })
        res["syn_rate"] = syns / T if T > 0 else None
        res["answered_pct"] = 100.0 * srv_v.get("tx", 0) / syns if syns else None
        busy = cpu["busy"] - base["busy"] / base_t * T
        soft = cpu["softirq"] - base["softirq"] / base_t * T
        res["cpu_ns_per_syn"] = busy * 1e9 / syns if syns else None
        res["softirq_ns_per_syn"] = soft * 1e9 / syns if syns else None
        res["busy_cores"] = cpu["busy"] / T
        res["baseline_cores"] = base["busy"] / base_t
        res["daemon_cores"] = (self_1 - self_0) / T
        res["legit_ok_pct"] = 100.0 * len(ok) / len(samples) if samples else None
        res["connect_p50_ms"] = statistics.median(ok) if ok else None
        res["connect_p99_ms"] = pct(ok, 0.99) if ok else None
        res["connect_max_ms"] = max(ok) if ok else None
        if sess is not None:
            d = delta(before["counters"], after["counters"])
            res["counters"] = d
            res["entries_after"] = after["counters"]["entries"]
            res["flood_entries"] = max(0, d.get("created", 0) - len(ok))
            res["flood_events"] = ev1[1] - ev0[1]
            res["answered_by_cookie"] = d.get("syn_cookies_sent", 0)
        else:
            ct0, ct1 = before["conntrack"], after["conntrack"]
            res["conntrack"] = {"before": ct0, "after": ct1}
            res["flood_entries"] = max(0, ct1["count"] - ct0["count"]
                                       + ct1.get("early_drop", 0) - ct0.get("early_drop", 0)
                                       - len(ok))
            res["flood_events"] = None
            res["answered_by_cookie"] = res["server_snmp"].get("TcpExtSyncookiesSent", 0)
        self.check(res)

    def check(self, r: dict) -> None:
        v, n = r["variant"], r["round"]
        probs = []
        if r["hping3_rc"] not in (0, 124):
            probs.append(f"hping3 (timeout) exited {r['hping3_rc']}")
        if not r["server_veth"].get("rx"):
            probs.append("the server received nothing")
        want = {"cookie": ["2", "2"], "kernel": ["2"]}.get(v)
        if want and r["server_sysctls_during"][:len(want)] != want:
            probs.append(f"server sysctls during the flood {r['server_sysctls_during']}, "
                         f"expected {want}")
        if v == "cookie" and r["counters"].get("syn_cookie_errors"):
            probs.append(f"syn_cookie_errors {r['counters']['syn_cookie_errors']}")
        self.problems += [f"{v} round {n}: {x}" for x in probs]

    async def run(self, deadline: float) -> list[dict]:
        rounds: list[dict] = []
        for r in range(self.p["rounds"]):
            if rounds:
                per_round = max(sum(s["wall_s"] for s in rr.values()) for rr in rounds)
                if time.monotonic() + per_round > deadline:
                    self.truncated.append(f"{len(rounds)} of {self.p['rounds']} rounds "
                                          "(time limit)")
                    break
            order = list(VARIANTS[r % 3:] + VARIANTS[:r % 3])
            log(f"round {r + 1}/{self.p['rounds']}: {', '.join(order)}")
            rr: dict = {}
            for v in order:
                s = await self.run_one(v, r + 1)
                rr[v] = s
                log(f"  {v:8} {s['syn_rate'] / 1000:6.1f}k SYN/s, answered "
                    f"{s['answered_pct']:5.1f} %, flood entries {s['flood_entries']}, "
                    f"events {s['flood_events'] if s['flood_events'] is not None else 'n/a'}, "
                    f"legit {s['legit']['ok']}/{s['legit']['attempted']}, connect p50 "
                    f"{_f(s['connect_p50_ms'], '{:.2f}')} p99 {_f(s['connect_p99_ms'], '{:.1f}')} "
                    f"ms, {_f(s['cpu_ns_per_syn'], '{:.0f}')} ns/SYN (softirq "
                    f"{_f(s['softirq_ns_per_syn'], '{:.0f}')}), daemon "
                    f"{s['daemon_cores']:.2f} cores ({s['wall_s']:.0f} s)")
            rounds.append(rr)
        return rounds


def _f(x, fmt: str) -> str:
    return "-" if x is None else fmt.format(x)


# ---- summary and table ------------------------------------------------------------

METRICS = ("syn_rate", "answered_pct", "flood_entries", "flood_events", "legit_ok_pct",
           "connect_p50_ms", "connect_p99_ms", "connect_max_ms", "cpu_ns_per_syn",
           "softirq_ns_per_syn", "daemon_cores", "busy_cores", "baseline_cores")


def summarize(rounds: list[dict]) -> dict:
    out: dict = {}
    for v in VARIANTS:
        per = [rr[v] for rr in rounds if v in rr]
        if not per:
            continue
        row = {k: spread([s.get(k) for s in per]) for k in METRICS}
        pooled = [ms for s in per for ms in s["legit"]["ok_connect_ms"]]
        row["legit_pooled"] = {"planned": sum(s["legit"]["planned"] for s in per),
                               "attempted": sum(s["legit"]["attempted"] for s in per),
                               "ok": sum(s["legit"]["ok"] for s in per),
                               "connect_p50_ms": statistics.median(pooled) if pooled else None,
                               "connect_p99_ms": pct(pooled, 0.99) if pooled else None}
        row["rounds"] = len(per)
        out[v] = row
    # The cookie variant against the kernel's cookies, paired by round.
    pairs = [(rr["cookie"], rr["kernel"]) for rr in rounds if "cookie" in rr and "kernel" in rr]
    for name in ("cpu_ns_per_syn", "softirq_ns_per_syn"):
        ratios = [c[name] / k[name] for c, k in pairs if c.get(name) and k.get(name)]
        out.setdefault("cookie_vs_kernel", {})[name] = spread(ratios)
        out["cookie_vs_kernel"][name + "_rounds_below"] = sum(1 for x in ratios if x < 1)
    return out


def _k(x: float) -> str:
    """Counts and rates: 0, 873, 12.3k, 213k."""
    if abs(x) < 10_000:
        return f"{x:.0f}"
    return f"{x / 1000:.1f}k" if abs(x) < 100_000 else f"{x / 1000:.0f}k"


def _mm(d: dict | None, fmt="{:.0f}") -> str:
    if d is None:
        return "n/a"
    f = fmt if callable(fmt) else fmt.format
    return f"{f(d['median'])} ({f(d['min'])}-{f(d['max'])})"


def table(res: dict) -> str:
    s, m, p = res["summary"], res["machine"], res["params"]
    L = []
    L.append(f"ctstream SYN cookie benchmark: kernel {m['kernel']}, {m['cpus']} CPUs "
             f"({m['cpu_model']}), load average {m['loadavg_start']} at the start, "
             f"{m['loadavg_end']} at the end")
    L.append(f"hping3 --flood --rand-source -S to a listening port, IPv4, {p['flood_s']:g} s per "
             f"sample; {res['rounds_done']} rounds, variants rotated; a fresh namespace pair per "
             f"sample; route for the spoofed sources: {'no' if p['no_route'] else 'yes'}")
    L.append(f"median (min-max) over rounds; legit: up to {p['legit']} sequential IPv4 "
             f"connections paced across the flood, connect timeout {CONNECT_TIMEOUT_S:g} s")
    L.append("")
    hdr = (f"{'variant':9} {'SYN/s':>17} {'answered %':>17} {'flood entries':>17} "
           f"{'flood events':>17} {'CPU ns/SYN':>18} {'softirq ns/SYN':>17} "
           f"{'busy cores':>17} {'daemon cores':>17}")
    L.append(hdr)
    for v in VARIANTS:
        row = s.get(v)
        if row is None:
            continue
        L.append(" ".join([
            f"{v:9}", f"{_mm(row['syn_rate'], _k):>17}",
            f"{_mm(row['answered_pct'], '{:.1f}'):>17}",
            f"{_mm(row['flood_entries'], _k):>17}", f"{_mm(row['flood_events'], _k):>17}",
            f"{_mm(row['cpu_ns_per_syn']):>18}", f"{_mm(row['softirq_ns_per_syn']):>17}",
            f"{_mm(row['busy_cores'], '{:.2f}'):>17}",
            f"{_mm(row['daemon_cores'], '{:.2f}'):>17}"]))
    L.append("")
    L.append(f"{'variant':9} {'legit ok %':>19} {'ok/attempted/planned':>21} "
             f"{'connect p50 ms':>20} {'connect p99 ms':>22} {'connect max ms':>22} "
             f"{'all rounds p50/p99':>19}")
    for v in VARIANTS:
        row = s.get(v)
        if row is None:
            continue
        lp = row["legit_pooled"]
        L.append(" ".join([
            f"{v:9}", f"{_mm(row['legit_ok_pct'], '{:.1f}'):>19}",
            f"{lp['ok']}/{lp['attempted']}/{lp['planned']}".rjust(21),
            f"{_mm(row['connect_p50_ms'], '{:.2f}'):>20}",
            f"{_mm(row['connect_p99_ms'], '{:.1f}'):>22}",
            f"{_mm(row['connect_max_ms'], '{:.1f}'):>22}",
            f"{_f(lp['connect_p50_ms'], '{:.2f}')}/{_f(lp['connect_p99_ms'], '{:.1f}')}".rjust(19)]))
    L.append("")
    L.append("SYN/s: SYNs the server's veth received; answered: packets it sent back (SYN-ACKs). "
             "flood entries: ctstream created minus the legitimate connections (kernel: "
             "nf_conntrack's count growth + early drops, minus them); flood events: events "
             "delivered to the Session not from the client's address, flood start to 1 s after "
             "(kernel: n/a)")
    bases = [s[v]["baseline_cores"] for v in VARIANTS if v in s]
    base_s = (f"{min(b['min'] for b in bases):.2f}-{max(b['max'] for b in bases):.2f}"
              if bases else "?")
    L.append(f"CPU ns/SYN: the whole machine's busy time (/proc/stat user+nice+system+irq+softirq, "
             f"no steal) over the flood minus the idle baseline ({p['baseline_s']:g} s before "
             f"it, {base_s} cores), per SYN received. THE CLIENT (hping3) RUNS ON THE SAME "
             f"{m['cpus']}-CPU MACHINE: the figure includes its sending and the client's discard "
             "of each SYN-ACK (the same work in every variant); the server's handling of a SYN "
             "mostly runs in softirq on hping3's CPU, so it slows hping3 down. softirq ns/SYN: "
             "that share alone (XDP, the kernel's SYN path, the client's receive). busy cores: "
             f"the machine during the flood (of {m['cpus']}); daemon cores: the Session's "
             "threads (this process)")
    cvk = s.get("cookie_vs_kernel", {})
    c, k = s.get("cookie"), s.get("kernel")
    if c and k:
        L.append("")
        L.append("target (issue): cookie creates 0 entries and 0 events from the flood, keeps "
                 "100 % of legitimate connections, costs less CPU per SYN than kernel")
        fe, fv = c["flood_entries"], c["flood_events"]
        L.append(f"  flood entries 0:     {'met' if fe['max'] == 0 else 'NOT met'} "
                 f"(max {fe['max']:.0f} over {fe['n']} rounds)")
        L.append(f"  flood events 0:      {'met' if fv['max'] == 0 else 'NOT met'} "
                 f"(max {fv['max']:.0f})")

        def okof(row: dict | None) -> str:
            if row is None:
                return "?"
            lp = row["legit_pooled"]
            return f"{lp['ok']}/{lp['attempted']} of {lp['planned']} planned"
        lp = c["legit_pooled"]
        met = lp["ok"] == lp["attempted"] == lp["planned"]
        L.append(f"  legitimate 100 %:    {'met' if met else 'NOT met'} ({okof(c)}; kernel "
                 f"{okof(k)}, nocookie {okof(s.get('nocookie'))})")
        for name, label in (("cpu_ns_per_syn", "CPU/SYN < kernel:  "),
                            ("softirq_ns_per_syn", "softirq/SYN < kernel:")):
            r = cvk.get(name)
            if r:
                below = cvk[name + "_rounds_below"]
                verdict = "met" if below == r["n"] else ("NOT met" if below == 0 else "mixed")
                L.append(f"  {label} {verdict}: cookie/kernel {_mm(r, '{:.2f}')} paired by "
                         f"round, below in {below} of {r['n']}")
    L.append("")
    if res["problems"]:
        L.append("PROBLEMS:")
        L += [f"  {x}" for x in res["problems"]]
    for t in res["truncated"]:
        L.append(f"TRUNCATED: {t}")
    L.append(f"total time {res['elapsed_s']:.0f} s; command: {res['command']}")
    return "\n".join(L)


def machine() -> dict:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    hping = subprocess.run(["hping3", "--version"], capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, timeout=10)
    return {"kernel": os.uname().release, "cpus": os.cpu_count(), "cpu_model": model,
            "clk_tck": os.sysconf("SC_CLK_TCK"),
            "hping3": (hping.stdout or hping.stderr).strip().splitlines()[:1],
            "loadavg_start": Path("/proc/loadavg").read_text().split()[0]}


async def amain(b: Bench, deadline: float) -> list[dict]:
    """The rounds; SIGTERM cancels them like Ctrl-C, so every cleanup runs."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await b.run(deadline)
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="3 rounds of 4 s floods, 100 connections (about 2 min; full: 6 min)")
    ap.add_argument("--rounds", type=int, help="rounds, each of all three variants (5; quick 3)")
    ap.add_argument("--flood-seconds", type=float, help="flood per sample (10; quick 4)")
    ap.add_argument("--legit", type=int, help="legitimate connections per sample (200; quick 100)")
    ap.add_argument("--no-route", action="store_true",
                    help="no route for the spoofed sources in the server namespace (the kernel "
                         "then drops their SYNs at its route lookup, unanswered)")
    ap.add_argument("--time-limit", type=float, help="seconds (480; quick 170): past it, no "
                    "further round starts; the bench reports what it has and exits 1")
    ap.add_argument("--out", help="the JSON file (default bench/results/syncookies-<timestamp>.json)")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        log("bench needs root (network namespaces, XDP, bpffs): run it with sudo")
        return 2
    for tool in ("hping3", "conntrack", "nft", "ethtool"):
        if shutil.which(tool) is None:
            log(f"{tool} is not installed (scripts/setup.sh installs it)")
            return 2
    p = dict(QUICK if a.quick else FULL)
    for k, v in (("rounds", a.rounds), ("flood_s", a.flood_seconds), ("legit", a.legit),
                 ("time_limit", a.time_limit)):
        if v is not None:
            p[k] = v
    if p["rounds"] < 1 or not 2 <= p["flood_s"] <= 60 or not 1 <= p["legit"] <= 2000:
        ap.error("--rounds must be positive, --flood-seconds in [2, 60], --legit in [1, 2000]")
    p["no_route"] = a.no_route
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")

    start = time.monotonic()
    b = Bench(a, p)
    res: dict = {"params": p, "machine": machine(), "quick": a.quick,
                 "command": " ".join(["sudo", ".venv/bin/python", "bench/syncookie_bench.py"]
                                     + (sys.argv[1:] if argv is None else argv)),
                 "variants": {"nocookie": "ctstream, syn_cookies=off, table 262144, event mask "
                                          "new,assured,destroy",
                              "cookie": "ctstream, syn_cookies=on",
                              "kernel": "no ctstream: tcp_syncookies=2 and nf_conntrack"}}
    rounds: list[dict] = []
    status = 0
    log(f"{p['rounds']} rounds of {', '.join(VARIANTS)}: {p['flood_s']:g} s floods, "
        f"{p['legit']} legitimate connections each")
    try:
        cleanup_stale()
        rounds = asyncio.run(amain(b, start + p["time_limit"]))
    except (KeyboardInterrupt, asyncio.CancelledError) as exc:
        log(f"interrupted ({exc.__class__.__name__}): cleaned up")
        b.problems.append("interrupted")
        status = 130
    except Exception as exc:
        log(f"error: {exc!r}")
        b.problems.append(f"error: {exc!r}")
        status = 1
    finally:
        for path in glob.glob(f"/sys/fs/bpf/{PIN_PREFIX}{b.pid}_*"):
            remove_pin_dir(path)
    res["machine"]["loadavg_end"] = Path("/proc/loadavg").read_text().split()[0]
    res["rounds"] = rounds
    res["rounds_done"] = len(rounds)
    res["problems"] = b.problems
    res["truncated"] = b.truncated
    res["elapsed_s"] = round(time.monotonic() - start, 1)
    if rounds:
        res["summary"] = summarize(rounds)
    out = Path(a.out) if a.out else HERE / "results" / time.strftime("syncookies-%Y%m%d-%H%M%S.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=str) + "\n")
    if "summary" in res:
        print(table(res))
    log(f"JSON: {out}")
    if status:
        return status
    return 1 if (b.problems or b.truncated) else 0


if __name__ == "__main__":
    sys.exit(main())
