"""A migration's hold and merge, packet by packet (bpf/migrate_merge.c).

While ct_meta.frozen names the programs' layout they keep each packet in a
hold record of its tuple and change nothing else; ct_merge4/6 then adds the
holds to the flow's entry (exact counters, the state moved on by the flags
held) or starts the entry of a flow that began during the hold. Here the
table the holds merge into is the same one (same build): what a migration
does with the new layout's table."""

from __future__ import annotations

import struct

import pytest

from streamer.datapath import abi, bpfsys
from tests.bpf.packets import Flow, loaded_bench

pytestmark = pytest.mark.root

T4 = Flow("10.2.0.1", "10.2.0.2", "tcp", 41000, 80)
T6 = Flow("2001:db8::11", "2001:db8::12", "tcp", 41000, 443)
U4 = Flow("10.2.0.1", "10.2.0.2", "udp", 5353, 53)
_HDR = struct.Struct(abi.MERGE_HDR.fmt)


@pytest.fixture(scope="module")
def bench():
    with loaded_bench(table_limit=64, report_interval=0) as b:
        yield b


def freeze(bench, on: bool) -> None:
    fd = bench.dp.fd("ct_meta")
    m = abi.unpack_meta(bpfsys.map_lookup(fd, b"\0" * 4, abi.META.size))
    bpfsys.map_update(fd, b"\0" * 4, abi.pack_meta(m["generation"], m["layout"] or abi.LAYOUT_VERSION,
                                                   bench.dp.layout if on else 0))


def holds(bench, fam: int) -> dict[bytes, dict]:
    fd = bench.dp.fd(f"ct_hold{fam}")
    ksize = abi.KEY4.size if fam == 4 else abi.KEY6.size
    out = {}
    for k in set(bpfsys.map_keys(fd, ksize)):
        v = struct.unpack(abi.HOLD.fmt, bpfsys.map_lookup(fd, k, abi.HOLD.size))
        out[k] = dict(zip(("pkts", "bytes", "first_ns", "last_ns", "tcp_flags"), v))
    return out


def merge(bench, fam: int) -> dict:
    keys = sorted(holds(bench, fam))
    out = {"merged": 0, "created": 0, "lost": 0}
    for i in range(0, len(keys), abi.MERGE_BATCH):
        batch = keys[i:i + abi.MERGE_BATCH]
        _, _, raw = bpfsys.test_run(bench.dp.prog_fd(f"ct_merge{fam}"),
                                    _HDR.pack(len(batch), 0, 0, 0) + b"".join(batch))
        _, m, c, lost = _HDR.unpack_from(raw)
        out["merged"] += m
        out["created"] += c
        out["lost"] += lost
    assert not holds(bench, fam), "holds left after the merge"
    return out


def close(f: Flow) -> list:
    return [f.orig("A", payload=bytes(10)), f.reply("A", payload=bytes(20)), f.orig("FA"),
            f.reply("FA"), f.orig("A")]


def handshake(f: Flow) -> list:
    return [f.orig("S"), f.reply("SA"), f.orig("A")]


@pytest.fixture(autouse=True)
def fresh(bench):
    bench.reset()
    freeze(bench, False)
    yield
    freeze(bench, False)
    for fam in (4, 6):
        fd = bench.dp.fd(f"ct_hold{fam}")
        for k in set(bpfsys.map_keys(fd, abi.KEY4.size if fam == 4 else abi.KEY6.size)):
            bpfsys.map_delete(fd, k)


