"""Prometheus exposition of the daemon (`--metrics ADDR:PORT`).

A private CollectorRegistry served by prometheus_client's HTTP server in a
thread of its own. The socket is bound before the datapath is touched, so
a port in use fails the start at once (exit 1). Values are read at scrape
time, in the server's thread: the Session's own counters (events by type,
missed re-deliveries, DESTROY retries), the pinned datapath counters, the
table's fill and the sink's status (spool, Kafka). The Kafka ack latency is
a histogram fed by KafkaSink.on_ack on the event loop.

Per-state connection counts need a walk of the pinned table (two syscalls
per entry). It runs at scrape time at most once every `walk_interval`
seconds (a scrape in between gets the last result), and not at all while
the table holds more than `walk_max` entries; ctstream_connections_walk_skipped
then says 1. A scrape holds a lock that stop() takes before the session
closes its maps, so a scrape never reads a closed (or reused) descriptor.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import struct
import threading
import time

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import start_http_server

from ..datapath import abi
from ..datapath import bpfsys
from ..errors import ConfigError, StreamerError

log = logging.getLogger(__name__)

WALK_MAX = 100_000        # entries above which the per-state walk is skipped
WALK_INTERVAL = 30.0      # seconds between walks; scrapes in between reuse the last
# The wire's names of the event types (records.py), as consumers see them.
EVENT_TYPES = {abi.EV_CREATE: "CREATE", abi.EV_UPDATE: "UPDATE", abi.EV_DESTROY: "DESTROY"}
ACK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# Datapath counters (abi.STAT_NAMES) exported as ctstream_datapath_<name>_total.
_HELP = {
    "syn_cookies_sent": "SYN-ACKs with a SYN cookie sent from XDP",
    "syn_cookie_kernel_syns": "SYNs passed for the kernel to cookie (one per listener and 30 s)",
    "syn_cookie_acks_valid": "ACKs with a valid cookie (each created its entry)",
    "syn_cookie_acks_invalid": "bare ACKs to a listener with no entry and a bad cookie, dropped",
    "syn_cookie_no_listener": "SYNs to no local listener while cookies were on, passed untracked",
    "syn_cookie_auto": "SYNs auto mode answered with a cookie",
    "syn_cookie_errors": "SYN-ACKs that could not be built",
    "syn_cookie_handshakes_estimated": "valid cookie ACKs whose SYN had left the handshake map "
                                       "(start time and SYN counters estimated)",
    "ring_full": "events the full ring refused (kept in the entry's missed mask)",
    "table_full": "new connections refused by the full table",
    "untracked_packets": "packets of connections the full table could not track",
    "untracked_bytes": "bytes of connections the full table could not track",
    "early_drops": "unassured entries dropped early under table pressure",
    "outbox_full": "DESTROYs that found the outbox full",
    "missed_redelivered": "events that carried earlier missed events out",
    "destroy_retries": "DESTROYs the sweeper emitted again for want of an ack",
}


def parse_listen(text: str, option: str = "--metrics") -> tuple[str, int]:
    """ADDR:PORT (IPv6 as [ADDR]:PORT); ConfigError if malformed."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"{option} expects ADDR:PORT like 127.0.0.1:9108, got {text!r}")
    return host, int(port)


