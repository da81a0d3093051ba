"""Network-namespace test bed: two namespaces joined by one veth pair.

Used by ``ctstream demo`` and by the integration tests.  Dependency-light: the
standard library plus the command-line tools ``ip``, ``nft``, ``ethtool``,
``conntrack``, ``ss`` and (for :meth:`Pair.iperf3`) ``iperf3``.  Traffic that
the tests count exactly (TCP, UDP, ICMP echo, packet capture) is produced by
small stdlib-only Python scripts run with ``sys.executable`` inside the
namespaces, so packet sizes and ICMP echo ids are known; no ``ping`` binary is
needed.

Rules kept here (see DESIGN.md, "Test bed"):

* addresses only from 198.18.0.0/15 and 2001:2::/48, only inside namespaces
  created here; no default routes;
* everything created is removed on exit, also on exceptions (``with`` block),
  and namespaces left behind by dead processes are removed by
  :func:`cleanup_stale` (called by :func:`make_pair`);
* every traffic command is bounded in count and in time.

The kernel's own nf_conntrack in the server namespace is the reference to
compare flows and counters with.  In a fresh namespace the kernel does not
track anything until some netfilter rule needs conntrack (conntrack hooks are
registered per namespace on demand), so :meth:`Host.enable_conntrack` loads a
small nftables ruleset with ``ct state`` rules and sets
``net.netfilter.nf_conntrack_acct=1`` (per namespace; it must be set before the
flows are created, the counters are an extension added at creation).
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import json
import math
import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator

from ..errors import TestbedError

__all__ = [
    "TestbedError",
    "Host",
    "Pair",
    "KernelFlow",
    "CapturedPacket",
    "Capture",
    "make_pair",
    "cleanup_stale",
    "require_root",
    "parse_conntrack_output",
    "NFT_CONNTRACK_RULESET",
]

IPV4_RANGE = ipaddress.IPv4Network("198.18.0.0/15")
IPV6_RANGE = ipaddress.IPv6Network("2001:2::/48")
MAX_PAIR_INDEX = IPV4_RANGE.num_addresses // 256  # one /24 per pair: 0..511

#: nftables ruleset that makes the kernel's conntrack track every packet in
#: the namespace it is loaded into (any rule with a ``ct`` expression makes
#: the kernel register its conntrack hooks for that namespace).  Note the
#: ``;`` before ``}``: nft 1.0.6 requires it.
NFT_CONNTRACK_RULESET = """\
table inet ctref {
    chain pre {
        type filter hook prerouting priority -150; policy accept;
        ct state new,established,related counter accept;
    }
    chain out {
        type filter hook output priority -150; policy accept;
        ct state new,established,related counter accept;
    }
}
"""

# Features switched off with offloads=False.  "tx off" (checksumming) also
# takes TSO down; "rx off" is receive checksumming.
_OFFLOAD_FEATURES = ("tso", "gso", "gro", "tx", "rx")

# IPv6 sysctls set in every namespace before its veth exists (the "default"
# values are inherited by devices created there): no DAD (addresses usable at
# once, link-local included), no router solicitations / RA processing.
_IPV6_SYSCTLS = (
    "net.ipv6.conf.all.accept_dad=0",
    "net.ipv6.conf.default.accept_dad=0",
    "net.ipv6.conf.all.accept_ra=0",
    "net.ipv6.conf.default.accept_ra=0",
    "net.ipv6.conf.default.router_solicitations=0",
)


def require_root() -> None:
    if os.geteuid() != 0:
        raise TestbedError(
            "needs root (network namespaces, veth, nftables, conntrack); "
            "run as root"
        )


# --------------------------------------------------------------------------
# subprocess helpers


def _fmt(argv: list[str]) -> str:
    return " ".join(str(a) for a in argv)


def _run(
    argv: list[str],
    timeout: float = 30,
    check: bool = True,
    **kw,
) -> subprocess.CompletedProcess:
    """subprocess.run with captured text output, a timeout, TestbedError."""
    if "input" not in kw:
        kw.setdefault("stdin", subprocess.DEVNULL)
    if not any(k in kw for k in ("stdout", "stderr", "capture_output")):
        kw["capture_output"] = True
    kw.setdefault("text", True)
    argv = [str(a) for a in argv]
    try:
        cp = subprocess.run(argv, timeout=timeout, **kw)
    except subprocess.TimeoutExpired as e:
        raise TestbedError(f"timed out after {timeout}s: {_fmt(argv)}") from e
    except OSError as e:
        raise TestbedError(f"cannot run {_fmt(argv)}: {e}") from e
    if check and cp.returncode != 0:
        err = cp.stderr or ""
        if isinstance(err, bytes):
            err = err.decode(errors="replace")
        raise TestbedError(
            f"command failed (rc={cp.returncode}): {_fmt(argv)}: {err.strip()}"
        )
    return cp


def _kill_proc(p: subprocess.Popen, timeout: float = 5) -> None:
    if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            p.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        p.wait(timeout=timeout)
    for f in (p.stdin, p.stdout, p.stderr):
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()


def _read_line(p: subprocess.Popen, timeout: float) -> bytes:
    """Read one line from an unbuffered (bufsize=0) stdout pipe, bounded."""
    fd = p.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TestbedError(f"no output within {timeout}s from {_fmt(p.args)}")
        r, _, _ = select.select([fd], [], [], left)
        if not r:
            continue
        chunk = os.read(fd, 1)
        if not chunk:
            err = b""
            with contextlib.suppress(Exception):
                p.wait(timeout=1)
                err = p.stderr.read() if p.stderr else b""
            raise TestbedError(
                f"{_fmt(p.args)} exited (rc={p.poll()}) before it was ready: "
                f"{err.decode(errors='replace').strip()}"
            )
        buf += chunk
    return buf


def _finish(p: subprocess.Popen, timeout: float, what: str) -> dict:
    """Wait for a helper script, return the JSON it printed last."""
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as e:
        _kill_proc(p)
        raise TestbedError(f"{what}: timed out after {timeout}s") from e
    out = out.decode(errors="replace") if isinstance(out, bytes) else (out or "")
    err = err.decode(errors="replace") if isinstance(err, bytes) else (err or "")
    if p.returncode != 0:
        raise TestbedError(f"{what}: exit {p.returncode}: {err.strip()[-2000:]}")
    lines = [ln for ln in out.splitlines() if ln.strip()]
    if not lines:
        raise TestbedError(f"{what}: printed no result; stderr: {err.strip()[-2000:]}")
    return json.loads(lines[-1])


# --------------------------------------------------------------------------
# helper scripts run inside the namespaces (stdlib only, bounded by timeouts)

# What every script starts with: its arguments by type, a socket of either
# family, a listener that prints "ready" once it is bound (the caller waits
# for that line), a bounded bulk send and a count of the bytes read to EOF.
_SCRIPT_LIB = r"""
import json, socket, sys
def args(*types):
    return [t(a) for t, a in zip(types, sys.argv[1:])]
