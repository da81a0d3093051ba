"""The dying outbox, missed events and early drop, through BPF_PROG_TEST_RUN.

A connection that ends stays in the table, in place and marked as being in
the outbox (CT_LAST_OUTBOX), until the daemon acks its DESTROY (ct_ack4/
ct_ack6: the DESTROY's key and ct_id). A new connection that needs the tuple
first moves it to the tuple's key with key.dying set (CT_KEY_DYING |
generation); an ack naming the tuple still finds it there. Unacked, the sweeper
emits the DESTROY again after a jittered grace time, same ct_id and seq,
retries + 1. An event that finds the ring full leaves its type's bit in the
entry; the next event that gets through carries it. Under table pressure
ct_early4/ct_early6 end unassured live entries, soonest due first.

Most ends here are made without waiting: a new SYN on a closed tuple ends
the old connection at once (TCP reuse), and early drop ends flows on demand.
Only the retry and missed-event tests run in real time; they poll the
sweepers every 0.2 s up to a deadline, and assert loose bounds on timing.
"""

from __future__ import annotations

import struct
import time
from collections import Counter

import pytest

from streamer.datapath import abi
from streamer.datapath import bpfsys
from streamer.datapath.config import Timeouts
from tests.bpf.packets import TC_ACT_OK, Flow, loaded_bench, monotonic_slot

pytestmark = pytest.mark.root

SLOT_S = (1 << abi.SLOT_SHIFT) / 1e9   # one index slot, about 1.07 s
POLL_S = 0.2
GRACE = 2.0                            # the smallest grace the config allows
TABLE_LIMIT = 64
# Long timeouts: nothing expires by itself in the main bench's tests.
LONG = Timeouts(syn=20, established=40, fin=10, udp=30, icmp=10, other=30)
# The small-ring bench: UDP, SYN and FIN go in about a second, ICMP fillers stay.
RING_TIMEOUTS = Timeouts(syn=1, established=10, fin=1, udp=1, icmp=30, other=30)
RING_GRACE = 20.0

A, R = abi.F_ASSURED, abi.F_SEEN_REPLY
DYING_AT = {4: abi.KEY4.offsets()["dying"], 6: abi.KEY6.offsets()["dying"]}


def tcp(i: int, family: int = 4) -> Flow:
    if family == 6:
        return Flow(f"2001:2::{i + 1:x}", "2001:2::ffff", "tcp", 30000 + i, 443)
    return Flow(f"198.18.{i // 200}.{i % 200 + 1}", "198.18.255.1", "tcp", 30000 + i, 80)


def udp(i: int, family: int = 4) -> Flow:
    if family == 6:
        return Flow(f"2001:2:0:1::{i + 1:x}", "2001:2:0:1::ffff", "udp", 10000 + i, 53)
    return Flow(f"198.18.{100 + i // 200}.{i % 200 + 1}", "198.18.254.1", "udp", 10000 + i, 53)


@pytest.fixture(scope="module")
def module_bench():
    with loaded_bench(table_limit=TABLE_LIMIT, report_interval=0, timeouts=LONG, grace=GRACE,
                      early_drop_high=0.9, early_drop_low=0.5) as b:
        yield b


@pytest.fixture
def bench(module_bench):
    module_bench.reset()
    return module_bench


@pytest.fixture(scope="module")
def module_ring_bench():
    """One page of ring: 31 records fit."""
    with loaded_bench(table_limit=TABLE_LIMIT, report_interval=0, ring_bytes=4096,
                      timeouts=RING_TIMEOUTS, grace=RING_GRACE) as b:
        yield b


@pytest.fixture
def ring_bench(module_ring_bench):
    module_ring_bench.reset()
    return module_ring_bench


# ---- helpers -----------------------------------------------------------------------

def send_all(bench, pkts) -> None:
    for p in pkts:
        bench.send(p)


def handshake(f: Flow):
    return [f.orig("S"), f.reply("SA"), f.orig("A")]


def fin_close(f: Flow):
    """A whole connection, closed by FIN to TIME_WAIT."""
    return handshake(f) + [f.orig("FA"), f.reply("FA"), f.orig("A")]


def destroys(events, flow: Flow | None = None) -> list:
    return [e for e in events if e.type == abi.EV_DESTROY
            and (flow is None or live_key(e.outbox_key()) == flow.key())]


def of_flow(events, flow: Flow) -> list:
    return [e for e in events if live_key(e.outbox_key()) == flow.key()]


def live_key(key: bytes) -> bytes:
    at = DYING_AT[4 if len(key) == abi.KEY4.size else 6]
    return key[:at] + b"\0" + key[at + 1:]


def with_dying(key: bytes, dying: int) -> bytes:
    at = DYING_AT[4 if len(key) == abi.KEY4.size else 6]
    return key[:at] + bytes([dying]) + key[at + 1:]


