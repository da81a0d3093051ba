"""The Kafka producer: (key, value, timestamp) records to one topic,
idempotent, acks=all.

`Producer.send(records)` returns when Kafka has acknowledged every record of
the call, and raises KafkaUnavailable when it cannot say so within the
delivery timeout. The caller (the daemon) spools what was not acknowledged.

Why not AIOKafkaProducer.send() per record: one future, one partitioner call
and one metadata check per record cost more than the whole rest of the path.
Instead records go into ctstream's own record batches, one open batch per
partition (the Java client's murmur2 partitioner, so keys map as Java
producers map them), filled by as many calls as arrive, and a pump task per
partition hands them to aiokafka with send_batch(): at most two per
partition at a time, one in flight and one ready. aiokafka sends one request
per broker at a time with one batch per partition in it, so while a request
is out the open batches grow; under load a request carries up to
max_batch_bytes per partition, at low rates a call goes out at once.
aiokafka still does the sending: producer id and sequence numbers
(idempotence), retries in place.

Ordering: a call adds all its records without awaiting, under a FIFO lock,
so calls fill batches in call order; a partition's batches go to aiokafka
oldest first, and aiokafka never has two of a partition's batches in flight
(a retried batch keeps its sequence number and its place). The events of one
key therefore reach their partition in the order of the calls.

Timestamps: each record's Kafka timestamp (CreateTime) is the one it comes
with, the event's observationTimeMilliseconds, never the time of sending:
records sent from the spool after an outage, or again by `ctstream replay`,
keep the time of their event, so consumers' time-based seeks
(offsets_for_times) find them where the events happened. The int is the
one the caller's tuple holds already: nothing is made per record for it.

Bounded: at most `max_in_flight_records` records are between send() and
their acknowledgement; a call waits for room, in call order.

Failure: with idempotence on, aiokafka retries a batch forever and never
fails it on its own. When a call's records are not acknowledged within
`delivery_timeout_ms`, or anything fails, the producer disconnects: every
call in flight raises KafkaUnavailable, and aiokafka's client is closed.
Records already written by Kafka may then be delivered again after start()
reconnects; the dedupe key (nodeId, ctId, seq) removes such duplicates.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import logging
import ssl
import struct
import time
from typing import Callable

import aiokafka
from aiokafka.errors import KafkaError, TopicAuthorizationFailedError

from . import wire
from ..errors import ConfigError, KafkaUnavailable, StreamerError
from .kafka_settings import KafkaSettings, connect_until

log = logging.getLogger(__name__)

# How long start() keeps asking for a topic's metadata before it says the
# topic does not exist (a topic created a moment ago may need a refresh).
TOPIC_GRACE_S = 2.0
# How long tearing down a failed aiokafka client may take.
ABORT_TIMEOUT_S = 5.0
ACK_LATENCY_SAMPLES = 4096


# ---- partitioning -------------------------------------------------------------

_M = 0x5BD1E995
_WORDS: dict[int, struct.Struct] = {}


# Hash states after all whole words but the last, per key length.
_HEAD_STATE: dict[int, dict[bytes, int]] = {}
_HEAD_STATES_MAX = 4096    # per key length; when full, new heads are not kept
_WORD = struct.Struct("<I")


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 of a key as an unsigned 32-bit value: the same hash
    as the Java client's Utils.murmur2 (and aiokafka's DefaultPartitioner),
    about three times as fast as aiokafka's pure-Python version on
    connection keys.

    Keys are b"<nodeId>/<ctId>" and ctIds are handed out in sequence, so
    consecutive keys differ only in their last few bytes: the hash state
    after all whole words but the last is remembered per (length, those
    bytes), and a key then costs one word, its tail and the final mix."""
    n = len(data)
    cut = ((n >> 2) - 1) << 2        # whole words but the last (none if < 8 bytes)
    if cut > 0:
        heads = _HEAD_STATE.get(n)
        if heads is None:
            heads = _HEAD_STATE[n] = {}
        head = data[:cut]
        h = heads.get(head)
        if h is None:
            h = _hash_words(0x9747B28C ^ n, head)
            if len(heads) < _HEAD_STATES_MAX:
                heads[head] = h
        k = _WORD.unpack_from(data, cut)[0] * _M & 0xFFFFFFFF
        h = (h * _M ^ (k ^ k >> 24) * _M) & 0xFFFFFFFF
    else:
        h = _hash_words(0x9747B28C ^ n, data[:(n >> 2) << 2])
    tail = n & 3
    if tail:
        h = (h ^ int.from_bytes(data[n - tail:], "little")) * _M & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * _M) & 0xFFFFFFFF
    return h ^ (h >> 15)


