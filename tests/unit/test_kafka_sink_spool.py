"""The Kafka sink's spooled path with Kafka away: what a full or failing
spool refuses is counted once and in the right place (DESTROYs handed back
to stay in the kernel's outbox, other records in spool_refused), and
`spooled` counts only what went in."""

from __future__ import annotations

import errno

from streamer.delivery.kafka_sink import KafkaSink
from streamer.delivery.kafka_settings import KafkaSettings

from .test_spool_disk import Faults, retry_now

N = 10
DESTROYS = {1: ("ref", 1), 7: ("ref", 7)}     # batch index -> ack reference


async def sink_without_kafka(tmp_path, monkeypatch, spool_max: int) -> KafkaSink:
    sink = KafkaSink(KafkaSettings(bootstrap="127.0.0.1:9", topic="t"), str(tmp_path / "spool"),
                     spool_max=spool_max)

    async def no_kafka():
        return False
    monkeypatch.setattr(sink, "_connect", no_kafka)
    await sink.start()
    return sink


def put_batch(sink: KafkaSink, first: int = 0) -> None:
    sink._pending = [(b"k%d" % i, b"v" * 200, i) for i in range(first, first + N)]
    sink._refs = dict(DESTROYS)


async def test_a_full_spool_counts_what_it_refused_and_only_what_it_took(tmp_path, monkeypatch):
    sink = await sink_without_kafka(tmp_path, monkeypatch, spool_max=4 * 240)
    try:
        put_batch(sink)
        refused = await sink.commit_async()
        took = sink.spool.depth_records
        assert 0 < took < N
        assert refused == {DESTROYS[7]}               # index 7 did not fit, index 1 did
        assert sink.spooled == took, "refused records were counted as spooled"
        assert sink.spool_refused == N - took - len(refused)
        assert sink.status()["spool_write_error"] is None
    finally:
        await sink.aclose()


async def test_a_failing_disk_refuses_the_whole_batch_and_recovers(tmp_path, monkeypatch):
    sink = await sink_without_kafka(tmp_path, monkeypatch, spool_max=1 << 20)
    faults = Faults(monkeypatch)
    try:
        faults.fdatasync = errno.ENOSPC
        put_batch(sink)
        refused = await sink.commit_async()
        assert refused == set(DESTROYS.values())      # nothing of the batch is durable
        assert sink.spooled == 0 and sink.spool_refused == N - len(DESTROYS)
        assert sink.spool.depth_records == 0
        st = sink.status()
        assert "No space left" in st["spool_write_error"] and st["spool_write_failures"] == 1
        put_batch(sink, N)                            # within the retry wait: refused at once
        assert await sink.commit_async() == set(DESTROYS.values())
        assert sink.spool_refused == 2 * (N - len(DESTROYS))
        faults.clear()
        retry_now(sink.spool)
        put_batch(sink, 2 * N)
        assert await sink.commit_async() == set()
        assert sink.spooled == N and sink.spool.depth_records == N
        assert sink.status()["spool_write_error"] is None
    finally:
        await sink.aclose()
