"""streamer.observe.mqtt_status without a broker: option parsing, the alert rules
driven by made-up daemon snapshots, the bounded queue, and the connection
task against a closed port and against a server that never answers.
(tests/mqtt/ runs it against a real Mosquitto.)"""

from __future__ import annotations

import asyncio
import json
import socket

import pytest

from streamer.observe import mqtt_status
from streamer.errors import ConfigError
from streamer.observe.mqtt_status import ALERTS, QUEUE_MAX, Alerts, MqttSettings, MqttStatus, parse_broker


@pytest.mark.parametrize("text, expected", [
    ("broker", ("broker", 1883)),
    ("broker:8883", ("broker", 8883)),
    ("127.0.0.1:1", ("127.0.0.1", 1)),
    ("[::1]:1884", ("::1", 1884)),
    ("[::1]", ("::1", 1883)),
    ("::1", ("::1", 1883)),
])
def test_parse_broker(text, expected):
    assert parse_broker(text) == expected


@pytest.mark.parametrize("text", ["", ":1883", "h:", "h:0", "h:65536", "h:x", "a:b:c", "[::1]x",
                                  "[::1]:"])
def test_parse_broker_refuses(text):
    with pytest.raises(ConfigError, match="--mqtt expects HOST"):
        parse_broker(text)


@pytest.mark.parametrize("node", ["a/b", "a+", "#", ""])
def test_node_that_is_no_topic_level(node):
    with pytest.raises(ConfigError):
        MqttStatus(MqttSettings("h"), node)


