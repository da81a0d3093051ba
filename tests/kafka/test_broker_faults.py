"""The broker fails in ways a clean stop does not show: it hangs (SIGSTOP:
its sockets stay open and take requests, nothing answers) for 30 s, or it
is SIGKILLed and started again later on the same port and directory.
Meanwhile `ctstream run` tracks real short TCP connections on a test-bed
pair; afterwards every connection has exactly one logical DESTROY in Kafka
with the kernel's counters, each connection's events are in order in its
partition, and the daemon never exited.

The hang has a risk of its own. The live send that is out when the broker
stops sits in the broker's socket buffer; the producer gives up on it after
--kafka-timeout, the batch is spooled, and after the broker resumes a new
producer (a new idempotent producer id) drains the spool. The old request
is still in the broker: it may be appended then, before or after what the
drain sent. Kafka fences nothing here (no transactional.id), so only the
order check (pipeline_support.check_partition_order, unsorted, in offset
order) can tell whether such a late append put a connection's events out of
order; `producer_runs` reads the partitions' log files to say which
producer wrote what, and when.

Timeouts here are bounds, never measurements.
"""

from __future__ import annotations

import os
import re
import signal
import struct
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from streamer.delivery.producer import partition_of
from streamer.delivery.records import message_key
from tests.kafka.conftest import broker_pids
from tests.kafka.pipeline_support import (
    pipeline,
    Message,
    PrivateBroker,
    TopicContents,
    check_partition_order,
    check_tcp_connections,
    check_topic,
    make_pipeline,
    private_broker,
    read_topic,
    report,
)
from tests.netns.test_reliability import TCP_PORT, Generator, kernel_flows, wait_drained


PARTITIONS = 3
PAIR_INDEX = 31           # 198.18.31.0/24, 2001:2:0:1f::/64: no other test's
V6_PORT = TCP_PORT + 1    # IPv6 connections during the fault, on their own listener
HANG_S = 30               # the broker SIGSTOPped this long
DEAD_S = 10               # no broker process this long after the SIGKILL
DRAIN_TIMEOUT = 60        # bound on emptying the spool once the broker answers again
BATCH = 50                # connections per generator batch (one batch per 0.8 s at most)


@pytest.fixture
def pipe(pin_dir, tmp_path):
    with make_pipeline(pin_dir, tmp_path, PAIR_INDEX, f"ctsfault-{uuid.uuid4().hex[:8]}") as p:
        yield p


def new_topic(broker: PrivateBroker) -> str:
    name = f"ctstream.faults.{uuid.uuid4().hex[:12]}"
    broker.topic_create(name, PARTITIONS)
    return name


def broker_pid(broker: PrivateBroker) -> int:
    pids = broker_pids(broker.directory)
    assert len(pids) == 1, f"broker processes in {broker.directory}: {pids}"
    return pids[0]


def stop_cleanly(daemon) -> None:
    assert daemon.proc.poll() is None, f"the daemon exited: {daemon.output()[-3000:]}"
    rc, _ = daemon.terminate(timeout=60)
    assert rc == 0, daemon.output()[-3000:]


def assert_no_traceback(pipe) -> None:
    for d in pipe.daemons:
        out = d.output()
        at = out.find("Traceback")
        assert at < 0, f"{d.log.name}: a traceback in the daemon's log:\n{out[max(0, at - 300):at + 1500]}"


def sample_for(pipe, seconds: float) -> list[dict]:
    """`ctstream status` once a second for `seconds`."""
    samples, start = [], time.monotonic()
    while time.monotonic() - start < seconds:
        samples.append(pipe.status())
        time.sleep(1)
    return samples


# --- which producer wrote what: the partitions' log files ---------------------------------

# A v2 record batch header (Kafka's DefaultRecordBatch), big-endian: base
# offset, length (of what follows it), partition leader epoch, magic, crc,
# attributes, last offset delta, base and max timestamp, producer id and
# epoch, base sequence, record count.
BATCH_HEADER = struct.Struct(">qiibIhiqqqhii")