def moved_key(key: bytes, ct_id: int, gen: int = 0) -> bytes:
    """Where a new connection on the tuple moves an outbox entry: the first
    free generation from ct_id on."""
    return with_dying(live_key(key), abi.KEY_DYING | ((ct_id + gen) & 0x7F))


def copy_meta(entry) -> tuple[int, int, int]:
    """An outbox copy's (retries, end reason, missed mask) from sched's high half."""
    hi = entry.report_slot
    return hi & 0xFFFF, (hi >> 16) & 0xFF, hi >> 24


def missed_mask(entry) -> int:
    return entry.report_slot >> 24


def ack_raw(bench, family: int, records: list[tuple[bytes, int]], count: int | None = None) -> int:
    """One ack request as the daemon sends it (count: a header that lies)."""
    if count is None:
        data = abi.pack_acks(family, records)
    else:
        rec = struct.Struct(abi.ACK4.fmt if family == 4 else abi.ACK6.fmt)
        data = struct.pack(abi.ACK_HDR.fmt, count, 0) + b"".join(rec.pack(k, i) for k, i in records)
    prog = bench.dp.prog_fd("ct_ack4" if family == 4 else "ct_ack6")
    retval, _, out = bpfsys.test_run(prog, data)
    assert retval == TC_ACT_OK
    return abi.unpack_ack_hdr(out)["acked"]


def set_next_ct_id(bench, ct_id: int) -> None:
    g = bench.glob()
    g["next_ct_id"] = ct_id
    bpfsys.map_update(bench.dp.fd("ct_global"), b"\0" * 4, abi.pack_global(g))


def live_and_dying(bench) -> tuple[int, int]:
    g = bench.glob()
    return g["entries"] - g["dying"], g["dying"]


def early_until_stopped(bench, family: int, idle_runs: int = 200) -> int:
    """Run early drop one run at a time until idle_runs runs in a row (more
    than a whole pass over the index) dropped nothing; the sum of the runs'
    `pending`, which is what each dropped."""
    dropped = idle = 0
    while idle < idle_runs:
        n = bench.early_drop(family, budget=2, repeat=1)["pending"]
        dropped += n
        idle = 0 if n else idle + 1
    return dropped


def sweep_poll(bench, done, timeout: float, families=(4, 6),
               consume: bool = True) -> list[tuple[float, abi.RawEvent]]:
    """Sweep every POLL_S until done(events so far) or the deadline; events
    with the time they were read. Nothing is acked; with consume=False the
    ring is not read either (done then looks at the counters)."""
    got: list[tuple[float, abi.RawEvent]] = []
    deadline = time.monotonic() + timeout
    while True:
        for family in families:
            bench.sweep(family, budget=2, repeat=50)
        now = time.monotonic()
        if consume:
            got += [(now, e) for e in bench.events()]
        if done([e for _, e in got]) or now > deadline:
            return got
        time.sleep(POLL_S)


def wait_next_slot() -> None:
    start = monotonic_slot()
    while monotonic_slot() == start:
        time.sleep(0.01)


def fill_ring(bench, n_max: int = 64) -> list[Flow]:
    """Make ICMP flows (30 s timeout) until one CREATE finds the ring full."""
    base = bench.stats()["ring_full"]
    made = []
    for i in range(n_max):
        f = Flow(f"198.19.{i // 200}.{i % 200 + 1}", "198.19.255.1", "icmp", 100 + i)
        bench.send(f.orig())
        made.append(f)
        if bench.stats()["ring_full"] > base:
            return made
    raise AssertionError(f"the ring took {n_max} events without filling")


# ---- 1. acks -------------------------------------------------------------------------

