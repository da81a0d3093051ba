"""The durable spool: round trips, the delivered cursor, segments (deleted
once delivered: the archive is streamer/delivery/archive.py's), the bound, and
recovery from torn, corrupt and garbage files and from a SIGKILLed writer."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from streamer.errors import StreamerError
from streamer.delivery.spool import (HEADER_BYTES, INDEX_STRIDE, MAGIC, Spool, SpoolError,
                            SpoolFull, SpoolRecord, segment_name)

REPO = Path(__file__).resolve().parents[2]


def rec(i: int) -> tuple[bytes, bytes, int]:
    """Record i: key, value (of varying length) and time_ms, all derived from i."""
    return b"key-%d" % i, b"value-%d-" % i + bytes([i % 251]) * (i % 37), 1_000_000 + i


def frame_len(i: int) -> int:
    key, value, _ = rec(i)
    return HEADER_BYTES + len(key) + len(value)


def fill(sp: Spool, start: int, n: int) -> list[int]:
    offsets = [sp.append(*rec(i)) for i in range(start, start + n)]
    sp.sync()
    return offsets


def expected(i: int, offset: int | None = None) -> SpoolRecord:
    key, value, t = rec(i)
    return SpoolRecord(i if offset is None else offset, t, key, value)


def read_all(sp: Spool, after: int | None = None) -> list[SpoolRecord]:
    out: list[SpoolRecord] = []
    while True:
        batch = sp.read(7, after=out[-1].offset if out else after)
        if not batch:
            return out
        out += batch


def seg_files(directory) -> list[Path]:
    return sorted(Path(directory).glob("seg-*.spool"))


# ---------------------------------------------------------------- basics

def test_round_trip_across_close_and_reopen(tmp_path):
    sp = Spool.open(tmp_path / "s")
    assert fill(sp, 0, 50) == list(range(50))
    assert sp.durable_offset == 49 and sp.depth_records == 50
    assert sp.depth_bytes == sum(frame_len(i) for i in range(50))
    sp.close()
    sp.close()                                   # idempotent

    sp = Spool.open(tmp_path / "s")
    assert sp.recovery.records == 50 and sp.recovery.problems == []
    assert sp.recovery.skipped_records == sp.recovery.skipped_bytes == 0
    assert read_all(sp) == [expected(i) for i in range(50)]
    assert sp.depth_bytes == sum(frame_len(i) for i in range(50))
    sp.close()
    assert (tmp_path / "s").stat().st_mode & 0o777 == 0o700


def test_offsets_continue_across_reopen_even_when_everything_was_deleted(tmp_path):
    d = tmp_path / "s"
    with Spool.open(d, segment_bytes=512) as sp:
        fill(sp, 0, 40)
    with Spool.open(d, segment_bytes=512) as sp:
        assert sp.append(*rec(40)) == 40
        sp.sync()
        sp.mark_delivered(40)
        assert sp.depth_records == 0
    # Everything was delivered, so no segment is left (the active one goes
    # too, see test_spool_disk.py); the cursor holds the history.
    with Spool.open(d, segment_bytes=512) as sp:
        assert len(seg_files(d)) == 0
        assert sp.delivered_offset == 40
        assert sp.append(*rec(41)) == 41
        assert sp.read(10) == []                  # not synced yet
        sp.sync()
        assert sp.read(10) == [expected(41)]
        sp.mark_delivered(41)
    # Even with every segment removed by hand, the cursor keeps offsets going up.
    for f in seg_files(d):
        f.unlink()
    with Spool.open(d, segment_bytes=512) as sp:
        assert sp.append(*rec(42)) == 42


def test_only_synced_records_are_read_and_can_be_delivered(tmp_path):
    sp = Spool.open(tmp_path / "s")
    fill(sp, 0, 3)
    sp.append(*rec(3))
    assert sp.durable_offset == 2
    assert [r.offset for r in sp.read(10)] == [0, 1, 2]
    with pytest.raises(SpoolError, match="durable only up to 2"):
        sp.mark_delivered(3)
    assert sp.sync() == 3
    assert [r.offset for r in sp.read(10)] == [0, 1, 2, 3]
    sp.close()


def test_delivered_cursor_persists_and_reading_resumes_after_it(tmp_path):
    d = tmp_path / "s"
    with Spool.open(d) as sp:
        fill(sp, 0, 30)
        first = sp.read(12)
        assert [r.offset for r in first] == list(range(12))
        # read(after=) pipelines without moving the cursor
        assert [r.offset for r in sp.read(5, after=11)] == list(range(12, 17))
        sp.mark_delivered(11)
        assert sp.delivered_offset == 11
        assert sp.depth_records == 18
        assert sp.depth_bytes == sum(frame_len(i) for i in range(12, 30))
        sp.mark_delivered(5)                     # stale acks change nothing
        assert sp.delivered_offset == 11
    with Spool.open(d) as sp:
        assert sp.delivered_offset == 11
        assert sp.depth_records == 18
        assert read_all(sp) == [expected(i) for i in range(12, 30)]
        assert [r.offset for r in sp.read(3, after=2)] == [12, 13, 14]   # never before the cursor
    assert (d / "cursor").read_bytes().split()[2] == b"11"
    assert not (d / "cursor.tmp").exists()


def test_read_and_deliver_at_any_offset_of_a_large_segment(tmp_path):
    """Far more bytes than one sparse-index stride: every seek must land on
    the right frame, and depth must follow arbitrary cursors."""
    n = 3 * INDEX_STRIDE // 60
    sp = Spool.open(tmp_path / "s")
    fill(sp, 0, n)
    assert sp.segments == 1
    for after in (-1, 0, 1, n // 3, n // 3 + 1, n // 2, n - 2, n - 1):
        got = sp.read(3, after=after)
        assert [r.offset for r in got] == [o for o in range(after + 1, after + 4) if o < n]
        assert got == [expected(r.offset) for r in got]
    for cursor in (n // 5, n // 5 + 1, n // 2, n - 2):
        sp.mark_delivered(cursor)
        assert sp.depth_records == n - cursor - 1
        assert sp.depth_bytes == sum(frame_len(i) for i in range(cursor + 1, n))
    sp.close()


def test_append_from_one_thread_while_another_syncs(tmp_path):
    sp = Spool.open(tmp_path / "s", segment_bytes=4096)
    stop = threading.Event()
    durable: list[int] = []

    def syncer():
        while not stop.is_set():
            durable.append(sp.sync())

    t = threading.Thread(target=syncer)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)             # switch threads inside append, if it lets them
    t.start()
    try:
        offsets = [sp.append(*rec(i)) for i in range(5000)]
    finally:
        stop.set()
        t.join()
        sys.setswitchinterval(interval)
    assert offsets == list(range(5000))
    assert durable == sorted(durable)
    sp.close()
    with Spool.open(tmp_path / "s", segment_bytes=4096) as sp:
        assert read_all(sp) == [expected(i) for i in range(5000)]
        assert sp.recovery.problems == []


# ---------------------------------------------------------------- segments

def test_segments_roll_at_segment_bytes_and_are_deleted_when_delivered(tmp_path):
    d = tmp_path / "s"
    sp = Spool.open(d, segment_bytes=1024)
    fill(sp, 0, 100)
    files = seg_files(d)
    assert len(files) > 3
    assert all(f.stat().st_size <= 1024 for f in files)
    firsts = [int(f.name[4:24]) for f in files]
    assert firsts[0] == 0 and firsts == sorted(firsts)
    for f, first in zip(files, firsts):
        assert f.read_bytes()[:4] == MAGIC                      # a record starts the file
        assert int.from_bytes(f.read_bytes()[16:24], "little") == first
    # deliver into the middle of the third segment: the first two go
    cursor = firsts[2] + 1
    sp.mark_delivered(cursor)
    assert [f.name for f in seg_files(d)] == [f.name for f in files[2:]]
    assert not (d / "archive").exists()
    assert sp.depth_records == 100 - cursor - 1
    assert read_all(sp)[0].offset == cursor + 1
    sp.close()


def test_delivered_segments_leave_no_archive_behind(tmp_path):
    # The spool used to move delivered segments to archive/; the archive of
    # published records is now streamer/delivery/archive.py's, fed by the Kafka sink.
    d = tmp_path / "s"
    sp = Spool.open(d, segment_bytes=1024)
    fill(sp, 0, 200)
    files = seg_files(d)
    sp.mark_delivered(199)
    # All delivered: the active segment goes too (test_spool_disk.py); what
    # is left is the cursor, the lock and the reserve for a full disk.
    assert len(files) > 1 and seg_files(d) == []
    assert sorted(p.name for p in d.iterdir()) == ["cursor", "lock", "reserve"]
    sp.close()


# ---------------------------------------------------------------- the bound

def test_spool_full_at_the_bound_and_room_again_after_delivery(tmp_path):
    bound = sum(frame_len(i) for i in range(10))
    sp = Spool.open(tmp_path / "s", max_bytes=bound)
    fill(sp, 0, 10)
    assert sp.depth_bytes == bound and not sp.full
    with pytest.raises(SpoolFull, match="full"):
        sp.append(*rec(10))
    with pytest.raises(SpoolError):
        sp.append(*rec(10))
    assert sp.full and sp.full_refusals == 2
    assert sp.sync() == 9 and sp.depth_records == 10          # nothing of the refusals went in
    batch = sp.read(3)
    sp.mark_delivered(batch[-1].offset)
    assert not sp.full
    assert sp.depth_bytes == bound - sum(frame_len(i) for i in range(3))
    assert sp.append(*rec(10)) == 10
    sp.sync()
    sp.close()
    with Spool.open(tmp_path / "s", max_bytes=bound) as sp:   # the bound holds across reopen
        assert sp.depth_records == 8
        sp.append(*rec(11))
        with pytest.raises(SpoolFull):
            sp.append(*rec(12))
        assert sp.full_refusals == 1


def test_a_record_that_can_never_fit_is_an_error_not_full(tmp_path):
    sp = Spool.open(tmp_path / "s", max_bytes=1000)
    with pytest.raises(SpoolError) as info:
        sp.append(b"k", b"v" * 2000, 0)
    assert not isinstance(info.value, SpoolFull) and sp.full_refusals == 0
    assert sp.append(b"k", b"v", 0) == 0
    sp.close()


# ---------------------------------------------------------------- recovery

def _pristine(tmp_path, n=20, **kw) -> Path:
    d = tmp_path / "pristine"
    with Spool.open(d, **kw) as sp:
        fill(sp, 0, n)
    return d


def test_torn_tail_at_every_byte_of_the_last_frame(tmp_path):
    n = 20
    pristine = _pristine(tmp_path, n)
    (seg,) = seg_files(pristine)
    start = sum(frame_len(i) for i in range(n - 1))
    assert seg.stat().st_size == start + frame_len(n - 1)
    for cut in range(frame_len(n - 1)):
        d = tmp_path / f"cut{cut}"
        shutil.copytree(pristine, d)
        os.truncate(d / seg.name, start + cut)
        sp = Spool.open(d)
        rep = sp.recovery
        assert rep.records == n - 1, cut
        assert read_all(sp) == [expected(i) for i in range(n - 1)]
        assert (d / seg.name).stat().st_size == start             # the tail is cut
        if cut == 0:
            assert rep.problems == []                             # a clean frame boundary
        else:
            assert rep.skipped_bytes == cut and rep.skipped_records == 1, cut
            (line,) = rep.problems
            assert str(d / seg.name) in line and f"byte {start}:" in line and "cut" in line
        # appends go on right after the last good frame
        assert sp.append(*rec(n - 1)) == n - 1
        sp.close()
        with Spool.open(d) as again:
            assert again.recovery.problems == []
            assert read_all(again)[-1] == expected(n - 1)


def test_zeroed_tail_after_power_loss_is_cut(tmp_path):
    d = _pristine(tmp_path, 10)
    (seg,) = seg_files(d)
    size = seg.stat().st_size
    with open(seg, "ab") as f:
        f.write(b"\0" * 4096)
    with Spool.open(d) as sp:
        assert sp.recovery.records == 10 and sp.recovery.skipped_bytes == 4096
        assert f"byte {size}:" in sp.recovery.problems[0]
        assert seg.stat().st_size == size


@pytest.mark.parametrize("where,what", [
    (HEADER_BYTES + 3, "bad checksum"),     # in the key
    (-1, "bad checksum"),                   # the last byte of the value
    (5, "bad checksum"),                    # the CRC itself
    (8, "bad checksum"),                    # the payload length
    (16, "bad checksum"),                   # the offset
    (0, "bad magic"),
])
def test_bad_frame_in_the_middle_is_skipped_alone(tmp_path, where, what):
    n, bad = 20, 7
    d = _pristine(tmp_path, n)
    (seg,) = seg_files(d)
    pos = sum(frame_len(i) for i in range(bad))
    data = bytearray(seg.read_bytes())
    data[pos + where if where >= 0 else pos + frame_len(bad) + where] ^= 0x5A
    seg.write_bytes(bytes(data))
    sp = Spool.open(d)
    rep = sp.recovery
    assert read_all(sp) == [expected(i) for i in range(n) if i != bad]
    assert rep.records == n - 1 and rep.skipped_records == 1
    assert rep.skipped_bytes == frame_len(bad)
    (line,) = rep.problems
    assert str(seg) in line and f"byte {pos}:" in line and what in line
    assert seg.stat().st_size == len(data)                       # nothing cut in the middle
    # the hole is remembered: depth and delivery step over it
    assert sp.depth_records == n - 1
    sp.mark_delivered(bad + 1)
    assert sp.depth_records == n - bad - 2
    assert sp.depth_bytes == sum(frame_len(i) for i in range(bad + 2, n))
    sp.close()


def test_bad_frame_in_an_older_segment_and_its_tail(tmp_path):
    d = _pristine(tmp_path, 60, segment_bytes=512)
    files = seg_files(d)
    first = int(files[1].name[4:24])
    data = bytearray(files[1].read_bytes())
    data[-3] ^= 0xFF                    # the last frame of a sealed segment
    files[1].write_bytes(bytes(data))
    with Spool.open(d, segment_bytes=512) as sp:
        got = [r.offset for r in read_all(sp)]
        lost = int(files[2].name[4:24]) - 1
        assert got == [i for i in range(60) if i != lost]
        assert lost > first and sp.recovery.skipped_records == 1
        assert str(files[1]) in sp.recovery.problems[0]
        assert files[1].stat().st_size == len(data)               # older segments are not cut


def test_garbage_files_never_crash_recovery(tmp_path):
    d = tmp_path / "s"
    with Spool.open(d, segment_bytes=512) as sp:
        fill(sp, 0, 40)
    files = seg_files(d)
    rnd = os.urandom(3000)
    files[1].write_bytes(rnd)                                      # an older segment
    (d / "seg-nonsense.spool").write_bytes(b"x")
    (d / segment_name(10**19)).write_bytes(b"beyond 2^63")
    (d / "cursor").write_bytes(b"\x00garbage\n")
    (d / "notes.txt").write_text("not ours")
    with Spool.open(d, segment_bytes=512) as sp:
        rep = sp.recovery
        got = [r.offset for r in read_all(sp)]
        gone = range(int(files[1].name[4:24]), int(files[2].name[4:24]))
        assert got == [i for i in range(40) if i not in gone]
        assert sp.delivered_offset == -1
        text = "\n".join(rep.problems)
        assert "seg-nonsense.spool" in text and "cursor" in text and str(files[1]) in text
        assert segment_name(10**19) in text
        assert rep.skipped_bytes >= 3000
        assert sp.append(*rec(40)) == 40


def test_a_damaged_older_segment_stays_until_the_cursor_passes_its_range(tmp_path):
    d = tmp_path / "s"
    with Spool.open(d, segment_bytes=512) as sp:
        fill(sp, 0, 40)
    files = seg_files(d)
    files[0].write_bytes(os.urandom(600))
    first_good = int(files[1].name[4:24])
    with Spool.open(d, segment_bytes=512) as sp:
        assert files[0].exists()                   # nothing it held was delivered
        assert "bad magic" in sp.recovery.problems[0] or "offset" in sp.recovery.problems[0]
        assert sp.depth_records == 40 - first_good
        assert sp.depth_bytes == 600 + sum(frame_len(i) for i in range(first_good, 40))
        assert sp.read(1) == [expected(first_good)]
        sp.mark_delivered(first_good)
        assert not files[0].exists()
        assert sp.depth_records == 40 - first_good - 1
        assert sp.depth_bytes == sum(frame_len(i) for i in range(first_good + 1, 40))


def test_a_last_segment_of_pure_garbage(tmp_path):
    d = tmp_path / "s"
    d.mkdir()
    (d / segment_name(0)).write_bytes(os.urandom(5000) + MAGIC + os.urandom(100))
    with Spool.open(d) as sp:
        assert sp.recovery.records == 0 and sp.recovery.skipped_bytes == 5104
        assert len(sp.recovery.problems) == 1
        assert fill(sp, 0, 3) == [0, 1, 2]
    with Spool.open(d) as sp:
        assert read_all(sp) == [expected(i) for i in range(3)]


def test_damage_after_open_is_skipped_by_the_reader(tmp_path):
    sp = Spool.open(tmp_path / "s")
    fill(sp, 0, 10)
    (seg,) = seg_files(tmp_path / "s")
    pos = sum(frame_len(i) for i in range(4))
    with open(seg, "r+b") as f:
        f.seek(pos + HEADER_BYTES)
        f.write(b"X")
    assert [r.offset for r in read_all(sp)] == [0, 1, 2, 3, 5, 6, 7, 8, 9]
    assert len(sp.read_problems) == 1 and f"byte {pos}:" in sp.read_problems[0]
    assert sp.depth_records == 9
    sp.mark_delivered(9)
    assert sp.depth_records == 0 and sp.depth_bytes == 0
    sp.close()


# ---------------------------------------------------------------- exclusivity, crashes

def test_second_open_of_the_same_directory_fails_clearly(tmp_path):
    d = tmp_path / "s"
    sp = Spool.open(d)
    with pytest.raises(SpoolError, match=f"{d} is already open.*pid {os.getpid()}"):
        Spool.open(d)
    assert issubclass(SpoolError, StreamerError)
    sp.close()
    with pytest.raises(SpoolError, match="closed"):
        sp.append(b"k", b"v", 0)
    Spool.open(d).close()                                         # free again


def test_bad_parameters(tmp_path):
    with pytest.raises(StreamerError, match="segment_bytes"):
        Spool.open(tmp_path / "a", segment_bytes=10)
    with pytest.raises(StreamerError, match="max_bytes"):
        Spool.open(tmp_path / "b", max_bytes=0)


WRITER = """
import sys
from streamer.delivery.spool import Spool
sp = Spool.open(sys.argv[1], segment_bytes=32 << 10)
i = 0
while True:
    for _ in range(500):
        sp.append(b"key-%d" % i, b"value-%d-" % i * 4, i)
        i += 1
    print(sp.sync(), flush=True)
"""


def test_everything_sync_returned_survives_a_sigkill(tmp_path):
    d = tmp_path / "s"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(d)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    promised = []
    try:
        while len(promised) < 40:
            line = proc.stdout.readline()
            assert line, proc.stderr.read().decode()
            promised.append(int(line))
        os.kill(proc.pid, signal.SIGKILL)                 # in the middle of appending
        rest, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    promised += [int(x) for x in rest.split()]
    assert promised == sorted(promised)
    with Spool.open(d, segment_bytes=32 << 10) as sp:
        got = read_all(sp)
        assert len(got) >= promised[-1] + 1
        assert [r.offset for r in got[:promised[-1] + 1]] == list(range(promised[-1] + 1))
        for r in got:
            assert r.key == b"key-%d" % r.offset and r.value == b"value-%d-" % r.offset * 4
        assert sp.append(b"k", b"v", 0) == got[-1].offset + 1
