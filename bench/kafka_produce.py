"""Kafka produce benchmark: DESTROY events -> records.record_of -> wire.encode
-> Producer.send, acknowledged by a real broker (acks=all, idempotent).

    .venv/bin/python bench/kafka_produce.py                 # ~1 min: broker start, warm-up, 20 s run
    .venv/bin/python bench/kafka_produce.py --seconds 10 --compression none,gzip

It starts its own single-node broker (scripts/kafka.sh, a temporary directory,
a free loopback port) and always stops it. The daemon's path is reproduced in
one process and one event loop: batches of --batch events are turned into
(key, value) pairs and handed to Producer.send, with --calls sends in flight at
a time. A warm-up run (not counted) lets the JVM compile its hot code first.

Reported, per compression:
  acked/s        records acknowledged by Kafka per second of wall time, from
                 the first send to the last acknowledgement
  cpu s/100k     this process's CPU seconds (user + system) per 100k records,
                 encoding included
  broker s/100k  the broker JVM's CPU seconds per 100k records (/proc)
  ack p50/p99    send() latency, from the call to the last acknowledgement
  other CPU s    CPU the rest of the machine used meanwhile (other processes,
                 interrupts); the figures mean little unless it is small
and once, without Kafka, the encode-only rate of three paths: record_of from
a ready Event (the produce runs' path), Event.from_raw + record_of from a ring
event, and records.record_of_raw from a ring event.
The topic's end offsets are checked against the acknowledged count.
JSON goes to bench/results/kafka_produce.json (--json elsewhere).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import aiokafka  # noqa: E402

from streamer.datapath import abi
from streamer.delivery import records
from streamer.delivery import wire  # noqa: E402
from streamer.datapath.events import Clock, Event  # noqa: E402
from streamer.demo.local_servers import free_port_pair, live_pids  # noqa: E402
from streamer.delivery.kafka_settings import KafkaSettings  # noqa: E402
from streamer.delivery.producer import Producer  # noqa: E402

KAFKA_SH = ROOT / "scripts" / "kafka.sh"
NODE = "gw-bench-01"
CT_BASE = 1_763_800_000_000_000_000
POOL = 50_000          # distinct synthetic events, reused with fresh ct_ids
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- synthetic DESTROY events -------------------------------------------------

def make_pool(n: int, seed: int = 7) -> list[Event]:
    """DESTROYs as a gateway sees them: 80 % IPv4; TCP 70 %, UDP 25 %,
    ICMP 5 %; short flows with realistic counters and end reasons."""
    rng = random.Random(seed)
    now = int(time.time() * 1000)
    pool = []
    for i in range(n):
        v6 = rng.random() < 0.2
        r = rng.random()
        proto = "tcp" if r < 0.70 else "udp" if r < 0.95 else ("icmpv6" if v6 else "icmp")
        if v6:
            src = f"2001:2:0:{rng.randrange(1 << 16):x}::{rng.randrange(1, 1 << 16):x}"
            dst = f"2001:2:1::{rng.randrange(1, 4096):x}"
        else:
            src = f"198.18.{rng.randrange(256)}.{rng.randrange(1, 255)}"
            dst = f"198.19.{rng.randrange(4)}.{rng.randrange(1, 255)}"
        pkts_o, pkts_r = rng.randrange(1, 200), rng.randrange(0, 400)
        first = now - rng.randrange(1_000, 120_000)
        last = first + rng.randrange(0, 60_000)
        tcp = proto == "tcp"
        pool.append(Event(
            type="DESTROY", family=6 if v6 else 4, proto=proto, src=src, dst=dst,
            sport=rng.randrange(1, 1 << 16) if proto.startswith("icmp") else rng.randrange(1024, 65536),
            dport=rng.choice((443, 80, 53, 8443, 123, 22)) if not proto.startswith("icmp") else 0,
            vlan=rng.choice((0, 0, 0, 100)),
            state=rng.choice(("TIME_WAIT", "CLOSE", "FIN_WAIT")) if tcp else None,
            assured=pkts_r > 0, ct_id=CT_BASE + i, seq=rng.randrange(2, 6),
            packets_orig=pkts_o, packets_reply=pkts_r,
            bytes_orig=pkts_o * rng.randrange(52, 1500), bytes_reply=pkts_r * rng.randrange(52, 1500),
            time_ms=last + 10, first_ms=first, last_ms=last,
            end_reason=rng.choice(("fin", "fin", "rst", "idle")) if tcp else "idle",
            missed=0, retries=rng.choice((0,) * 19 + (1,))))
    return pool


def encode_batch(pool: list[Event], start: int, count: int) -> list[tuple[bytes, bytes, int]]:
    """(key, value, time_ms) of events start..start+count, each with its own
    ct_id, as the Kafka sink hands them to Producer.send."""
    out = []
    n = len(pool)
    record_of, encode, key_of = records.record_of, wire.encode, records.message_key
    for i in range(start, start + count):
        ev = pool[i % n]
        ev.ct_id = CT_BASE + i
        record = record_of(ev, NODE)
        out.append((key_of(record), encode(record), ev.time_ms))
    return out


def raw_of(ev: Event, clock: Clock) -> abi.RawEvent:
    """The ring event an Event was decoded from (the inverse of Event.from_raw)."""
    types = {name: code for code, name in abi.EVENT_NAMES.items()}
    protos = {name: code for code, name in abi.PROTO_NAMES.items()}
    states = {name: code for code, name in abi.STATE_NAMES.items()}
    ends = {name: code for code, name in abi.END_NAMES.items()}
    family = socket.AF_INET if ev.family == 4 else socket.AF_INET6
    offset = clock.wall_ns(0)
    mono = lambda ms: ms * 1_000_000 - offset  # noqa: E731
    tcp = ev.proto == "tcp"
    return abi.RawEvent(
        type=types[ev.type], family=ev.family, proto=protos[ev.proto],
        state=states.get(ev.state, 0), flags=abi.F_ASSURED if ev.assured else 0,
        ct_id=ev.ct_id, seq=ev.seq, end_reason=ends.get(ev.end_reason, 0), missed=ev.missed,
        tcp_flags_orig=0x1B if tcp else 0, tcp_flags_reply=0x13 if tcp else 0,
        ts_ns=mono(ev.time_ms), first_ns=mono(ev.first_ms), last_ns=mono(ev.last_ms),
        pkts_orig=ev.packets_orig, pkts_reply=ev.packets_reply,
        bytes_orig=ev.bytes_orig, bytes_reply=ev.bytes_reply,
        saddr=socket.inet_pton(family, ev.src), daddr=socket.inet_pton(family, ev.dst),
        sport=ev.sport, dport=ev.dport, vlan=ev.vlan, retries=ev.retries)


def encode_only(pool: list[Event], total: int) -> list[dict]:
    """(key, value) per event without sending, by three paths: from a ready
    Event (what the produce runs do), from a ring event through Event.from_raw
    (what today's daemon would add), and from a ring event directly
    (records.record_of_raw)."""
    clock = Clock()
    raws = [raw_of(ev, clock) for ev in pool]
    n = len(pool)
    key_of, encode = records.message_key, wire.encode

    def from_event(i):
        record = records.record_of(pool[i % n], NODE)
        return key_of(record), encode(record)

    def via_event(i):
        record = records.record_of(Event.from_raw(raws[i % n], clock), NODE)
        return key_of(record), encode(record)

    def from_raw(i):
        record = records.record_of_raw(raws[i % n], clock, NODE)
        return key_of(record), encode(record)

    out = []
    for name, fn in (("record_of(Event) + encode", from_event),
                     ("Event.from_raw + record_of + encode", via_event),
                     ("record_of_raw + encode", from_raw)):
        c0, t0 = cpu_self(), time.perf_counter()
        for i in range(total):
            fn(i)
        wall, cpu = time.perf_counter() - t0, cpu_self() - c0
        out.append({"path": name, "records": total, "records_per_s": round(total / wall),
                    "cpu_s_per_100k": round(cpu / total * 1e5, 3)})
    return out


# ---- CPU accounting ---------------------------------------------------------------

def cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def cpu_machine() -> float:
    """CPU seconds all CPUs spent busy (not idle or iowait), from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLK_TCK


def cpu_of(pid: int) -> float | None:
    """utime + stime of a process in seconds, from /proc/PID/stat."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


# ---- the broker ---------------------------------------------------------------------

def kafka_sh(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([str(KAFKA_SH), *args], capture_output=True, text=True, timeout=timeout)


def broker_pids(directory: Path) -> list[int]:
    return live_pids(b"kafka.Kafka", f"{directory}/server.properties".encode())


# ---- one produce run ------------------------------------------------------------------

async def produce(producer: Producer, pool: list[Event], first: int, limit: int, seconds: float,
                  batch: int, calls: int) -> dict:
    """Send up to `limit` records (stop starting new batches after `seconds`)
    with `calls` send() calls in flight; wait for every acknowledgement."""
    slots = asyncio.Semaphore(calls)
    tasks = set()
    failures = []

    async def one(pairs):
        try:
            await producer.send(pairs)
        except Exception as exc:   # reported below, the run is then void
            failures.append(exc)
        finally:
            slots.release()

    acked0, sent = producer.acked, 0
    producer.ack_latency.clear()
    c0, t0 = cpu_self(), time.perf_counter()
    while sent < limit and time.perf_counter() - t0 < seconds and not failures:
        await slots.acquire()
        count = min(batch, limit - sent)
        pairs = encode_batch(pool, first + sent, count)
        sent += count
        task = asyncio.create_task(one(pairs))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks)
    wall, cpu = time.perf_counter() - t0, cpu_self() - c0
    if failures:
        raise RuntimeError(f"send failed: {failures[0]!r}")
    acked = producer.acked - acked0
    lat = sorted(producer.ack_latency)
    return {"records": acked, "seconds": round(wall, 3), "records_per_s": round(acked / wall),
            "cpu_s": round(cpu, 3), "cpu_s_per_100k": round(cpu / acked * 1e5, 3),
            "ack_latency_ms_p50": round(lat[len(lat) // 2] * 1000, 1),
            "ack_latency_ms_p99": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000, 1),
            "sent": sent}


async def end_offsets(bootstrap: str, topic: str, partitions: int) -> int:
    """How many records the topic holds (its partitions' end offsets)."""
    consumer = aiokafka.AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await consumer.start()
    try:
        parts = [aiokafka.TopicPartition(topic, p) for p in range(partitions)]
        return sum((await consumer.end_offsets(parts)).values())
    finally:
        await consumer.stop()


async def run_codec(args, bootstrap: str, broker_pid: int, pool: list[Event], codec: str,
                    first: int) -> tuple[dict, int]:
    topic = f"ctstream.bench.{codec}"
    created = kafka_sh("topic", "create", topic, "--partitions", str(args.partitions),
                       "--dir", str(args.dir))
    if created.returncode != 0:
        raise RuntimeError(f"topic create failed: {created.stderr}")
    producer = Producer(KafkaSettings(bootstrap=bootstrap, topic=topic, compression=codec,
                                      max_in_flight_records=args.max_in_flight))
    await producer.start(timeout_s=30)
    try:
        log(f"[{codec}] warm-up: {args.warmup_records:,} records")
        warm = await produce(producer, pool, first, args.warmup_records, args.seconds,
                             args.batch, args.calls)
        first += warm["sent"]
        log(f"[{codec}] measuring: up to {args.records:,} records or {args.seconds:g} s")
        b0, m0, s0 = cpu_of(broker_pid), cpu_machine(), cpu_self()
        result = await produce(producer, pool, first, args.records, args.seconds,
                               args.batch, args.calls)
        b1, m1, s1 = cpu_of(broker_pid), cpu_machine(), cpu_self()
        # Anything else busy on the machine at the same time skews the figures:
        # report it (kernel work for our own sockets is in here too).
        result["machine_busy_cpu_s"] = round(m1 - m0, 3)
        if b0 is not None and b1 is not None:
            result["other_cpu_s"] = round((m1 - m0) - (s1 - s0) - (b1 - b0), 3)
        first += result["sent"]
    finally:
        await producer.stop()
    if b0 is not None and b1 is not None:
        result["broker_cpu_s"] = round(b1 - b0, 3)
        result["broker_cpu_s_per_100k"] = round((b1 - b0) / result["records"] * 1e5, 3)
    in_log = await end_offsets(bootstrap, topic, args.partitions)
    result["in_topic"] = in_log
    result["warmup_records"] = warm["records"]
    if in_log < warm["records"] + result["records"]:
        raise RuntimeError(f"the topic holds {in_log} records, {warm['records'] + result['records']} "
                           "were acknowledged")
    result["compression"] = codec
    return result, first


def table(encode: dict, runs: list[dict], args) -> str:
    lines = [
        f"Kafka produce, {args.partitions} partitions, batches of {args.batch:,}, "
        f"{args.calls} calls in flight, acks=all, idempotent",
        "",
        "| compression | records | seconds | acked/s | cpu s/100k | broker s/100k | ack p50 ms | ack p99 ms | other CPU s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(f"| {r['compression']} | {r['records']:,} | {r['seconds']:.1f} | "
                     f"{r['records_per_s']:,} | {r['cpu_s_per_100k']:.2f} | "
                     f"{r.get('broker_cpu_s_per_100k', float('nan')):.2f} | "
                     f"{r['ack_latency_ms_p50']} | {r['ack_latency_ms_p99']} | "
                     f"{r.get('other_cpu_s', float('nan')):.1f} |")
    lines += ["", "Encode only (record, message key, msgpack; no Kafka):", "",
              "| path | records/s | cpu s/100k |", "|---|---|---|"]
    lines += [f"| {e['path']} | {e['records_per_s']:,} | {e['cpu_s_per_100k']:.2f} |" for e in encode]
    return "\n".join(lines)


async def bench(args) -> dict:
    pool = make_pool(POOL)
    log(f"encode only: {args.encode_records:,} records")
    encode = encode_only(pool, args.encode_records)
    port = free_port_pair()
    started = kafka_sh("start", "--dir", str(args.dir), "--port", str(port))
    if started.returncode != 0:
        raise RuntimeError(f"kafka.sh start failed:\n{started.stderr}")
    bootstrap = started.stdout.strip()
    broker_pid = int((args.dir / "kafka.pid").read_text())
    log(f"broker {bootstrap} (pid {broker_pid}, dir {args.dir})")
    runs, first = [], 0
    for codec in args.compression:
        result, first = await run_codec(args, bootstrap, broker_pid, pool, codec, first)
        runs.append(result)
    return {
        "bench": "kafka_produce",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([".venv/bin/python", "bench/kafka_produce.py", *sys.argv[1:]]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "aiokafka": aiokafka.__version__, "kernel": platform.release()},
        "settings": {"partitions": args.partitions, "batch": args.batch, "calls": args.calls,
                     "max_in_flight_records": args.max_in_flight, "seconds": args.seconds,
                     "records": args.records, "warmup_records": args.warmup_records},
        "encode_only": encode,
        "runs": runs,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=3_000_000, help="at most this many measured records")
    ap.add_argument("--seconds", type=float, default=20.0, help="stop sending new batches after this")
    ap.add_argument("--warmup-records", type=int, default=300_000)
    ap.add_argument("--encode-records", type=int, default=300_000)
    ap.add_argument("--partitions", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2_000, help="records per Producer.send call")
    ap.add_argument("--calls", type=int, default=16, help="send() calls in flight")
    ap.add_argument("--max-in-flight", type=int, default=50_000)
    ap.add_argument("--compression", default="none", help="comma-separated: none,gzip,...")
    ap.add_argument("--json", type=Path, default=HERE / "results" / "kafka_produce.json")
    args = ap.parse_args(argv)
    args.compression = args.compression.split(",")
    if not shutil.which("java"):
        print("kafka_produce: java is needed for the broker (default-jdk-headless)", file=sys.stderr)
        return 2
    args.dir = Path(tempfile.mkdtemp(prefix="ctstream-bench-kafka-")).resolve()
    try:
        result = asyncio.run(bench(args))
    finally:
        stopped = kafka_sh("stop", "--dir", str(args.dir), "--timeout", "30", timeout=90)
        left = broker_pids(args.dir)
        for pid in left:
            os.kill(pid, 9)
        if stopped.returncode != 0 or left:
            print(f"kafka_produce: stopping the broker: {stopped.stderr.strip()} (killed {left})",
                  file=sys.stderr)
        shutil.rmtree(args.dir, ignore_errors=True)
    print(table(result["encode_only"], result["runs"], args))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nJSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