@pytest.mark.parametrize("family", [4, 6])
def test_ack_removes_only_the_named_copy_with_its_ct_id(bench, family):
    f = tcp(1, family)
    send_all(bench, fin_close(f))
    first = bench.events()
    old_id = first[0].ct_id
    bench.send(f.orig("S"))  # the tuple reused: the old connection ends at once
    (d, new) = bench.events()
    assert (d.type, d.ct_id, abi.END_NAMES[d.end_reason], d.retries) == \
        (abi.EV_DESTROY, old_id, "fin", 0)
    assert d.dying == 0  # emitted in place, then moved off for the new connection
    assert (new.type, new.seq) == (abi.EV_CREATE, 0) and new.ct_id != old_id
    assert bench.entry(f).ct_id == new.ct_id

    moved = moved_key(f.key(), old_id)
    outbox = bench.outbox(family)
    assert list(outbox) == [moved]
    copy = outbox[moved]
    assert (copy.ct_id, copy.state_name, copy.pkts) == (old_id, "TIME_WAIT", (4, 2))
    assert copy.seq == d.seq + 1
    assert (bench.glob()["entries"], bench.glob()["dying"]) == (2, 1)

    # Wrong ct_ids: the new connection's (a real id, of the live entry) and one never made.
    assert bench.ack([d], ct_id_delta=new.ct_id - old_id) == 0
    assert bench.ack([d], ct_id_delta=-(1 << 40)) == 0
    # The live connection's own ack is never honoured: it has not ended.
    assert ack_raw(bench, family, [(f.key(), new.ct_id)]) == 0
    # Another generation of the same tuple.
    other_gen = moved_key(f.key(), old_id, 1)
    assert ack_raw(bench, family, [(other_gen, old_id)]) == 0
    stats = bench.stats()
    assert (stats["acked"], stats["ack_stale"]) == (0, 4)
    assert list(bench.outbox(family)) == [moved]
    assert bench.entry(f).ct_id == new.ct_id
    assert (bench.glob()["entries"], bench.glob()["dying"]) == (2, 1)

    assert bench.ack([d]) == 1
    assert bench.outbox(family) == {}
    assert list(bench.table(family)) == [f.key()]
    assert (bench.glob()["entries"], bench.glob()["dying"]) == (1, 0)
    assert bench.ack([d]) == 0  # a second ack of the same is stale
    assert ack_raw(bench, family, [(moved, old_id)]) == 0
    stats = bench.stats()
    assert (stats["acked"], stats["ack_stale"]) == (1, 6)
    assert (bench.glob()["entries"], bench.glob()["dying"]) == (1, 0)
    assert bench.entry(f).ct_id == new.ct_id
    assert bench.events() == []


def test_an_ended_flow_waits_in_place_until_its_tuple_is_needed(bench):
    """Ended by early drop, UDP flows f and g stay under their own tuples.
    g's late reply passes over g and starts a connection of its own, on the
    reversed tuple. A packet on f's tuple moves f to a generation key and
    starts a new connection there. Acks naming the tuples still find both."""
    bench.configure(early_drop_low=0.01)
    f, g = udp(7), udp(8)
    bench.send(f.orig(payload=bytes(4)))
    bench.send(g.orig(payload=bytes(4)))
    assert len(bench.events()) == 2
    assert early_until_stopped(bench, 4) == 2
    df, dg = bench.events()
    for d, x in ((df, f), (dg, g)):
        assert (d.type, abi.END_NAMES[d.end_reason], d.dying) == (abi.EV_DESTROY, "early", 0)
        e = bench.entry(x)
        assert e.ct_id == d.ct_id
        assert e.last_ns & abi.LAST_FLAGS == abi.LAST_DEAD | abi.LAST_OUTBOX
        assert e.last_ns & ~abi.LAST_FLAGS == d.last_ns
    assert bench.table(4) == {} and set(bench.outbox(4)) == {f.key(), g.key()}
    assert live_and_dying(bench) == (0, 2)
    bench.configure(early_drop_low=0.9)

    bench.send(g.reply(payload=bytes(6)))  # a late answer: a flow of its own, reversed
    (r,) = bench.events()
    assert (r.type, r.pkts_orig, r.pkts_reply) == (abi.EV_CREATE, 1, 0)
    assert r.ct_id not in (df.ct_id, dg.ct_id)
    rev = Flow(g.dst, g.src, "udp", g.dport, g.sport)
    assert bench.entry(rev).ct_id == r.ct_id
    assert bench.entry(g).ct_id == dg.ct_id  # the ended one untouched

    ended_f = bench.entry(f)
    bench.send(f.orig(payload=bytes(4)))  # f's tuple again: a new connection
    (n,) = bench.events()
    assert (n.type, n.pkts_orig) == (abi.EV_CREATE, 1) and n.ct_id not in (df.ct_id, r.ct_id)
    assert bench.entry(f).ct_id == n.ct_id
    moved = moved_key(f.key(), df.ct_id)
    assert set(bench.outbox(4)) == {moved, g.key()}
    assert bench.outbox(4)[moved].last_ns == ended_f.last_ns
    assert live_and_dying(bench) == (2, 2)

    assert bench.ack([df, dg]) == 2
    assert bench.outbox(4) == {} and live_and_dying(bench) == (2, 0)
    assert {v.ct_id for v in bench.table(4).values()} == {r.ct_id, n.ct_id}


