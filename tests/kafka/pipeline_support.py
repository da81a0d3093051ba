"""Support for tests/kafka/test_pipeline.py: the real `ctstream run` against a
test-bed pair and a real broker, and what ends up in the topic.

- `Pipeline`: a test-bed pair (the kernel's conntrack on in the server
  namespace as the reference), a private pin dir and spool dir, and the
  `ctstream run` daemons started on them (test_reliability's `Daemon`: a
  subprocess whose output goes to a file, read up to "tracking on").
- `PrivateBroker`: a broker of one test's own (own directory and port) that
  the test may stop and start again; always stopped at the end.
- `read_topic`: every record of a topic from the beginning to its end
  offsets, each decoded with streamer.delivery.wire.decode and validated with
  streamer.delivery.wire.validate, its header, key, partition and timestamp
  (CreateTime, the record's observationTimeMilliseconds) checked.
- `TopicContents`, `check_topic`, `check_tcp_connections`,
  `check_udp_exchange`, `check_missed_bits`: records grouped by connection,
  DESTROYs compared with the traffic generator's list of connections and
  with the kernel's own nf_conntrack counters, as test_reliability does with
  the jsonl sink (the same records, read with tests/wire_records.py);
  `check_partition_order` (part of check_topic): each connection's events
  in its partition's offset order, unsorted.
- `spool_frames`: an independent reader of spool segment files (the format
  of streamer/delivery/spool.py's docstring), to know which records a corruption
  destroys.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import struct
import subprocess
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import aiokafka
import pytest
from aiokafka.structs import TopicPartition

from streamer.datapath import abi
from streamer.demo import testbed
from streamer.delivery import wire
from streamer.delivery.producer import partition_of
from streamer.delivery.records import message_key
from tests.kafka.conftest import Broker, broker_pids, free_port_pair, kafka_sh, stop_and_check
from tests.netns.test_cli import CTSTREAM, ctstream, detach_and_remove
from tests.netns.test_reliability import GRACE, MIN_HEADERS, TIMEOUTS, Daemon
from tests.wire_records import (COUNTERS, END_OF_FLOW, IDLE_TIMEOUT, KERNEL_COUNTERS, flow_key,
                                same_event)

CREATE_TIME = 0         # aiokafka's timestamp_type of a producer-set timestamp
# The kernel's conntrack in the server namespace keeps ended TCP
# connections (TIME_WAIT, default 120 s) and UDP flows (default 30 s) this
# long, so that it still lists every flow of a long test when the comparison
# is made.
KERNEL_KEEP_S = 900
KERNEL_TIMEOUTS = ("nf_conntrack_tcp_timeout_time_wait", "nf_conntrack_udp_timeout",
                   "nf_conntrack_udp_timeout_stream")


# --- brokers -----------------------------------------------------------------------------


class PrivateBroker:
    """A broker in `directory` on a port pair of its own, for a test that stops
    it. `close()` stops it for good and checks that no process is left."""

    def __init__(self, directory: Path):
        self.directory = directory.resolve()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port_pair()
        self.bootstrap = f"127.0.0.1:{self.port}"

    def start(self) -> None:
        result = kafka_sh("start", "--dir", str(self.directory), "--port", str(self.port))
        assert result.returncode == 0, f"kafka.sh start failed:\n{result.stderr}"
        assert result.stdout.strip() == self.bootstrap, result.stdout

    def stop(self) -> None:
        result = kafka_sh("stop", "--dir", str(self.directory), timeout=90)
        assert result.returncode == 0, f"kafka.sh stop failed:\n{result.stderr}"
        assert not broker_pids(self.directory), "kafka.sh stop left a broker process"

    def topic_create(self, name: str, partitions: int) -> None:
        Broker(self.bootstrap, self.directory, self.port).topic_create(name, partitions)

    def close(self) -> None:
        stop_and_check(self.directory)


@contextlib.contextmanager
def private_broker(directory: Path):
    broker = PrivateBroker(directory)
    try:
        yield broker
    finally:
        broker.close()


def pipeline(test):
    """Marks of the tests that run the daemon, a test bed and a broker."""
    return pytest.mark.root(pytest.mark.kafka(test))


# --- the daemon on a test-bed pair --------------------------------------------------------


@dataclass
class Pipeline:
    pair: testbed.Pair
    pin: str
    spool: Path
    logs: Path
    node_id: str
    daemons: list[Daemon] = field(default_factory=list)

    def argv(self, bootstrap: str, topic: str, *extra: str) -> list[str]:
        return [CTSTREAM, "run", "-n", self.pair.server.netns, "-i", self.pair.server.ifname,
                "--egress", "--pin-dir", self.pin, "--spool", str(self.spool),
                "--node-id", self.node_id, "--kafka", bootstrap, "--topic", topic,
                *TIMEOUTS, *GRACE, *extra]

    def start(self, bootstrap: str, topic: str, *extra: str) -> Daemon:
        """A `ctstream run` that has attached (or failed the test)."""
        log = self.logs / f"run{len(self.daemons)}.log"
        return RunDaemon(self.argv(bootstrap, topic, *extra), log, self.daemons)

    def run_once(self, bootstrap: str, topic: str, *extra: str,
                 timeout: float = 60) -> subprocess.CompletedProcess:
        """`ctstream run` that is expected to exit by itself."""
        return subprocess.run(self.argv(bootstrap, topic, *extra), capture_output=True,
                              text=True, stdin=subprocess.DEVNULL, timeout=timeout)

    def status(self) -> dict:
        res = ctstream("status", "-o", "json", "--pin-dir", self.pin)
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)

    def stats(self) -> dict:
        res = ctstream("stats", "-o", "json", "--pin-dir", self.pin)
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)

    def wait_status(self, what: str, predicate, timeout: float, interval: float = 0.5) -> dict:
        """Poll `ctstream status` until predicate(status) holds (bounded)."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            if predicate(st):
                return st
            d = self.daemons[-1] if self.daemons else None
            if d is not None and d.proc.poll() is not None:
                pytest.fail(f"waiting for {what}: the daemon exited "
                            f"(rc={d.proc.returncode}): {d.output()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"{what}: not within {timeout} s; status: {st}")
            time.sleep(interval)

    def wait_spool_drained(self, timeout: float) -> dict:
        """Until the daemon is connected, its spool empty and the kernel's
        outbox empty: everything that ended is in Kafka."""
        return self.wait_status(
            "Kafka connected, spool and outbox empty",
            lambda st: (st["kafka_connected"] and st["spool_records"] == 0
                        and st["spool_bytes"] == 0 and st["outbox"] == 0
                        and st["in_flight"] == 0 and st["pending"] == 0),
            timeout)

    def cleanup(self) -> None:
        for d in self.daemons:
            proc = getattr(d, "proc", None)
            if proc is None:
                continue
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        detach_and_remove(self.pin)


class RunDaemon(Daemon):
    """test_reliability's Daemon, listed in `into` before it waits for
    "tracking on", so that one that never gets there is still killed."""

    def __init__(self, argv: list[str], log: Path, into: list):
        into.append(self)
        super().__init__(argv, log)


@contextlib.contextmanager
def make_pipeline(pin_dir: str, tmp_path: Path, index: int, node_id: str):
    """A pair (kernel conntrack on, offloads off), with everything a failed
    test left killed, detached and removed afterwards."""
    with testbed.make_pair(prefix="ctskfk", offloads=False, conntrack=True, index=index) as pair:
        pair.server.run(["sysctl", "-qw", *(f"net.netfilter.{name}={KERNEL_KEEP_S}"
                                             for name in KERNEL_TIMEOUTS)])
        p = Pipeline(pair, pin_dir, tmp_path / "spool", tmp_path, node_id)
        try:
            yield p
        finally:
            p.cleanup()


def error_lines(text: str) -> list[str]:
    """The daemon's own lines, but the one that says it is tracking."""
    return [ln for ln in text.splitlines()
            if ln.startswith("ctstream: ") and not ln.startswith("ctstream: tracking on ")]


# --- the topic ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    partition: int
    offset: int
    key: bytes
    value: bytes
    record: dict
    timestamp: int | None = None        # as read from Kafka (None: made by a test)
    timestamp_type: int | None = None


def read_topic(bootstrap: str, topic: str, partitions: int, timeout: float = 90) -> list[Message]:
    """Every record of `topic` (in offset order within each partition), up to
    the end offsets at the time of the call. Each is decoded and validated
    against the schema; its header, key and partition are checked."""
    messages = asyncio.run(_read_topic(bootstrap, topic, partitions, timeout))
    bad = []
    for m in messages:
        try:
            wire.validate(m.record)
        except wire.WireError as exc:
            bad.append(f"p{m.partition}@{m.offset}: {exc}")
            continue
        if (m.timestamp_type, m.timestamp) != (CREATE_TIME, m.record["observationTimeMilliseconds"]):
            bad.append(f"p{m.partition}@{m.offset}: timestamp {m.timestamp} (type "
                       f"{m.timestamp_type}) is not the event's, CreateTime "
                       f"{m.record['observationTimeMilliseconds']}")
        elif m.key != message_key(m.record):
            bad.append(f"p{m.partition}@{m.offset}: key {m.key!r} is not {message_key(m.record)!r}")
        elif m.partition != partition_of(m.key, partitions):
            bad.append(f"p{m.partition}@{m.offset}: key {m.key!r} belongs in partition "
                       f"{partition_of(m.key, partitions)}")
    assert not bad, f"{len(bad)} bad records in {topic}: {bad[:5]}"
    return messages


async def _read_topic(bootstrap: str, topic: str, partitions: int, timeout: float) -> list[Message]:
    # Subscribed without a group: the consumer takes every partition itself.
    consumer = aiokafka.AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
        auto_offset_reset="earliest", request_timeout_ms=10_000)
    await consumer.start()
    out: list[Message] = []
    try:
        async with asyncio.timeout(timeout):
            while not consumer.assignment():
                await asyncio.sleep(0.1)
            tps = sorted(consumer.assignment())
            assert tps == [TopicPartition(topic, p) for p in range(partitions)], \
                f"{topic}: partitions {tps}"
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            todo = {tp for tp in tps if ends[tp] > 0}
            while todo:
                got = await consumer.getmany(*todo, timeout_ms=1000, max_records=10_000)
                for tp, batch in got.items():
                    for m in batch:
                        if m.offset >= ends[tp]:
                            continue
                        headers = tuple((k, bytes(v)) for k, v in m.headers)
                        assert headers == (wire.HEADER,), \
                            f"p{tp.partition}@{m.offset}: headers {headers}"
                        try:
                            record = wire.decode(m.value)
                        except wire.WireError as exc:
                            raise AssertionError(f"p{tp.partition}@{m.offset}: {exc}") from None
                        out.append(Message(tp.partition, m.offset, m.key, m.value, record,
                                           m.timestamp, m.timestamp_type))
                for tp in list(todo):
                    if await consumer.position(tp) >= ends[tp]:
                        todo.discard(tp)
    finally:
        await consumer.stop()
    return out


