"""Sinks: what counts as written, and a torn tail after a crash."""

from __future__ import annotations

import io
import json

import pytest

from streamer.errors import ConfigError, StreamerError
from streamer.delivery.sink import JsonlSink, StdoutSink, parse_sink


class Ev:
    def __init__(self, n: int):
        self.n = n

    def json(self) -> str:
        return json.dumps({"n": self.n})

    def text(self) -> str:
        return f"event {self.n}"


def test_jsonl_appends_one_object_per_line_and_commits(tmp_path):
    path = tmp_path / "ev.jsonl"
    path.write_text('{"n": 0}\n')
    s = JsonlSink(str(path))
    for i in (1, 2):
        s.write(Ev(i))
    s.commit()
    assert [json.loads(x)["n"] for x in path.read_text().splitlines()] == [0, 1, 2]
    assert s.commits == 1 and not s.torn_tail
    s.close()


def test_jsonl_isolates_a_torn_last_line(tmp_path):
    path = tmp_path / "ev.jsonl"
    path.write_text('{"n": 0}\n{"n": 1, "tr')
    s = JsonlSink(str(path))
    s.write(Ev(2))
    s.close()
    lines = path.read_text().splitlines()
    assert s.torn_tail
    assert lines == ['{"n": 0}', '{"n": 1, "tr', '{"n": 2}']


def test_jsonl_unwritable_path_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot open the sink file"):
        JsonlSink(str(tmp_path / "no" / "such" / "dir.jsonl"))


def test_parse_sink_names():
    assert isinstance(parse_sink("stdout"), StdoutSink)
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
    StdoutSink("json", stream=out).write(Ev(7))
    StdoutSink("text", stream=out).write(Ev(8))
    assert out.getvalue() == '{"n": 7}\nevent 8\n'
