"""Sinks: where events go, and when they count as written.

A sink takes events as they arrive (`write`, on the event loop, never
blocking) and makes what it took durable in batches (`commit`, in a worker
thread, may block). The daemon acks a DESTROY to the kernel's outbox only
after a commit that followed its write returned: that is the whole contract.

- stdout (the default of `ctstream events`): one line per event, text or
  JSON (the event's wire record, records.sink_record: the Kafka record's
  names, types and event words). Written and flushed to the pipe counts as
  durable; a closed pipe (`| head`) stops the daemon rather than acking
  what nobody read.
- jsonl:PATH: one JSON object (the same record) per line, appended to PATH
  and fsync'd at each commit; a commit is due after `batch_s` or
  `batch_records`, whichever comes first.
- a callback (the demo, the tests): handed each event; durable at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
from typing import Callable

from ..datapath import abi
from ..errors import ConfigError, StreamerError
from ..datapath.events import Event
from .records import check_node_id, sink_record
from .wire import to_json


class Sink:
    name = "sink"
    batch_s = 0.0          # how long a commit may wait to gather a batch
    batch_records = 1 << 30

    def write(self, ev) -> None:
        raise NotImplementedError

    def ring_writer(self, clock):
        """The daemon's entry for ring records: a function that takes one
        record's bytes (valid during the call), writes the event and returns
        (ack_ref, event type, missed mask, retries); ack_ref is a DESTROY's
        Event.ack_ref, else None. It raises AbiError for a record this
        version does not know. Sinks with a faster way than making an
        events.Event override it (the Kafka sink)."""
        write = self.write

        def write_record(view):
            raw = abi.decode_event(view)
            ev = Event.from_raw(raw, clock)
            write(ev)
            return ev.ack_ref, raw.type, raw.missed, raw.retries
        return write_record

    def commit(self) -> None:
        """Make everything written so far durable; raises on failure."""

    async def commit_async(self) -> set:
        """commit() for the daemon: the ack references (Event.ack_ref) of
        DESTROYs written since the last commit that were NOT made durable
        (the daemon leaves those in the kernel's outbox)."""
        await asyncio.to_thread(self.commit)
        return set()

    def backlog(self) -> int:
        """Events written and not yet taken by a commit."""
        return 0

    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    def close(self) -> None:
        pass

    def status(self) -> dict:
        return {}


class CallbackSink(Sink):
    name = "callback"

    def __init__(self, fn: Callable):
        self.fn = fn

    def write(self, ev) -> None:
        self.fn(ev)


class StdoutSink(Sink):
    name = "stdout"

    def __init__(self, fmt: str = "text", on_closed: Callable[[], None] | None = None,
                 stream=None, text_line: Callable | None = None, node_id: str | None = None):
        self.fmt = fmt
        self.node_id = check_node_id(node_id or socket.gethostname())   # the JSON records'
        self.on_closed = on_closed
        self.stream = stream or sys.stdout
        self.closed = False
        # The text branch's line of an event (default ev.text(); -o conntrack
        # gives one); None: nothing for stdout (conntrack's text has no LOST).
        self.text_line = text_line or (lambda ev: ev.text())

    def write(self, ev) -> None:
        if self.closed:
            return
        try:
            line = to_json(sink_record(ev, self.node_id)) if self.fmt == "json" else self.text_line(ev)
            if line is not None:
                self.stream.write(line + "\n")
        except BrokenPipeError:
            self._broken()

    def commit(self) -> None:
        if self.closed:
            raise StreamerError("stdout is closed: nothing written since can be acked")
        try:
            self.stream.flush()
        except BrokenPipeError as exc:
            self._broken()
            raise StreamerError("stdout was closed by its reader") from exc

    def _broken(self) -> None:
        self.closed = True
        if self.on_closed:
            self.on_closed()


class JsonlSink(Sink):
    name = "jsonl"

    def __init__(self, path: str, batch_s: float = 0.01, batch_records: int = 4096,
                 node_id: str | None = None):
        self.path = path
        self.node_id = check_node_id(node_id or socket.gethostname())
        self.batch_s = batch_s
        self.batch_records = batch_records
        try:
            self._f = open(path, "a", buffering=1 << 20, encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot open the sink file {path}: {exc.strerror}") from exc
        self.commits = 0
        self.torn_tail = _ends_torn(path)
        if self.torn_tail:
            # A daemon killed mid-line left a partial record (never acked, so
            # the kernel sends it again): end it, so it spoils no other line.
            self._f.write("\n")

    def write(self, ev) -> None:
        self._f.write(to_json(sink_record(ev, self.node_id)) + "\n")

    def commit(self) -> None:
        try:
            self._f.flush()
            os.fsync(self._f.fileno())
        except OSError as exc:
            raise StreamerError(f"writing {self.path} failed: {exc.strerror}") from exc
        self.commits += 1

    def close(self) -> None:
        if not self._f.closed:
            try:
                self.commit()
            finally:
                # A failed commit left data in the buffer that close() would
                # try to write again: it was never acked, so let it go.
                with contextlib.suppress(OSError):
                    self._f.close()


def _ends_torn(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def parse_sink(spec: str, fmt: str = "text", on_closed=None, text_line=None,
               node_id: str | None = None) -> Sink:
    """`stdout` or `jsonl:PATH`; text_line: StdoutSink's; node_id: the JSON
    records' nodeId (default the host name)."""
    if spec in ("", "stdout", "-"):
        return StdoutSink(fmt, on_closed, text_line=text_line, node_id=node_id)
    kind, sep, arg = spec.partition(":")
    if kind == "jsonl" and sep and arg:
        return JsonlSink(arg, node_id=node_id)
    raise ConfigError(f"unknown sink {spec!r}: use stdout or jsonl:PATH")
