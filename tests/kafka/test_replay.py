"""`ctstream replay` against a real broker and a real daemon.

- The archive: `ctstream run` on a test-bed pair with real TCP traffic
  (IPv4 and IPv6) publishes to topic A and archives what Kafka acknowledged;
  the archive, read while the daemon runs, holds exactly topic A's records.
  `replay --from --to` of the whole time range into topic B gives B the very
  records of A, byte for byte, partition by partition and in the same
  order; `--ct-id` into topic C gives exactly those connections' records.
- `replay --snapshot` while connections are held open publishes one valid
  SNAPSHOT record per live entry of the pinned table, with that entry's
  ct_id, seq, tuple and counters.
- Bad input: a bad time, from after to, no archive, an unknown topic, a
  broker that is down.
- Without a broker: time parsing, the key filter, the progress line.
"""

from __future__ import annotations

import io
import json
import os
import select
import socket
import subprocess
import time
import uuid
from collections import defaultdict

import pytest

from streamer.delivery import wire
from streamer.delivery.archive import ArchiveReader, ArchiveWriter, archive_dir
from streamer.errors import ConfigError
from streamer.delivery.records import message_key
from streamer.delivery.replay import _Progress, _Sender, key_filter, parse_time, version_runs
from tests.kafka.conftest import free_port_pair
from tests.kafka.pipeline_support import (TopicContents, check_topic, make_pipeline, read_topic,
                                          report)
from tests.netns.test_cli import ctstream, one_error_line

PARTITIONS = 3
PAIR_INDEX = 12               # 198.18.12.0/24, 2001:2:0:12::/64
TCP4_PORT, TCP6_PORT = 5003, 5004
HOLD_PORT = 5010
# Held connections must outlive the test's short timeouts (3 s established).
LONG_ESTABLISHED = ["--timeout-established", "300"]


def kafka_and_root(test):
    return pytest.mark.root(pytest.mark.kafka(test))


def new_topic(broker, partitions: int = PARTITIONS) -> str:
    name = f"ctstream.replay.{uuid.uuid4().hex[:12]}"
    broker.topic_create(name, partitions)
    return name


def by_partition(messages) -> dict[int, list[tuple[bytes, bytes]]]:
    out = defaultdict(list)
    for m in sorted(messages, key=lambda m: (m.partition, m.offset)):
        out[m.partition].append((m.key, m.value))
    return dict(out)


