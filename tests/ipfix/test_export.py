"""The whole way to an existing collector: real TCP, UDP and ICMP traffic over
IPv4 and IPv6 between two namespaces, `ctstream run` on the server's veth
shipping to a real broker, then `ctstream ipfix` sending the topic's
DESTROYs over UDP to Debian's nfcapd, and `nfdump -o json` reading what
nfcapd stored.

Every DESTROY record of the topic (read back from its beginning, each
validated against the schema) must be in nfdump's output, as often as it is
in the topic, with the same addresses, ports (ICMP: the echo request's
type/code), protocol, packets and bytes per direction, TCP flags, first
and last time and VLAN; nfcapd must count no sequence error and no bad
packet.
"""

from __future__ import annotations

import subprocess
import uuid
from collections import Counter

import pytest

from tests.ipfix.support import compare_multisets, expected_nfdump, family_of, nfdump_key
from tests.kafka.pipeline_support import (TopicContents, check_topic, make_pipeline, pipeline,
                                          read_topic)
from tests.netns.test_cli import CTSTREAM
from tests.netns.test_reliability import TCP_PORT, wait_drained

PAIR_INDEX = 17          # 198.18.17.0/24, 2001:2:0:11::/64: no other test's
PARTITIONS = 3
DRAIN_TIMEOUT = 60       # bounds, not measurements
# (family, protocol) of every kind of flow the traffic makes.
KINDS = {(4, 6), (4, 17), (4, 1), (6, 6), (6, 17), (6, 58)}


def traffic(pair) -> dict[int, list[int]]:
    """Short and bulk TCP, UDP and ICMP echo over both families; the client
    ports of the short connections by family."""
    ports = {}
    for fam in (4, 6):
        ports[fam] = pair.tcp_many(10, family=fam, port=TCP_PORT, concurrency=4)
        pair.tcp_exchange(20_000, 200_000, family=fam)
        pair.udp_exchange(3, 200, family=fam)
        pair.ping(3, family=fam)
    return ports


@pipeline
@pytest.mark.collector
def test_every_destroy_is_in_nfdump_with_its_counters(pin_dir, tmp_path, kafka_broker, nfcapd):
    node = f"ctstest-{uuid.uuid4().hex[:8]}"
    topic = f"ctstream.ipfix.{uuid.uuid4().hex[:12]}"
    kafka_broker.topic_create(topic, PARTITIONS)
    with make_pipeline(pin_dir, tmp_path, PAIR_INDEX, node) as pipe:
        daemon = pipe.start(kafka_broker.bootstrap, topic)
        ports = traffic(pipe.pair)
        wait_drained(pipe.pin, DRAIN_TIMEOUT)
        pipe.wait_spool_drained(DRAIN_TIMEOUT)
        rc, _ = daemon.terminate(timeout=60)
        assert rc == 0, daemon.output()[-3000:]
    contents = TopicContents(read_topic(kafka_broker.bootstrap, topic, PARTITIONS))
    check_topic(contents, node)
    destroys = [m.record for m in contents.flow_records if m.record["eventType"] == "DESTROY"]
    assert {(family_of(r), r["protocolIdentifier"]) for r in destroys} == KINDS

    res = subprocess.run([CTSTREAM, "ipfix", "--kafka", kafka_broker.bootstrap, "--topic", topic,
                          "--collector", nfcapd.address, "--group", f"{node}-ipfix",
                          "--session-timeout", "6", "--until-idle", "2"],
                         capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=90)
    assert res.returncode == 0, res.stderr
    nfcapd.stop()
    flows = nfcapd.flows()

    compare_multisets(Counter(expected_nfdump(r) for r in destroys),
                      Counter(nfdump_key(f) for f in flows), "nfdump")
    assert nfcapd.stats() == {"flows": len(destroys), "sequence_errors": 0, "bad_packets": 0}
    for fam, sports in ports.items():
        key = "src4_addr" if fam == 4 else "src6_addr"
        seen = {f["src_port"] for f in flows if key in f and f["proto"] == 6}
        assert set(sports) <= seen, f"IPv{fam}: short connections missing in nfdump"
    assert f"exported {len(destroys)} DESTROYs" in res.stderr, res.stderr
    print(f"\nipfix: {len(destroys)} DESTROYs of {len(contents.messages)} records, all in nfdump "
          f"({dict(Counter((family_of(r), r['protocolIdentifier']) for r in destroys))})")
