"""The delivery promise end to end with Kafka: `ctstream run` as a subprocess
on the server veth of a test-bed pair, real short connections through it, a
real broker, and faults: the broker stopped for 30 s, the daemon SIGKILLed,
a 4 KB ring, a corrupt spool, and bad settings.

What is checked comes from three sides that do not depend on each other: the
source ports the traffic generator returned (every connection that
happened), the whole topic read back from its beginning (every record
decoded and validated against schemas/), and the kernel's own nf_conntrack
in the server namespace. Delivery is at least once: a DESTROY may be in the
topic more than once (same nodeId, ctId, seq and the same counters); a
missing one is a failure, and so is one flow under two ct_ids.

Timeouts here are bounds, never measurements.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
import uuid

import pytest

from streamer.demo import testbed
from streamer.delivery.spool import Spool
from tests.kafka.conftest import free_port_pair
from tests.kafka.pipeline_support import (
    pipeline,
    FRAME_HEADER,
    TopicContents,
    check_missed_bits,
    check_tcp_connections,
    check_topic,
    check_udp_exchange,
    error_lines,
    flip_byte,
    make_pipeline,
    private_broker,
    read_topic,
    report,
    segment_files,
    segment_frames,
    spool_frames,
    truncate,
)
from tests.netns.test_cli import state_file
from tests.netns.test_reliability import (
    TCP_PORT,
    UDP_PORT,
    Generator,
    kernel_flows,
    kill_while_destroys_await_their_ack,
    wait_drained,
    xdp_attached,
)


PARTITIONS = 3
V6_PORT = TCP_PORT + 1    # IPv6 batches beside the IPv4 generator, on their own listener
UDP_PACKETS, UDP_PAYLOAD = 3, 200
DRAIN_TIMEOUT = 120       # bound on emptying the spool and the outbox once Kafka answers
PAIR_INDEX = 7            # 198.18.7.0/24, 2001:2:0:7::/64


@pytest.fixture
def pipe(pin_dir, tmp_path):
    with make_pipeline(pin_dir, tmp_path, PAIR_INDEX, f"ctstest-{uuid.uuid4().hex[:8]}") as p:
        yield p


def new_topic(broker, partitions: int = PARTITIONS) -> str:
    name = f"ctstream.pipeline.{uuid.uuid4().hex[:12]}"
    broker.topic_create(name, partitions)
    return name


def stop_cleanly(daemon) -> None:
    rc, _ = daemon.terminate(timeout=60)
    assert rc == 0, daemon.output()[-3000:]


def assert_no_traceback(pipe) -> None:
    """Checked last, after what was delivered: the daemons' logs hold their
    own lines, not Python tracebacks."""
    for d in pipe.daemons:
        out = d.output()
        at = out.find("Traceback")
        assert at < 0, f"{d.log.name}: a traceback in the daemon's log:\n{out[max(0, at - 300):at + 1500]}"


def read_and_check(pipe, bootstrap: str, topic: str) -> tuple[TopicContents, dict]:
    contents = TopicContents(read_topic(bootstrap, topic, PARTITIONS))
    return contents, check_topic(contents, pipe.node_id)


# --- 1. the broker stopped for 30 s ------------------------------------------------------


@pipeline
def test_broker_stopped_for_30s_loses_no_destroy(pipe, tmp_path):
    """Traffic runs; the broker stops (kafka.sh stop) for 30 s and starts
    again on the same dir and port. Meanwhile status says disconnected, the
    spool grows and the kernel's DESTROYs are still acked (once spooled);
    afterwards the spool drains, live sending resumes, and every connection
    has its DESTROY in Kafka with the kernel's counters."""
    pair = pipe.pair
    with private_broker(tmp_path / "broker") as broker:
        broker.start()
        topic = new_topic(broker)
        daemon = pipe.start(broker.bootstrap, topic)
        gen = Generator(pair, batch=100)
        gen.start()
        try:
            before = pipe.wait_status("records acked by Kafka",
                                      lambda st: st["kafka_acked"] > 0 and gen.ports, 30)
            assert before["kafka_connected"] and before["kafka_error"] is None, before
            assert before["spool_records"] == 0 and before["last_ack_time"] is not None, before
            v6_before = pair.tcp_many(50, family=6, port=V6_PORT, concurrency=8, timeout=30)

            broker.stop()
            stopped_at = time.monotonic()
            stats_at_stop = pipe.stats()
            # Traffic of every kind while Kafka is away.
            v6_during = pair.tcp_many(50, family=6, port=V6_PORT, concurrency=8, timeout=30)
            udp = [(fam, pair.udp_exchange(UDP_PACKETS, UDP_PAYLOAD, family=fam, port=UDP_PORT))
                   for fam in (4, 6)]
            samples = []
            while time.monotonic() - stopped_at < 30:
                samples.append(pipe.status())
                time.sleep(1)
            stats_end_of_outage = pipe.stats()
            assert gen.is_alive(), f"traffic stopped: {gen.error!r}"
            broker.start()
            # Traffic goes on while the spool drains, and for a while after.
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

        # During the outage: disconnected, the error said, the spool growing,
        # the kernel's outbox still acked (DESTROYs were spooled, not held).
        down = [s for s in samples if not s["kafka_connected"]]
        assert down, f"status never said disconnected in 30 s without a broker: {samples[-1]}"
        assert all(s["daemon_running"] for s in samples)
        # (the first sample may fall between the disconnect and its reason)
        assert all(s["kafka_error"] for s in down[1:]), down
        # Nothing leaves the spool while the broker is away: it only grows.
        depth = [s["spool_records"] for s in down]
        assert depth == sorted(depth) and depth[0] < depth[-1], depth
        assert down[0]["spool_bytes"] < down[-1]["spool_bytes"]
        assert stats_end_of_outage["acked"] > stats_at_stop["acked"], (stats_at_stop, stats_end_of_outage)
        # Afterwards: drained, live again (more records went out live after the drain).
        assert final["kafka_error"] is None and final["sent_from_spool"] >= down[-1]["spool_records"]
        assert final["sent_live"] > drained["sent_live"], (drained, final)
        assert st["outbox"] == 0 and st["created"] == st["destroyed"], st

        contents, figures = read_and_check(pipe, broker.bootstrap, topic)
    assert len(set(ports)) == len(ports), "the client reused a source port: connections ambiguous"
    check_tcp_connections(contents, pair, 4, ports, TCP_PORT, kernel)
    check_tcp_connections(contents, pair, 6, v6_before + v6_during, V6_PORT, kernel)
    for fam, sport in udp:
        check_udp_exchange(contents, pair, fam, sport, UDP_PORT, UDP_PACKETS, UDP_PAYLOAD, kernel)
    connections = len(ports) + len(v6_before) + len(v6_during) + len(udp)
    assert figures["connections"] == connections, "DESTROYs of connections nobody made"
    assert st["created"] == connections and st["acked"] >= connections, st
    report("broker outage", {"connections": connections, **figures,
                             "spool_peak": down[-1]["spool_records"],
                             "sent_from_spool": final["sent_from_spool"],
                             "sent_live": final["sent_live"]})
    assert_no_traceback(pipe)