@dataclass(frozen=True)
class LogBatch:
    partition: int
    base_offset: int
    count: int
    producer_id: int
    base_sequence: int
    max_timestamp_ms: int


def log_batches(broker_dir: Path, topic: str, partition: int) -> list[LogBatch]:
    """Every record batch of one partition, from the broker's log segments."""
    out = []
    for seg in sorted((broker_dir / "data" / f"{topic}-{partition}").glob("*.log")):
        data, pos = seg.read_bytes(), 0
        while len(data) - pos >= BATCH_HEADER.size:
            (base, length, _, magic, _, _, _, _, max_ts, pid, _, seq,
             count) = BATCH_HEADER.unpack_from(data, pos)
            if length <= 0 or pos + 12 + length > len(data):
                break
            assert magic == 2, f"{seg}: byte {pos}: record batch magic {magic}"
            out.append(LogBatch(partition, base, count, pid, seq, max_ts))
            pos += 12 + length
    return out


def producer_runs(broker_dir: Path, topic: str) -> dict[int, list[tuple[int, int, int]]]:
    """Per partition, runs of consecutive batches of one producer id, in
    offset order: (producer id, first offset, records)."""
    runs = {}
    for p in range(PARTITIONS):
        rs: list[list[int]] = []
        for b in log_batches(broker_dir, topic, p):
            if rs and rs[-1][0] == b.producer_id:
                rs[-1][2] += b.count
            else:
                rs.append([b.producer_id, b.base_offset, b.count])
        runs[p] = [tuple(r) for r in rs]
    return runs


def older_after_newer(runs: dict[int, list[tuple[int, int, int]]]) -> list[tuple[int, int, int, int]]:
    """Batches of a producer that came after another producer had written to
    the partition: (partition, producer id, first offset, records). Producer
    ids grow, so these are requests of a producer that had given up,
    appended after a newer producer's records."""
    late = []
    for p, rs in runs.items():
        for i, (pid, first, n) in enumerate(rs):
            if any(later_pid > pid for later_pid, _, _ in rs[:i]):
                late.append((p, pid, first, n))
    return late


def figures_of_the_fault(contents: TopicContents, runs: dict, fault_ms: int) -> dict:
    """How the fault shows in the topic: producer ids per partition, the
    stale batches (older producer after a newer one), and the records of
    the first producer made after the fault began (its request that was out
    then, appended when the broker answered again)."""
    first_pid = min(pid for rs in runs.values() for pid, _, _ in rs)
    by_offset = {(m.partition, m.offset): m for m in contents.messages}
    stale_of_first = 0
    for p, rs in runs.items():
        for pid, first, n in rs:
            if pid != first_pid:
                continue
            stale_of_first += sum(
                1 for off in range(first, first + n)
                if (m := by_offset.get((p, off))) is not None
                and m.record["observationTimeMilliseconds"] >= fault_ms)
    return {"producers_per_partition": {p: len({pid for pid, _, _ in rs}) for p, rs in runs.items()},
            "older_producer_after_newer": older_after_newer(runs),
            "first_producer_records_made_after_fault": stale_of_first}


def check_every_connection(pipe, contents, kernel, ports, v6, st) -> tuple[dict, int]:
    """After a fault: the topic holds what any topic must (check_topic, the
    partition order included), every connection made has its one DESTROY
    with the kernel's counters, and the table ended them all."""
    pair = pipe.pair
    figures = check_topic(contents, pipe.node_id)
    assert len(set(ports)) == len(ports), "the client reused a source port: connections ambiguous"
    check_tcp_connections(contents, pair, 4, ports, TCP_PORT, kernel)
    check_tcp_connections(contents, pair, 6, v6, V6_PORT, kernel)
    connections = len(ports) + len(v6)
    assert figures["connections"] == connections, "DESTROYs of connections nobody made"
    assert st["created"] == st["destroyed"] == connections and st["outbox"] == 0, st
    return figures, connections


# --- 1. the broker hangs for 30 s ---------------------------------------------------------


