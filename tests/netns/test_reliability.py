"""The delivery promise end to end: every connection's DESTROY reaches the
sink, through a ring shrunk to its minimum and across a SIGKILLed daemon.

The real `ctstream events` runs as a subprocess against the server veth of a
test-bed pair (XDP ingress + tc egress), with a jsonl sink and short
timeouts. Thousands of real short TCP connections run through it. What is
checked comes from three sides that do not depend on each other: the source
ports the traffic generator returned (every connection that happened), the
sink file (what the daemon made durable), and the kernel's own nf_conntrack
in the server namespace (which keeps TIME_WAIT entries for 120 s, so it
still lists every connection when the checks run).

Delivery is at-least-once: a DESTROY may appear more than once (same ct_id
and seq, same counters); a missing one is a failure. CREATE and UPDATE events
may be lost while the ring is full or no daemon runs; the DESTROY may not.
The sink's lines are wire records (the Kafka records' names, each checked
against the schema), read with tests/wire_records.py.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from streamer.datapath import abi
from streamer.demo import testbed
from streamer.datapath.table import PinnedTable
from tests.netns.test_cli import CTSTREAM, ctstream, detach_and_remove
from tests.wire_records import (COUNTERS, END_OF_FLOW, IDLE_TIMEOUT, KERNEL_COUNTERS, flow_key,
                                read_json_lines, same_event)

pytestmark = pytest.mark.root

ATTACH_TIMEOUT = 30   # compile (BCC) + load (or adopt) + attach
TCP_PORT = 5003
UDP_PORT = 5002
# Short enough that every connection ends within seconds of its last packet,
# long enough that none expires while its traffic runs.
TIMEOUTS = ["--timeout-syn", "3", "--timeout-established", "3", "--timeout-fin", "2",
            "--timeout-udp", "2", "--timeout-icmp", "2", "--report-interval", "0"]
GRACE = ["--grace", "3"]
# The smallest legal TCP/IPv4 packet is 40 bytes of headers (IPv6: 60).
MIN_HEADERS = {4: 40, 6: 60}
IP_HEADER = {4: 20, 6: 40}


def stats(pin: str) -> dict:
    res = ctstream("stats", "-o", "json", "--pin-dir", pin)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def outbox_listing(pin: str) -> list[dict]:
    res = ctstream("list", "--dying", "-o", "json", "--pin-dir", pin)
    assert res.returncode == 0, res.stderr
    return [json.loads(ln) for ln in res.stdout.splitlines() if ln.strip()]


def wait_drained(pin: str, timeout: float) -> dict:
    """Poll until the table and the outbox are empty (every connection ended
    and its DESTROY was acked); the stats at that moment."""
    deadline = time.monotonic() + timeout
    while True:
        st = stats(pin)
        assert st["entries"] < 1 << 63 and st["outbox"] < 1 << 63, f"a table counter went below 0: {st}"
        if st["entries"] == 0 and st["outbox"] == 0 and not outbox_listing(pin):
            return st
        if time.monotonic() > deadline:
            pytest.fail(f"not drained {timeout} s after the traffic: {st}; "
                        f"outbox: {outbox_listing(pin)[:5]}")
        time.sleep(0.5)


def xdp_attached(host: testbed.Host) -> bool:
    return "xdp" in host.run(["ip", "link", "show", host.ifname]).stdout


def key(x) -> tuple:
    """Original-direction tuple of a sink record (dict) or a KernelFlow."""
    if isinstance(x, dict):
        return flow_key(x)
    return (x.family, x.proto, x.src, x.dst, x.sport, x.dport)


# --- the daemon as a subprocess ------------------------------------------------------


class Daemon:
    """One `ctstream events` process; its stdout and stderr go to a file
    (nothing can block on a full pipe), read up to "tracking on"."""

    def __init__(self, argv: list[str], log: Path, env: dict | None = None):
        self.log = log
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f,
                                         stderr=subprocess.STDOUT,
                                         env={**os.environ, **env} if env else None)
        deadline = time.monotonic() + ATTACH_TIMEOUT
        while "tracking on" not in self.output():
            if self.proc.poll() is not None:
                pytest.fail(f"ctstream events exited (rc={self.proc.returncode}): {self.output()}")
            assert time.monotonic() < deadline, \
                f"not attached after {ATTACH_TIMEOUT} s: {self.output()}"
            time.sleep(0.1)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)

    def terminate(self, timeout: float = 20) -> tuple[int, float]:
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=timeout)
        return rc, time.monotonic() - t0


@dataclass
class Bed:
    pair: testbed.Pair
    pin: str
    sink: Path
    logs: Path
    daemons: list[Daemon] = field(default_factory=list)

    def start(self, *extra: str, env: dict | None = None) -> Daemon:
        argv = [CTSTREAM, "events", "-n", self.pair.server.netns, "-i", self.pair.server.ifname,
                "--egress", "--pin-dir", self.pin, "--sink", f"jsonl:{self.sink}",
                *TIMEOUTS, *GRACE, *extra]
        d = Daemon(argv, self.logs / f"events{len(self.daemons)}.log", env)
        self.daemons.append(d)
        return d


@pytest.fixture
def bed(pin_dir, tmp_path):
    """A pair with the kernel's conntrack on, a private pin dir and sink
    file. Whatever a failed test left is killed, detached and removed."""
    with testbed.make_pair(prefix="ctsrel", offloads=False, conntrack=True, index=3) as pair:
        b = Bed(pair, pin_dir, tmp_path / "events.jsonl", tmp_path)
        try:
            yield b
        finally:
            for d in b.daemons:
                if d.proc.poll() is None:
                    d.proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    d.proc.wait(timeout=10)
            detach_and_remove(pin_dir)


# --- what the sink holds ---------------------------------------------------------------


@dataclass
class Record:
    events: list[dict]      # CREATE / UPDATE / DESTROY, in file order, duplicates included
    lost: list[dict]        # LOST records
    torn: int               # lines that are not JSON (a daemon killed mid-line)

    @classmethod
    def read(cls, path: Path) -> "Record":
        """The sink file's records, each validated against the schema."""
        records, torn = read_json_lines(path.read_text())
        events = [r for r in records if r["eventType"] != "LOST"]
        return cls(events, [r for r in records if r["eventType"] == "LOST"], torn)

    def by_ct_id(self) -> dict[int, list[dict]]:
        out = collections.defaultdict(list)
        for ev in self.events:
            out[ev["ctId"]].append(ev)
        return out

    def destroys(self) -> dict[tuple, list[dict]]:
        out = collections.defaultdict(list)
        for ev in self.events:
            if ev["eventType"] == "DESTROY":
                out[key(ev)].append(ev)
        return out


