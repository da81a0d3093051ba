"""The daemon's ring reader (streamer/datapath/ringbuf.py: MmapRing, RingReader) against
libbpf's own (ring_buffer__new + ring_buffer__consume, bpfsys.RingBuffer), on
the same records.

A test-only tc program (RR_PROGRAM, below; tc, not XDP, because an XDP test
run with repeat > 1 swaps the XDP dispatcher, about 16 ms a syscall) is run
with BPF_PROG_TEST_RUN and `repeat`: run k of one syscall carries out op k of
a script the test wrote into a map, on TWO ring maps of the same size, one
after the other: reserve a record of the op's size, fill it from the op's
source slot, then submit or discard it; or write it with bpf_ringbuf_output
(any size). Ring A is read by MmapRing or RingReader, ring B by libbpf: a
reader's consumer position is state in its ring, hence two rings.

The oracle is a model of the ring in Python (RingModel): from the kernel's
rules (a record takes round_up(8 + len, 8) bytes; a reserve fails when the
producer would get more than size - 1 ahead of the consumer) and a reader's
(skip discarded records, stop after `limit` records) it predicts which
reserves succeed, which records each read hands on, byte for byte and in
order, and where the consumer and producer positions are afterwards. Both
readers must match it after every round, so they also match each other; a
reserve that fails or succeeds against the model means a reader published
a wrong consumer position (the room the producer sees).

Rings of one and of four pages, records of 0 to 1500 bytes (every size mod
8), reads with and without a limit: records wrap around the end of the data
area hundreds of times and the ring is often full; the test counts that it
was so. Records carry their sequence number and size, then a pattern that
depends on both. Besides: the exact room after a partial read, RingReader
on a running event loop, and test_a_broken_reader_is_caught, which switches
MmapRing's DISCARD handling off and expects the comparison to fail.

Nothing is pinned: the BCC object owns its maps and program; closing the
readers and BPF.cleanup() releases all of them, also when a test fails.
"""

from __future__ import annotations

import asyncio
import mmap
import random
import struct
from collections import Counter, deque
from dataclasses import dataclass, field

import pytest

from streamer.datapath import bpfsys
from streamer.datapath import ringbuf
from tests.bpf.packets import TC_ACT_OK

pytestmark = pytest.mark.root

PAGE = mmap.PAGESIZE
MAX_OPS = 64          # ops per test-run syscall (one round)
SLOT = 2048           # source bytes per op
MAX_SIZE = 1500       # the largest record

# Sizes bpf_ringbuf_reserve can take: the verifier wants a constant, so the
# program has one case per size (-DRR_SIZES, from these integers). Every
# residue mod 8, both sides of 64, and some large ones.
RESERVE_SIZES = tuple(range(0, 41)) + (47, 55, 63, 64, 65, 71, 99, 127, 128, 129, 200,
                                        255, 333, 511, 777, 1000, 1023, MAX_SIZE)
SUBMIT, DISCARD, OUTPUT = 0, 1, 2   # rr_op.kind
NOT_RUN = 0xFF                      # rr_op.status before the program ran the op
HDR = 8