def family_socket(fam, kind):
    return socket.socket(socket.AF_INET if fam == 4 else socket.AF_INET6, kind)
def listener(fam, addr, port, kind, timeout, backlog=None):
    s = family_socket(fam, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port))
    if backlog is not None:
        s.listen(backlog)
    s.settimeout(timeout)
    print("ready", flush=True)
    return s
def send_bytes(s, n, fill):
    chunk = fill * 65536
    left = n
    while left > 0:
        k = min(left, len(chunk))
        s.sendall(chunk[:k])
        left -= k
def recv_to_eof(s):
    n = 0
    while True:
        b = s.recv(65536)
        if not b:
            break
        n += len(b)
    return n
"""

_PING_SCRIPT = _SCRIPT_LIB + r"""
import select, struct, time
fam, dst, count, interval, wait, ident, size = args(int, str, int, float, float, int, int)
if fam == 4:
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    req, rep = 8, 0
else:
    # the kernel computes ICMPv6 checksums on raw ICMPv6 sockets
    s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    req, rep = 128, 129
def csum(b):
    if len(b) % 2:
        b += b"\0"
    t = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while t >> 16:
        t = (t & 0xFFFF) + (t >> 16)
    return ~t & 0xFFFF
payload = bytes((i & 0xFF) for i in range(size))
received = 0
for seq in range(1, count + 1):
    t0 = time.monotonic()
    c = 0
    if fam == 4:
        c = csum(struct.pack("!BBHHH", req, 0, 0, ident, seq) + payload)
    s.sendto(struct.pack("!BBHHH", req, 0, c, ident, seq) + payload, (dst, 0))
    deadline = t0 + wait
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        r, _, _ = select.select([s], [], [], left)
        if not r:
            break
        data = s.recv(65535)
        if fam == 4:
            data = data[(data[0] & 15) * 4:]
        if len(data) >= 8:
            t, _c, _k, i, sq = struct.unpack("!BBHHH", data[:8])
            if t == rep and i == ident and sq == seq:
                received += 1
                break
    if seq < count:
        time.sleep(max(0.0, interval - (time.monotonic() - t0)))
print(json.dumps({"sent": count, "received": received, "ident": ident}))
"""

_TCP_SERVER_SCRIPT = _SCRIPT_LIB + r"""
fam, addr, port, down, timeout = args(int, str, int, int, float)
ls = listener(fam, addr, port, socket.SOCK_STREAM, timeout, backlog=1)
c, peer = ls.accept()
ls.close()
c.settimeout(timeout)
n = recv_to_eof(c)
send_bytes(c, down, b"\x55")
c.close()
print(json.dumps({"received": n, "peer_port": peer[1]}))
"""

_TCP_CLIENT_SCRIPT = _SCRIPT_LIB + r"""
import time
fam, addr, port, up, timeout = args(int, str, int, int, float)
deadline = time.monotonic() + timeout
while True:
    s = family_socket(fam, socket.SOCK_STREAM)
    s.settimeout(max(0.1, deadline - time.monotonic()))
    try:
        s.connect((addr, port))
        break
    except ConnectionRefusedError:
        s.close()
        if time.monotonic() > deadline:
            raise
        time.sleep(0.05)
sport = s.getsockname()[1]
send_bytes(s, up, b"\xaa")
s.shutdown(socket.SHUT_WR)
n = recv_to_eof(s)
s.close()
print(json.dumps({"sport": sport, "received": n}))
"""

_UDP_SERVER_SCRIPT = _SCRIPT_LIB + r"""
fam, addr, port, count, timeout = args(int, str, int, int, float)
s = listener(fam, addr, port, socket.SOCK_DGRAM, timeout)
n = 0
try:
    while n < count:
        data, peer = s.recvfrom(65535)
        s.sendto(data, peer)
        n += 1
