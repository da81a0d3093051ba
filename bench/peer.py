"""ctstream beside the kernel's nf_conntrack, on the same traffic, in one run.

    sudo make bench-peer                          # about 10 min
    sudo make bench-peer BENCH_ARGS=--quick       # about 2 min
    sudo .venv/bin/python bench/peer.py --ctstream-hooks native,generic,tc --variants a,b,c

Two namespaces joined by a veth pair (streamer/demo/testbed.py), the tracker
in the server's. Variants, measured round by round with their order rotated
each round:
  a  nothing tracks
  b  nf_conntrack: the test bed's nftables `ct state` ruleset in the server
     namespace (with nf_conntrack_acct=1, so it counts bytes as ctstream does)
  c  ctstream as a user deploys it: `ctstream run -i veth0 --egress` shipping
     to a real local Kafka broker (scripts/kafka.sh), default options
  d  both
Traffic, client -> server, IPv4: TCP bulk (iperf3) with offloads on (the
veth defaults) and off (ethtool -K tso/gso/gro/tx/rx off), UDP 64-byte frames
(iperf3 -u -l 22 -b 0) and short TCP connections (bench/conn_storm.c, built
here with gcc). CPU is the machine's busy time from /proc/stat (user + nice +
system + irq + softirq); the Kafka broker's own (/proc/PID/stat) is reported
and also subtracted.

Then the DESTROY delivery on paced connection storms at rising rates, both
trackers on: conntrack -E with its default buffer, with -b 32 MiB, and with
a buffer that really is 32 MiB (bench/rcvbuf_shim.c says why -b is not), and
ctstream's DESTROY records in Kafka. bench/README.md, "Side by side with
nf_conntrack", says how to read the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import mmap
import os
import platform
import re
import select
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from streamer.daemon import status_path  # noqa: E402
from streamer.datapath.loader import STATE_DIR  # noqa: E402
from streamer.datapath.table import PinnedTable  # noqa: E402
from streamer.delivery import wire  # noqa: E402
from streamer.errors import StreamerError  # noqa: E402
from streamer.demo import testbed  # noqa: E402
from streamer.demo.local_servers import live_pids, read_topic_to_end  # noqa: E402
from streamer.demo.pipeline_demo import DemoBroker  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
PF_KTHREAD = 0x00200000
PIN_PREFIX = "/sys/fs/bpf/ctspeer_"
PARTITIONS = 3
STORM_PORTS = 16            # server ports per storm: 16 x 64k client ports of 5-tuples
FIRST_PORT = 20000
BIG_BUFFER = 33554432       # conntrack -E -b
# Offload features toggled for tcp-nooffload, as ethtool -k names them.
FEATURES = {"tso": "tcp-segmentation-offload", "gso": "generic-segmentation-offload",
            "gro": "generic-receive-offload", "tx": "tx-checksumming", "rx": "rx-checksumming"}
# Short timeouts of the delivery phase, the same for both trackers, so that
# every connection's DESTROY comes within seconds of its close.
DELIVERY_TIMEOUT_S = 2
NF_TCP_TIMEOUTS = ("time_wait", "close", "close_wait", "fin_wait", "last_ack")
HOOKS = {"native": ["--ingress-hook", "xdp", "--xdp-mode", "native"],
         "generic": ["--ingress-hook", "xdp", "--xdp-mode", "generic"],
         "auto": ["--ingress-hook", "xdp", "--xdp-mode", "auto"],
         "tc": ["--ingress-hook", "tc"]}
TRAFFIC = ("tcp-offload", "tcp-nooffload", "udp64", "conn")
TRAFFIC_LABEL = {"tcp-offload": "TCP bulk, offloads on", "tcp-nooffload": "TCP bulk, offloads off",
                 "udp64": "UDP, 64-byte frames", "conn": "short TCP connections"}
# How each traffic type is shown: rate unit and scale, CPU unit and scale.
SHOW = {"tcp-offload": ("Gbit/s", 1e-9, "ns/seg", 1e9),
        "tcp-nooffload": ("Gbit/s", 1e-9, "ns/seg", 1e9),
        "udp64": ("kpps", 1e-3, "ns/pkt", 1e9), "conn": ("kconn/s", 1e-3, "us/conn", 1e6)}


T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:5.0f} s] {msg}", file=sys.stderr, flush=True)


class Failed(Exception):
    """A variant (or the bench) could not run; the exit status says so."""


class Interrupted(BaseException):
    """SIGTERM, handled as Ctrl-C: every finally block runs."""


# ---- CPU accounting ------------------------------------------------------------------

def machine_busy_s() -> float:
    """CPU seconds of all CPUs in user+nice+system+irq+softirq (/proc/stat);
    idle, iowait and steal are not work done here."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    return (f[0] + f[1] + f[2] + f[5] + f[6]) / CLK_TCK


def cpu_of(pid: int | None) -> float:
    """utime + stime of a process, all its threads (/proc/PID/stat)."""
    if pid is None:
        return 0.0
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(f[11]) + int(f[12])) / CLK_TCK


