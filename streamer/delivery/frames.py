"""The frame that the spool and the archive write their files in, and how
both read it back: one layout, little-endian, a 32-byte header and a payload:

    magic (4 bytes) | crc32 u32 | payload length u32 | count u32 |
    number u64 | time_ms i64 | payload

The CRC (zlib.crc32) covers everything after itself. Each file kind has its
own magic and its own meaning for `count` and `number` (the spool: the key's
length and the record's offset; the archive: the records in the frame and
the first one's seq), which its `FrameFormat` gives.

A frame is valid when its header makes sense, all of its bytes are there,
its CRC holds and its number comes after the previous valid frame's. After a
frame that is not, reading goes on at the next magic that starts a valid
frame: a bad region is skipped, never the valid frames after it.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import zlib
from dataclasses import dataclass
from typing import Iterator

HEADER = struct.Struct("<4sIIIQq")   # magic, crc, payload length, count, number, time_ms
PREFIX = struct.Struct("<4sI")       # magic, crc
BODY = struct.Struct("<IIQq")        # what the CRC starts with
HEADER_BYTES = HEADER.size           # 32
MAX_PAYLOAD = 64 << 20               # a longer length field is garbage, not a frame

assert HEADER_BYTES == 32 and PREFIX.size + BODY.size == HEADER_BYTES


@dataclass(frozen=True)
class FrameFormat:
    """One file kind's frames: its magic, what its header's count and number
    are, and so which headers make sense and which numbers may follow which.
    A frame's number is above the last number of the frame before it (and,
    when a bound is given, below that bound)."""

    magic: bytes
    number_name: str                 # what `number` is, for messages
    header_why: str                  # why a header makes no sense; {plen}, {count}
    min_count: int = 0               # the least count a header may hold
    counts_numbers: bool = False     # a frame takes number..number+count-1, not one

    def frame_at(self, data, i: int, size: int, after: int, below: int | None = None):
        """(end, number, count, time_ms) of the valid frame at data[i:size],
        else the reason it is not one."""
        if size - i < HEADER_BYTES:
            return "truncated header"
        magic, crc, plen, count, number, time_ms = HEADER.unpack_from(data, i)
        if magic != self.magic:
            return "bad magic"
        if plen > MAX_PAYLOAD or count > plen or count < self.min_count:
            return self.header_why.format(plen=plen, count=count)
        end = i + HEADER_BYTES + plen
        if end > size:
            return "truncated frame"
        with memoryview(data) as mv:
            if zlib.crc32(mv[i + 8:end]) != crc:
                return "bad checksum"
        if number <= after or (below is not None and number >= below):
            return f"{self.number_name} {number} out of order"
        return end, number, count, time_ms

    def header_fits(self, magic: bytes, plen: int, count: int) -> bool:
        """Whether a header could start a frame, judged by itself alone."""
        return (magic == self.magic and plen <= MAX_PAYLOAD
                and self.min_count <= count <= plen)

    def resync(self, data, i: int, size: int, after: int, below: int | None = None) -> int | None:
        """Where the next valid frame starts after position i, if anywhere."""
        j = data.find(self.magic, i + 1, size)
        while j != -1:
            if type(self.frame_at(data, j, size, after, below)) is tuple:
                return j
            j = data.find(self.magic, j + 1, size)
        return None

    def scan(self, data, size: int, after: int, below: int | None = None,
             pos: int = 0) -> Iterator[tuple]:
        """From byte pos of a file's bytes up to `size` (numbers up to `after`
        before it): ("frame", start, end, number, count, time_ms) for each
        valid frame, ("bad", start, end, why) for each region that holds
        none. A bad region that ends at `size` is a bad tail: no valid frame
        follows it."""
        counts_numbers = self.counts_numbers
        while pos < size:
            got = self.frame_at(data, pos, size, after, below)
            if type(got) is tuple:
                end, number, count, time_ms = got
                yield ("frame", pos, end, number, count, time_ms)
                pos, after = end, number + count - 1 if counts_numbers else number
                continue
            nxt = self.resync(data, pos, size, after, below)
            yield ("bad", pos, size if nxt is None else nxt, got)
            if nxt is None:
                return
            pos = nxt


@contextlib.contextmanager
def mapped(fd: int):
    """The file's bytes as they are now, mapped read-only (b"" when empty),
    unmapped when the block ends."""
    size = os.fstat(fd).st_size
    if size == 0:
        yield b""
        return
    data = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
    try:
        yield data
    finally:
        data.close()
