"""Power cuts on tests/crashfs.py: what was synced survives, nothing else does.

First the filesystem itself (so that the tests after it cannot pass because
crashfs kept everything): unsynced data is visible before the cut and gone
after it, synced data survives, metadata is applied at once, and no mount is
left behind, also when the test fails. Then the two places where ctstream
promises durability before it acks a DESTROY to the kernel: Spool.sync
(fdatasync) and JsonlSink.commit (fsync). The writer runs in a child process
that is SIGKILLed before the cut, as the power takes the process too.

Needs root (mount); in CI these run or fail, never skip (tests/conftest.py).
"""

from __future__ import annotations

import errno
import json
import mmap
import multiprocessing
import os
import random
import time
import traceback

import pytest

from streamer.datapath import abi
from streamer.datapath.events import Clock, Event
from streamer.delivery.sink import JsonlSink
from streamer.delivery.spool import Spool
from tests.crashfs import PAGE, crash_mount, mounted
from tests.unit.test_events import _raw_event

pytestmark = pytest.mark.root

CHILD_TIMEOUT = 20


@pytest.fixture
def fs(tmp_path):
    with crash_mount(tmp_path / "disk", tmp_path / "mnt") as mount:
        yield mount
    assert not mounted(tmp_path / "mnt")


def run_then_kill(fn, *args):
    """fn(*args) in a forked child that reports its result and then waits;
    the child is SIGKILLed before this returns the result (the machine's
    power goes, the process goes with it)."""
    ctx = multiprocessing.get_context("fork")
    parent_end, child_end = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child_end, fn, args), daemon=True)
    proc.start()
    child_end.close()
    try:
        assert parent_end.poll(CHILD_TIMEOUT), f"{fn.__name__}: no result in {CHILD_TIMEOUT} s"
        kind, value = parent_end.recv()
        assert kind == "ok", f"{fn.__name__} failed in the child:\n{value}"
        return value
    finally:
        proc.kill()
        proc.join(10)
        parent_end.close()


def _child(conn, fn, args):
    try:
        conn.send(("ok", fn(*args)))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    time.sleep(3 * CHILD_TIMEOUT)      # until killed: no exit handler may sync anything
    os._exit(1)


# --- the filesystem ------------------------------------------------------------------


def test_unsynced_data_is_read_back_before_the_cut_and_gone_after_it(fs):
    """One file under random writes, truncates and syncs, against a model of
    what readers see now and what the disk holds: reads and sizes follow
    the writes at once (the page cache), the backing file only the syncs,
    and after the cut the file is exactly what the last sync left."""
    rng = random.Random(20260101)
    path = fs.path / "f"
    seen, durable = bytearray(), bytearray()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    syncs = 0
    try:
        for step in range(400):
            op = rng.random()
            if op < 0.55:
                off = rng.choice([len(seen), rng.randrange(0, len(seen) + 3 * PAGE)])
                data = rng.randbytes(rng.choice([1, 17, PAGE - 1, PAGE, 3 * PAGE + 5]))
                assert os.pwrite(fd, data, off) == len(data)
                seen.extend(bytes(max(0, off - len(seen))))
                seen[off:off + len(data)] = data
            elif op < 0.62:
                size = rng.randrange(0, len(seen) + PAGE + 1)
                os.ftruncate(fd, size)       # journaled: the disk's size changes at once
                del seen[size:]
                seen.extend(bytes(size - len(seen)))
                del durable[size:]
                durable.extend(bytes(size - len(durable)))
            elif op < 0.72:
                (os.fsync if rng.random() < 0.5 else os.fdatasync)(fd)
                durable[:] = seen
                syncs += 1
            start = rng.randrange(0, len(seen) + 1)
            n = rng.randrange(0, 5 * PAGE)
            assert os.pread(fd, n, start) == bytes(seen[start:start + n]), f"step {step}"
            assert os.fstat(fd).st_size == len(seen), f"step {step}"
        seen.extend(rng.randbytes(PAGE))
        os.pwrite(fd, seen[-PAGE:], len(seen) - PAGE)     # the last write is never synced
    finally:
        os.close(fd)
    assert syncs > 10
    assert path.read_bytes() == seen
    assert (fs.backing / "f").read_bytes() == durable != seen
    fs.cut()
    assert (fs.backing / "f").read_bytes() == durable
    fs.remount()
    assert path.read_bytes() == durable