def user_processes_cpu(skip_netns: set[int], skip_pids: set[int]) -> dict[int, float]:
    """CPU seconds of every user-space process that is not ours (ours: in our
    namespaces, or in skip_pids). Kernel threads are left out: ksoftirqd may
    be doing our packets' work."""
    out = {}
    for d in os.scandir("/proc"):
        if not d.name.isdigit() or int(d.name) in skip_pids:
            continue
        try:
            if os.stat(f"/proc/{d.name}/ns/net").st_ino in skip_netns:
                continue
            f = Path(f"/proc/{d.name}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if not int(f[6]) & PF_KTHREAD:
            out[int(d.name)] = (int(f[11]) + int(f[12])) / CLK_TCK
    return out


class Window:
    """The CPU used while one traffic sample runs: the machine's, the broker's,
    the ctstream daemon's, and (a noise gauge, a lower bound) other users'
    processes that lived through it."""

    def __init__(self, bench, daemon=None):
        self.bench, self.daemon = bench, daemon
        self.catch_up = 0.0     # seconds waited for the daemon at the end

    def _read(self) -> tuple:
        b = self.bench
        pid = self.daemon.pid if self.daemon else None
        others = user_processes_cpu(b.netns_inodes, {os.getpid(), b.broker_pid, pid})
        return (time.perf_counter(), machine_busy_s(), cpu_of(b.broker_pid), cpu_of(pid), others)

    def __enter__(self) -> "Window":
        self.start = self._read()
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.end = self._read()

    def figures(self) -> dict:
        (t0, m0, b0, d0, o0), (t1, m1, b1, d1, o1) = self.start, self.end
        return {"window_s": round(t1 - t0, 4), "cpu_busy_s": round(m1 - m0, 3),
                "broker_cpu_s": round(b1 - b0, 3), "daemon_cpu_s": round(d1 - d0, 3),
                "others_cpu_s": round(sum(o1[p] - o0[p] for p in o1 if p in o0), 3)}


# ---- variants --------------------------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    name: str                       # a, b, c, d; c-native, d-tc, ... with --ctstream-hooks
    label: str
    nf_conntrack: bool
    hook: list[str] | None          # ctstream run's hook options; None: no ctstream

    @property
    def ctstream(self) -> bool:
        return self.hook is not None


def make_variants(args) -> list[Variant]:
    """Every variant: a, b, then c and d once per ctstream hook."""
    if args.ctstream_hooks:
        hooks = {h: HOOKS[h] for h in args.ctstream_hooks}
    else:
        opts = (["--ingress-hook", args.ingress_hook] if args.ingress_hook else []) + \
               (["--xdp-mode", args.xdp_mode] if args.xdp_mode else [])
        hooks = {"": opts}
    out = [Variant("a", "nothing", False, None), Variant("b", "nf_conntrack", True, None)]
    for letter, what, both in (("c", "ctstream", False), ("d", "both", True)):
        out += [Variant(f"{letter}-{h}" if h else letter, what, both, opts)
                for h, opts in hooks.items()]
    return out


def pick_variants(variants: list[Variant], wanted: list[str]) -> list[Variant]:
    """A name, or a letter for all its hooks (c: c-native, c-tc, ...)."""
    def match(v, w):
        return v.name == w or v.name.startswith(w + "-")
    unknown = [w for w in wanted if not any(match(v, w) for v in variants)]
    if unknown:
        raise SystemExit(f"bench/peer.py: unknown variant(s) {', '.join(unknown)}; "
                         f"there are {', '.join(v.name for v in variants)}")
    return [v for v in variants if any(match(v, w) for w in wanted)]


# ---- the test bed's parts -------------------------------------------------------------

def run_quiet(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


# `ctstream` of this checkout (not another one installed in the venv).
CTSTREAM = [sys.executable, "-m", "streamer.cli"]
CTSTREAM_ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def ctstream_detach(pin: str) -> None:
    subprocess.run([*CTSTREAM, "detach", "--pin-dir", pin], capture_output=True, timeout=60,
                   stdin=subprocess.DEVNULL, env=CTSTREAM_ENV, cwd=ROOT)


def offload_state(host) -> dict:
    out = host.run(["ethtool", "-k", host.ifname], timeout=10).stdout
    state = {k: (m.group(1) if (m := re.search(rf"^{name}: (\w+)", out, re.M)) else "?")
             for k, name in FEATURES.items()}
    info = json.loads(host.run(["ip", "-d", "-j", "link", "show", "dev", host.ifname]).stdout)[0]
    state["gso_max_segs"] = info.get("gso_max_segs")
    return state


def set_offloads(pair, defaults: dict, on: bool, segs1: bool = False) -> None:
    """on: back to the fresh veth's features (recorded in `defaults`); off:
    tso, gso, gro, tx and rx checksumming off on both ends, and with segs1
    gso_max_segs 1 as well, as the test bed does for exact counts. The
    client's veth then segments before it sends: the server's hooks see
    wire-sized packets either way. Native XDP on the server's veth forbids
    TSO on the client's: that feature then stays off, and every sample
    records the state it ran with."""
    for host in pair.hosts:
        if not on and segs1:
            testbed.Pair._offloads_off(host)
            continue
        for k in FEATURES:    # one by one: a fixed or forbidden feature fails alone
            host.run(["ethtool", "-K", host.ifname, k, defaults[host.netns][k] if on else "off"],
                     timeout=10, check=False)
        host.run(["ip", "link", "set", "dev", host.ifname, "gso_max_segs",
                  str(defaults[host.netns]["gso_max_segs"])], timeout=10)


def veth_rx_packets(host) -> int:
    info = json.loads(host.run(["ip", "-s", "-j", "link", "show", "dev", host.ifname]).stdout)[0]
    return int(info["stats64"]["rx"]["packets"])


def attached(host) -> tuple[str, bool]:
    """What tracks the packets the host's veth receives (native, generic, tc
    or none), and whether a tc egress program is attached too."""
    info = json.loads(host.run(["ip", "-d", "-j", "link", "show", "dev", host.ifname]).stdout)[0]
    mode = (info.get("xdp") or {}).get("mode")

    def tc(side):
        out = host.run(["tc", "filter", "show", "dev", host.ifname, side], timeout=10).stdout
        return bool(out.strip())
    hook = {1: "native", 2: "generic"}.get(mode, f"xdp mode {mode}") if mode else \
        "tc" if tc("ingress") else "none"
    return hook, tc("egress")


TCP_COUNTERS = ("RetransSegs", "TCPSynRetrans", "ListenOverflows", "ListenDrops", "TCPTimeouts")


def tcp_counters(host) -> dict:
    """Some of the namespace's TCP counters (/proc/net/snmp and netstat)."""
    out = host.run(["cat", "/proc/net/snmp", "/proc/net/netstat"], timeout=10).stdout
    headers, got = {}, {}
    for line in out.splitlines():   # per prefix: a line of names, then one of values
        prefix, _, rest = line.partition(":")
        if prefix not in headers:
            headers[prefix] = rest.split()
        elif prefix in ("Tcp", "TcpExt"):
            got.update(zip(headers[prefix], map(int, rest.split())))
    return {k: got.get(k, 0) for k in TCP_COUNTERS}


def wait_ready(proc: subprocess.Popen, timeout: float, what: str) -> None:
    """The first line of an unbuffered stdout pipe must be "ready"."""
    deadline, line = time.monotonic() + timeout, b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
            raise Failed(f"{what}: not ready within {timeout:g} s")
        chunk = os.read(proc.stdout.fileno(), 1)
        if not chunk:
            raise Failed(f"{what}: exited with {proc.wait()}: {proc.stderr.read().decode()[-500:]}")
        line += chunk
    if line.strip() != b"ready":
        raise Failed(f"{what}: said {line!r}")


def stop_proc(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 10) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def nf_conntrack_on(server, on: bool) -> None:
    if on:
        server.enable_conntrack()
    else:
        server.run(["nft", "delete", "table", "inet", "ctref"], timeout=10, check=False)
        server.conntrack_flush()


# ---- ctstream run ---------------------------------------------------------------------------

class Daemon:
    """`ctstream run` on the server's veth, exactly as a user starts it (this
    checkout's code), shipping to the bench's broker."""

    def __init__(self, bench, variant: Variant, node: str, topic: str, extra=()):
        self.bench, self.variant, self.node = bench, variant, node
        self.pin = f"{PIN_PREFIX}{os.getpid()}_{node.replace('-', '_')}"
        srv = bench.pair.server
        self.argv = [*CTSTREAM, "run", "-n", srv.netns, "-i", srv.ifname,
                     "--egress", "--kafka", bench.broker.bootstrap, "--topic", topic,
                     "--node-id", node, "--pin-dir", self.pin,
                     "--spool", str(bench.tmp / f"spool-{node}"), "--detach-on-stop",
                     *variant.hook, *extra]
        self.log = bench.tmp / f"daemon-{node}.log"
        self.proc = self.table = self.pid = None
        self.attached = "none"

    def __enter__(self) -> "Daemon":
        with open(self.log, "w") as logf:
            self.proc = subprocess.Popen(self.argv, stdout=logf, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=CTSTREAM_ENV, cwd=ROOT,
                                         start_new_session=True)
        self.pid = self.proc.pid
        try:
            self._wait_connected(90)
            self.table = PinnedTable(self.pin)
            self._wait_attached(30)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_attached(self, timeout: float) -> None:
        """The status file appears before the programs are attached: wait
        for the ingress hook that was asked for, and the egress program."""
        hook = self.variant.hook
        want = "tc" if "tc" in hook else hook[hook.index("--xdp-mode") + 1] \
            if "--xdp-mode" in hook else None
        deadline = time.monotonic() + timeout
        while True:
            self.attached, egress = attached(self.bench.pair.server)
            if egress and self.attached != "none" and want in (None, "auto", self.attached):
                return
            self.check()
            if time.monotonic() > deadline:
                raise Failed(f"ctstream attached {self.attached} (egress: {egress}), "
                             f"asked for {want or 'the default'}, within {timeout:g} s")
            time.sleep(0.1)

    def _wait_connected(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError, ValueError):
                if json.loads(status_path(self.pin).read_text()).get("kafka_connected"):
                    return
            self.check()
            if time.monotonic() > deadline:
                raise Failed(f"ctstream run: not connected to Kafka within {timeout:g} s")
            time.sleep(0.1)

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise Failed(f"ctstream run exited with {self.proc.returncode}: "
                         f"{self.log.read_text()[-1500:]}")

    def stats(self) -> dict:
        return self.table.stats()

    def ring_unread(self) -> int:
        """Bytes in the event ring that the daemon has not read (consumer and
        producer positions, through the ring's first two mmap pages)."""
        fd, page = self.table.fd("ct_events"), mmap.PAGESIZE
        with mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ, offset=0) as cons, \
             mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ, offset=page) as prod:
            return struct.unpack_from("<Q", prod)[0] - struct.unpack_from("<Q", cons)[0]

    def catch_up(self, timeout: float = 30) -> float:
        """Wait until the daemon has read every event the sample made, so its
        work on them falls inside the sample's CPU window. Returns the wait."""
        t0 = time.perf_counter()
        while self.ring_unread() > 0:
            self.check()
            if time.perf_counter() - t0 > timeout:
                raise Failed(f"ctstream did not read its ring within {timeout:g} s")
            time.sleep(0.01)
        time.sleep(0.05)   # the last batch's encoding and send
        return time.perf_counter() - t0

    def __exit__(self, *exc) -> None:
        if self.table is not None:
            self.table.close()
            self.table = None
        if self.proc is not None:
            stop_proc(self.proc, signal.SIGTERM, 60)
        ctstream_detach(self.pin)
        remove_state(self.pin)


