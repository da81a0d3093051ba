"""The asyncio ring-buffer reader: no thread, no busy polling.

The ring map's own fd is pollable: readable while records wait. The event
loop watches it and reads up to READ_CHUNK records per wake-up, decoding
each and handing it on. Readiness is level-triggered, so what is left is
read at the loop's next turn: a full ring (a burst of expiries) does not
hold the loop for seconds, and commits to Kafka go on while the ring is read.

The records are read through the ring's mmap'ed pages (MmapRing), as libbpf's
consumer reads them, but without a ctypes callback per record: about 2 us
less per event, which is a fifth of the daemon's cost per record. Records
are handed on as bytes: the Kafka sink encodes them without decoding them
into objects first (streamer/delivery/ring_records.py).
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import platform
import re
import struct
from typing import Callable

from . import abi
from ..errors import AbiError, StreamerError

log = logging.getLogger(__name__)

READ_CHUNK = 2_000   # records per wake-up of the event loop


_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
BUSY_BIT = 1 << 31      # the producer has reserved the record, not yet submitted
DISCARD_BIT = 1 << 30   # submitted as discarded: skip it
HEADER_BYTES = 8        # u32 length (with the two bits), u32 page offset
TSO_MACHINES = ("x86_64", "amd64", "i686", "i386")   # where plain loads/stores suffice


def ring_size(map_fd: int) -> int:
    """A ring buffer map's data size (its max_entries), from fdinfo."""
    text = open(f"/proc/self/fdinfo/{map_fd}").read()
    m = re.search(r"^max_entries:\s*(\d+)", text, re.M)
    if not m:
        raise StreamerError(f"fd {map_fd} is not a BPF map")
    return int(m.group(1))


# Memory ordering: what MmapRing relies on.
#
# The producer (kernel/bpf/ringbuf.c) reserves a record under its spinlock:
# it writes the header (length | BUSY), then publishes the producer position
# with smp_store_release. The program fills the record; commit (submit or
# discard) swaps in the final length word with xchg() (fully ordered, so at
# least a release of the record's bytes): BUSY cleared, DISCARD set if
# discarded. A reserve reads the consumer position with smp_load_acquire and
# fails if the producer would get more than size - 1 ahead of it.
# libbpf's consumer (ringbuf.c, ringbuf_process_ring) is the other half:
# smp_load_acquire of the producer position, smp_load_acquire of each header,
# and smp_store_release of the consumer position after each record. A reader
# needs the same three orderings: (1) header loads after the producer-position
# load that covers them, (2) the record's loads after the header load that saw
# BUSY clear, (3) every load of a record before the consumer-position store
# that lets the producer reuse its bytes (hence a handler's view is only
# valid during its call, on any CPU).
#
# MmapRing does plain loads and stores through struct on the mmap'ed pages.
# On x86-64 that is enough: under TSO, loads are not reordered with other
# loads and stores are not reordered with earlier loads, so the hardware
# already gives each load acquire and each store release semantics (libbpf's
# smp_load_acquire/smp_store_release are mere compiler barriers there). The
# compiler cannot reorder them either: each access is its own call into
# CPython's struct module, made in program order by the interpreter. On a
# little-endian host struct's "<I"/"<Q" take the native memcpy path, one
# aligned 4- or 8-byte access, so neither a header nor the 8-byte-aligned
# positions are read or written torn.
#
# On weakly ordered CPUs (arm64, POWER, RISC-V) this does not hold as is: the
# header load may be satisfied before the producer-position load (a stale
# header from the previous lap), the record's bytes before the header (stale
# payload under a fresh length), and the consumer-position store may become
# visible before the record's loads are done, so the kernel overwrites bytes
# still being read. There the reader needs acquire loads of the producer
# position and of each header (LDAR/LDAPR on arm64, ld + lwsync on POWER) and
# a release store of the consumer position (STLR; lwsync + std), or
# equivalent fences (arm64: dmb ishld after the loads, dmb ish before the
# store). Python cannot emit those: read through libbpf there
# (bpfsys.RingBuffer, a ctypes callback per record) or through a small C
# helper built on __atomic_load_n(..., __ATOMIC_ACQUIRE) and
# __atomic_store_n(..., __ATOMIC_RELEASE).
#
# tests/bpf/test_ring_reader.py checks this reader against libbpf's on the
# same records (wrap-around, discards, limits, the room the producer sees).


