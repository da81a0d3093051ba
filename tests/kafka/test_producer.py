"""streamer.delivery.producer against the real broker from scripts/kafka.sh: what is
sent comes back valid, in order per connection, on the partition the Java
client would pick, with each record's own timestamp (CreateTime); the
in-flight bound holds; bad input and a broker that goes away end in clear
errors within bounded time."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import defaultdict

import aiokafka
import pytest

from streamer.delivery import records
from streamer.delivery import wire
from streamer.errors import ConfigError
from streamer.datapath.events import Event, LostReport
from streamer.delivery.kafka_settings import KafkaSettings
from streamer.delivery.producer import Producer, partition_of
from streamer.errors import KafkaUnavailable
from tests.kafka.conftest import free_port_pair, kafka_sh, stop_and_check

pytestmark = pytest.mark.kafka

NODE = "gw-test"
CT_BASE = 1_763_800_000_000_000_000
TYPES = ("NEW", "UPDATE", "UPDATE", "DESTROY")
# Event times an hour ago: records keep them as their Kafka timestamps, and
# the broker's retention (7 days) must not delete them while a test runs.
T0 = int(time.time() * 1000) - 3_600_000


def flow_event(i: int, seq: int) -> Event:
    """Event `seq` (1-based, see TYPES) of connection i: v4 TCP, v6 UDP, v4
    ICMP in turn."""
    kind = i % 3
    family = 6 if kind == 1 else 4
    proto, state = (("tcp", "ESTABLISHED"), ("udp", None), ("icmp", None))[kind]
    etype = TYPES[seq - 1]
    t0 = T0 + i
    return Event(
        type=etype, family=family, proto=proto,
        src=f"2001:2::{i % 65535 + 1:x}" if family == 6 else f"198.18.{i // 250 % 256}.{i % 250 + 1}",
        dst="2001:2::ffff" if family == 6 else "198.19.0.1",
        sport=10_000 + i % 50_000, dport=7 if proto == "icmp" else 443, vlan=0,
        state=state, assured=seq > 1, ct_id=CT_BASE + i, seq=seq,
        packets_orig=seq * 3, packets_reply=seq * 2, bytes_orig=seq * 300 + i, bytes_reply=seq * 900,
        time_ms=t0 + seq * 1000, first_ms=t0, last_ms=t0 + seq * 1000,
        end_reason="fin" if etype == "DESTROY" else None, missed=0)


def encoded(record: dict) -> tuple[bytes, bytes, int]:
    return records.message_key(record), wire.encode(record), record["observationTimeMilliseconds"]


def with_time(ev: Event) -> tuple[bytes, bytes, int]:
    return (*records.encode_event(ev, NODE), ev.time_ms)


async def consume_all(bootstrap: str, topic: str, expected: int, timeout_s: float = 60) -> list:
    consumer = aiokafka.AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=None,
        auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    got = []
    try:
        async with asyncio.timeout(timeout_s):
            while len(got) < expected:
                for messages in (await consumer.getmany(timeout_ms=1000)).values():
                    got.extend(messages)
        extra = await consumer.getmany(timeout_ms=1000)
        got.extend(m for messages in extra.values() for m in messages)
    finally:
        await consumer.stop()
    return got


def settings_for(broker, topic: str, **changes) -> KafkaSettings:
    return dataclasses.replace(KafkaSettings(bootstrap=broker.bootstrap, topic=topic), **changes)


async def test_records_come_back_valid_and_in_order(kafka_broker):
    topic, partitions, connections = "ctstream.producer.order", 3, 1_500
    kafka_broker.topic_create(topic, partitions)
    acks = []
    producer = Producer(settings_for(kafka_broker, topic),
                        on_ack=lambda n, latency: acks.append((n, latency)))
    await producer.start(timeout_s=30)
    assert producer.connected
    # Event seq of every connection goes out in a later call than seq - 1,
    # and the calls run concurrently: only the producer's ordering keeps a
    # connection's events in order.
    calls = []
    for seq in range(1, len(TYPES) + 1):
        batch = [encoded(records.record_of(flow_event(i, seq), NODE)) for i in range(connections)]
        calls += [batch[j:j + 700] for j in range(0, len(batch), 700)]
    lost = [records.lost_record(LostReport(T0 + n * 10_000, 10.0, {"ring_full": n}),
                                NODE) for n in range(1, 4)]
    calls.append([encoded(r) for r in lost])
    total = sum(len(c) for c in calls)
    try:
        async with asyncio.timeout(60):
            await asyncio.gather(*(producer.send(c) for c in calls))
        assert producer.acked == total and producer.in_flight == 0
        assert producer.last_ack_time is not None and abs(producer.last_ack_time - time.time()) < 60
        assert sum(n for n, _ in acks) == total and len(producer.ack_latency) == len(acks)
    finally:
        await producer.stop()
    assert not producer.connected

    got = await consume_all(kafka_broker.bootstrap, topic, total)
    assert len(got) == total, "records missing or duplicated"
    last_seq = defaultdict(int)
    seen_partitions = set()
    for message in got:
        assert message.headers == ((wire.HEADER[0], wire.HEADER[1]),)
        record = wire.validate(wire.decode(message.value))
        assert message.key == records.message_key(record)
        # The event's time, not the time of sending (records of one call,
        # one batch, have times seconds apart).
        assert message.timestamp_type == 0, "not CreateTime"
        assert message.timestamp == record["observationTimeMilliseconds"]
        assert message.partition == partition_of(message.key, partitions)  # as Java maps keys
        seen_partitions.add(message.partition)
        if record["eventType"] != "LOST":
            assert record["seq"] == last_seq[record["ctId"]] + 1, "a connection's events out of order"
            last_seq[record["ctId"]] = record["seq"]
    assert seen_partitions == set(range(partitions))
    assert len(last_seq) == connections and set(last_seq.values()) == {len(TYPES)}
    assert sorted(wire.dedupe_key(wire.decode(m.value)) for m in got if m.key.endswith(b"/0")) == \
        sorted(wire.dedupe_key(r) for r in lost)


async def test_in_flight_bound_holds(kafka_broker):
    topic, bound = "ctstream.producer.bound", 3_000
    kafka_broker.topic_create(topic, 3)
    producer = Producer(settings_for(kafka_broker, topic, max_in_flight_records=bound))
    await producer.start(timeout_s=30)
    samples = []
    done = asyncio.Event()

    async def sample():
        while not done.is_set():
            samples.append(producer.in_flight)
            await asyncio.sleep(0)

    ev = flow_event(1, 4)
    values = []
    for i in range(60_000):
        ev.ct_id = CT_BASE + i
        values.append(with_time(ev))
    sampler = asyncio.create_task(sample())
    try:
        async with asyncio.timeout(90):
            await asyncio.gather(*(producer.send(values[j:j + 1_000])
                                   for j in range(0, len(values), 1_000)))
    finally:
        done.set()
        await sampler
        await producer.stop()
    assert producer.acked == 60_000 and producer.in_flight == 0
    assert max(samples) <= bound
    assert max(samples) >= bound - 1_000, "the bound was never approached: the test shows nothing"
    assert len(samples) > 100


async def test_unreachable_bootstrap(tmp_path):
    port = free_port_pair()
    producer = Producer(KafkaSettings(bootstrap=f"127.0.0.1:{port}", topic="any"))
    t0 = time.monotonic()
    with pytest.raises(KafkaUnavailable) as info:
        await producer.start(timeout_s=3)
    elapsed = time.monotonic() - t0
    assert 2.5 <= elapsed < 6, elapsed
    assert f"cannot reach Kafka at 127.0.0.1:{port} within 3s" in str(info.value)
    assert "Connection refused" in str(info.value)
    assert not producer.connected
    with pytest.raises(KafkaUnavailable, match="call start"):
        await producer.send([(b"k", b"v")])
    await producer.stop()


async def test_unknown_topic_is_a_config_error(kafka_broker):
    topic = "ctstream.producer.never.created"
    producer = Producer(settings_for(kafka_broker, topic))
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as info:
        await producer.start(timeout_s=30)
    assert time.monotonic() - t0 < 10
    assert str(info.value) == (
        f"topic {topic} does not exist on {kafka_broker.bootstrap} (auto-create is off): "
        f"create it, e.g. scripts/kafka.sh topic create {topic}")
    assert not producer.connected
    await producer.stop()
    listed = kafka_sh("topic", "list", "--dir", str(kafka_broker.directory))
    assert listed.returncode == 0 and topic not in listed.stdout.split()


async def test_missing_tls_ca_file_is_named(kafka_broker, tmp_path):
    missing = tmp_path / "ca.pem"
    with pytest.raises(ConfigError, match=f"ssl_cafile {missing}: No such file or directory"):
        Producer(settings_for(kafka_broker, "any", security_protocol="SSL", ssl_cafile=str(missing)))
    # Also when the file goes away between validation and start().
    missing.write_bytes(open("/etc/ssl/certs/ca-certificates.crt", "rb").read())
    producer = Producer(settings_for(kafka_broker, "any", security_protocol="SSL",
                                     ssl_cafile=str(missing)))
    missing.unlink()
    with pytest.raises(ConfigError, match=f"ssl_cafile {missing}: No such file"):
        await producer.start(timeout_s=5)
    await producer.stop()


async def test_stop_flushes_and_is_idempotent(kafka_broker):
    topic = "ctstream.producer.stop"
    kafka_broker.topic_create(topic, 1)
    producer = Producer(settings_for(kafka_broker, topic))
    await producer.start(timeout_s=30)
    await producer.start(timeout_s=30)  # idempotent
    pairs = [encoded(records.record_of(flow_event(i, 1), NODE)) for i in range(500)]
    sending = asyncio.create_task(producer.send(pairs))
    await asyncio.sleep(0)
    await producer.stop()
    await producer.stop()
    await sending  # the flush in stop() let it finish
    assert producer.acked == 500
    with pytest.raises(KafkaUnavailable, match="stopped"):
        await producer.send(pairs[:1])
    assert len(await consume_all(kafka_broker.bootstrap, topic, 500)) == 500


async def test_broker_stopped_while_sending(tmp_path):
    directory = tmp_path.resolve()
    port = free_port_pair()
    topic = "ctstream.producer.outage"
    try:
        started = kafka_sh("start", "--dir", str(directory), "--port", str(port))
        assert started.returncode == 0, started.stderr
        bootstrap = started.stdout.strip()
        created = kafka_sh("topic", "create", topic, "--partitions", "3", "--dir", str(directory))
        assert created.returncode == 0, created.stderr
        producer = Producer(KafkaSettings(bootstrap=bootstrap, topic=topic,
                                          request_timeout_ms=2_000, delivery_timeout_ms=5_000))
        await producer.start(timeout_s=30)
        ev = flow_event(2, 4)
        sent_calls = 0

        async def keep_sending():
            nonlocal sent_calls
            i = 0
            while True:
                batch = []
                for _ in range(1_000):
                    ev.ct_id = CT_BASE + i
                    i += 1
                    batch.append(with_time(ev))
                await producer.send(batch)
                sent_calls += 1

        sender = asyncio.create_task(keep_sending())
        async with asyncio.timeout(30):
            while producer.acked < 5_000:
                assert not sender.done(), sender
                await asyncio.sleep(0.05)
        stopped = await asyncio.to_thread(kafka_sh, "stop", "--dir", str(directory), timeout=90)
        assert stopped.returncode == 0, stopped.stderr
        t_stopped = time.monotonic()
        with pytest.raises(KafkaUnavailable) as info:
            async with asyncio.timeout(20):
                await sender
        waited = time.monotonic() - t_stopped
        assert waited < 5 + 3, f"send took {waited:.1f}s after the broker stopped"
        assert bootstrap in str(info.value)
        assert not producer.connected and producer.in_flight == 0
        t0 = time.monotonic()
        with pytest.raises(KafkaUnavailable, match="start"):
            await producer.send([with_time(ev)])
        assert time.monotonic() - t0 < 0.5, "a disconnected producer fails at once"

        # The broker comes back: start() reconnects and sending works again.
        restarted = kafka_sh("start", "--dir", str(directory), "--port", str(port))
        assert restarted.returncode == 0, restarted.stderr
        await producer.start(timeout_s=30)
        before = producer.acked
        await asyncio.wait_for(producer.send([with_time(ev)] * 10), 30)
        assert producer.acked == before + 10 and producer.connected
        await producer.stop()
        assert sent_calls >= 5
    finally:
        stop_and_check(directory)
