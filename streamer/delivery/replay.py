"""`ctstream replay`: publish again what consumers missed.

- `--from TIME [--to TIME]`: the records of the archive (streamer/delivery/archive.py)
  whose observation time lies in [from, to), in the order Kafka first
  acknowledged them, re-published byte for byte: same key, same value, so
  the same dedupe key (nodeId, ctId, seq) and the same partition of a topic
  with as many partitions; same timestamp (the archive keeps each record's
  observationTimeMilliseconds beside it, which is what the daemon gave Kafka
  as its CreateTime); same schema header (the version read from the value:
  records archived before an upgrade go out as what they are). A consumer
  that dedupes stays exactly once;
  replaying a range twice does no harm. `--ct-id` and `--node-id` narrow it
  down by the record key (b"<nodeId>/<ctId>"), without decoding values.
- `--snapshot`: one SNAPSHOT record per live connection of the pinned table
  (like conntrackd's resync), for a consumer that lost its state.

Both read only: the archive's segments and the pinned maps are safe to read
while the daemon runs. A replay that Kafka interrupts says how far it got;
running the same replay again is safe for the same dedupe reason.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import os
import re
import socket
import sys
import time

from ..errors import ConfigError, StreamerError
from . import wire

CONNECT_TIMEOUT_S = 10.0
SEND_CHUNK = 10_000          # records per Producer.send call
SENDS_IN_FLIGHT = 3          # calls not yet acknowledged, in call order
PROGRESS_EVERY_S = 0.5
PROBLEMS_SHOWN = 10
_RELATIVE = re.compile(r"(?:now)?\s*-\s*(\d+(?:\.\d+)?)\s*([smhdw]?)", re.IGNORECASE)
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_EPOCH = re.compile(r"\d+(?:\.\d+)?")
_EPOCH_MS_ABOVE = 1e11       # seconds up to year 5138; more is milliseconds by mistake


def main(a, kafka_settings) -> int:
    """`ctstream replay`: `a` is its settings.Config, `kafka_settings()`
    makes (and validates) the KafkaSettings to publish with."""
    if a.given("spool") and a.given("pin-dir") and not a.snapshot:
        raise ConfigError("--spool and --pin-dir do not go together: the archive is in the "
                          "spool, and --pin-dir only names its default place")
    if a.snapshot:
        if a.time_from is not None or a.time_to != "now" or a.ct_id or a.spool:
            raise ConfigError("--snapshot publishes the live table: --from, --to, --ct-id "
                              "and --spool do not go with it")
        from .records import check_node_id
        node_id = check_node_id(a.node_id or socket.gethostname())
        return asyncio.run(_snapshot(a, kafka_settings(), node_id))
    if a.time_from is None:
        raise ConfigError("give the range to replay with --from TIME [--to TIME], "
                          "or --snapshot for the live table")
    now = time.time()
    lo = parse_time(a.time_from, now, "--from")
    hi = parse_time(a.time_to, now, "--to")
    if lo >= hi:
        raise ConfigError(f"--from ({_iso(lo)}) must be before --to ({_iso(hi)})")
    from .archive import ArchiveReader, archive_dir, default_spool_dir
    directory = archive_dir(a.spool or default_spool_dir(a.pin_dir))
    if not os.path.isdir(directory):
        raise ConfigError(f"no archive at {directory} (`ctstream run` keeps one in its spool "
                          f"directory unless --archive-max 0: give its --spool or --pin-dir)")
    reader = ArchiveReader(directory, lo, hi)
    return asyncio.run(_replay(a, kafka_settings(), reader))


# ---------------------------------------------------------------- times

def parse_time(text: str, now: float, what: str = "time") -> int:
    """Wall-clock milliseconds of TIME: 'now', relative ('-10m', 'now-2h';
    s, m, h, d, w; no unit: seconds), epoch seconds, or ISO 8601 (a date and
    time without a zone is local time). ConfigError otherwise."""
    t = text.strip()
    if t.lower() == "now":
        return int(now * 1000)
    m = _RELATIVE.fullmatch(t)
    if m:
        back = float(m.group(1)) * _UNITS[m.group(2).lower()]    # may be inf
        ms = int((now - back) * 1000) if back <= now else -1
    elif _EPOCH.fullmatch(t):
        seconds = float(t)
        if seconds >= _EPOCH_MS_ABOVE:
            raise ConfigError(f"{what} {text!r}: epoch time in seconds, please (this looks "
                              f"like milliseconds)")
        ms = int(seconds * 1000)
    else:
        try:
            when = datetime.datetime.fromisoformat(t)
        except ValueError as exc:
            raise ConfigError(f"{what} {text!r} is not a time: give ISO 8601 "
                              f"(2024-05-01T12:00:00Z), epoch seconds, 'now' or a relative "
                              f"time like -10m") from exc
        ms = int(when.timestamp() * 1000)    # naive: local time, as timestamp() takes it
    # Nothing was archived before 1970; _iso() of a time before year 1
    # (-100000000d) raised a traceback instead of this line.
    if ms < 0:
        raise ConfigError(f"{what} {text!r} is before 1970")
    return ms


def _iso(ms: int) -> str:
    when = datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ---------------------------------------------------------------- Kafka

# The Kafka headers a record of each readable schema version goes out with;
# a value of no version ctstream reads goes out without one.
_HEADERS = {v: [wire.header_of(v)] for v in wire.READABLE_VERSIONS}
_NO_HEADERS: list = []


def version_runs(batch, keep=None) -> list[tuple[list, list]]:
    """The archived (key, value, time_ms) records of a batch that `keep` (a
    key predicate, or None) lets through, as runs of consecutive records of
    one schema version: [(headers, records)], in archive order."""
    runs: list[tuple[list, list]] = []
    headers = run = None
    version_of = wire.version_of
    for rec in batch:
        if keep is not None and not keep(rec[0]):
            continue
        h = _HEADERS.get(version_of(rec[1]), _NO_HEADERS)
        if h is not headers:
            headers, run = h, []
            runs.append((h, run))
        run.append(rec)
    return runs


class _Sender:
    """Producer.send calls of SEND_CHUNK records (key, value, timestamp_ms)
    that share their headers, up to SENDS_IN_FLIGHT at a time; `acked`
    counts the records of the calls Kafka acknowledged (calls complete in
    order: the producer keeps call order per partition, so records that
    change version mid-way keep their order too)."""

    def __init__(self, producer):
        self.producer = producer
        self.acked = 0
        self._chunk: list[tuple[bytes, bytes, int]] = []
        self._headers: list | None = None      # those of the records in _chunk
        self._calls: collections.deque[tuple[asyncio.Task, int]] = collections.deque()

    async def add(self, records, headers: list | None = None) -> None:
        if headers is not self._headers and self._chunk:
            part, self._chunk = self._chunk, []
            await self._call(part)
        self._headers = headers
        self._chunk.extend(records)
        while len(self._chunk) >= SEND_CHUNK:
            part, self._chunk = self._chunk[:SEND_CHUNK], self._chunk[SEND_CHUNK:]
            await self._call(part)

    async def _call(self, part: list) -> None:
        send = self.producer.send(part, self._headers)
        self._calls.append((asyncio.ensure_future(send), len(part)))
        while len(self._calls) >= SENDS_IN_FLIGHT or (self._calls and self._calls[0][0].done()):
            await self._settle_oldest()

    async def _settle_oldest(self) -> None:
        task, n = self._calls[0]
        await task                   # raises KafkaUnavailable: the caller reports
        self._calls.popleft()
        self.acked += n

    async def flush(self) -> None:
        if self._chunk:
            part, self._chunk = self._chunk, []
            send = self.producer.send(part, self._headers)
            self._calls.append((asyncio.ensure_future(send), len(part)))
        while self._calls:
            await self._settle_oldest()

    async def abandon(self) -> None:
        for task, _ in self._calls:
            task.cancel()
        for task, _ in self._calls:
            try:
                await task
            except BaseException:
                pass
        self._calls.clear()


async def _connect(settings):
    from .producer import Producer

    producer = Producer(settings)
    try:
        await producer.start(timeout_s=min(CONNECT_TIMEOUT_S,
                                           settings.delivery_timeout_ms / 1000))
    except BaseException:
        await producer.stop()
        raise
    return producer


# ---------------------------------------------------------------- replay

class _Progress:
    """Records, rate and ETA on one line of stderr, rewritten in place, when
    stderr is a terminal; nothing otherwise."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.on = self.stream.isatty()
        self.t0 = time.monotonic()
        self._next = self.t0            # the first update shows at once
        self._shown = False

    def update(self, records: int, done_bytes: int, total_bytes: int) -> None:
        if not self.on:
            return
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + PROGRESS_EVERY_S
        elapsed = max(now - self.t0, 1e-3)
        share = done_bytes / total_bytes if total_bytes else 1.0
        eta = f"{elapsed * (1 - share) / share:.0f}s" if share > 0 else "?"
        self.stream.write(f"\rreplay: {records:,} records, {records / elapsed:,.0f}/s, "
                          f"{share:.0%} of the archive read, ETA {eta}\x1b[K")
        self.stream.flush()
        self._shown = True

    def clear(self) -> None:
        if self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def key_filter(ct_ids, node_id: str | None):
    """A predicate on record keys (b"<nodeId>/<ctId>"), or None for all."""
    if not ct_ids and node_id is None:
        return None
    wanted = {str(c).encode() for c in ct_ids} if ct_ids else None
    node = node_id.encode() if node_id is not None else None

    def keep(key: bytes) -> bool:
        n, _, c = key.rpartition(b"/")
        return (node is None or n == node) and (wanted is None or c in wanted)
    return keep


