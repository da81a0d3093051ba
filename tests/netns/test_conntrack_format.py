"""`ctstream list` and `ctstream events -o conntrack` against the kernel's
own `conntrack -L` and `conntrack -E`, for the same live flows.

ctstream's datapath on the server's veth of a test-bed pair (XDP ingress, tc
egress) and the kernel's conntrack in the same namespace (with
nf_conntrack_acct) see the same packets: TCP, UDP and ICMP echo over IPv4 and
IPv6, and a UDP datagram nobody answers. The kernel's per-state timeouts are
set to ctstream's. Every line is cut into its fields (the event tag, the
layer 3 and 4 names and numbers, the timeout, the TCP state, both tuples
with their counters, the flags, mark, use, id), and for every flow the two
must have the same fields in the same order with the same values, except:
- the timeout: each within its own configured range (a NEW or UPDATE shows
  the state's whole timeout: ctstream's exactly, the kernel's perhaps a
  second less, as it rounds jiffies down);
- id=: each its own numbering (ctstream's is the same in events and list);
- [ASSURED] of UDP and ICMP: ctstream's flag (set by the first reply), which
  the kernel sets later (UDP) or never (ICMP): ctstream's lines must carry it
  exactly when a reply was seen, and are compared without it.
conntrack's filters are compared the same way: `ctstream list ARGS` must
show the flows `conntrack -L ARGS` shows.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import select
import signal
import subprocess
import sys
import time

import pytest

from streamer.demo import testbed
from tests.netns.test_cli import ATTACH_TIMEOUT, CTSTREAM, ctstream, detach_and_remove

pytestmark = pytest.mark.root

PAIR_INDEX = 117      # 198.18.117.0/24, 2001:2:0:75::/64: no other test's
# Long enough that nothing ends before both tables are listed, short enough
# that every flow's DESTROY comes within seconds after that.
TIMEOUTS = {"syn": 20, "established": 60, "fin": 15, "udp": 15, "icmp": 15}
KERNEL_SYSCTLS = {
    "tcp_timeout_syn_sent": "syn", "tcp_timeout_syn_recv": "syn",
    "tcp_timeout_established": "established", "tcp_timeout_fin_wait": "fin",
    "tcp_timeout_close_wait": "fin", "tcp_timeout_last_ack": "fin",
    "tcp_timeout_time_wait": "fin", "tcp_timeout_close": "fin", "udp_timeout": "udp",
    "udp_timeout_stream": "udp", "icmp_timeout": "icmp", "icmpv6_timeout": "icmp",
}
UNANSWERED_PORT = 5999
TUPLE_KEYS = ("src", "dst", "sport", "dport", "type", "code", "id", "packets", "bytes")


def configured(proto: str, state: str | None) -> int:
    if proto == "tcp":
        return TIMEOUTS["syn" if state in ("SYN_SENT", "SYN_RECV") else
                        "established" if state == "ESTABLISHED" else "fin"]
    return TIMEOUTS["udp" if proto == "udp" else "icmp"]


# ---------------------------------------------------------------- lines into fields

def fields(line: str) -> list[tuple[str, str]]:
    """A conntrack line as (name, value) pairs in order: the positional words
    named (tag, l3, l3num, proto, protonum, timeout, state), each tuple's
    key=value named orig.KEY / reply.KEY, flags as ([FLAG], ""), and what
    follows the reply tuple (mark, use, vlan, the entry's id) by its key."""
    toks = line.split()
    out, i = [], 0
    if toks[0].startswith("["):
        out.append(("tag", toks[0]))
        i = 1
    if toks[i] in ("ipv4", "ipv6"):
        out += [("l3", toks[i]), ("l3num", toks[i + 1])]
        i += 2
    out += [("proto", toks[i]), ("protonum", toks[i + 1])]
    i += 2
    if toks[i].isdigit():
        out.append(("timeout", toks[i]))
        i += 1
    if "=" not in toks[i] and not toks[i].startswith("["):
        out.append(("state", toks[i]))
        i += 1
    section, seen, prev, tuples = "", set(), "", 0
    for tok in toks[i:]:
        if tok.startswith("["):
            out.append((tok, ""))
            continue
        key, _, value = tok.partition("=")
        if key == "src" and tuples < 2:
            tuples += 1
            section, seen = ("orig", "reply")[tuples - 1], set()
        # an ICMP tuple's id follows its code; any other id is the entry's
        in_tuple = key in TUPLE_KEYS and key not in seen and (key != "id" or prev == "code")
        if section in ("orig", "reply") and not in_tuple:
            section = "trailer"
        seen.add(key)
        prev = key
        out.append((f"{section}.{key}" if section != "trailer" else key, value))
    return out


def flow_key(fs: list[tuple[str, str]]) -> tuple:
    d = dict(fs)
    return (d["proto"], d["orig.src"], d["orig.dst"], d.get("orig.sport", d.get("orig.id")),
            d.get("orig.dport", d.get("orig.id")))


def compare(ours: str, kernels: str, listing: bool) -> str:
    """ctstream's fields after the checks that allow a difference (see the
    module's doc), asserted equal to the kernel's; returns ctstream's id."""
    a, k = fields(ours), fields(kernels)
    da, dk = dict(a), dict(k)
    proto, state = da["proto"], da.get("state")
    if proto != "tcp":
        replied = "[UNREPLIED]" not in da
        assert ("[ASSURED]" in da) == replied, (ours, "ctstream assures on the first reply")
        assert "[ASSURED]" not in dk or proto == "udp", kernels
        a = [f for f in a if f[0] != "[ASSURED]"]
        k = [f for f in k if f[0] != "[ASSURED]"]
        ours, kernels = ours.replace(" [ASSURED]", ""), kernels.replace(" [ASSURED]", "")
    if "timeout" in da:
        full = configured(proto, state)
        if listing:     # the seconds left
            assert 0 <= int(da["timeout"]) <= full, ours
            assert 0 <= int(dk["timeout"]) <= configured(proto, dk.get("state")), kernels
        else:           # the state's whole timeout
            assert int(da["timeout"]) == full, ours
            assert full - 1 <= int(dk["timeout"]) <= full, kernels
    # byte for byte: the same words (below) with the same spaces between them
    assert re.findall(r"\s+", ours) == re.findall(r"\s+", kernels), \
        f"\nctstream: {ours!r}\nkernel:   {kernels!r}"
    own = {"timeout", "id"}
    assert [n for n, _ in a] == [n for n, _ in k], f"\nctstream: {ours}\nkernel:   {kernels}"
    assert [f for f in a if f[0] not in own] == [f for f in k if f[0] not in own], \
        f"\nctstream: {ours}\nkernel:   {kernels}"
    return da.get("id", "")


# ---------------------------------------------------------------- processes

class Lines:
    """What a process writes to one of its pipes, line by line, read as it
    comes with bounded waits."""

    def __init__(self, proc: subprocess.Popen, pipe):
        self.proc, self.fd = proc, pipe.fileno()
        self.lines: list[str] = []
        self._rest = b""

    def until(self, done, timeout: float, what: str) -> list[str]:
        deadline = time.monotonic() + timeout
        while not done(self.lines):
            left = deadline - time.monotonic()
            assert left > 0, f"{what}: not within {timeout} s; got:\n" + "\n".join(self.lines)
            ready, _, _ = select.select([self.fd], [], [], left)
            chunk = os.read(self.fd, 65536) if ready else b""
            if ready and not chunk:
                pytest.fail(f"{what}: the process exited (rc={self.proc.wait(10)}):\n"
                            + "\n".join(self.lines))
            *complete, self._rest = (self._rest + chunk).split(b"\n")
            self.lines += [c.decode() for c in complete]
        return self.lines


def by_flow(lines: list[str]) -> dict[tuple, list[str]]:
    out = collections.defaultdict(list)
    for line in lines:
        if line.strip():
            out[flow_key(fields(line))].append(line)
    return out


def destroys_of(keys):
    return lambda lines: keys <= {k for k, ls in by_flow(lines).items()
                                  if any(x.startswith("[DESTROY]") for x in ls)}


@pytest.fixture
def bed(pin_dir):
    with testbed.make_pair(prefix="ctsfmt", offloads=False, conntrack=True,
                           index=PAIR_INDEX) as pair:
        for name, which in KERNEL_SYSCTLS.items():
            pair.server.run(["sysctl", "-qw", f"net.netfilter.nf_conntrack_{name}="
                                              f"{TIMEOUTS[which]}"])
        procs: list[subprocess.Popen] = []
        try:
            yield pair, pin_dir, procs
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.communicate(timeout=10)
            detach_and_remove(pin_dir)


def start_events(pair, pin: str, procs: list) -> tuple[subprocess.Popen, Lines]:
    argv = [CTSTREAM, "events", "-n", pair.server.netns, "-i", pair.server.ifname, "--egress",
            "--pin-dir", pin, "-o", "id", "--report-interval", "0", "--lost-interval", "0"]
    for name, seconds in TIMEOUTS.items():
        argv += [f"--timeout-{name}", str(seconds)]
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, bufsize=0)
    procs.append(p)
    Lines(p, p.stderr).until(lambda ls: any("tracking on" in x for x in ls), ATTACH_TIMEOUT,
                             "ctstream events attached")
    return p, Lines(p, p.stdout)


