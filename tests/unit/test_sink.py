"""Sinks: what counts as written, a torn tail after a crash, and the JSON
they write: each event's wire record, the Kafka record's names and types."""

from __future__ import annotations

import io
import json
import socket

import pytest

from streamer.datapath import abi
from streamer.datapath.events import Clock, Event, LostReport
from streamer.delivery import records, wire
from streamer.errors import ConfigError, StreamerError
from streamer.delivery.sink import JsonlSink, StdoutSink, parse_sink
from tests.unit.test_events import _raw_event

NODE = "gw-sink"


def event(**over) -> Event:
    """An event decoded from the kernel's bytes (a TCP DESTROY unless changed)."""
    return Event.from_raw(abi.decode_event(_raw_event(**over)), Clock())


class Ev:
    def __init__(self, n: int):
        self.n = n

    def json(self) -> str:
        return json.dumps({"n": self.n})

    def text(self) -> str:
        return f"event {self.n}"


def test_jsonl_appends_one_record_per_line_and_commits(tmp_path):
    path = tmp_path / "ev.jsonl"
    path.write_text('{"n": 0}\n')
    s = JsonlSink(str(path), node_id=NODE)
    evs = [event(ct_id=1), event(ct_id=2, type=abi.EV_CREATE)]
    for ev in evs:
        s.write(ev)
    s.commit()
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == {"n": 0}
    assert [json.loads(x) for x in lines[1:]] == [records.record_of(ev, NODE) for ev in evs]
    assert s.commits == 1 and not s.torn_tail
    s.close()


def test_jsonl_isolates_a_torn_last_line(tmp_path):
    path = tmp_path / "ev.jsonl"
    path.write_text('{"n": 0}\n{"n": 1, "tr')
    s = JsonlSink(str(path), node_id=NODE)
    s.write(event(ct_id=2))
    s.close()
    lines = path.read_text().splitlines()
    assert s.torn_tail
    assert lines[:2] == ['{"n": 0}', '{"n": 1, "tr']
    assert len(lines) == 3 and json.loads(lines[2])["ctId"] == 2


def test_jsonl_unwritable_path_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot open the sink file"):
        JsonlSink(str(tmp_path / "no" / "such" / "dir.jsonl"))


def test_parse_sink_names(tmp_path):
    assert isinstance(parse_sink("stdout"), StdoutSink)
    assert parse_sink("stdout").node_id == socket.gethostname()   # the default node id
    assert parse_sink("stdout", "json", node_id="gw-9").node_id == "gw-9"
    jsonl = parse_sink(f"jsonl:{tmp_path / 'x.jsonl'}", node_id="gw-9")
    assert isinstance(jsonl, JsonlSink) and jsonl.node_id == "gw-9"
    jsonl.close()
    with pytest.raises(ConfigError, match="node id"):
        parse_sink("stdout", "json", node_id="n" * 256)
    for bad in ("kafka:x", "jsonl:", "jsonl", "file:/tmp/x"):
        with pytest.raises(ConfigError, match="unknown sink"):
            parse_sink(bad)


class Closed(io.StringIO):
    def write(self, s):
        raise BrokenPipeError

    def flush(self):
        raise BrokenPipeError


def test_stdout_closed_pipe_stops_and_never_commits():
    stopped = []
    s = StdoutSink("text", on_closed=lambda: stopped.append(1), stream=Closed())
    s.write(Ev(1))
    assert stopped == [1]
    with pytest.raises(StreamerError, match="closed"):
        s.commit()


def test_stdout_writes_text_or_json():
    out = io.StringIO()
    ev = event()
    StdoutSink("json", stream=out, node_id=NODE).write(ev)
    StdoutSink("text", stream=out).write(Ev(8))
    assert out.getvalue() == wire.to_json(records.record_of(ev, NODE)) + "\nevent 8\n"


@pytest.mark.parametrize("make", [
    lambda path: StdoutSink("json", stream=io.StringIO(), node_id=NODE),
    lambda path: JsonlSink(str(path), node_id=NODE),
], ids=["stdout-json", "jsonl"])
def test_json_lines_are_the_kafka_records(make, tmp_path):
    """`events -o json` and the jsonl sink write exactly what Kafka gets as
    msgpack: the same map, the same names, types and event words (CREATE,
    not the text line's NEW), valid against the schema."""
    path = tmp_path / "ev.jsonl"
    sink = make(path)
    items = [event(type=abi.EV_CREATE, seq=0, tcp_flags_reply=0), event(type=abi.EV_UPDATE, seq=1),
             event(family=6, proto=17, state=0, saddr=bytes.fromhex("20010002" + "00" * 11 + "01"),
                   daddr=bytes.fromhex("20010002" + "00" * 11 + "02")),
             event(proto=1, state=0, type=abi.EV_CREATE),
             LostReport(1_763_800_010_000, 10.0, {"ring_full": 2},
                        totals={"ring_full": 5, "table_full": 0, "outbox_full": 1})]
    for item in items:
        sink.write(item)
    sink.commit()
    text = sink.stream.getvalue() if isinstance(sink, StdoutSink) else path.read_text()
    sink.close()
    lines = text.splitlines()
    assert len(lines) == len(items)
    for line, item in zip(lines, items):
        rec = wire.validate(json.loads(line))
        kafka = wire.decode(wire.encode(records.sink_record(item, NODE)))
        assert rec == kafka
        assert [type(v) for v in rec.values()] == [type(v) for v in kafka.values()]
        assert rec["schemaVersion"] == wire.SCHEMA_VERSION and rec["nodeId"] == NODE
    got = [json.loads(x) for x in lines]
    assert [r["eventType"] for r in got] == ["CREATE", "UPDATE", "DESTROY", "CREATE", "LOST"]
    assert got[0]["tcpControlBits"] == 0x1B and got[0]["reverseTcpControlBits"] == 0
    assert got[2]["sourceIPv6Address"] == "2001:2::1" and got[2]["flowEndReason"] == 3
    assert got[4]["lost"]["ring_full"] == 5 and got[4]["ctId"] == 0     # the totals