def test_ack_batches_of_64_and_no_more(bench):
    """65 outbox copies: a request of 64 with 4 wrong ids acks exactly 60; a
    request whose header claims 65 records acks at most 64; pack_acks refuses
    65."""
    n = abi.ACK_BATCH + 1
    bench.configure(table_limit=3 * n)
    flows = [tcp(i) for i in range(n)]
    for f in flows:
        send_all(bench, [f.orig("S"), f.orig("R"), f.orig("S")])
    ds = destroys(bench.events())
    assert [live_key(d.outbox_key()) for d in ds] == [f.key() for f in flows]
    assert all(abi.END_NAMES[d.end_reason] == "rst" for d in ds)
    assert len(bench.outbox(4)) == n
    assert (bench.glob()["entries"], bench.glob()["dying"]) == (2 * n, n)

    with pytest.raises(ValueError):
        abi.pack_acks(4, [(d.outbox_key(), d.ct_id) for d in ds])

    wrong = {5, 21, 37, 53}
    batch = [(d.outbox_key(), d.ct_id + (1 if i in wrong else 0)) for i, d in enumerate(ds[:64])]
    assert ack_raw(bench, 4, batch) == 60
    left = [ds[i] for i in sorted(wrong)] + [ds[64]]
    assert set(bench.outbox(4)) == {moved_key(d.outbox_key(), d.ct_id) for d in left}
    assert (bench.stats()["acked"], bench.stats()["ack_stale"]) == (60, 4)

    # A header that claims 65 records: 60 already acked, the 4 wrongly acked
    # ones with their right ids, and 65th the last copy, which must stay.
    lying = [(d.outbox_key(), d.ct_id) for i, d in enumerate(ds[:64]) if i not in wrong]
    lying += [(d.outbox_key(), d.ct_id) for d in left]
    assert len(lying) == n
    assert ack_raw(bench, 4, lying, count=n) == 4
    assert list(bench.outbox(4)) == [moved_key(ds[64].outbox_key(), ds[64].ct_id)]
    assert (bench.glob()["entries"], bench.glob()["dying"]) == (n + 1, 1)
    assert (bench.stats()["acked"], bench.stats()["ack_stale"]) == (64, 4 + 60)
    assert len(bench.table(4)) == n  # the live connections were never touched


# ---- 2. retries ----------------------------------------------------------------------

def test_unacked_destroy_is_emitted_again_until_acked(bench):
    """Two ends at once, A (IPv4) and B (IPv6). A is acked after its first
    retry and must never come again; B, never acked, comes back with
    retries 1, 2 (...), each [grace/2, grace + two slots] after the one
    before, every field but ts_ns and retries unchanged."""
    fa, fb = tcp(2), tcp(2, 6)
    send_all(bench, fin_close(fa) + handshake(fb) + [fb.reply("R")])
    bench.events()
    bench.send(fa.orig("S"))
    bench.send(fb.orig("S"))
    t_end = time.monotonic()
    da, db = destroys(bench.events())
    assert (da.family, db.family, da.retries, db.retries) == (4, 6, 0, 0)
    assert (abi.END_NAMES[da.end_reason], abi.END_NAMES[db.end_reason]) == ("fin", "rst")
    g0 = bench.glob()
    assert (g0["entries"], g0["dying"]) == (4, 2)

    seen = {4: [(t_end, da)], 6: [(t_end, db)]}
    t_ack = None
    quiet_after_ack = GRACE + 2 * SLOT_S + POLL_S + 0.3
    deadline = t_end + 3 * (GRACE + 2 * SLOT_S + POLL_S) + 1
    while time.monotonic() < deadline:
        for family in (4, 6):
            bench.sweep(family, budget=2, repeat=50)
        now = time.monotonic()
        for e in bench.events():
            seen[e.family].append((now, e))
        if t_ack is None and len(seen[4]) == 2:
            # Acked by the retry: it names the same entry, now moved.
            assert bench.ack([seen[4][1][1]]) == 1
            t_ack = time.monotonic()
        if len(seen[6]) >= 3 and t_ack is not None and now - t_ack > quiet_after_ack:
            break
        time.sleep(POLL_S)

    assert [e.retries for _, e in seen[4]] == [0, 1], "A came again after its ack"
    # B keeps coming while A's quiet time runs out: 0, 1, 2 and perhaps 3.
    b_retries = [e.retries for _, e in seen[6]]
    assert len(b_retries) >= 3 and b_retries == list(range(len(b_retries)))
    assert t_ack is not None and time.monotonic() - t_ack > quiet_after_ack
    for family in (4, 6):
        first = seen[family][0][1]
        times = [t for t, _ in seen[family]]
        for t0, t1 in zip(times, times[1:]):
            assert GRACE / 2 <= t1 - t0 <= GRACE + 2 * SLOT_S + POLL_S + 0.8, times
        # The first emission names the tuple, the retries the key it moved to.
        assert first.dying == 0
        for _, e in seen[family][1:]:
            assert e.type == abi.EV_DESTROY
            assert e.outbox_key() == moved_key(first.outbox_key(), first.ct_id)
            assert (e.ct_id, e.seq, e.end_reason, e.state, e.flags, e.missed) == \
                (first.ct_id, first.seq, first.end_reason, first.state, first.flags, 0)
            assert (e.pkts_orig, e.pkts_reply, e.bytes_orig, e.bytes_reply) == \
                (first.pkts_orig, first.pkts_reply, first.bytes_orig, first.bytes_reply)
            assert (e.first_ns, e.last_ns) == (first.first_ns, first.last_ns)
            assert e.ts_ns > first.ts_ns

    stats = bench.stats()
    assert (stats["destroyed"], stats["destroy_retries"], stats["acked"]) == \
        (2, 1 + b_retries[-1], 1)
    (copy,) = bench.outbox(6).values()
    assert copy_meta(copy)[:2] == (b_retries[-1], abi.END_RST)
    assert bench.outbox(4) == {}
    assert (bench.glob()["entries"], bench.glob()["dying"]) == (3, 1)


