"""The IPFIX exporter: a Kafka consumer group that sends every DESTROY record
to a collector as an IPFIX biflow (streamer/export/ipfix.py), at least once.

Python API (what `ctstream ipfix` calls):

    stats = await export(KafkaSettings(bootstrap="127.0.0.1:19092", topic="ct"),
                         CollectorAddress.parse("127.0.0.1:4739", "udp"),
                         group="ctstream-ipfix", stop=asyncio.Event(), until_idle=3.0)
    stats.exported, stats.skipped, stats.rejected, ...   # ExportStats

How at least once is kept:
- Kafka's auto-commit is off. Each batch that getmany() returns is sent to
  the collector, confirmed (collector.Collector.confirm: TCP acknowledged
  every byte; UDP drew no ICMP error), and only then are the offsets after
  the batch's last records committed to the group. An exporter that dies
  anywhere before the commit leaves the batch uncommitted: the next one of
  the group sends it again. A committed offset is never ahead of an export.
- CREATE, UPDATE, SNAPSHOT and LOST records are read and committed, not
  exported: a DESTROY carries the flow's final counters. A DESTROY that
  cannot be encoded (a field missing or out of range) is logged, counted in
  `rejected` and committed: it would fail the same way every time.
- A collector that cannot be reached, refuses the datagrams or breaks the
  connection ends the export with ExportError, its batch uncommitted.
  Copies are what at least once costs: the datapath re-emits a DESTROY
  until Kafka acknowledged it, and a batch is sent again after a failure,
  so a collector may see a flow twice (same tuple, counters and times).
- A rebalance between the export and the commit makes the commit fail;
  that is logged and counted (`commits_failed`): the partitions' next owner
  sends the batch again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import aiokafka
from aiokafka.errors import (CommitFailedError, IllegalGenerationError, KafkaError,
                             RebalanceInProgressError, UnknownMemberIdError)

from ..delivery import wire
from ..delivery.group_consumer import caught_up, start_group_consumer
from ..delivery.kafka_settings import KafkaSettings
from ..errors import ConfigError, KafkaUnavailable, WireError
from .collector import Collector, CollectorAddress
from .ipfix import Biflow, U32, biflow_of

log = logging.getLogger(__name__)

DEFAULT_GROUP = "ctstream-ipfix"
DEFAULT_DOMAIN = 1
DEFAULT_TEMPLATE_INTERVAL_S = 60.0
# Records per batch. A UDP batch goes out back to back: 2,000 records are
# about 100 datagrams, 140 KB, within a collector's default socket buffer.
BATCH_RECORDS = {"udp": 2000, "tcp": 5000}
POLL_MS = 500
_LOST_GROUP = (CommitFailedError, IllegalGenerationError, RebalanceInProgressError,
               UnknownMemberIdError)

AfterExport = Callable[[dict], Awaitable[None]]


@dataclass
class ExportStats:
    records: int = 0            # Kafka records read
    exported: int = 0           # DESTROYs sent as IPFIX data records
    skipped: int = 0            # records of other types (committed, not exported)
    rejected: int = 0           # DESTROYs (or values) that could not be encoded
    messages: int = 0           # IPFIX messages of data records
    template_messages: int = 0
    batches: int = 0
    commits_failed: int = 0     # a rebalance came between export and commit
    by_partition: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0


def check_options(group: str, domain: int, template_interval_s: float,
                  until_idle: float | None, session_timeout_s: float) -> None:
    """ConfigError (naming the setting) for a value export() cannot use."""
    if not isinstance(group, str) or not 1 <= len(group) <= 249:
        raise ConfigError(f"consumer group must be 1..249 characters, got {group!r}",
                          setting="group")
    if isinstance(domain, bool) or not isinstance(domain, int) or not 0 <= domain < U32:
        raise ConfigError(f"observation domain must be an integer in 0..{U32 - 1}, got "
                          f"{domain!r}", setting="observation-domain")
    if not 1 <= template_interval_s <= 86_400:
        raise ConfigError(f"template interval must be in [1, 86400] seconds, got "
                          f"{template_interval_s:g}", setting="template-interval")
    if until_idle is not None and not 0 < until_idle <= 86_400:
        raise ConfigError(f"until-idle must be in (0, 86400] seconds, got {until_idle:g}",
                          setting="until-idle")
    if not 6 <= session_timeout_s <= 300:
        raise ConfigError(f"session timeout must be in [6, 300] seconds (the broker's "
                          f"default bounds), got {session_timeout_s:g}", setting="session-timeout")


async def export(settings: KafkaSettings, address: CollectorAddress, *,
                 group: str = DEFAULT_GROUP, domain: int = DEFAULT_DOMAIN,
                 template_interval_s: float = DEFAULT_TEMPLATE_INTERVAL_S,
                 stop: asyncio.Event | None = None, until_idle: float | None = None,
                 connect_timeout_s: float = 15.0, session_timeout_s: float = 10.0,
                 after_export: AfterExport | None = None) -> ExportStats:
    """Export `settings.topic`'s DESTROYs to the collector at `address` (see
    the module docstring) until `stop` is set or, with `until_idle`, every
    assigned partition is read to its end and nothing came for that long.
    `after_export(offsets)` is awaited between a batch's export and its
    commit (a seam for tests). The collector is reached first: one that
    cannot be is an ExportError before Kafka is asked for anything."""
    settings.validate()
    check_options(group, domain, template_interval_s, until_idle, session_timeout_s)
    stop = stop or asyncio.Event()
    started = time.monotonic()
    stats = ExportStats()
    collector = Collector(address, domain, template_interval_s)
    try:
        await collector.open()
        consumer = await _start_or_stop(settings, group, connect_timeout_s, session_timeout_s,
                                        BATCH_RECORDS[address.transport], stop)
        if consumer is not None:
            try:
                consumer.subscribe([settings.topic])
                await _loop(consumer, collector, stats, stop, until_idle, after_export)
            finally:
                try:
                    async with asyncio.timeout(10):
                        await consumer.stop()     # leaves the group: others take over at once
                except Exception as exc:
                    log.debug("stopping the Kafka consumer: %r", exc)
    finally:
        stats.template_messages = collector.template_messages
        collector.close()
    stats.seconds = round(time.monotonic() - started, 3)
    return stats


async def _start_or_stop(settings, group, timeout_s, session_timeout_s, batch,
                         stop: asyncio.Event) -> aiokafka.AIOKafkaConsumer | None:
    """The started consumer, or None if `stop` came first."""
    starting = asyncio.create_task(
        start_group_consumer(settings, group, role="ipfix", timeout_s=timeout_s,
                             session_timeout_s=session_timeout_s, max_records=batch))
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if starting.done():
        return starting.result()
    starting.cancel()
    await asyncio.gather(starting, return_exceptions=True)
    return None


async def _loop(consumer, collector: Collector, stats: ExportStats, stop: asyncio.Event,
                until_idle: float | None, after_export: AfterExport | None) -> None:
    stopping = asyncio.create_task(stop.wait())
    last_change = time.monotonic()
    try:
        while not stop.is_set():
            fetch = asyncio.create_task(consumer.getmany(timeout_ms=POLL_MS))
            await asyncio.wait({fetch, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not fetch.done():
                fetch.cancel()
                await asyncio.gather(fetch, return_exceptions=True)
                break
            try:
                batch = {tp: msgs for tp, msgs in fetch.result().items() if msgs}
            except KafkaError as exc:
                raise KafkaUnavailable(f"Kafka consumer failed: {exc}") from exc
            if batch:
                await _export_batch(consumer, collector, batch, stats, after_export)
                last_change = time.monotonic()
                continue
            await collector.refresh_templates()
            if until_idle is not None and time.monotonic() - last_change >= until_idle \
                    and await caught_up(consumer, timeout_s=5.0, when_unassigned=False):
                log.info("caught up and idle for %gs: stopping", until_idle)
                break
    finally:
        stopping.cancel()


async def _export_batch(consumer, collector: Collector, batch: dict, stats: ExportStats,
                        after_export: AfterExport | None) -> None:
    flows: list[Biflow] = []
    ends = {}
    for tp, msgs in batch.items():
        ends[tp] = msgs[-1].offset + 1
        stats.by_partition[tp.partition] = stats.by_partition.get(tp.partition, 0) + len(msgs)
        for m in msgs:
            flow = _flow_of(m, stats)
            if flow is not None:
                flows.append(flow)
    stats.records += sum(len(msgs) for msgs in batch.values())
    if flows:
        messages = await collector.send(flows)
        await collector.confirm()
        stats.exported += len(flows)
        stats.messages += messages
    stats.batches += 1
    if after_export is not None:
        await after_export({tp.partition: end for tp, end in ends.items()})
    try:
        await consumer.commit(ends)
    except _LOST_GROUP as exc:
        stats.commits_failed += 1
        log.warning("offsets not committed (%s): the partitions' next owner exports the "
                    "batch again", type(exc).__name__)
    except KafkaError as exc:
        raise KafkaUnavailable(f"cannot commit offsets to Kafka: {exc}") from exc


def _flow_of(m, stats: ExportStats) -> Biflow | None:
    try:
        record = wire.decode(m.value)
        if record.get("eventType") != "DESTROY":
            stats.skipped += 1
            return None
        return biflow_of(record)
    except WireError as exc:
        stats.rejected += 1
        log.warning("partition %d offset %d: not exported: %s", m.partition, m.offset, exc)
        return None