@dataclass
class TopicContents:
    messages: list[Message]

    @property
    def flow_records(self) -> list[Message]:
        return [m for m in self.messages if m.record["eventType"] != "LOST"]

    @property
    def lost_records(self) -> list[dict]:
        return [m.record for m in self.messages if m.record["eventType"] == "LOST"]

    def by_connection(self) -> dict[tuple[str, int], list[Message]]:
        out = collections.defaultdict(list)
        for m in self.flow_records:
            out[(m.record["nodeId"], m.record["ctId"])].append(m)
        return out

    def destroys(self) -> dict[tuple, list[dict]]:
        """DESTROY records by flow tuple, copies included."""
        out = collections.defaultdict(list)
        for m in self.flow_records:
            if m.record["eventType"] == "DESTROY":
                out[flow_key(m.record)].append(m.record)
        return out


def check_partition_order(topic: TopicContents) -> dict:
    """Each connection's events reach their partition in the order they were
    made, read in offset order and never sorted: the first copy of each
    dedupe key (nodeId, ctId, seq) comes with a higher seq than every first
    copy before it. A later copy of an event already seen (redelivered
    after a failed live send, a DESTROY the kernel re-emitted) is allowed
    anywhere after it, and must be the same event. A consumer that applies
    each connection's events in partition order then never sees a DESTROY
    before its CREATE, nor an UPDATE before an older one.

    Returns {"late_copies": n}: copies that came after a newer event of
    their connection (stale requests appended after newer records)."""
    # Per partition (a connection spread over partitions is check_topic's
    # own failure): connection -> its newest first copy, dedupe key ->
    # (message, record) of its first copy.
    offsets: dict[int, int] = {}
    newest: dict[tuple, dict] = {}
    firsts: dict[tuple, tuple[Message, dict]] = {}
    late = 0
    for m in sorted(topic.flow_records, key=lambda m: (m.partition, m.offset)):
        prev = offsets.get(m.partition)
        assert prev is None or m.offset > prev, f"p{m.partition}@{m.offset}: offset read twice"
        offsets[m.partition] = m.offset
        r = m.record
        conn = (r["nodeId"], r["ctId"])
        pc, dk = (m.partition, conn), (m.partition, wire.dedupe_key(r))
        first = firsts.get(dk)
        if first is not None:
            fm, fr = first
            assert same_event(fr, r), (f"{conn} seq {r['seq']}: copies differ: "
                                       f"p{fm.partition}@{fm.offset} {fr} vs p{m.partition}@{m.offset} {r}")
            late += r["seq"] < newest[pc]["seq"]
            continue
        before = newest.get(pc)
        if before is not None and r["seq"] <= before["seq"]:
            bm, _ = firsts[m.partition, wire.dedupe_key(before)]
            raise AssertionError(
                f"{conn}: partition order broken: {r['eventType']} seq {r['seq']} first at "
                f"p{m.partition}@{m.offset}, after {before['eventType']} seq {before['seq']} "
                f"at p{bm.partition}@{bm.offset}")
        firsts[dk] = (m, r)
        newest[pc] = r
    return {"late_copies": late}


