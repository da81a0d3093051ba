"""The Kafka sink: events to Kafka, with the durable spool as the fallback
that keeps the delivery promise while Kafka is down or slow.

Two paths, and the rule that picks one at each commit:

- live: the spool holds nothing undelivered and the producer is connected.
  The commit sends the batch and returns when Kafka acknowledged all of it
  (acks=all); the daemon then acks the batch's DESTROYs to the kernel.
- spooled: anything else. The commit appends the batch to the spool and
  returns after the fsync; the DESTROYs are acked to the kernel then, so the
  kernel's table does not fill up during a long outage. A drain task
  reconnects and sends the spool in order; only when it is empty does a
  commit go live again, so the events of one connection reach Kafka in the
  order they were made.

A live send that fails or takes longer than the delivery timeout spools the
same batch: Kafka may then hold some of its records twice, which the dedupe
key (nodeId, ctId, seq) absorbs. When the spool is full (its bound is
`spool_max`), a commit refuses the DESTROYs it could not spool: the daemon
does not ack them, the kernel's outbox keeps them and emits them again after
its grace time. A refused CREATE or UPDATE is counted in `spool_refused`;
the kernel does not retry those.

A disk that fails the spool (full, read-only, I/O errors) is a full spool,
not the end of the daemon: the batch the failed sync held is not durable, so
its DESTROYs are refused (the kernel keeps them) and its other records counted
in `spool_refused`; `spool_write_error` says why until a write works again
(status, metrics, the MQTT alert `spool_unwritable`). The archive, on the
same disk, gives its room up first (`ArchiveWriter.shed`). The drain goes on
all the while: it is what frees the disk.

The commit and the drain hold one lock, so the choice between the two paths
and the drain's last batch cannot interleave.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

from ..errors import ConfigError, KafkaUnavailable
from ..datapath.events import LostReport
from .kafka_settings import KafkaSettings
from .producer import Producer
from .records import check_node_id, encode_event, lost_record, message_key
from .ring_records import RingEncoder
from .archive import ArchiveWriter, archive_dir
from .sink import Sink
from .spool import Spool, SpoolError, SpoolFull, SpoolUnwritable, SpoolWriteError
from .wire import encode

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0     # a connection attempt, at start and when draining
RETRY_S = 2.0               # between connection attempts while Kafka is away
DRAIN_BATCH = 5_000         # spooled records per send while draining
MAX_PENDING = 100_000       # written, not yet committed: the reader pauses above


class KafkaSink(Sink):
    name = "kafka"

    def __init__(self, settings: KafkaSettings, spool_dir: str, spool_max: int = 1 << 30,
                 node_id: str | None = None, archive_max: int = 0, archive_s: float = 0.0):
        self.settings = settings.validate()
        self.node_id = check_node_id(node_id or socket.gethostname())
        self.batch_s = settings.linger_ms / 1000
        self.spool_dir = spool_dir
        self.spool_max = spool_max
        # The archive of what was published, for `ctstream replay`
        # (streamer/delivery/archive.py): up to archive_max bytes (0: no archive),
        # records younger than archive_s seconds (0: no age limit). Opened
        # by start(), fed by on_published, closed by aclose().
        if archive_max < 0 or archive_s < 0:
            raise ConfigError(f"archive size and age cannot be negative, got "
                              f"{archive_max} and {archive_s}")
        self.archive_max = archive_max
        self.archive_s = archive_s
        self.archive: ArchiveWriter | None = None
        # Observers: on_ack(records, latency_s) for every send() Kafka
        # acknowledged (metrics); on_published(batch) with the (key, value,
        # time_ms) of records now in Kafka, live or from the spool (archive).
        self.on_ack = None
        self.on_published = None
        self.producer = Producer(settings, on_ack=self._acked)
        self.spool: Spool | None = None
        # Records written and not yet committed, (key, value, time_ms), and
        # the ack references of the DESTROYs among them by index.
        self._pending: list[tuple[bytes, bytes, int]] = []
        self._refs: dict[int, tuple] = {}
        self._encoder: RingEncoder | None = None
        self._lock = asyncio.Lock()
        self._kick = asyncio.Event()
        self._drainer: asyncio.Task | None = None
        self.error: str | None = None        # why Kafka is not used now, for status
        self.spool_refused = 0               # CREATE/UPDATE/LOST the full spool refused
        self.sent_live = 0
        self.sent_from_spool = 0
        self.spooled = 0
        self.spool_write_error: str | None = None   # why the spool's disk refuses writes

    def _acked(self, records: int, latency_s: float) -> None:
        if self.on_ack is not None:
            self.on_ack(records, latency_s)

    # ---- lifecycle ---------------------------------------------------------------
    async def start(self) -> None:
        try:
            os.makedirs(self.spool_dir, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot make the spool directory {self.spool_dir}: "
                              f"{exc.strerror}") from exc
        self.spool = await asyncio.to_thread(Spool.open, self.spool_dir, self.spool_max)
        rec = self.spool.recovery
        for problem in rec.problems:
            log.error("spool %s: %s", self.spool_dir, problem)
        if rec.skipped_records or rec.skipped_bytes:
            log.error("spool %s: skipped %d damaged record(s), %d byte(s); kept %d",
                      self.spool_dir, rec.skipped_records, rec.skipped_bytes, rec.records)
        if self.spool.depth_records:
            log.warning("spool %s holds %d record(s) not yet in Kafka: draining them first",
                        self.spool_dir, self.spool.depth_records)
        if self.archive_max:
            # Before the first send: live and drained records alike go in.
            try:
                self.archive = await asyncio.to_thread(
                    ArchiveWriter.open, archive_dir(self.spool_dir), self.archive_max,
                    self.archive_s)
            except BaseException:
                await asyncio.to_thread(self.spool.close)
                raise
            earlier, add = self.on_published, self.archive.add
            self.on_published = add if earlier is None else (
                lambda batch: (earlier(batch), add(batch)))
        await self._connect()
        self._drainer = asyncio.create_task(self._drain_loop(), name="ctstream-spool-drain")
        self._kick.set()

    async def aclose(self) -> None:
        try:
            if self._drainer is not None:
                self._drainer.cancel()
                try:
                    await self._drainer
                except (asyncio.CancelledError, Exception):
                    pass
            await self.producer.stop()
            if self.spool is not None:
                await asyncio.to_thread(self.spool.close)
        finally:
            # Last: the producer's final acknowledgements are archived too.
            if self.archive is not None:
                await asyncio.to_thread(self.archive.close)

    # ---- the sink contract ----------------------------------------------------------
    def write(self, ev) -> None:
        if isinstance(ev, LostReport):
            rec = lost_record(LostReport(ev.time_ms, ev.interval_s, ev.totals or ev.lost),
                              self.node_id)
            self._pending.append((message_key(rec), encode(rec), ev.time_ms))
            return
        key, value = encode_event(ev, self.node_id)
        if ev.ack_ref is not None:
            self._refs[len(self._pending)] = ev.ack_ref
        self._pending.append((key, value, ev.time_ms))

    def ring_writer(self, clock):
        # The daemon's path: key and value straight from the ring record's
        # bytes (streamer/delivery/ring_records.py, about 4 us less per event than
        # abi.RawEvent, a dict and msgpack's Packer).
        self._encoder = RingEncoder(self.node_id, clock)
        encode = self._encoder.encode

        def write_record(view):
            record, ref, etype, missed, retries = encode(view)
            pending = self._pending
            if ref is not None:
                self._refs[len(pending)] = ref
            pending.append(record)
            return ref, etype, missed, retries
        return write_record

    def backlog(self) -> int:
        return len(self._pending)

    async def commit_async(self) -> set:
        batch, self._pending = self._pending, []
        refs, self._refs = self._refs, {}
        if not batch:
            return set()
        if self._encoder is not None:
            self._encoder.refresh()     # a stepped wall clock reaches the next records
        async with self._lock:
            if self.producer.connected and self.spool.depth_records == 0:
                try:
                    await self.producer.send(batch)
                    self.sent_live += len(batch)
                    if self.on_published is not None:
                        self.on_published(batch)
                    return set()
                except KafkaUnavailable as exc:
                    self._lost_kafka(str(exc))
            return await self._to_spool(batch, refs)

    async def _to_spool(self, batch, refs: dict) -> set:
        """Spool the batch; the ack references of the DESTROYs that are not
        durable (full spool, failing disk): the kernel keeps those."""
        refused = set()
        spool, plain = self.spool, 0
        unwritable = None
        for i, (key, value, time_ms) in enumerate(batch):
            try:
                spool.append(key, value, time_ms)
            except SpoolFull as exc:
                ref = refs.get(i)
                if ref is not None:
                    refused.add(ref)
                else:
                    self.spool_refused += 1
                if isinstance(exc, SpoolUnwritable):
                    unwritable = str(exc)
                continue
            if i not in refs:
                plain += 1
        try:
            await asyncio.to_thread(spool.sync)
        except SpoolWriteError as exc:
            # Nothing of the batch is durable: no DESTROY of it is acked.
            self.spool_refused += plain
            self._disk_failed(str(exc))
            return set(refs.values())
        if unwritable is not None:
            self._disk_failed(unwritable)
        elif self.spool_write_error is not None and spool.write_error is None:
            log.warning("spool %s: writing again", self.spool_dir)
            self.spool_write_error = None
        self.spooled += plain + len(refs) - len(refused)
        if refused and unwritable is None:
            log.warning("spool %s is full (%d bytes): %d DESTROY(s) stay in the kernel's "
                        "outbox until there is room", self.spool_dir, self.spool.depth_bytes,
                        len(refused))
        self._kick.set()
        return refused

    def _disk_failed(self, why: str) -> None:
        if self.spool_write_error is None:
            log.error("%s; DESTROYs stay in the kernel's outbox, other records are counted "
                      "as refused, until it writes again", why)
        self.spool_write_error = why
        if self.archive is not None:
            self.archive.shed()     # the archive's room goes to the spool first
        self._kick.set()

    # ---- Kafka away and back ------------------------------------------------------------
    async def _connect(self) -> bool:
        try:
            await self.producer.start(timeout_s=CONNECT_TIMEOUT_S)
        except (KafkaUnavailable, ConfigError) as exc:
            self._lost_kafka(str(exc))
            return False
        if self.error is not None:
            log.warning("Kafka at %s is back", self.settings.bootstrap)
        self.error = None
        return True

    def _lost_kafka(self, why: str) -> None:
        if why != self.error:
            log.error("Kafka: %s; spooling to %s", why, self.spool_dir)
        self.error = why

    async def _drain_loop(self) -> None:
        while True:
            if self.spool.cursor_lag and not self.spool.depth_records:
                # Drained, but the delivered cursor is not on disk yet (a full
                # disk): until it is, no delivered segment can go.
                try:
                    await asyncio.wait_for(self._kick.wait(), RETRY_S)
                except TimeoutError:
                    await asyncio.to_thread(self.spool.flush_cursor)
                    continue
            else:
                await self._kick.wait()
            self._kick.clear()
            while self.spool.depth_records:
                if not self.producer.connected and not await self._connect():
                    await asyncio.sleep(RETRY_S)
                    continue
                try:
                    drained = await self._drain_batch()
                except SpoolError as exc:   # a read failed: the disk, again later
                    log.error("spool %s: %s; draining again in %g s", self.spool_dir, exc, RETRY_S)
                    drained = False
                if not drained:
                    await asyncio.sleep(RETRY_S)

    async def _drain_batch(self) -> bool:
        async with self._lock:
            recs = await asyncio.to_thread(self.spool.read, DRAIN_BATCH)
            if not recs:
                return True
            try:
                await self.producer.send([(r.key, r.value, r.time_ms) for r in recs])
            except KafkaUnavailable as exc:
                self._lost_kafka(str(exc))
                return False
            # In Kafka now, whatever the cursor's bookkeeping does next.
            self.sent_from_spool += len(recs)
            if self.on_published is not None:
                self.on_published([(r.key, r.value, r.time_ms) for r in recs])
            await asyncio.to_thread(self.spool.mark_delivered, recs[-1].offset)
            if self.spool.depth_records == 0:
                log.info("spool drained: live again")
            return True

    # ---- state ------------------------------------------------------------------------
    def status(self) -> dict:
        sp = self.spool
        return {
            "kafka_connected": self.producer.connected,
            "kafka_error": self.error,
            "kafka_bootstrap": self.settings.bootstrap,
            "topic": self.settings.topic,
            "node_id": self.node_id,
            "in_flight": self.producer.in_flight,
            "kafka_acked": self.producer.acked,
            "kafka_acked_batches": self.producer.acked_batches,
            "last_ack_time": self.producer.last_ack_time,
            "sent_live": self.sent_live,
            "sent_from_spool": self.sent_from_spool,
            "spooled": self.spooled,
            "spool_dir": self.spool_dir,
            "spool_records": sp.depth_records if sp else 0,
            "spool_bytes": sp.depth_bytes if sp else 0,
            "spool_max": self.spool_max,
            "spool_full": bool(sp and sp.full),
            "spool_full_refusals": sp.full_refusals if sp else 0,
            "spool_refused_events": self.spool_refused,
            "spool_write_error": sp.write_error if sp else None,
            "spool_write_failures": sp.write_failures if sp else 0,
            "spool_cursor_lag": sp.cursor_lag if sp else None,
            "pending": len(self._pending),
            "time": time.time(),
            **(self.archive.stats() if self.archive is not None else {"archive_dir": None}),
        }

