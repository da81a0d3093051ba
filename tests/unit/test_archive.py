"""The archive of published records (streamer/delivery/archive.py): round trips and
time-range reads, pruning by size and by age, torn and corrupt segments,
reading while the writer writes, and drop-and-count when the writer cannot
keep up."""

from __future__ import annotations

import os
import threading
import time
import zlib

import pytest

from streamer.delivery.archive import (HEADER_BYTES, MAGIC, ArchiveError, ArchiveReader, ArchiveWriter,
                              encode_frame, segment_files, segment_name)
from streamer.errors import ConfigError

T0 = 1_700_000_000_000


def rec(i: int) -> tuple[bytes, bytes, int]:
    """Record i: key, value and time_ms, all derived from i. The value does not
    compress much, so segments fill at a known pace."""
    value = b"v%d-" % i + zlib.crc32(b"%d" % i).to_bytes(4, "little") * (10 + i % 7)
    return b"node/%d" % (i % 50), value, T0 + i


def recs(lo: int, hi: int) -> list[tuple[bytes, bytes, int]]:
    return [rec(i) for i in range(lo, hi)]


def read_all(d, lo: int = 0, hi: int = 1 << 62) -> list:
    return list(ArchiveReader(str(d), lo, hi).records())


def files(d) -> list[str]:
    return [name for _, name in segment_files(str(d))]


def open_writer(d, max_bytes: int = 1 << 30, max_age_s: float = 0, **kw) -> ArchiveWriter:
    kw.setdefault("flush_s", 0.02)
    return ArchiveWriter.open(d, max_bytes, max_age_s, **kw)


def drain(w: ArchiveWriter) -> None:
    """Until the worker has written everything queued (bounded)."""
    deadline = time.monotonic() + 30
    while w.queued:
        assert time.monotonic() < deadline, "the archive writer did not write its queue"
        time.sleep(0.002)


def write(d, records: list, batch: int = 100, frame_per_batch: bool = False,
          **kw) -> ArchiveWriter:
    """Open, add in batches (each its own frame if asked), close: returns
    the closed writer."""
    w = open_writer(d, **kw)
    for i in range(0, len(records), batch):
        w.add(records[i:i + batch])
        if frame_per_batch:
            drain(w)
    w.close()
    return w


# ---------------------------------------------------------------- basics

def test_round_trip_in_order_and_a_time_range(tmp_path):
    d = tmp_path / "archive"
    w = write(d, recs(0, 5000))
    assert (w.written, w.dropped, w.failed) == (5000, 0, 0)
    assert read_all(d) == recs(0, 5000)
    # [from, to): by the record's time_ms
    assert read_all(d, T0 + 1000, T0 + 1010) == recs(1000, 1010)
    assert read_all(d, T0 + 4990, T0 + 10**9) == recs(4990, 5000)
    assert read_all(d, T0 - 10**6, T0) == []
    names = files(d)
    assert names[0] == segment_name(0)
    data = (d / names[0]).read_bytes()
    assert data[:4] == MAGIC
    assert oct(os.stat(d).st_mode & 0o777) == "0o700"
    assert oct(os.stat(d / names[0]).st_mode & 0o777) == "0o600"


def test_seq_continues_across_opens_and_each_open_starts_a_segment(tmp_path):
    d = tmp_path / "a"
    write(d, recs(0, 300))
    write(d, recs(300, 500))
    names = files(d)
    assert names == [segment_name(0), segment_name(300)]
    assert read_all(d) == recs(0, 500)


def test_frames_hold_records_out_of_time_order(tmp_path):
    # Drained spool records are older than live ones archived before them.
    d = tmp_path / "a"
    late = recs(100, 200)
    early = recs(0, 100)
    write(d, late + early)
    assert read_all(d) == late + early
    assert read_all(d, T0, T0 + 50) == recs(0, 50)