except socket.timeout:
    pass
print(json.dumps({"echoed": n}))
"""

_UDP_CLIENT_SCRIPT = _SCRIPT_LIB + r"""
fam, addr, port, count, size, wait = args(int, str, int, int, int, float)
s = family_socket(fam, socket.SOCK_DGRAM)
s.connect((addr, port))
s.settimeout(wait)
sport = s.getsockname()[1]
payload = b"\x5a" * size
got = 0
for i in range(count):
    s.send(payload)
    try:
        if s.recv(65535) == payload:
            got += 1
    except socket.timeout:
        pass
s.close()
print(json.dumps({"sport": sport, "received": got}))
"""

_TCP_MANY_SERVER_SCRIPT = _SCRIPT_LIB + r"""
import threading
fam, addr, port, count, timeout = args(int, str, int, int, float)
ls = listener(fam, addr, port, socket.SOCK_STREAM, timeout, backlog=max(128, min(count, 4096)))
done = threading.Semaphore(0)
def serve(c):
    try:
        c.settimeout(timeout)
        while True:
            b = c.recv(65536)
            if not b:
                break
            c.sendall(b)
    except OSError:
        pass
    finally:
        c.close()
        done.release()
threads = []
try:
    for _ in range(count):
        c, _peer = ls.accept()
        t = threading.Thread(target=serve, args=(c,), daemon=True)
        t.start()
        threads.append(t)
except socket.timeout:
    pass
for t in threads:
    t.join(timeout)
print(json.dumps({"served": len(threads)}))
"""

_TCP_MANY_CLIENT_SCRIPT = _SCRIPT_LIB + r"""
import threading, time
fam, addr, port, count, conc, size, timeout = args(int, str, int, int, int, int, float)
deadline = time.monotonic() + timeout
ports, errors = [], []
lock = threading.Lock()
nxt = [0]
payload = b"\x42" * size
def one():
    s = family_socket(fam, socket.SOCK_STREAM)
    s.settimeout(max(0.1, deadline - time.monotonic()))
    try:
        s.connect((addr, port))
        sport = s.getsockname()[1]
        s.sendall(payload)
        got = b""
        while len(got) < size:
            b = s.recv(size - len(got))
            if not b:
                raise OSError("connection closed early")
            got += b
        return sport
    finally:
        s.close()
def worker():
    while True:
        with lock:
            if nxt[0] >= count or time.monotonic() > deadline:
                return
            nxt[0] += 1
        try:
            sport = one()
            with lock:
                ports.append(sport)
        except OSError as e:
            with lock:
                errors.append(repr(e))
ts = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, min(conc, count)))]
for t in ts:
    t.start()
for t in ts:
    t.join(max(0.1, deadline - time.monotonic() + 1))
print(json.dumps({"ports": ports, "errors": errors[:10], "n_errors": len(errors)}))
"""

_CAPTURE_SCRIPT = _SCRIPT_LIB + r"""
import os, select, struct, time
ifname, max_packets, max_seconds, idle = args(str, int, float, float)
ETH_P_ALL = 3
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
s.bind((ifname, ETH_P_ALL))
print("ready", flush=True)
PROTO = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6"}
out, dropped = [], 0
deadline = time.monotonic() + max_seconds
stopping = False
stdin = sys.stdin.fileno()
def parse(data, pkttype):
    if len(data) < 14:
        return None
    (etype,) = struct.unpack("!H", data[12:14])
    p = data[14:]
    if etype == 0x0800 and len(p) >= 20:
        ihl = (p[0] & 15) * 4
        (length,) = struct.unpack("!H", p[2:4])
        proto = p[9]
        frag = struct.unpack("!H", p[6:8])[0] & 0x1FFF
        src, dst = socket.inet_ntop(socket.AF_INET, p[12:16]), socket.inet_ntop(socket.AF_INET, p[16:20])
        l4 = p[ihl:] if frag == 0 else b""
        fam = 4
    elif etype == 0x86DD and len(p) >= 40:
        (plen,) = struct.unpack("!H", p[4:6])
        length = 40 + plen
        proto = p[6]
        src, dst = socket.inet_ntop(socket.AF_INET6, p[8:24]), socket.inet_ntop(socket.AF_INET6, p[24:40])
        l4 = p[40:]
        fam = 6
    else:
        return None
    sport = dport = 0
    flags = None
    itype = None
    if proto in (6, 17) and len(l4) >= 4:
        sport, dport = struct.unpack("!HH", l4[:4])
        if proto == 6 and len(l4) >= 14:
            flags = l4[13]
    elif proto in (1, 58) and len(l4) >= 8:
        itype = l4[0]
        if itype in (0, 8, 128, 129):
            sport = dport = struct.unpack("!H", l4[4:6])[0]
    return {"dir": "out" if pkttype == 4 else "in", "family": fam,
            "proto": PROTO.get(proto, str(proto)), "src": src, "dst": dst,
            "sport": sport, "dport": dport, "length": length,
            "tcp_flags": flags, "icmp_type": itype, "t": time.time()}