@pipeline
def test_broker_hung_for_30s_loses_no_destroy_and_keeps_order(pipe, tmp_path):
    """SIGSTOP the broker for 30 s under traffic, then SIGCONT. Meanwhile the
    live send out at that moment times out, the daemon spools and still acks
    DESTROYs to the kernel, and status says disconnected; afterwards the
    spool drains, every connection has one DESTROY with the kernel's
    counters, each connection's events are in partition order (the stale
    request of the first producer cannot have broken it), the daemon never
    exited."""
    pair = pipe.pair
    with private_broker(tmp_path / "broker") as broker:
        broker.start()
        topic = new_topic(broker)
        daemon = pipe.start(broker.bootstrap, topic)
        gen = Generator(pair, batch=BATCH)
        gen.start()
        try:
            before = pipe.wait_status("records acked by Kafka",
                                      lambda st: st["kafka_acked"] > 0 and gen.ports, 30)
            assert before["kafka_connected"] and before["spool_records"] == 0, before
            pid = broker_pid(broker)
            stats_at_hang = pipe.stats()
            os.kill(pid, signal.SIGSTOP)
            fault_ms = time.time_ns() // 1_000_000
            try:
                v6 = pair.tcp_many(50, family=6, port=V6_PORT, concurrency=8, timeout=30)
                samples = sample_for(pipe, HANG_S)
                stats_end_of_hang = pipe.stats()
                assert broker_pids(broker.directory) == [pid], "the hung broker went away"
            finally:
                os.kill(pid, signal.SIGCONT)
            assert gen.is_alive(), f"traffic stopped: {gen.error!r}"
            drained = pipe.wait_status("the spool drained after the broker resumed",
                                       lambda st: st["kafka_connected"] and st["spool_records"] == 0,
                                       DRAIN_TIMEOUT)
            time.sleep(3)   # live again, under traffic
        finally:
            ports = gen.finish()
        st = wait_drained(pipe.pin, timeout=60)
        final = pipe.wait_spool_drained(DRAIN_TIMEOUT)
        kernel = kernel_flows(pair)
        stop_cleanly(daemon)
        contents = TopicContents(read_topic(broker.bootstrap, topic, PARTITIONS))
        runs = producer_runs(broker.directory, topic)

    # The hang was felt: the live send timed out, the daemon went on spooling
    # and acking DESTROYs to the kernel once spooled.
    assert all(s["daemon_running"] for s in samples), samples[-1]
    down = [s for s in samples if not s["kafka_connected"]]
    assert down, f"status never said disconnected in {HANG_S} s of a hung broker: {samples[-1]}"
    assert all(s["kafka_error"] for s in down[1:]), down
    # A live send was out in the hung broker when the producer gave up on it:
    # the request that may be appended late.
    assert any("did not acknowledge" in s["kafka_error"] for s in down[1:]), \
        f"no live send timed out in the hang: {[s['kafka_error'] for s in down]}"
    depth = [s["spool_records"] for s in down]
    assert depth == sorted(depth) and depth[0] < depth[-1], depth
    assert stats_end_of_hang["acked"] > stats_at_hang["acked"], (stats_at_hang, stats_end_of_hang)
    assert final["kafka_error"] is None and final["sent_from_spool"] >= depth[-1], final
    assert final["sent_live"] > drained["sent_live"], (drained, final)

    figures, connections = check_every_connection(pipe, contents, kernel, ports, v6, st)
    fault = figures_of_the_fault(contents, runs, fault_ms)
    assert all(n >= 2 for n in fault["producers_per_partition"].values()), \
        f"no new producer after the hang: {runs}"
    report("broker hung", {"connections": connections, **figures, **fault,
                           "spool_peak": depth[-1], "sent_from_spool": final["sent_from_spool"],
                           "sent_live": final["sent_live"], "producer_runs": runs})
    assert_no_traceback(pipe)


# --- 2. the broker SIGKILLed -----------------------------------------------------------