def test_bad_parameters_and_a_second_writer(tmp_path):
    with pytest.raises(ConfigError, match="max_bytes"):
        ArchiveWriter.open(tmp_path / "a", 0)
    with pytest.raises(ConfigError, match="max_age_s"):
        ArchiveWriter.open(tmp_path / "a", 1 << 20, -1)
    with pytest.raises(ConfigError, match="segment_bytes"):
        ArchiveWriter.open(tmp_path / "a", 1 << 20, segment_bytes=100)
    w = open_writer(tmp_path / "b")
    try:
        with pytest.raises(ArchiveError, match="another process"):
            open_writer(tmp_path / "b")
    finally:
        w.close()
    w.close()                                   # idempotent
    open_writer(tmp_path / "b").close()         # the lock is free again
    with pytest.raises(ArchiveError, match="no archive"):
        ArchiveReader(str(tmp_path / "nothing"), 0, 1)


# ---------------------------------------------------------------- pruning

def test_segments_roll_at_segment_bytes_and_the_oldest_go_beyond_max_bytes(tmp_path):
    d = tmp_path / "a"
    # one flush per batch: frames of 100 records, about 6 KB, segments of 16 KB
    w = write(d, recs(0, 6000), frame_per_batch=True, max_bytes=64 << 10,
              segment_bytes=16 << 10)
    names = files(d)
    sizes = [(d / n).stat().st_size for n in names]
    assert w.pruned > 0 and len(names) >= 3
    assert sum(sizes) <= 64 << 10
    assert all(s <= 16 << 10 for s in sizes[:-1])
    got = read_all(d)
    # what is left is the newest records, whole frames, in order
    assert got == recs(6000 - len(got), 6000)
    assert len(got) < 6000


def test_pruned_by_age_never_the_segment_being_written(tmp_path):
    d = tmp_path / "a"
    for lo in (0, 100, 200):
        write(d, recs(lo, lo + 100))
    names = files(d)
    assert len(names) == 3
    two_hours_ago = time.time() - 7200
    for name in names[:2]:
        os.utime(d / name, (two_hours_ago, two_hours_ago))
    w = open_writer(d, max_age_s=3600)           # open prunes
    try:
        assert files(d) == names[2:]
        assert read_all(d) == recs(200, 300)
        w.add(recs(300, 310))
        drain(w)
        active = files(d)[-1]
        os.utime(d / active, (two_hours_ago, two_hours_ago))
        os.utime(d / names[2], (two_hours_ago, two_hours_ago))
        w._prune(time.time())
        assert files(d) == [active]              # the one being written stays
    finally:
        w.close()
    assert read_all(d) == recs(300, 310)


def test_a_reader_skips_segments_written_long_before_from(tmp_path):
    d = tmp_path / "a"
    write(d, recs(0, 100))
    write(d, recs(100, 200))
    old = files(d)[0]
    long_ago = time.time() - 86400
    os.utime(d / old, (long_ago, long_ago))
    r = ArchiveReader(str(d), int(time.time() * 1000) - 60_000, 1 << 62)
    assert r.skipped_files == 1 and [p for _, p, _ in r.files] == [str(d / files(d)[1])]


# ---------------------------------------------------------------- damage

def test_torn_tail_is_skipped_and_the_writer_goes_on_after_the_last_intact_record(tmp_path):
    d = tmp_path / "a"
    write(d, recs(0, 100), batch=10, frame_per_batch=True)
    write(d, recs(100, 200), batch=10, frame_per_batch=True)
    first, second = files(d)
    size = (d / second).stat().st_size
    os.truncate(d / second, size - 20)           # a crash tore the last frame
    got = read_all(d)
    # the newest segment's cut-short frame may be one being written: no complaint
    r = ArchiveReader(str(d), 0, 1 << 62)
    assert list(r.records()) == got and r.problems == []
    assert got == recs(0, 190)                   # the last frame of 10 is gone
    lost = 10
    w = write(d, recs(200, 250))
    assert files(d)[-1] == segment_name(200 - lost)     # seq goes on after the intact ones
    assert w.written == 50
    r = ArchiveReader(str(d), 0, 1 << 62)
    assert list(r.records()) == got + recs(200, 250)
    # not the newest any more: now it is a torn write, and said so
    assert len(r.problems) == 1 and "torn write" in r.problems[0] and second in r.problems[0]