# ---- 3. tuple reuse while the old copy waits -------------------------------------------

@pytest.mark.parametrize("ids", ["consecutive", "congruent mod 128"])
def test_reused_tuple_keeps_a_copy_per_connection(bench, ids):
    """Four connections on one tuple, each ended by the next one's SYN: each
    ends in place and moves to a generation key for the next one, so four
    wait under four generation bytes, each acked by its own DESTROY. With
    ct_ids 128 apart every one wants the same generation byte and takes the
    next free one; a fifth finds all four taken: its DESTROY went out once,
    and it is given up (outbox_full)."""
    f = tcp(3)
    send_all(bench, fin_close(f))
    base_id = bench.events()[0].ct_id
    ds, live_ids = [], [base_id]
    for n in range(1, 5):
        if ids != "consecutive":
            set_next_ct_id(bench, base_id + 128 * n)
        bench.send(f.orig("S"))
        d, new = bench.events()
        assert (d.type, d.ct_id, new.type) == (abi.EV_DESTROY, live_ids[-1], abi.EV_CREATE)
        assert new.ct_id not in live_ids
        ds.append(d)
        live_ids.append(new.ct_id)
        assert bench.entry(f).ct_id == new.ct_id
        outbox = bench.outbox(4)
        assert len(outbox) == len(ds) and all(live_key(k) == f.key() for k in outbox)
        assert {v.ct_id for v in outbox.values()} == set(live_ids[:-1])
        bench.send(f.orig("R"))  # CLOSE: the next SYN reuses the tuple again
        bench.events()

    assert all(d.dying == 0 for d in ds)
    by_id = {v.ct_id: k[DYING_AT[4]] for k, v in bench.outbox(4).items()}
    gens = [by_id[d.ct_id] for d in ds]
    assert len(set(gens)) == 4 and all(g & abi.KEY_DYING for g in gens)
    if ids == "consecutive":
        assert gens == [abi.KEY_DYING | ((i + 0) & 0x7F) for i in live_ids[:4]]
    else:
        assert gens == [abi.KEY_DYING | ((base_id + i) & 0x7F) for i in range(4)]
    assert (bench.glob()["entries"], bench.glob()["dying"]) == (5, 4)

    stats_before = bench.stats()
    if ids != "consecutive":
        set_next_ct_id(bench, base_id + 128 * 5)
        bench.send(f.orig("S"))
        d5, new5 = bench.events()
        assert (d5.type, d5.ct_id, d5.dying, d5.retries) == (abi.EV_DESTROY, live_ids[-1], 0, 0)
        assert bench.stats()["outbox_full"] == stats_before["outbox_full"] + 1
        assert len(bench.outbox(4)) == 4  # no fifth
        assert bench.entry(f).ct_id == new5.ct_id
        assert (bench.glob()["entries"], bench.glob()["dying"]) == (5, 4)
        assert bench.ack([d5]) == 0  # nothing to ack: it was given up

    remaining = {d.ct_id for d in ds}
    for i in (1, 3, 0, 2):
        assert bench.ack([ds[i]]) == 1
        remaining.discard(ds[i].ct_id)
        assert {v.ct_id for v in bench.outbox(4).values()} == remaining
        assert live_and_dying(bench) == (1, len(remaining))
    assert list(bench.table(4)) == [f.key()]


# ---- 4. a full ring ------------------------------------------------------------------

