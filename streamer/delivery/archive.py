"""The archive of published records: what Kafka acknowledged, kept on local
disk for `ctstream replay`.

One archive, fed from one place: the Kafka sink's `on_published` observer
hands `ArchiveWriter.add` the (key, value, time_ms) of every record Kafka has
acknowledged, whether it went live or came out of the spool. The spool deletes
its segments once delivered; a record enters the archive once, when it is in
Kafka, and never twice in normal operation (a live send that times out and is
spooled reaches the archive once, from the drain). time_ms is the record's
observationTimeMilliseconds: replay selects by when the event happened.

**The archive is for replay, not part of the delivery guarantee.** It is
written without fsync: a power cut loses what the page cache held, a killed
daemon loses the records still queued (at most about `flush_s` of them).
Kafka, the spool and the kernel's outbox keep the promise that every DESTROY
arrives; the archive only helps consumers that lost what they had read.

Hot path: `add` appends the batch (a list, not copied) to a deque and counts
it; a worker thread frames and writes a whole queue's worth every `flush_s`.
Memory is bounded: when `queue_records` records wait already, `add` drops the
batch and counts it in `dropped` (logged now and then); it never blocks and
never raises.

Files in the archive directory (`<spool dir>/archive`, mode 0700):

- `arc-<first seq, 20 digits>.log`: append-only segments. seq numbers the
  archived records; every seq in a segment is >= its name. A segment rolls
  after `segment_bytes` or `segment_s`; each open starts a new one.
- `lock`: flock'ed by the one writer. Readers take no lock.

The archive usually shares its filesystem with the spool, which keeps the
delivery promise: it never writes into the last 1/FREE_FLOOR of the
filesystem. Below that, it removes its oldest segments, and if that is not
enough it leaves records out, counted in `failed` with the reason in `error`.
`shed()` (the Kafka sink calls it when the spool's disk is full: the spool
keeps the delivery promise, the archive does not) makes the worker remove
every segment at its next pass, the one being written too; archiving goes on
in a new segment when there is room.

Pruning removes whole segments, never the one being written: the oldest
while the others leave less than one segment of room below `max_bytes`, and
every one whose mtime (its last write) is older than `max_age_s`, i.e. that
holds only records published longer ago than that. It runs at open, at each
roll and every PRUNE_EVERY_S. The archive thus stays within max_bytes (a
single write larger than a segment gets a segment of its own and may exceed
it); segments are about max_bytes/8, so it keeps at least 7/8 of that.

A frame holds the records of one write, in the layout that the spool's
frames have too (streamer/delivery/frames.py), with its own magic:

    magic "\\xc7CSa" | crc32 u32 | payload length u32 | records u32 |
    first seq u64 | written_ms i64 | payload

The CRC (zlib.crc32) covers everything after itself. The payload is one
msgpack array of [key (bin), value (bin), time_ms (int)] arrays. written_ms is
the wall clock when the frame was written: no record in it is newer, which
lets readers skip old segments without decoding them (with CLOCK_SLACK_MS of
slack for a stepped clock).

Reading (`ArchiveReader`) is safe while the daemon writes: segments only grow
and are only unlinked, and a reader maps a file at its current size, skips a
frame whose bytes are not all there yet, and maps again when the file has
grown. A segment pruned while it is read stays readable through the open
descriptor. Damage (a bad CRC, garbage) is skipped as the spool does it: go
on at the next magic that starts a valid frame with a higher seq; each such
region is a line in `problems`. A torn tail from a crash is one too, except
on the newest segment, where it is the frame being written.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import logging
import os
import re
import threading
import time
import zlib
from typing import Iterator

import cramjam
import msgpack

from ..errors import ArchiveError, ConfigError
from .frames import BODY as _BODY, HEADER_BYTES, PREFIX as _PREFIX
from .frames import FrameFormat, mapped

log = logging.getLogger(__name__)

MAGIC = b"\xc7CSa"
ZSTD_LEVEL = 1
FRAME_RECORDS = 8192                            # records per frame at most
MIN_SEGMENT_BYTES = 4096
PRUNE_EVERY_S = 10.0
FREE_FLOOR = 8        # the archive leaves the last 1/FREE_FLOOR of its filesystem free
CLOCK_SLACK_MS = 600_000                        # how far the wall clock may step back
DROP_LOG_S = 60.0
DEFAULT_SPOOL_ROOT = "/var/lib/ctstream/spool"
_SEGMENT_NAME = re.compile(r"arc-(\d{20})\.log")
# The payload is a batch of records, the count how many, the number the first
# one's seq; a frame takes the seqs from there to the last record's.
_FRAMES = FrameFormat(MAGIC, "seq", "bad header (payload {plen} bytes, {count} records)",
                      min_count=1, counts_numbers=True)


def default_spool_dir(pin_dir: str) -> str:
    """Where `ctstream run` keeps its spool (and the archive in it) when no
    --spool is given: one directory per datapath (pin dir)."""
    return os.path.join(DEFAULT_SPOOL_ROOT, os.path.basename(pin_dir.rstrip("/")))


def archive_dir(spool_dir: str) -> str:
    return os.path.join(spool_dir, "archive")


def segment_name(first: int) -> str:
    return f"arc-{first:020d}.log"


def segment_files(directory: str) -> list[tuple[int, str]]:
    """(first seq, name) of the archive's segments, oldest first."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        m = _SEGMENT_NAME.fullmatch(name)
        if m:
            out.append((int(m.group(1)), name))
    out.sort()
    return out


