"""`ctstream run --mqtt ... --metrics ...` end to end: the real daemon on a
test-bed pair with real short TCP connections, a real Kafka broker
(scripts/kafka.sh) and a real Mosquitto (scripts/mosquitto.sh, with a user
and password).

- The retained status arrives and follows the traffic; online is "1".
- Mosquitto SIGKILLed mid-run and started again: Kafka keeps getting
  records meanwhile, the daemon reconnects by itself and publishes its
  retained state again, and every connection's DESTROY is in Kafka.
- /metrics: events by type, DESTROY retries and missed re-deliveries equal
  what the topic holds; the datapath's created count equals the connections
  made; the ack latency histogram has samples.
- The Kafka broker stopped: alert/kafka_down goes active after
  --alert-kafka-down seconds and clears when the broker is back; a
  SIGKILLed daemon leaves online "0" (the will).

Timeouts are bounds, never measurements.
"""

from __future__ import annotations

import time
import urllib.request
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

from streamer.datapath import abi
from tests.kafka.pipeline_support import (
    PrivateBroker,
    TopicContents,
    check_tcp_connections,
    check_topic,
    make_pipeline,
    read_topic,
    report,
)
from tests.mqtt.conftest import USER, Mosquitto, free_port
from tests.netns.test_reliability import TCP_PORT, Generator, kernel_flows, wait_drained

pytestmark = [pytest.mark.root, pytest.mark.kafka, pytest.mark.mqtt]

PARTITIONS = 2
DRAIN_TIMEOUT = 60


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    """One Kafka broker for this module; a test may stop and start it."""
    b = PrivateBroker(tmp_path_factory.mktemp("kafka"))
    try:
        b.start()
        yield b
    finally:
        b.close()


def new_topic(broker) -> str:
    name = f"ctstream.mqtt.{uuid.uuid4().hex[:12]}"
    broker.topic_create(name, PARTITIONS)
    return name