@pytest.mark.parametrize("flow", [T4, T6], ids=["ipv4", "ipv6"])
def test_a_frozen_table_stands_still_and_the_merge_adds_exactly_what_was_held(bench, flow):
    for p in handshake(flow):
        bench.send(p)
    before = bench.entry(flow)
    assert before.state_name == "ESTABLISHED"
    bench.events()
    freeze(bench, True)
    pkts = close(flow)
    for p in pkts:
        bench.send(p)
    assert bench.entry(flow) == before, "a frozen program changed the table"
    assert bench.events() == []
    assert bench.stats()["held"] == len(pkts)
    h = holds(bench, flow.family)
    assert sorted(v["pkts"] for v in h.values()) == [2, 3]
    freeze(bench, False)
    assert merge(bench, flow.family) == {"merged": 1, "created": 0, "lost": 0}
    e = bench.entry(flow)
    orig = [p for i, p in enumerate(pkts) if i in (0, 2, 4)]
    reply = [p for i, p in enumerate(pkts) if i in (1, 3)]
    assert e.pkts == (before.pkts[0] + 3, before.pkts[1] + 2)
    assert e.bytes == (before.bytes[0] + sum(p.l3_len for p in orig),
                       before.bytes[1] + sum(p.l3_len for p in reply))
    assert e.state_name == "TIME_WAIT" and e.last_ns > before.last_ns
    assert e.ct_id == before.ct_id and bench.events() == []   # no event: the entry moved on


@pytest.mark.parametrize("flow", [T4, T6], ids=["ipv4", "ipv6"])
def test_a_flow_begun_and_ended_in_the_hold_gets_its_entry_with_its_create(bench, flow):
    freeze(bench, True)
    pkts = handshake(flow) + close(flow)
    for p in pkts:
        bench.send(p)
    assert bench.entry(flow) is None
    freeze(bench, False)
    assert merge(bench, flow.family) == {"merged": 0, "created": 1, "lost": 0}
    e = bench.entry(flow)
    assert e.state_name == "TIME_WAIT", e
    assert e.pkts == (5, 3)
    assert sum(e.bytes) == sum(p.l3_len for p in pkts)
    (new,) = bench.events()
    assert (new.type, new.ct_id, new.seq) == (abi.EV_CREATE, e.ct_id, 0)
    assert new.first_ns == e.first_ns < e.last_ns


def test_udp_held_in_both_directions_starts_one_entry(bench):
    freeze(bench, True)
    pkts = [U4.orig(payload=bytes(10)), U4.reply(payload=bytes(30)), U4.orig(payload=bytes(5))]
    for p in pkts:
        bench.send(p)
    freeze(bench, False)
    assert merge(bench, 4) == {"merged": 0, "created": 1, "lost": 0}
    e = bench.entry(U4)
    assert e.pkts == (2, 1) and e.bytes == (pkts[0].l3_len + pkts[2].l3_len, pkts[1].l3_len)
    assert e.flags & abi.F_ASSURED


def split_flow(handshake_held: bool) -> list:
    """A connection whose packets meet a frozen hook or a new one: replies
    frozen (tc egress not yet swapped), the flow's own packets new, and with
    handshake_held the SYN too."""
    return [(T4.orig("S"), handshake_held), (T4.reply("SA"), True), (T4.orig("A"), False),
            (T4.orig("A", payload=bytes(10)), False), (T4.reply("A", payload=bytes(20)), True),
            (T4.orig("FA"), False), (T4.reply("FA"), True), (T4.orig("A"), False)]


@pytest.mark.parametrize("handshake_held", [False, True], ids=["syn-seen", "syn-held"])
def test_packets_split_between_a_new_and_a_frozen_hook_end_assured_in_time_wait(bench,
                                                                                 handshake_held):
    """During the swap XDP may already run the new programs while tc egress
    still runs the frozen ones. syn-seen: the entry waits in SYN_SENT for the
    held SYN/ACK. syn-held: the new program picks the flow up at its ACK,
    and the held replies make it answered."""
    seq = split_flow(handshake_held)
    for p, frozen in seq:
        freeze(bench, frozen)
        bench.send(p)
    freeze(bench, False)
    assert merge(bench, 4) == {"merged": 1, "created": 0, "lost": 0}
    e = bench.entry(T4)
    assert (e.state_name, e.flags & abi.F_ASSURED) == ("TIME_WAIT", abi.F_ASSURED), e
    assert bool(e.flags & abi.F_PICKUP) == handshake_held
    assert e.pkts == (5, 3)
    orig = sum(seq[i][0].l3_len for i in (0, 2, 3, 5, 7))      # the flow's own packets
    assert e.bytes == (orig, sum(p.l3_len for p, _ in seq) - orig)