def encode_frame(records: list, first_seq: int, written_ms: int) -> bytes:
    """One frame of (key, value, time_ms) records."""
    payload = bytes(cramjam.zstd.compress(msgpack.packb(records, use_bin_type=True),
                                          level=ZSTD_LEVEL))
    body = _BODY.pack(len(payload), len(records), first_seq, written_ms)
    crc = zlib.crc32(payload, zlib.crc32(body))
    return _PREFIX.pack(MAGIC, crc) + body + payload


def decode_payload(payload) -> tuple:
    """The (key, value, time_ms) records of a frame's payload."""
    return msgpack.unpackb(cramjam.zstd.decompress(payload), use_list=False, raw=False)


# ---------------------------------------------------------------- the writer

class ArchiveWriter:
    """Open with ArchiveWriter.open(directory, max_bytes, max_age_s); call
    `add` from the event loop, `close` once at the end (flushes)."""

    def __init__(self) -> None:
        raise TypeError("use ArchiveWriter.open(directory, ...)")

    @classmethod
    def open(cls, directory, max_bytes: int, max_age_s: float = 0.0, *,
             segment_bytes: int | None = None, segment_s: float | None = None,
             flush_s: float = 0.2, queue_records: int = 1 << 17) -> "ArchiveWriter":
        directory = os.fspath(directory)
        if max_bytes <= 0:
            raise ConfigError(f"archive max_bytes must be positive, got {max_bytes}")
        if max_age_s < 0:
            raise ConfigError(f"archive max_age_s cannot be negative, got {max_age_s}")
        if segment_bytes is None:
            segment_bytes = min(max(max_bytes // 8, 64 << 10), 64 << 20)
        if segment_bytes < MIN_SEGMENT_BYTES:
            raise ConfigError(f"archive segment_bytes must be at least {MIN_SEGMENT_BYTES}")
        if segment_s is None:
            segment_s = min(max_age_s / 8, 3600.0) if max_age_s else 3600.0
        if segment_s <= 0 or flush_s <= 0 or queue_records <= 0:
            raise ConfigError("archive segment_s, flush_s and queue_records must be positive")
        self = object.__new__(cls)
        self.directory = directory
        self.max_bytes = max_bytes
        self.max_age_s = float(max_age_s)
        self.segment_bytes = segment_bytes
        self.segment_s = float(segment_s)
        self.flush_s = flush_s
        self.queue_records = queue_records
        # Counters. `_added` and `dropped` are written by add() only (the
        # event loop), the others by the worker only: no lock needed.
        self._added = 0
        self._taken = 0
        self.dropped = 0               # refused by the queue bound
        self.failed = 0                # lost to a write error
        self.written = 0               # records written
        self.written_bytes = 0
        self.pruned = 0                # segments removed
        self.shed_segments = 0         # of them, removed to give the spool room
        self._shed = False
        self.error: str | None = None  # the last write error, until a write succeeds
        self._queue: collections.deque[list] = collections.deque()
        self._closed = False
        self._stop = threading.Event()
        self._fd = -1
        self._active = ""
        self._lock_fd = -1
        self._size = 0
        self._opened_at = 0.0
        self._next_prune = 0.0
        self._dropped_logged = 0
        self._next_drop_log = 0.0
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            self._take_lock()
            self._next_seq = self._recover_seq()
            self._prune(time.time())
        except OSError as exc:
            self._release()
            raise ArchiveError(f"cannot open the archive {directory}: {exc.strerror}") from exc
        except BaseException:
            self._release()
            raise
        self._thread = threading.Thread(target=self._run, name="ctstream-archive", daemon=True)
        self._thread.start()
        return self

    def _take_lock(self) -> None:
        path = os.path.join(self.directory, "lock")
        self._lock_fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise ArchiveError(f"the archive {self.directory} is written by another process "
                               f"(lock {path} held)") from exc

    def _recover_seq(self) -> int:
        """The seq after the last intact record of the newest segment; at
        least one above that segment's name, so a new name never repeats."""
        files = segment_files(self.directory)
        if not files:
            return 0
        first, name = files[-1]
        nxt = first + 1
        for item in _file_frames(os.path.join(self.directory, name), first):
            if item[0] == "frame":
                nxt = max(nxt, item[3] + item[4])
        return nxt

    # -- the hot path (event loop)

    def add(self, batch: list) -> None:
        """Queue (key, value, time_ms) records for the archive. The list is
        kept, not copied: the caller must not change it afterwards."""
        n = len(batch)
        if self._closed or self._added - self._taken + n > self.queue_records:
            self.dropped += n
            return
        self._added += n
        self._queue.append(batch)

    @property
    def queued(self) -> int:
        return self._added - self._taken

    # -- the worker

    def _run(self) -> None:
        try:
            while True:
                stopping = self._stop.wait(self.flush_s)
                self._flush()
                self._maintain()
                if stopping:
                    break
        except BaseException as exc:    # a bug: say it, stop archiving, keep the daemon
            log.exception("archive %s: the writer failed; no more records are archived",
                          self.directory)
            self.error = f"the writer failed: {exc!r}"
            self._closed = True
        finally:
            self._close_segment()

    def _flush(self) -> None:
        q = self._queue
        while q:
            records: list = []
            while q and len(records) < 8 * FRAME_RECORDS:
                records += q.popleft()
            try:
                low = self._disk_low()
                if low is not None:
                    self.failed += len(records)
                    if low != self.error:
                        log.warning("archive %s: %s", self.directory, low)
                    self.error = low
                    self._taken += len(records)
                    continue
                self._write(records)
            except OSError as exc:
                self.failed += len(records)
                why = f"{exc.strerror} ({exc.filename or self.directory})"
                if why != self.error:
                    log.error("archive %s: cannot write: %s; records are not archived until "
                              "it works again", self.directory, why)
                self.error = why
                self._close_segment()     # the next write starts a new segment
            else:
                if self.error is not None:
                    log.warning("archive %s: writing again", self.directory)
                self.error = None
            self._taken += len(records)

    def _write(self, records: list) -> None:
        now_ms = time.time_ns() // 1_000_000
        pending = bytearray()
        for i in range(0, len(records), FRAME_RECORDS):
            part = records[i:i + FRAME_RECORDS]
            frame = encode_frame(part, self._next_seq, now_ms)
            if self._fd < 0:
                self._new_segment(self._next_seq)
            elif self._size + len(pending) + len(frame) > self.segment_bytes \
                    and self._size + len(pending) > 0:
                self._append(pending)
                pending = bytearray()
                self._roll()
                self._new_segment(self._next_seq)
            self._next_seq += len(part)
            pending += frame
        self._append(pending)
        self.written += len(records)

    def _append(self, data) -> None:
        low = self._disk_low(len(data))
        if low is not None:
            raise OSError(errno.ENOSPC, low, self.directory)
        with memoryview(data) as mv:
            done = 0
            while done < len(mv):
                done += os.write(self._fd, mv[done:])
        self._size += len(data)
        self.written_bytes += len(data)

    def _new_segment(self, first: int) -> None:
        self._active = segment_name(first)
        path = os.path.join(self.directory, self._active)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND
                           | os.O_CLOEXEC, 0o600)
        self._size = 0
        self._opened_at = time.monotonic()

    def _roll(self) -> None:
        self._close_segment()
        try:
            self._prune(time.time())
        except OSError as exc:
            log.error("archive %s: cannot prune: %s", self.directory, exc.strerror)

    def _close_segment(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def _disk_low(self, writing: int = 0) -> str | None:
        """None while the filesystem keeps more than its last 1/FREE_FLOOR
        free after `writing` more bytes (removing old segments if needed),
        else why not to write."""
        st = os.statvfs(self.directory)
        size, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize - writing
        floor = size // FREE_FLOOR
        if free >= floor:
            return None
        active = self._active if self._fd >= 0 else None
        for _first, name in segment_files(self.directory):     # oldest first
            if free >= floor:
                break
            if name == active:
                continue
            path = os.path.join(self.directory, name)
            try:
                used = os.stat(path).st_blocks * 512
                os.unlink(path)
            except FileNotFoundError:
                continue
            free += used
            self.pruned += 1
        if free >= floor:
            return None
        return (f"the filesystem is nearly full ({free} of {size} bytes free): records are "
                f"not archived while less than 1/{FREE_FLOOR} of it is free (the spool's room)")

    def shed(self) -> None:
        """Give the disk up: the worker removes every segment at its next pass.
        Any thread; never blocks."""
        self._shed = True

    def _shed_all(self) -> None:
        self._shed = False
        self._close_segment()
        gone = 0
        for _first, name in segment_files(self.directory):
            try:
                os.unlink(os.path.join(self.directory, name))
                gone += 1
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.error("archive %s: cannot remove %s: %s", self.directory, name, exc.strerror)
        if gone:
            self.pruned += gone
            self.shed_segments += gone
            log.warning("archive %s: removed %d segment(s) to give the spool room on a full "
                        "disk; replay cannot reach those records", self.directory, gone)

    def _maintain(self) -> None:
        if self._shed:
            self._shed_all()
        if self._fd >= 0 and self._size and time.monotonic() - self._opened_at >= self.segment_s:
            self._roll()
        now = time.monotonic()
        if now >= self._next_prune:
            self._next_prune = now + PRUNE_EVERY_S
            try:
                self._prune(time.time())
            except OSError as exc:
                log.error("archive %s: cannot prune: %s", self.directory, exc.strerror)
        if self.dropped > self._dropped_logged and now >= self._next_drop_log:
            log.warning("archive %s: %d published record(s) not archived: the writer fell "
                        "behind (queue bound %d records)", self.directory,
                        self.dropped - self._dropped_logged, self.queue_records)
            self._dropped_logged = self.dropped
            self._next_drop_log = now + DROP_LOG_S

    def _prune(self, now: float) -> None:
        """Keep room for a whole segment being written: with it, the archive
        stays within max_bytes."""
        active = self._active if self._fd >= 0 else None
        files = []
        for _first, name in segment_files(self.directory):
            try:
                st = os.stat(os.path.join(self.directory, name))
            except FileNotFoundError:
                continue
            files.append((name, st.st_size, st.st_mtime))
        sealed = sum(size for name, size, _m in files if name != active)
        for name, size, mtime in files:           # oldest first
            if name == active:
                continue
            too_old = self.max_age_s > 0 and mtime < now - self.max_age_s
            if not (too_old or sealed + self.segment_bytes > self.max_bytes):
                continue
            try:
                os.unlink(os.path.join(self.directory, name))
            except FileNotFoundError:
                pass
            sealed -= size
            self.pruned += 1

    # -- state and end

    def stats(self) -> dict:
        return {"archive_dir": self.directory, "archive_records": self.written,
                "archive_queued": self.queued, "archive_dropped": self.dropped,
                "archive_failed": self.failed, "archive_error": self.error,
                "archive_shed_segments": self.shed_segments}

    def close(self, timeout_s: float = 30.0) -> None:
        """Write what is queued, stop the worker, release the lock.
        Idempotent. Blocks: call it in a thread from asyncio."""
        if self._lock_fd < 0:
            return
        self._closed = True
        self._stop.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.error("archive %s: the writer did not finish within %gs; %d record(s) not "
                      "archived", self.directory, timeout_s, self.queued)
            return      # it still owns its descriptor; the lock goes with the process
        self._release()

    def _release(self) -> None:
        self._close_segment()
        if self._lock_fd >= 0:
            fd, self._lock_fd = self._lock_fd, -1
            os.close(fd)

    def __enter__(self) -> "ArchiveWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------- reading

def _file_frames(path: str, first: int) -> Iterator[tuple]:
    """The frames of a whole file as it is now (for the writer's recovery)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        with mapped(fd) as data:
            yield from _FRAMES.scan(data, len(data), first - 1)
    finally:
        os.close(fd)


MAX_REMAPS = 16     # times a reader maps a segment again to finish a frame being written


class ArchiveReader:
    """One pass over the archived records with from_ms <= time_ms < to_ms,
    in archive order (the order Kafka acknowledged them). `batches()` yields
    lists of (key, value, time_ms), one per frame that has any;
    `scanned_bytes` of `total_bytes` tells the progress. Needs no lock."""

    def __init__(self, directory: str, from_ms: int, to_ms: int):
        if not os.path.isdir(directory):
            raise ArchiveError(f"no archive at {directory}")
        self.directory = directory
        self.from_ms = from_ms
        self.to_ms = to_ms
        self.problems: list[str] = []
        self.damaged_bytes = 0
        self.frames = 0
        self.records_scanned = 0
        self.files: list[tuple[int, str, int]] = []   # (first seq, path, size)
        self.skipped_files = 0                         # written before from_ms: not read
        self._done_bytes = 0
        self._pos = 0
        listed = segment_files(directory)
        for k, (first, name) in enumerate(listed):
            path = os.path.join(directory, name)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue        # pruned meanwhile
            if k < len(listed) - 1 and st.st_mtime * 1000 < from_ms - CLOCK_SLACK_MS:
                self.skipped_files += 1
                continue
            self.files.append((first, path, st.st_size))
        self.total_bytes = sum(size for _f, _p, size in self.files)

    @property
    def scanned_bytes(self) -> int:
        return min(self._done_bytes + self._pos, self.total_bytes)

    def records(self) -> Iterator[tuple[bytes, bytes, int]]:
        for batch in self.batches():
            yield from batch

    def batches(self) -> Iterator[list[tuple[bytes, bytes, int]]]:
        for k, (first, path, size) in enumerate(self.files):
            try:
                yield from self._file(first, path, newest=k == len(self.files) - 1)
            finally:
                self._done_bytes += size
                self._pos = 0

    def _file(self, first: int, path: str, newest: bool):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return              # pruned since the listing
        try:
            pos, after = 0, first - 1
            for _ in range(MAX_REMAPS + 1):
                with mapped(fd) as data:
                    size = len(data)
                    pos, after, tail = yield from self._walk(data, path, pos, after)
                # A frame cut short may be one being written: map again if
                # the file grew meanwhile.
                if tail is None or os.fstat(fd).st_size <= size:
                    break
            if tail is not None and not newest:
                self._damage(path, tail[0], size, f"{tail[1]} at the end (a torn write)")
        finally:
            os.close(fd)

    def _walk(self, data, path: str, pos: int, after: int):
        """Frames from byte pos; returns (where it stopped, the last seq
        before it, the cut-short tail's (start, why) or None)."""
        size = len(data)
        lo, hi = self.from_ms, self.to_ms
        old = lo - CLOCK_SLACK_MS
        for item in _FRAMES.scan(data, size, after, pos=pos):
            if item[0] == "bad":
                _, start, end, why = item
                if end == size and why in ("truncated header", "truncated frame"):
                    return start, after, (start, why)
                self._damage(path, start, end, why)
                self._pos = end
                continue
            _, start, end, seq, count, written = item
            after = seq + count - 1
            self._pos = end
            self.frames += 1
            self.records_scanned += count
            if written < old:
                continue        # nothing in it is as new as from_ms
            try:
                recs = decode_payload(data[start + HEADER_BYTES:end])
            except (ValueError, TypeError, cramjam.DecompressionError, msgpack.ExtraData,
                    msgpack.FormatError, msgpack.StackError) as exc:
                self._damage(path, start, end, f"payload not readable ({exc})")
                continue
            hit = [r for r in recs if lo <= r[2] < hi]
            if hit:
                yield hit
        return size, after, None

    def _damage(self, path: str, start: int, end: int, why: str) -> None:
        self.damaged_bytes += end - start
        self.problems.append(f"{path}: byte {start}: {why}; skipped {end - start} bytes")