def start_kernel_events(pair) -> Lines:
    """`conntrack -E -o id` in the server namespace, once it provably hears
    events: pings until the NEW of one shows (the pings are flows too; the
    events of those before it may be missing, so they are not compared)."""
    p = pair.server.popen(["stdbuf", "-oL", "conntrack", "-E", "-o", "id"],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0)
    ev = Lines(p, p.stdout)
    for _ in range(20):
        probe = f" id={pair.ping(1, family=4)} "
        with contextlib.suppress(AssertionError):
            ev.until(lambda ls: any(x.startswith("    [NEW] icmp") and probe in x for x in ls),
                     2, "conntrack -E")
            return ev
    pytest.fail("conntrack -E heard none of 20 pings")


def traffic(pair) -> set[tuple]:
    """The flows compared event by event, by their original tuple."""
    c, s = pair.client, pair.server
    flows = set()
    for fam in (4, 6):
        sport, _ = pair.tcp_exchange(2_000, 6_000, family=fam)
        flows.add(("tcp", c.addr(fam), s.addr(fam), str(sport), "5001"))
        uport = pair.udp_exchange(2, 100, family=fam)
        flows.add(("udp", c.addr(fam), s.addr(fam), str(uport), "5002"))
        ident = str(pair.ping(2, family=fam))
        flows.add(("icmp" if fam == 4 else "icmpv6", c.addr(fam), s.addr(fam), ident, ident))
    out = c.run([sys.executable, "-I", "-c",
                 "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
                 f"s.bind(('{c.ipv4}', 0)); s.sendto(b'x' * 10, ('{s.ipv4}', "
                 f"{UNANSWERED_PORT})); print(s.getsockname()[1])"], timeout=10)
    flows.add(("udp", c.ipv4, s.ipv4, out.stdout.strip(), str(UNANSWERED_PORT)))
    return flows


