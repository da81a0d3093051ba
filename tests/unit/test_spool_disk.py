"""A failing disk under the spool is a full spool, not the end of it: a
failed sync discards only what was not durable and refuses appends for a
while, the cursor gets past a full disk through the reserve (or lags in
memory), and a fully delivered spool gives its disk back. The disk errors
here are injected into the spool module's own os calls; tests/kafka/
test_disk_full.py runs the daemon on a real filesystem that fills up."""

from __future__ import annotations

import errno
import os

import pytest

from streamer.delivery import spool as spool_mod
from streamer.delivery.spool import (RESERVE_BYTES, RESERVE_NAME, Spool, SpoolFull, SpoolUnwritable,
                            SpoolWriteError)

from .test_spool import expected, fill, read_all, rec, seg_files


class Faults:
    """Replaces os.write / os.fdatasync / os.replace as the spool module sees
    them: each raises the errno it is set to, the real call otherwise."""

    def __init__(self, monkeypatch):
        self.write = self.fdatasync = self.replace = None
        self.partial = False      # a failing write first writes half of its data
        real_write, real_sync, real_replace = os.write, os.fdatasync, os.replace

        def write(fd, data):
            if self.write is not None:
                if self.partial and len(data) > 1:
                    real_write(fd, bytes(data[:len(data) // 2]))
                raise OSError(self.write, os.strerror(self.write))
            return real_write(fd, data)

        def fdatasync(fd):
            if self.fdatasync is not None:
                raise OSError(self.fdatasync, os.strerror(self.fdatasync))
            return real_sync(fd)

        def replace(a, b):
            if self.replace is not None:
                raise OSError(self.replace, os.strerror(self.replace), a)
            return real_replace(a, b)

        fake = type("os", (), {})()
        for name in dir(os):
            setattr(fake, name, getattr(os, name))
        fake.write, fake.fdatasync, fake.replace = write, fdatasync, replace
        monkeypatch.setattr(spool_mod, "os", fake)

    def clear(self) -> None:
        self.write = self.fdatasync = self.replace = None


@pytest.fixture
def faults(monkeypatch):
    return Faults(monkeypatch)


def retry_now(sp: Spool) -> None:
    """Skip the WRITE_RETRY_S wait."""
    sp._disk.retry_at = 0.0


@pytest.mark.parametrize("err,partial", [(errno.ENOSPC, True), (errno.EIO, False)])
def test_a_failed_sync_discards_only_what_was_not_durable(tmp_path, faults, err, partial):
    d = tmp_path / "s"
    sp = Spool.open(d)
    fill(sp, 0, 10)
    size = seg_files(d)[0].stat().st_size
    for i in range(10, 15):
        sp.append(*rec(i))
    faults.partial = partial
    if partial:
        faults.write = err
    else:
        faults.fdatasync = err
    with pytest.raises(SpoolWriteError, match=os.strerror(err)):
        sp.sync()
    assert sp.depth_records == 10 and sp.durable_offset == 9
    assert sp.write_error and os.strerror(err) in sp.write_error and sp.write_failures == 1
    assert seg_files(d)[0].stat().st_size == size          # the torn tail was cut
    # Like a full spool, for a while: an error the caller treats as SpoolFull.
    with pytest.raises(SpoolUnwritable) as info:
        sp.append(*rec(15))
    assert isinstance(info.value, SpoolFull) and sp.full
    assert read_all(sp) == [expected(i) for i in range(10)]  # reads go on
    faults.clear()
    retry_now(sp)
    off = sp.append(*rec(15))
    assert off == 15, "offsets of discarded records are not handed out again"
    sp.sync()
    assert sp.write_error is None and not sp.full
    sp.close()
    with Spool.open(d) as again:
        assert again.recovery.problems == [] and again.recovery.skipped_records == 0
        assert [r.offset for r in read_all(again)] == [*range(10), 15]
        assert read_all(again)[-1] == expected(15)


def test_a_disk_that_keeps_failing_keeps_refusing_and_loses_nothing_durable(tmp_path, faults):
    d = tmp_path / "s"
    sp = Spool.open(d, segment_bytes=1024)
    fill(sp, 0, 40)                                          # several segments
    before = [f.name for f in seg_files(d)]
    faults.write = errno.ENOSPC
    for attempt in range(3):
        retry_now(sp)
        sp.append(*rec(100 + attempt))
        with pytest.raises(SpoolWriteError):
            sp.sync()
    assert sp.write_failures == 3
    assert [f.name for f in seg_files(d)] == before          # no segment files pile up
    faults.clear()
    retry_now(sp)
    sp.append(*rec(200))
    sp.sync()
    sp.close()
    with Spool.open(d, segment_bytes=1024) as again:
        got = read_all(again)
        assert [r.offset for r in got[:40]] == list(range(40))
        assert got[40].key == rec(200)[0] and len(got) == 41


def test_a_tail_that_cannot_be_cut_is_never_read_as_durable(tmp_path, faults, monkeypatch):
    d = tmp_path / "s"
    sp = Spool.open(d)
    fill(sp, 0, 5)
    sp.append(*rec(5))
    monkeypatch.setattr(spool_mod.os, "ftruncate",
                        lambda fd, n: (_ for _ in ()).throw(OSError(errno.EIO, "EIO")))
    faults.fdatasync = errno.EIO                 # the write went in, its sync failed
    with pytest.raises(SpoolWriteError):
        sp.sync()
    faults.clear()
    retry_now(sp)
    sp.append(*rec(6))
    sp.sync()
    assert len(seg_files(d)) == 2                # the new record went to a new segment
    assert [r.offset for r in read_all(sp)] == [0, 1, 2, 3, 4, 6]
    sp.close()
    with Spool.open(d) as again:
        # The uncut tail holds a whole frame: recovery may send it again (a
        # duplicate of a record whose DESTROY was never acked), never lose one.
        offs = [r.offset for r in read_all(again)]
        assert offs[:5] == [0, 1, 2, 3, 4] and offs[-1] == 6


def test_the_cursor_gets_past_a_full_disk_through_the_reserve(tmp_path, faults):
    d = tmp_path / "s"
    sp = Spool.open(d, segment_bytes=1024)
    assert (d / RESERVE_NAME).stat().st_size == RESERVE_BYTES
    fill(sp, 0, 40)
    files = seg_files(d)
    calls = []
    real = spool_mod.Spool._write_cursor

    def full_once(self, offset):        # the disk has no room until the reserve goes
        calls.append(offset)
        if (d / RESERVE_NAME).exists():
            raise spool_mod.SpoolError("cursor") from OSError(errno.ENOSPC, "No space left")
        real(self, offset)

    spool_mod.Spool._write_cursor = full_once
    try:
        sp.mark_delivered(20)
    finally:
        spool_mod.Spool._write_cursor = real
    assert calls == [20, 20] and sp.cursor_lag is None
    assert len(seg_files(d)) < len(files)        # delivered segments were retired
    assert (d / RESERVE_NAME).exists(), "the reserve is made again once there is room"
    sp.close()
    with Spool.open(d, segment_bytes=1024) as again:
        assert read_all(again)[0].offset == 21


def test_a_cursor_that_cannot_be_written_lags_in_memory_and_loses_nothing(tmp_path, faults):
    d = tmp_path / "s"
    sp = Spool.open(d, segment_bytes=1024)
    fill(sp, 0, 40)
    files = [f.name for f in seg_files(d)]
    faults.replace = errno.EIO
    sp.mark_delivered(30)
    assert sp.cursor_lag and "cursor" in sp.cursor_lag
    assert sp.depth_records == 9 and read_all(sp)[0].offset == 31   # the drain goes on
    assert [f.name for f in seg_files(d)] == files  # nothing retired before the cursor is on disk
    faults.clear()
    sp.mark_delivered(35)
    assert sp.cursor_lag is None and len(seg_files(d)) < len(files)
    assert sp.depth_records == 4
    sp.close()
    with Spool.open(d, segment_bytes=1024) as again:
        assert [r.offset for r in read_all(again)] == list(range(36, 40))


def test_a_wholly_delivered_spool_gives_its_disk_back(tmp_path):
    d = tmp_path / "s"
    sp = Spool.open(d)
    fill(sp, 0, 50)
    assert len(seg_files(d)) == 1
    sp.mark_delivered(30)
    assert len(seg_files(d)) == 1                # the active segment holds undelivered ones
    sp.mark_delivered(49)
    assert seg_files(d) == [] and sp.depth_bytes == 0
    assert sp.append(*rec(50)) == 50             # a new segment, named by its first offset
    sp.sync()
    assert [f.name for f in seg_files(d)] == [spool_mod.segment_name(50)]
    sp.close()
    with Spool.open(d) as again:
        assert read_all(again) == [expected(50)]


def test_a_lagging_cursor_is_written_later_even_when_nothing_is_left_to_drain(tmp_path, faults):
    d = tmp_path / "s"
    sp = Spool.open(d, segment_bytes=1024)
    fill(sp, 0, 40)
    faults.replace = errno.EIO
    sp.mark_delivered(39)                         # everything is in Kafka; the cursor is not
    assert sp.depth_records == 0 and sp.cursor_lag and len(seg_files(d)) > 1
    assert not sp.flush_cursor()                  # the disk still refuses
    faults.clear()
    assert sp.flush_cursor() and sp.cursor_lag is None
    assert seg_files(d) == []                     # the delivered segments went with it
    sp.close()
    with Spool.open(d, segment_bytes=1024) as again:
        assert again.delivered_offset == 39 and read_all(again) == []


def test_offsets_a_failed_sync_discarded_do_not_keep_a_drained_segment(tmp_path, faults):
    d = tmp_path / "s"
    sp = Spool.open(d)
    fill(sp, 0, 10)
    for i in range(10, 15):
        sp.append(*rec(i))
    faults.fdatasync = errno.EIO
    with pytest.raises(SpoolWriteError):
        sp.sync()
    faults.clear()
    assert sp.sync() == 14          # nothing to write: the discarded offsets count as done
    recs = read_all(sp)
    assert [r.offset for r in recs] == list(range(10))
    sp.mark_delivered(recs[-1].offset)
    assert sp.depth_records == 0 and seg_files(d) == [], "a drained segment held the disk"
    sp.close()