@pytest.mark.parametrize("end", ["sweeper", "tuple reuse"])
def test_destroy_that_found_the_ring_full_is_retried_in_the_next_slot(ring_bench, end):
    """A flow ends while the ring is full (expired by the sweeper, or ended
    by a new SYN on its tuple): it goes to the outbox with the DESTROY
    bit in its missed mask, filed for the next slot rather than after the
    grace time (20 s here). Once the ring has room the sweeper emits the
    DESTROY (retries 1, missed DESTROY) within a few seconds."""
    b = ring_bench
    x = udp(1) if end == "sweeper" else tcp(1)
    send_all(b, [x.orig(payload=bytes(8))] if end == "sweeper" else fin_close(x))
    made = b.events()
    fillers = fill_ring(b)
    assert b.stats()["ring_full"] == 1

    if end == "sweeper":
        sweep_poll(b, lambda _: b.stats()["destroyed"] >= 1, RING_TIMEOUTS.udp + 4.5,
                   families=(4,), consume=False)
        lost = 1
    else:
        b.send(x.orig("S"))  # DESTROY of the old one and NEW of the next both lost
        lost = 2
    t_miss = time.monotonic()
    stats = b.stats()
    assert (stats["destroyed"], stats["ring_full"]) == (1, 1 + lost)
    (key, copy), = b.outbox(4).items()
    assert live_key(key) == x.key() and copy.ct_id == made[0].ct_id
    if end == "sweeper":
        assert key == x.key()  # in place: nobody needed the tuple
    else:
        assert key == moved_key(x.key(), made[0].ct_id)  # moved for the next one
        assert b.entry(x).ct_id != made[0].ct_id
    reason = abi.END_IDLE if end == "sweeper" else abi.END_FIN
    assert copy_meta(copy) == (0, reason, abi.MISSED_DESTROY)
    assert copy.sched_slot <= monotonic_slot() + 1, "filed after the grace time, not the next slot"
    assert live_and_dying(b) == (len(fillers) + lost - 1, 1)
    assert not destroys(b.events())  # room again: only the fillers' NEWs were there

    # After tuple reuse the next connection (SYN_SENT, 1 s) ends too, and
    # its DESTROY carries the NEW it lost.
    got = sweep_poll(b, lambda ev: len(destroys(ev, x)) == lost, 2 * SLOT_S + 3 * POLL_S + 2.5)
    (t_arrived, d), = [(t, e) for t, e in got if e.ct_id == made[0].ct_id]
    assert t_arrived - t_miss < RING_GRACE / 2
    assert (d.type, d.seq, d.retries, d.missed, d.end_reason, d.dying) == \
        (abi.EV_DESTROY, len(made), 1, abi.MISSED_DESTROY, reason, key[DYING_AT[4]])
    assert (d.pkts_orig, d.pkts_reply) == ((1, 0) if end == "sweeper" else (4, 2))
    copy = b.outbox(4)[key]
    assert copy_meta(copy) == (1, reason, 0)
    assert copy.sched_slot >= monotonic_slot() + int(RING_GRACE / 2 / SLOT_S) - 2
    nxt = [e for _, e in got if e.ct_id != made[0].ct_id]
    if end == "tuple reuse":
        (dn,) = nxt
        assert (dn.type, dn.seq, dn.retries, dn.missed, abi.STATE_NAMES[dn.state]) == \
            (abi.EV_DESTROY, 1, 0, abi.MISSED_CREATE, "SYN_SENT")
    else:
        assert nxt == []
    stats = b.stats()
    assert (stats["missed_redelivered"], stats["destroy_retries"]) == (lost, 1)

    assert b.ack([d] + nxt) == lost
    assert b.outbox(4) == {}
    assert live_and_dying(b) == (len(fillers), 0)


def test_updates_lost_to_a_full_ring_come_from_the_sweeper_or_ride_on_the_destroy(ring_bench):
    """No packet follows the losses. Y (TCP) lost two UPDATEs (SYN_RECV,
    ESTABLISHED); its SYN slot comes in about a second, the sweeper finds it
    ESTABLISHED and not due (10 s), and emits one UPDATE that carries the
    UPDATE bit. Z (UDP) lost the UPDATE that made it ASSURED; its slot finds
    it due, so no UPDATE of its own: its DESTROY carries the bit."""
    b = ring_bench
    y, z = tcp(4), udp(4)
    b.send(y.orig("S"))
    b.send(z.orig(payload=bytes(8)))
    made = b.events()
    assert [e.type for e in made] == [abi.EV_CREATE, abi.EV_CREATE]
    fill_ring(b)
    send_all(b, [y.reply("SA"), y.orig("A"), z.reply(payload=bytes(8))])
    assert b.stats()["ring_full"] == 1 + 3
    assert missed_mask(b.entry(y)) == missed_mask(b.entry(z)) == abi.MISSED_UPDATE
    b.events()  # room again

    got = [e for _, e in sweep_poll(
        b, lambda ev: of_flow(ev, y) and destroys(ev, z), RING_TIMEOUTS.udp + 4.5)]
    got += [e for _, e in sweep_poll(b, lambda _: False, 0.4)]  # nothing more may come
    (uy,) = of_flow(got, y)
    assert (uy.type, uy.seq, uy.missed, uy.state, uy.flags) == \
        (abi.EV_UPDATE, 3, abi.MISSED_UPDATE, abi.S_ESTABLISHED, A | R)
    ey = b.entry(y)
    assert (uy.ct_id, uy.last_ns, uy.pkts_orig, uy.pkts_reply) == (ey.ct_id, ey.last_ns, 2, 1)
    assert missed_mask(ey) == 0 and ey.seq == 4

    (dz,) = of_flow(got, z)
    assert (dz.type, dz.seq, dz.missed, dz.end_reason, dz.flags, dz.retries) == \
        (abi.EV_DESTROY, 2, abi.MISSED_UPDATE, abi.END_IDLE, A | R, 0)
    assert (dz.pkts_orig, dz.pkts_reply) == (1, 1)
    assert b.stats()["missed_redelivered"] == 2

    b.send(y.orig("A"))  # delivered once: the mask is clear, nothing to send
    assert b.events() == []


