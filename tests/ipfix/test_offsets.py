"""At least once, with a real broker and real IPFIX readers: the exporter's
Kafka offsets are committed only after the collector has the batch.

Records are made as the datapath would report them (tests/accounting's
Flow: records.record_of, CREATE, UPDATE, DESTROY) and sent with the
project's producer; the topic is then read back with its offsets, so that
each DESTROY is known by (partition, offset).

- An exporter SIGKILLed between a batch's export and its commit (the
  after_export seam of streamer.export.exporter.export) committed nothing;
  the next exporter of the group sends that batch again and then the rest:
  nfcapd holds the killed batch's DESTROYs twice and every other once.
- A TCP collector that resets the connection in the middle of a batch
  (and keeps its receive window small, so the exporter cannot have the
  batch acknowledged while it does not read): the exporter exits with one
  line, and every committed offset is covered by what the collector read.
  The next exporter sends exactly the DESTROYs from the committed offsets
  on; libfixbuf's ipfixDump reads every field of every one of them back.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import aiokafka
import pytest
from aiokafka.structs import TopicPartition

from tests.accounting.support import Flow, encoded, produce_sync
from tests.ipfix.support import (TcpCollector, compare_multisets, dumped_fields,
                                 expected_fields, expected_nfdump, ipfix_dump, nfdump_key)
from tests.kafka.pipeline_support import Message, read_topic

pytestmark = [pytest.mark.kafka, pytest.mark.collector]

ROOT = Path(__file__).resolve().parents[2]
CTSTREAM = str(Path(sys.executable).with_name("ctstream"))
PARTITIONS = 3
PROTOS = ("tcp", "udp", "icmp")


def make_flows(n: int) -> list[Flow]:
    """n flows, v4 and v6, TCP, UDP and ICMP, each with its own end time (an
    ICMP flow is exported without ports: the times tell flows apart)."""
    end = int(time.time() * 1000)
    out = []
    for i in range(n):
        v6 = i % 2 == 1
        proto = PROTOS[i % 3]
        out.append(Flow(node="gw-ipfix", ct_id=9_000_000 + i, family=6 if v6 else 4, proto=proto,
                        src=f"2001:2::{i % 7 + 1:x}" if v6 else f"198.18.0.{i % 7 + 1}",
                        dst=f"2001:2:0:1::{i % 3 + 1:x}" if v6 else f"198.19.0.{i % 3 + 1}",
                        sport=20_000 + i, dport={"udp": 53, "icmp": 20_000 + i}.get(proto, 443),
                        end_ms=end - i, events=3))
    return out


def topic_of(broker, flows: list[Flow]) -> tuple[str, list[Message]]:
    topic = f"ctstream.ipfix.{uuid.uuid4().hex[:12]}"
    broker.topic_create(topic, PARTITIONS)
    produce_sync(broker.bootstrap, topic, encoded([e for f in flows for e in f.all_events()]))
    return topic, read_topic(broker.bootstrap, topic, PARTITIONS)


def destroys(messages: list[Message]) -> list[Message]:
    return [m for m in messages if m.record["eventType"] == "DESTROY"]


def committed(bootstrap: str, topic: str, group: str) -> dict[int, int]:
    """The group's committed offset of each partition (0 where none)."""
    async def read() -> dict[int, int]:
        consumer = aiokafka.AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group,
                                             enable_auto_commit=False)
        await consumer.start()
        try:
            return {p: await consumer.committed(TopicPartition(topic, p)) or 0
                    for p in range(PARTITIONS)}
        finally:
            await consumer.stop()
    return asyncio.run(read())


def end_offsets(messages: list[Message]) -> dict[int, int]:
    ends = dict.fromkeys(range(PARTITIONS), 0)
    for m in messages:
        ends[m.partition] = max(ends[m.partition], m.offset + 1)
    return ends


def ipfix_argv(broker, topic: str, group: str, collector: str, *extra: str) -> list[str]:
    return [CTSTREAM, "ipfix", "--kafka", broker.bootstrap, "--topic", topic, "--group", group,
            "--collector", collector, "--session-timeout", "6", "--until-idle", "2", *extra]


def run(argv: list[str], timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=timeout)


# The exporter that dies between export and commit: the seam writes the
# offsets it was about to commit, then the process SIGKILLs itself. Small
# batches, so that the killed batch is a part of the topic.
KILLED_EXPORTER = """
import asyncio, json, os, signal, sys
from streamer.delivery.kafka_settings import KafkaSettings
from streamer.export import exporter
from streamer.export.collector import CollectorAddress

bootstrap, topic, collector, group, out = sys.argv[1:]
exporter.BATCH_RECORDS["udp"] = 40

async def die(ends):
    with open(out, "w") as f:
        json.dump(ends, f)
        f.flush()
        os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(exporter.export(KafkaSettings(bootstrap=bootstrap, topic=topic),
                            CollectorAddress.parse(collector, "udp"), group=group,
                            session_timeout_s=6, after_export=die))
"""


