"""The real broker from scripts/kafka.sh with aiokafka: an idempotent producer
(acks=all) writes 1,000 msgpack records of schema v1, a consumer reads them all
back and each one validates; start, stop and status behave as documented."""

from __future__ import annotations

import asyncio
import socket
import time
from collections import defaultdict

import aiokafka
import pytest
from aiokafka.errors import KafkaTimeoutError, UnknownTopicOrPartitionError

from streamer.delivery import wire
from tests.kafka.conftest import broker_pids, free_port_pair, kafka_sh, stop_and_check

pytestmark = pytest.mark.kafka

NODE = "node-a"
CT_BASE = 1_763_800_000_000_000_000
T0 = int(time.time() * 1000) - 3_600_000     # event times an hour ago


def make_records(connections: int, lost_reports: int) -> list[dict]:
    """CREATE, UPDATE, SNAPSHOT, DESTROY for each connection (v4 and v6 in
    turn), then LOST reports; every dedupe key distinct."""
    records = []
    for i in range(connections):
        family = 4 if i % 2 == 0 else 6
        base = {
            "schemaVersion": wire.SCHEMA_VERSION, "nodeId": NODE, "ctId": CT_BASE + i,
            "sourceTransportPort": 10_000 + i, "destinationTransportPort": 443,
            "protocolIdentifier": 6 if i % 3 else 17, "vlanId": i % 4096,
            "assured": True, "missedEvents": 0, "retries": 0,
            "tcpControlBits": 0x12, "reverseTcpControlBits": 0x12,
            "flowStartMilliseconds": T0 + i,
        }
        if family == 4:
            base |= {"sourceIPv4Address": f"198.18.{i // 250}.{i % 250 + 1}",
                     "destinationIPv4Address": "198.19.0.1"}
        else:
            base |= {"sourceIPv6Address": f"2001:2::{i:x}", "destinationIPv6Address": "2001:2:0:1::1"}
        for seq, event_type in enumerate(("CREATE", "UPDATE", "SNAPSHOT", "DESTROY"), start=1):
            records.append(base | {
                "eventType": event_type, "seq": seq,
                "tcpState": None if base["protocolIdentifier"] == 17 else "ESTABLISHED",
                "initiatorPackets": seq * 10, "responderPackets": seq * 9,
                "initiatorOctets": seq * 1_500 + i, "responderOctets": seq * 64_000 + i,
                "flowEndMilliseconds": base["flowStartMilliseconds"] + seq * 1_000,
                "observationTimeMilliseconds": base["flowStartMilliseconds"] + seq * 1_000,
                "flowEndReason": (1 + i % 5) if event_type == "DESTROY" else None,
            })
    for n in range(1, lost_reports + 1):
        records.append({
            "schemaVersion": wire.SCHEMA_VERSION, "eventType": "LOST", "nodeId": NODE,
            "ctId": 0, "seq": n, "observationTimeMilliseconds": T0 + n * 10_000,
            "lost": {"ring_full": n, "table_full": 0, "untracked_packets": 2 * n,
                     "untracked_bytes": 128 * n, "early_drops": 0, "destroy_retries": n},
        })
    return records


def record_key(record: dict) -> bytes:
    # All events of one connection share a key, hence a partition and an order.
    return f"{record['nodeId']}/{record['ctId']}".encode()