# ---- 5. early drop -------------------------------------------------------------------

def test_early_drop_ends_unassured_flows_soonest_due_first_down_to_the_low_watermark(bench):
    """64 places, low watermark 32. 40 unassured UDP flows made in three
    slots, 10 assured ones among them, 6 SYN-only TCP flows over IPv6: 56
    live. ct_early6 ends the 6 SYN flows (nothing else of IPv6 is unassured);
    ct_early4 then ends the 18 oldest unassured UDP flows in the order they
    were made, and stops at 32 live."""
    low = int(TABLE_LIMIT * 0.5)
    unassured, assured = [], []
    syn6 = [tcp(i, 6) for i in range(6)]
    for f in syn6:
        bench.send(f.orig("S"))
    for i in range(4):
        f = udp(100 + i, 6)
        send_all(bench, [f.orig(payload=bytes(4)), f.reply(payload=bytes(4))])
        assured.append(f)
    n = 0
    for group in (10, 10, 20):
        if n:
            wait_next_slot()  # staggered ages: each group filed under a later slot
        for j in range(group):
            f = udp(n)
            bench.send(f.orig(payload=bytes(4)))
            unassured.append(f)
            n += 1
            if j in (3, 7):
                a = udp(200 + len(assured))
                send_all(bench, [a.orig(payload=bytes(4)), a.reply(payload=bytes(4))])
                assured.append(a)
    assert (len(unassured), len(assured)) == (40, 10)
    assert live_and_dying(bench) == (56, 0)
    before = {f.key(): bench.entry(f) for f in assured}
    bench.events()

    dropped6 = early_until_stopped(bench, 6)
    dropped4 = early_until_stopped(bench, 4)
    events = bench.events()
    assert (dropped6, dropped4) == (6, 18)
    assert all(e.type == abi.EV_DESTROY for e in events)
    assert [live_key(e.outbox_key()) for e in events] == \
        [f.key() for f in syn6] + [f.key() for f in unassured[:18]]
    for e in events:
        assert (abi.END_NAMES[e.end_reason], e.retries, e.missed) == ("early", 0, 0)
        assert e.dying == 0  # ended in place
        assert (e.pkts_orig, e.pkts_reply, e.flags & A) == (1, 0, 0)
    assert {e.state for e in events[:6]} == {abi.S_SYN_SENT}
    assert live_and_dying(bench) == (low, 24)
    assert {f.key(): bench.entry(f) for f in assured} == before
    assert all(bench.entry(f).last_ns & abi.LAST_OUTBOX for f in unassured[:18])
    assert not any(bench.entry(f).last_ns & abi.LAST_DEAD for f in unassured[18:])
    outbox = {**bench.outbox(4), **bench.outbox(6)}
    assert {k: v.ct_id for k, v in outbox.items()} == {e.outbox_key(): e.ct_id for e in events}
    assert all(copy_meta(v)[1] == abi.END_EARLY for v in outbox.values())
    stats = bench.stats()
    assert (stats["early_drops"], stats["destroyed"], stats["created"]) == (24, 24, 56)

    # At the low watermark a run drops nothing.
    assert early_until_stopped(bench, 6) + early_until_stopped(bench, 4) == 0
    assert bench.events() == []
    assert bench.stats()["early_drops"] == 24

    # With no watermark at all every unassured flow goes, in order, and
    # nothing else: neither the assured flows nor the outbox copies.
    bench.configure(early_drop_low=0.01)
    assert early_until_stopped(bench, 4) + early_until_stopped(bench, 6) == 22
    more = bench.events()
    assert [live_key(e.outbox_key()) for e in more] == [f.key() for f in unassured[18:]]
    outbox2 = {**bench.outbox(4), **bench.outbox(6)}
    assert {k: outbox2[k].ct_id for k in outbox} == {k: v.ct_id for k, v in outbox.items()}
    assert len(outbox2) == 46
    assert {f.key(): bench.entry(f) for f in assured} == before
    assert live_and_dying(bench) == (10, 46)
    assert bench.stats()["early_drops"] == 46

    assert bench.ack(events + more) == 46
    assert live_and_dying(bench) == (10, 0)