def listing(pair, pin: str, *args: str) -> tuple[dict, dict]:
    """`ctstream list ARGS` and `conntrack -L ARGS`, by flow."""
    ours = ctstream("list", "--pin-dir", pin, *args)
    assert ours.returncode == 0, ours.stderr
    kernel = pair.server.run(["conntrack", "-L", *args], timeout=15)
    return by_flow(ours.stdout.splitlines()), by_flow(kernel.stdout.splitlines())


def await_kernel_destroys(pair, kernel: Lines, flows: set) -> None:
    """The kernel's DESTROYs of flows whose timeouts ran out: a dump evicts
    the expired entries it meets, each with its DESTROY (the kernel's own
    collector may take a minute). Not a flush: conntrack marks the DESTROYs
    of a flush `[USERSPACE] portid=... progname=conntrack`."""
    for _ in range(20):
        pair.server.run(["conntrack", "-L"], timeout=15)
        with contextlib.suppress(AssertionError):
            kernel.until(destroys_of(flows), 1, "the kernel's DESTROYs")
            return
    pytest.fail("the kernel's DESTROYs did not come:\n" + "\n".join(kernel.lines))


# ---------------------------------------------------------------- the test

# Each picks some of the flows and not all (the TCP flows are in TIME_WAIT).
FILTERS = [
    ("-p", "tcp"), ("-p", "udp", "-f", "ipv6"), ("-p", "58"), ("-f", "ipv4"),
    ("-s", "198.18.117.1"), ("-d", "2001:2:0:75::2"), ("-s", "198.18.117.0/24", "-p", "icmp"),
    ("-r", "198.18.117.2"), ("-q", "2001:2:0:75::1", "-p", "tcp"),
    ("-p", "tcp", "--state", "TIME_WAIT"), ("-p", "udp", "--dport", str(UNANSWERED_PORT)),
    ("-p", "udp", "--dport", "5002", "-f", "ipv4"),
]


