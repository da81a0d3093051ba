"""A Kafka consumer in a group, as the project's consumers (accounting,
IPFIX export) use it: auto-commit off (each commits its offsets itself, after
its work is durable), from the earliest offset, the topic checked to exist,
and the connect loop of kafka_settings.connect_until."""

from __future__ import annotations

import asyncio
import logging

import aiokafka
from aiokafka.errors import KafkaError

from ..errors import ConfigError, StreamerError
from .kafka_settings import KafkaSettings, connect_until

log = logging.getLogger(__name__)

# A topic that the broker does not list yet (metadata still spreading) is
# looked for again this long before it counts as missing.
TOPIC_GRACE_S = 2.0


async def start_group_consumer(settings: KafkaSettings, group: str, *, role: str,
                               timeout_s: float, session_timeout_s: float,
                               max_records: int) -> aiokafka.AIOKafkaConsumer:
    """A started consumer of settings.topic in `group`; KafkaUnavailable
    once Kafka cannot be reached within timeout_s, ConfigError for a topic
    that does not exist. `role` names the client (client_id <id>-<role>)."""
    ctx = settings.ssl_context()
    session_ms = int(session_timeout_s * 1000)

    def new_consumer() -> aiokafka.AIOKafkaConsumer:
        return aiokafka.AIOKafkaConsumer(
            bootstrap_servers=settings.bootstrap, client_id=f"{settings.client_id}-{role}",
            group_id=group, enable_auto_commit=False, auto_offset_reset="earliest",
            session_timeout_ms=session_ms, heartbeat_interval_ms=max(500, session_ms // 6),
            request_timeout_ms=max(settings.request_timeout_ms, session_ms + 5000),
            max_poll_records=max_records,
            security_protocol=settings.security_protocol, ssl_context=ctx,
            sasl_mechanism=settings.sasl_mechanism or "PLAIN",
            sasl_plain_username=settings.sasl_username, sasl_plain_password=settings.sasl_password)

    async def start(consumer, deadline: float) -> None:
        await consumer.start()
        await _check_topic(consumer, settings, deadline)

    consumer, _ = await connect_until(settings, timeout_s, new_consumer, start, stop_quietly)
    return consumer


async def _check_topic(consumer, settings: KafkaSettings, deadline: float) -> None:
    loop = asyncio.get_running_loop()
    give_up = min(deadline, loop.time() + TOPIC_GRACE_S)
    while settings.topic not in await consumer.topics():
        if loop.time() >= give_up:
            raise ConfigError(f"topic {settings.topic} does not exist on {settings.bootstrap}: "
                              f"create it, e.g. scripts/kafka.sh topic create {settings.topic}")
        await asyncio.sleep(0.2)


async def caught_up(consumer: aiokafka.AIOKafkaConsumer, timeout_s: float, *,
                    when_unassigned: bool) -> bool:
    """Every assigned partition read to its end; `when_unassigned` before the
    group assigned any; False while it cannot be told (a rebalance, Kafka
    away)."""
    tps = consumer.assignment()
    if not tps:
        return when_unassigned
    try:
        async with asyncio.timeout(timeout_s):
            ends = await consumer.end_offsets(list(tps))
            for tp in tps:
                if await consumer.position(tp) < ends[tp]:
                    return False
    except (KafkaError, KeyError, AssertionError, StreamerError, TimeoutError) as exc:
        log.debug("cannot tell whether the consumer caught up: %r", exc)
        return False
    return True


async def stop_quietly(consumer) -> None:
    """Stop a consumer that may have failed; never raises (5 s at most)."""
    try:
        async with asyncio.timeout(5):
            await consumer.stop()
    except Exception as exc:
        log.debug("closing a failed Kafka consumer: %r", exc)
