"""A full or read-only disk under the spool is backpressure, not a crash.

`ctstream run` spools on a 2 MB tmpfs of the test's own while Kafka is down;
3,000 short TCP connections fill it. The daemon must keep running and
tracking, hold the DESTROYs it cannot spool in the kernel's outbox, count the
NEW/UPDATEs it refuses, say why in its status, and once the broker is up,
drain the spool (giving its disk back) and deliver every DESTROY, then send
live. A spool on a filesystem that is read-only when the daemon starts is
drained and takes nothing new. Bounds are bounds, never measurements.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from streamer.delivery.spool import Spool, SpoolUnwritable
from tests.kafka.pipeline_support import (
    pipeline,
    TopicContents,
    check_tcp_connections,
    check_topic,
    make_pipeline,
    private_broker,
    read_topic,
    report,
)
from tests.netns.test_failure_keeps_state import small_fs
from tests.netns.test_reliability import TCP_PORT, kernel_flows, wait_drained

PARTITIONS = 3
PAIR_INDEX = 33           # 198.18.33.0/24
FS_SIZE = "2m"
CONNECTIONS, BATCH = 3000, 500
DRAIN_TIMEOUT = 180


def segment_bytes(spool: Path) -> int:
    return sum(f.stat().st_size for f in spool.glob("seg-*.spool"))


@pipeline
def test_spool_on_a_full_disk_keeps_every_destroy_and_never_exits(pin_dir, tmp_path):
    node = f"ctsdisk-{uuid.uuid4().hex[:8]}"
    with small_fs(tmp_path / "disk", FS_SIZE) as disk, \
            make_pipeline(pin_dir, tmp_path, PAIR_INDEX, node) as pipe, \
            private_broker(tmp_path / "broker") as broker:
        pipe.spool = disk / "spool"
        pair = pipe.pair
        topic = f"ctstream.disk.{uuid.uuid4().hex[:12]}"
        # Kafka is not running: every batch goes to the spool.
        daemon = pipe.start(broker.bootstrap, topic, "--kafka-timeout", "2")
        ports: list[int] = []
        full = None
        for _ in range(CONNECTIONS // BATCH):
            ports += pair.tcp_many(BATCH, family=4, port=TCP_PORT, concurrency=8, timeout=60)
            st = pipe.status()
            if st.get("spool_write_error"):
                full = full or st
        st = pipe.wait_status("the spool's disk full", lambda s: s.get("spool_write_error"), 60)
        full = full or st
        assert "No space left" in full["spool_write_error"], full
        held = pipe.wait_status("DESTROYs held in the kernel's outbox",
                                lambda s: s["outbox"] > 0 and s["spool_refused_events"] > 0, 60)
        assert daemon.proc.poll() is None, daemon.output()[-3000:]
        assert shutil.disk_usage(disk).free < 256 << 10, "the filesystem never filled: test too weak"

        # Kafka comes up: the spool drains, the outbox empties, live again.
        broker.start()
        broker.topic_create(topic, PARTITIONS)
        stats = wait_drained(pipe.pin, timeout=DRAIN_TIMEOUT)
        drained = pipe.wait_spool_drained(DRAIN_TIMEOUT)
        gone = pipe.wait_status("delivered segments retired",
                                lambda st: segment_bytes(pipe.spool) < 64 << 10, 30)
        assert gone["spool_cursor_lag"] is None, gone
        more = pair.tcp_many(100, family=4, port=TCP_PORT, concurrency=8, timeout=60)
        wait_drained(pipe.pin, timeout=60)
        final = pipe.wait_spool_drained(60)
        assert final["sent_live"] > drained["sent_live"], (drained, final)
        assert final["spool_write_error"] is None, final
        assert daemon.proc.poll() is None, "the daemon exited: " + daemon.output()[-3000:]
        kernel = kernel_flows(pair)
        contents = TopicContents(read_topic(broker.bootstrap, topic, PARTITIONS))
        figures = check_topic(contents, node)
        rc, _ = daemon.terminate(timeout=60)
        assert rc == 0, daemon.output()[-3000:]

    ports += more
    assert len(set(ports)) == len(ports), "the client reused a source port"
    check_tcp_connections(contents, pair, 4, ports, TCP_PORT, kernel)
    assert figures["connections"] == len(ports), "DESTROYs of connections nobody made"
    assert stats["created"] == stats["destroyed"] >= CONNECTIONS, stats
    report("full disk", {"connections": len(ports), "outbox_held": held["outbox"],
                         "refused_new_update": held["spool_refused_events"],
                         "write_failures": final["spool_write_failures"], **figures})


@pytest.mark.root
def test_spool_on_a_read_only_filesystem_drains_and_takes_nothing(tmp_path):
    """Remounted read-only between two runs (a disk the kernel turned
    read-only after errors): the spool opens, hands out what it holds, and
    refuses appends as a full spool; nothing on the disk changes."""
    with small_fs(tmp_path / "disk", "1m") as disk:
        d = disk / "spool"
        with Spool.open(d) as sp:
            for i in range(20):
                sp.append(b"k%d" % i, b"v" * i, i)
            sp.sync()
            sp.mark_delivered(4)
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True, timeout=10)
        try:
            before = {p.name: p.read_bytes() for p in d.iterdir()}
            sp = Spool.open(d)
            try:
                assert sp.read_only and "read-only" in sp.write_error
                with pytest.raises(SpoolUnwritable):
                    sp.append(b"k", b"v", 0)
                recs = sp.read(100)
                assert [r.offset for r in recs] == list(range(5, 20))
                sp.mark_delivered(recs[-1].offset)     # Kafka has them: the drain goes on
                assert sp.depth_records == 0 and sp.cursor_lag
            finally:
                sp.close()
            assert {p.name: p.read_bytes() for p in d.iterdir()} == before
        finally:
            subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True, timeout=10)
        with Spool.open(d) as sp:   # writable again: the records not marked on disk come again
            assert [r.offset for r in sp.read(100)] == list(range(5, 20))