def check_record(rec: Record) -> dict:
    """Checks that hold for any sink record; returns figures for the report.
    Two copies of one (ctId, seq) must be the same event: everything but
    when they were sent, how often, and which earlier losses they carried."""
    copies = collections.defaultdict(list)
    for ev in rec.events:
        copies[(ev["ctId"], ev["seq"])].append(ev)
    for (ct_id, seq), evs in copies.items():
        assert all(same_event(evs[0], e) for e in evs[1:]), \
            f"ct_id {ct_id} seq {seq}: copies differ: {evs}"
    tuples_of = collections.defaultdict(set)
    missing_seqs = 0
    for ct_id, evs in rec.by_ct_id().items():
        tuples_of[ct_id] = {key(e) for e in evs}
        assert len(tuples_of[ct_id]) == 1, f"ct_id {ct_id} names several flows: {tuples_of[ct_id]}"
        destroy_seqs = {e["seq"] for e in evs if e["eventType"] == "DESTROY"}
        assert len(destroy_seqs) == 1, f"ct_id {ct_id}: DESTROY seqs {destroy_seqs}"
        last = destroy_seqs.pop()
        seqs = {e["seq"] for e in evs}
        assert max(seqs) == last, f"ct_id {ct_id}: an event after the DESTROY: {sorted(seqs)}"
        missing_seqs += last + 1 - len(seqs)
        ordered = sorted({e["seq"]: e for e in evs}.values(), key=lambda e: e["seq"])
        for a, b in zip(ordered, ordered[1:]):
            for c in COUNTERS:
                assert a[c] <= b[c], f"ct_id {ct_id}: {c} went down from seq {a['seq']} to {b['seq']}"
    flows = collections.Counter(next(iter(t)) for t in tuples_of.values())
    twice = [k for k, n in flows.items() if n > 1]
    assert not twice, f"flows tracked under more than one ct_id: {twice[:5]}"
    destroy_lines = sum(1 for e in rec.events if e["eventType"] == "DESTROY")
    return {"lines": len(rec.events), "unique": len(copies), "duplicates": len(rec.events) - len(copies),
            "destroy_lines": destroy_lines, "destroys": len(tuples_of),
            "destroy_retried_lines": sum(1 for e in rec.events
                                         if e["eventType"] == "DESTROY" and e["retries"]),
            "missing_events": missing_seqs, "torn": rec.torn}