@pipeline
def test_broker_sigkilled_and_restarted_loses_no_destroy_and_keeps_order(pipe, tmp_path):
    """SIGKILL the broker under traffic (no clean shutdown: its log is
    recovered at the next start), 10 s without it, then start it again on
    the same port and directory: the spool drains, every connection has one
    DESTROY with the kernel's counters, each connection's events are in
    partition order, the daemon never exited."""
    pair = pipe.pair
    with private_broker(tmp_path / "broker") as broker:
        broker.start()
        topic = new_topic(broker)
        daemon = pipe.start(broker.bootstrap, topic)
        gen = Generator(pair, batch=BATCH)
        gen.start()
        try:
            pipe.wait_status("records acked by Kafka",
                             lambda st: st["kafka_acked"] > 0 and gen.ports, 30)
            pid = broker_pid(broker)
            stats_at_kill = pipe.stats()
            os.kill(pid, signal.SIGKILL)
            fault_ms = time.time_ns() // 1_000_000
            deadline = time.monotonic() + 10
            while broker_pids(broker.directory):
                assert time.monotonic() < deadline, "the SIGKILLed broker is still there"
                time.sleep(0.05)
            v6 = pair.tcp_many(50, family=6, port=V6_PORT, concurrency=8, timeout=30)
            samples = sample_for(pipe, DEAD_S)
            stats_end_of_outage = pipe.stats()
            assert gen.is_alive(), f"traffic stopped: {gen.error!r}"
            broker.start()
            drained = pipe.wait_status("the spool drained after the restart",
                                       lambda st: st["kafka_connected"] and st["spool_records"] == 0,
                                       DRAIN_TIMEOUT)
            time.sleep(3)
        finally:
            ports = gen.finish()
        st = wait_drained(pipe.pin, timeout=60)
        final = pipe.wait_spool_drained(DRAIN_TIMEOUT)
        kernel = kernel_flows(pair)
        stop_cleanly(daemon)
        contents = TopicContents(read_topic(broker.bootstrap, topic, PARTITIONS))
        runs = producer_runs(broker.directory, topic)

    assert all(s["daemon_running"] for s in samples), samples[-1]
    down = [s for s in samples if not s["kafka_connected"]]
    assert down, f"status never said disconnected in {DEAD_S} s without a broker: {samples[-1]}"
    depth = [s["spool_records"] for s in down]
    assert depth == sorted(depth) and depth[-1] > 0, depth
    assert stats_end_of_outage["acked"] > stats_at_kill["acked"], (stats_at_kill, stats_end_of_outage)
    assert final["kafka_error"] is None and final["sent_from_spool"] >= depth[-1], final
    assert final["sent_live"] > drained["sent_live"], (drained, final)

    figures, connections = check_every_connection(pipe, contents, kernel, ports, v6, st)
    fault = figures_of_the_fault(contents, runs, fault_ms)
    report("broker sigkilled", {"connections": connections, **figures, **fault,
                                "spool_peak": depth[-1], "sent_from_spool": final["sent_from_spool"],
                                "sent_live": final["sent_live"], "producer_runs": runs})
    assert_no_traceback(pipe)


# --- 3. the order check itself (no root, no broker) ----------------------------------------

TYPES = {0: "CREATE", 3: "DESTROY"}


def _event(ct_id: int, seq: int, **changes) -> dict:
    """Event `seq` of a TCP/IPv4 connection of node "n" closed by FIN: seq 0
    its CREATE, 1 and 2 UPDATEs, 3 its DESTROY; counters grow with seq."""
    destroy = seq == 3
    record = {
        "schemaVersion": 2, "eventType": TYPES.get(seq, "UPDATE"), "nodeId": "n",
        "ctId": ct_id, "seq": seq, "observationTimeMilliseconds": 1_000 + seq,
        "sourceIPv4Address": "198.18.31.1", "destinationIPv4Address": "198.18.31.2",
        "sourceTransportPort": 40_000 + ct_id, "destinationTransportPort": TCP_PORT,
        "protocolIdentifier": 6, "vlanId": 0, "tcpState": "TIME_WAIT" if destroy else "ESTABLISHED",
        "assured": seq > 0, "initiatorPackets": 1 + seq, "responderPackets": seq,
        "initiatorOctets": 60 * (1 + seq), "responderOctets": 60 * seq,
        "flowStartMilliseconds": 900, "flowEndMilliseconds": 950 + seq,
        "flowEndReason": 3 if destroy else None, "missedEvents": 0, "retries": 0,
        "tcpControlBits": 0, "reverseTcpControlBits": 0,
    }
    return record | changes