def test_list_and_events_print_what_conntrack_prints(bed):
    pair, pin, procs = bed
    events_proc, ours = start_events(pair, pin, procs)
    kernel = start_kernel_events(pair)
    flows = traffic(pair)
    assert len(flows) == 7

    # conntrack -L: every flow of both tables, field by field.
    ids: dict[tuple, set[str]] = collections.defaultdict(set)
    for opts in (("-o", "id"), ("-o", "extended,id"), ()):
        mine, theirs = listing(pair, pin, *opts)
        assert set(mine) == set(theirs) and flows <= set(mine), (mine, theirs)
        for k in mine:
            assert len(mine[k]) == len(theirs[k]) == 1, (mine[k], theirs[k])
            ids[k].add(compare(mine[k][0], theirs[k][0], listing=True))
    assert all(len(v - {""}) == 1 for v in ids.values()), ids
    assert any("[UNREPLIED]" in x for ls in mine.values() for x in ls)

    # conntrack -L's filters pick the same flows.
    everything = set(mine)
    tcp4 = next(k for k in flows if k[0] == "tcp" and "." in k[1])
    for args in FILTERS + [("-p", "tcp", "--sport", tcp4[3])]:
        mine, theirs = listing(pair, pin, *args)
        assert set(mine) == set(theirs), (args, mine, theirs)
        assert set() < set(mine) < everything, (args, mine)

    # conntrack -E: each flow's events, in order, once both sides timed it out.
    ours.until(destroys_of(flows), max(TIMEOUTS.values()) + 15, "ctstream's DESTROYs")
    await_kernel_destroys(pair, kernel, flows)
    events_proc.send_signal(signal.SIGINT)
    assert events_proc.wait(timeout=15) == 0
    mine, theirs = by_flow(ours.lines), by_flow(kernel.lines)
    for k in flows:
        assert [x.split()[0] for x in mine[k]] == [x.split()[0] for x in theirs[k]], \
            (mine[k], theirs[k])
        assert {compare(a, b, listing=False) for a, b in zip(mine[k], theirs[k])} == ids[k] - {""}
    tcp = [x for k in flows if k[0] == "tcp" for x in mine[k]]
    assert {x.split()[4] for x in tcp if not x.startswith("[DESTROY]")} >= \
        {"SYN_SENT", "ESTABLISHED", "TIME_WAIT"}