def _hash_words(h: int, data: bytes) -> int:
    words = _WORDS.get(len(data) >> 2)
    if words is None:
        words = _WORDS[len(data) >> 2] = struct.Struct(f"<{len(data) >> 2}I")
    for k in words.unpack_from(data):
        k = k * _M & 0xFFFFFFFF
        # The low 32 bits of a XOR are the XOR of the low 32 bits: one mask.
        h = (h * _M ^ (k ^ k >> 24) * _M) & 0xFFFFFFFF
    return h


def partition_of(key: bytes, partitions: int) -> int:
    """The partition index the Java client's default partitioner picks."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


# ---- the producer -------------------------------------------------------------

class _Batch:
    """One record batch of one partition, filled by one or more send() calls
    and acknowledged as a whole; `acked` is ctstream's own future for it."""

    __slots__ = ("builder", "records", "count", "acked")

    def __init__(self, builder, loop: asyncio.AbstractEventLoop):
        self.builder = builder
        # aiokafka's BatchBuilder.append runs serializers and keeps the
        # record offset in Python around its record-batch builder (C). The
        # records here are bytes already: they go to that inner builder
        # directly, at offset `count` (about 0.2 us less per record), and
        # seal() tells the BatchBuilder how many there are.
        # tests/unit/test_producer_settings.py reads such a batch back.
        self.records = builder._builder
        self.count = 0
        self.acked = loop.create_future()

    def add(self, ts: int, key: bytes, value: bytes, headers) -> bool:
        """Append one record; False if the batch is full (then it is sealed)."""
        if self.records.append(self.count, ts, key, value, headers) is None:
            self.seal()
            return False
        self.count += 1
        return True

    def seal(self) -> None:
        """No more records: aiokafka may send it now."""
        self.builder._relative_offset = self.count
        self.builder.close()
        self.records = None     # aiokafka builds it once and drops its own reference


class _Session:
    """One connected aiokafka producer and its per-partition queues;
    replaced on every (re)connect. The partition count is read at connect."""

    def __init__(self, kafka: aiokafka.AIOKafkaProducer, partitions: list[int]):
        self.kafka = kafka
        self.partitions = partitions
        self.failure: StreamerError | None = None
        # Per partition: batches not yet handed to aiokafka, oldest first; the
        # last one may still take records. submitted: handed over, not acked.
        self.queues = {p: collections.deque() for p in partitions}
        self.submitted = dict.fromkeys(partitions, 0)
        self.wake = {p: asyncio.Event() for p in partitions}
        self.taken: dict[int, _Batch] = {}   # popped by a pump, not yet submitted
        self.unacked: set[_Batch] = set()
        self.pumps: list[asyncio.Task] = []
        self.aborting = False