# --- 2. the daemon SIGKILLed ------------------------------------------------------------


@pipeline
def test_daemon_sigkilled_and_restarted_loses_no_destroy(pipe, kafka_broker):
    """SIGKILL while DESTROYs await Kafka's ack, 10 s without a daemon, then
    a new `ctstream run` adopts the pinned table and outbox: every
    connection's DESTROY is in Kafka, once per ct_id, with the kernel's
    counters; copies are allowed, losses and double counting are not."""
    pair = pipe.pair
    topic = new_topic(kafka_broker)
    first = pipe.start(kafka_broker.bootstrap, topic, "--ring-size", "1m")
    gen = Generator(pair, batch=100)
    gen.start()
    try:
        pipe.wait_status("records acked by Kafka", lambda st: st["kafka_acked"] > 0 and gen.ports, 30)
        kill_while_destroys_await_their_ack(first, pipe.pin)
        st_killed = pipe.stats()
        assert st_killed["outbox"] > 0, "killed with an empty outbox: test too weak"
        made_before = len(gen.ports)
        time.sleep(10)
        alone = pipe.status()
        assert not alone["daemon_running"] and not alone["kafka_connected"], alone
        assert alone["created"] > st_killed["created"], "the kernel stopped tracking without a daemon"
        assert (alone["destroyed"], alone["outbox"]) == (st_killed["destroyed"], st_killed["outbox"])
        second = pipe.start(kafka_broker.bootstrap, topic, "--ring-size", "1m")
        assert "(adopted the pinned table)" in second.output()
        time.sleep(8)
    finally:
        ports = gen.finish()
    st = wait_drained(pipe.pin, timeout=60)
    final = pipe.wait_spool_drained(DRAIN_TIMEOUT)
    kernel = kernel_flows(pair)
    stop_cleanly(second)

    contents, figures = read_and_check(pipe, kafka_broker.bootstrap, topic)
    assert len(set(ports)) == len(ports), "the client reused a source port: connections ambiguous"
    check_tcp_connections(contents, pair, 4, ports, TCP_PORT, kernel)
    assert figures["connections"] == len(ports), "DESTROYs of connections nobody made"
    assert st["created"] == st["destroyed"] == len(ports), st
    assert st["outbox_full"] == 0, st
    report("sigkill", {"connections": len(ports), "before_kill": made_before,
                       "outbox_at_kill": st_killed["outbox"], "ring_full": st["ring_full"],
                       "sent_from_spool": final["sent_from_spool"], **figures})
    assert_no_traceback(pipe)


