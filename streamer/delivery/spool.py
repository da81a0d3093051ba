"""The durable local spool: where records wait while Kafka cannot take them.

The daemon appends a record (its Kafka key and msgpack value) and, after a
`sync()` that covers it, may ack the DESTROY to the kernel's outbox: from then
on the record survives SIGKILL and power loss. When Kafka is back the daemon
drains the spool in offset order (`read`, produce, `mark_delivered`).

Files in the spool directory (mode 0700, one process at a time: `lock` is
flock'ed for as long as the spool is open):

- `seg-<first offset, 20 digits>.spool`: append-only segments. Every offset
  in a segment is >= its name and below the next segment's name. A segment
  rolls when the next record would take it past `segment_bytes`.
- `cursor`: the delivered cursor, the highest offset Kafka acked with every
  lower one. Replaced by write + fsync + rename + fsync of the directory.

A record is one frame (streamer/delivery/frames.py), little-endian:

    magic "\\xc7CSp" | crc32 u32 | payload length u32 | key length u32 |
    offset u64 | time_ms i64 | key | value

The CRC (zlib.crc32) covers everything after itself: lengths, offset, time,
key and value. The header is 32 bytes.

Recovery on open reads every live segment, keeps every frame whose CRC holds,
and resynchronises after a bad one on the next magic that starts a valid
frame with a higher offset. A bad tail of the last segment (a write torn by a
crash) is cut so that appends continue after the last good frame; a bad tail
of an older segment is skipped and left in place. Each is a line in
`Spool.recovery.problems`. Offsets continue after the highest intact offset
(or the cursor, if higher). An offset handed out by `append` for a record that
a crash lost before its `sync` may be handed out again: only offsets up to
`durable_offset` are promises.

Bound policy: `depth_bytes` counts the bytes not yet delivered (appended,
synced or not, plus any unreadable regions, which hold disk until their
segment retires). An append that would take it past `max_bytes` raises
SpoolFull, writes nothing, counts the refusal in `full_refusals` and sets
`full` until an append succeeds or a delivery frees room. The daemon must then
not ack that DESTROY: the kernel keeps it in its dying outbox and emits it
again after its grace time, by which point the drain may have made room. So a
full spool loses no DESTROY; it moves the wait into the kernel's table, whose
own limit is the next line of defence. CREATE and UPDATE records are not
retried by the kernel: a refused one is gone and should be counted as such.
Disk use is at most about max_bytes, plus one segment of delivered records
still in the active segment; once every record is delivered the active
segment goes too (a small filesystem is not left full of delivered records).

A failing disk (ENOSPC, EDQUOT, EIO, a read-only filesystem) is treated as a
full spool, never as the end of the spool. A `sync` that fails discards every
record not yet durable (also any appended while it ran: a caller that appends
during a sync must treat its failure as theirs), cuts the files back to their
durable length where it can (a tail it cannot cut stays in a sealed segment,
past its durable length: reads never look there, recovery skips it or finds
whole frames in it, which are duplicates the dedupe key absorbs), and raises
SpoolWriteError; offsets are not handed out again. Appends are then refused
with SpoolUnwritable, a SpoolFull, for WRITE_RETRY_S, after which the next
append tries the disk again; a delivery that retires a segment ends the wait
at once. Reads and deliveries go on meanwhile, so a drain frees the disk. A
cursor that cannot be written (the disk being full is exactly when the drain
must free it) first gives up the `reserve` file (RESERVE_BYTES, made at open
and again once there is room), then, if it still fails, the delivered cursor
moves on in memory only: the drain continues, no segment is deleted until a
cursor write succeeds, and a restart before then sends those records again
(duplicates, not losses). A spool directory on a read-only filesystem opens
read-only: what it holds is drained, nothing new goes in.

Delivered segments are deleted, not kept: the archive for `ctstream replay`
is streamer/delivery/archive.py's, which the Kafka sink feeds with every record Kafka
acknowledged, live or drained from here, so that each is archived once.

Threads: `append` may run on the event loop while `sync`, `read` and
`mark_delivered` run in worker threads. Appends hold a short lock and never
do I/O; a sync hands the current buffer to the disk while appends fill the
next one. `read` and `mark_delivered` are meant for one drain at a time.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import fcntl
import os
import re
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field

from ..errors import ConfigError, SpoolError, SpoolFull, SpoolUnwritable, SpoolWriteError
from .frames import BODY as _BODY, HEADER, HEADER_BYTES, MAX_PAYLOAD, PREFIX as _PREFIX
from .frames import FrameFormat, mapped

MAGIC = b"\xc7CSp"
INDEX_STRIDE = 64 << 10              # one sparse index entry per this many segment bytes
READ_CHUNK = 256 << 10
MIN_SEGMENT_BYTES = 256
MAX_OFFSET = (1 << 63) - 1
CURSOR_MAGIC = b"ctstream-spool-cursor"
WRITE_RETRY_S = 1.0                  # appends refused this long after a failed write
RESERVE_BYTES = 64 << 10             # given up so that a cursor can be written on a full disk
RESERVE_NAME = "reserve"
_SEGMENT_NAME = re.compile(r"seg-(\d{20})\.spool")
_HINTS_KEPT = 64


class _DiskState:
    """How the spool's disk is doing (one attribute of the Spool: the spool's
    own attributes stay few, which keeps their lookups on the fast path)."""

    __slots__ = ("read_only", "write_error", "write_failures", "retry_at", "cursor_lag",
                 "reserve")

    def __init__(self) -> None:
        self.read_only = False
        self.write_error: str | None = None    # why the disk refused the last write
        self.write_failures = 0
        self.retry_at = 0.0                    # appends try the disk again from then
        self.cursor_lag: str | None = None     # the cursor on disk is behind _delivered
        self.reserve = True                    # the reserve file is there (or not wanted yet)


@dataclass(frozen=True, slots=True)
class SpoolRecord:
    offset: int
    time_ms: int
    key: bytes
    value: bytes


@dataclass
class RecoveryReport:
    segments: int = 0
    records: int = 0
    skipped_records: int = 0
    skipped_bytes: int = 0
    problems: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        text = (f"{self.segments} segments, {self.records} records recovered, "
                f"{self.skipped_records} records ({self.skipped_bytes} bytes) skipped")
        return "; ".join([text] + self.problems)


def segment_name(first: int) -> str:
    return f"seg-{first:020d}.spool"


# ---------------------------------------------------------------- frames

# One record a frame: the payload is its key and value, the count the key's
# length, the number the record's offset.
_FRAMES = FrameFormat(MAGIC, "offset", "bad header (lengths {plen}/{count})")


def _torn_frames(data, i: int, size: int) -> int:
    """How many frames a bad tail from i held, judged by their headers."""
    n = 0
    while i < size:
        if size - i < HEADER_BYTES:
            return n + MAGIC.startswith(bytes(data[i:min(i + 4, size)]))
        magic, _crc, plen, klen, _off, _t = HEADER.unpack_from(data, i)
        if not _FRAMES.header_fits(magic, plen, klen):
            return n
        n += 1
        i += HEADER_BYTES + plen
    return n


def _skipped(data, start: int, end: int, size: int, after: int) -> tuple[int, int | None]:
    """How many records the bad region data[start:end] held (offsets up to
    `after` before it), and the offset of the valid frame at its end (None
    for a bad tail, one that ends at `size`)."""
    if end == size:
        return _torn_frames(data, start, size), None
    nxt = HEADER.unpack_from(data, end)[4]
    return nxt - after - 1, nxt


def _segment_files(directory: str) -> tuple[list[tuple[int, str]], list[str]]:
    """(first offset, name) of the segments in a directory, sorted, and the
    names that look like segments but cannot be."""
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return [], []
    good, bad = [], []
    for entry in entries:
        name = entry.name
        if not entry.is_file(follow_symlinks=False):
            if name.startswith("seg-"):
                bad.append(name)
            continue
        m = _SEGMENT_NAME.fullmatch(name)
        if m and int(m.group(1)) <= MAX_OFFSET:
            good.append((int(m.group(1)), name))
        elif name.startswith("seg-"):
            bad.append(name)
    good.sort()
    return good, sorted(bad)


# ---------------------------------------------------------------- segments

class _Segment:
    """What the spool knows of one live segment file. `bytes` and `records`
    include what is still buffered; `durable_bytes` is what a sync made safe
    and what readers may look at. `delivered_pos` is the frame boundary after
    the last delivered frame. A sealed segment's `bound` is the next one's
    first offset: it can hold no offset at or above it. `holes` maps the start
    of each unreadable region to its end. The sparse index lists (offset,
    position, ordinal) of a frame every INDEX_STRIDE bytes, so that a reader
    seeks without scanning the file."""

    __slots__ = ("path", "name", "first", "last", "records", "bytes", "durable_bytes",
                 "durable_records", "durable_last", "delivered_pos", "delivered_records", "holes", "index_offsets",
                 "index_at", "next_index_at", "wfd", "rfd", "sealed", "bound", "on_disk")

    def __init__(self, directory: str, first: int):
        self.name = segment_name(first)
        self.path = os.path.join(directory, self.name)
        self.first = first
        self.last = first - 1
        self.records = 0
        self.bytes = 0
        self.durable_bytes = 0
        self.durable_records = 0
        self.durable_last = first - 1
        self.delivered_pos = 0
        self.delivered_records = 0
        self.holes: dict[int, int] = {}
        self.index_offsets: list[int] = []
        self.index_at: list[tuple[int, int]] = []
        self.next_index_at = 0
        self.wfd: int | None = None
        self.rfd: int | None = None
        self.sealed = False
        self.bound = MAX_OFFSET + 1
        self.on_disk = False

    def seal(self, bound: int) -> None:
        self.bound = bound
        self.sealed = True

    def delivered_by(self, cursor: int) -> bool:
        """Every offset this segment can hold is at or below the cursor. For a
        damaged segment that is more than its last intact record: it stays
        until the cursor has passed the whole range it may have held."""
        return self.sealed and self.bound - 1 <= cursor

    def add_index(self, offset: int, pos: int, ordinal: int) -> None:
        self.index_offsets.append(offset)
        self.index_at.append((pos, ordinal))
        self.next_index_at = pos + INDEX_STRIDE

    def seek_point(self, after: int) -> tuple[int, int, int]:
        """(position, ordinal, offset before it) of a frame boundary at or
        before the first frame with an offset above `after`."""
        k = bisect.bisect_right(self.index_offsets, after) - 1
        if k < 0:
            return 0, 0, self.first - 1
        pos, ordinal = self.index_at[k]
        return pos, ordinal, self.index_offsets[k] - 1

    def close_fds(self) -> None:
        for attr in ("wfd", "rfd"):
            fd = getattr(self, attr)
            if fd is not None:
                setattr(self, attr, None)
                os.close(fd)


# ---------------------------------------------------------------- the spool

class Spool:
    """Open with Spool.open(directory, ...); see the module docstring."""

    def __init__(self) -> None:
        raise TypeError("use Spool.open(directory, ...)")

    @classmethod
    def open(cls, directory, max_bytes: int = 1 << 30,
             segment_bytes: int = 16 << 20) -> "Spool":
        directory = os.fspath(directory)
        if max_bytes <= HEADER_BYTES:
            raise ConfigError(f"spool max_bytes must be above {HEADER_BYTES}, got {max_bytes}")
        if segment_bytes < MIN_SEGMENT_BYTES:
            raise ConfigError(f"spool segment_bytes must be at least {MIN_SEGMENT_BYTES}, "
                              f"got {segment_bytes}")
        self = object.__new__(cls)
        self.directory = directory
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.read_problems: list[str] = []
        self.full_refusals = 0
        self._full = False
        self._room = max_bytes
        self._closed = False
        self._disk = _DiskState()
        self._lock = threading.Lock()        # in-memory state; held briefly, never over I/O
        self._sync_lock = threading.Lock()   # one sync at a time, so buffers reach disk in order
        self._drain_lock = threading.Lock()  # read, mark_delivered and retirement
        self._hints: dict[int, tuple[_Segment, int, int]] = {}
        self._lock_fd = self._dir_fd = -1
        try:
            self._take_lock()
            self._dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            self._recover()
            if self._disk.read_only:
                self._refuse_writes("the spool's filesystem is read-only", forever=True)
            else:
                self._make_reserve()
        except BaseException:
            self._release_fds()
            raise
        return self

    # -- opening

    def _take_lock(self) -> None:
        try:
            if not os.path.isdir(self.directory):
                os.makedirs(self.directory, mode=0o700)
                # The new directory's own name must survive a power cut too.
                _fsync_dir(os.path.dirname(os.path.abspath(self.directory)))
        except OSError as exc:
            raise SpoolError(f"cannot create the spool directory {self.directory}: "
                             f"{exc.strerror}") from exc
        path = os.path.join(self.directory, "lock")
        try:
            self._lock_fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            if exc.errno != errno.EROFS:
                raise SpoolError(f"cannot open the spool lock {path}: {exc.strerror}") from exc
            # A read-only filesystem: drain what is there, take nothing new.
            # flock works on a read-only descriptor; without a lock file the
            # directory itself is locked.
            self._disk.read_only = True
            try:
                self._lock_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                self._lock_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY
                                        | os.O_CLOEXEC)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise SpoolError(f"cannot lock the spool {self.directory}: "
                                 f"{exc.strerror}") from exc
            holder = os.pread(self._lock_fd, 32, 0).decode("ascii", "replace").strip()
            raise SpoolError(f"the spool {self.directory} is already open "
                             f"(lock {path} held{' by pid ' + holder if holder else ''}); "
                             f"only one process may use a spool directory") from exc
        # Who holds it, for the message above; fixed width and written in
        # place, so that it needs no new disk block (a full disk must not
        # stop the spool from opening).
        with contextlib.suppress(OSError):
            os.pwrite(self._lock_fd, f"{os.getpid():<15}\n".encode(), 0)

    def _recover(self) -> None:
        report = RecoveryReport()
        self.recovery = report
        tmp = os.path.join(self.directory, "cursor.tmp")
        if os.path.exists(tmp) and not self._disk.read_only:
            os.unlink(tmp)      # a cursor write that never reached its rename
        delivered = self._read_cursor(report)
        files, bad_names = _segment_files(self.directory)
        for name in bad_names:
            report.problems.append(f"{os.path.join(self.directory, name)}: not a segment "
                                   f"name (seg-<20 digits>.spool, offset below 2^63); ignored")
        segments = []
        highest = -1
        for k, (first, name) in enumerate(files):
            below = files[k + 1][0] if k + 1 < len(files) else None
            seg = self._recover_segment(first, below, delivered, report)
            segments.append(seg)
            if seg.records:
                highest = max(highest, seg.last)
        report.segments = len(segments)
        for seg, nxt in zip(segments, segments[1:]):
            seg.seal(nxt.first)
        self._segments: list[_Segment] = segments
        self._active: _Segment | None = segments[-1] if segments else None
        self._next = max(highest + 1, delivered + 1,
                         self._active.first if self._active else 0)
        self._durable = self._next - 1
        self._delivered = delivered
        self._buf = bytearray()
        self._pieces: list[tuple[_Segment, bytearray]] = (
            [(self._active, self._buf)] if self._active else [])
        # A crash between the cursor's rename and the retirement it allowed
        # leaves wholly delivered segments behind; finish the job.
        if not self._disk.read_only:
            with self._drain_lock:
                self._retire([s for s in segments if s.delivered_by(delivered)])
        self._depth_bytes = sum(s.bytes - s.delivered_pos for s in self._segments)
        self._depth_records = sum(s.records - s.delivered_records for s in self._segments)

    def _recover_segment(self, first: int, below: int | None, delivered: int,
                         report: RecoveryReport) -> _Segment:
        seg = _Segment(self.directory, first)
        seg.on_disk = True
        last_file = below is None and not self._disk.read_only
        try:
            fd = os.open(seg.path, (os.O_RDWR if last_file else os.O_RDONLY) | os.O_CLOEXEC)
        except OSError as exc:
            raise SpoolError(f"cannot open the spool segment {seg.path}: {exc.strerror}") from exc
        cut = None
        try:
            with mapped(fd) as data:
                size = len(data)
                for item in _FRAMES.scan(data, size, first - 1, below):
                    if item[0] == "frame":
                        _, pos, end, off, _klen, _t = item
                        if pos >= seg.next_index_at:
                            seg.add_index(off, pos, seg.records)
                        seg.records += 1
                        seg.last = off
                        if off <= delivered:
                            seg.delivered_pos, seg.delivered_records = end, seg.records
                        continue
                    _, start, end, why = item
                    lost, nxt = _skipped(data, start, end, size, seg.last)
                    report.skipped_bytes += end - start
                    report.skipped_records += max(lost, 0)
                    if nxt is not None:
                        seg.holes[start] = end
                        report.problems.append(
                            f"{seg.path}: byte {start}: {why}; skipped {end - start} bytes "
                            f"({lost} records, offsets {nxt - lost}..{nxt - 1}), "
                            f"resumed at the valid frame at byte {end}")
                    elif last_file:
                        cut = start
                        report.problems.append(
                            f"{seg.path}: byte {start}: {why}; truncated tail of "
                            f"{end - start} bytes ({lost} records) cut, the file now "
                            f"ends at byte {start}")
                    else:
                        seg.holes[start] = end
                        report.problems.append(
                            f"{seg.path}: byte {start}: {why}; the {end - start} bytes "
                            f"to the end of this older segment ({lost} records) skipped")
            if cut is not None:
                os.ftruncate(fd, cut)
                os.fsync(fd)
                size = cut
        except OSError as exc:
            raise SpoolError(f"cannot recover the spool segment {seg.path}: "
                             f"{exc.strerror}") from exc
        finally:
            os.close(fd)
        seg.bytes = seg.durable_bytes = size
        seg.durable_records, seg.durable_last = seg.records, seg.last
        report.records += seg.records
        return seg

    def _read_cursor(self, report: RecoveryReport) -> int:
        path = os.path.join(self.directory, "cursor")
        try:
            with open(path, "rb") as f:
                raw = f.read(128)
        except FileNotFoundError:
            return -1
        try:
            magic, version, text, crc = raw.split()
            offset = int(text)
            if (magic != CURSOR_MAGIC or version != b"1" or not -1 <= offset <= MAX_OFFSET
                    or int(crc, 16) != zlib.crc32(text)):
                raise ValueError
        except ValueError:
            report.problems.append(f"{path}: unreadable delivered cursor {raw[:60]!r}; "
                                   f"every record left will be sent again")
            return -1
        return offset

    # -- writing

    def append(self, key: bytes, value: bytes, time_ms: int) -> int:
        """Buffer one record; returns its offset. Durable after the next sync()."""
        plen = len(key) + len(value)
        flen = HEADER_BYTES + plen
        with self._lock:
            # _room is -1 once closed or while the disk refuses writes, so one
            # test guards the fast path.
            if self._depth_bytes + flen > self._room or plen > MAX_PAYLOAD:
                self._refuse(flen, plen)
            off = self._next
            try:
                body = _BODY.pack(plen, len(key), off, time_ms) + key + value
            except struct.error as exc:
                raise SpoolError(f"cannot spool a record with time_ms {time_ms!r}: {exc}") from exc
            seg = self._active
            if seg is None or (seg.bytes + flen > self.segment_bytes and seg.bytes):
                seg = self._roll(off)
            pos = seg.bytes
            if pos >= seg.next_index_at:
                seg.add_index(off, pos, seg.records)
            buf = self._buf
            buf += _PREFIX.pack(MAGIC, zlib.crc32(body))
            buf += body
            seg.bytes = pos + flen
            seg.records += 1
            seg.last = off
            self._next = off + 1
            self._depth_bytes += flen
            self._depth_records += 1
            self._full = False
            return off

    def _refuse(self, flen: int, plen: int) -> None:
        """Why an append cannot go in (caller holds _lock). Raises, unless the
        wait after a failed write is over and the record fits: then the
        append goes on and tries the disk again."""
        self._check_usable()
        if flen > self.max_bytes or plen > MAX_PAYLOAD:
            raise SpoolError(f"a record of {flen} bytes can never fit in the spool "
                             f"(max_bytes {self.max_bytes}, payload at most {MAX_PAYLOAD})")
        if self._disk.write_error is not None and not self._disk.read_only \
                and time.monotonic() >= self._disk.retry_at:
            self._room = self.max_bytes
            if self._depth_bytes + flen <= self._room:
                return
        self._full = True
        self.full_refusals += 1
        if self._disk.write_error is not None and self._room < 0:
            raise SpoolUnwritable(f"the spool {self.directory} cannot write: "
                                  f"{self._disk.write_error}")
        raise SpoolFull(f"the spool {self.directory} is full: {self._depth_bytes} "
                        f"undelivered bytes, max_bytes {self.max_bytes}")

    def _refuse_writes(self, why: str, forever: bool = False) -> None:
        """Appends are refused for WRITE_RETRY_S (caller holds _lock, or
        nobody else has the spool yet)."""
        self._disk.write_error = why
        self._room = -1
        self._disk.retry_at = float("inf") if forever else time.monotonic() + WRITE_RETRY_S

    def _writes_work(self) -> None:
        """A write reached the disk, or room was freed: appends go in again."""
        if self._disk.write_error is not None and not self._disk.read_only and not self._closed:
            self._disk.write_error = None
            self._room = self.max_bytes

    def _roll(self, first: int) -> _Segment:
        """Seal the active segment and make a new one (caller holds _lock).
        The file is created by the next sync, which fsyncs the directory."""
        if self._active is not None and not self._active.sealed:
            self._active.seal(first)
        seg = _Segment(self.directory, first)
        self._segments.append(seg)
        self._active = seg
        self._buf = bytearray()
        self._pieces.append((seg, self._buf))
        return seg

    def sync(self) -> int:
        """Write what was appended and fsync it; returns the highest durable
        offset. Every record appended before the call survives a crash after
        it returns. On a disk error it raises SpoolWriteError, having
        discarded what was not durable (see the module docstring)."""
        with self._sync_lock:
            with self._lock:
                self._check_usable()
                upto = self._next - 1
                taken = self._pieces
                pieces = [(s, b) for s, b in taken if b]
                if not pieces:
                    self._durable = upto
                    return upto
                # What the pieces bring each segment to, once on disk.
                marks = {id(s): (s.records, s.last) for s, _ in pieces}
                self._buf = bytearray()
                self._pieces = [(self._active, self._buf)] if self._active else []
            created = False
            try:
                for seg, data in pieces:
                    if seg.wfd is None:
                        flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC
                        if not seg.on_disk:
                            flags |= os.O_CREAT | os.O_EXCL
                            created = True
                        seg.wfd = os.open(seg.path, flags, 0o600)
                        seg.on_disk = True
                    _write_all(seg.wfd, data)
                for seg in {id(s): s for s, _ in pieces}.values():
                    os.fdatasync(seg.wfd)
                if created:
                    # A new file's name lives in the directory: without this
                    # fsync a power cut can lose the whole synced segment.
                    os.fsync(self._dir_fd)
            except OSError as exc:
                # After a failed write or fsync the kernel may have dropped the
                # dirty pages and will not report it twice: nothing appended
                # since the last good sync can be trusted. Forget it, and
                # refuse appends for a while: the daemon treats this as a full
                # spool (its DESTROYs stay in the kernel's outbox).
                why = f"{exc.strerror} ({exc.filename or self.directory})"
                with self._lock:
                    self._discard_unsynced()
                    self._disk.write_failures += 1
                    self._refuse_writes(why)
                raise SpoolWriteError(f"the spool {self.directory} cannot write: {why}; "
                                      f"the records since the last sync are not durable") from exc
            with self._lock:
                for seg, data in pieces:
                    seg.durable_bytes += len(data)
                    seg.durable_records, seg.durable_last = marks[id(seg)]
                for seg, _ in taken:
                    # Sealed and not in the new buffers: nothing more goes there.
                    if (seg.sealed and seg.wfd is not None
                            and not any(s is seg for s, _ in self._pieces)):
                        os.close(seg.wfd)
                        seg.wfd = None
                self._durable = upto
                self._writes_work()
            if not self._disk.reserve:
                self._make_reserve()
            return upto

    def _discard_unsynced(self) -> None:
        """Forget every record that is not durable (caller holds _sync_lock
        and _lock). Segments go back to their durable length; one that never
        held a durable record goes; the last one left is sealed, so that new
        records start a clean segment whether or not its file could be cut."""
        kept: list[_Segment] = []
        for seg in self._segments:
            lost_records = seg.records - seg.durable_records
            lost_bytes = seg.bytes - seg.durable_bytes
            if lost_records or lost_bytes:
                self._depth_records -= lost_records
                self._depth_bytes -= lost_bytes
                seg.records, seg.last, seg.bytes = (seg.durable_records, seg.durable_last,
                                                    seg.durable_bytes)
                while seg.index_at and seg.index_at[-1][0] >= seg.durable_bytes:
                    seg.index_at.pop()
                    seg.index_offsets.pop()
                seg.next_index_at = seg.index_at[-1][0] + INDEX_STRIDE if seg.index_at else 0
                if seg.wfd is not None:
                    with contextlib.suppress(OSError):
                        os.ftruncate(seg.wfd, seg.durable_bytes)
            if seg.durable_bytes == 0 and seg.delivered_pos == 0:
                seg.close_fds()
                if seg.on_disk:
                    with contextlib.suppress(OSError):
                        os.unlink(seg.path)
                continue
            kept.append(seg)
        self._segments = kept
        if kept and not kept[-1].sealed:
            kept[-1].seal(self._next)
        self._active = None             # the next append starts a new segment
        self._buf = bytearray()
        self._pieces = []
        for key in [k for k in self._hints if k > self._durable]:
            del self._hints[key]

    def _make_reserve(self) -> None:
        """Make the reserve file, if there is room for it (best effort)."""
        path = os.path.join(self.directory, RESERVE_NAME)
        try:
            if os.path.getsize(path) == RESERVE_BYTES:
                self._disk.reserve = True
                return
        except OSError:
            pass
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                _write_all(fd, bytes(RESERVE_BYTES))
                os.fdatasync(fd)
            finally:
                os.close(fd)
            self._disk.reserve = True
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(path)
            self._disk.reserve = False

    def _give_up_reserve(self) -> bool:
        """Free the reserve's room for a cursor write; False if none is left."""
        try:
            os.unlink(os.path.join(self.directory, RESERVE_NAME))
        except OSError:
            self._disk.reserve = False
            return False
        self._disk.reserve = False
        with contextlib.suppress(OSError):
            os.fsync(self._dir_fd)
        return True

    # -- draining

    def read(self, max_records: int, after: int | None = None) -> list[SpoolRecord]:
        """Up to max_records durable records with offsets above `after` (or the
        delivered cursor, whichever is higher), in offset order."""
        out: list[SpoolRecord] = []
        with self._drain_lock:
            with self._lock:
                self._check_usable()
                start = self._delivered if after is None else max(after, self._delivered)
                upto = self._durable
                snapshot = [(s, s.durable_bytes) for s in self._segments]
            if max_records <= 0 or start >= upto:
                return out
            firsts = [s.first for s, _ in snapshot]
            k = max(bisect.bisect_right(firsts, start + 1) - 1, 0)
            try:
                self._read_into(out, snapshot[k:], start, upto, max_records)
            except OSError as exc:
                raise SpoolError(f"cannot read the spool {self.directory}: {exc.strerror} "
                                 f"({exc.filename or 'a segment'})") from exc
        return out

    def _read_into(self, out: list[SpoolRecord], snapshot: list[tuple[_Segment, int]],
                   start: int, upto: int, max_records: int) -> None:
        for seg, limit in snapshot:
            if seg.first > upto or len(out) >= max_records:
                break
            if seg.last <= start:
                continue
            hint = self._hints.get(start)
            if hint is not None and hint[0] is seg:
                pos, ordinal, prev = hint[1], hint[2], start
            else:
                pos, ordinal, prev = seg.seek_point(start)
            taken = len(out)
            pos, ordinal = self._walk(seg, pos, ordinal, prev, limit, start, upto,
                                      max_records, out)
            if len(out) > taken:
                self._remember(out[-1].offset, seg, pos, ordinal)

    def _remember(self, offset: int, seg: _Segment, pos: int, ordinal: int) -> None:
        """Keep where the frame after `offset` starts: the next read and the
        mark_delivered of a batch start there instead of from an index point."""
        hints = self._hints
        hints[offset] = (seg, pos, ordinal)
        while len(hints) > _HINTS_KEPT:
            del hints[next(iter(hints))]

    def _walk(self, seg: _Segment, pos: int, ordinal: int, prev: int, limit: int,
              after: int, upto: int, max_records: int, out: list | None) -> tuple[int, int]:
        """Go through seg's frames from the boundary `pos` (`ordinal` frames
        before it, offsets up to `prev` before it) up to byte `limit`. Frames
        with offsets <= after are passed; the next ones up to `upto` go to
        `out` until it holds max_records (with out None: stop at the first of
        them). Returns the boundary where it stopped and the number of frames
        before it."""
        fd = self._reader(seg)
        holes = seg.holes
        want = READ_CHUNK
        while pos < limit:
            if pos in holes:
                pos = holes[pos]
                continue
            asked = min(limit - pos, want)
            data = os.pread(fd, asked, pos)
            n = len(data)
            if n < asked:
                limit = pos + n         # shorter than written: _damaged reports it
            want = READ_CHUNK
            i = 0
            with memoryview(data) as mv:
                while i < n:
                    if i and holes and pos + i in holes:
                        break
                    if n - i < HEADER_BYTES:
                        if i and pos + i + HEADER_BYTES <= limit:
                            break       # the header runs past the chunk: read on from here
                        return self._damaged(seg, pos + i, ordinal, prev, limit), ordinal
                    magic, crc, plen, klen, off, t = HEADER.unpack_from(data, i)
                    end = i + HEADER_BYTES + plen
                    if (end > n and pos + end <= limit and magic == MAGIC
                            and plen <= MAX_PAYLOAD and klen <= plen):
                        want = max(READ_CHUNK, end - i)   # the frame runs past the chunk
                        break
                    if (magic != MAGIC or plen > MAX_PAYLOAD or klen > plen or end > n
                            or zlib.crc32(mv[i + 8:end]) != crc):
                        resume = self._damaged(seg, pos + i, ordinal, prev, limit)
                        i = resume - pos
                        break
                    if off > after:
                        if off > upto or out is None or len(out) >= max_records:
                            return pos + i, ordinal
                        k0 = i + HEADER_BYTES
                        out.append(SpoolRecord(off, t, data[k0:k0 + klen],
                                               data[k0 + klen:end]))
                    ordinal += 1
                    prev = off
                    i = end
            pos += i
        return min(pos, limit), ordinal

    def _damaged(self, seg: _Segment, start: int, ordinal: int, prev: int,
                 limit: int) -> int:
        """A frame that was valid at recovery or when written no longer is:
        the file changed under us. Skip to the next valid frame as recovery
        would, remember the hole and report it; returns where to go on."""
        data = os.pread(self._reader(seg), max(limit - start, 0), start)
        size = len(data)
        nxt = _FRAMES.resync(data, 0, size, prev)
        stop = size if nxt is None else nxt
        lost, resumed_at = _skipped(data, 0, stop, size, prev)
        lost = max(lost, 1 if resumed_at is None else 0)
        end = start + stop
        seg.holes[start] = end
        with self._lock:
            seg.records -= lost
            if ordinal >= seg.delivered_records:
                self._depth_records -= lost
        self.read_problems.append(f"{seg.path}: byte {start}: a frame that was valid is "
                                  f"damaged now; skipped {end - start} bytes ({lost} records)")
        return end

    def _reader(self, seg: _Segment) -> int:
        if seg.rfd is None:
            seg.rfd = os.open(seg.path, os.O_RDONLY | os.O_CLOEXEC)
        return seg.rfd

    def flush_cursor(self) -> bool:
        """Try again to write a delivered cursor that lags in memory (see
        the module docstring), and retire what it covers; True once it is
        on disk."""
        if self._disk.cursor_lag is not None:
            self.mark_delivered(self._delivered, again=True)
        return self._disk.cursor_lag is None

    def mark_delivered(self, offset: int, again: bool = False) -> None:
        """Kafka acked every record up to `offset`. Persists the cursor, then
        retires the segments it wholly covers (`again`: the same offset once
        more, for a cursor that could not be written)."""
        with self._drain_lock:
            with self._lock:
                self._check_usable()
                if offset < self._delivered or (offset == self._delivered and not again):
                    return
                if offset > self._durable:
                    raise SpoolError(f"cannot mark offset {offset} delivered: records are "
                                     f"durable only up to {self._durable} (sync first)")
                if not any(b for _, b in self._pieces) and \
                        offset >= max((s.last for s in self._segments), default=-1):
                    # Every record is delivered; offsets above the last one
                    # with nothing buffered were discarded by a failed sync:
                    # no record holds them, and the segment sealed over them
                    # may go.
                    offset = max(offset, self._next - 1)
                segments = list(self._segments)
            # The cursor is durable before any segment it covers goes: a crash
            # in between leaves a delivered segment (retired at the next open),
            # never a cursor that lags behind deleted records, which would let
            # offsets run backwards. A cursor that cannot be written moves on
            # in memory only and nothing is retired (see the module docstring).
            durable_cursor = self._persist_cursor(offset)
            whole: list[_Segment] = []
            partial = None
            for seg in segments:
                if seg.first > offset:
                    break
                if seg.delivered_by(offset):
                    whole.append(seg)
                    continue
                hint = self._hints.get(offset)
                if hint is not None and hint[0] is seg:
                    pos, ordinal = hint[1], hint[2]
                else:
                    p0, o0, prev = seg.seek_point(offset)
                    try:
                        pos, ordinal = self._walk(seg, p0, o0, prev, seg.durable_bytes,
                                                  offset, offset, 0, None)
                    except OSError as exc:
                        raise SpoolError(f"cannot read the spool segment {seg.path}: "
                                         f"{exc.strerror}") from exc
                partial = (seg, pos, ordinal)
                break
            with self._lock:
                self._delivered = offset
                for seg in whole:
                    self._depth_bytes -= seg.bytes - seg.delivered_pos
                    self._depth_records -= seg.records - seg.delivered_records
                    seg.delivered_pos, seg.delivered_records = seg.bytes, seg.records
                    if durable_cursor:
                        self._segments.remove(seg)
                if partial is not None:
                    seg, pos, ordinal = partial
                    if pos > seg.delivered_pos:
                        self._depth_bytes -= pos - seg.delivered_pos
                        self._depth_records -= ordinal - seg.delivered_records
                        seg.delivered_pos, seg.delivered_records = pos, ordinal
                if whole or partial:
                    self._full = False
                active = self._active
                if durable_cursor and active is not None and active not in self._segments:
                    self._active, self._pieces = None, []     # retired above, sealed
                elif (durable_cursor and active is not None and offset >= self._next - 1
                        and not self._buf and active.delivered_records == active.records
                        and active.delivered_pos == active.bytes == active.durable_bytes):
                    # Everything is delivered: the active segment goes too, so
                    # that its delivered bytes do not hold the disk until it
                    # fills up; the next append starts a new one.
                    active.seal(self._next)
                    self._segments.remove(active)
                    self._active = None
                    self._pieces = []
                    whole.append(active)
                if not durable_cursor:
                    whole = []
            for key in [k for k in self._hints if k < offset]:
                del self._hints[key]
            self._retire(whole)
            if whole:
                with self._lock:
                    self._writes_work()
                if not self._disk.reserve:
                    self._make_reserve()

    def _persist_cursor(self, offset: int) -> bool:
        """Write the cursor; on a full disk give up the reserve and try again.
        False if it could not be written (it then lags, in memory only)."""
        try:
            self._write_cursor(offset)
        except SpoolError as exc:
            err = getattr(exc.__cause__, "errno", None)
            if self._disk.read_only or err not in (errno.ENOSPC, errno.EDQUOT) \
                    or not self._give_up_reserve():
                self._disk.cursor_lag = str(exc)
                return False
            try:
                self._write_cursor(offset)
            except SpoolError as again:
                self._disk.cursor_lag = str(again)
                return False
        self._disk.cursor_lag = None
        return True

    def _write_cursor(self, offset: int) -> None:
        text = str(offset).encode()
        line = b"%s 1 %s %08x\n" % (CURSOR_MAGIC, text, zlib.crc32(text))
        tmp = os.path.join(self.directory, "cursor.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                _write_all(fd, line)
                os.fdatasync(fd)
            finally:
                os.close(fd)
            # rename() replaces the old cursor atomically: a crash leaves the
            # old value or the new one, never a half-written line. The
            # directory fsync makes the rename itself durable.
            os.replace(tmp, os.path.join(self.directory, "cursor"))
            os.fsync(self._dir_fd)
        except OSError as exc:
            raise SpoolError(f"cannot write the spool cursor in {self.directory}: "
                             f"{exc.strerror}") from exc

    def _retire(self, segments: list[_Segment]) -> None:
        """Delete wholly delivered segments (caller holds _drain_lock)."""
        if not segments:
            return
        try:
            for seg in segments:
                with self._lock:
                    seg.close_fds()
                    if seg in self._segments:
                        self._segments.remove(seg)
                with contextlib.suppress(FileNotFoundError):   # never made, or gone
                    os.unlink(seg.path)
            os.fsync(self._dir_fd)
        except OSError as exc:
            raise SpoolError(f"cannot retire delivered spool segments in {self.directory}: "
                             f"{exc.strerror}") from exc

    # -- state

    @property
    def depth_records(self) -> int:
        return self._depth_records

    @property
    def depth_bytes(self) -> int:
        return self._depth_bytes

    @property
    def full(self) -> bool:
        return self._full

    @property
    def delivered_offset(self) -> int:
        """-1 until something is delivered."""
        return self._delivered

    @property
    def durable_offset(self) -> int:
        """-1 until something is durable."""
        return self._durable

    @property
    def next_offset(self) -> int:
        return self._next

    @property
    def cursor_lag(self) -> str | None:
        """Why the delivered cursor on disk is behind the one in memory, if it is."""
        return self._disk.cursor_lag

    @property
    def write_error(self) -> str | None:
        """Why the disk refused the last write, until a write works again."""
        return self._disk.write_error

    @property
    def write_failures(self) -> int:
        return self._disk.write_failures

    @property
    def read_only(self) -> bool:
        return self._disk.read_only

    @property
    def segments(self) -> int:
        return len(self._segments)

    def _check_usable(self) -> None:
        if self._closed:
            raise SpoolError(f"the spool {self.directory} is closed")

    def close(self) -> None:
        """Sync and release the lock. Idempotent."""
        if self._closed:
            return
        try:
            if not self._disk.read_only:
                # What it cannot write now was never promised: the caller
                # acks only after a sync of its own returned.
                with contextlib.suppress(SpoolWriteError):
                    self.sync()
        finally:
            with self._sync_lock, self._drain_lock, self._lock:
                if not self._closed:
                    self._closed = True
                    self._room = -1
                    self._release_fds()

    def _release_fds(self) -> None:
        for seg in getattr(self, "_segments", []):
            seg.close_fds()
        for attr in ("_dir_fd", "_lock_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                setattr(self, attr, -1)
                os.close(fd)        # closing the lock file releases the flock

    def __enter__(self) -> "Spool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<Spool {self.directory} delivered={self._delivered} "
                f"durable={self._durable} depth={self._depth_records}>")


def _write_all(fd: int, data) -> None:
    with memoryview(data) as mv:
        done = 0
        while done < len(mv):
            done += os.write(fd, mv[done:])


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