def test_only_a_sync_of_the_file_keeps_its_data_and_metadata_is_journaled(fs):
    d = fs.path
    (d / "never").write_bytes(b"a" * 10_000)           # closed, never synced
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)                                  # a directory's fsync keeps no file data
    finally:
        os.close(dfd)
    with open(d / "synced", "wb") as f:
        f.write(b"one\n")
        f.flush()
        os.fsync(f.fileno())
        f.write(b"two\n")                              # after the sync: lost
    fd = os.open(d / "overwritten", os.O_RDWR | os.O_CREAT, 0o600)
    os.write(fd, b"0123456789")
    os.fdatasync(fd)
    os.pwrite(fd, b"xx", 4)
    with open(d / "overwritten", "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        assert mm[:] == b"0123xx6789"                  # mmap reads see the unsynced bytes too
    os.close(fd)
    with open(d / "moved", "wb") as f:
        f.write(b"moved\n")
        f.flush()
        os.fsync(f.fileno())
    os.rename(d / "moved", d / "renamed")
    (d / "removed").write_bytes(b"x")
    os.unlink(d / "removed")
    os.mkdir(d / "sub")

    fs.cut()
    fs.remount()
    assert (d / "never").stat().st_size == 0           # the name survived, its data did not
    assert (d / "synced").read_bytes() == b"one\n"
    assert (d / "overwritten").read_bytes() == b"0123456789"
    assert (d / "renamed").read_bytes() == b"moved\n" and not (d / "moved").exists()
    assert not (d / "removed").exists() and (d / "sub").is_dir()


def test_no_mount_is_left_behind_when_the_test_fails(tmp_path):
    mnt = tmp_path / "mnt"
    with pytest.raises(RuntimeError, match="the test failed"):
        with crash_mount(tmp_path / "disk", mnt) as fs:
            held = os.open(mnt / "held", os.O_RDWR | os.O_CREAT, 0o600)   # a busy mount
            os.write(held, b"x")
            pid = fs.proc.pid
            assert mounted(mnt)
            raise RuntimeError("the test failed")
    assert not mounted(mnt) and not mnt.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    # What a process that outlived the power sees on its old descriptors.
    with pytest.raises(OSError) as exc:
        os.write(held, b"y")
    assert exc.value.errno == errno.ENOTCONN
    try:
        os.close(held)
    except OSError:
        pass            # the close is done; its flush could not be


# --- the spool -----------------------------------------------------------------------


SPOOL_MAX = 64 << 20


def spool_record(i: int) -> tuple[bytes, bytes, int]:
    rng = random.Random(i)
    return f"ctstest/{i}".encode(), rng.randbytes(rng.randrange(40, 400)), 1_700_000_000_000 + i


def write_spool(directory: str, n: int, m: int) -> dict:
    """n records synced in batches (as the daemon does before it acks), then
    m appended that no sync covers; the process is then killed."""
    sp = Spool.open(directory, SPOOL_MAX, segment_bytes=8192)
    for i in range(n):
        assert sp.append(*spool_record(i)) == i
        if i % 40 == 39:
            sp.sync()
    durable = sp.sync()
    for i in range(n, n + m):
        sp.append(*spool_record(i))
    return {"durable": durable, "segments": sp.segments}


def test_spool_keeps_every_synced_record_across_a_power_cut(fs):
    n, m = 300, 50
    spool_dir = fs.path / "spool"
    got = run_then_kill(write_spool, str(spool_dir), n, m)
    assert got["durable"] == n - 1 and got["segments"] >= 4, got
    fs.cut()
    fs.remount()

    with Spool.open(spool_dir, SPOOL_MAX, segment_bytes=8192) as sp:
        records = sp.read(n + m + 1)
        problems = sp.recovery.problems
        assert len(records) >= n, (f"only {len(records)} of the {n} synced records survived "
                                   f"the power cut; recovery: {sp.recovery}")
        for rec in records:
            key, value, time_ms = spool_record(rec.offset)
            assert (rec.key, rec.value, rec.time_ms) == (key, value, time_ms), rec.offset
        assert [r.offset for r in records] == list(range(len(records)))
        assert not problems, problems
        # Appends go on after what survived.
        assert sp.append(*spool_record(len(records))) == len(records)
        sp.sync()


# --- the jsonl sink -------------------------------------------------------------------


def destroy_event(i: int) -> Event:
    return Event.from_raw(abi.decode_event(_raw_event(ct_id=1000 + i, seq=1, sport=i % 65536)),
                          Clock())


def write_sink(path: str, n: int, m: int) -> dict:
    """n events committed in batches (as the daemon does before it acks),
    then m more written, more than the file's buffer holds, so that most of
    them reach the filesystem with no fsync after them."""
    sink = JsonlSink(path)
    for i in range(n):
        sink.write(destroy_event(i))
        if i % 100 == 99:
            sink.commit()
    sink.commit()
    committed = os.path.getsize(path)
    for i in range(n, n + m):
        sink.write(destroy_event(i))
    return {"committed_bytes": committed, "commits": sink.commits}


def test_jsonl_sink_keeps_every_committed_event_across_a_power_cut(fs):
    n, m = 500, 3000
    path = fs.path / "events.jsonl"
    got = run_then_kill(write_sink, str(path), n, m)
    assert got["commits"] >= 5, got
    written = path.stat().st_size
    assert written > got["committed_bytes"] + (1 << 20) // 2, "the unsynced events never reached the fs"
    fs.cut()
    fs.remount()

    lines = path.read_bytes().split(b"\n")
    intact = []
    for line in lines:
        try:
            intact.append(json.loads(line))
        except ValueError:
            break
    assert len(intact) >= n, (f"only {len(intact)} of the {n} committed events survived "
                              f"the power cut ({path.stat().st_size} of "
                              f"{got['committed_bytes']} committed bytes)")
    # The lines are the events' wire records (the same as in Kafka).
    assert [rec["ctId"] for rec in intact] == [1000 + i for i in range(len(intact))]
    assert all(rec["eventType"] == "DESTROY" and rec["responderOctets"] == 5000
               for rec in intact)
    # crashfs keeps nothing that was not synced: this run did cut something.
    assert path.stat().st_size == got["committed_bytes"] < written
    # The sink goes on after what survived.
    sink = JsonlSink(str(path))
    assert not sink.torn_tail
    sink.write(destroy_event(n))
    sink.close()
    assert len(path.read_text().splitlines()) == n + 1