def check_tcp_connections(rec: Record, pair: testbed.Pair, family: int, ports: list[int],
                          kernel: dict[tuple, testbed.KernelFlow]) -> None:
    """Every connection the generator made has its DESTROY, plausible
    counters, and the very counters of the kernel's conntrack."""
    destroys = rec.destroys()
    src, dst = pair.client.addr(family), pair.server.addr(family)
    missing, differ = [], []
    for sport in ports:
        k = (family, "tcp", src, dst, sport, TCP_PORT)
        if k not in destroys:
            missing.append(sport)
            continue
        ev = destroys[k][0]
        # SYN, ACK, data, FIN, last ACK one way; SYN/ACK, echo, FIN the other
        assert ev["initiatorPackets"] >= 5 and ev["responderPackets"] >= 3, ev
        assert ev["initiatorOctets"] >= ev["initiatorPackets"] * MIN_HEADERS[family] + 16, ev
        assert ev["responderOctets"] >= ev["responderPackets"] * MIN_HEADERS[family] + 16, ev
        # TIME_WAIT: closed by FINs, and the end seen in the packets
        assert ev["assured"] and ev["tcpState"] == "TIME_WAIT", ev
        assert ev["flowEndReason"] == END_OF_FLOW, ev
        assert ev["tcpControlBits"] & 0x13 == 0x13 and ev["reverseTcpControlBits"] & 0x13 == 0x13, ev
        kf = kernel.get(k)
        assert kf is not None, f"{k}: not in the kernel's conntrack"
        ours = tuple(ev[c] for c in COUNTERS)
        theirs = tuple(getattr(kf, c) for c in KERNEL_COUNTERS)
        if ours != theirs:
            differ.append((k, ours, theirs))
    assert not missing, f"IPv{family}: {len(missing)} of {len(ports)} connections have no DESTROY: {missing[:10]}"
    assert not differ, f"IPv{family}: {len(differ)} DESTROYs differ from the kernel (ours, kernel): {differ[:5]}"


def kernel_flows(pair: testbed.Pair) -> dict[tuple, testbed.KernelFlow]:
    return {key(f): f for f in pair.conntrack_flows()}