async def _replay(a, settings, reader) -> int:
    from ..errors import KafkaUnavailable

    keep = key_filter(a.ct_id, a.node_id)
    progress = _Progress()
    t0 = time.monotonic()
    in_range = 0
    producer = await _connect(settings)
    sender = _Sender(producer)
    try:
        for batch in reader.batches():
            in_range += len(batch)
            for headers, run in version_runs(batch, keep):
                await sender.add(run, headers)
            progress.update(sender.acked, reader.scanned_bytes, reader.total_bytes)
            await asyncio.sleep(0)       # let the producer's tasks run between frames
        await sender.flush()
    except StreamerError as exc:
        await sender.abandon()
        if not isinstance(exc, KafkaUnavailable):
            raise
        raise KafkaUnavailable(f"{exc}; {sender.acked:,} records were replayed before that "
                               f"(replaying the range again is safe: the dedupe keys are the "
                               f"same)") from exc
    finally:
        progress.clear()
        await producer.stop()
    _report_problems(reader.problems)
    elapsed = max(time.monotonic() - t0, 1e-6)
    left_out = f", {in_range - sender.acked:,} left out by --ct-id/--node-id" if keep else ""
    damaged = f"; {reader.damaged_bytes:,} damaged bytes skipped" if reader.damaged_bytes else ""
    print(f"ctstream: replayed {sender.acked:,} records of {_iso(reader.from_ms)} .. "
          f"{_iso(reader.to_ms)} from {reader.directory} to topic {settings.topic} in "
          f"{elapsed:.1f}s ({sender.acked / elapsed:,.0f}/s); {in_range:,} archived in the "
          f"range{left_out}{damaged}", file=sys.stderr)
    return 0