def mqtt_args(mosq: Mosquitto, *extra: str) -> list[str]:
    return ["--mqtt", mosq.address, "--mqtt-username", USER,
            "--mqtt-password-file", str(mosq.password_file), "--mqtt-interval", "1", *extra]


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics as {(name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(samples: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    assert key in samples, f"{name}{labels} not in /metrics: {sorted(k[0] for k in samples)}"
    return samples[key]


def on(topic: str):
    return lambda m: m.topic == topic


# --- 1. status, Mosquitto killed mid-run, metrics -----------------------------------------


def test_status_survives_a_killed_mosquitto_and_metrics_match_the_topic(
        pin_dir, tmp_path, broker, mosquitto, subscriber_factory):
    node = f"ctstest-{uuid.uuid4().hex[:8]}"
    base = f"ctstream/{node}"
    topic = new_topic(broker)
    metrics_port = free_port()
    sub = subscriber_factory(mosquitto, f"{base}/#")
    with make_pipeline(pin_dir, tmp_path, 21, node) as pipe:
        pair = pipe.pair
        # A long --kafka-timeout: no batch goes through the spool (and then
        # twice into Kafka) on a slow machine, so the counts below are exact.
        daemon = pipe.start(broker.bootstrap, topic, "--kafka-timeout", "60",
                            *mqtt_args(mosquitto), "--metrics", f"127.0.0.1:{metrics_port}")
        gen = Generator(pair, batch=100)
        gen.start()
        try:
            online = sub.wait_for("online", on(f"{base}/online"), 15)
            assert online.payload == b"1", online
            st = sub.wait_for("a status that shows traffic",
                              lambda m: m.topic == f"{base}/status"
                              and m.json()["events_per_s"] > 0, 20).json()
            assert st["node"] == node and st["kafka_connected"] is True, st
            assert st["events_delivered"] > 0 and st["table_limit"] > 0, st
            assert 0 <= st["table_fill"] < 1 and st["spool_records"] == 0, st
            assert st["alerts"] == [], st
            down = sub.wait_for("alert kafka_down (inactive)",
                                on(f"{base}/alert/kafka_down"), 5).json()
            assert down["active"] is False and down["alert"] == "kafka_down", down
            during = scrape(metrics_port)   # while connections are open

            # Mosquitto SIGKILLed: Kafka keeps getting records meanwhile.
            acked_before = pipe.status()["kafka_acked"]
            mosquitto.kill()
            time.sleep(4)
            mid = pipe.wait_status("records acked while Mosquitto is away",
                                   lambda s: s["kafka_acked"] > acked_before, 20)
            assert mid["kafka_connected"], mid
            assert daemon.proc.poll() is None, daemon.output()[-2000:]
            mark = sub.mark()
            mosquitto.start()   # same port; it kept no retained messages
            again = sub.wait_for("online again on the restarted broker",
                                 on(f"{base}/online"), 30, since=mark)
            assert again.payload == b"1" and again.generation >= 2, again
            sub.wait_for("a status on the restarted broker", on(f"{base}/status"), 15, since=mark)
            sub.wait_for("the alerts on the restarted broker",
                         on(f"{base}/alert/ring_overflow"), 15, since=mark)
            time.sleep(2)
        finally:
            ports = gen.finish()
        wait_drained(pipe.pin, timeout=DRAIN_TIMEOUT)
        final = pipe.wait_spool_drained(DRAIN_TIMEOUT)
        assert final["spooled"] == 0 and final["sent_from_spool"] == 0, final
        kernel = kernel_flows(pair)
        after = scrape(metrics_port)
        mark = sub.mark()
        rc, _ = daemon.terminate(timeout=60)
        assert rc == 0, daemon.output()[-3000:]
        bye = sub.wait_for("online 0 after a clean stop", on(f"{base}/online"), 10, since=mark)
        assert bye.payload == b"0", bye

        contents = TopicContents(read_topic(broker.bootstrap, topic, PARTITIONS))
        figures = check_topic(contents, node)
        check_tcp_connections(contents, pair, 4, ports, TCP_PORT, kernel)

    # What the scrape says against what the topic holds.
    recs = [m.record for m in contents.flow_records]
    for etype in ("CREATE", "UPDATE", "DESTROY"):
        in_topic = sum(1 for r in recs if r["eventType"] == etype)
        assert metric(after, "ctstream_events_total", type=etype) == in_topic, etype
    destroys = [r for r in recs if r["eventType"] == "DESTROY"]
    assert metric(after, "ctstream_destroy_retries_total") == sum(1 for r in destroys if r["retries"])
    assert metric(after, "ctstream_events_missed_redelivered_total") == \
        sum(1 for r in recs if r["missedEvents"])
    assert metric(after, "ctstream_datapath_created_total") == len(ports) == figures["connections"]
    assert metric(after, "ctstream_datapath_ring_full_total") == 0
    assert metric(after, "ctstream_table_entries") == 0
    assert metric(after, "ctstream_outbox_entries") == 0
    assert metric(after, "ctstream_spool_records") == 0 == metric(after, "ctstream_spool_bytes")
    assert metric(after, "ctstream_kafka_connected") == 1
    # Nothing went wrong on the way to Kafka: each record was sent once.
    assert metric(after, "ctstream_kafka_acked_records_total") == len(contents.messages)
    sends = metric(after, "ctstream_kafka_ack_latency_seconds_count")
    assert sends > 0 and metric(after, "ctstream_kafka_ack_latency_seconds_sum") > 0
    assert metric(after, "ctstream_kafka_ack_latency_seconds_bucket", le="+Inf") == sends
    # The per-state walk saw the live connections while traffic ran.
    assert metric(during, "ctstream_connections_walk_skipped") == 0
    live = {dict(k[1])["state"]: v for k, v in during.items()
            if k[0] == "ctstream_connections" and dict(k[1])["proto"] == "tcp"}
    assert sum(live.values()) > 0 and set(live) <= set(abi.STATE_NAMES.values()), live
    assert metric(during, "ctstream_table_max_entries") > 0
    report("mqtt + metrics", {"connections": len(ports), **figures,
                              "ack_samples": int(sends), "tcp_states": live})
    assert "Traceback" not in daemon.output(), daemon.output()[-3000:]


# --- 2. the Kafka-down alert, and the will -----------------------------------------------


def test_kafka_down_alert_fires_and_clears_and_a_killed_daemon_leaves_its_will(
        pin_dir, tmp_path, broker, mosquitto, subscriber_factory):
    node = f"ctstest-{uuid.uuid4().hex[:8]}"
    base = f"ctstream/{node}"
    alert = f"{base}/alert/kafka_down"
    topic = new_topic(broker)
    sub = subscriber_factory(mosquitto, f"{base}/#")
    with make_pipeline(pin_dir, tmp_path, 22, node) as pipe:
        daemon = pipe.start(broker.bootstrap, topic, "--kafka-timeout", "1",
                            *mqtt_args(mosquitto, "--alert-kafka-down", "2"))
        gen = Generator(pipe.pair, batch=20, period=0.5)
        gen.start()
        try:
            first = sub.wait_for("kafka_down inactive", on(alert), 15).json()
            assert first["active"] is False, first
            pipe.wait_status("records acked", lambda s: s["kafka_acked"] > 0, 20)
            mark = sub.mark()
            stopping = time.time()
            broker.stop()
            fired = sub.wait_for("kafka_down active", lambda m: m.topic == alert
                                 and m.json()["active"], 40, since=mark)
            a = fired.json()
            # since = when the daemon lost Kafka; published at least 2 s later
            assert stopping <= a["since"] <= fired.at - 2, (stopping, a, fired.at)
            assert a["detail"].startswith("down for "), a
            st = sub.wait_for("a status listing the alert", lambda m: m.topic == f"{base}/status"
                              and "kafka_down" in m.json()["alerts"], 10, since=mark).json()
            assert st["kafka_connected"] is False, st
            mark = sub.mark()
            broker.start()
            cleared = sub.wait_for("kafka_down cleared", lambda m: m.topic == alert, 60,
                                   since=mark).json()
            assert cleared["active"] is False and cleared["since"] >= a["since"], cleared
            pipe.wait_status("Kafka back", lambda s: s["kafka_connected"], 30)
        finally:
            gen.finish()
        mark = sub.mark()
        daemon.kill()   # SIGKILL: no goodbye, the broker sends the will
        will = sub.wait_for("the will", on(f"{base}/online"), 20, since=mark)
        assert will.payload == b"0", will
        # Retained: a subscriber that comes later is told too.
        late = subscriber_factory(mosquitto, f"{base}/online")
        kept = late.wait_for("the retained will", on(f"{base}/online"), 10)
        assert kept.payload == b"0" and kept.retain, kept
    assert gen.ports, "no traffic ran"

