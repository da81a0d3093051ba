"""Kafka timestamps are the events' observation times, against the real
broker of scripts/kafka.sh, on every way into Kafka:

- live: ring records and a LOST report through the Kafka sink, as the
  daemon sends them;
- the spool, drained after an outage (its records are older than the live
  ones and still keep their own times);
- `ctstream replay` of the archive: each record again with its original
  timestamp and the schema header of its own version (v1 records archived
  before an upgrade go out as v1).

Each record read back with aiokafka must have timestamp_type CreateTime and
timestamp == its observationTimeMilliseconds. The events happened hours
ago, so a timestamp taken at sending could not pass; and a time-based seek
(offsets_for_times) lands on the event of that time.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import aiokafka
import pytest
from aiokafka.structs import TopicPartition

from streamer.datapath import abi
from streamer.datapath.events import Clock, Event, LostReport
from streamer.delivery import records, wire
from streamer.delivery.archive import ArchiveWriter, archive_dir
from streamer.delivery.kafka_settings import KafkaSettings
from streamer.delivery.kafka_sink import KafkaSink
from streamer.delivery.producer import Producer
from streamer.delivery.spool import Spool
from tests.netns.test_cli import ctstream
from tests.unit.test_records import raw_event

pytestmark = pytest.mark.kafka

NODE = "gw-ts"
HOUR_NS = 3600 * 10**9
CREATE_TIME = 0              # aiokafka's timestamp_type for a producer-set timestamp
LIVE, SPOOLED, OLD_V1 = 40, 25, 10
READ_TIMEOUT_S = 60


class PastClock(Clock):
    """Ring times to wall time as if the events had been made `hours` ago:
    the test's ring times count from 1 s (raw_event's ts_ns), which maps to
    `hours` before now, whatever the machine's uptime (a real monotonic
    offset would put them before the spooled records on a host up for more
    than an hour)."""

    def __init__(self, hours: float):
        self.offset = time.time_ns() - int(hours * HOUR_NS) - 1_000_000_000

    def wall_ns(self, mono_ns: int) -> int:
        return mono_ns + self.offset


def new_topic(broker, partitions: int = 1) -> str:
    name = f"ctstream.ts.{uuid.uuid4().hex[:12]}"
    broker.topic_create(name, partitions)
    return name


def spooled_record(i: int, time_ms: int) -> tuple[bytes, bytes, int]:
    """A DESTROY as the sink spools it: (key, value, time_ms)."""
    ev = Event(type="DESTROY", family=4, proto="udp", src="198.18.40.1", dst="198.18.40.2",
               sport=20_000 + i, dport=53, vlan=0, state=None, assured=True, ct_id=5_000 + i,
               seq=1, packets_orig=2, packets_reply=2, bytes_orig=140, bytes_reply=300,
               time_ms=time_ms, first_ms=time_ms - 2_000, last_ms=time_ms - 1_000,
               end_reason="idle", missed=0)
    key, value = records.encode_event(ev, NODE)
    return key, value, time_ms


def v1_value(record: dict) -> bytes:
    """The record as a ctstream of schema version 1 wrote it."""
    old = dict(record, schemaVersion=1)
    old["tcpControlBitsInitiator"] = old.pop("tcpControlBits")
    old["tcpControlBitsResponder"] = old.pop("reverseTcpControlBits")
    return wire.encode(wire.validate(old))


async def read_all(bootstrap: str, topic: str, partitions: int = 1) -> list:
    """Every record of the topic up to its end offsets, in (partition, offset) order."""
    consumer = aiokafka.AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                                         enable_auto_commit=False)
    await consumer.start()
    try:
        parts = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        ends = await consumer.end_offsets(parts)
        out = []
        async with asyncio.timeout(READ_TIMEOUT_S):
            todo = {tp for tp in parts if ends[tp] > 0}
            while todo:
                got = await consumer.getmany(*todo, timeout_ms=1000)
                for tp, msgs in got.items():
                    out += [m for m in msgs if m.offset < ends[tp]]
                for tp in list(todo):
                    if await consumer.position(tp) >= ends[tp]:
                        todo.discard(tp)
        return sorted(out, key=lambda m: (m.partition, m.offset))
    finally:
        await consumer.stop()


async def first_offset_at(bootstrap: str, topic: str, time_ms: int) -> int:
    consumer = aiokafka.AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        return (await consumer.offsets_for_times({tp: time_ms}))[tp].offset
    finally:
        await consumer.stop()


def check_timestamps(messages) -> list[dict]:
    """Each message's timestamp is its record's observation time, as
    CreateTime; the decoded records."""
    out = []
    for m in messages:
        rec = wire.validate(wire.decode(m.value))
        assert m.timestamp_type == CREATE_TIME, (m.offset, m.timestamp_type)
        assert m.timestamp == rec["observationTimeMilliseconds"], (m.offset, m.timestamp, rec)
        out.append(rec)
    return out


async def publish_live_and_spooled(broker, topic: str, spool_dir: str) -> dict:
    """A spool left by an outage (records 3 h old), then live ring records
    (2 h old) and a LOST report through a Kafka sink that archives what
    Kafka acknowledged. The times of what was published, in publishing order."""
    now_ms = time.time_ns() // 1_000_000
    spooled = [spooled_record(i, now_ms - 3 * 3_600_000 + i * 1_000) for i in range(SPOOLED)]
    spool = Spool.open(spool_dir, 1 << 20)
    for rec in spooled:
        spool.append(*rec)
    spool.sync()
    spool.close()

    sink = KafkaSink(KafkaSettings(bootstrap=broker.bootstrap, topic=topic), spool_dir,
                     node_id=NODE, archive_max=1 << 20)
    clock = PastClock(hours=2)
    await sink.start()
    try:
        async with asyncio.timeout(30):
            while sink.spool.depth_records:          # the drain comes first
                await asyncio.sleep(0.05)
        write = sink.ring_writer(clock)
        for i in range(LIVE):                        # 7 ms apart: several per batch
            ts = 1_000_000_000 + i * 7_000_000
            write(raw_event(type=abi.EV_CREATE if i % 2 else abi.EV_DESTROY, ct_id=100 + i,
                            seq=i % 2, ts_ns=ts, first_ns=ts - 5_000_000, last_ns=ts))
        lost_ms = clock.wall_ns(1_000_000_000 + LIVE * 7_000_000) // 1_000_000
        sink.write(LostReport(lost_ms, 10.0, {"ring_full": 1}, totals={"ring_full": 4}))
        assert await sink.commit_async() == set()
        assert (sink.sent_from_spool, sink.sent_live) == (SPOOLED, LIVE + 1)
    finally:
        await sink.aclose()
    return {"spooled": [t for _k, _v, t in spooled], "now_ms": now_ms, "lost_ms": lost_ms}


async def test_live_spooled_and_replayed_records_carry_their_event_time(kafka_broker, tmp_path):
    topic = new_topic(kafka_broker)
    spool_dir = str(tmp_path / "spool")
    sent = await publish_live_and_spooled(kafka_broker, topic, spool_dir)

    live = await read_all(kafka_broker.bootstrap, topic)
    recs = check_timestamps(live)
    assert len(recs) == SPOOLED + LIVE + 1
    assert [r["observationTimeMilliseconds"] for r in recs[:SPOOLED]] == sent["spooled"]
    assert [r["eventType"] for r in recs[SPOOLED:]] == ["DESTROY", "CREATE"] * (LIVE // 2) + ["LOST"]
    assert recs[-1]["observationTimeMilliseconds"] == sent["lost_ms"]
    # Hours old, not the time they were sent; and in time order, as made.
    times = [m.timestamp for m in live]
    assert times == sorted(times) and max(times) < sent["now_ms"] - 3_600_000
    assert len(set(times)) == len(times)
    assert all(m.headers == (wire.HEADER,) for m in live)
    # A time-based seek finds the event of that time, not the end of the log.
    for k in (0, SPOOLED - 1, SPOOLED, SPOOLED + LIVE // 2):
        assert await first_offset_at(kafka_broker.bootstrap, topic, times[k]) == live[k].offset
    assert await first_offset_at(kafka_broker.bootstrap, topic, times[SPOOLED] - 1) == \
        live[SPOOLED].offset

    # Records a v1 ctstream archived, older still; then replay everything.
    old_ms = sent["now_ms"] - int(3.5 * 3_600_000)
    v1 = []
    for i in range(OLD_V1):
        rec = records.record_of(Event.from_raw(abi.decode_event(raw_event(ct_id=900 + i)),
                                               Clock()), NODE)
        rec["observationTimeMilliseconds"] = old_ms + i
        v1.append((records.message_key(rec), v1_value(rec), old_ms + i))
    archive = ArchiveWriter.open(archive_dir(spool_dir), 1 << 20)
    archive.add(v1)
    archive.close()
    replayed_topic = new_topic(kafka_broker)
    res = ctstream("replay", "--from", "-4h", "--spool", spool_dir, "--kafka",
                   kafka_broker.bootstrap, "--topic", replayed_topic, timeout=120)
    assert res.returncode == 0, res.stderr
    assert f"replayed {SPOOLED + LIVE + 1 + OLD_V1} records" in res.stderr, res.stderr

    replayed = await read_all(kafka_broker.bootstrap, replayed_topic)
    want = [(m.key, m.value, m.timestamp, wire.HEADER) for m in live]
    want += [(k, v, t, wire.header_of(1)) for k, v, t in v1]
    got = [(m.key, m.value, m.timestamp, m.headers) for m in replayed]
    assert [g[:3] for g in got] == [w[:3] for w in want]      # byte for byte, time included
    assert [g[3] for g in got] == [(w[3],) for w in want]     # each with its version's header
    assert all(m.timestamp_type == CREATE_TIME for m in replayed)
    check_timestamps(replayed[:SPOOLED + LIVE + 1])
    assert [wire.decode(m.value)["schemaVersion"] for m in replayed[-OLD_V1:]] == [1] * OLD_V1


async def test_a_record_without_its_timestamp_is_refused_before_sending(kafka_broker):
    topic = new_topic(kafka_broker)
    producer = Producer(KafkaSettings(bootstrap=kafka_broker.bootstrap, topic=topic))
    await producer.start(timeout_s=30)
    try:
        rec = spooled_record(1, time.time_ns() // 1_000_000 - 60_000)
        with pytest.raises(wire.WireError, match=r"\(key, value, timestamp_ms\)"):
            await producer.send([rec, rec[:2]])
        assert producer.connected and producer.in_flight == 0
        await producer.send([rec])                  # nothing of the refused call went out
        assert producer.acked == 1
    finally:
        await producer.stop()
    (m,) = await read_all(kafka_broker.bootstrap, topic)
    assert (m.key, m.value, m.timestamp) == rec