class Metrics:
    """The exporter: serve() binds, start(session) begins reading it,
    aclose() stops reading and shuts the server down (idempotent)."""

    def __init__(self, host: str, port: int, walk_max: int = WALK_MAX,
                 walk_interval: float = WALK_INTERVAL):
        self.host, self.port = host, port
        self.registry = CollectorRegistry(auto_describe=False)
        self.ack_latency = Histogram(
            "ctstream_kafka_ack_latency_seconds",
            "time from a send to Kafka to its acknowledgement (acks=all)",
            buckets=ACK_BUCKETS, registry=self.registry)
        self.collector = SessionCollector(walk_max, walk_interval)
        self.registry.register(self.collector)
        self._server = None
        self._thread = None

    def serve(self) -> "Metrics":
        try:
            self._server, self._thread = start_http_server(self.port, self.host, self.registry)
        except OSError as exc:
            raise StreamerError(f"--metrics {self.host}:{self.port}: cannot listen: "
                                f"{exc.strerror or exc}") from exc
        self.port = self._server.server_address[1]
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)
        return self

    # ---- a Session part ----------------------------------------------------------------
    async def start(self, session) -> None:
        sink = session.sink
        if hasattr(sink, "on_ack"):
            before = sink.on_ack

            def on_ack(records: int, latency_s: float) -> None:
                self.ack_latency.observe(latency_s)
                if before is not None:
                    before(records, latency_s)
            sink.on_ack = on_ack
        self.collector.attach(session)

    async def aclose(self) -> None:
        # Waits for a scrape in progress (bounded by the walk's bound).
        await asyncio.to_thread(self.collector.detach)
        await asyncio.to_thread(self.close)

    def close(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            server.shutdown()
            server.server_close()
            self._thread.join(timeout=5)


class SessionCollector:
    """Reads a daemon.Session at scrape time (in the HTTP server's thread)."""

    def __init__(self, walk_max: int, walk_interval: float):
        self.walk_max = walk_max
        self.walk_interval = walk_interval
        self._lock = threading.Lock()
        self._session = None
        self._walk: dict | None = None      # (proto, state) -> count, from the last walk
        self._walk_at = 0.0                 # monotonic time of the last walk
        self._walk_skipped = False

    def attach(self, session) -> None:
        with self._lock:
            self._session = session

    def detach(self) -> None:
        with self._lock:
            self._session = None

    def collect(self):
        with self._lock:
            s = self._session
            if s is None:
                return
            try:
                families = list(self._families(s))
            except Exception as exc:  # a scrape must not take the daemon down
                log.error("metrics: reading the daemon's state failed: %s", exc)
                return
        yield from families

    def _families(self, s):
        st = s.status()
        counters = s.counters()

        ev = CounterMetricFamily("ctstream_events", "events read from the ring, by type",
                                 labels=["type"])
        for etype, name in EVENT_TYPES.items():
            ev.add_metric([name], s.events_by_type[etype])
        yield ev
        yield CounterMetricFamily(
            "ctstream_events_missed_redelivered",
            "events read that carried a non-zero missedEvents mask", value=s.missed_redelivered)
        yield CounterMetricFamily(
            "ctstream_destroy_retries",
            "DESTROYs read that were re-emitted for want of an ack (retries > 0)",
            value=s.destroy_retries)
        for name in abi.STAT_NAMES:
            yield CounterMetricFamily(f"ctstream_datapath_{name}",
                                      f"datapath counter {name}" + (f": {_HELP[name]}" if name in _HELP else ""),
                                      value=counters[name])

        for name in abi.SYN_STAT_NAMES:
            yield CounterMetricFamily(f"ctstream_datapath_{name}",
                                      f"datapath counter {name}" + (f": {_HELP[name]}" if name in _HELP else ""),
                                      value=counters.get(name, 0))
        yield CounterMetricFamily("ctstream_syn_cookie_mode_seconds",
                                  "seconds with SYN cookies sent from XDP (on: all; auto: "
                                  "the status intervals in which any were)",
                                  value=s.syn_cookie_seconds)
        yield _gauge("ctstream_table_entries", "connections in the table, live and in the outbox",
                     counters["entries"])
        yield _gauge("ctstream_table_max_entries", "the table's limit", s.cfg.table_limit)
        yield _gauge("ctstream_outbox_entries", "ended connections whose DESTROY awaits its ack",
                     counters["outbox"])
        yield _gauge("ctstream_sink_backlog", "events written, not yet committed", s.sink.backlog())
        yield _gauge("ctstream_reader_paused", "1 while the ring reader waits for the sink",
                     int(s.reader_paused))
        if "spool_records" in st:
            yield _gauge("ctstream_spool_records", "records in the spool, not yet in Kafka",
                         st["spool_records"])
            yield _gauge("ctstream_spool_bytes", "bytes in the spool, not yet in Kafka",
                         st["spool_bytes"])
            yield _gauge("ctstream_spool_max_bytes", "the spool's bound", st["spool_max"])
            yield _gauge("ctstream_spool_writable",
                         "0 while the spool's disk refuses writes (full, read-only, I/O errors)",
                         int(st.get("spool_write_error") is None))
            yield CounterMetricFamily("ctstream_spool_write_failures",
                                      "spool syncs the disk failed", value=st.get("spool_write_failures", 0))
            yield CounterMetricFamily("ctstream_spool_refused_events",
                                      "CREATE/UPDATE/LOST records a full or failing spool refused",
                                      value=st.get("spool_refused_events", 0))
        if "kafka_connected" in st:
            yield _gauge("ctstream_kafka_connected", "1 while the producer is connected",
                         int(bool(st["kafka_connected"])))
            yield _gauge("ctstream_kafka_in_flight", "records sent, not yet acknowledged",
                         st["in_flight"])
            yield CounterMetricFamily("ctstream_kafka_acked_records",
                                      "records Kafka acknowledged", value=st["kafka_acked"])

        yield from self._states(s, counters["entries"])

    def _states(self, s, entries: int):
        now = time.monotonic()
        if self._walk is None or now - self._walk_at >= self.walk_interval:
            self._walk_skipped = entries > self.walk_max
            if not self._walk_skipped:
                self._walk = walk_states(s.dp.fd("ct4"), s.dp.fd("ct6"), self.walk_max)
                self._walk_at = now
        yield _gauge("ctstream_connections_walk_skipped",
                     f"1: the table holds more than {self.walk_max} entries, per-state counts "
                     f"are not walked (ctstream_connections is from the last walk, if any)",
                     int(self._walk_skipped))
        if self._walk is None:
            return
        yield _gauge("ctstream_connections_walk_age_seconds",
                     "age of the per-state counts", now - self._walk_at)
        g = GaugeMetricFamily("ctstream_connections",
                              "live connections by protocol and TCP state (other protocols: "
                              "state NONE), from a walk of the table", labels=["proto", "state"])
        for (proto, state), n in sorted(self._walk.items()):
            g.add_metric([proto, state], n)
        yield g


def _gauge(name: str, doc: str, value) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


_PROTO_OFF = {4: abi.KEY4.offsets()["proto"], 6: abi.KEY6.offsets()["proto"]}
_DYING_OFF = {4: abi.KEY4.offsets()["dying"], 6: abi.KEY6.offsets()["dying"]}
_ENTRY = struct.Struct(abi.ENTRY.fmt)


def walk_states(fd4: int, fd6: int, limit: int) -> dict[tuple[str, str], int]:
    """Live connections by (protocol, state), from at most `limit` keys of
    each table (the kernel restarts an iteration under deletes, so a walk is
    bounded by the keys it visits, not by the table's size)."""
    out: collections.Counter = collections.Counter()
    from ..datapath.table import entry_size

    for family, fd, size in ((4, fd4, abi.KEY4.size), (6, fd6, abi.KEY6.size)):
        value_size = entry_size(fd)
        seen = set()
        for n, key in enumerate(bpfsys.map_keys(fd, size)):
            if n >= limit:
                break
            if key in seen or key[_DYING_OFF[family]] & abi.KEY_DYING:
                continue
            seen.add(key)
            val = bpfsys.map_lookup(fd, key, value_size)
            if val is None:
                continue
            fields = _ENTRY.unpack_from(val)
            last, status_seq = fields[2], fields[7]
            if last & (abi.LAST_DEAD | abi.LAST_OUTBOX):
                continue  # ended: in the outbox, or being moved there
            proto_num = key[_PROTO_OFF[family]]
            proto = abi.PROTO_NAMES.get(proto_num, str(proto_num))
            state = abi.STATE_NAMES.get(status_seq & 0xFF, "NONE") if proto_num == 6 else "NONE"
            out[(proto, state)] += 1
    return dict(out)