def remove_state(pin: str) -> None:
    """The owner's lock file that a daemon leaves in STATE_DIR: every pin dir
    of the bench is used once, so these would pile up."""
    stem = pin.strip("/").replace("/", "_")
    for path in STATE_DIR.glob(stem + ".*"):
        path.unlink(missing_ok=True)


def remove_stale_pins() -> None:
    """Pins and state files of a bench that was killed (its pid, in their
    names, is gone)."""
    prefix = Path(PIN_PREFIX).name
    for pin in Path(PIN_PREFIX).parent.glob(prefix + "*"):
        pid = pin.name[len(prefix):].split("_", 1)[0]
        if pid.isdigit() and not testbed.pid_alive(int(pid)):
            log(f"removing the stale pins {pin}")
            ctstream_detach(str(pin))
    stem = PIN_PREFIX.strip("/").replace("/", "_")
    for path in STATE_DIR.glob(stem + "*"):
        pid = path.name[len(stem):].split("_", 1)[0]
        if pid.isdigit() and not testbed.pid_alive(int(pid)):
            path.unlink(missing_ok=True)


# ---- traffic samples ----------------------------------------------------------------------

def iperf3_sample(bench, daemon, seconds: int, extra: list[str]) -> tuple[dict, Window]:
    pair, port = bench.pair, 5201
    dst = pair.server.ipv4
    srv = pair.server.popen(["iperf3", "-s", "-1", "-B", dst, "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        pair.server.wait_listening("tcp", port, timeout=10, proc=srv)
        rx0 = veth_rx_packets(pair.server)
        with Window(bench, daemon) as w:
            cp = pair.client.run(["iperf3", "-c", dst, "-p", str(port), "-t", str(seconds), "-J",
                                  *extra], timeout=seconds + 30, check=False)
            rx1 = veth_rx_packets(pair.server)
            if daemon:
                w.catch_up = daemon.catch_up()
        try:
            res = json.loads(cp.stdout)
        except ValueError:
            raise Failed(f"iperf3: rc={cp.returncode}, no JSON: "
                         f"{cp.stderr.strip()[-300:]}") from None
        if cp.returncode != 0 or "error" in res:
            raise Failed(f"iperf3 failed: {res.get('error', cp.stderr.strip())}")
    finally:
        stop_proc(srv, signal.SIGKILL, 5)
    res["veth_rx_packets"] = rx1 - rx0
    return res, w


def tcp_sample(bench, daemon, seconds: int) -> tuple[dict, Window]:
    res, w = iperf3_sample(bench, daemon, seconds, [])
    got = res["end"]["sum_received"]
    mss = res["start"].get("tcp_mss_default") or 1448
    # Segments of MSS size: what the wire carries whatever the offloads, so
    # that TSO/GRO do not change the unit of CPU per packet.
    return {"seconds": got["seconds"], "units": got["bytes"] / mss, "unit": "segment",
            "rate": got["bits_per_second"], "bytes": got["bytes"], "mss": mss,
            "veth_rx_packets": res["veth_rx_packets"],
            "retransmits": res["end"]["sum_sent"].get("retransmits")}, w


def udp_sample(bench, daemon, seconds: int) -> tuple[dict, Window]:
    # 22 bytes of payload: 14 Ethernet + 20 IPv4 + 8 UDP + 22 = 64-byte frames
    res, w = iperf3_sample(bench, daemon, seconds, ["-u", "-l", "22", "-b", "0"])
    sent, got = res["end"]["sum_sent"], res["end"]["sum_received"]
    at_veth = res["veth_rx_packets"]
    # Every packet that reached the server's veth went through the hooks
    # (the socket may drop some after): those are the packets counted.
    return {"seconds": sent["seconds"], "units": at_veth, "unit": "packet",
            "rate": at_veth / sent["seconds"], "sent_packets": sent["packets"],
            "app_received_packets": got["packets"] - got["lost_packets"]}, w


def storm(bench, count: int, rate: float, conc: int, seconds: float, window=None):
    """One bounded connection storm (bench/conn_storm.c) on fresh server ports;
    returns the client's result and the first port. With a Window, the
    window covers the client's run and the daemon's catching up."""
    pair, base = bench.pair, bench.next_ports()
    dst = pair.server.ipv4
    srv = pair.server.popen([bench.storm, "server", dst, base, STORM_PORTS, seconds + 30],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    try:
        wait_ready(srv, 10, "conn_storm server")
        argv = [bench.storm, "client", dst, base, STORM_PORTS, count, rate, conc, seconds]
        before = [tcp_counters(h) for h in pair.hosts]
        with window or contextlib.nullcontext() as w:
            cp = pair.client.run(argv, timeout=seconds + 20)
            if window and window.daemon:
                w.catch_up = window.daemon.catch_up()
        after = [tcp_counters(h) for h in pair.hosts]
    finally:
        stop_proc(srv, signal.SIGTERM, 5)
    res = json.loads(cp.stdout)
    # Retransmitted SYNs or a full accept queue stretch a storm by seconds.
    res["tcp_counters"] = {side: {k: a[k] - b[k] for k in TCP_COUNTERS if a[k] != b[k]}
                           for side, b, a in zip(("client", "server"), before, after)}
    if res["errors"] or res["unfinished"]:
        log(f"  conn_storm: {res['errors']} errors ({res['first_error']}), "
            f"{res['unfinished']} unfinished")
    return res, base


def conn_sample(bench, daemon, seconds: int) -> tuple[dict, Window]:
    w = Window(bench, daemon)
    res, _base = storm(bench, bench.args.conn_count, 0, bench.args.conn_concurrency, seconds, w)
    if res["done"] == 0:
        raise Failed(f"conn_storm completed no connection: {res}")
    return {"seconds": res["seconds"], "units": res["done"], "unit": "connection",
            "rate": res["done"] / res["seconds"], "errors": res["errors"],
            "tcp_counters": res["tcp_counters"]}, w


SAMPLERS = {"tcp-offload": tcp_sample, "tcp-nooffload": tcp_sample, "udp64": udp_sample,
            "conn": conn_sample}


# ---- the cost phase ------------------------------------------------------------------------

def sample(bench, variant: Variant, daemon, rnd: int, traffic: str) -> dict:
    before = daemon.stats() if daemon else None
    figures, w = SAMPLERS[traffic](bench, daemon, bench.args.seconds)
    s = {"round": rnd, "variant": variant.name, "traffic": traffic, **figures, **w.figures(),
         "catch_up_s": round(w.catch_up, 3),
         "offloads": {h.netns[-1]: offload_state(h) for h in bench.pair.hosts}}
    s["cpu_ns_per_unit"] = s["cpu_busy_s"] / s["units"] * 1e9
    s["cpu_ns_per_unit_without_broker"] = (s["cpu_busy_s"] - s["broker_cpu_s"]) / s["units"] * 1e9
    if daemon:
        after = daemon.stats()
        s["ctstream"] = {k: after[k] - before[k] for k in
                         ("packets", "created", "untracked_packets", "table_full", "ring_full")}
        s["ctstream_hook"] = daemon.attached
        if s["ctstream"]["packets"] <= 0:
            raise Failed(f"{variant.name}: ctstream counted no packet of {traffic}")
    return s


def run_variant(bench, variant: Variant, rnd: int) -> None:
    """One round of one variant: every traffic type, its samples kept as
    they come (a failure later in the round keeps the earlier ones)."""
    args, pair = bench.args, bench.pair
    nf_conntrack_on(pair.server, variant.nf_conntrack)
    try:
        with (Daemon(bench, variant, f"peer-{variant.name}-r{rnd}", bench.topic)
              if variant.ctstream else contextlib.nullcontext()) as daemon:
            for traffic in args.traffic:
                set_offloads(pair, bench.offload_defaults, traffic != "tcp-nooffload",
                             args.gso_max_segs_1)
                s = sample(bench, variant, daemon, rnd, traffic)
                rate_unit, scale, cpu_unit, cscale = SHOW[traffic]
                log(f"  {variant.name:<10} {traffic:<14} {s['rate'] * scale:8.2f} {rate_unit:<8}"
                    f" {s['cpu_ns_per_unit'] * cscale / 1e9:8.2f} {cpu_unit}"
                    f"  (broker {s['broker_cpu_s']:.2f} s, others {s['others_cpu_s']:.2f} s)")
                bench.samples.append(s)
    finally:
        set_offloads(pair, bench.offload_defaults, True)
        if variant.nf_conntrack:
            nf_conntrack_on(pair.server, False)


def cost_phase(bench) -> None:
    args, variants = bench.args, bench.variants
    for rnd in range(1, args.rounds + 1):
        k = (rnd - 1) % len(variants)
        order = variants[k:] + variants[:k]
        log(f"round {rnd}/{args.rounds}: {' '.join(v.name for v in order)}")
        for v in order:
            bench.check_time()
            try:
                run_variant(bench, v, rnd)
            except (Failed, testbed.TestbedError) as exc:
                log(f"  {v.name}: FAILED: {exc}")
                bench.failures.append({"variant": v.name, "round": rnd, "error": str(exc)})


# ---- the delivery phase ---------------------------------------------------------------------

CT_LINE = re.compile(r"src=(\S+) dst=\S+ sport=(\d+) dport=(\d+)")


class Listener:
    """`conntrack -E -e DESTROY -p tcp` in the server namespace, into a file.
    -e and -p are given to the kernel (netlink groups, a socket filter), so the
    listener's buffer holds only the events that are counted. `rcvbuf` sets
    the event socket's buffer through bench/rcvbuf_shim.c (see there why
    `-b` does not)."""

    def __init__(self, bench, name: str, extra: list[str], rcvbuf: int | None = None):
        self.name = name
        self.out = bench.tmp / f"conntrack-{re.sub(r'[^a-z0-9]+', '-', name.lower())}.txt"
        env = dict(os.environ)
        if rcvbuf:
            env.update(LD_PRELOAD=bench.shim, PEER_NETLINK_RCVBUF=str(rcvbuf))
        with open(self.out, "w") as f:
            self.proc = bench.pair.server.popen(
                ["conntrack", "-E", "-e", "DESTROY", "-p", "tcp", *extra],
                stdout=f, stderr=subprocess.PIPE, env=env)

    def finish(self) -> tuple[set, str]:
        """Stop (SIGINT: it flushes and prints its count); its DESTROYs by
        (client address, sport, dport) of ASSURED connections, and stderr."""
        stop_proc(self.proc, signal.SIGINT, 10)
        err = self.proc.stderr.read().decode(errors="replace")
        seen = set()
        for line in self.out.read_text(errors="replace").splitlines():
            m = CT_LINE.search(line)
            if m and "[ASSURED]" in line:
                seen.add((m.group(1), int(m.group(2)), int(m.group(3))))
        return seen, err


def listeners(bench) -> list[Listener]:
    return [Listener(bench, "conntrack -E", []),
            Listener(bench, "conntrack -E -b 32M", ["-b", str(BIG_BUFFER)]),
            Listener(bench, "conntrack -E, 32M buffer", [], rcvbuf=BIG_BUFFER)]


async def ctstream_destroys(bootstrap: str, topic: str, node: str) -> set[tuple[str, int, int]]:
    """(source address, sport, dport) of the ASSURED DESTROYs of `node` in the topic."""
    out = set()
    async for m in read_topic_to_end(bootstrap, topic, PARTITIONS, timeout_s=300,
                                     max_records=20_000):
        rec = wire.decode(m.value)
        if rec.get("eventType") == "DESTROY" and rec.get("nodeId") == node and rec.get("assured"):
            out.add((rec.get("sourceIPv4Address"), rec["sourceTransportPort"],
                     rec["destinationTransportPort"]))
    return out


def nf_count(server) -> int:
    return int(server.run(["sysctl", "-n", "net.netfilter.nf_conntrack_count"], timeout=10).stdout)


def wait_drained(bench, daemon, nf0: int, ct0: int, timeout: float = 120) -> dict:
    """Until both tables are back to what they held before the storm: every
    connection of it ended, its DESTROY emitted (and, for ctstream, acked
    by Kafka: the outbox empty). Returns when each got there (s)."""
    t0, done = time.monotonic(), {}
    while len(done) < 2:
        st = daemon.stats()
        now = time.monotonic() - t0
        if "nf_conntrack" not in done and nf_count(bench.pair.server) <= nf0:
            done["nf_conntrack"] = round(now, 1)
        if "ctstream" not in done and st["entries"] + st["outbox"] <= ct0:
            done["ctstream"] = round(now, 1)
        daemon.check()
        if now > timeout:
            raise Failed(f"the storm's connections did not all end within {timeout:g} s "
                         f"(ended: {done or 'neither'})")
        time.sleep(0.2)
    time.sleep(1.0)    # the listeners read what the last reaping emitted
    return done


def delivery_step(bench, daemon, rnd: int, rate: int) -> dict:
    """One paced storm (rate 0: as fast as it goes), until all its
    connections ended in both trackers."""
    args, server = bench.args, bench.pair.server
    count = args.delivery_max_conns if rate == 0 else \
        min(args.delivery_max_conns, int(rate * args.delivery_seconds))
    st = daemon.stats()
    nf0, ct0 = nf_count(server), st["entries"] + st["outbox"]
    res, base = storm(bench, count, rate, 1024 if rate else args.conn_concurrency,
                      max(5.0, 2 * count / (rate or 20_000)))
    log(f"  delivery r{rnd}: offered {rate or 'max'}/s: {res['done']:,} connections "
        f"at {res['done'] / res['seconds']:,.0f}/s; waiting for their DESTROYs")
    drained = wait_drained(bench, daemon, nf0, ct0)
    log(f"  every one ended after: {drained} s")
    return {"round": rnd, "offered_rate": rate, "connections": res["done"],
            "errors": res["errors"], "achieved_rate": res["done"] / res["seconds"],
            "tcp_counters": res["tcp_counters"],
            "all_ended_after_s": drained, "ports": [base, base + STORM_PORTS - 1]}


def count_delivered(steps: list[dict], found: dict, in_kafka: set, client: str) -> None:
    """Per step: the DESTROYs each deliverer has of the step's connections."""
    for step in steps:
        lo, hi = step["ports"]

        def mine(keys):
            return sum(1 for (src, _sp, dp) in keys if src == client and lo <= dp <= hi)
        n = step["connections"]
        step["delivered"] = {**{name: mine(seen) for name, (seen, _err) in found.items()},
                             "ctstream": mine(in_kafka)}
        step["loss_pct"] = {k: 100.0 * (1 - v / n) for k, v in step["delivered"].items()}
        step["enobufs_warnings_in_round"] = {name: err.count("ENOBUFS")
                                             for name, (_seen, err) in found.items()}


def delivery_round(bench, rnd: int) -> list[dict]:
    """conntrack -E three ways and ctstream (the first ctstream variant's
    hook; both trackers on) on the same storms; the short timeouts end every
    connection within seconds, as far as each tracker is concerned."""
    pair = bench.pair
    hook = next(v for v in bench.variants + bench.all_variants if v.ctstream).hook
    variant = Variant("delivery", "both", True, hook)
    node, topic = f"peer-delivery-r{rnd}", f"ctstream.peer.delivery.r{rnd}"
    bench.broker.topic_create(topic, PARTITIONS)
    pair.server.run(["sysctl", "-qw", *(f"net.netfilter.nf_conntrack_tcp_timeout_{t}="
                                        f"{DELIVERY_TIMEOUT_S}" for t in NF_TCP_TIMEOUTS)])
    nf_conntrack_on(pair.server, True)
    steps, started, found = [], [], {}
    try:
        with Daemon(bench, variant, node, topic,
                    ["--timeout-fin", str(DELIVERY_TIMEOUT_S)]) as daemon:
            started = listeners(bench)
            time.sleep(0.5)    # the listeners subscribe
            for rate in bench.args.delivery_rates:
                bench.check_time()
                steps.append(delivery_step(bench, daemon, rnd, rate))
    finally:
        found = {lst.name: lst.finish() for lst in started}
        nf_conntrack_on(pair.server, False)
    for name, (_seen, err) in found.items():
        log(f"  {name}: {err.count('ENOBUFS')} ENOBUFS warnings; "
            f"{' '.join(err.strip().splitlines()[-1:])}")
    in_kafka = asyncio.run(ctstream_destroys(bench.broker.bootstrap, topic, node))
    count_delivered(steps, found, in_kafka, pair.client.ipv4)
    for step in steps:
        step["ctstream_hook"] = hook
    return steps


def delivery_phase(bench) -> None:
    for rnd in range(1, bench.args.delivery_rounds + 1):
        try:
            bench.deliveries += delivery_round(bench, rnd)
        except (Failed, testbed.TestbedError) as exc:
            log(f"  delivery round {rnd}: FAILED: {exc}")
            bench.failures.append({"variant": "delivery", "round": rnd, "error": str(exc)})


# ---- summary ---------------------------------------------------------------------------------

def spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


# CPU per unit -> its overhead against (a), in the summary
OVERHEAD_OF = (("cpu_ns_per_unit", "cpu_overhead_pct"),
               ("cpu_ns_per_unit_without_broker", "cpu_overhead_without_broker_pct"))


def summarize(samples: list[dict], variants: list[Variant], traffic: list[str]) -> dict:
    """Per traffic type and variant: rate and CPU/unit over the rounds, and
    the overhead against (a) of the same round (paired, so drift between
    rounds cancels)."""
    out = {}
    by = {(s["traffic"], s["variant"], s["round"]): s for s in samples}
    for t in traffic:
        out[t] = {}
        for v in variants:
            rows = [s for (tt, vv, _r), s in by.items() if tt == t and vv == v.name]
            if not rows:
                continue
            entry = {k: spread([s[k] for s in rows])
                     for k in ("rate", "cpu_ns_per_unit", "cpu_ns_per_unit_without_broker",
                               "others_cpu_s", "broker_cpu_s")}
            base = [(s, by.get((t, "a", s["round"]))) for s in rows]
            base = [(s, a) for s, a in base if a is not None]
            if v.name != "a" and base:
                entry["rate_overhead_pct"] = spread([100 * (1 - s["rate"] / a["rate"])
                                                     for s, a in base])
                for k, col in OVERHEAD_OF:
                    entry[col] = spread([100 * (s[k] / a[k] - 1) for s, a in base])
            out[t][v.name] = entry
    return out


def ratios(summary: dict, variants: list[Variant]) -> dict:
    """ctstream's median overhead / nf_conntrack's, per traffic type and c-variant."""
    out = {}
    for t, per in summary.items():
        b = per.get("b")
        for v in variants:
            if not v.name.startswith("c") or v.name not in per or not b:
                continue
            c = per[v.name]
            out.setdefault(t, {})[v.name] = {
                # a ratio to an overhead within the noise (under 5 %) means nothing
                col: (c[col]["median"] / b[col]["median"]
                      if b.get(col) and b[col]["median"] >= 5.0 else None)
                for col in ("rate_overhead_pct", *(col for _k, col in OVERHEAD_OF)) if col in c}
    return out


def num(v: float) -> str:
    """About three significant digits."""
    a = abs(v)
    return f"{v:,.0f}" if a >= 100 else f"{v:.1f}" if a >= 10 else f"{v:.2f}"


def cell(x: dict | None, scale: float = 1.0, pct: bool = False) -> str:
    """median (min..max) of a spread, or "-"; percentages as -8% (-11..-5)."""
    if not x:
        return "-"
    lo, hi = sorted((x["min"] * scale, x["max"] * scale))
    med = x["median"] * scale
    if pct:
        text, lo_hi = f"{med:+.0f}%", f"{lo:+.0f}..{hi:+.0f}"
    else:
        text, lo_hi = num(med), f"{num(lo)}..{num(hi)}"
    return text if x["n"] == 1 else f"{text} ({lo_hi})"


def cost_table(summary: dict, rat: dict, variants: list[Variant], args,
               samples: list[dict]) -> str:
    lines = [f"Cost: median (min..max) over {args.rounds} round(s) of {args.seconds} s. "
             "vs a: against (a) nothing in the same round. CPU: the machine's busy time "
             "per unit; -broker: without the Kafka broker's own CPU"]
    for t, per in summary.items():
        rate_unit, scale, cpu_unit, cscale = SHOW[t]
        lines += ["", TRAFFIC_LABEL[t],
                  f"  {'variant':<20}{rate_unit:>20}{'vs a':>18}{'CPU ' + cpu_unit:>22}"
                  f"{'vs a':>20}{'-broker':>22}{'vs a':>20}"]
        for v in variants:
            e = per.get(v.name)
            if e:
                lines.append(
                    f"  {v.name + ' ' + v.label:<20}{cell(e['rate'], scale):>20}"
                    f"{cell(e.get('rate_overhead_pct'), -1, pct=True):>18}"
                    f"{cell(e['cpu_ns_per_unit'], cscale / 1e9):>22}"
                    f"{cell(e.get('cpu_overhead_pct'), pct=True):>20}"
                    f"{cell(e['cpu_ns_per_unit_without_broker'], cscale / 1e9):>22}"
                    f"{cell(e.get('cpu_overhead_without_broker_pct'), pct=True):>20}")
        for name, r in rat.get(t, {}).items():
            def show(k):
                if r.get(k) is None:
                    return "-"
                return f"{r[k]:.1f}x" if r[k] > 0 else "none (c <= a)"
            lines.append(f"  {name} / b, overhead: rate {show('rate_overhead_pct')}, CPU "
                         f"{show('cpu_overhead_pct')}, CPU-broker "
                         f"{show('cpu_overhead_without_broker_pct')}")
    others = [s["others_cpu_s"] / max(s["window_s"], 1e-9) for s in samples]
    if others:
        lines.append(f"\nOther users' processes during the samples (noise, a lower bound): "
                     f"median {statistics.median(others):.2f} CPUs, max {max(others):.2f}")
    return "\n".join(lines)


def delivery_summary(steps: list[dict]) -> list[dict]:
    rows = {}
    for s in steps:
        rows.setdefault(s["offered_rate"], []).append(s)
    out = []
    for rate, ss in rows.items():
        out.append({"offered_rate": rate,
                    "achieved_rate": spread([s["achieved_rate"] for s in ss]),
                    "connections": sum(s["connections"] for s in ss),
                    "loss_pct": {k: spread([s["loss_pct"][k] for s in ss])
                                 for k in ss[0]["loss_pct"]}})
    return out


def loss_cell(x: dict) -> str:
    if x["n"] == 1:
        return f"{x['median']:.1f}%"
    return f"{x['median']:.1f}% ({x['min']:.1f}..{x['max']:.1f})"


def delivery_table(rows: list[dict], rounds: int) -> str:
    names = list(rows[0]["loss_pct"]) if rows else []
    lines = [f"DESTROY loss, median (min..max) over {rounds} round(s): connections whose DESTROY "
             "was not delivered", f"  {'offered/s':>10}{'achieved/s':>12}{'conns':>9}"
             + "".join(f"{n:>27}" for n in names)]
    for r in rows:
        lines.append(f"  {r['offered_rate'] or 'max':>10}{r['achieved_rate']['median']:>12,.0f}"
                     f"{r['connections']:>9,}"
                     + "".join(f"{loss_cell(r['loss_pct'][n]):>27}" for n in names))
    return "\n".join(lines)


def chart(path: Path, summary: dict, deliveries: list[dict], variants: list[Variant]) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("no matplotlib (pip install matplotlib, or make bench-peer): no chart")
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5.5))
    styles = [("o", "-"), ("s", "--"), ("^", ":"), ("D", "-.")]
    for (marker, line), name in zip(styles * 2, deliveries[0]["loss_pct"] if deliveries else []):
        xs = [r["achieved_rate"]["median"] for r in deliveries]
        ys = [r["loss_pct"][name]["median"] for r in deliveries]
        err = [[y - r["loss_pct"][name]["min"] for y, r in zip(ys, deliveries)],
               [r["loss_pct"][name]["max"] - y for y, r in zip(ys, deliveries)]]
        # open markers and line styles: deliverers at 0 % lie on each other
        ax1.errorbar(xs, ys, yerr=err, marker=marker, linestyle=line, capsize=3, label=name,
                     markersize=8, fillstyle="none")
    ax1.set(xscale="log", xlabel="connections/s (achieved by the paced generator)",
            ylabel="DESTROY loss %", title="DESTROY delivery (bars: min-max over rounds)")
    if deliveries:
        ax1.legend()
    ax1.grid(alpha=0.3)
    shown = [v for v in variants if v.name != "a"]
    traffic = list(summary)
    width = 0.8 / max(1, 2 * len(shown))
    for i, v in enumerate(shown):
        for j, (col, hatch) in enumerate((("rate_overhead_pct", ""), ("cpu_overhead_pct", "//"))):
            ys, lo, hi = [], [], []
            for t in traffic:
                e = summary[t].get(v.name, {}).get(col) or {"median": 0, "min": 0, "max": 0}
                ys.append(e["median"])
                lo.append(e["median"] - e["min"])
                hi.append(e["max"] - e["median"])
            xs = [k + (2 * i + j) * width - 0.4 + width / 2 for k in range(len(traffic))]
            ax2.bar(xs, ys, width, yerr=[lo, hi], capsize=2, hatch=hatch, color=f"C{i}",
                    alpha=0.9 if not hatch else 0.5,
                    label=f"{v.name} {v.label}: {'throughput loss' if not hatch else '+CPU/unit'}")
    ax2.set_xticks(range(len(traffic)), [TRAFFIC_LABEL[t].replace(", ", "\n") for t in traffic])
    ax2.set(ylabel="% against (a) nothing", title="Overhead per traffic type (median, min-max)")
    ax2.axhline(0, color="black", linewidth=0.5)
    if shown:
        ax2.legend(fontsize=7)
    ax2.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    log(f"chart: {path}")


# ---- the run -------------------------------------------------------------------------------

class Bench:
    """What every phase shares: arguments, the pair, the broker, the results."""

    def __init__(self, args):
        self.args, self.tmp = args, Path()     # tmp: set once the variants are valid
        self.all_variants = make_variants(args)
        self.variants = pick_variants(self.all_variants, args.variants.split(","))
        self.samples: list[dict] = []
        self.deliveries: list[dict] = []
        self.failures: list[dict] = []
        self.deadline = time.monotonic() + args.time_limit
        self.topic = "ctstream.peer.cost"
        self._port = FIRST_PORT
        self.pair = self.broker = self.broker_pid = None
        self.netns_inodes: set[int] = set()
        self.offload_defaults: dict = {}

    @property
    def storm(self) -> str:
        return str(self.tmp / "conn_storm")

    @property
    def shim(self) -> str:
        return str(self.tmp / "rcvbuf_shim.so")

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise Failed(f"the time limit ({self.args.time_limit:g} s, --time-limit) was reached")

    def next_ports(self) -> int:
        """A fresh block of server ports for each storm: no 5-tuple of an
        earlier storm (its TIME_WAITs, its conntrack entries) is met again."""
        if self._port + STORM_PORTS > 65000:
            self._port = FIRST_PORT
        base, self._port = self._port, self._port + STORM_PORTS
        return base

    def build_helpers(self) -> None:
        for argv in (["-o", self.storm, str(HERE / "conn_storm.c")],
                     ["-shared", "-fPIC", "-o", self.shim, str(HERE / "rcvbuf_shim.c"), "-ldl"]):
            cp = run_quiet(["gcc", "-O2", "-Wall", *argv])
            if cp.returncode != 0:
                raise Failed(f"gcc {' '.join(argv)}: {cp.stderr.strip()}")

    def start_broker(self) -> None:
        self.broker = DemoBroker(self.tmp / "broker")
        log(f"starting a Kafka broker on {self.broker.bootstrap} (scripts/kafka.sh)")
        self.broker.start()
        pids = live_pids(b"kafka.Kafka", f"{self.tmp / 'broker'}/server.properties".encode())
        if not pids:
            raise Failed("the broker started but its process is not found")
        self.broker_pid = pids[0]
        self.broker.topic_create(self.topic, PARTITIONS)

    def prepare_pair(self, pair) -> None:
        self.pair = pair
        self.netns_inodes = {os.stat(f"/run/netns/{h.netns}").st_ino for h in pair.hosts}
        # The client keeps every storm's TIME_WAITs for 60 s: room for them.
        pair.client.run(["sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535",
                         "net.ipv4.tcp_max_tw_buckets=1048576"])
        self.offload_defaults = {h.netns: offload_state(h) for h in pair.hosts}


def check_tools() -> None:
    missing = [t for t in ("iperf3", "ethtool", "nft", "conntrack", "gcc", "java", "tc")
               if shutil.which(t) is None]
    if missing:
        raise Failed(f"missing tools: {', '.join(missing)} (scripts/setup.sh installs them)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="2 rounds of 2 s, 2 delivery rates: about 2 min")
    p.add_argument("--rounds", type=int, help="cost rounds (default 5, --quick 2)")
    p.add_argument("--seconds", type=int, help="seconds per traffic sample (default 3, --quick 2)")
    p.add_argument("--variants", default="a,b,c,d",
                   help="of a,b,c,d; with --ctstream-hooks also c-native, d-tc, ... "
                   "(a letter: all its hooks)")
    p.add_argument("--traffic", default=",".join(TRAFFIC), help=f"of {','.join(TRAFFIC)}")
    p.add_argument("--ctstream-hooks",
                   help=f"one ctstream variant per ingress hook, of {','.join(HOOKS)}")
    p.add_argument("--ingress-hook", choices=("xdp", "tc"), help="ctstream run --ingress-hook")
    p.add_argument("--xdp-mode", choices=("auto", "native", "generic"),
                   help="ctstream run --xdp-mode")
    p.add_argument("--gso-max-segs-1", action="store_true",
                   help="tcp-nooffload also sets gso_max_segs 1, as the test bed does (here it "
                   "collapses TCP to well under 1 Gbit/s with retransmissions)")
    p.add_argument("--conn-count", type=int, default=50_000,
                   help="connections per conn sample, at most")
    p.add_argument("--conn-concurrency", type=int, default=32)
    p.add_argument("--delivery-rates", help="offered connections/s, 0 or max = as fast as it goes "
                   "(default 1000,4000,8000,16000,max; --quick 1000,max; none: skip)")
    p.add_argument("--delivery-rounds", type=int, help="default 1: each step waits for the "
                   "kernel's reaping, which can take a minute (see bench/README.md)")
    p.add_argument("--delivery-seconds", type=float, default=3.0,
                   help="connections per step: rate x this, at most --delivery-max-conns")
    p.add_argument("--delivery-max-conns", type=int, help="default 30000, --quick 15000")
    p.add_argument("--time-limit", type=float,
                   help="stop measuring after this (default 900 s, --quick 300)")
    p.add_argument("--json", type=Path, default=HERE / "results" / "peer.json")
    p.add_argument("--png", type=Path, default=HERE / "results" / "peer.png")
    args = p.parse_args(argv)
    q = args.quick
    args.rounds = args.rounds or (2 if q else 5)
    args.seconds = args.seconds or (2 if q else 3)
    args.delivery_rounds = args.delivery_rounds or 1
    args.delivery_max_conns = args.delivery_max_conns or (15_000 if q else 30_000)
    args.time_limit = args.time_limit or (300 if q else 900)
    rates = args.delivery_rates or ("1000,max" if q else "1000,4000,8000,16000,max")
    args.delivery_rates = [] if rates == "none" else \
        [0 if r in ("max", "0") else int(r) for r in rates.split(",")]
    args.traffic = args.traffic.split(",")
    args.ctstream_hooks = args.ctstream_hooks.split(",") if args.ctstream_hooks else None
    bad = [t for t in args.traffic if t not in TRAFFIC] + \
          [h for h in (args.ctstream_hooks or []) if h not in HOOKS]
    if bad or not 1 <= args.rounds <= 50 or not 1 <= args.seconds <= 60 \
            or not 1000 <= args.conn_count <= 500_000 \
            or not 100 <= args.delivery_max_conns <= 100_000:
        p.error(f"bad arguments {bad or ''}: see --help for the ranges")
    return args


def results(bench, args, started: float) -> dict:
    summary = summarize(bench.samples, bench.variants, args.traffic)
    return {"bench": "peer", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(["bench/peer.py", *sys.argv[1:]]),
            "machine": {"host": platform.node(), "kernel": platform.release(),
                        "cpus": os.cpu_count(), "loadavg_end": os.getloadavg()},
            "seconds": round(time.monotonic() - started, 1),
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "variants": [vars(v) for v in bench.variants],
            "offload_defaults": bench.offload_defaults,
            "summary": summary, "ratios": ratios(summary, bench.variants),
            "delivery": delivery_summary(bench.deliveries),
            "samples": bench.samples, "delivery_steps": bench.deliveries,
            "failures": bench.failures}


def report(bench, args, out: dict) -> None:
    print(cost_table(out["summary"], out["ratios"], bench.variants, args, bench.samples))
    if out["delivery"]:
        print()
        print(delivery_table(out["delivery"], args.delivery_rounds))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1) + "\n")
    log(f"results: {args.json}")
    chart(args.png, out["summary"], out["delivery"], bench.variants)
    for f in bench.failures:
        log(f"FAILED: {f['variant']} round {f['round']}: {f['error']}")


