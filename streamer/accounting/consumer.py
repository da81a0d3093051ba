"""The accounting consumer: a Kafka consumer group that applies the stream to
the accounting database exactly once.

Python API (what `ctstream account` and the pipeline demo call):

    stats = await consume(KafkaSettings(bootstrap="127.0.0.1:19092", topic="ct"),
                          "sqlite:/tmp/acct.db", group="ctstream-account",
                          stop=asyncio.Event(), until_idle=3.0)
    stats.flows, stats.events, stats.duplicates, ...   # AccountStats

`consume` returns when `stop` is set (after the batch in hand is committed),
or, with `until_idle`, once every partition assigned to it is read up to its
end and nothing arrived for `until_idle` seconds. It raises ConfigError for
bad settings or an unknown topic, DatabaseError (a StreamerError) when the
database cannot be reached or written, and KafkaUnavailable when Kafka
cannot be reached within `connect_timeout_s`.

How exactly once is kept:
- Kafka's auto-commit is off and nothing is committed to Kafka: each batch
  that getmany() returns is applied in ONE database transaction that also
  stores, per partition, the offset after the batch's last record
  (ledger.apply). The rows and the offsets are committed together or not at
  all, whatever kills the process.
- When the group assigns partitions to this consumer, it seeks each one to
  the offset stored in the database (the beginning if none is stored), so the
  database, not Kafka, says where to resume.
- Records read twice anyway (a consumer that lost its partitions in a
  rebalance but still commits its last batch; the producer's own retries; a
  DESTROY re-emitted by the datapath) are removed by the dedupe key
  (nodeId, ctId, seq) in the same transaction.

Records of every schema version in wire.READABLE_VERSIONS (1 and 2) are
accounted alike (ledger.decode_message), so a topic written across an
upgrade, or a replay of an older archive, needs nothing special.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from dataclasses import dataclass, field

import aiokafka
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError

from ..errors import ConfigError, KafkaUnavailable, StreamerError
from ..delivery.group_consumer import caught_up, start_group_consumer
from ..delivery.kafka_settings import KafkaSettings
from . import ledger
from .db import Database, open_database, parse_url

log = logging.getLogger(__name__)

DEFAULT_GROUP = "ctstream-account"
# Records per transaction at most (aiokafka's max_records of one getmany).
BATCH_RECORDS = 5000
POLL_MS = 500


@dataclass
class AccountStats(ledger.BatchResult):
    """What one consume() call did (ledger.BatchResult's counts summed over
    its batches), and the partitions it held last."""

    batches: int = 0
    partitions: list[int] = field(default_factory=list)   # held at the end
    # Records applied per partition (a partition held for a while but
    # already read to its end does not appear).
    by_partition: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, res: ledger.BatchResult) -> None:
        super().add(res)
        self.batches += 1

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["by_partition"] = {str(p): n for p, n in sorted(self.by_partition.items())}
        return d


class _Assignment(ConsumerRebalanceListener):
    """Seeks newly assigned partitions to the offsets stored in the database.

    The partitions are paused first, synchronously: aiokafka would otherwise
    start fetching them from Kafka's committed offset or its reset policy
    while the stored offsets are being read, and a batch from the wrong
    place would be applied (and its offset stored). aiokafka only logs a
    listener's exceptions; the consume loop re-raises the one kept in
    `failure`."""

    def __init__(self, run: "_Run"):
        self.run = run
        self.generations = 0
        self.failure: BaseException | None = None

    async def on_partitions_revoked(self, revoked) -> None:
        # Nothing to commit: each batch committed its offsets with its rows.
        # But a batch may be in its transaction now: wait for it (the one
        # database thread runs calls in order) before aiokafka rejoins, so the
        # partitions' next owner does not start on that batch's rows while
        # they are still locked, nor read an offset that then moves back.
        if revoked:
            await self.run.db_call(lambda: None)
            log.info("partitions %s of %s revoked", _plist(revoked), self.run.topic)

    async def on_partitions_assigned(self, assigned) -> None:
        consumer = self.run.consumer
        mine = [tp for tp in assigned if tp.topic == self.run.topic]
        consumer.pause(*mine)
        try:
            await self._seek(mine)
        except BaseException as exc:
            self.failure = exc       # the partitions stay paused
            raise
        else:
            consumer.resume(*mine)
        finally:
            self.generations += 1
            self.run.changed()

    async def _seek(self, mine) -> None:
        consumer = self.run.consumer
        parts = sorted(tp.partition for tp in mine)
        stored = await self.run.db_call(
            self.run.db.transaction, ledger.stored_offsets, self.run.topic, parts)
        # Records below a partition's log start were deleted by retention before
        # they were accounted: say so (aiokafka would reset to the start quietly).
        held = [tp for tp in mine if tp.partition in stored]
        starts = await consumer.beginning_offsets(held) if held else {}
        for tp in mine:
            if tp.partition in stored:
                if stored[tp.partition] < starts.get(tp, 0):
                    log.error("partition %d of %s: records %d..%d were deleted by Kafka's "
                              "retention before they were accounted", tp.partition,
                              self.run.topic, stored[tp.partition], starts[tp] - 1)
                consumer.seek(tp, stored[tp.partition])
            else:
                await consumer.seek_to_beginning(tp)
        self.run.next_offset = {tp.partition: await consumer.position(tp) for tp in mine}
        self.run.partitions = parts
        log.info("assigned partitions %s of %s; resuming at %s", _plist(mine), self.run.topic,
                 ", ".join(f"{p}:{stored.get(p, 'beginning')}" for p in parts) or "-")


def _plist(tps) -> str:
    return ",".join(str(p) for p in sorted(tp.partition for tp in tps)) or "none"


class _Run:
    def __init__(self, settings: KafkaSettings, db: Database, group: str):
        self.settings = settings
        self.topic = settings.topic
        self.db = db
        self.group = group
        self.consumer: aiokafka.AIOKafkaConsumer | None = None
        self.partitions: list[int] = []
        # Per assigned partition, the offset the next applied record must
        # have at least (set by the seek): older ones were fetched before it.
        self.next_offset: dict[int, int] = {}
        self.last_change = time.monotonic()
        # One thread owns the database connection; calls queue in order.
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ctstream-db")

    def changed(self) -> None:
        self.last_change = time.monotonic()

    async def db_call(self, fn, *args):
        # A transaction in the worker thread is never abandoned half way:
        # cancelling the caller waits for it to finish.
        fut = asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            await asyncio.wait([fut])
            raise


async def consume(settings: KafkaSettings, db_url: str, *, group: str = DEFAULT_GROUP,
                  stop: asyncio.Event | None = None, until_idle: float | None = None,
                  connect_timeout_s: float = 15.0, session_timeout_s: float = 10.0) -> AccountStats:
    """Consume `settings.topic` into the database at `db_url` (see the module
    docstring). `group` is the Kafka consumer group; consumers with the same
    group split the partitions."""
    target = parse_url(db_url)
    settings.validate()
    if not group or len(group) > 249:
        raise ConfigError(f"consumer group must be 1..249 characters, got {group!r}")
    if until_idle is not None and not 0 < until_idle <= 86_400:
        raise ConfigError(f"--until-idle must be in (0, 86400] seconds, got {until_idle}")
    if not 6 <= session_timeout_s <= 300:
        raise ConfigError(f"--session-timeout must be in [6, 300] seconds (the broker's "
                          f"default bounds), got {session_timeout_s}")
    stop = stop or asyncio.Event()
    started = time.monotonic()
    stats = AccountStats()
    db = await asyncio.to_thread(open_database, target)
    run = _Run(settings, db, group)
    try:
        starting = asyncio.create_task(
            start_group_consumer(settings, group, role="account", timeout_s=connect_timeout_s,
                                 session_timeout_s=session_timeout_s,
                                 max_records=BATCH_RECORDS))
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not starting.done():          # stopped while still connecting
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            return stats
        run.consumer = starting.result()
        try:
            listener = _Assignment(run)
            run.consumer.subscribe([settings.topic], listener=listener)
            await _loop(run, listener, stats, stop, until_idle)
        finally:
            try:
                async with asyncio.timeout(10):
                    await run.consumer.stop()   # leaves the group: others take over at once
            except Exception as exc:
                log.debug("stopping the Kafka consumer: %r", exc)
    finally:
        await run.db_call(db.close)
        run.pool.shutdown(wait=True)
    stats.partitions = run.partitions
    stats.seconds = round(time.monotonic() - started, 3)
    return stats


async def _loop(run: _Run, listener: _Assignment, stats: AccountStats, stop: asyncio.Event,
                until_idle: float | None) -> None:
    consumer = run.consumer
    stopping = asyncio.create_task(stop.wait())
    try:
        while not stop.is_set():
            fetch = asyncio.create_task(consumer.getmany(timeout_ms=POLL_MS, max_records=BATCH_RECORDS))
            await asyncio.wait({fetch, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not fetch.done():
                fetch.cancel()
                await asyncio.gather(fetch, return_exceptions=True)
                break
            if listener.failure is not None:
                raise _as_streamer_error(listener.failure)
            try:
                batch = fetch.result()
            except KafkaError as exc:
                raise KafkaUnavailable(f"Kafka consumer failed: {exc}") from exc
            if any(batch.values()):
                await _apply(run, batch, stats)
                run.changed()
                continue
            if until_idle is not None and listener.generations > 0 \
                    and time.monotonic() - run.last_change >= until_idle \
                    and await caught_up(consumer, timeout_s=5.0, when_unassigned=True):
                log.info("caught up and idle for %gs: stopping", until_idle)
                break
    finally:
        stopping.cancel()


async def _apply(run: _Run, batch: dict, stats: AccountStats) -> None:
    messages, ends = [], {}
    for tp, msgs in batch.items():
        floor = run.next_offset.get(tp.partition)
        if floor is None:
            continue   # fetched before a rebalance took the partition away
        fresh = [m for m in msgs if m.offset >= floor]
        if fresh:
            messages += fresh
            ends[tp.partition] = fresh[-1].offset + 1
    if not messages:
        return
    prepared = ledger.prepare(messages)
    offsets = ledger.Offsets(run.topic, run.group, ends)
    res = await run.db_call(run.db.transaction, ledger.apply, prepared, offsets)
    for p, end in ends.items():
        if p in run.next_offset:
            run.next_offset[p] = max(run.next_offset[p], end)
    for m in messages:
        stats.by_partition[m.partition] = stats.by_partition.get(m.partition, 0) + 1
    stats.add(res)
    log.debug("batch: %s", res)


def _as_streamer_error(exc: BaseException) -> BaseException:
    if isinstance(exc, StreamerError):
        return exc
    return StreamerError(f"could not seek the assigned partitions: {exc!r}")