@pipeline
def test_daemon_sigkilled_while_spooling_restarts_and_drains(pipe, kafka_broker):
    """The first daemon cannot reach Kafka and spools (acking DESTROYs to the
    kernel once spooled); it is SIGKILLed under traffic while DESTROYs await
    their ack. The next one, with the broker reachable, takes over the spool
    (lock released, torn tail cut) and the pinned outbox: every DESTROY
    the first one acked from its spool, and every one still in the outbox,
    is in Kafka with the kernel's counters."""
    pair = pipe.pair
    topic = new_topic(kafka_broker)
    first = pipe.start(f"127.0.0.1:{free_port_pair()}", topic)
    gen = Generator(pair, batch=100)
    gen.start()
    try:
        pipe.wait_status("DESTROYs spooled and acked",
                         lambda st: st["spool_records"] > 0 and st["acked"] > 0 and gen.ports, 30)
        kill_while_destroys_await_their_ack(first, pipe.pin)
        st_killed = pipe.stats()
        assert st_killed["outbox"] > 0, "killed with an empty outbox: test too weak"
        assert st_killed["acked"] > 0, "nothing was acked from the spool: test too weak"
        made_before = len(gen.ports)
        time.sleep(5)
        second = pipe.start(kafka_broker.bootstrap, topic)
        out = second.output()
        assert "(adopted the pinned table)" in out
        assert re.search(r"holds \d+ record\(s\) not yet in Kafka: draining them first", out), out
        time.sleep(5)
    finally:
        ports = gen.finish()
    st = wait_drained(pipe.pin, timeout=60)
    final = pipe.wait_spool_drained(DRAIN_TIMEOUT)
    kernel = kernel_flows(pair)
    stop_cleanly(second)

    contents, figures = read_and_check(pipe, kafka_broker.bootstrap, topic)
    assert len(set(ports)) == len(ports), "the client reused a source port: connections ambiguous"
    check_tcp_connections(contents, pair, 4, ports, TCP_PORT, kernel)
    assert figures["connections"] == len(ports), "DESTROYs of connections nobody made"
    assert st["created"] == st["destroyed"] == len(ports) and st["outbox_full"] == 0, st
    assert final["sent_from_spool"] > 0, final
    report("sigkill while spooling", {"connections": len(ports), "before_kill": made_before,
                                      "acked_at_kill": st_killed["acked"],
                                      "outbox_at_kill": st_killed["outbox"],
                                      "sent_from_spool": final["sent_from_spool"], **figures})
    assert_no_traceback(pipe)