while True:
    now = time.monotonic()
    if now >= deadline:
        break
    rl = [s] if stopping else [s, stdin]
    r, _, _ = select.select(rl, [], [], min(idle, deadline - now) if stopping else deadline - now)
    if not r:
        if stopping:
            break
        continue
    if stdin in r:
        if not os.read(stdin, 4096):
            stopping = True
    if s in r:
        data, addr = s.recvfrom(65535)
        rec = parse(data, addr[2])
        if rec is not None:
            if len(out) < max_packets:
                out.append(rec)
            else:
                dropped += 1
print(json.dumps({"packets": out, "dropped": dropped}))
"""


# --------------------------------------------------------------------------
# data types


@dataclass(frozen=True)
class KernelFlow:
    """One entry of the kernel's conntrack table (``conntrack -L``)."""

    family: int  # 4 or 6
    proto: str  # "tcp" | "udp" | "icmp" | "icmpv6"
    src: str  # original direction, ipaddress-normalised
    dst: str
    sport: int  # icmp/icmpv6: the echo id in both
    dport: int
    state: str | None  # TCP state (ESTABLISHED, TIME_WAIT, ...), else None
    packets_orig: int
    bytes_orig: int
    packets_reply: int
    bytes_reply: int
    assured: bool
    # extras (defaulted, so the fields above keep their positions)
    unreplied: bool = False
    timeout: int = 0  # seconds left, as printed


@dataclass(frozen=True)
class CapturedPacket:
    """One IPv4/IPv6 packet seen on a veth by :meth:`Host.capture`."""

    direction: str  # "in" (received by this host) or "out" (sent by it)
    family: int
    proto: str  # "tcp" | "udp" | "icmp" | "icmpv6" | protocol number as str
    src: str
    dst: str
    sport: int  # tcp/udp ports; icmp echo: the id in both; else 0
    dport: int
    length: int  # L3 length: IP header + payload, as nf_conntrack counts
    tcp_flags: int | None
    icmp_type: int | None
    t: float  # wall-clock time of reception by the capture process


@dataclass
class Capture:
    """Result holder of :meth:`Host.capture`; ``packets`` is filled on exit."""

    packets: list[CapturedPacket] = field(default_factory=list)
    dropped: int = 0

    def flow_counters(self, flow: KernelFlow) -> tuple[int, int, int, int]:
        """(packets_orig, bytes_orig, packets_reply, bytes_reply) of the
        captured packets that belong to ``flow`` (by its 5-tuple)."""
        po = bo = pr = br = 0
        for p in self.packets:
            if p.family != flow.family or p.proto != flow.proto:
                continue
            if flow.proto in ("icmp", "icmpv6") and p.icmp_type not in (0, 8, 128, 129):
                continue
            if (p.src, p.dst, p.sport, p.dport) == (flow.src, flow.dst, flow.sport, flow.dport):
                po += 1
                bo += p.length
            elif (p.src, p.dst, p.sport, p.dport) == (flow.dst, flow.src, flow.dport, flow.sport):
                pr += 1
                br += p.length
        return po, bo, pr, br


# --------------------------------------------------------------------------
# conntrack output parser

_CT_FAMILIES = {"ipv4": 4, "ipv6": 6}
_CT_PROTOS = {"tcp", "udp", "icmp", "icmpv6"}


def parse_conntrack_output(text: str) -> list[KernelFlow]:
    """Parse ``conntrack -L [-o extended]`` output into KernelFlows.

    Accepts the extended format (``ipv4 2 tcp 6 ...``) and the plain one
    (``tcp 6 ...``, family taken from the addresses).  Lines of other
    protocols, blank lines and conntrack's own messages are skipped; a
    tcp/udp/icmp/icmpv6 line that lacks addresses or ports raises ValueError.
    Counters are 0 when accounting is off (no ``packets=``/``bytes=``).
    """
    flows: list[KernelFlow] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        toks = line.split()
        if not toks:
            continue
        family: int | None = None
        if toks[0] in _CT_FAMILIES:
            family = _CT_FAMILIES[toks[0]]
            toks = toks[2:]  # drop "ipv4 2"
        if len(toks) < 3 or toks[0] not in _CT_PROTOS:
            continue
        proto = toks[0]
        try:
            timeout = int(toks[2])
        except ValueError as exc:
            raise ValueError(f"line {lineno}: bad timeout: {line!r}") from exc
        rest = toks[3:]
        state = None
        if rest and "=" not in rest[0] and not rest[0].startswith("["):
            state = rest[0]
            rest = rest[1:]
        dirs: list[dict[str, str]] = []
        flags: set[str] = set()
        for tok in rest:
            if tok.startswith("[") and tok.endswith("]"):
                flags.add(tok[1:-1])
                continue
            key, sep, val = tok.partition("=")
            if not sep:
                continue
            if key == "src":
                if len(dirs) >= 2:
                    raise ValueError(f"line {lineno}: more than two tuples: {line!r}")
                dirs.append({})
            if not dirs or key in dirs[-1]:
                # keys before the first tuple or after the reply tuple's
                # counters (mark=, use=, zone=, ...) are not needed
                continue
            dirs[-1][key] = val
        if len(dirs) != 2:
            raise ValueError(f"line {lineno}: expected original and reply tuple: {line!r}")
        orig, reply = dirs
        try:
            src = ipaddress.ip_address(orig["src"])
            dst = ipaddress.ip_address(orig["dst"])
            if proto in ("icmp", "icmpv6"):
                sport = dport = int(orig["id"])
            else:
                sport, dport = int(orig["sport"]), int(orig["dport"])
        except (KeyError, ValueError) as e:
            raise ValueError(f"line {lineno}: cannot parse {line!r}: {e}") from e
        fam = 4 if src.version == 4 else 6
        if family is not None and family != fam:
            raise ValueError(f"line {lineno}: family/address mismatch: {line!r}")
        flows.append(
            KernelFlow(
                family=fam,
                proto=proto,
                src=str(src),
                dst=str(dst),
                sport=sport,
                dport=dport,
                state=state if proto == "tcp" else None,
                packets_orig=int(orig.get("packets", 0)),
                bytes_orig=int(orig.get("bytes", 0)),
                packets_reply=int(reply.get("packets", 0)),
                bytes_reply=int(reply.get("bytes", 0)),
                assured="ASSURED" in flags,
                unreplied="UNREPLIED" in flags,
                timeout=timeout,
            )
        )
    return flows