def test_killed_between_export_and_commit_the_batch_is_exported_again(kafka_broker, nfcapd,
                                                                      tmp_path):
    topic, messages = topic_of(kafka_broker, make_flows(120))
    group = f"ctstest-ipfix-{uuid.uuid4().hex[:8]}"
    ends_file = tmp_path / "killed-batch.json"
    killed = run([sys.executable, "-c", KILLED_EXPORTER, kafka_broker.bootstrap, topic,
                  nfcapd.address, group, str(ends_file)])
    assert killed.returncode == -9, killed.stderr
    batch_ends = {int(p): end for p, end in json.loads(ends_file.read_text()).items()}
    assert committed(kafka_broker.bootstrap, topic, group) == dict.fromkeys(range(PARTITIONS), 0)

    again = run(ipfix_argv(kafka_broker, topic, group, nfcapd.address))
    assert again.returncode == 0, again.stderr
    assert committed(kafka_broker.bootstrap, topic, group) == end_offsets(messages)
    nfcapd.stop()

    # A fresh group starts at the beginning: the killed batch is the first
    # records of its partitions.
    twice = [m for m in destroys(messages) if m.offset < batch_ends.get(m.partition, 0)]
    assert 0 < len(twice) < len(destroys(messages)), batch_ends
    print(f"\nkilled batch: offsets up to {batch_ends}, {len(twice)} of "
          f"{len(destroys(messages))} DESTROYs exported twice")
    expected = Counter(expected_nfdump(m.record) for m in destroys(messages) + twice)
    compare_multisets(expected, Counter(nfdump_key(f) for f in nfcapd.flows()), "nfcapd")
    assert f"exported {len(destroys(messages))} DESTROYs" in again.stderr, again.stderr


def test_a_collector_reset_mid_batch_commits_only_what_it_read(kafka_broker, tmp_path):
    topic, messages = topic_of(kafka_broker, make_flows(3000))
    group = f"ctstest-ipfix-{uuid.uuid4().hex[:8]}"
    by_offset = {(m.partition, m.offset): m for m in destroys(messages)}

    resetting = TcpCollector(reset_after=2, rcvbuf=4096)   # the templates and one data message
    resetting.start()
    try:
        failed = run(ipfix_argv(kafka_broker, topic, group, resetting.address,
                                "--transport", "tcp"))
    finally:
        resetting.close()
    assert failed.returncode == 1, failed.stderr
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ctstream: error: ") \
        and f"IPFIX collector at {resetting.address} over TCP" in lines[0], lines
    (tmp_path / "reset.ipfix").write_bytes(resetting.stream())
    read_first, _, _ = ipfix_dump(tmp_path / "reset.ipfix")

    after_reset = committed(kafka_broker.bootstrap, topic, group)
    covered = Counter(expected_fields(m.record) for (p, off), m in by_offset.items()
                      if off < after_reset[p])
    assert not covered - Counter(dumped_fields(r) for r in read_first), \
        f"offsets {after_reset} committed past what the collector read"
    assert after_reset != end_offsets(messages) and len(read_first) < len(by_offset)
    print(f"\nreset mid-batch: collector read {len(read_first)} of {len(by_offset)} DESTROYs; "
          f"committed {after_reset} of {end_offsets(messages)}")

    healthy = TcpCollector()
    healthy.start()
    try:
        done = run(ipfix_argv(kafka_broker, topic, group, healthy.address, "--transport", "tcp",
                              "--observation-domain", "77"))
    finally:
        healthy.close()
    assert done.returncode == 0, done.stderr
    assert healthy.error is None, healthy.error
    (tmp_path / "healthy.ipfix").write_bytes(healthy.stream())
    records, headers, warnings = ipfix_dump(tmp_path / "healthy.ipfix")
    rest = [m for (p, off), m in by_offset.items() if off >= after_reset[p]]
    compare_multisets(Counter(expected_fields(m.record) for m in rest),
                      Counter(dumped_fields(r) for r in records), "ipfixDump")
    assert "out of sequence" not in warnings, warnings
    assert {h["domain"] for h in headers} == {77}
    assert headers[0]["sequence"] == 0 and len(headers) >= 2
    assert committed(kafka_broker.bootstrap, topic, group) == end_offsets(messages)