def check_topic(topic: TopicContents, node_id: str) -> dict:
    """What holds for any topic the daemon wrote, whatever happened on the
    way; returns figures for the report.

    - every record is this node's;
    - copies of one event (same dedupe key) are the same event;
    - each connection's events are in order in its partition
      (check_partition_order);
    - one connection (nodeId, ctId) is one flow tuple, in one partition,
      with one DESTROY seq that is its last, and counters that never go down;
    - one flow tuple is one connection: nothing is counted twice under two
      ct_ids.
    """
    nodes = {m.record["nodeId"] for m in topic.messages}
    assert nodes <= {node_id}, f"records of other nodes: {nodes}"
    copies = collections.defaultdict(list)
    for m in topic.flow_records:
        copies[wire.dedupe_key(m.record)].append(m.record)
    for dk, recs in copies.items():
        differ = [r for r in recs[1:] if not same_event(recs[0], r)]
        assert not differ, f"{dk}: copies differ: {recs[0]} vs {differ[0]}"
    order = check_partition_order(topic)
    tuples = {}
    missing_events = 0
    for conn, msgs in topic.by_connection().items():
        recs = [m.record for m in msgs]
        keys = {flow_key(r) for r in recs}
        assert len(keys) == 1, f"{conn} names several flows: {keys}"
        tuples[conn] = keys.pop()
        parts = {m.partition for m in msgs}
        assert len(parts) == 1, f"{conn} is spread over partitions {parts}"
        destroy_seqs = {r["seq"] for r in recs if r["eventType"] == "DESTROY"}
        assert destroy_seqs, f"{conn}: no DESTROY (events {sorted(r['seq'] for r in recs)})"
        assert len(destroy_seqs) == 1, f"{conn}: DESTROY seqs {sorted(destroy_seqs)}"
        last = destroy_seqs.pop()
        seqs = {r["seq"] for r in recs}
        assert max(seqs) == last, f"{conn}: an event after the DESTROY: {sorted(seqs)}"
        missing_events += last + 1 - len(seqs)
        ordered = sorted({r["seq"]: r for r in recs}.values(), key=lambda r: r["seq"])
        for a, b in zip(ordered, ordered[1:]):
            for c in COUNTERS:
                assert a[c] <= b[c], f"{conn}: {c} went down from seq {a['seq']} to {b['seq']}"
        for r in recs:
            assert r["flowStartMilliseconds"] <= r["flowEndMilliseconds"], r
    flows = collections.Counter(tuples.values())
    twice = [k for k, n in flows.items() if n > 1]
    assert not twice, f"flows counted under more than one ct_id: {twice[:5]}"
    destroy_records = sum(1 for m in topic.flow_records if m.record["eventType"] == "DESTROY")
    types = collections.Counter(m.record["eventType"] for m in topic.messages)
    return {"records": len(topic.messages), "by_type": dict(sorted(types.items())),
            "unique": len(copies) + len(topic.lost_records),
            "duplicates": len(topic.flow_records) - len(copies),
            "destroy_records": destroy_records, "connections": len(tuples),
            "retried_destroys": sum(1 for m in topic.flow_records
                                    if m.record["eventType"] == "DESTROY" and m.record["retries"]),
            "missing_events": missing_events, "lost_records": len(topic.lost_records),
            **order}