def test_a_corrupt_frame_is_skipped_and_reading_resumes_at_the_next(tmp_path):
    d = tmp_path / "a"
    write(d, recs(0, 100), batch=10, frame_per_batch=True)
    (name,) = files(d)
    path = d / name
    data = bytearray(path.read_bytes())
    frames = []
    pos = 0
    while pos < len(data):
        plen, count = int.from_bytes(data[pos + 8:pos + 12], "little"), \
            int.from_bytes(data[pos + 12:pos + 16], "little")
        frames.append((pos, count))
        pos += HEADER_BYTES + plen
    assert pos == len(data) and [c for _, c in frames] == [10] * 10
    bad_pos, bad_count = frames[1]
    data[bad_pos + HEADER_BYTES + 3] ^= 0xFF       # inside the second frame's payload
    garbage = b"\x00garbage" + MAGIC + b"\x01" * 40  # and a false magic after the end
    path.write_bytes(bytes(data) + garbage)
    r = ArchiveReader(str(d), 0, 1 << 62)
    got = list(r.records())
    first = frames[0][1]
    assert got == recs(0, first) + recs(first + bad_count, 100)
    assert len(r.problems) == 2, r.problems
    assert f"byte {bad_pos}: bad checksum" in r.problems[0]
    assert f"byte {len(data)}: bad magic" in r.problems[1]
    assert r.damaged_bytes == frames[2][0] - bad_pos + len(garbage)
    # the writer of the next open is not misled by the garbage either
    write(d, recs(100, 110))
    assert files(d)[-1] == segment_name(100)


# ---------------------------------------------------------------- reading while written