def wait_for(what: str, predicate, timeout: float, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(interval)


def replay(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return ctstream("replay", *args, timeout=timeout)


# --- held connections, for --snapshot -------------------------------------------------------

_HOLD_SERVER = r"""
import socket, sys
fam = socket.AF_INET if sys.argv[1] == "4" else socket.AF_INET6
s = socket.socket(fam, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[2], int(sys.argv[3])))
s.listen(64)
s.settimeout(30)
print("ready", flush=True)
held = []
for _ in range(int(sys.argv[4])):
    c, _ = s.accept()
    c.recv(16)
    c.sendall(b"pong")
    held.append(c)
sys.stdin.read()
"""

_HOLD_CLIENT = r"""
import json, socket, sys
fam = socket.AF_INET if sys.argv[1] == "4" else socket.AF_INET6
held = []
for _ in range(int(sys.argv[4])):
    c = socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=10)
    c.sendall(b"ping")
    assert c.recv(16) == b"pong"
    held.append(c)
print(json.dumps([c.getsockname()[1] for c in held]), flush=True)
sys.stdin.read()
"""


def read_line(proc: subprocess.Popen, timeout: float) -> bytes:
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        assert left > 0, f"no line from {proc.args} within {timeout} s"
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 4096)
            assert chunk, f"{proc.args} exited: {proc.stderr.read().decode(errors='replace')}"
            buf += chunk
    return buf


class Held:
    """`count` TCP connections from the client to the server, open until close()."""

    def __init__(self, pair, family: int, port: int, count: int):
        dst = pair.server.addr(family)
        self.procs = []
        srv = pair.server.python(_HOLD_SERVER, family, dst, port, count, stdin=subprocess.PIPE)
        self.procs.append(srv)
        assert read_line(srv, 10).strip() == b"ready"
        cli = pair.client.python(_HOLD_CLIENT, family, dst, port, count, stdin=subprocess.PIPE)
        self.procs.append(cli)
        self.ports = json.loads(read_line(cli, 30))
        self.family, self.src, self.dst, self.port = family, pair.client.addr(family), dst, port

    def close(self) -> None:
        for p in self.procs:
            try:
                p.stdin.close()
                p.wait(timeout=10)
            except Exception:
                p.kill()
                p.wait(timeout=10)


# --- the archive and --from/--to -------------------------------------------------------------


@pytest.fixture
def pipe(pin_dir, tmp_path):
    with make_pipeline(pin_dir, tmp_path, PAIR_INDEX, f"ctsreplay-{uuid.uuid4().hex[:8]}") as p:
        yield p


@kafka_and_root
def test_replay_of_a_time_range_and_a_snapshot_of_the_live_table(pipe, kafka_broker):
    broker = kafka_broker
    topic_a, topic_b, topic_c, topic_d = (new_topic(broker) for _ in range(4))
    t_begin = time.time() - 1
    daemon = pipe.start(broker.bootstrap, topic_a, *LONG_ESTABLISHED)
    ports4 = pipe.pair.tcp_many(300, family=4, port=TCP4_PORT, concurrency=8, timeout=60)
    t_mid_ms = int(time.time() * 1000)          # after every IPv4 CREATE, before any IPv6 one
    ports6 = pipe.pair.tcp_many(100, family=6, port=TCP6_PORT, concurrency=8, timeout=60)
    # Every connection ended (FIN, then the fin timeout) and its DESTROY is in Kafka.
    wait_for("the table empty", lambda: pipe.stats()["entries"] == 0, 60, 0.5)
    pipe.wait_spool_drained(60)
    t_end = time.time() + 1

    topic = read_topic(broker.bootstrap, topic_a, PARTITIONS)
    figures = check_topic(TopicContents(topic), pipe.node_id)
    assert figures["connections"] >= len(ports4) + len(ports6), figures
    a_parts = by_partition(topic)

    # The archive, read while the daemon writes it, holds Kafka's records once each.
    adir = archive_dir(str(pipe.spool))

    def archived_all():
        got = list(ArchiveReader(adir, 0, 1 << 62).records())
        return got if len(got) >= len(topic) else None
    archived = wait_for("the archive holds topic A", archived_all, 30, 0.5)
    assert sorted((k, v) for k, v, _t in archived) == sorted((m.key, m.value) for m in topic)

    # The whole range into topic B: byte for byte, in A's order, partition by partition.
    res = replay("--from", f"{t_begin:.3f}", "--to", f"{t_end:.3f}", "--spool", str(pipe.spool),
                 "--kafka", broker.bootstrap, "--topic", topic_b)
    assert res.returncode == 0, res.stderr
    assert "\r" not in res.stderr and len(res.stderr.splitlines()) == 1, res.stderr  # no progress in a pipe
    assert f"replayed {len(topic):,} records" in res.stderr, res.stderr
    replayed = read_topic(broker.bootstrap, topic_b, PARTITIONS)
    assert by_partition(replayed) == a_parts

    # Part of the range (ISO 8601 with ms) and --ct-id twice: one IPv4 connection
    # (its CREATE is before the range) and one IPv6 connection (all in it).
    fam = {m.record["ctId"]: 4 if "sourceIPv4Address" in m.record else 6 for m in topic
           if m.record["eventType"] != "LOST"}
    chosen = [min(c for c, f in fam.items() if f == 4), min(c for c, f in fam.items() if f == 6)]
    res = replay("--from", iso_ms(t_mid_ms), "--to", iso_ms(int(t_end * 1000)),
                 "--ct-id", str(chosen[0]), "--ct-id", str(chosen[1]),
                 "--spool", str(pipe.spool), "--kafka", broker.bootstrap, "--topic", topic_c)
    assert res.returncode == 0, res.stderr

    def wanted(value: bytes, since: int) -> bool:
        r = wire.decode(value)
        return r["ctId"] in chosen and r["observationTimeMilliseconds"] >= since
    expected = {p: [(k, v) for k, v in recs if wanted(v, t_mid_ms)] for p, recs in a_parts.items()}
    expected = {p: recs for p, recs in expected.items() if recs}
    both = sum(1 for recs in a_parts.values() for _k, v in recs if wanted(v, 0))
    got = by_partition(read_topic(broker.bootstrap, topic_c, PARTITIONS))
    assert got == expected
    assert 3 <= sum(map(len, got.values())) < both      # the IPv6 one whole, the IPv4 one not

    # --snapshot while connections are held open: one SNAPSHOT per live entry.
    held = [Held(pipe.pair, 4, HOLD_PORT, 8), Held(pipe.pair, 6, HOLD_PORT + 1, 4)]
    try:
        wait_for("12 live entries", lambda: pipe.stats()["entries"] == 12, 30, 0.2)
        listed = ctstream("list", "-o", "json", "--pin-dir", pipe.pin)
        assert listed.returncode == 0, listed.stderr
        entries = {e["ct_id"]: e for e in map(json.loads, listed.stdout.splitlines())}
        res = replay("--snapshot", "--pin-dir", pipe.pin, "--kafka", broker.bootstrap,
                     "--topic", topic_d)
        assert res.returncode == 0, res.stderr
        assert "published 12 SNAPSHOT records" in res.stderr, res.stderr
        # The held connections are idle: their entries stay as they were listed.
        again = ctstream("list", "-o", "json", "--pin-dir", pipe.pin)
        assert {e["ct_id"]: stable(e) for e in map(json.loads, again.stdout.splitlines())} == \
            {k: stable(e) for k, e in entries.items()}
        snaps = read_topic(broker.bootstrap, topic_d, PARTITIONS)   # validated against the schema
        check_snapshots(snaps, entries, held, socket.gethostname())
    finally:
        for h in held:
            h.close()
    rc, _ = daemon.terminate(timeout=60)
    assert rc == 0, daemon.output()[-3000:]
    report("replay", {**figures, "archived": len(archived), "replayed": len(replayed),
                      "by ct-id": sum(map(len, got.values())), "snapshots": len(snaps)})
    assert "Traceback" not in daemon.output(), daemon.output()[-3000:]


def iso_ms(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


def stable(e: dict) -> tuple:
    return e["seq"], e["packets_orig"], e["packets_reply"], e["bytes_orig"], e["bytes_reply"]


def check_snapshots(snaps, entries: dict, held: list[Held], node_id: str) -> None:
    recs = [m.record for m in snaps]
    assert {r["eventType"] for r in recs} == {"SNAPSHOT"}
    assert sorted(r["ctId"] for r in recs) == sorted(entries), (recs, entries)
    tuples = {(h.family, h.src, h.dst, sport, h.port) for h in held for sport in h.ports}
    seen = set()
    for m in snaps:
        r = m.record
        e = entries[r["ctId"]]
        fam = 4 if "sourceIPv4Address" in r else 6
        src = r[f"sourceIPv{fam}Address"]
        dst = r[f"destinationIPv{fam}Address"]
        seen.add((fam, src, dst, r["sourceTransportPort"], r["destinationTransportPort"]))
        assert r["nodeId"] == node_id and m.key == message_key(r)
        assert (src, dst, r["sourceTransportPort"], r["destinationTransportPort"]) == \
            (e["src"], e["dst"], e["sport"], e["dport"])
        assert r["seq"] == e["seq"], (r, e)
        assert (r["initiatorPackets"], r["responderPackets"], r["initiatorOctets"],
                r["responderOctets"]) == (e["packets_orig"], e["packets_reply"],
                                          e["bytes_orig"], e["bytes_reply"]), (r, e)
        assert r["protocolIdentifier"] == 6 and r["tcpState"] == "ESTABLISHED" and r["assured"]
        assert r["flowEndReason"] is None and r["missedEvents"] == 0 and r["retries"] == 0
        assert r["tcpControlBits"] & 0x12 == 0x12              # SYN and ACK
        assert r["reverseTcpControlBits"] & 0x12 == 0x12       # SYN/ACK
        assert r["flowStartMilliseconds"] <= r["flowEndMilliseconds"] \
            <= r["observationTimeMilliseconds"]
        assert abs(r["observationTimeMilliseconds"] / 1000 - time.time()) < 600
    assert seen == tuples


# --- bad input ----------------------------------------------------------------------------


@kafka_and_root
def test_bad_input_fails_with_one_line(kafka_broker, tmp_path):
    spool = tmp_path / "spool"
    with ArchiveWriter.open(archive_dir(str(spool)), 1 << 20) as w:
        w.add([(b"n/1", wire.encode({"x": 1}), int(time.time() * 1000))])
    kafka = ["--kafka", kafka_broker.bootstrap, "--topic", new_topic(kafka_broker, 1)]
    cases = [
        (["--from", "yesterday"], 2, "is not a time"),
        (["--from", "-1m", "--to", "-2m"], 2, "must be before --to"),
        (["--from", "1714564800000"], 2, "milliseconds"),
        (["--to", "now"], 2, "--from TIME"),
        (["--from", "-1h", "--snapshot"], 2, "--snapshot publishes the live table"),
    ]
    for args, rc, text in cases:
        res = replay(*args, "--spool", str(spool), *kafka)
        assert res.returncode == rc and text in one_error_line(res.stderr), (args, res.stderr)
    res = replay("--from", "-1h", "--spool", str(tmp_path / "none"), *kafka)
    assert res.returncode == 2 and "no archive at" in one_error_line(res.stderr), res.stderr
    res = replay("--from", "-1h", "--spool", str(spool), "--kafka", kafka_broker.bootstrap,
                 "--topic", "ctstream.replay.no-such-topic")
    assert res.returncode == 2 and "does not exist" in one_error_line(res.stderr), res.stderr
    down = f"127.0.0.1:{free_port_pair()}"
    res = replay("--from", "-1h", "--spool", str(spool), "--kafka", down, "--topic", "t",
                 "--kafka-timeout", "2")
    assert res.returncode == 1 and "cannot reach Kafka" in one_error_line(res.stderr), res.stderr
    res = replay("--snapshot", "--pin-dir", f"/sys/fs/bpf/ctstest-none-{uuid.uuid4().hex[:6]}",
                 *kafka)
    assert res.returncode == 1 and "no ctstream datapath pinned" in one_error_line(res.stderr)
    # An empty range is not an error.
    res = replay("--from", "-2h", "--to", "-1h", "--spool", str(spool), *kafka)
    assert res.returncode == 0 and "replayed 0 records" in res.stderr, res.stderr


# --- without a broker ---------------------------------------------------------------------

NOW = 1_714_564_800.0      # 2024-05-01T12:00:00Z


@pytest.mark.parametrize("text, expected_ms", [
    ("now", NOW * 1000),
    ("  NOW ", NOW * 1000),
    ("-10m", (NOW - 600) * 1000),
    ("now-2h", (NOW - 7200) * 1000),
    ("-1.5d", (NOW - 1.5 * 86400) * 1000),
    ("-30", (NOW - 30) * 1000),
    ("-1w", (NOW - 7 * 86400) * 1000),
    ("1714564700", 1_714_564_700_000),
    ("1714564700.25", 1_714_564_700_250),
    ("2024-05-01T12:00:00Z", NOW * 1000),
    ("2024-05-01T14:00:00+02:00", NOW * 1000),
    ("2024-05-01T12:00:00.5Z", NOW * 1000 + 500),
])
def test_times(text, expected_ms):
    assert parse_time(text, NOW) == int(expected_ms)


def test_a_time_without_a_zone_is_local_time():
    import datetime
    local = datetime.datetime(2024, 5, 1, 12, 0, 0).timestamp()
    assert parse_time("2024-05-01 12:00:00", NOW) == int(local * 1000)


@pytest.mark.parametrize("text", ["yesterday", "-10x", "10m", "", "2024-13-01", "1714564800000"])
def test_bad_times(text):
    with pytest.raises(ConfigError, match="--from"):
        parse_time(text, NOW, "--from")


def test_key_filter():
    assert key_filter(None, None) is None
    keep = key_filter([7, 12], None)
    assert [keep(k) for k in (b"a/7", b"b/12", b"a/70", b"a/1", b"a/b/7")] == \
        [True, True, False, False, True]
    keep = key_filter(None, "a/b")
    assert [keep(k) for k in (b"a/b/7", b"a/7", b"a/bb/7")] == [True, False, False]
    keep = key_filter([7], "n1")
    assert [keep(k) for k in (b"n1/7", b"n2/7", b"n1/8")] == [True, False, False]


def test_version_runs_give_each_record_its_own_versions_header():
    def rec(n, version):
        value = wire.encode({"schemaVersion": version, "nodeId": "a", "ctId": n, "seq": 0})
        return (f"a/{n}".encode(), value, 1_000 + n)
    batch = (rec(1, 1), rec(2, 1), rec(3, 2), rec(4, 9), rec(5, 2), rec(6, 2))
    runs = version_runs(batch)
    assert [(h, [r[2] for r in recs]) for h, recs in runs] == [
        ([wire.header_of(1)], [1001, 1002]), ([wire.HEADER], [1003]),
        ([], [1004]),                                  # no version ctstream reads: no header
        ([wire.HEADER], [1005, 1006])]
    assert all(r is batch[i] for i, r in enumerate(r for _h, recs in runs for r in recs))
    keep = key_filter([2, 3], None)
    assert [[r[0] for r in recs] for _h, recs in version_runs(batch, keep)] == [[b"a/2"], [b"a/3"]]


async def test_the_sender_keeps_order_across_versions():
    class Recorder:
        def __init__(self):
            self.calls = []

        async def send(self, records, headers=None):
            self.calls.append((headers, [r[2] for r in records]))

    producer = Recorder()
    sender = _Sender(producer)
    for headers, recs in version_runs([(b"k", wire.encode({"schemaVersion": v}), t)
                                       for t, v in enumerate((1, 1, 2, 2, 1))]):
        await sender.add(recs, headers)
    await sender.flush()
    assert producer.calls == [([wire.header_of(1)], [0, 1]), ([wire.HEADER], [2, 3]),
                              ([wire.header_of(1)], [4])]
    assert sender.acked == 5


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_progress_on_a_terminal_only():
    tty = _Stream(True)
    p = _Progress(tty)
    p.update(5000, 250, 1000)
    p.update(6000, 300, 1000)                   # within half a second: not shown
    p.clear()
    out = tty.getvalue()
    assert out.startswith("\rreplay: 5,000 records, ") and "25% of the archive read, ETA " in out
    assert "6,000" not in out and out.endswith("\r\x1b[K")
    pipe = _Stream(False)
    p = _Progress(pipe)
    p.update(5000, 250, 1000)
    p.clear()
    assert pipe.getvalue() == ""
