"""streamer.observe.metrics with a fake session: the listen address, a port in use,
what a scrape says, the ack-latency histogram fed through KafkaSink.on_ack,
the bounded per-state walk, and a clean stop. (tests/mqtt/ scrapes the real
daemon.)"""

from __future__ import annotations

import asyncio
import socket
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from streamer.datapath import abi
from streamer.observe import metrics
from streamer.errors import ConfigError, StreamerError
from streamer.observe.metrics import Metrics, parse_listen


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:9108", ("127.0.0.1", 9108)),
    ("[::1]:9108", ("::1", 9108)),
    ("localhost:1", ("localhost", 1)),
])
def test_parse_listen(text, expected):
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["9108", ":9108", "127.0.0.1:", "127.0.0.1:0", "h:70000", "h:x"])
def test_parse_listen_refuses(text):
    with pytest.raises(ConfigError, match="--metrics expects ADDR:PORT"):
        parse_listen(text)


class FakeSink:
    name = "kafka"

    def __init__(self):
        self.on_ack = None

    def backlog(self):
        return 7


class FakeCfg:
    table_limit = 1000


class FakeSession:
    def __init__(self, entries: int = 3):
        self.cfg = FakeCfg()
        self.sink = FakeSink()
        self.events_by_type = [0, 10, 20, 30]
        self.missed_redelivered = 4
        self.destroy_retries = 2
        self.reader_paused = False
        self.entries = entries
        self.dp = None
        self.syn_cookie_seconds = 12.5

    def status(self):
        return {"kafka_connected": True, "in_flight": 5, "kafka_acked": 60,
                "spool_records": 11, "spool_bytes": 1234, "spool_max": 1 << 20}

    def counters(self):
        c = {name: i for i, name in enumerate(abi.STAT_NAMES)}
        c.update({name: 100 + i for i, name in enumerate(abi.SYN_STAT_NAMES)})
        c.update(entries=self.entries, outbox=1)
        return c


def scrape(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


@pytest.fixture
def exporter():
    m = Metrics("127.0.0.1", 0, walk_max=100, walk_interval=3600).serve()
    yield m
    m.close()


async def test_scrape_reports_the_session(exporter, monkeypatch):
    walks = []

    def fake_walk(fd4, fd6, limit):
        walks.append(limit)
        return {("tcp", "ESTABLISHED"): 2, ("udp", "NONE"): 1}
    monkeypatch.setattr(metrics, "walk_states", fake_walk)
    before_attach = await asyncio.to_thread(scrape, exporter.port)
    assert not any(k[0].startswith("ctstream_events") for k in before_attach)

    session = FakeSession()
    session.dp = type("DP", (), {"fd": staticmethod(lambda name: 99)})()
    acks = []
    session.sink.on_ack = lambda records, latency: acks.append(records)
    await exporter.start(session)
    session.sink.on_ack(100, 0.004)
    session.sink.on_ack(50, 0.3)
    assert acks == [100, 50]   # the sink's earlier observer still runs

    got = await asyncio.to_thread(scrape, exporter.port)
    want = {
        ("ctstream_events_total", (("type", "CREATE"),)): 10,
        ("ctstream_events_total", (("type", "UPDATE"),)): 20,
        ("ctstream_events_total", (("type", "DESTROY"),)): 30,
        ("ctstream_events_missed_redelivered_total", ()): 4,
        ("ctstream_destroy_retries_total", ()): 2,
        ("ctstream_datapath_ring_full_total", ()): abi.STAT_NAMES.index("ring_full"),
        ("ctstream_datapath_untracked_bytes_total", ()): abi.STAT_NAMES.index("untracked_bytes"),
        ("ctstream_datapath_early_drops_total", ()): abi.STAT_NAMES.index("early_drops"),
        ("ctstream_datapath_syn_cookies_sent_total", ()): 100,
        ("ctstream_datapath_syn_cookie_acks_invalid_total", ()): 103,
        ("ctstream_syn_cookie_mode_seconds_total", ()): 12.5,
        ("ctstream_table_entries", ()): 3,
        ("ctstream_table_max_entries", ()): 1000,
        ("ctstream_outbox_entries", ()): 1,
        ("ctstream_sink_backlog", ()): 7,
        ("ctstream_spool_records", ()): 11,
        ("ctstream_spool_bytes", ()): 1234,
        ("ctstream_spool_max_bytes", ()): 1 << 20,
        ("ctstream_kafka_connected", ()): 1,
        ("ctstream_kafka_in_flight", ()): 5,
        ("ctstream_kafka_acked_records_total", ()): 60,
        ("ctstream_kafka_ack_latency_seconds_count", ()): 2,
        ("ctstream_kafka_ack_latency_seconds_bucket", (("le", "0.005"),)): 1,
        ("ctstream_kafka_ack_latency_seconds_bucket", (("le", "0.25"),)): 1,
        ("ctstream_kafka_ack_latency_seconds_bucket", (("le", "0.5"),)): 2,
        ("ctstream_connections", (("proto", "tcp"), ("state", "ESTABLISHED"))): 2,
        ("ctstream_connections", (("proto", "udp"), ("state", "NONE"))): 1,
        ("ctstream_connections_walk_skipped", ()): 0,
    }
    assert {k: got.get(k) for k in want} == want
    assert got[("ctstream_kafka_ack_latency_seconds_sum", ())] == pytest.approx(0.304)
    assert all(f"ctstream_datapath_{n}_total" in {k[0] for k in got} for n in abi.STAT_NAMES)

    # Within walk_interval a scrape reuses the last walk.
    await asyncio.to_thread(scrape, exporter.port)
    assert walks == [100]
    await exporter.aclose()
    with pytest.raises(urllib.error.URLError):
        scrape(exporter.port)
    await exporter.aclose()    # idempotent


async def test_walk_is_skipped_above_its_bound_and_says_so(exporter, monkeypatch):
    def no_walk(*a):
        raise AssertionError("walked a table above walk_max")
    monkeypatch.setattr(metrics, "walk_states", no_walk)
    await exporter.start(FakeSession(entries=101))
    got = await asyncio.to_thread(scrape, exporter.port)
    assert got[("ctstream_connections_walk_skipped", ())] == 1
    assert not any(k[0] == "ctstream_connections" for k in got)
    await exporter.aclose()


def test_port_in_use_is_a_clear_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(StreamerError, match=f"--metrics 127.0.0.1:{port}: cannot listen: "
                                                f"Address already in use"):
            Metrics("127.0.0.1", port).serve()