def check_tcp_connections(topic: TopicContents, pair: testbed.Pair, family: int,
                          ports: list[int], port: int,
                          kernel: dict[tuple, testbed.KernelFlow]) -> None:
    """Every connection the generator made (client source `ports` to the
    server's `port`) has its DESTROY, closed by FIN, with the very counters
    of the kernel's conntrack."""
    destroys = topic.destroys()
    src, dst = pair.client.addr(family), pair.server.addr(family)
    missing, differ = [], []
    for sport in ports:
        k = (family, "tcp", src, dst, sport, port)
        if k not in destroys:
            missing.append(sport)
            continue
        r = destroys[k][0]
        # SYN, ACK, data, FIN, last ACK one way; SYN/ACK, echo, FIN the other
        assert r["initiatorPackets"] >= 5 and r["responderPackets"] >= 3, r
        assert r["initiatorOctets"] >= r["initiatorPackets"] * MIN_HEADERS[family] + 16, r
        assert r["responderOctets"] >= r["responderPackets"] * MIN_HEADERS[family] + 16, r
        assert (r["assured"], r["tcpState"], r["flowEndReason"]) == (True, "TIME_WAIT", END_OF_FLOW), r
        kf = kernel.get(k)
        assert kf is not None, f"{k}: not in the kernel's conntrack"
        ours = tuple(r[c] for c in COUNTERS)
        theirs = tuple(getattr(kf, c) for c in KERNEL_COUNTERS)
        if ours != theirs:
            differ.append((k, ours, theirs))
    assert not missing, \
        f"IPv{family}: {len(missing)} of {len(ports)} connections have no DESTROY in Kafka: {missing[:10]}"
    assert not differ, \
        f"IPv{family}: {len(differ)} DESTROYs differ from the kernel (ours, kernel): {differ[:5]}"