async def test_produce_and_consume_1000_records(kafka_broker):
    topic, partitions = "ctstream.events.roundtrip", 3
    kafka_broker.topic_create(topic, partitions)
    records = make_records(connections=249, lost_reports=4)
    assert len(records) == 1000
    for r in records:
        wire.validate(r)  # the test's own data must be valid to mean anything

    producer = aiokafka.AIOKafkaProducer(
        bootstrap_servers=kafka_broker.bootstrap, acks="all", enable_idempotence=True,
        linger_ms=5)
    await producer.start()
    try:
        assert await producer.partitions_for(topic) == set(range(partitions))
        futures = [
            await producer.send(topic, wire.encode(r), key=record_key(r), headers=[wire.HEADER])
            for r in records
        ]
        metas = await asyncio.wait_for(asyncio.gather(*futures), timeout=60)
    finally:
        await producer.stop()
    assert {m.partition for m in metas} == set(range(partitions))
    assert sum(1 for m in metas if m.offset >= 0) == 1000

    consumer = aiokafka.AIOKafkaConsumer(
        topic, bootstrap_servers=kafka_broker.bootstrap, group_id=None,
        auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    got = []
    try:
        async with asyncio.timeout(60):
            while len(got) < len(records):
                batch = await consumer.getmany(timeout_ms=1000)
                for messages in batch.values():
                    got.extend(messages)
        # Nothing beyond the 1,000 (no duplicates from the idempotent producer).
        extra = await consumer.getmany(timeout_ms=1000)
        assert sum(len(m) for m in extra.values()) == 0
    finally:
        await consumer.stop()

    sent = {wire.dedupe_key(r): r for r in records}
    received = {}
    last_seq = defaultdict(int)
    for message in got:
        assert dict(message.headers) == {wire.HEADER[0]: wire.HEADER[1]}
        record = wire.validate(wire.decode(message.value))
        assert message.key == record_key(record)
        key = wire.dedupe_key(record)
        assert key not in received, f"duplicate {key}"
        received[key] = record
        if record["eventType"] != "LOST":
            assert record["seq"] > last_seq[record["ctId"]], "events of a connection out of order"
            last_seq[record["ctId"]] = record["seq"]
    assert received == sent


async def test_auto_topic_creation_is_off(kafka_broker):
    topic = "ctstream.never.created"
    producer = aiokafka.AIOKafkaProducer(
        bootstrap_servers=kafka_broker.bootstrap, request_timeout_ms=3000)
    await producer.start()
    try:
        # aiokafka gives up with one or the other, depending on its timing.
        with pytest.raises((UnknownTopicOrPartitionError, KafkaTimeoutError)):
            await producer.send_and_wait(topic, b"x")
    finally:
        await producer.stop()
    listed = kafka_sh("topic", "list", "--dir", str(kafka_broker.directory))
    assert listed.returncode == 0, listed.stderr
    assert topic not in listed.stdout.split()


def test_status_of_running_broker(kafka_broker):
    result = kafka_sh("status", "--dir", str(kafka_broker.directory))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"bootstrap {kafka_broker.bootstrap}, ready" in result.stdout
    assert kafka_broker.bootstrap == f"127.0.0.1:{kafka_broker.port}"
    assert len(broker_pids(kafka_broker.directory)) == 1


def test_listens_on_127_0_0_1_only(kafka_broker):
    # All of 127/8 is local: a wildcard or other-address listener would
    # answer on 127.0.0.2 too. Both the broker and the controller port.
    for port in (kafka_broker.port, kafka_broker.port + 1):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) == 0
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.2", port)) != 0, f"port {port} answers beyond 127.0.0.1"


def test_start_refuses_a_port_in_use(tmp_path):
    port = free_port_pair()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        result = kafka_sh("start", "--dir", str(tmp_path), "--port", str(port), "--timeout", "30")
    assert result.returncode != 0
    assert f"port 127.0.0.1:{port} is already in use" in result.stderr
    assert result.stdout == ""
    assert broker_pids(tmp_path) == []
    assert not (tmp_path / "kafka.pid").exists()


def test_start_reports_a_broker_that_cannot_bind(tmp_path):
    # Bound but not listening: the pre-check cannot see it, the broker fails
    # to bind and exits; kafka.sh must say why and leave nothing running.
    port = free_port_pair()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        result = kafka_sh("start", "--dir", str(tmp_path), "--port", str(port), "--timeout", "60")
    assert result.returncode != 0
    assert "exited" in result.stderr and "before it was ready" in result.stderr
    assert "Address already in use" in result.stderr
    assert broker_pids(tmp_path) == []
    assert not (tmp_path / "kafka.pid").exists()


def test_start_stop_leave_nothing_behind(tmp_path):
    directory = tmp_path.resolve()
    port = free_port_pair()
    try:
        t0 = time.monotonic()
        result = kafka_sh("start", "--dir", str(directory), "--port", str(port))
        elapsed = time.monotonic() - t0
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"127.0.0.1:{port}"
        print(f"kafka.sh start took {elapsed:.1f}s")
        pids = broker_pids(directory)
        assert len(pids) == 1
        assert (directory / "kafka.pid").read_text().strip() == str(pids[0])
        # A second start in the same dir finds it running and says so.
        again = kafka_sh("start", "--dir", str(directory), "--port", str(port))
        assert again.returncode == 0 and "already running" in again.stderr
        assert broker_pids(directory) == pids
    finally:
        stop_and_check(directory)
    assert not (directory / "kafka.pid").exists()
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0, "port still open after stop"
    # Idempotent: stopping again is fine, status says not running.
    assert kafka_sh("stop", "--dir", str(directory)).returncode == 0
    status = kafka_sh("status", "--dir", str(directory))
    assert status.returncode == 3 and "not running" in status.stdout
