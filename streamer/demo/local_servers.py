"""What the servers the project's scripts start (scripts/kafka.sh,
mosquitto.sh, postgres.sh) need from Python: free loopback ports to give
them, their live processes, to check that a stop left none behind, and a
topic read to its end. Shared by the demo, the benchmarks and the tests."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from ..errors import EnvironmentProblem


def free_port() -> int:
    """A loopback TCP port that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_pair() -> int:
    """A loopback port P with P + 1 free too (a Kafka broker's controller
    listens on the next port)."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    raise EnvironmentProblem("no two adjacent free loopback ports")


def live_pids(*needles: bytes, argv0: bytes = b"") -> list[int]:
    """Live (not zombie) processes whose NUL-separated command line starts
    with argv0 and contains every needle."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and cmdline.startswith(argv0) and all(n in cmdline for n in needles):
            pids.append(int(proc.name))
    return pids


async def read_topic_to_end(bootstrap: str, topic: str, partitions: int, *,
                            timeout_s: float = 60, max_records: int = 10_000):
    """Every message of `topic` up to the end offsets it has when the read
    starts, partition by partition as they come (an async generator); no
    group, nothing committed. TimeoutError after timeout_s."""
    import aiokafka
    from aiokafka.structs import TopicPartition

    consumer = aiokafka.AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                                         enable_auto_commit=False)
    try:
        await consumer.start()       # in the try: a failed start is stopped too
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        todo = {tp for tp in tps if ends[tp] > 0}
        async with asyncio.timeout(timeout_s):
            while todo:
                got = await consumer.getmany(*todo, timeout_ms=1000, max_records=max_records)
                for tp, batch in got.items():
                    for m in batch:
                        if m.offset < ends[tp]:
                            yield m
                for tp in list(todo):
                    if await consumer.position(tp) >= ends[tp]:
                        todo.discard(tp)
    finally:
        await consumer.stop()