RR_PROGRAM = r"""
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

#define RR_SUBMIT  0
#define RR_DISCARD 1
#define RR_OUTPUT  2

struct rr_op {
	u16 size;
	u8 kind;
	u8 status;	/* bit 0: ring A took the record, bit 1: ring B did */
	u32 seq;
};

struct rr_round {
	u32 next;	/* the op the next run carries out */
	u32 n;
	struct rr_op ops[RR_MAX_OPS];
};

struct rr_src {
	u8 bytes[RR_MAX_OPS * RR_SLOT];	/* op k's record is copied from slot k */
};

BPF_RINGBUF_OUTPUT(ring_a, RR_PAGES);
BPF_RINGBUF_OUTPUT(ring_b, RR_PAGES);
BPF_ARRAY(rr_round, struct rr_round, 1);
BPF_ARRAY(rr_src, struct rr_src, 1);

/* Inlined with a constant n: bpf_ringbuf_reserve needs one. */
static __always_inline u8 rr_emit(int b, u32 n, const u8 *src, u8 kind)
{
	u8 *rec = b ? ring_b.ringbuf_reserve(n) : ring_a.ringbuf_reserve(n);
	if (!rec)
		return 0;
	bpf_probe_read_kernel(rec, n, src);
	if (kind == RR_DISCARD) {
		if (b)
			ring_b.ringbuf_discard(rec, 0);
		else
			ring_a.ringbuf_discard(rec, 0);
	} else {
		if (b)
			ring_b.ringbuf_submit(rec, 0);
		else
			ring_a.ringbuf_submit(rec, 0);
	}
	return 1;
}

#define RR_CASE(n) case n: return rr_emit(b, n, src, kind);

static __always_inline u8 rr_reserve(int b, u32 size, const u8 *src, u8 kind)
{
	switch (size) {
	RR_SIZES(RR_CASE)
	}
	return 0;
}

int rr_run(struct __sk_buff *skb)
{
	u32 zero = 0;
	struct rr_round *rd = rr_round.lookup(&zero);
	struct rr_src *sv = rr_src.lookup(&zero);
	if (!rd || !sv)
		return TC_ACT_SHOT;
	u32 k = rd->next;
	if (k >= RR_MAX_OPS || k >= rd->n)
		return TC_ACT_SHOT;
	rd->next = k + 1;
	struct rr_op *op = &rd->ops[k];
	const u8 *src = sv->bytes + k * RR_SLOT;
	u32 size = op->size;
	u8 st;
	if (op->kind == RR_OUTPUT) {
		if (size > RR_MAX_SIZE)
			return TC_ACT_SHOT;
		st = ring_a.ringbuf_output((void *)src, size, 0) == 0;
		st |= (ring_b.ringbuf_output((void *)src, size, 0) == 0) << 1;
	} else {
		st = rr_reserve(0, size, src, op->kind);
		st |= rr_reserve(1, size, src, op->kind) << 1;
	}
	op->status = st;
	return TC_ACT_OK;
}
"""