class Producer:
    """Sends (key, value) records to settings.topic. See the module doc.

    State for `ctstream status` and metrics:
      connected      the last start() succeeded and nothing failed since (it
                     does not watch the socket between calls)
      in_flight      records handed to Kafka, not yet acknowledged
      acked          records acknowledged since this object was made
      last_ack_time  time.time() of the last acknowledgement, or None
      ack_latency    recent send() latencies in seconds (call to last ack)
    `on_ack(records, latency_s)` is called when a send() call's records are
    all acknowledged, e.g. to feed a histogram; it must not block.
    """

    def __init__(self, settings: KafkaSettings,
                 on_ack: Callable[[int, float], None] | None = None):
        self.settings = settings.validate()
        self._on_ack = on_ack
        self.acked = 0
        self.acked_batches = 0   # record batches acknowledged (acked / this: records per batch)
        self.in_flight = 0
        self.last_ack_time: float | None = None
        self.ack_latency: collections.deque[float] = collections.deque(maxlen=ACK_LATENCY_SAMPLES)
        self._session: _Session | None = None
        self._stopped = False
        self._start_lock = asyncio.Lock()
        self._order = asyncio.Lock()   # FIFO: calls enqueue in call order
        self._room = asyncio.Event()
        self._headers = [wire.HEADER]

    @property
    def connected(self) -> bool:
        return self._session is not None and self._session.failure is None

    # ---- start ----------------------------------------------------------------
    async def start(self, timeout_s: float = 15) -> None:
        """Connect, get a producer id, check the topic. Idempotent. Tries
        again until `timeout_s`, then KafkaUnavailable; ConfigError for an
        unknown topic or bad TLS files."""
        async with self._start_lock:
            if self._stopped:
                raise StreamerError("the Kafka producer was stopped; make a new one")
            if self.connected:
                return
            if self._session is not None and not self._session.aborting:
                await self._abort(self._session)   # failed: finish tearing it down
            ctx = self.settings.ssl_context()
            kafka, partitions = await connect_until(
                self.settings, timeout_s, lambda: self._new_client(ctx), self._start_client,
                _close_client)
            session = self._session = _Session(kafka, partitions)
            for p in partitions:
                task = asyncio.create_task(self._pump(session, p), name=f"ctstream-kafka-p{p}")
                task.add_done_callback(lambda t: self._pump_ended(session, t))
                session.pumps.append(task)
            log.info("connected to Kafka at %s, topic %s (%d partitions)",
                     self.settings.bootstrap, self.settings.topic, len(partitions))

    def _new_client(self, ctx: ssl.SSLContext | None) -> aiokafka.AIOKafkaProducer:
        s = self.settings
        return aiokafka.AIOKafkaProducer(
            bootstrap_servers=s.bootstrap, client_id=s.client_id,
            acks="all", enable_idempotence=True,
            compression_type=None if s.compression == "none" else s.compression,
            max_batch_size=s.max_batch_bytes, max_request_size=s.max_batch_bytes + 1024,
            request_timeout_ms=s.request_timeout_ms,
            security_protocol=s.security_protocol, ssl_context=ctx,
            sasl_mechanism=s.sasl_mechanism or "PLAIN",
            sasl_plain_username=s.sasl_username, sasl_plain_password=s.sasl_password)

    async def _start_client(self, kafka: aiokafka.AIOKafkaProducer, deadline: float) -> list[int]:
        """Start a new client; the topic's partitions."""
        await kafka.start()
        return await self._topic_partitions(kafka, deadline)

    async def _topic_partitions(self, kafka: aiokafka.AIOKafkaProducer, deadline: float) -> list[int]:
        # With auto-create off the broker answers "unknown topic" at once;
        # AIOKafkaProducer.partitions_for would retry for request_timeout_ms.
        topic = self.settings.topic
        client = kafka.client
        loop = asyncio.get_running_loop()
        give_up = min(deadline, loop.time() + TOPIC_GRACE_S)
        client.add_topic(topic)
        while True:
            answered = await client.force_metadata_update()
            partitions = client.cluster.partitions_for_topic(topic)
            if partitions:
                return sorted(partitions)
            if topic in client.cluster.unauthorized_topics:
                raise ConfigError(f"not authorized to use topic {topic} on {self.settings.bootstrap}")
            if answered and loop.time() >= give_up:
                raise ConfigError(
                    f"topic {topic} does not exist on {self.settings.bootstrap} (auto-create "
                    f"is off): create it, e.g. scripts/kafka.sh topic create {topic}")
            await asyncio.sleep(0.1)

    # ---- send -----------------------------------------------------------------
    async def send(self, records: list[tuple[bytes, bytes, int]],
                   headers: list[tuple[str, bytes]] | None = None) -> None:
        """Send records, each (key, value, timestamp_ms) as the Kafka sink
        keeps them (the timestamp: the event's observationTimeMilliseconds),
        each with `headers` (default: the schema header of
        wire.SCHEMA_VERSION; replay passes an archived record's own); return
        when Kafka acknowledged all of them (acks=all). KafkaUnavailable if
        not within delivery_timeout_ms (then the producer is disconnected
        and start() reconnects). WireError, before anything is queued, for
        a record that is not such a tuple or does not fit a batch. Waits
        while max_in_flight_records would be exceeded. A call larger than
        that bound goes out in parts."""
        limit = self.settings.max_in_flight_records
        headers = self._headers if headers is None else headers
        for i in range(0, len(records), limit):
            await self._send_part(records[i:i + limit], headers)

    async def _send_part(self, records: list[tuple[bytes, bytes, int]], headers: list) -> None:
        if not records:
            return
        session = self._session
        if session is None or session.failure is not None or self._stopped:
            raise KafkaUnavailable(self._not_connected_reason(session))
        self._check_sizes(records)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        n = len(records)
        try:
            async with asyncio.timeout_at(t0 + self.settings.delivery_timeout_ms / 1000):
                async with self._order:
                    await self._wait_room(session, n)
                    batches = self._append(session, records, headers)
                # asyncio.wait, not gather: a timeout must not cancel them.
                await asyncio.wait([b.acked for b in batches])
            for b in batches:
                if b.acked.exception() is not None:
                    raise copy.copy(b.acked.exception())  # shared by the calls of the batch
        except TimeoutError as exc:
            raise await self._fail(session, KafkaUnavailable(
                f"Kafka at {self.settings.bootstrap} did not acknowledge {n} records within "
                f"{self.settings.delivery_timeout_ms / 1000:g}s (topic {self.settings.topic})")) from exc
        except StreamerError as exc:
            error = await self._fail(session, exc)
            if error is exc:
                raise
            raise error from exc
        except TopicAuthorizationFailedError as exc:
            raise await self._fail(session, ConfigError(
                f"not authorized to write to topic {self.settings.topic} on "
                f"{self.settings.bootstrap}")) from exc
        except (KafkaError, OSError) as exc:
            raise await self._fail(session, KafkaUnavailable(
                f"Kafka at {self.settings.bootstrap} failed {n} records: {exc!r}")) from exc
        latency = loop.time() - t0
        self.ack_latency.append(latency)
        if self._on_ack is not None:
            self._on_ack(n, latency)

    def _check_sizes(self, records) -> None:
        # A record must fit an empty batch (aiokafka would send it anyway and
        # the broker reject it for good), and be a (key, value, timestamp)
        # triple. Checked before any is queued: _append must not fail half way.
        room = self.settings.max_batch_bytes - 256
        try:
            for key, value, _ts in records:
                size = len(key) + len(value)
                if size > room:
                    raise wire.WireError(f"a record of {size} bytes does not fit in a batch of "
                                         f"max_batch_bytes {self.settings.max_batch_bytes}")
        except (TypeError, ValueError) as exc:
            raise wire.WireError(f"records are (key, value, timestamp_ms) tuples: {exc}") from exc

    def _append(self, session: _Session, records, header: list) -> set[_Batch]:
        """Add the records to their partitions' open batches, in call order;
        the batches that hold them. No await: calls cannot interleave."""
        parts = session.partitions
        count = len(parts)
        queues = session.queues
        loop = asyncio.get_running_loop()
        used: dict[int, _Batch] = {}
        touched = set()
        self.in_flight += len(records)
        for key, value, ts in records:
            p = parts[(murmur2(key) & 0x7FFFFFFF) % count]
            batch = used.get(p)
            if batch is None:
                queue = queues[p]
                batch = queue[-1] if queue else self._open_batch(session, p, loop)
                used[p] = batch
                touched.add(batch)
            if not batch.add(ts, key, value, header):   # full (sealed): the next batch takes it
                batch = used[p] = self._open_batch(session, p, loop)
                touched.add(batch)
                batch.add(ts, key, value, header)
        for p in used:
            session.wake[p].set()
        return touched

    @staticmethod
    def _open_batch(session: _Session, p: int, loop: asyncio.AbstractEventLoop) -> _Batch:
        """A new open batch, last in partition p's queue."""
        batch = _Batch(session.kafka.create_batch(), loop)
        session.queues[p].append(batch)
        session.unacked.add(batch)
        return batch

    async def _pump(self, session: _Session, p: int) -> None:
        """Hand partition p's batches to aiokafka, oldest first, keeping at
        most two there: one in flight, one ready to go when it returns.
        Meanwhile the open batch grows, so under load a request carries
        up to max_batch_bytes per partition instead of one call's share."""
        queue, wake = session.queues[p], session.wake[p]
        topic = self.settings.topic
        while True:
            while not queue or session.submitted[p] >= 2:
                wake.clear()
                await wake.wait()
            batch = queue.popleft()
            batch.seal()   # closed: aiokafka sends it at once instead of lingering
            session.taken[p] = batch
            try:
                fut = await session.kafka.send_batch(batch.builder, topic, partition=p)
            except Exception as exc:
                # The waiting calls see it and disconnect the session.
                del session.taken[p]
                self._settle(session, batch, exc)
                return
            del session.taken[p]
            session.submitted[p] += 1
            fut.add_done_callback(lambda f, b=batch: self._submitted_done(session, p, b, f))

    def _submitted_done(self, session: _Session, p: int, batch: _Batch, fut: asyncio.Future) -> None:
        session.submitted[p] -= 1
        session.wake[p].set()
        if fut.cancelled():
            self._settle(session, batch, KafkaUnavailable("the Kafka batch was cancelled"))
        else:
            self._settle(session, batch, fut.exception())

    def _settle(self, session: _Session, batch: _Batch, error: BaseException | None) -> None:
        """A batch is acknowledged (error None) or failed: free its room,
        count it, tell the calls that wait for it."""
        if batch.acked.done():
            return
        session.unacked.discard(batch)
        self._release(batch.count)
        if error is None:
            self.acked += batch.count
            self.acked_batches += 1
            self.last_ack_time = time.time()
            batch.acked.set_result(None)
        else:
            batch.acked.set_exception(error)
            batch.acked.exception()   # retrieved: only the waiting calls report it

    async def _wait_room(self, session: _Session, n: int) -> None:
        limit = self.settings.max_in_flight_records
        while True:
            if session.failure is not None:
                raise copy.copy(session.failure)
            if self.in_flight + n <= limit:
                return
            self._room.clear()
            await self._room.wait()

    def _release(self, n: int) -> None:
        if n:
            self.in_flight -= n
            self._room.set()

    def _not_connected_reason(self, session: _Session | None) -> str:
        if self._stopped:
            return "the Kafka producer is stopped"
        if session is not None and session.failure is not None:
            return f"not connected to Kafka (call start() to reconnect): {session.failure}"
        return f"not connected to Kafka at {self.settings.bootstrap}: call start() first"

    async def _fail(self, session: _Session, error: StreamerError) -> StreamerError:
        """Disconnect `session` because of `error` (the first failure wins)
        and return the error this call raises."""
        if session.failure is None:
            log.warning("Kafka producer disconnects: %s", error)
            session.failure = error
        if not session.aborting:
            await self._abort(session)
        return error if session.failure is error else copy.copy(session.failure)

    async def _abort(self, session: _Session) -> None:
        """Fail every batch, queued here or held by aiokafka, and close its
        client, in bounded time. Idempotence makes aiokafka retry a batch
        forever, so only failing them ends their wait (AIOKafkaProducer has
        no public way to: this uses its accumulator's fail_all)."""
        session.aborting = True
        if self._session is session:
            self._session = None
        self._room.set()          # calls waiting for room see the failure
        for task in session.pumps:
            task.cancel()
        await asyncio.gather(*session.pumps, return_exceptions=True)
        failure = KafkaUnavailable(str(session.failure))
        self._fail_queued(session, failure)
        session.kafka._message_accumulator.fail_all(failure)
        await _close_client(session.kafka)
        # aiokafka failed what it held (through the callbacks); anything left
        # would wait forever.
        for batch in list(session.unacked):
            self._settle(session, batch, copy.copy(failure))

    def _fail_queued(self, session: _Session, failure: StreamerError) -> None:
        """Fail the batches not (yet) handed to aiokafka."""
        for queue in session.queues.values():
            while queue:
                self._settle(session, queue.popleft(), copy.copy(failure))
        for batch in session.taken.values():
            self._settle(session, batch, copy.copy(failure))

    def _pump_ended(self, session: _Session, task: asyncio.Task) -> None:
        # A pump only ends by cancellation or after failing its batch; an
        # exception here is a bug, which must fail the calls, not hang them.
        if task.cancelled() or task.exception() is None:
            return
        log.error("Kafka producer pump failed", exc_info=task.exception())
        if session.failure is None:
            session.failure = KafkaUnavailable(f"the Kafka producer failed: {task.exception()!r}")
        self._fail_queued(session, session.failure)
        self._room.set()

    # ---- stop -----------------------------------------------------------------
    async def stop(self, timeout_s: float | None = None) -> None:
        """Wait for what is in flight (at most `timeout_s`, default the
        delivery timeout), then close. Idempotent. Calls still waiting then
        raise KafkaUnavailable."""
        if self._stopped:
            return
        self._stopped = True
        session = self._session
        if session is None:
            return
        if timeout_s is None:
            timeout_s = self.settings.delivery_timeout_ms / 1000
        pending = [b.acked for b in session.unacked]
        if pending:
            done, not_done = await asyncio.wait(pending, timeout=timeout_s)
            if not_done:
                log.warning("Kafka did not acknowledge %d records within %gs of stop; the calls "
                            "that sent them fail", self.in_flight, timeout_s)
        if session.failure is None:
            session.failure = KafkaUnavailable("the Kafka producer is stopped")
        if not session.aborting:
            await self._abort(session)


async def _close_client(kafka: aiokafka.AIOKafkaProducer) -> None:
    """AIOKafkaProducer.stop() in bounded time, whatever state it is in."""
    try:
        async with asyncio.timeout(ABORT_TIMEOUT_S):
            await kafka.stop()
    except Exception as exc:   # a torn-down sender may end with its own error
        log.debug("closing the Kafka client: %r", exc)
        try:
            async with asyncio.timeout(ABORT_TIMEOUT_S):
                await kafka.client.close()
        except Exception as exc2:
            log.debug("closing the Kafka connections: %r", exc2)
