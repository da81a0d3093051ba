"""A SYN flood against the tracked host, with real connections before and
during it (issue: table pressure and floods).

hping3 sends SYNs from random sources (--rand-source) to a closed port of the
server, about 10,000 a second for 12 s: several times the table's size, each
one a new unassured entry. The server's replies to those sources find no
route and die in its namespace (test namespaces have no default route). Real
TCP connections from the client run before and during the flood. The
datapath must never evict anything to make room (never LRU); instead the
sweeper drops unassured entries early above the high watermark. Checked:

- every real connection is tracked from its SYN to its end: one ct_id, one
  DESTROY (reason fin), whose per-direction packets and L3 bytes equal the
  kernel's own conntrack figures for it;
- no assured entry is dropped early; every early drop has its DESTROY;
- the table never holds more than its limit;
- afterwards the table and the outbox drain to empty.

One session carries the whole run (a module fixture); the checks are tests
over its record. Bounded: 12 s of flood, at most 150,000 SYNs.
"""

from __future__ import annotations

import asyncio
import collections
import subprocess
from dataclasses import dataclass, field

import pytest

from streamer.demo import testbed
from streamer.datapath.config import DatapathConfig, Timeouts
from streamer.daemon import Session, Target
from streamer.datapath.events import Event
from tests.netns.test_tracking import key, recorded_run

pytestmark = pytest.mark.root

LIMIT = 16384
FLOOD_S = 12
FLOOD_GAP_US = 100           # hping3 -i u100: at most 10,000 SYNs a second
FLOOD_MAX = 150_000
FLOOD_PORT = 5999            # nothing listens there
# SYN entries would live 8 s: at the flood's rate that is several tables' worth.
TIMEOUTS = Timeouts(syn=8, established=20, fin=2, udp=5, icmp=5, other=5)
REAL_BEFORE = 60
REAL_DURING = [40] * 5       # connections per batch, one batch a second


@dataclass
class FloodRun:
    events: list[Event]
    real: list[tuple]                      # (sport, dport) of every real connection
    kernel: dict[tuple, testbed.KernelFlow]
    max_entries: int
    samples: int
    drained: bool
    counters: dict
    client: str
    flood_rc: int | None = None
    by_ct_id: dict = field(default_factory=dict)


async def _flood_run(pin_dir: str) -> FloodRun:
    events: list[Event] = []
    cfg = DatapathConfig(pin_dir=pin_dir, table_limit=LIMIT, timeouts=TIMEOUTS,
                         report_interval=0, grace=4, sweep_interval=0.1)
    with testbed.make_pair(prefix="ctsfld", offloads=False, conntrack=True) as pair:
        target = Target([pair.server.ifname], netns=pair.server.netns, egress=True)
        async with Session(cfg, target, events.append, lost_interval=0) as s:
            real = [(p, 5003) for p in await asyncio.to_thread(
                pair.tcp_many, REAL_BEFORE, 4, 5003, 4)]
            flood = pair.client.popen(
                ["timeout", str(FLOOD_S), "hping3", "-q", "-S", "-p", str(FLOOD_PORT),
                 "--rand-source", "-i", f"u{FLOOD_GAP_US}", "-c", str(FLOOD_MAX),
                 pair.server.addr(4)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                samples: list[int] = []

                async def sample() -> None:
                    while flood.poll() is None:
                        samples.append(s.dp.global_state()["entries"])
                        await asyncio.sleep(0.01)

                sampler = asyncio.create_task(sample())
                await asyncio.sleep(1.5)  # let the table fill first
                for i, n in enumerate(REAL_DURING):
                    port = 5004 + i
                    real += [(p, port) for p in await asyncio.to_thread(
                        pair.tcp_many, n, 4, port, 4)]
                    await asyncio.sleep(1.0)
                await asyncio.to_thread(flood.wait, FLOOD_S + 10)
                await sampler
            finally:
                if flood.poll() is None:
                    flood.kill()
                    flood.wait()
            kernel = {key(f): f for f in await asyncio.to_thread(pair.conntrack_flows)}
            drained = await s.wait_until_empty(timeout=TIMEOUTS.syn + 15)
            counters = s.counters()
        return FloodRun(events, real, kernel, max(samples, default=0), len(samples), drained,
                        counters, pair.client.addr(4), flood.returncode)


@pytest.fixture(scope="module")
def run():
    return recorded_run(_flood_run)


def test_it_was_a_flood(run):
    c = run.counters
    assert run.flood_rc in (0, 124)  # hping3 ended by its count or by timeout
    # Several tables' worth of connections, most of them ended early.
    assert c["created"] >= 3 * LIMIT
    assert c["early_drops"] >= c["created"] // 2
    assert run.samples >= 100


def test_every_real_connection_is_tracked_to_its_end_with_the_kernels_counters(run):
    real = set(run.real)
    assert len(real) == REAL_BEFORE + sum(REAL_DURING)
    mine = collections.defaultdict(set)
    destroys = collections.defaultdict(list)
    for ev in run.events:
        if ev.src == run.client and (ev.sport, ev.dport) in real:
            mine[(ev.sport, ev.dport)].add(ev.ct_id)
            if ev.type == "DESTROY":
                destroys[(ev.sport, ev.dport)].append(ev)
    assert set(mine) == real, "real connections the datapath never tracked"
    assert all(len(ids) == 1 for ids in mine.values()), "a real connection split in two"
    compared = 0
    for conn in real:
        ds = destroys[conn]
        assert ds, f"no DESTROY for {conn}"
        d = ds[0]
        assert all((x.seq, x.packets_orig, x.bytes_orig) == (d.seq, d.packets_orig, d.bytes_orig)
                   for x in ds), "duplicates of one DESTROY differ"
        assert (d.end_reason, d.state, d.assured) == ("fin", "TIME_WAIT", True), d
        k = run.kernel.get(key(d))
        if k is None:
            continue
        compared += 1
        assert (d.packets_orig, d.packets_reply, d.bytes_orig, d.bytes_reply) == \
            (k.packets_orig, k.packets_reply, k.bytes_orig, k.bytes_reply), (d, k)
    # TIME_WAIT lasts 120 s in the kernel: it still lists them all.
    assert compared == len(real)


def test_no_assured_entry_is_dropped_and_every_drop_has_its_destroy(run):
    early = [ev for ev in run.events if ev.type == "DESTROY" and ev.end_reason == "early"]
    assert early
    assert not [ev for ev in early if ev.assured]
    assert not [ev for ev in early if ev.src == run.client]
    assert all(ev.state == "SYN_SENT" and ev.dport == FLOOD_PORT for ev in early)
    # Accounting is complete: every connection made has a DESTROY.
    created = {ev.ct_id for ev in run.events if ev.type == "NEW"}
    ended = {ev.ct_id for ev in run.events if ev.type == "DESTROY"}
    assert run.counters["created"] == run.counters["destroyed"]
    assert ended >= created
    assert run.counters["early_drops"] == len({ev.ct_id for ev in early})


def test_the_table_never_holds_more_than_its_limit_and_drains(run):
    assert 0 < run.max_entries <= LIMIT
    assert run.drained
    assert (run.counters["entries"], run.counters["outbox"]) == (0, 0)
    assert run.counters["acked"] == run.counters["destroyed"]
    assert run.counters["outbox_full"] == 0