class MmapRing:
    """A BPF ring buffer map read in place. The kernel lays it out as: the
    consumer position (a page the reader may write), the producer position
    (read-only), then the data pages, mapped twice in a row so that a record
    that wraps around is contiguous. A record is an 8-byte header and the
    event; the reader stops at a record whose BUSY bit is set (reserved, not
    yet submitted) and publishes its position after each call (libbpf does
    after each record: here the producer gets the room back at the end of a
    call, up to READ_CHUNK records later). It relies on x86-64's ordering;
    see the comment above."""

    def __init__(self, map_fd: int, size: int | None = None):
        if platform.machine().lower() not in TSO_MACHINES:
            raise StreamerError(f"the ring reader relies on x86's memory ordering, and this "
                                f"CPU is {platform.machine()} (see streamer/datapath/ringbuf.py)")
        page = mmap.PAGESIZE
        self.size = size or ring_size(map_fd)
        if self.size & (self.size - 1):
            raise StreamerError(f"ring size {self.size} is not a power of two")
        self._mask = self.size - 1
        self._cons = mmap.mmap(map_fd, page, mmap.MAP_SHARED,
                               mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._data = mmap.mmap(map_fd, page + 2 * self.size, mmap.MAP_SHARED,
                               mmap.PROT_READ, offset=page)
        self._view = memoryview(self._data)
        self._base = page   # the data starts one page into the second mapping

    def consume(self, handle: Callable[[memoryview], None], limit: int = 0,
                on_reject: Callable[[AbiError], None] | None = None) -> int:
        """Hand each submitted record to `handle` (a view valid during the
        call), at most `limit` (0: all); returns how many. A record whose
        handler raised counts as read (the position moves past it), as with
        libbpf; an AbiError goes to `on_reject`, if given, and reading goes
        on."""
        data, view, base, mask = self._data, self._view, self._base, self._mask
        cons = _U64.unpack_from(self._cons, 0)[0]
        n = 0
        try:
            while True:
                prod = _U64.unpack_from(data, 0)[0]
                if cons >= prod:
                    return n
                while cons < prod:
                    off = base + (cons & mask)
                    hdr = _U32.unpack_from(data, off)[0]
                    if hdr & BUSY_BIT:
                        return n
                    length = hdr & ~(BUSY_BIT | DISCARD_BIT)
                    start = off + HEADER_BYTES
                    cons += (length + HEADER_BYTES + 7) & ~7
                    if not hdr & DISCARD_BIT:
                        n += 1
                        try:
                            handle(view[start:start + length])
                        except AbiError as exc:
                            if on_reject is None:
                                raise
                            on_reject(exc)
                        if n == limit:
                            return n
        finally:
            _U64.pack_into(self._cons, 0, cons)

    def close(self) -> None:
        try:
            self._view.release()
            self._data.close()
        except BufferError:   # a handler kept a record's view: the GC unmaps
            pass
        self._cons.close()


class RingReader:
    def __init__(self, map_fd: int, on_record: Callable[[memoryview], None],
                 on_failure: Callable[[BaseException], None] | None = None,
                 on_batch: Callable[[int], None] | None = None):
        """on_record(view) for each record: the record's bytes, valid during
        the call only; it raises AbiError for a record this version does not
        know (abi.decode_event's check), which is counted and skipped.
        on_batch(count) after each read of the ring that handed on records
        (the per-batch work stays off the per-record path)."""
        self._on_record = on_record
        self._on_failure = on_failure
        self._on_batch = on_batch
        self._fd = map_fd
        self._ring = MmapRing(map_fd)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.records = 0
        self.rejected = 0
        self.failure: BaseException | None = None

    def _reject(self, exc: AbiError) -> None:
        self.rejected += 1
        log.warning("dropping a ring record: %s", exc)

    def _consume(self) -> int:
        n = self._ring.consume(self._on_record, READ_CHUNK, self._reject)
        self.records += n
        if n and self._on_batch is not None:
            self._on_batch(n)
        return n

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._loop.add_reader(self._fd, self._readable)

    def _readable(self) -> None:
        try:
            self._consume()
        except Exception as exc:  # a reader that dies must not die silently
            self.failure = exc
            self.stop()
            if self._on_failure is None:
                raise
            self._on_failure(exc)

    def drain(self) -> int:
        """Consume everything in the ring now; returns the number of records."""
        total = 0
        while True:
            n = self._consume()
            total += n
            if n < READ_CHUNK:
                return total

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._fd)
            self._loop = None

    def close(self) -> None:
        self.stop()
        self._ring.close()


RECORD_BYTES = 8 + abi.EVENT_SIZE   # a ring record: 8-byte header, then the event


class RingSpace:
    """How full the event ring is, from its consumer and producer positions:
    the first two pages of a BPF ring buffer map, which any process may map
    read-only (what BPF_RB_AVAIL_DATA reports in the kernel; BCC 0.26 cannot
    call that helper). The sweeper is handed the room that is left, so a
    burst of expiries waits for the reader instead of becoming missed events.
    The headroom is left for the packet path."""

    def __init__(self, map_fd: int, ring_bytes: int):
        import mmap

        self.size = ring_bytes
        self.headroom = min(ring_bytes // 4, 64 << 10)
        page = mmap.PAGESIZE
        self._cons = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ, offset=0)
        self._prod = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)

    def used_bytes(self) -> int:
        cons = int.from_bytes(self._cons[:8], "little")
        prod = int.from_bytes(self._prod[:8], "little")
        return max(0, prod - cons)

    def room_records(self) -> int:
        """Events that may still be written, leaving the headroom free."""
        return max(0, (self.size - self.headroom - self.used_bytes()) // RECORD_BYTES)

    def close(self) -> None:
        self._cons.close()
        self._prod.close()