def _topic(records: list[dict]) -> TopicContents:
    """The records appended in this order, each to its key's partition."""
    next_offset = [0] * PARTITIONS
    messages = []
    for r in records:
        key = message_key(r)
        p = partition_of(key, PARTITIONS)
        messages.append(Message(p, next_offset[p], key, b"", r))
        next_offset[p] += 1
    return TopicContents(messages)


E = _event
COPY = {"observationTimeMilliseconds": 9_000}


@pytest.mark.parametrize("records, error, late_copies", [
    ([E(1, 0), E(1, 1), E(1, 2), E(1, 3)], None, 0),
    # a DESTROY that overtook its CREATE
    ([E(1, 3), E(1, 0), E(1, 1), E(1, 2)], "CREATE seq 0 first at p", None),
    ([E(1, 0), E(1, 3), E(1, 1), E(1, 2)], "UPDATE seq 1 first at p", None),
    # an UPDATE before an older one
    ([E(1, 0), E(1, 2), E(1, 1), E(1, 3)], "UPDATE seq 1 first at p", None),
    # a stale request's copies landing after newer records: allowed
    ([E(1, 0), E(1, 1), E(1, 2), E(1, 3), E(1, 0, **COPY), E(1, 1, **COPY)], None, 2),
    # the kernel re-emitted the DESTROY
    ([E(1, 0), E(1, 1), E(1, 2), E(1, 3), E(1, 3, retries=1, **COPY)], None, 0),
    # an event missed by the full ring: a gap, still in order
    ([E(1, 0), E(1, 3, missedEvents=2)], None, 0),
    # several connections, their events interleaved (across partitions too)
    ([E(c, s) for s in range(4) for c in range(1, 7)], None, 0),
    ([E(c, s) for s in range(4) for c in range(1, 7)] + [E(5, 3), E(4, 1, **COPY)], None, 1),
    # a later copy must be the same event
    ([E(1, 0), E(1, 1), E(1, 2), E(1, 3), E(1, 3, responderOctets=1)], "copies differ", None),
])
def test_partition_order_check(records, error, late_copies):
    """check_partition_order, alone and as part of check_topic, fails on a
    connection whose events are out of order in its partition, accepts late
    copies of events already seen, and counts them."""
    if error is None:
        assert check_partition_order(_topic(records)) == {"late_copies": late_copies}
        assert check_topic(_topic(records), "n")["late_copies"] == late_copies
        return
    with pytest.raises(AssertionError, match=re.escape(error)):
        check_partition_order(_topic(records))
    with pytest.raises(AssertionError, match="partition order broken|copies differ"):
        check_topic(_topic(records), "n")


def test_partition_order_is_offset_order_not_list_order():
    """The check reads each partition by offset, whatever order the
    messages are listed in (read_topic interleaves partitions)."""
    in_order = _topic([E(c, s) for s in range(4) for c in range(1, 7)]).messages
    assert len({m.partition for m in in_order}) > 1, "test too weak: one partition"
    listed_by_seq_backwards = sorted(in_order, key=lambda m: -m.record["seq"])
    assert check_partition_order(TopicContents(listed_by_seq_backwards)) == {"late_copies": 0}
    # Listed in seq order, but the DESTROY of ct 1 has the lowest offset of
    # its partition: it was appended first.
    first = in_order[0]
    swapped = [Message(m.partition, -1, m.key, m.value, m.record)
               if (m.record["ctId"], m.record["seq"]) == (1, 3) else m for m in in_order]
    assert first.record["ctId"] == 1
    with pytest.raises(AssertionError, match=re.escape("('n', 1): partition order broken: CREATE seq 0")):
        check_partition_order(TopicContents(swapped))