def test_a_frame_being_written_is_read_once_it_is_whole(tmp_path):
    d = tmp_path / "a"
    d.mkdir()
    path = d / segment_name(0)
    a, b = encode_frame(recs(0, 10), 0, T0), encode_frame(recs(10, 20), 10, T0)
    path.write_bytes(a + b[:len(b) // 2])
    r = ArchiveReader(str(d), 0, 1 << 62)
    batches = r.batches()
    assert next(batches) == recs(0, 10)
    # the rest of the frame arrives while the reader is between frames
    with open(path, "ab") as f:
        f.write(b[len(b) // 2:])
    assert next(batches) == recs(10, 20)
    assert list(batches) == [] and r.problems == []
    assert r.scanned_bytes == r.total_bytes


def test_readers_while_the_writer_writes_see_whole_records_in_order(tmp_path):
    d = tmp_path / "a"
    total = 20_000
    w = open_writer(d, max_bytes=1 << 30, segment_bytes=32 << 10, flush_s=0.001)
    failures: list[str] = []
    counts: list[int] = []
    done = threading.Event()

    def reader():
        last = 0
        while not done.is_set() and not failures:
            r = ArchiveReader(str(d), 0, 1 << 62)
            got = list(r.records())
            if r.problems:
                failures.append(f"problems: {r.problems}")
            if got != recs(0, len(got)):
                failures.append(f"read {len(got)} records that are not the first ones in order")
            if len(got) < last:
                failures.append(f"went back from {last} to {len(got)} records")
            last = len(got)
            counts.append(last)

    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in readers:
        t.start()
    try:
        for i in range(0, total, 50):
            w.add(recs(i, i + 50))
            if i % 5000 == 0:
                # let both readers finish a pass over a part of the archive
                drain(w)
                seen = len(counts)
                deadline = time.monotonic() + 30
                while len(counts) < seen + 2 and not failures:
                    assert time.monotonic() < deadline, "the readers do not read"
                    time.sleep(0.001)
    finally:
        w.close()
        done.set()
        for t in readers:
            t.join(60)
    assert not failures, failures[:3]
    assert any(0 < c < total for c in counts)      # they did read a growing archive
    assert read_all(d) == recs(0, total)
    assert len(files(d)) > 3


# ---------------------------------------------------------------- overload and errors

def test_a_writer_that_cannot_keep_up_drops_and_counts_and_never_blocks(tmp_path, monkeypatch):
    d = tmp_path / "a"
    disk = threading.Event()                      # a stalled disk until set
    stalled = threading.Event()
    real_write = ArchiveWriter._write

    def slow_write(self, records):
        stalled.set()
        assert disk.wait(30), "the test never released the disk"
        real_write(self, records)

    monkeypatch.setattr(ArchiveWriter, "_write", slow_write)
    w = open_writer(d, queue_records=1000, flush_s=0.001)
    try:
        w.add(recs(0, 100))                       # the worker takes it and stalls
        assert stalled.wait(30)
        accepted = list(recs(0, 100))
        for i in range(100, 5000, 100):
            before = w.dropped
            w.add(recs(i, i + 100))               # returns at once, whatever the disk does
            if w.dropped == before:
                accepted += recs(i, i + 100)
        assert w.queued <= 1000
        assert w.dropped == 5000 - len(accepted) > 0
    finally:
        disk.set()
        w.close()
    assert w.written == len(accepted)
    assert read_all(d) == accepted


def test_a_write_error_loses_that_write_only(tmp_path, monkeypatch):
    d = tmp_path / "a"
    w = open_writer(d)
    real = w._append
    fail = {"left": 0}

    def flaky(data):
        if fail["left"]:
            fail["left"] -= 1
            raise OSError(28, "No space left on device")
        real(data)

    monkeypatch.setattr(w, "_append", flaky)
    try:
        w.add(recs(0, 10))
        drain(w)
        fail["left"] = 1
        w.add(recs(10, 20))
        drain(w)
        assert w.failed == 10 and "No space" in w.error
        w.add(recs(20, 30))
        drain(w)
        assert w.error is None
    finally:
        w.close()
    assert w.written == 20
    assert read_all(d) == recs(0, 10) + recs(20, 30)
    assert files(d) == [segment_name(0), segment_name(20)]   # a new segment after the error


def test_add_after_close_is_counted_as_dropped(tmp_path):
    w = open_writer(tmp_path / "a")
    w.close()
    w.add(recs(0, 5))
    assert w.dropped == 5 and w.written == 0


# ---------------------------------------------------------------- the Kafka sink owns it

async def _sink_round(tmp_path, monkeypatch, archive_max: int, observer=None):
    from streamer.delivery.kafka_sink import KafkaSink
    from streamer.delivery.kafka_settings import KafkaSettings

    sink = KafkaSink(KafkaSettings(bootstrap="127.0.0.1:9", topic="t"), str(tmp_path / "spool"),
                     archive_max=archive_max, archive_s=3600)

    async def no_kafka():
        return False
    monkeypatch.setattr(sink, "_connect", no_kafka)
    sink.on_published = observer
    await sink.start()
    try:
        # what commit_async and the drain do once Kafka acknowledged records
        sink.on_published(recs(0, 30))
        sink.on_published(recs(30, 40))
    finally:
        await sink.aclose()
    return sink


async def test_the_kafka_sink_opens_feeds_and_closes_the_archive(tmp_path, monkeypatch):
    seen = []
    sink = await _sink_round(tmp_path, monkeypatch, 1 << 20, observer=seen.extend)
    assert seen == recs(0, 40)                   # an observer set before start still runs
    assert read_all(tmp_path / "spool" / "archive") == recs(0, 40)   # flushed by aclose
    assert sink.archive.written == 40 and sink.archive.dropped == 0
    sink.archive.add(recs(40, 41))               # closed: counted, not written
    assert sink.archive.dropped == 1


async def test_no_archive_with_archive_max_0(tmp_path, monkeypatch):
    sink = await _sink_round(tmp_path, monkeypatch, 0, observer=lambda batch: None)
    assert sink.archive is None and not (tmp_path / "spool" / "archive").exists()


def test_run_options_reach_the_sink():
    from streamer import cli

    def sink(*extra):
        a = cli.load_config(["run", "-i", "eth9", "--kafka", "127.0.0.1:9",
                                           "--topic", "t", "--pin-dir", "/sys/fs/bpf/x", *extra])
        return cli._kafka_sink(a)

    s = sink()
    assert (s.archive_max, s.archive_s, s.spool_dir) == \
        (256 << 20, 86400.0, "/var/lib/ctstream/spool/x")
    s = sink("--archive-max", "0", "--archive-age", "60", "--spool", "/tmp/sp")
    assert (s.archive_max, s.archive_s, s.spool_dir) == (0, 60.0, "/tmp/sp")
    with pytest.raises(ConfigError, match="--archive-max"):
        sink("--archive-max", "100k")
    with pytest.raises(ConfigError, match="--archive-age"):
        sink("--archive-age", "-1")