def report(name: str, figures: dict) -> None:
    print(f"\n{name}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


# --- 1. the smallest ring --------------------------------------------------------------


def test_minimum_ring_every_destroy_reaches_the_sink(bed):
    """A 4 KB ring (32 events) and thousands of short connections: the
    datapath loses NEW/UPDATE events (missed bits), the sweeper is paced by
    the ring's room, and every DESTROY reaches the sink."""
    pair = bed.pair
    daemon = bed.start("--ring-size", "4096")
    t0 = time.monotonic()
    ports4 = pair.tcp_many(3000, family=4, port=TCP_PORT, concurrency=16, timeout=90)
    ports6 = pair.tcp_many(300, family=6, port=TCP_PORT, concurrency=16, timeout=60)
    udp = [(4, pair.udp_exchange(3, 200, family=4, port=UDP_PORT)),
           (6, pair.udp_exchange(3, 200, family=6, port=UDP_PORT))]
    traffic_s = time.monotonic() - t0
    st = wait_drained(bed.pin, timeout=60)
    kernel = kernel_flows(pair)
    rc, took = daemon.terminate()
    assert rc == 0, daemon.output()
    assert "Traceback" not in daemon.output()
    assert not os.path.exists(bed.pin) and not xdp_attached(pair.server)

    rec = Record.read(bed.sink)
    assert rec.torn == 0, "a torn line, though the daemon was never killed"
    figures = check_record(rec)
    assert len(set(ports4)) == len(ports4) and len(set(ports6)) == len(ports6)
    check_tcp_connections(rec, pair, 4, ports4, kernel)
    check_tcp_connections(rec, pair, 6, ports6, kernel)
    destroys = rec.destroys()
    for family, sport in udp:
        k = (family, "udp", pair.client.addr(family), pair.server.addr(family), sport, UDP_PORT)
        assert k in destroys, f"UDP {k}: no DESTROY"
        ev = destroys[k][0]
        assert (ev["initiatorPackets"], ev["responderPackets"]) == (3, 3), ev
        assert ev["initiatorOctets"] == ev["responderOctets"] == 3 * (IP_HEADER[family] + 8 + 200), ev
        assert ev["flowEndReason"] == IDLE_TIMEOUT, ev

    connections = len(ports4) + len(ports6) + len(udp)
    assert figures["destroys"] == connections, "DESTROYs of connections the generator did not make"
    assert st["created"] == st["destroyed"] == connections, st
    # every outbox copy was acked exactly once, none went out unguarded
    assert st["outbox_full"] == 0 and st["acked"] == connections, st
    # The daemon ran throughout and stopped cleanly: every event that
    # reached the ring is in the file, and nothing was made up.
    assert st["events"] == figures["lines"], (st, figures)
    # Each event the ring refused left a seq gap or a DESTROY to resend.
    assert figures["missing_events"] <= st["ring_full"], (st, figures)
    assert figures["destroy_retried_lines"] <= st["destroy_retries"], (st, figures)
    # LOST records carry the totals since the datapath was loaded (by this
    # daemon): they only grow, and never pass the final count.
    ring_full = [r["lost"]["ring_full"] for r in rec.lost]
    assert ring_full == sorted(ring_full) and all(n <= st["ring_full"] for n in ring_full)
    check_missed_bits_cover_the_gaps(rec)
    report("minimum ring", {"connections": connections, "traffic_s": round(traffic_s, 1),
                            "stop_s": round(took, 1), **figures,
                            **{k: st[k] for k in ("events", "ring_full", "missed_redelivered",
                                                  "destroy_retries", "acked", "ack_stale",
                                                  "early_drops")}})


def check_missed_bits_cover_the_gaps(rec: Record) -> None:
    """With the daemon never killed, an event is missing from the file only
    because the ring refused it, and then its type went into the entry's
    missed mask, which a later event of the flow (at the latest its DESTROY)
    carries out."""
    for ct_id, evs in rec.by_ct_id().items():
        seqs = {e["seq"] for e in evs}
        last = max(seqs)
        reported = 0
        for e in evs:
            reported |= e["missedEvents"]
        gaps = set(range(last + 1)) - seqs
        if 0 in gaps:
            assert reported & abi.MISSED_CREATE, f"ct_id {ct_id}: NEW missing, not reported: {evs}"
        if gaps - {0}:
            assert reported & abi.MISSED_UPDATE, f"ct_id {ct_id}: UPDATE missing, not reported: {evs}"


# --- 2. SIGKILL, 20 s without a daemon, restart -------------------------------------------


class Generator(threading.Thread):
    """Short TCP connections in batches until told to stop; every source
    port tcp_many returned is kept. A failure is kept for the test."""

    def __init__(self, pair: testbed.Pair, batch: int = 200, period: float = 0.8):
        super().__init__(name="traffic", daemon=True)
        self.pair, self.batch, self.period = pair, batch, period
        self.ports: list[int] = []
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.progress: list[tuple[float, int]] = []   # (monotonic, connections so far)

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                t0 = time.monotonic()
                self.ports += self.pair.tcp_many(self.batch, family=4, port=TCP_PORT,
                                                 concurrency=8, timeout=30)
                self.progress.append((time.monotonic(), len(self.ports)))
                self.stop.wait(max(0.0, self.period - (time.monotonic() - t0)))
        except BaseException as exc:  # handed to the test
            self.error = exc

    def finish(self, timeout: float = 60) -> list[int]:
        self.stop.set()
        self.join(timeout)
        assert not self.is_alive(), "traffic generator did not stop"
        if self.error:
            raise self.error
        return self.ports


def kill_while_destroys_await_their_ack(daemon: Daemon, pin: str, timeout: float = 10) -> None:
    """SIGKILL the daemon at a moment when the outbox holds DESTROYs it has
    not acked yet (they go out each sweep and are acked within a batch, so
    the window is short: watch the pinned counters from this process)."""
    deadline = time.monotonic() + timeout
    with PinnedTable(pin) as table:
        while table.stats()["outbox"] == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        daemon.kill()


def test_sigkill_for_20s_then_restart_loses_no_destroy(bed):
    """SIGKILL while traffic runs and DESTROYs await their ack, 20 s without
    a daemon (the ring overflows), then a new daemon adopts the pinned table,
    outbox and ring: every connection has its DESTROY, under one ct_id, with
    the kernel's counters; nothing is counted twice."""
    pair = bed.pair
    ring = ["--ring-size", "1m"]   # 8,192 events: 20 s without a reader overflow it
    first = bed.start(*ring)
    gen = Generator(pair)
    gen.start()
    try:
        time.sleep(5)
        assert gen.ports, f"no connection in 5 s: {gen.error!r}"
        kill_while_destroys_await_their_ack(first, bed.pin)
        killed_at, made_before = time.monotonic(), len(gen.ports)
        assert "adopted" not in first.output()
        st_killed = stats(bed.pin)
        assert st_killed["outbox"] > 0, "killed with an empty outbox: test too weak"
        # the kernel goes on without a daemon: programs attached, maps pinned
        time.sleep(19)
        assert gen.is_alive(), f"traffic stopped: {gen.error!r}"
        assert xdp_attached(pair.server)
        assert "clsact" in pair.server.run(["tc", "qdisc", "show", "dev", pair.server.ifname]).stdout
        assert {"ct4", "ct6", "ct_events"} <= set(os.listdir(bed.pin))
        st_alone = stats(bed.pin)
        made_alone = len(gen.ports) - made_before
        # Nobody sweeps: every connection made meanwhile is still in the
        # table. (The batch running at the kill was partly counted then.)
        assert made_alone > gen.batch
        assert st_alone["created"] - st_killed["created"] >= made_alone - gen.batch, (st_killed, st_alone)
        assert st_alone["entries"] - st_killed["entries"] >= made_alone - gen.batch, (st_killed, st_alone)
        assert st_alone["ring_full"] > st_killed["ring_full"], "the ring never filled: test too weak"
        # ... and nothing ends: the DESTROYs awaiting an ack at the kill wait on
        assert (st_alone["destroyed"], st_alone["outbox"]) == (st_killed["destroyed"], st_killed["outbox"])
        second = bed.start(*ring)
        restarted_at = time.monotonic()
        assert "(adopted the pinned table)" in second.output()
        time.sleep(max(0.0, 35 - (restarted_at - killed_at) - 5))
    finally:
        ports = gen.finish()
    st = wait_drained(bed.pin, timeout=60)
    kernel = kernel_flows(pair)
    rc, took = second.terminate()
    assert rc == 0, second.output()
    assert "Traceback" not in first.output() + second.output()
    assert not os.path.exists(bed.pin) and not xdp_attached(pair.server)

    rec = Record.read(bed.sink)
    assert rec.torn <= 1, f"{rec.torn} unparseable lines after one kill"
    assert len(set(ports)) == len(ports), "the client reused a source port: connections ambiguous"
    figures = check_record(rec)        # one ct_id per flow, one DESTROY seq per ct_id
    check_tcp_connections(rec, pair, 4, ports, kernel)   # counters = the kernel's: none doubled
    assert figures["destroys"] == len(ports), "DESTROYs of connections the generator did not make"
    assert st["created"] == st["destroyed"] == len(ports), st
    assert st["outbox_full"] == 0 and st["acked"] == len(ports), st
    # lines lost with the first daemon (written, never fsync'd, never acked)
    # are missing from the file, so the file holds at most what was sent
    assert figures["lines"] <= st["events"], (st, figures)
    report("sigkill", {"connections": len(ports), "before_kill": made_before,
                       "while_killed": made_alone, "no_daemon_s": round(restarted_at - killed_at, 1),
                       "stop_s": round(took, 1), **figures,
                       "entries_at_restart": st_alone["entries"],
                       "outbox_at_kill": st_killed["outbox"], "outbox_at_restart": st_alone["outbox"],
                       **{k: st[k] for k in ("events", "ring_full", "missed_redelivered",
                                             "destroy_retries", "acked", "ack_stale")}})
