"""Expiry in real time: the sweeper programs (ct_sweep4, ct_sweep6) run through
BPF_PROG_TEST_RUN the way the daemon runs them, against entries the datapath
made from test frames.

Timeouts are 1 s (established 2 s). The expiry index works in slots of 2^30
ns (about 1.07 s) and consumes a slot only once two more have begun, so a
flow idle since t goes between t + timeout + 1 and t + timeout + 3.3 s. Tests
poll the sweepers every 0.2 s up to a deadline instead of sleeping a fixed
time, and every test starts the sweepers before it makes its flows, as the
daemon does.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest

from streamer.datapath import abi
from streamer.datapath.config import Timeouts
from tests.bpf.packets import TC_ACT_SHOT, Bench, Flow, loaded_bench, monotonic_slot

pytestmark = pytest.mark.root

SHORT = Timeouts(syn=1, established=2, fin=1, udp=1, icmp=1, other=1)
EXPIRY_SLACK = 4.5   # seconds past the timeout within which an idle entry must go

U4 = Flow("10.9.0.1", "10.9.0.2", "udp", 5000, 53)
U6 = Flow("2001:db8:9::1", "2001:db8:9::2", "udp", 5000, 53)
I4 = Flow("10.9.0.1", "10.9.0.2", "icmp", 77)
I6 = Flow("2001:db8:9::1", "2001:db8:9::2", "icmp", 77)


@pytest.fixture(scope="module")
def module_bench():
    with loaded_bench(table_limit=4096, report_interval=0, timeouts=SHORT) as b:
        yield b


@pytest.fixture
def bench(module_bench):
    """A clean table, cursors seeded as for a new one."""
    module_bench.reset()
    return module_bench


def sweep_until(bench, done, timeout: float, families=(4, 6), repeat: int = 50,
                ack: bool = True) -> list:
    """Run the sweepers every 0.2 s until done(events so far) or the deadline,
    acking each DESTROY as the daemon does; returns the events that arrived."""
    events = []
    deadline = time.monotonic() + timeout
    while True:
        for family in families:
            bench.sweep(family, budget=2, repeat=repeat)
        got = bench.events()
        if ack:
            bench.ack(got)
        events += got
        if done(events) or time.monotonic() > deadline:
            return events
        time.sleep(0.2)


def destroys(events) -> list:
    return [e for e in events if e.type == abi.EV_DESTROY]


def n_destroyed(n: int):
    return lambda events: len(destroys(events)) >= n


def assert_index_empty(bench, families=(4, 6)):
    """No entry, live or dying, is left, and no slot that is due still holds
    records. What may remain are records under future slots (the retry slots
    of acked outbox copies, a far slot a FIN brought forward): they name
    nothing now, and the sweeper skips them as stale when their time comes."""
    for family in families:
        bench.sweep(family, budget=2, repeat=10)
        assert bench.table(family) == {} and bench.outbox(family) == {}
        assert all(slot >= monotonic_slot() - 1 for slot, fam in bench.slots() if fam == family), \
            "a due slot was left unconsumed"


def handshake(f: Flow):
    return [f.orig("S"), f.reply("SA"), f.orig("A")]


# ---- one flow's end ---------------------------------------------------------------

def test_idle_udp_flow_expires_once_with_its_final_counters(bench):
    for p in (U4.orig(payload=bytes(10)), U4.orig(payload=bytes(10)), U4.reply(payload=bytes(20))):
        bench.send(p)
    made = bench.events()
    assert [e.type for e in made] == [abi.EV_CREATE, abi.EV_UPDATE]
    last_ns = bench.entry(U4).last_ns

    events = sweep_until(bench, n_destroyed(1), SHORT.udp + EXPIRY_SLACK)
    events += sweep_until(bench, lambda _: False, 0.5)  # nothing more may come

    assert [e.type for e in events] == [abi.EV_DESTROY]
    (d,) = events
    assert d.ct_id == made[0].ct_id and d.seq == 2
    assert abi.END_NAMES[d.end_reason] == "idle"
    assert (d.pkts_orig, d.pkts_reply, d.bytes_orig, d.bytes_reply) == (2, 1, 76, 48)
    assert (d.state, d.flags) == (abi.S_NONE, abi.F_ASSURED | abi.F_SEEN_REPLY)
    assert d.last_ns == last_ns
    assert d.ts_ns - d.last_ns >= SHORT.udp * 1e9  # not before its time
    assert (d.sport, d.dport, d.saddr) == (U4.sport, U4.dport, bytes([10, 9, 0, 1]))

    assert bench.entry(U4) is None
    assert bench.glob()["entries"] == 0
    assert_index_empty(bench)
    stats = bench.stats()
    assert (stats["created"], stats["destroyed"]) == (1, 1)


def test_end_reasons_fin_rst_and_idle(bench):
    t_fin = Flow("10.9.1.1", "10.9.1.2", "tcp", 1001, 80)
    t_rst = Flow("10.9.1.1", "10.9.1.2", "tcp", 1002, 80)
    t_syn = Flow("10.9.1.1", "10.9.1.2", "tcp", 1003, 80)
    t_est = Flow("10.9.1.1", "10.9.1.2", "tcp", 1004, 80)
    frames = (handshake(t_fin) + [t_fin.orig("FA"), t_fin.reply("FA"), t_fin.orig("A")] +
              handshake(t_rst) + [t_rst.reply("R")] +
              [t_syn.orig("S")] + handshake(t_est))
    for p in frames:
        bench.send(p)
    states = {f.sport: bench.entry(f).state_name for f in (t_fin, t_rst, t_syn, t_est)}
    assert states == {1001: "TIME_WAIT", 1002: "CLOSE", 1003: "SYN_SENT", 1004: "ESTABLISHED"}
    bench.events()

    events = sweep_until(bench, n_destroyed(4), SHORT.established + EXPIRY_SLACK)
    reasons = {e.sport: (abi.STATE_NAMES[e.state], abi.END_NAMES[e.end_reason])
               for e in destroys(events)}
    assert reasons == {1001: ("TIME_WAIT", "fin"), 1002: ("CLOSE", "rst"),
                       1003: ("SYN_SENT", "idle"), 1004: ("ESTABLISHED", "idle")}
    assert len(destroys(events)) == 4
    assert bench.glob()["entries"] == 0
    assert_index_empty(bench)


def test_refreshed_flow_outlives_its_due_slot_then_expires(bench):
    """Packets every 0.5 s for 4 s with a 1 s timeout: the sweeper meets the
    entry in its due slot, finds it refreshed and files it again, until the
    packets stop. A report interval of 1 s also makes periodic UPDATEs."""
    bench.configure(report_interval=1.0)
    sent, events = 0, []
    start = time.monotonic()
    while time.monotonic() - start < 4.0:
        bench.send(U4.orig(payload=bytes(8)))
        sent += 1
        events += sweep_until(bench, lambda _: True, 0)
        time.sleep(0.5)
    assert destroys(events) == [], "destroyed while packets kept it alive"
    assert bench.stats()["rescheduled"] > 0
    assert bench.entry(U4).pkts == (sent, 0)

    events += sweep_until(bench, n_destroyed(1), SHORT.udp + EXPIRY_SLACK)
    kinds = [e.type for e in events]
    assert kinds[0] == abi.EV_CREATE and kinds[-1] == abi.EV_DESTROY
    assert kinds.count(abi.EV_DESTROY) == 1
    (d,) = destroys(events)
    assert (d.pkts_orig, abi.END_NAMES[d.end_reason]) == (sent, "idle")

    # Periodic UPDATEs while it lived: about one per slot, counters growing.
    updates = [e for e in events if e.type == abi.EV_UPDATE]
    assert 2 <= len(updates) <= 5
    assert [e.seq for e in events] == list(range(len(events)))
    assert [e.pkts_orig for e in updates] == sorted(e.pkts_orig for e in updates)
    assert bench.glob()["entries"] == 0
    assert_index_empty(bench)


def test_fin_brings_a_long_timeout_forward(bench):
    """ESTABLISHED has 30 s here; the FIN state 1 s. Once the entry is filed
    under its far ESTABLISHED slot, a FIN must file it under an earlier one,
    or it would live for 30 s."""
    bench.configure(timeouts=Timeouts(syn=1, established=30, fin=1, udp=1, icmp=1, other=1))
    t = Flow("10.9.2.1", "10.9.2.2", "tcp", 2001, 443)
    for p in handshake(t):
        bench.send(p)
    # Let the sweeper meet the SYN's due slot and move the entry to the far one.
    sweep_until(bench, lambda _: bench.entry(t).sched_slot > monotonic_slot() + 20, 5.0)
    far = bench.entry(t).sched_slot
    assert far > monotonic_slot() + 20

    bench.send(t.orig("FA"))
    assert bench.entry(t).sched_slot < far
    start = time.monotonic()
    events = sweep_until(bench, n_destroyed(1), SHORT.fin + EXPIRY_SLACK)
    assert time.monotonic() - start < SHORT.fin + EXPIRY_SLACK
    (d,) = destroys(events)
    assert (abi.STATE_NAMES[d.state], abi.END_NAMES[d.end_reason]) == ("FIN_WAIT", "fin")
    assert bench.glob()["entries"] == 0
    # The record left under the far slot is stale; it stays until its slot.
    assert far in {slot for slot, _ in bench.slots()}
    assert_index_empty(bench)


def test_ipv6_flows_expire_through_ct_sweep6_alone(bench):
    t6 = Flow("2001:db8:9::1", "2001:db8:9::2", "tcp", 3001, 80)
    for p in [U6.orig(payload=bytes(4)), I6.orig(), I6.reply()] + handshake(t6) + [t6.orig("R")]:
        bench.send(p)
    bench.send(U4.orig(payload=bytes(4)))  # IPv4: ct_sweep6 must leave it alone
    bench.events()

    events = sweep_until(bench, n_destroyed(3), SHORT.udp + EXPIRY_SLACK, families=(6,))
    got = {(e.proto, abi.END_NAMES[e.end_reason]) for e in destroys(events)}
    assert got == {(17, "idle"), (58, "idle"), (6, "rst")}
    assert all(e.family == 6 for e in events)
    assert len(bench.table(6)) == 0 and len(bench.table(4)) == 1
    assert bench.glob()["entries"] == 1
    assert_index_empty(bench, families=(6,))


def test_sweeper_refuses_a_request_for_the_other_family(bench):
    from streamer.datapath import bpfsys

    for prog, family in (("ct_sweep4", 6), ("ct_sweep6", 4)):
        retval, _, _ = bpfsys.test_run(bench.dp.prog_fd(prog), abi.pack_sweep_req(family, 2))
        assert retval == TC_ACT_SHOT


def test_mixed_families_and_protocols_expire_together(bench):
    t4 = Flow("10.9.3.1", "10.9.3.2", "tcp", 4001, 80)
    t6 = Flow("2001:db8:9::1", "2001:db8:9::2", "tcp", 4002, 80)
    frames = ([U4.orig(payload=bytes(4)), U6.orig(payload=bytes(4)), I4.orig(), I6.orig()] +
              handshake(t4) + [t4.orig("FA"), t4.reply("FA"), t4.orig("A")] +
              handshake(t6) + [t6.reply("RA")])
    for p in frames:
        bench.send(p)
    made = [e.ct_id for e in bench.events() if e.type == abi.EV_CREATE]
    assert len(made) == 6

    events = sweep_until(bench, n_destroyed(6), SHORT.udp + EXPIRY_SLACK)
    got = Counter((e.family, e.proto, abi.END_NAMES[e.end_reason]) for e in destroys(events))
    assert got == Counter({(4, 17, "idle"): 1, (6, 17, "idle"): 1, (4, 1, "idle"): 1,
                           (6, 58, "idle"): 1, (4, 6, "fin"): 1, (6, 6, "rst"): 1})
    assert sorted(e.ct_id for e in destroys(events)) == sorted(made)
    assert bench.glob()["entries"] == 0
    assert_index_empty(bench)


# ---- bounded work --------------------------------------------------------------------

def test_sweep_work_per_call_is_bounded_and_every_flow_still_ends_once(bench):
    n = 2000
    flows = [Flow(f"10.{10 + i // 250}.{i % 250}.1", "10.99.0.1", "udp", 20000 + i, 53)
             for i in range(n)]
    for f in flows:
        bench.send(f.orig(payload=bytes(4)))
    created = [e.ct_id for e in bench.events()]
    assert len(created) == n == bench.glob()["entries"]

    # Wait, without sweeping, until every flow's slot may be consumed.
    due = max(e.sched_slot for e in bench.table(4).values())
    while monotonic_slot() < due + 2:
        time.sleep(0.1)

    before = bench.stats()["swept"]
    req = bench.sweep(4, budget=2, repeat=10)
    swept = bench.stats()["swept"] - before
    first = destroys(bench.events())
    bench.ack(first)
    assert 0 < swept <= 20
    assert len(first) <= swept
    assert req["pending"] > 0
    assert bench.glob()["entries"] >= n - 20

    events = first + sweep_until(bench, lambda ev: len(first) + len(destroys(ev)) >= n,
                                 10.0, families=(4,), repeat=512)
    ended = [e.ct_id for e in destroys(events)]
    assert len(ended) == n
    assert Counter(ended) == Counter(created)  # each exactly once
    assert all(abi.END_NAMES[e.end_reason] == "idle" for e in events)
    assert bench.glob()["entries"] == 0
    assert_index_empty(bench)


# ---- the first sweep --------------------------------------------------------------

def test_flows_made_before_the_first_sweep_still_expire(datapath_factory):
    """The loader seeds the sweeper cursors before anything is attached; a
    sweeper that first runs long after the first packets must still find
    their slots (an unseeded cursor would jump to now - 2 and skip them)."""
    dp = datapath_factory(table_limit=64, report_interval=0, timeouts=SHORT)
    fresh = Bench(dp)
    try:
        g = fresh.glob()
        assert 0 < g["cursor4"] <= monotonic_slot() - 2 and g["cursor6"] == g["cursor4"]
        fresh.send(U4.orig(payload=bytes(4)))
        fresh.send(U6.orig(payload=bytes(4)))
        due = max(fresh.entry(U4).sched_slot, fresh.entry(U6).sched_slot)
        while monotonic_slot() < due + 3:
            time.sleep(0.1)
        events = sweep_until(fresh, n_destroyed(2), 2.0)
        assert sorted(e.family for e in destroys(events)) == [4, 6]
        assert fresh.glob()["entries"] == 0
    finally:
        fresh.close()