def check_udp_exchange(topic: TopicContents, pair: testbed.Pair, family: int, sport: int,
                       port: int, packets: int, payload: int,
                       kernel: dict[tuple, testbed.KernelFlow]) -> None:
    """One udp_exchange: its DESTROY (idle timeout) with the exact counters."""
    k = (family, "udp", pair.client.addr(family), pair.server.addr(family), sport, port)
    got = topic.destroys().get(k)
    assert got, f"UDP {k}: no DESTROY in Kafka"
    r = got[0]
    size = (20 if family == 4 else 40) + 8 + payload
    assert tuple(r[c] for c in COUNTERS) == (packets, packets * size, packets, packets * size), r
    assert r["flowEndReason"] == IDLE_TIMEOUT and r["tcpState"] is None, r
    kf = kernel.get(k)
    assert kf is not None and tuple(getattr(kf, c) for c in KERNEL_COUNTERS) == \
        tuple(r[c] for c in COUNTERS), (r, kf)


def check_missed_bits(topic: TopicContents) -> None:
    """With no daemon ever killed, an event is missing from the topic only
    because the full ring refused it; its type then went into the entry's
    missed mask, which a later event of the flow (at the latest the DESTROY)
    carries out in missedEvents."""
    for conn, msgs in topic.by_connection().items():
        recs = [m.record for m in msgs]
        seqs = {r["seq"] for r in recs}
        reported = 0
        for r in recs:
            reported |= r["missedEvents"]
        gaps = set(range(max(seqs) + 1)) - seqs
        if 0 in gaps:
            assert reported & abi.MISSED_CREATE, f"{conn}: CREATE missing, not reported: {recs}"
        if gaps - {0}:
            assert reported & abi.MISSED_UPDATE, f"{conn}: UPDATE missing, not reported: {recs}"


def report(name: str, figures: dict) -> None:
    print(f"\n{name}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


# --- the spool's files -------------------------------------------------------------------

# magic, crc32, payload length, key length, offset, time_ms (see streamer/delivery/spool.py)
FRAME_HEADER = struct.Struct("<4sIIIQq")
FRAME_MAGIC = b"\xc7CSp"


@dataclass(frozen=True)
class Frame:
    segment: Path
    pos: int
    end: int
    offset: int
    time_ms: int
    key: bytes
    value: bytes


def segment_frames(path: Path) -> list[Frame]:
    """Every frame of an undamaged segment file; AssertionError at the first
    byte that is not a whole frame with a good checksum."""
    data = path.read_bytes()
    frames, pos = [], 0
    while pos < len(data):
        assert len(data) - pos >= FRAME_HEADER.size, f"{path}: byte {pos}: truncated header"
        magic, crc, plen, klen, offset, time_ms = FRAME_HEADER.unpack_from(data, pos)
        end = pos + FRAME_HEADER.size + plen
        assert magic == FRAME_MAGIC and klen <= plen and end <= len(data), f"{path}: byte {pos}: bad frame"
        assert zlib.crc32(data[pos + 8:end]) == crc, f"{path}: byte {pos}: bad checksum"
        body = data[pos + FRAME_HEADER.size:end]
        frames.append(Frame(path, pos, end, offset, time_ms, body[:klen], body[klen:]))
        pos = end
    return frames


def segment_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("seg-" + "[0-9]" * 20 + ".spool"))


def spool_frames(directory: Path) -> list[Frame]:
    return [f for seg in segment_files(directory) for f in segment_frames(seg)]


def flip_byte(path: Path, pos: int) -> None:
    with open(path, "r+b") as f:
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0xFF]))
        f.flush()
        os.fsync(f.fileno())


def truncate(path: Path, size: int) -> None:
    os.truncate(path, size)
