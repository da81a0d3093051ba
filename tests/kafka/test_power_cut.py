"""A power cut after the kernel's ack: the spool's fdatasync is what keeps
the DESTROYs.

`ctstream run` spools to a crashfs (tests/crashfs.py) while its Kafka
bootstrap answers nobody, so every batch goes to the spool and its DESTROYs
are acked to the kernel's outbox once spooled. Real short TCP connections
(IPv4 and IPv6) run through it until every one has ended and the outbox is
empty: from then on the kernel has forgotten them, and the spool on disk is
their only copy. The daemon is SIGKILLed and the power is cut (crashfs
drops everything no sync covered); the same spool directory comes back,
and a new `ctstream run` on the same pin dir, with the real broker, drains
it. Every connection must have its DESTROY in Kafka with the kernel's own
counters. Without the fdatasync in Spool.sync this fails: the page cache
held the spool, and it went with the power.

Timeouts here are bounds, never measurements.
"""

from __future__ import annotations

import re
import uuid

import pytest

from tests.crashfs import crash_mount
from tests.kafka.conftest import free_port_pair
from tests.kafka.pipeline_support import (
    TopicContents,
    check_tcp_connections,
    check_topic,
    make_pipeline,
    read_topic,
    report,
)
from tests.netns.test_reliability import TCP_PORT, kernel_flows, wait_drained

pytestmark = [pytest.mark.root, pytest.mark.kafka]

PAIR_INDEX = 27            # 198.18.27.0/24, 2001:2:0:1b::/64
PARTITIONS = 3
CONNECTIONS = {4: 150, 6: 50}
TRAFFIC_TIMEOUT = 30       # bound on each batch of connections
ENDED_TIMEOUT = 30         # bound on every connection ending and its DESTROY being acked
DRAIN_TIMEOUT = 60         # bound on the spool reaching Kafka once the broker answers
STOP_TIMEOUT = 30


@pytest.fixture
def disk(tmp_path):
    """The crashfs the spool lives on; cut and unmounted after the pipeline's
    own cleanup (pipe depends on it), so that no daemon outlives the mount."""
    with crash_mount(tmp_path / "disk", tmp_path / "mnt") as fs:
        yield fs


@pytest.fixture
def pipe(disk, pin_dir, tmp_path):
    with make_pipeline(pin_dir, tmp_path, PAIR_INDEX, f"ctspower-{uuid.uuid4().hex[:8]}") as p:
        p.spool = disk.path / "spool"
        yield p


def test_power_cut_after_the_ack_loses_no_spooled_destroy(pipe, disk, kafka_broker):
    pair = pipe.pair
    topic = f"ctstream.powercut.{uuid.uuid4().hex[:12]}"
    kafka_broker.topic_create(topic, PARTITIONS)

    first = pipe.start(f"127.0.0.1:{free_port_pair()}", topic)
    ports = {fam: pair.tcp_many(n, family=fam, port=TCP_PORT, concurrency=8,
                                timeout=TRAFFIC_TIMEOUT)
             for fam, n in CONNECTIONS.items()}
    connections = sum(len(p) for p in ports.values())
    ended = wait_drained(pipe.pin, timeout=ENDED_TIMEOUT)
    spooled = pipe.status()
    # The kernel has forgotten every connection: only the spool has them.
    assert ended["created"] == ended["destroyed"] == connections, ended
    assert ended["outbox"] == 0 and ended["acked"] >= connections, ended
    assert not spooled["kafka_connected"] and spooled["spool_records"] >= connections, spooled

    first.kill()                 # SIGKILL: the page cache would survive this alone ...
    disk.cut()                   # ... but not the power cut
    disk.remount()

    second = pipe.start(kafka_broker.bootstrap, topic)
    final = pipe.wait_spool_drained(DRAIN_TIMEOUT)
    log = second.output()
    kernel = kernel_flows(pair)
    rc, _ = second.terminate(timeout=STOP_TIMEOUT)
    assert rc == 0, second.output()[-3000:]

    contents = TopicContents(read_topic(kafka_broker.bootstrap, topic, PARTITIONS))
    figures = check_topic(contents, pipe.node_id)
    for fam, fam_ports in ports.items():
        check_tcp_connections(contents, pair, fam, fam_ports, TCP_PORT, kernel)
    assert figures["connections"] == connections, "DESTROYs of connections nobody made"
    # They came from the spool (the kernel had nothing left to send again).
    assert re.search(r"holds \d+ record\(s\) not yet in Kafka: draining them first", log), log
    assert final["sent_from_spool"] >= connections, final
    report("power cut", {"connections": connections, "spooled_at_cut": spooled["spool_records"],
                         "sent_from_spool": final["sent_from_spool"], **figures})
    for d in pipe.daemons:
        assert "Traceback" not in d.output(), d.output()[-3000:]