# --------------------------------------------------------------------------
# hosts and pairs


@dataclass
class Host:
    """One end of a pair: a namespace and its veth."""

    netns: str
    ifname: str
    ipv4: str
    ipv6: str
    ifindex: int = 0
    mac: str = ""
    _procs: list = field(default_factory=list, init=False, repr=False, compare=False)

    def addr(self, family: int = 4) -> str:
        if family == 4:
            return self.ipv4
        if family == 6:
            return self.ipv6
        raise ValueError(f"family must be 4 or 6, not {family!r}")

    def _argv(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *[str(a) for a in argv]]

    def run(
        self, argv: list[str], timeout: float = 30, check: bool = True, **kw
    ) -> subprocess.CompletedProcess:
        """Run ``argv`` inside the namespace (``ip netns exec``), bounded."""
        return _run(self._argv(argv), timeout=timeout, check=check, **kw)

    def popen(self, argv: list[str], **kw) -> subprocess.Popen:
        """Start ``argv`` inside the namespace.  The process is killed when the
        pair is destroyed if it is still running."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        p = subprocess.Popen(self._argv(argv), **kw)
        self._procs[:] = [q for q in self._procs if q.poll() is None]
        self._procs.append(p)
        return p

    def python(self, script: str, *args, **kw) -> subprocess.Popen:
        """Start a stdlib-only Python snippet inside the namespace, with
        unbuffered binary pipes for stdout/stderr."""
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        kw.setdefault("bufsize", 0)
        return self.popen([sys.executable, "-I", "-c", script, *map(str, args)], **kw)

    def _server(self, script: str, *args, ready_timeout: float = 10) -> subprocess.Popen:
        p = self.python(script, *args)
        try:
            line = _read_line(p, ready_timeout)
            if line.strip() != b"ready":
                raise TestbedError(f"unexpected output from server: {line!r}")
        except BaseException:
            _kill_proc(p)
            raise
        return p

    def wait_listening(self, proto: str, port: int, timeout: float = 10,
                       proc: subprocess.Popen | None = None) -> None:
        """Poll ``ss`` until a socket listens on ``proto`` ("tcp"/"udp")
        ``port`` here (no probe traffic); fail early if ``proc`` exits."""
        flag = "-lt" if proto == "tcp" else "-lu"
        deadline = time.monotonic() + timeout
        while True:
            out = self.run(["ss", "-Hn", flag, f"sport = :{port}"], timeout=5).stdout
            if out.strip():
                return
            if proc is not None and proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise TestbedError(
                    f"{_fmt(proc.args)} exited (rc={proc.returncode}): {err.strip()}")
            if time.monotonic() > deadline:
                raise TestbedError(
                    f"nothing listening on {proto}/{port} in {self.netns} after {timeout}s")
            time.sleep(0.05)

    # -- conntrack (the kernel's, as a reference) --------------------------

    def enable_conntrack(self) -> None:
        """Make the kernel's nf_conntrack track everything in this namespace,
        with byte/packet accounting."""
        self.run(["sysctl", "-qw", "net.netfilter.nf_conntrack_acct=1"], timeout=10)
        self.run(["nft", "-f", "-"], input=NFT_CONNTRACK_RULESET, timeout=10)

    def conntrack_flows(self) -> list[KernelFlow]:
        flows: list[KernelFlow] = []
        for fam in ("ipv4", "ipv6"):
            cp = self.run(["conntrack", "-L", "-o", "extended", "-f", fam], timeout=15)
            flows.extend(f for f in parse_conntrack_output(cp.stdout)
                         if f.family == _CT_FAMILIES[fam])
        return flows

    def conntrack_flush(self) -> None:
        for fam in ("ipv4", "ipv6"):
            self.run(["conntrack", "-F", "-f", fam], timeout=15)

    # -- traffic ----------------------------------------------------------

    def ping(
        self,
        dst: str,
        count: int = 1,
        *,
        interval: float = 0.2,
        wait: float = 2.0,
        ident: int | None = None,
        size: int = 56,
        check: bool = True,
    ) -> int:
        """ICMP(v6) echo to ``dst`` (family from the address), ``count``
        requests ``interval`` s apart, each waiting up to ``wait`` s for its
        reply.  Returns the echo id used (random unless given).  With check,
        raises TestbedError unless every request got its reply."""
        if not 1 <= count <= 10000:
            raise ValueError("count must be in 1..10000")
        fam = ipaddress.ip_address(dst).version
        ident = ident if ident is not None else random.randint(1, 0xFFFF)
        limit = count * (interval + wait) + 10
        p = self.python(_PING_SCRIPT, fam, dst, count, interval, wait, ident, size)
        res = _finish(p, limit, f"ping {dst} from {self.netns}")
        if check and res["received"] != count:
            raise TestbedError(
                f"ping {dst} from {self.netns}: {res['received']}/{count} replies"
            )
        return ident

    @contextlib.contextmanager
    def capture(
        self, max_packets: int = 200_000, max_seconds: float = 120, idle: float = 0.2
    ) -> Iterator[Capture]:
        """Record every IPv4/IPv6 packet on this host's veth (both directions,
        L3 lengths) while the ``with`` body runs.  ``Capture.packets`` is
        filled when the block exits (after ``idle`` s without packets)."""
        cap = Capture()
        p = self.python(
            _CAPTURE_SCRIPT, self.ifname, max_packets, max_seconds, idle,
            stdin=subprocess.PIPE,
        )
        try:
            line = _read_line(p, 10)
            if line.strip() != b"ready":
                raise TestbedError(f"capture: unexpected output {line!r}")
            yield cap
            res = _finish(p, max_seconds + 10, f"capture on {self.netns}")
            cap.packets = [
                CapturedPacket(
                    direction=r["dir"], family=r["family"], proto=r["proto"],
                    src=r["src"], dst=r["dst"], sport=r["sport"], dport=r["dport"],
                    length=r["length"], tcp_flags=r["tcp_flags"],
                    icmp_type=r["icmp_type"], t=r["t"],
                )
                for r in res["packets"]
            ]
            cap.dropped = res["dropped"]
        finally:
            _kill_proc(p)


class Pair:
    """Two namespaces joined by one veth pair: ``client`` <-> ``server``.

    ``with make_pair() as pair:`` creates everything (and checks v4/v6
    reachability and, with conntrack=True, that the server namespace's
    conntrack tracks); leaving the block kills every process left in the
    namespaces and deletes them (which removes the veths), also when the body
    raises.  The conntrack table starts empty (flushed after the checks).
    """

    def __init__(
        self,
        client: Host,
        server: Host,
        *,
        index: int = 0,
        offloads: bool = False,
        conntrack: bool = True,
    ) -> None:
        self.client = client
        self.server = server
        self.index = index
        self.offloads = offloads
        self.conntrack = conntrack
        self._created: list[str] = []  # namespaces created, for destroy()

    @property
    def hosts(self) -> tuple[Host, Host]:
        return (self.client, self.server)

    def __repr__(self) -> str:
        return f"Pair(client={self.client!r}, server={self.server!r})"

    # -- lifecycle ---------------------------------------------------------

    def __enter__(self) -> "Pair":
        self.create()
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()

    def create(self) -> "Pair":
        require_root()
        try:
            self._create()
        except BaseException:
            self.destroy()
            raise
        return self

    def _create(self) -> None:
        c, s = self.client, self.server
        for h in (c, s):
            _run(["ip", "netns", "add", h.netns], timeout=10)
            self._created.append(h.netns)
            h.run(["sysctl", "-qw", *_IPV6_SYSCTLS], timeout=10)
        # created directly inside the namespaces: nothing ever appears in the
        # root namespace, so nothing can be left behind there
        _run(
            ["ip", "link", "add", c.ifname, "netns", c.netns, "type", "veth",
             "peer", "name", s.ifname, "netns", s.netns],
            timeout=10,
        )
        for h in (c, s):
            ns = ["ip", "-n", h.netns]
            _run([*ns, "link", "set", "lo", "up"], timeout=10)
            _run([*ns, "addr", "add", f"{h.ipv4}/24", "dev", h.ifname], timeout=10)
            _run([*ns, "addr", "add", f"{h.ipv6}/64", "dev", h.ifname, "nodad"], timeout=10)
            if not self.offloads:
                self._offloads_off(h)
            _run([*ns, "link", "set", h.ifname, "up"], timeout=10)
            info = json.loads(_run([*ns, "-j", "link", "show", "dev", h.ifname]).stdout)[0]
            h.ifindex = int(info["ifindex"])
            h.mac = info.get("address", "")
        if self.conntrack:
            s.enable_conntrack()
        # reachability, one echo each way per family (bounded: -W 2 style)
        idents = {}
        for fam in (4, 6):
            idents[fam] = c.ping(s.addr(fam), 1)
            s.ping(c.addr(fam), 1)
        if self.conntrack:
            flows = s.conntrack_flows()
            for fam, proto in ((4, "icmp"), (6, "icmpv6")):
                if not any(f.family == fam and f.proto == proto and f.sport == idents[fam]
                           for f in flows):
                    raise TestbedError(
                        f"conntrack in {s.netns} did not track the IPv{fam} ping "
                        f"(flows: {flows})"
                    )
            s.conntrack_flush()

    @staticmethod
    def _offloads_off(h: Host) -> None:
        argv = ["ethtool", "-K", h.ifname]
        for feat in _OFFLOAD_FEATURES:
            argv += [feat, "off"]
        if h.run(argv, timeout=10, check=False).returncode != 0:
            for feat in _OFFLOAD_FEATURES:  # one by one, ignoring fixed features
                h.run(["ethtool", "-K", h.ifname, feat, "off"], timeout=10, check=False)
            out = h.run(["ethtool", "-k", h.ifname], timeout=10).stdout
            for name in ("tcp-segmentation-offload", "generic-segmentation-offload",
                         "generic-receive-offload"):
                m = re.search(rf"^{name}: (\w+)", out, re.M)
                if m and m.group(1) != "off":
                    raise TestbedError(f"{h.netns}/{h.ifname}: cannot turn {name} off")
        # TCP builds GSO super-packets in software whatever the device
        # features say, and segments them only below netfilter/tc: the
        # sender's conntrack (LOCAL_OUT) and a tc egress hook would see one
        # 64 KB skb where the wire and XDP see MSS-sized packets.  One
        # segment per skb makes every layer see wire-sized packets.
        _run(["ip", "-n", h.netns, "link", "set", "dev", h.ifname, "gso_max_segs", "1"],
             timeout=10)

    def destroy(self) -> None:
        """Kill what runs in the namespaces, delete them.  Idempotent."""
        errors = []
        for h in (self.client, self.server):
            for p in h._procs:
                _kill_proc(p)
            h._procs.clear()
        for ns in list(self._created):
            try:
                _delete_netns(ns)
                self._created.remove(ns)
            except TestbedError as e:
                errors.append(str(e))
        if errors:
            raise TestbedError("; ".join(errors))

    # -- conntrack ---------------------------------------------------------

    def conntrack_flows(self) -> list[KernelFlow]:
        """The server namespace's conntrack table (IPv4 and IPv6)."""
        return self.server.conntrack_flows()

    def conntrack_flush(self) -> None:
        self.server.conntrack_flush()

    # -- traffic (client -> server) -----------------------------------------

    def ping(self, count: int, family: int = 4, **kw) -> int:
        """``count`` echo requests client -> server, 0.2 s apart, each waiting
        up to 2 s.  Returns the echo id (conntrack's id=)."""
        return self.client.ping(self.server.addr(family), count, **kw)

    def _exchange(self, what: str, limit: float, server: tuple,
                  client: tuple) -> tuple[dict, dict]:
        """Start ``server`` (a script and its arguments) in the server
        namespace and wait until it is ready, then run ``client`` in the
        client's; returns the results of both (client's, server's), each
        awaited ``limit`` s at most.  The server never outlives the call."""
        srv = self.server._server(*server)
        try:
            cres = _finish(self.client.python(*client), limit, f"{what} client")
            sres = _finish(srv, limit, f"{what} server")
        finally:
            _kill_proc(srv)
        return cres, sres

    def tcp_exchange(
        self,
        n_bytes_up: int,
        n_bytes_down: int,
        family: int = 4,
        port: int = 5001,
        timeout: float = 20,
    ) -> tuple[int, int]:
        """One TCP connection: the client sends ``n_bytes_up`` and FIN, the
        server reads to EOF, replies ``n_bytes_down`` and closes.  Returns
        (client source port, server port)."""
        dst = self.server.addr(family)
        cres, sres = self._exchange(
            "tcp_exchange", timeout + 5,
            (_TCP_SERVER_SCRIPT, family, dst, port, n_bytes_down, timeout),
            (_TCP_CLIENT_SCRIPT, family, dst, port, n_bytes_up, timeout))
        if sres["received"] != n_bytes_up or cres["received"] != n_bytes_down:
            raise TestbedError(f"tcp_exchange: short transfer: client {cres}, server {sres}")
        if sres["peer_port"] != cres["sport"]:
            raise TestbedError(f"tcp_exchange: port mismatch: client {cres}, server {sres}")
        return cres["sport"], port

    def udp_exchange(
        self,
        n_packets: int,
        payload: int,
        family: int = 4,
        port: int = 5002,
        wait: float = 2.0,
    ) -> int:
        """``n_packets`` datagrams of ``payload`` bytes client -> server, each
        echoed back (the client waits for each echo).  Returns the client's
        source port."""
        if not 1 <= n_packets <= 100000:
            raise ValueError("n_packets must be in 1..100000")
        dst = self.server.addr(family)
        limit = n_packets * wait + 10
        cres, sres = self._exchange(
            "udp_exchange", limit,
            (_UDP_SERVER_SCRIPT, family, dst, port, n_packets, wait + 5),
            (_UDP_CLIENT_SCRIPT, family, dst, port, n_packets, payload, wait))
        if cres["received"] != n_packets or sres["echoed"] != n_packets:
            raise TestbedError(f"udp_exchange: lost datagrams: client {cres}, server {sres}")
        return cres["sport"]

    def tcp_many(
        self,
        count: int,
        family: int = 4,
        port: int = 5003,
        concurrency: int = 8,
        size: int = 16,
        timeout: float = 60,
    ) -> list[int]:
        """``count`` short TCP connections from one client process
        (``concurrency`` at a time): each sends ``size`` bytes, reads the echo
        and closes (client FIN first).  Returns the client source ports."""
        if not 1 <= count <= 100000:
            raise ValueError("count must be in 1..100000")
        dst = self.server.addr(family)
        cres, sres = self._exchange(
            "tcp_many", timeout + 10,
            (_TCP_MANY_SERVER_SCRIPT, family, dst, port, count, timeout),
            (_TCP_MANY_CLIENT_SCRIPT, family, dst, port, count, concurrency, size, timeout))
        if cres["n_errors"] or len(cres["ports"]) != count:
            raise TestbedError(
                f"tcp_many: {len(cres['ports'])}/{count} connections, "
                f"{cres['n_errors']} errors: {cres['errors']}; server {sres}"
            )
        return cres["ports"]

    def iperf3(
        self,
        seconds: float,
        family: int = 4,
        port: int = 5201,
        reverse: bool = False,
        extra: list[str] | None = None,
    ) -> dict:
        """iperf3 client -> server for ``seconds`` (rounded up to whole
        seconds: iperf3 3.12 takes an integer), returns the client's JSON."""
        if shutil.which("iperf3") is None:
            raise TestbedError("iperf3 is not installed")
        secs = max(1, math.ceil(seconds))
        dst = self.server.addr(family)
        srv = self.server.popen(
            ["iperf3", "-s", "-1", "-B", dst, "-p", str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        try:
            self.server.wait_listening("tcp", port, timeout=10, proc=srv)
            argv = ["iperf3", "-c", dst, "-p", str(port), "-t", str(secs), "-J"]
            if reverse:
                argv.append("-R")
            argv += list(extra or [])
            cp = self.client.run(argv, timeout=secs + 20, check=False)
            try:
                res = json.loads(cp.stdout)
            except ValueError as exc:
                raise TestbedError(
                    f"iperf3 client: rc={cp.returncode}, no JSON: {cp.stderr.strip()}"
                ) from exc
            if cp.returncode != 0 or "error" in res:
                raise TestbedError(f"iperf3 client failed: {res.get('error', cp.stderr)}")
            with contextlib.suppress(subprocess.TimeoutExpired):
                srv.wait(timeout=5)
            return res
        finally:
            _kill_proc(srv)


# --------------------------------------------------------------------------
# namespaces


def _list_netns() -> list[str]:
    out = _run(["ip", "netns", "list"], timeout=10).stdout
    return [ln.split()[0] for ln in out.splitlines() if ln.strip()]


def _delete_netns(ns: str) -> None:
    """Kill every process inside ``ns`` and delete it (removes its links)."""
    if ns not in _list_netns():
        return
    cp = _run(["ip", "netns", "pids", ns], timeout=10, check=False)
    pids = [int(x) for x in cp.stdout.split() if x.isdigit()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            # our own children must be reaped, or they linger as zombies
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.01)
    _run(["ip", "netns", "delete", ns], timeout=10)


def pid_alive(pid: int) -> bool:
    """A process with this pid exists (perhaps not ours)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ns_regex(prefix: str) -> re.Pattern:
    return re.compile(rf"^{re.escape(prefix)}(\d+)-(\d+)[cs]$")


def cleanup_stale(prefix: str = "cts") -> list[str]:
    """Delete namespaces named ``<prefix><pid>-<n>c|s`` whose creating
    process (``pid``) is no longer alive.  Returns the names deleted."""
    rx = _ns_regex(prefix)
    removed = []
    for ns in _list_netns():
        m = rx.match(ns)
        if m and not pid_alive(int(m.group(1))):
            _delete_netns(ns)
            removed.append(ns)
    return removed


_serial = itertools.count()


def make_pair(
    prefix: str = "cts",
    offloads: bool = False,
    conntrack: bool = True,
    index: int = 0,
) -> Pair:
    """A Pair (not yet created: use it as a context manager).

    ``index`` selects the addresses: client 198.18.<index>.1/24 and
    2001:2:0:<index>::1/64, server .2 / ::2 (index 0..511; 256..511 map into
    198.19.x).  Namespace names are ``<prefix><pid>-<n>c`` / ``...s`` with a
    per-process serial ``n``, unique per process.  ``offloads=False`` turns
    TSO/GSO/GRO/checksum offloads off on both veth ends and sets
    ``gso_max_segs 1`` (so the stack builds no GSO super-packets): every
    hook, the kernel's conntrack included, sees wire-sized packets.
    ``conntrack=True`` enables the kernel's conntrack (with accounting) in the
    server namespace as a reference.
    """
    require_root()
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,7}", prefix):
        raise ValueError("prefix: 1-8 characters [A-Za-z0-9_], starting with a letter")
    if not 0 <= index < MAX_PAIR_INDEX:
        raise ValueError(f"index must be in 0..{MAX_PAIR_INDEX - 1}")
    cleanup_stale(prefix)
    base = f"{prefix}{os.getpid()}-{next(_serial)}"
    v4 = IPV4_RANGE.network_address + 256 * index
    v6 = IPV6_RANGE.network_address + (index << 64)
    client = Host(netns=base + "c", ifname="veth0", ipv4=str(v4 + 1), ipv6=str(v6 + 1))
    server = Host(netns=base + "s", ifname="veth0", ipv4=str(v4 + 2), ipv6=str(v6 + 2))
    return Pair(client, server, index=index, offloads=offloads, conntrack=conntrack)