def snap(t: float, entries: int = 0, ring_full: int = 0, early_drops: int = 0,
         kafka: bool | None = True, spool_bytes: int = 0, delivered: int = 0,
         syn_cookie_auto: int = 0) -> dict:
    s = {"monotonic": t, "time": 1000.0 + t, "table_limit": 100, "table_high": 90,
         "table_low": 80, "events_delivered": delivered, "reader_paused": False,
         "counters": {"entries": entries, "outbox": 1, "ring_full": ring_full,
                      "early_drops": early_drops, "syn_cookie_auto": syn_cookie_auto}}
    if kafka is not None:
        s.update(kafka_connected=kafka, kafka_error=None if kafka else "refused",
                 spool_bytes=spool_bytes, spool_max=1000, spool_records=spool_bytes // 10)
    return s


def test_table_high_has_hysteresis():
    a = Alerts(kafka_down_s=30)
    seen = []
    for t, entries in enumerate([89, 90, 85, 81, 80, 90]):
        changed = a.update(snap(t, entries=entries))
        seen.append((entries, changed, a.state["table_high"].active))
    assert seen == [(89, [], False), (90, ["table_high"], True), (85, [], True),
                    (81, [], True), (80, ["table_high"], False), (90, ["table_high"], True)]
    assert a.state["table_high"].since == 1005.0
    assert "90 of 100 entries" in a.state["table_high"].detail


@pytest.mark.parametrize("alert, counter", [("ring_overflow", "ring_full"),
                                            ("early_drops", "early_drops"),
                                            ("syn_cookies", "syn_cookie_auto")])
def test_growth_alerts_fire_on_growth_and_clear_when_quiet(alert, counter):
    a = Alerts(kafka_down_s=30, quiet_s=10)
    # The first snapshot is the baseline: drops from before this start are no news.
    assert a.update(snap(0, **{counter: 5})) == []
    assert a.update(snap(1, **{counter: 5})) == []
    assert a.update(snap(2, **{counter: 7})) == [alert]
    st = a.state[alert]
    assert st.active and st.since == 1002.0 and f"{counter} 7, +2" in st.detail
    assert a.update(snap(11, **{counter: 7})) == []          # 9 s quiet: still on
    assert a.update(snap(12, **{counter: 7})) == [alert]     # 10 s quiet: off
    assert not a.state[alert].active and a.state[alert].since == 1012.0
    others = set(ALERTS) - {alert}
    assert not any(a.state[n].active for n in others)


def test_kafka_down_after_its_delay_since_the_disconnect():
    a = Alerts(kafka_down_s=2)
    assert a.update(snap(0)) == []
    assert a.update(snap(10, kafka=False)) == []
    assert a.update(snap(11, kafka=False)) == []
    assert a.update(snap(12, kafka=False)) == ["kafka_down"]
    st = a.state["kafka_down"]
    assert st.active and st.since == 1010.0 and st.detail == "down for 2 s: refused"
    assert a.update(snap(13, kafka=False)) == []
    assert a.update(snap(14)) == ["kafka_down"]
    assert not a.state["kafka_down"].active and a.state["kafka_down"].since == 1014.0
    # A short blip does not fire.
    assert a.update(snap(20, kafka=False)) == []
    assert a.update(snap(21)) == []


def test_spool_high_at_80_percent_off_below_70():
    a = Alerts(kafka_down_s=30)
    got = [(b, a.update(snap(t, spool_bytes=b))) for t, b in enumerate([790, 800, 750, 700, 690])]
    assert got == [(790, []), (800, ["spool_high"]), (750, []), (700, []), (690, ["spool_high"])]


def test_a_sink_without_kafka_or_spool_never_raises_those():
    a = Alerts(kafka_down_s=0)
    for t in range(5):
        assert a.update(snap(t, kafka=None)) == []
    assert not a.state["kafka_down"].active and not a.state["spool_high"].active


def queued(m: MqttStatus) -> list[tuple[str, dict]]:
    return [(t, json.loads(p)) for t, p in m._queue]


def test_status_is_coalesced_rate_computed_alerts_queued_in_order():
    m = MqttStatus(MqttSettings("h", interval=5), "node1")
    m.observe(snap(0, delivered=0))
    m.observe(snap(1, delivered=100))         # before the interval: no new status
    m.observe(snap(5, delivered=500, entries=95))
    q = queued(m)
    assert [t for t, _ in q] == ["ctstream/node1/alert/table_high", "ctstream/node1/status"]
    alert, status = q[0][1], q[1][1]
    assert alert == {"node": "node1", "alert": "table_high", "active": True, "since": 1005.0,
                     "detail": alert["detail"], "time": alert["time"]}
    assert status["events_per_s"] == 100.0 and status["entries"] == 95
    assert status["table_fill"] == 0.95 and status["alerts"] == ["table_high"]
    assert status["kafka_connected"] is True and status["spool_records"] == 0
    assert status["outbox"] == 1 and status["node"] == "node1" and status["time"] == 1005.0


def test_queue_is_bounded_and_drops_the_oldest():
    m = MqttStatus(MqttSettings("h", interval=1e9), "n")
    n = QUEUE_MAX + 10
    for t in range(n):   # table_high toggles each time: one alert message each
        m.observe(snap(t, entries=95 if t % 2 == 0 else 0))
    q = queued(m)
    assert len(q) == QUEUE_MAX and m.dropped == n + 1 - QUEUE_MAX   # + the first status
    assert q[-1][1]["since"] == 1000.0 + n - 1           # the newest stays
    assert all(t.endswith("/alert/table_high") for t, _ in q)


class FakeSession:
    def __init__(self):
        self.observers = []


async def test_no_broker_neither_blocks_nor_raises(monkeypatch):
    monkeypatch.setattr(mqtt_status, "BACKOFF_MIN", 0.05)
    with socket.socket() as s:          # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    m = MqttStatus(MqttSettings("127.0.0.1", port, interval=1), "n")
    session = FakeSession()
    await m.start(session)
    assert session.observers == [m.observe]
    for t in range(QUEUE_MAX * 2):
        m.observe(snap(t, entries=95 if t % 2 else 0))
    for _ in range(100):
        if m._error:
            break
        await asyncio.sleep(0.02)
    assert not m.connected and "refused" in m._error.lower(), m._error
    assert len(m._queue) == QUEUE_MAX
    await m.aclose()
    assert session.observers == [] and m._task is None
    await m.aclose()   # idempotent


async def test_a_broker_that_never_answers_is_given_up_and_its_socket_closed(monkeypatch):
    monkeypatch.setattr(mqtt_status, "CONNECT_TIMEOUT", 0.3)
    monkeypatch.setattr(mqtt_status, "BACKOFF_MIN", 5.0)   # one attempt in this test
    closed = asyncio.Event()

    async def silent(reader, writer):
        await reader.read(1 << 16)          # the CONNECT packet
        while await reader.read(1 << 16):   # never a CONNACK; wait for EOF
            pass
        closed.set()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    m = MqttStatus(MqttSettings("127.0.0.1", port), "n")
    try:
        await m.start(FakeSession())
        await asyncio.wait_for(closed.wait(), 10)
        assert not m.connected and m._error
    finally:
        await m.aclose()
        server.close()
        await server.wait_closed()


def test_spool_unwritable_while_the_disk_refuses_writes():
    a = Alerts(kafka_down_s=30)
    seq = [None, "the spool /s cannot write: No space left on device", None]
    got = []
    for t, why in enumerate(seq):
        s = snap(t)
        s["spool_write_error"] = why
        got.append(a.update(s))
    assert got == [[], ["spool_unwritable"], ["spool_unwritable"]]
    assert not a.state["spool_unwritable"].active
    s = snap(5)
    s["spool_write_error"] = "Read-only file system"
    a.update(s)
    assert a.state["spool_unwritable"].active and "Read-only" in a.state["spool_unwritable"].detail