def on_sigterm(_sig, _frame) -> None:
    raise Interrupted()


def main(argv=None) -> int:
    args = parse_args(argv)
    testbed.require_root()
    signal.signal(signal.SIGTERM, on_sigterm)
    started = time.monotonic()
    bench = Bench(args)
    tmp = bench.tmp = Path(tempfile.mkdtemp(prefix="ctstream-bench-peer-"))
    try:
        check_tools()
        remove_stale_pins()
        bench.build_helpers()
        bench.start_broker()
        log("creating the namespace pair (client 198.18.0.1 <-> server 198.18.0.2)")
        with testbed.make_pair(prefix="ctspeer", offloads=True, conntrack=False) as pair:
            bench.prepare_pair(pair)
            cost_phase(bench)
            if args.delivery_rates:
                log("DESTROY delivery: conntrack -E (default buffer, -b 32M, a real 32M "
                    "buffer) and ctstream")
                delivery_phase(bench)
    except (Failed, StreamerError, testbed.TestbedError, subprocess.TimeoutExpired) as exc:
        log(f"bench/peer.py: FAILED: {exc}")
        bench.failures.append({"variant": "bench", "round": 0, "error": str(exc)})
    except (KeyboardInterrupt, Interrupted):
        log("bench/peer.py: interrupted; cleaning up")
        bench.failures.append({"variant": "bench", "round": 0, "error": "interrupted"})
        return 130
    finally:
        if bench.broker is not None:
            bench.broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    report(bench, args, results(bench, args, started))
    log(f"bench/peer.py: {time.monotonic() - started:.0f} s")
    return 1 if bench.failures else 0


if __name__ == "__main__":
    sys.exit(main())