# --- 3. the smallest ring -----------------------------------------------------------------


@pipeline
def test_minimum_ring_every_destroy_reaches_kafka(pipe, kafka_broker):
    """A 4 KB ring (32 events) under thousands of short connections: NEW
    events are lost to the full ring (and reported as missed), every DESTROY
    reaches Kafka with the kernel's counters. Every event type is emitted
    (7 per connection, not run's default 3), for the most pressure on the ring."""
    pair = pipe.pair
    topic = new_topic(kafka_broker)
    daemon = pipe.start(kafka_broker.bootstrap, topic, "--ring-size", "4096",
                        "--event-mask", "new,assured,state,destroy")
    ports4 = pair.tcp_many(3000, family=4, port=TCP_PORT, concurrency=16, timeout=90)
    ports6 = pair.tcp_many(300, family=6, port=TCP_PORT, concurrency=16, timeout=60)
    udp = [(fam, pair.udp_exchange(UDP_PACKETS, UDP_PAYLOAD, family=fam, port=UDP_PORT))
           for fam in (4, 6)]
    st = wait_drained(pipe.pin, timeout=60)
    final = pipe.wait_spool_drained(DRAIN_TIMEOUT)
    kernel = kernel_flows(pair)
    stop_cleanly(daemon)

    contents, figures = read_and_check(pipe, kafka_broker.bootstrap, topic)
    check_tcp_connections(contents, pair, 4, ports4, TCP_PORT, kernel)
    check_tcp_connections(contents, pair, 6, ports6, TCP_PORT, kernel)
    for fam, sport in udp:
        check_udp_exchange(contents, pair, fam, sport, UDP_PORT, UDP_PACKETS, UDP_PAYLOAD, kernel)
    connections = len(ports4) + len(ports6) + len(udp)
    assert figures["connections"] == connections, "DESTROYs of connections nobody made"
    assert st["created"] == st["destroyed"] == connections and st["outbox_full"] == 0, st
    assert st["ring_full"] > 0, "the ring never filled: test too weak"
    # Never killed: a copy in Kafka is a DESTROY the kernel sent again (or
    # a batch sent again after a timeout); a gap is an event the full ring
    # refused, and the flow's next event reports it.
    assert figures["duplicates"] <= st["destroy_retries"] + final["sent_from_spool"], (st, figures)
    assert figures["missing_events"] <= st["ring_full"], (st, figures)
    check_missed_bits(contents)
    report("minimum ring", {"connections": connections, "ring_full": st["ring_full"],
                            "destroy_retries": st["destroy_retries"],
                            "sent_from_spool": final["sent_from_spool"], **figures})
    assert_no_traceback(pipe)


# --- 4. a corrupt spool --------------------------------------------------------------------