def _report_problems(problems: list[str]) -> None:
    for line in problems[:PROBLEMS_SHOWN]:
        print(f"ctstream: archive damage: {line}", file=sys.stderr)
    if len(problems) > PROBLEMS_SHOWN:
        print(f"ctstream: archive damage: {len(problems) - PROBLEMS_SHOWN} more region(s)",
              file=sys.stderr)


# ---------------------------------------------------------------- snapshot

def snapshot_records(table, node_id: str, clock=None) -> list[tuple[bytes, bytes, int]]:
    """(key, value, timestamp_ms) of one SNAPSHOT record per live connection of a
    PinnedTable (entries in the outbox are ended: they have their DESTROY).
    The fields are records.record_of's; seq is the entry's seq as
    `ctstream list` shows it (the seq its next event will carry); the times
    and TCP flags come from the entry itself."""
    from ..datapath import abi
    from ..datapath.events import Clock, Event
    from .records import message_key, record_of
    from .wire import encode

    clock = clock or Clock()
    now_ns = time.monotonic_ns()
    now_ms = clock.wall_ns(now_ns) // 1_000_000
    out = []
    for e, value in table.walk(now_ns):
        if e.dying:
            continue
        _ct_id, first_ns, last_ns, *_counters, status_seq, _sched = value
        tcp = e.proto == "tcp"
        ev = Event(
            type="SNAPSHOT", family=e.family, proto=e.proto, src=e.src, dst=e.dst,
            sport=e.sport, dport=e.dport, vlan=e.vlan, state=e.state, assured=e.assured,
            ct_id=e.ct_id, seq=e.seq, packets_orig=e.packets_orig,
            packets_reply=e.packets_reply, bytes_orig=e.bytes_orig,
            bytes_reply=e.bytes_reply, time_ms=now_ms,
            first_ms=clock.wall_ns(first_ns) // 1_000_000,
            last_ms=clock.wall_ns(last_ns & ~abi.LAST_FLAGS) // 1_000_000,
            end_reason=None, missed=0, retries=0,
            tcp_flags_orig=(status_seq >> 16) & 0xFF if tcp else 0,
            tcp_flags_reply=(status_seq >> 24) & 0xFF if tcp else 0)
        rec = record_of(ev, node_id)
        out.append((message_key(rec), encode(rec), now_ms))
    return out


async def _snapshot(a, settings, node_id: str) -> int:
    from ..datapath.table import PinnedTable

    with PinnedTable(a.pin_dir) as table:
        table.fd("ct4")             # no datapath pinned: say so before connecting
        producer = await _connect(settings)
        try:
            t0 = time.monotonic()
            records = await asyncio.to_thread(snapshot_records, table, node_id)
            sender = _Sender(producer)
            try:
                await sender.add(records)
                await sender.flush()
            except StreamerError:
                await sender.abandon()
                raise
        finally:
            await producer.stop()
    elapsed = time.monotonic() - t0
    print(f"ctstream: published {sender.acked:,} SNAPSHOT records (the live connections of "
          f"{a.pin_dir}, node {node_id}) to topic {settings.topic} in {elapsed:.1f}s",
          file=sys.stderr)
    return 0