# ---- 6. the table limit counts the outbox -------------------------------------------------

def test_outbox_copies_hold_their_places_under_the_table_limit(bench):
    fill = [udp(i) for i in range(48)] + [udp(i, 6) for i in range(16)]
    for f in fill:
        bench.send(f.orig(payload=bytes(4)))
    bench.events()
    assert live_and_dying(bench) == (TABLE_LIMIT, 0)

    # End 4 flows of each family without acking them (early drop to 60, then 56 live).
    bench.configure(early_drop_low=60 / TABLE_LIMIT)
    assert early_until_stopped(bench, 4) == 4
    bench.configure(early_drop_low=56 / TABLE_LIMIT)
    assert early_until_stopped(bench, 6) == 4
    ended = bench.events()
    assert Counter(e.family for e in destroys(ended)) == {4: 4, 6: 4}
    assert live_and_dying(bench) == (56, 8)

    newcomers = [udp(300 + i) for i in range(5)] + [udp(300 + i, 6) for i in range(5)]
    for f in newcomers[:1] + newcomers[5:6]:
        bench.send(f.orig(payload=bytes(4)))
    assert bench.events() == []
    stats = bench.stats()
    assert (stats["table_full"], stats["created"]) == (2, 64)
    assert bench.entry(newcomers[0]) is None and bench.entry(newcomers[5]) is None

    # One ack frees one place: the IPv6 newcomer gets it, the IPv4 one not.
    d6 = next(e for e in ended if e.family == 6)
    assert bench.ack([d6]) == 1
    bench.send(newcomers[5].orig(payload=bytes(4)))
    bench.send(newcomers[0].orig(payload=bytes(4)))
    (ev,) = bench.events()
    assert (ev.type, ev.family) == (abi.EV_CREATE, 6)
    assert bench.entry(newcomers[5]) is not None and bench.entry(newcomers[0]) is None
    assert bench.stats()["table_full"] == 3
    assert live_and_dying(bench) == (57, 7)

    # The other seven: seven newcomers tracked, the eighth not.
    rest = [e for e in ended if e is not d6]
    assert bench.ack(rest) == 7
    todo = newcomers[:5] + newcomers[6:]
    for f in todo:
        bench.send(f.orig(payload=bytes(4)))
    assert len(bench.events()) == 7
    assert [bench.entry(f) is not None for f in todo] == [True] * 7 + [False] * 2
    assert bench.stats()["table_full"] == 3 + 2
    assert live_and_dying(bench) == (TABLE_LIMIT, 0)


def test_an_ipv6_flow_ending_at_the_ipv6_cap_still_gets_its_outbox_copy():
    """table_limit 512, ipv6_limit 16: IPv6 flows are taken until the IPv6
    cap refuses one (the map's slack above the cap is kept for outbox copies) (far below the table limit, so early drop's watermarks
    are not reached on their own). One of them is then ended."""
    with loaded_bench(table_limit=512, ipv6_limit=16, report_interval=0, timeouts=LONG,
                      grace=GRACE) as b:
        flows = []
        for i in range(512):
            f = udp(i, 6)
            b.send(f.orig(payload=bytes(4)))
            if b.stats()["table_full"]:
                break
            flows.append(f)
        live = len(flows)
        assert live == 16  # the IPv6 cap holds, far below the table limit
        b.events()
        b.configure(early_drop_low=(live - 0.5) / 512)  # end exactly one
        assert early_until_stopped(b, 6) == 1
        (d,) = b.events()
        assert (d.type, live_key(d.outbox_key())) == (abi.EV_DESTROY, flows[0].key())
        assert b.stats()["outbox_full"] == 0
        assert d.dying == 0
        assert list(b.outbox(6)) == [flows[0].key()]
        # The cap is reached (the ended flow still counts): its tuple's next
        # packet is not tracked, and the ended flow is not moved for nothing.
        b.send(flows[0].orig(payload=bytes(4)))
        assert b.stats()["table_full"] == 2 and b.events() == []
        assert list(b.outbox(6)) == [flows[0].key()]
        assert b.ack([d]) == 1
        b.send(flows[0].orig(payload=bytes(4)))
        (new,) = b.events()
        assert (new.type, new.family) == (abi.EV_CREATE, 6) and new.ct_id != d.ct_id
        assert b.outbox(6) == {} and b.stats()["outbox_full"] == 0