@pipeline
def test_corrupt_spool_skips_only_damaged_frames(pipe, kafka_broker, tmp_path):
    """A spool written by the daemon while the broker was unreachable is
    re-cut into several segments (streamer.delivery.spool, small segments) and
    damaged: a flipped byte in a middle frame of one segment, an older
    segment and the last one truncated mid-frame. The daemon starts with the
    broker up, reports each damage (file, byte, records) and the total, and
    every record of an intact frame reaches Kafka, byte for byte."""
    pair = pipe.pair
    nobody = f"127.0.0.1:{free_port_pair()}"
    writer = pipe.start(nobody, "ctstream.pipeline.spool")
    ports = pair.tcp_many(200, family=4, port=TCP_PORT, concurrency=8, timeout=60)
    wait_drained(pipe.pin, timeout=60)                     # every DESTROY spooled, acked
    spooled = pipe.status()
    assert not spooled["kafka_connected"] and spooled["spool_records"] >= 2 * len(ports), spooled
    stop_cleanly(writer)

    frames = spool_frames(pipe.spool)
    with Spool.open(pipe.spool) as sp:
        assert sp.recovery.problems == [] and len(frames) == sp.depth_records, sp.recovery
    recut = tmp_path / "recut"
    total = sum(f.end - f.pos for f in frames)
    # Five full segments and half of one: every segment holds many frames
    # whatever the number of events per connection (a tail of a frame or two
    # has no middle frame to flip).
    with Spool.open(recut, segment_bytes=max(4096, int(total / 5.5))) as sp:
        for f in frames:
            sp.append(f.key, f.value, f.time_ms)
        sp.sync()
    segs = segment_files(recut)
    assert len(segs) >= 4, segs
    per_seg = {s: segment_frames(s) for s in segs}
    assert all(len(v) >= 3 for v in per_seg.values()), {s.name: len(v) for s, v in per_seg.items()}

    flipped = per_seg[segs[1]][len(per_seg[segs[1]]) // 2]
    older_torn = per_seg[segs[2]][-1]
    last_torn = per_seg[segs[-1]][-1]
    flip_byte(flipped.segment, flipped.end - len(flipped.value) // 2)
    for torn in (older_torn, last_torn):
        truncate(torn.segment, torn.pos + FRAME_HEADER.size + (torn.end - torn.pos - FRAME_HEADER.size) // 2)
    damaged = {flipped, older_torn, last_torn}
    expected = {(f.key, f.value) for s in segs for f in per_seg[s] if f not in damaged}

    topic = new_topic(kafka_broker)
    pipe.spool = recut
    reader = pipe.start(kafka_broker.bootstrap, topic)
    final = pipe.wait_spool_drained(DRAIN_TIMEOUT)
    log = reader.output()
    stop_cleanly(reader)

    # What the daemon said: each damage where it is, and the total.
    lines = error_lines(log)
    said = {
        flipped: rf"{re.escape(str(flipped.segment))}: byte {flipped.pos}: bad checksum; .*\(1 records",
        older_torn: rf"{re.escape(str(older_torn.segment))}: byte {older_torn.pos}: .*\(1 records\) skipped",
        last_torn: rf"{re.escape(str(last_torn.segment))}: byte {last_torn.pos}: .*\(1 records\) cut",
    }
    for frame, pattern in said.items():
        assert any(re.search(pattern, ln) for ln in lines), f"not reported: {pattern}\n{log}"
    assert any(re.search(rf"skipped 3 damaged record\(s\).*kept {len(expected)}\b", ln)
               for ln in lines), log

    contents = TopicContents(read_topic(kafka_broker.bootstrap, topic, PARTITIONS))
    got = {(m.key, m.value) for m in contents.messages}
    assert not expected - got, f"{len(expected - got)} intact spooled records never reached Kafka"
    assert not got - expected, f"{len(got - expected)} records in Kafka that were not intact in the spool"
    assert final["sent_from_spool"] == len(expected), final
    report("corrupt spool", {"spooled": len(frames), "segments": len(segs), "skipped": len(damaged),
                             "delivered": len(got), "copies": len(contents.messages) - len(got)})
    assert_no_traceback(pipe)


# --- 5. bad input ---------------------------------------------------------------------------


def settle_for_retries(started: float) -> None:
    """Let the daemon try to reconnect a few times (every 2 s plus a 5 s
    connection timeout) before its log is read: still one line."""
    time.sleep(max(0.0, 20 - (time.monotonic() - started)))


@pipeline
def test_unreachable_bootstrap_keeps_tracking_then_drains(pipe, tmp_path):
    """--kafka names a loopback port where nothing listens: the daemon says
    so on one line, keeps tracking and spooling (the kernel's outbox is acked
    from the spool), status says disconnected; when a broker appears there,
    the spool drains and every DESTROY is in Kafka."""
    pair = pipe.pair
    with private_broker(tmp_path / "broker") as broker:
        topic = "ctstream.pipeline.unreachable"
        daemon = pipe.start(broker.bootstrap, topic)
        started = time.monotonic()
        before = pipe.stats()
        ports = pair.tcp_many(300, family=4, port=TCP_PORT, concurrency=8, timeout=60)
        st = wait_drained(pipe.pin, timeout=60)
        assert st["created"] - before["created"] == len(ports), (before, st)
        status = pipe.status()
        assert status["daemon_running"] and not status["kafka_connected"], status
        assert status["kafka_error"] and broker.bootstrap in status["kafka_error"], status
        assert status["spool_records"] >= 2 * len(ports), status
        settle_for_retries(started)
        said = [ln for ln in error_lines(daemon.output()) if broker.bootstrap in ln]
        assert len(said) == 1 and "cannot reach" in said[0], daemon.output()

        broker.start()
        broker.topic_create(topic, PARTITIONS)
        final = pipe.wait_spool_drained(DRAIN_TIMEOUT)
        kernel = kernel_flows(pair)
        stop_cleanly(daemon)
        contents, figures = read_and_check(pipe, broker.bootstrap, topic)
    check_tcp_connections(contents, pair, 4, ports, TCP_PORT, kernel)
    assert figures["connections"] == len(ports)
    assert final["sent_from_spool"] >= status["spool_records"], final
    report("unreachable bootstrap", {"connections": len(ports), **figures})
    assert_no_traceback(pipe)


@pipeline
def test_unknown_topic_is_reported_then_drains_when_created(pipe, kafka_broker):
    """A topic that does not exist (auto-create off): one error line naming
    it, tracking and spooling go on; once the topic is created the spool
    drains and every DESTROY is in Kafka."""
    pair = pipe.pair
    topic = f"ctstream.pipeline.late.{uuid.uuid4().hex[:8]}"
    daemon = pipe.start(kafka_broker.bootstrap, topic)
    started = time.monotonic()
    ports = pair.tcp_many(300, family=4, port=TCP_PORT, concurrency=8, timeout=60)
    wait_drained(pipe.pin, timeout=60)
    settle_for_retries(started)
    status = pipe.status()
    assert status["daemon_running"] and not status["kafka_connected"], status
    assert status["kafka_error"] and topic in status["kafka_error"], status
    assert status["spool_records"] >= 2 * len(ports), status
    said = [ln for ln in error_lines(daemon.output()) if topic in ln]
    assert len(said) == 1 and "does not exist" in said[0], daemon.output()

    kafka_broker.topic_create(topic, PARTITIONS)
    final = pipe.wait_spool_drained(DRAIN_TIMEOUT)
    kernel = kernel_flows(pair)
    stop_cleanly(daemon)
    contents, figures = read_and_check(pipe, kafka_broker.bootstrap, topic)
    check_tcp_connections(contents, pair, 4, ports, TCP_PORT, kernel)
    assert figures["connections"] == len(ports)
    assert final["sent_from_spool"] >= status["spool_records"], final
    report("unknown topic", {"connections": len(ports), **figures})
    assert_no_traceback(pipe)


def xdp_prog_id(pipe) -> int | None:
    out = pipe.pair.server.run(["ip", "-j", "link", "show", pipe.pair.server.ifname]).stdout
    return json.loads(out)[0].get("xdp", {}).get("prog", {}).get("id")


@pipeline
def test_bad_tls_file_exits_2_and_leaves_the_datapath_alone(pipe, kafka_broker, tmp_path):
    """A daemon stopped with --keep leaves the datapath attached. `ctstream run`
    with a missing or unusable TLS file then exits with status 2 and one line
    naming the file, without touching it: same XDP program, pins, counters;
    the kernel keeps tracking; a good daemon later adopts it and every
    DESTROY of the connections made meanwhile reaches Kafka."""
    pair = pipe.pair
    topic = new_topic(kafka_broker)
    keeper = pipe.start(kafka_broker.bootstrap, topic, "--keep")
    stop_cleanly(keeper)
    assert xdp_attached(pair.server) and os.path.isdir(pipe.pin)
    prog = xdp_prog_id(pipe)
    attachments = state_file(pipe.pin, ".json").read_text()
    assert prog is not None

    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    missing = tmp_path / "missing.pem"
    cases = [
        (str(missing), ["--kafka-ssl-cafile", str(missing)]),
        (str(garbage), ["--kafka-ssl-cafile", str(garbage)]),
        (str(tmp_path), ["--kafka-ssl-cafile", str(tmp_path)]),
        (str(missing), ["--kafka-ssl-certfile", str(missing), "--kafka-ssl-keyfile", str(garbage)]),
    ]
    ports_during = []
    for named, opts in cases:
        before = pipe.stats()
        res = pipe.run_once(kafka_broker.bootstrap, topic, "--kafka-security-protocol", "SSL", *opts)
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert res.returncode == 2, (opts, res.returncode, res.stderr)
        assert len(lines) == 1 and lines[0].startswith("ctstream: error: ") and named in lines[0], \
            (opts, res.stderr)
        # untouched, and still tracking
        assert xdp_prog_id(pipe) == prog and state_file(pipe.pin, ".json").read_text() == attachments
        ports_during += pair.tcp_many(50, family=4, port=TCP_PORT, concurrency=8, timeout=30)
        after = pipe.stats()
        assert after["created"] - before["created"] == 50, (before, after)
    assert not pipe.status()["daemon_running"]

    # --detach-on-stop: this one's stop removes what it adopted (run keeps it by default)
    adopter = pipe.start(kafka_broker.bootstrap, topic, "--detach-on-stop")
    assert "(adopted the pinned table)" in adopter.output()
    st = wait_drained(pipe.pin, timeout=60)
    pipe.wait_spool_drained(DRAIN_TIMEOUT)
    kernel = kernel_flows(pair)
    stop_cleanly(adopter)
    assert not xdp_attached(pair.server) and not os.path.exists(pipe.pin)
    contents, figures = read_and_check(pipe, kafka_broker.bootstrap, topic)
    check_tcp_connections(contents, pair, 4, ports_during, TCP_PORT, kernel)
    assert figures["connections"] == len(ports_during) and st["created"] == len(ports_during), (figures, st)
    report("bad TLS", {"connections": len(ports_during), **figures})
    assert_no_traceback(pipe)


# --- 6. the checks themselves (no root, no broker) ------------------------------------------


def _record(ct_id: int, seq: int, sport: int, **changes) -> dict:
    """A TCP/IPv4 record of node "n" as the daemon writes it: seq 0 CREATE,
    seq 1 the DESTROY of a connection closed by FIN."""
    destroy = seq == 1
    record = {
        "schemaVersion": 2, "eventType": "DESTROY" if destroy else "CREATE", "nodeId": "n",
        "ctId": ct_id, "seq": seq, "observationTimeMilliseconds": 1_000 + seq,
        "sourceIPv4Address": "198.18.7.1", "destinationIPv4Address": "198.18.7.2",
        "sourceTransportPort": sport, "destinationTransportPort": TCP_PORT,
        "protocolIdentifier": 6, "vlanId": 0, "tcpState": "TIME_WAIT" if destroy else "SYN_SENT",
        "assured": destroy, "initiatorPackets": 6 if destroy else 1,
        "responderPackets": 4 if destroy else 0, "initiatorOctets": 336 if destroy else 60,
        "responderOctets": 232 if destroy else 0, "flowStartMilliseconds": 900,
        "flowEndMilliseconds": 950, "flowEndReason": 3 if destroy else None,
        "missedEvents": 0, "retries": 0, "tcpControlBits": 0, "reverseTcpControlBits": 0,
    }
    return record | changes


def _contents(records: list[dict]) -> TopicContents:
    from streamer.delivery.producer import partition_of
    from streamer.delivery.records import message_key
    from tests.kafka.pipeline_support import Message

    return TopicContents([Message(partition_of(message_key(r), PARTITIONS), i, message_key(r), b"", r)
                          for i, r in enumerate(records)])


GOOD = [_record(1, 0, 40001), _record(1, 1, 40001), _record(2, 0, 40002), _record(2, 1, 40002)]


@pytest.mark.parametrize("records, kernel_change, error", [
    (GOOD[:2], {}, "1 of 2 connections have no DESTROY in Kafka"),
    (GOOD[:3], {}, "('n', 2): no DESTROY"),
    (GOOD, {"bytes_reply": 233}, "1 DESTROYs differ from the kernel"),
    (GOOD + [_record(3, 1, 40001)], {}, "flows counted under more than one ct_id"),
    (GOOD + [_record(1, 1, 40001, responderOctets=999)], {}, "copies differ"),
    (GOOD + [_record(1, 2, 40001, eventType="UPDATE")], {}, "an event after the DESTROY"),
    (GOOD + [_record(1, 2, 40001, eventType="DESTROY")], {}, "DESTROY seqs [1, 2]"),
    ([_record(1, 0, 40001, initiatorPackets=9)] + GOOD[1:], {}, "initiatorPackets went down"),
    (GOOD + [_record(9, 1, 40009, nodeId="m")], {}, "records of other nodes"),
    ([_record(1, 1, 40001, tcpState="CLOSE"), GOOD[3]], {}, "CLOSE"),
    (GOOD + [_record(1, 1, 40001, retries=1, observationTimeMilliseconds=5_000)], {}, None),
])
def test_checks_catch_what_they_promise(records, kernel_change, error):
    """check_topic and check_tcp_connections fail on a lost DESTROY, counters
    that are not the kernel's, double counting, copies that differ ... and
    accept a DESTROY the kernel sent twice."""
    pair = testbed.Pair(testbed.Host("c", "veth0", "198.18.7.1", "2001:2:0:7::1"),
                        testbed.Host("s", "veth0", "198.18.7.2", "2001:2:0:7::2"))
    kernel = {}
    for sport in (40001, 40002):
        flow = testbed.KernelFlow(4, "tcp", "198.18.7.1", "198.18.7.2", sport, TCP_PORT, "TIME_WAIT",
                                  packets_orig=6, bytes_orig=336, packets_reply=4, bytes_reply=232,
                                  assured=True)
        kernel[(4, "tcp", flow.src, flow.dst, sport, TCP_PORT)] = flow
    changed = dataclasses.replace(kernel[(4, "tcp", "198.18.7.1", "198.18.7.2", 40002, TCP_PORT)],
                                  **kernel_change)
    kernel[(4, "tcp", "198.18.7.1", "198.18.7.2", 40002, TCP_PORT)] = changed

    def check():
        contents = _contents(records)
        check_topic(contents, "n")
        check_tcp_connections(contents, pair, 4, [40001, 40002], TCP_PORT, kernel)

    if error is None:
        check()
    else:
        with pytest.raises(AssertionError, match=re.escape(error)):
            check()


def test_checks_see_an_unreported_gap():
    check_missed_bits(_contents([_record(1, 1, 40001, missedEvents=1)]))
    with pytest.raises(AssertionError, match="CREATE missing, not reported"):
        check_missed_bits(_contents([_record(1, 1, 40001)]))


def test_spool_reader_reads_what_streamer_spool_wrote(tmp_path):
    """The test's own frame reader agrees with streamer.delivery.spool, and refuses a
    damaged frame."""
    written = [(f"n/{i}".encode(), os.urandom(50 + i), 1_000 + i) for i in range(300)]
    with Spool.open(tmp_path, segment_bytes=4096) as sp:
        for key, value, time_ms in written:
            sp.append(key, value, time_ms)
        sp.sync()
    frames = spool_frames(tmp_path)
    assert len(segment_files(tmp_path)) > 3
    assert [(f.key, f.value, f.time_ms) for f in frames] == written
    assert [f.offset for f in frames] == list(range(300))
    flip_byte(frames[7].segment, frames[7].end - 1)
    with pytest.raises(AssertionError, match=f"byte {frames[7].pos}: bad checksum"):
        segment_frames(frames[7].segment)