OP = struct.Struct("<HBBI")
ROUND_HEAD = struct.Struct("<II")
_PATTERN = bytes(range(256)) * (SLOT // 256 + 2)


def record_bytes(seq: int, size: int) -> bytes:
    """What op `seq` writes: its sequence number and size, then a pattern
    that depends on both; cut to `size`."""
    start = (seq * 7 + size) & 0xFF
    return (struct.pack("<IH", seq, size) + _PATTERN[start:start + size])[:size]


def total_len(size: int) -> int:
    """The bytes a record takes in the ring (the kernel's round_up(8 + len, 8))."""
    return (size + HDR + 7) & ~7


@dataclass
class RingModel:
    """What the kernel and a correct reader do to one ring."""

    size: int
    prod: int = 0
    cons: int = 0
    pending: deque = field(default_factory=deque)   # (end, payload or None) per record
    crossed: Counter = field(default_factory=Counter)
    full: int = 0

    def reserve(self, payload: bytes, discard: bool) -> bool:
        need = total_len(len(payload))
        if self.prod + need - self.cons > self.size - 1:
            self.full += 1
            return False
        if (self.prod % self.size) + need > self.size:
            self.crossed["discarded" if discard else "submitted"] += 1
        self.pending.append((self.prod + need, None if discard else payload))
        self.prod += need
        return True

    def read(self, limit: int) -> list[bytes]:
        out: list[bytes] = []
        while self.pending:
            end, payload = self.pending.popleft()
            self.cons = end
            if payload is not None:
                out.append(payload)
                if len(out) == limit:
                    break
        return out


def read_positions(cons_page: mmap.mmap, prod_page: mmap.mmap) -> tuple[int, int]:
    """(consumer, producer) position of a ring, from its first two pages."""
    return struct.unpack_from("<Q", cons_page, 0)[0], struct.unpack_from("<Q", prod_page, 0)[0]


class Rings:
    """The program, its two rings and their readers."""

    def __init__(self, ring_pages: int):
        from bcc import BPF

        sizes = " ".join(f"X({int(n)})" for n in RESERVE_SIZES)
        self.bpf = BPF(text=RR_PROGRAM.encode(), cflags=[
            f"-DRR_PAGES={int(ring_pages)}", f"-DRR_MAX_OPS={MAX_OPS}", f"-DRR_SLOT={SLOT}",
            f"-DRR_MAX_SIZE={MAX_SIZE}", f"-DRR_SIZES(X)={sizes}", "-Wno-unused-function"])
        self._closers = [self.bpf.cleanup]
        try:
            self.size = ring_pages * PAGE
            self.prog_fd = self.bpf.load_func(b"rr_run", BPF.SCHED_CLS).fd
            self.round_fd = self.bpf[b"rr_round"].map_fd
            self.src_fd = self.bpf[b"rr_src"].map_fd
            self.fd_a = self.bpf[b"ring_a"].map_fd
            self.fd_b = self.bpf[b"ring_b"].map_fd
            assert ringbuf.ring_size(self.fd_a) == ringbuf.ring_size(self.fd_b) == self.size

            self.got_a: list[bytes] = []
            self.got_b: list[bytes] = []
            self.mmap_ring = self._own(ringbuf.MmapRing(self.fd_a))
            self.reader = self._own(ringbuf.RingReader(
                self.fd_a, lambda mv: self.got_a.append(bytes(mv))))
            self.libbpf = self._own(bpfsys.RingBuffer(
                self.fd_b, lambda mv: self.got_b.append(bytes(mv))))
            self.space_a = self._own(ringbuf.RingSpace(self.fd_a, self.size))
            self.pos_maps = {}
            for name, fd in (("a", self.fd_a), ("b", self.fd_b)):
                cons = self._own(mmap.mmap(fd, PAGE, mmap.MAP_SHARED, mmap.PROT_READ, offset=0))
                prod = self._own(mmap.mmap(fd, PAGE, mmap.MAP_SHARED, mmap.PROT_READ,
                                           offset=PAGE))
                self.pos_maps[name] = (cons, prod)
            self.model_a, self.model_b = RingModel(self.size), RingModel(self.size)
        except BaseException:
            self.close()
            raise

    def _own(self, obj):
        self._closers.append(obj.close)
        return obj

    def close(self) -> None:
        while self._closers:
            self._closers.pop()()   # readers and mappings first, the BPF object last

    def positions(self, ring: str) -> tuple[int, int]:
        return read_positions(*self.pos_maps[ring])

    # ---- writing ---------------------------------------------------------------
    def write(self, ops: list[tuple[int, int, int]]) -> list[int]:
        """Carry out ops (kind, size, seq) in one syscall; the status of each."""
        assert 0 < len(ops) <= MAX_OPS
        src = bytearray(MAX_OPS * SLOT)
        body = bytearray()
        for k, (kind, size, seq) in enumerate(ops):
            src[k * SLOT:k * SLOT + size] = record_bytes(seq, size)
            body += OP.pack(size, kind, NOT_RUN, seq)
        body += bytes(OP.size * (MAX_OPS - len(ops)))
        zero = struct.pack("<I", 0)
        bpfsys.map_update(self.src_fd, zero, bytes(src))
        bpfsys.map_update(self.round_fd, zero, ROUND_HEAD.pack(0, len(ops)) + bytes(body))
        retval, _, _ = bpfsys.test_run(self.prog_fd, bytes(64), repeat=len(ops))
        assert retval == TC_ACT_OK
        raw = bpfsys.map_lookup(self.round_fd, zero, ROUND_HEAD.size + OP.size * MAX_OPS)
        done, _ = ROUND_HEAD.unpack_from(raw, 0)
        assert done == len(ops)
        return [OP.unpack_from(raw, ROUND_HEAD.size + k * OP.size)[2] for k in range(len(ops))]

    # ---- reading ---------------------------------------------------------------
    def read_a(self, limit: int, via_reader: bool) -> int:
        if via_reader:   # RingReader's own path: drain() reads READ_CHUNK at a time
            assert limit == 0
            return self.reader.drain()
        return self.mmap_ring.consume(lambda mv: self.got_a.append(bytes(mv)), limit)

    def read_b(self, limit: int) -> int:
        return self.libbpf.consume(limit)


@pytest.fixture(params=[1, 4], ids=["1-page-ring", "4-page-ring"])
def rings(request):
    r = Rings(request.param)
    try:
        yield r
    finally:
        r.close()


def write_all(r: Rings, ops: list[tuple[int, int, int]]) -> list[int]:
    """Ops in as many syscalls as it takes; the status of each."""
    return [st for i in range(0, len(ops), MAX_OPS) for st in r.write(ops[i:i + MAX_OPS])]


def read_both(r: Rings, limit: int = 0) -> tuple[list[bytes], list[bytes]]:
    r.got_a.clear()
    r.got_b.clear()
    assert r.read_a(limit, via_reader=False) == len(r.got_a)
    assert r.read_b(limit) == len(r.got_b)
    return list(r.got_a), list(r.got_b)


def random_ops(rng: random.Random, seq: int) -> list[tuple[int, int, int]]:
    ops = []
    for i in range(rng.randint(1, 24)):
        kind = rng.choices((SUBMIT, DISCARD, OUTPUT), weights=(5, 3, 2))[0]
        size = rng.randint(0, MAX_SIZE) if kind == OUTPUT and rng.random() < 0.5 \
            else rng.choice(RESERVE_SIZES)
        ops.append((kind, size, seq + i))
    return ops


def run_rounds(r: Rings, rng: random.Random, rounds: int) -> dict[str, int]:
    """Write and read `rounds` rounds; assert, after each, that both readers
    handed on what the model says, and that the rings' positions (what the
    producer sees as room) are the model's. Returns what was exercised."""
    seen = Counter()
    seq = 0
    for rnd in range(rounds):
        ops = random_ops(rng, seq)
        seq += len(ops)
        status = r.write(ops)
        for (kind, size, s), st in zip(ops, status):
            assert st != NOT_RUN, f"op {s} did not run"
            payload = record_bytes(s, size)
            want_a = r.model_a.reserve(payload, kind == DISCARD)
            want_b = r.model_b.reserve(payload, kind == DISCARD)
            # Room as the producer saw it: the consumer positions the two
            # readers published must leave exactly the room the model predicts.
            assert (bool(st & 1), bool(st & 2)) == (want_a, want_b), \
                f"round {rnd}, op {s} (size {size}): reserve results {st:#x}"
            seen["discarded" if kind == DISCARD else "submitted"] += want_a
            seen[f"mod8_{size % 8}"] += want_a
        assert r.positions("a")[1] == r.model_a.prod and r.positions("b")[1] == r.model_b.prod

        limit = rng.choice((0, 0, 0, 1, 3, 7, 20))
        via_reader = limit == 0 and rng.random() < 0.5
        r.got_a.clear()
        r.got_b.clear()
        n_a = r.read_a(limit, via_reader)
        n_b = r.read_b(limit)
        want_a, want_b = r.model_a.read(limit), r.model_b.read(limit)
        reader = "RingReader.drain" if via_reader else f"MmapRing.consume(limit={limit})"
        assert r.got_a == want_a, f"round {rnd}: {reader} handed on other records"
        assert n_a == len(want_a)
        assert r.got_b == want_b, f"round {rnd}: libbpf handed on other records"
        assert n_b == len(want_b)
        assert r.got_a == r.got_b
        assert r.positions("a") == (r.model_a.cons, r.model_a.prod), \
            f"round {rnd}: {reader} left ring A at other positions"
        assert r.positions("b") == (r.model_b.cons, r.model_b.prod)
        assert r.space_a.used_bytes() == r.model_a.prod - r.model_a.cons
        seen["records"] += len(want_a)
        seen["empty_records"] += sum(1 for p in want_a if not p)
    # Everything left is read: both rings end empty at the same place.
    r.got_a.clear()
    r.got_b.clear()
    r.read_a(0, via_reader=False)
    r.read_b(0)
    assert r.got_a == r.model_a.read(0) == r.got_b
    assert r.positions("a") == r.positions("b") == (r.model_a.prod, r.model_a.prod)
    seen["records"] += len(r.got_a)
    seen["crossed_submitted"] = r.model_a.crossed["submitted"]
    seen["crossed_discarded"] = r.model_a.crossed["discarded"]
    seen["ring_full"] = r.model_a.full
    seen["laps"] = r.model_a.prod // r.size
    return seen


ROUNDS = {1: 600, 4: 2000}   # ring pages -> rounds: both rings go round 100+ times


def test_mmap_reader_matches_libbpf_over_many_wraps(rings):
    seen = run_rounds(rings, random.Random(20260), ROUNDS[rings.size // PAGE])
    # The rounds did what this test is about (the model counts it).
    assert seen["laps"] >= 100, seen
    assert seen["crossed_submitted"] >= 100 and seen["crossed_discarded"] >= 20, seen
    assert seen["ring_full"] >= 10, seen
    assert seen["discarded"] >= 1000 and seen["empty_records"] >= 20, seen
    assert all(seen[f"mod8_{i}"] >= 100 for i in range(8)), seen


def test_room_after_a_partial_read_is_what_the_reader_freed(rings):
    """Records of 55 bytes take 64 in the ring; the producer stays at most
    size - 1 ahead of the consumer, so a ring of `size` bytes holds
    size / 64 - 1 of them. After each reader has read 5, exactly 5 more fit
    into its ring."""
    fit = rings.size // 64 - 1
    ops = [(SUBMIT, 55, i) for i in range(fit + 1)]
    assert write_all(rings, ops) == [3] * fit + [0]
    got_a, got_b = read_both(rings, limit=5)
    assert got_a == got_b == [record_bytes(i, 55) for i in range(5)]
    assert rings.positions("a") == rings.positions("b") == (5 * 64, fit * 64)
    assert rings.space_a.used_bytes() == (fit - 5) * 64

    more = [(SUBMIT, 55, fit + 1 + i) for i in range(6)]
    assert write_all(rings, more) == [3] * 5 + [0]
    got_a, got_b = read_both(rings)
    kept = [seq for _, _, seq in ops[5:fit] + more[:5]]
    assert got_a == got_b == [record_bytes(seq, 55) for seq in kept]
    assert rings.positions("a") == rings.positions("b") == ((fit + 5) * 64,) * 2


@pytest.mark.parametrize("rings", [1], indirect=True, ids=["1-page-ring"])
async def test_ring_reader_on_the_event_loop_hands_on_what_libbpf_does(rings):
    """RingReader.start(): the loop watches the ring's fd and reads when the
    kernel wakes it. Each round is read while the reader is running."""
    rng = random.Random(5)
    loop = asyncio.get_running_loop()
    rings.reader.start(loop)
    try:
        seq = 0
        for rnd in range(30):
            ops = [(rng.choice((SUBMIT, DISCARD)), rng.choice(RESERVE_SIZES[:50]), seq + i)
                   for i in range(8)]      # at most 8 * 136 bytes: always room
            seq += len(ops)
            want = [record_bytes(s, size) for kind, size, s in ops if kind != DISCARD]
            rings.got_a.clear()
            assert rings.write(ops) == [3] * len(ops)
            deadline = loop.time() + 5
            # Until the reader has caught up with the producer (discards too).
            while len(set(rings.positions("a"))) > 1 and loop.time() < deadline:
                await asyncio.sleep(0.001)
            assert rings.reader.failure is None
            rings.got_b.clear()
            rings.read_b(0)
            assert rings.got_a == want == rings.got_b, f"round {rnd}"
            assert rings.positions("a") == rings.positions("b")
    finally:
        rings.reader.stop()


@pytest.mark.parametrize("rings", [1], indirect=True, ids=["1-page-ring"])
def test_a_broken_reader_is_caught(rings, monkeypatch):
    """The comparison can fail: MmapRing with its DISCARD bit handling
    switched off hands on discarded records (and mis-sizes them)."""
    monkeypatch.setattr(ringbuf, "DISCARD_BIT", 0)
    with pytest.raises(AssertionError, match="handed on other records|other positions"):
        run_rounds(rings, random.Random(7), rounds=40)
