"""`ctstream account`, `ctstream top` and the gap report against the real
broker of scripts/kafka.sh and, for the postgresql cases, the real server of
scripts/postgres.sh. Every test runs on SQLite and on PostgreSQL.

Records are made with streamer.delivery.records and sent with streamer.delivery.producer;
the expected accounting comes from the generator (tests/accounting/support),
never from the database under test."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections import defaultdict

import aiokafka
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import TopicPartition

from streamer.delivery import wire
from streamer.accounting.consumer import consume
from streamer.accounting.db import wire_ct_id
from streamer.accounting.top import flow_count, top_talkers
from streamer.delivery.kafka_settings import KafkaSettings
from tests.accounting.support import (
    CTSTREAM, account_argv, check_exactly, ctstream, encoded, lost, make_flows, produce,
    query, run_account)

pytestmark = pytest.mark.kafka


async def new_topic(broker, partitions: int) -> str:
    """A topic of its own for a test (the admin API: a second, not a JVM start)."""
    name = f"acct.{uuid.uuid4().hex[:10]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        await admin.close()
    return name


async def send_raw(broker, topic: str, values: list[tuple[bytes, list]]) -> None:
    """Records with headers of our choosing (the project's producer always
    writes the right schema header)."""
    producer = aiokafka.AIOKafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    await producer.start()
    try:
        for value, headers in values:
            await producer.send_and_wait(topic, value, key=b"junk/0", headers=headers)
    finally:
        await producer.stop()


async def destroy_offsets(broker, topic: str, partitions: int) -> dict[tuple, tuple[int, int]]:
    """(node, ct_id) -> (partition, offset) of the first DESTROY of each flow."""
    consumer = aiokafka.AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=None,
                                         enable_auto_commit=False)
    await consumer.start()
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    consumer.assign(tps)
    await consumer.seek_to_beginning(*tps)
    ends = await consumer.end_offsets(tps)
    first: dict[tuple, tuple[int, int]] = {}
    try:
        async with asyncio.timeout(60):
            while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
                for tp, msgs in (await consumer.getmany(timeout_ms=500)).items():
                    for m in msgs:
                        rec = wire.decode(m.value)
                        if rec.get("eventType") == "DESTROY":
                            first.setdefault((rec["nodeId"], rec["ctId"]), (tp.partition, m.offset))
    finally:
        await consumer.stop()
    return first


# ---- exactly once ---------------------------------------------------------------------

async def test_duplicates_are_counted_once_and_rollups_sum_the_flows(kafka_broker, db_url):
    topic = await new_topic(kafka_broker, 3)
    flows = make_flows(300, node="gw-a") + make_flows(300, node="gw-b")   # same ct_ids, 2 nodes
    events = [r for f in flows for r in f.all_events()]
    rng = random.Random(5)
    again = rng.sample(events, 200)
    retried = [f.event(f.events - 1, retries=1) for f in flows[::7]]     # re-emitted DESTROYs
    losts = [lost("gw-a", 11, ring_full=4), lost("gw-a", 11, ring_full=4)]
    await produce(kafka_broker.bootstrap, topic, encoded(events + again + retried + losts))
    await send_raw(kafka_broker, topic, [(b"\x93\x01\x02", [wire.HEADER]),
                                         (wire.encode(events[0]), [("ctstream-schema", b"3")])])

    stats = await asyncio.to_thread(run_account, kafka_broker, topic, db_url)
    total = len(events) + len(again) + len(retried) + len(losts) + 2
    assert stats["records"] == total
    assert stats["events"] == len(events)
    assert stats["duplicates"] == len(again) + len(retried)
    assert (stats["flows"], stats["lost"], stats["rejected"]) == (600, 2, 2)
    check_exactly(db_url, flows, events_applied=len(events))
    assert query(db_url, "SELECT node_id, seq FROM lost_reports") == [("gw-a", 11)]

    # Nothing new: nothing read. The whole topic again (a replay): all duplicates.
    stats = await asyncio.to_thread(run_account, kafka_broker, topic, db_url)
    assert stats["records"] == 0
    await produce(kafka_broker.bootstrap, topic, encoded(events))
    stats = await asyncio.to_thread(run_account, kafka_broker, topic, db_url)
    assert (stats["records"], stats["events"], stats["duplicates"]) == (len(events), 0, len(events))
    check_exactly(db_url, flows, events_applied=len(events))


async def test_sigkill_mid_stream_then_restart_neither_loses_nor_double_counts(
        kafka_broker, db_url, tmp_path):
    partitions = 3
    topic = await new_topic(kafka_broker, partitions)
    group = f"g-{uuid.uuid4().hex[:8]}"
    first, second = make_flows(1500), make_flows(4000, first=1500)
    await produce(kafka_broker.bootstrap, topic, encoded([r for f in first for r in f.all_events()]))
    log = tmp_path / "account.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(account_argv(kafka_broker, topic, db_url, "--group", group),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    try:
        await wait_for(lambda: flows_in(db_url) >= len(first), 60, log)
        # Send more, and kill the consumer while it applies them.
        await produce(kafka_broker.bootstrap, topic,
                      encoded([r for f in second for r in f.all_events()]))
        await wait_for(lambda: flows_in(db_url) > len(first), 60, log)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    at_kill = flows_in(db_url)
    assert len(first) < at_kill, log.read_text()
    print(f"killed with {at_kill - len(first)} of {len(second)} new flows accounted")

    # What the killed consumer left is consistent: per partition, the flow
    # rows are exactly the DESTROYs before the stored offset.
    where = await destroy_offsets(kafka_broker, topic, partitions)
    stored = dict(query(db_url, "SELECT kpartition, next_offset FROM kafka_offsets"))
    before = {k for k, (p, off) in where.items() if off < stored.get(p, 0)}
    got = {(n, wire_ct_id(c)) for n, c in query(db_url, "SELECT node_id, ct_id FROM flows")}
    assert got == before

    # Duplicates of some of both parts arrive too; the restart finishes the
    # job, and stops cleanly on SIGTERM with the offsets at the topic's end.
    await produce(kafka_broker.bootstrap, topic,
                  encoded([f.event(f.events - 1, retries=1) for f in first[:50] + second[-50:]]))
    total = len(first) + len(second)
    ends = await end_offsets(kafka_broker, topic, partitions)
    with open(log, "w") as err:
        proc = subprocess.Popen(account_argv(kafka_broker, topic, db_url, "--group", group,
                                             "-o", "json"),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        await wait_for(lambda: flows_in(db_url) == total, 60, log)
        await wait_for(lambda: offsets_at_end(db_url, ends), 30, log)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log.read_text()
    stats = json.loads(out)
    assert stats["flows"] == total - at_kill
    # It resumed exactly where the killed one's last commit left off.
    assert stats["records"] == sum(ends.values()) - sum(stored.values())
    assert stats["duplicates"] == 100
    check_exactly(db_url, first + second, events_applied=3 * total)
    assert offsets_at_end(db_url, ends)


async def test_two_consumers_in_one_group_split_the_partitions(kafka_broker, db_url, tmp_path):
    partitions = 4
    topic = await new_topic(kafka_broker, partitions)
    group = f"g-{uuid.uuid4().hex[:8]}"
    procs, logs = [], [tmp_path / "a.log", tmp_path / "b.log"]
    try:
        for log in logs:
            with open(log, "w") as err:
                procs.append(subprocess.Popen(
                    account_argv(kafka_broker, topic, db_url, "--group", group,
                                 "--until-idle", "3", "-o", "json"),
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, text=True))
        # Records only once both hold partitions; else the first takes them all.
        await wait_for(lambda: split_done(logs, partitions), 60, *logs)
        flows = make_flows(2000)
        await produce(kafka_broker.bootstrap, topic, encoded([r for f in flows for r in f.all_events()]))
        outs = [p.communicate(timeout=90)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], [log.read_text() for log in logs]
    stats = [json.loads(o) for o in outs]
    # Each read its own partitions (once one exits, the other holds them
    # all, but finds them read to their end).
    read = [{int(p) for p in s["by_partition"]} for s in stats]
    assert read[0] and read[1] and not read[0] & read[1]
    assert read[0] | read[1] == set(range(partitions))
    assert all(s["flows"] > 0 for s in stats)
    assert stats[0]["flows"] + stats[1]["flows"] == len(flows)
    assert stats[0]["duplicates"] + stats[1]["duplicates"] == 0
    check_exactly(db_url, flows, events_applied=3 * len(flows))


async def end_offsets(broker, topic: str, partitions: int) -> dict[int, int]:
    consumer = aiokafka.AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=None)
    await consumer.start()
    try:
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in range(partitions)])
    finally:
        await consumer.stop()
    return {tp.partition: off for tp, off in ends.items()}


def offsets_at_end(db_url: str, ends: dict[int, int]) -> bool:
    return dict(query(db_url, "SELECT kpartition, next_offset FROM kafka_offsets")) == ends


def assigned(log) -> set[int] | None:
    """The partitions a consumer holds, from its -v log (None before the
    first assignment or while a rebalance is under way)."""
    holding = None
    for line in log.read_text().splitlines():
        if "assigned partitions" in line:
            text = line.split("assigned partitions ", 1)[1].split(" ", 1)[0]
            holding = set() if text == "none" else {int(p) for p in text.split(",")}
        elif "revoked" in line:
            holding = None
    return holding


def split_done(logs, partitions: int) -> bool:
    a, b = (assigned(log) for log in logs)
    return a is not None and b is not None and bool(a) and bool(b) and not a & b \
        and a | b == set(range(partitions))


def flows_in(db_url: str) -> int:
    try:
        return flow_count(db_url)
    except Exception:     # the consumer has not made the schema yet
        return 0


async def wait_for(predicate, timeout: float, *logs) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(predicate):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s; logs:\n"
                        + "\n".join(log.read_text() for log in logs), pytrace=False)
        await asyncio.sleep(0.02)


# ---- the gap report, top, the Python API --------------------------------------------

async def test_gap_report_finds_seq_gaps_and_unfinished_flows(kafka_broker, db_url):
    topic = await new_topic(kafka_broker, 2)
    now = int(time.time() * 1000)
    old = now - 600_000
    gap, ring, live, done = make_flows(4, events=5)
    unfinished = make_flows(1, first=100, end_ms=old, events=5)[0]
    refreshed = make_flows(1, first=101, end_ms=old, events=5)[0]
    no_create = make_flows(1, first=120, events=5)[0]          # 120 % 40 == 0: ends now
    recs = [gap.event(s) for s in (0, 2, 3, 4)]                       # seq 1 lost in transit
    recs += [no_create.event(1, missedEvents=1), no_create.event(2)]  # its CREATE (seq 0): the ring's
    recs += [ring.event(0), ring.event(3, missedEvents=2), ring.event(4)]  # 1, 2: the ring's
    recs += [unfinished.event(0), unfinished.event(1)]                # no DESTROY for 10 min
    recs += [live.event(0)]                                           # open, but recent
    recs += [refreshed.event(0), refreshed.event(1, "SNAPSHOT", observationTimeMilliseconds=now)]
    recs += done.all_events() + [done.event(4, "SNAPSHOT")]           # finished, then a snapshot
    recs += [lost("gw-a", 1, ring_full=2), lost("gw-a", 2, ring_full=7, table_full=1)]
    await produce(kafka_broker.bootstrap, topic, encoded(recs))

    # The Python API the pipeline demo uses.
    stats = await consume(KafkaSettings(bootstrap=kafka_broker.bootstrap, topic=topic), db_url,
                          group=f"g-{uuid.uuid4().hex[:8]}", until_idle=1.0, session_timeout_s=6)
    assert (stats.flows, stats.events, stats.snapshots, stats.lost) == (3, len(recs) - 4, 2, 2)

    result = ctstream("account", "--report", "--db", db_url, "-o", "json")
    assert result.returncode == 0, result.stderr
    rep = json.loads(result.stdout)
    gaps = {g["ct_id"]: g for g in rep["seq_gaps"]}
    assert set(gaps) == {gap.ct_id, ring.ct_id, no_create.ct_id}
    assert (gaps[gap.ct_id]["seqs"], gaps[gap.ct_id]["ring_only"]) == ([1], False)
    assert (gaps[ring.ct_id]["seqs"], gaps[ring.ct_id]["ring_only"]) == ([1, 2], True)
    assert (gaps[no_create.ct_id]["seqs"], gaps[no_create.ct_id]["ring_only"]) == ([0], True)
    assert rep["missing_events"] == 4
    assert [u["ct_id"] for u in rep["unfinished"]] == [unfinished.ct_id]
    assert rep["unfinished"][0]["last_seq"] == 1
    assert (rep["flows"], rep["open_flows"]) == (3, 4)    # unfinished, live, refreshed, no_create
    assert rep["lost"] == [{"node": "gw-a", "seq": 2, "observed_ms": rep["lost"][0]["observed_ms"],
                            "counters": {"destroy_retries": 0, "early_drops": 0, "ring_full": 7,
                                         "table_full": 1, "untracked_bytes": 0,
                                         "untracked_packets": 0}}]

    text = ctstream("account", "--report", "--db", db_url)
    assert text.returncode == 0, text.stderr
    assert f"ct {gap.ct_id}: missing seq 1\n" in text.stdout
    assert f"ct {ring.ct_id}: missing seq 1-2 (ring)" in text.stdout
    assert text.stdout.split("unfinished")[1].count(" ct ") == 1
    assert f"ct {unfinished.ct_id}: proto 17 198.18.0." in text.stdout
    # A horizon longer than the silence: nothing is unfinished.
    rep = json.loads(ctstream("account", "--report", "--db", db_url, "--horizon", "3600",
                              "-o", "json").stdout)
    assert rep["unfinished"] == []


async def test_top_talkers(kafka_broker, db_url):
    topic = await new_topic(kafka_broker, 2)
    now = int(time.time() * 1000)
    flows = make_flows(120, talkers=9, end_ms=now)
    old = make_flows(1, first=500, end_ms=now - 2 * 3600_000)[0]    # two hours ago
    big_old = old.event(old.events - 1, sourceIPv4Address="198.18.7.7",
                        initiatorOctets=10**9, responderOctets=10**9)
    destroys = [f.event(f.events - 1) for f in flows]
    await produce(kafka_broker.bootstrap, topic,
                  encoded([r for f in flows for r in f.all_events()] + [big_old]))
    await consume(KafkaSettings(bootstrap=kafka_broker.bootstrap, topic=topic), db_url,
                  group=f"g-{uuid.uuid4().hex[:8]}", until_idle=1.0, session_timeout_s=6)

    def expect(recs, key):
        acc = defaultdict(lambda: [0, 0, 0])
        for r in recs:
            k = key(r)
            acc[k][0] += r["initiatorOctets"] + r["responderOctets"]
            acc[k][1] += r["initiatorPackets"] + r["responderPackets"]
            acc[k][2] += 1
        return sorted(acc.items(), key=lambda kv: (-kv[1][0], -kv[1][1], kv[0]))

    def src(r):
        return r.get("sourceIPv4Address") or r["sourceIPv6Address"]

    def talkers(*args):
        result = ctstream("top", "--db", db_url, "-o", "json", *args)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    want = expect(destroys, src)[:4]
    got = talkers("--since", "10m", "--limit", "4")
    assert [(r["src"], [r["bytes"], r["packets"], r["flows"]]) for r in got] == want
    assert talkers("--limit", "1")[0]["src"] == "198.18.7.7"      # all time: the old giant
    assert talkers("--by", "port") == top_talkers(db_url, "port", None, 10)
    # ICMP has no port: its echo flows are one row, whatever their echo ids.
    ports = expect(destroys + [big_old], lambda r: (r["protocolIdentifier"],
                                                    None if r["protocolIdentifier"] in (1, 58)
                                                    else r["destinationTransportPort"]))
    assert [((r["protocol"], r["port"]), [r["bytes"], r["packets"], r["flows"]])
            for r in talkers("--by", "port")] == ports
    table = ctstream("top", "--db", db_url, "--by", "dst", "--since", "1h")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:4] == ["DESTINATION", "BYTES", "PACKETS", "FLOWS"]
    dsts = expect(destroys, lambda r: r.get("destinationIPv4Address") or r["destinationIPv6Address"])
    assert [ln.split()[0] for ln in lines[1:]] == [d for d, _ in dsts][:10]
    assert flow_count(db_url) == len(flows) + 1


# ---- bad input ------------------------------------------------------------------------

def test_bad_input_gives_one_line_and_the_right_exit_code(kafka_broker, tmp_path):
    closed = _closed_port()
    db = f"sqlite:{tmp_path / 'a.db'}"
    kafka = ["--kafka", kafka_broker.bootstrap, "--topic", "nosuch.topic"]
    cases = [
        (["account", *kafka, "--db", "mysql://u@h/db"], 2, "expected sqlite:PATH or postgresql://"),
        (["account", *kafka, "--db", "postgresql://u:secret@127.0.0.1:99999/x"], 2, "not a port number"),
        (["account", *kafka, "--db", f"postgresql://u:secret@127.0.0.1:{closed}/x"], 1,
         "cannot connect to PostgreSQL"),
        (["account", *kafka, "--db", f"sqlite:{tmp_path}/no/such/dir/a.db"], 1, "does not exist"),
        (["account", *kafka, "--db", db], 2, "topic nosuch.topic does not exist"),
        (["account", "--kafka", f"127.0.0.1:{closed}", "--topic", "t", "--db", db,
          "--kafka-timeout", "2"], 1, "cannot reach Kafka"),
        (["account", "--topic", "t", "--db", db], 2, "needs --kafka"),
        (["account", "--report", "--db", f"sqlite:{tmp_path / 'none.db'}"], 1, "no accounting database"),
        (["top", "--db", db, "--since", "ten minutes"], 2, "expected a duration"),
        (["top", "--db", db, "--limit", "0"], 2, "--limit must be a positive"),
    ]
    for argv, code, words in cases:
        started = time.monotonic()
        result = ctstream(*argv)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == code, (argv, result.stderr)
        assert lines[-1].startswith("ctstream: error: ") and words in lines[-1], (argv, lines)
        assert "Traceback" not in result.stderr and "secret" not in result.stderr
        assert time.monotonic() - started < 30, argv     # bounded, not a hang

    if os.geteuid() == 0:   # a directory the user (nobody) may enter but not write
        ro = tempfile.mkdtemp(prefix="ctstream-ro-", dir="/tmp")
        try:
            os.chmod(ro, 0o755)
            result = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                     CTSTREAM, "account", "--kafka", kafka_broker.bootstrap,
                                     "--topic", "t", "--db", f"sqlite:{ro}/a.db"],
                                    capture_output=True, text=True, timeout=60)
        finally:
            shutil.rmtree(ro, ignore_errors=True)
        assert result.returncode == 1, result.stderr
        assert result.stderr.strip().splitlines()[-1] == \
            f"ctstream: error: cannot write the database {ro}/a.db: permission denied"


def _closed_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
