"""Records, Kafka and database helpers of the accounting tests.

Flows are made as the datapath would report them (records.record_of of an
events.Event, checked with wire.validate): a CREATE (seq 0), UPDATEs and a
DESTROY with the final counters. `Flow.expected` is what the flow table must
hold for it; tests compare the database with these, not with itself.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from streamer.delivery import records
from streamer.delivery import wire
from streamer.accounting.db import open_database, wire_ct_id
from streamer.datapath.events import Event, LostReport
from streamer.delivery.kafka_settings import KafkaSettings
from streamer.delivery.producer import Producer

CTSTREAM = str(Path(sys.executable).with_name("ctstream"))
PROTOS = ("tcp", "udp", "icmp")
_VALIDATED: set[tuple] = set()


@dataclass(frozen=True)
class Flow:
    node: str
    ct_id: int
    family: int
    proto: str
    src: str
    dst: str
    sport: int
    dport: int
    end_ms: int          # the DESTROY's flowEndMilliseconds
    events: int          # CREATE, UPDATE..., DESTROY: seqs 0 .. events-1

    def counters(self, seq: int) -> tuple[int, int, int, int]:
        """(packets_orig, packets_reply, bytes_orig, bytes_reply) at event `seq`."""
        k = seq + 1
        return 3 * k, 2 * k, 300 * k + self.ct_id % 97, 900 * k + self.sport % 13

    def event(self, seq: int, etype: str | None = None, **changes) -> dict:
        etype = etype or ("NEW" if seq == 0 else "DESTROY" if seq == self.events - 1 else "UPDATE")
        po, pr, bo, br = self.counters(seq)
        start = self.end_ms - 1000 * (self.events - 1)
        t = start + 1000 * seq
        ev = Event(type=etype, family=self.family, proto=self.proto, src=self.src, dst=self.dst,
                   sport=self.sport, dport=self.dport, vlan=0,
                   state="ESTABLISHED" if self.proto == "tcp" else None, assured=seq > 0,
                   ct_id=self.ct_id, seq=seq, packets_orig=po, packets_reply=pr,
                   bytes_orig=bo, bytes_reply=br, time_ms=t, first_ms=start, last_ms=t,
                   end_reason="fin" if etype == "DESTROY" else None, missed=0)
        rec = records.record_of(ev, self.node)
        rec.update(changes)
        # wire.validate costs ~0.5 ms: once per shape of record is enough.
        shape = (etype, self.family, self.proto, tuple(sorted(changes)))
        if shape not in _VALIDATED:
            wire.validate(rec)
            _VALIDATED.add(shape)
        return rec

    def all_events(self) -> list[dict]:
        return [self.event(s) for s in range(self.events)]

    def expected(self) -> tuple:
        """The flow table's key and counters for this flow."""
        return (self.node, self.ct_id) + self.counters(self.events - 1)

    @property
    def key(self) -> tuple:
        return (self.node, self.ct_id)


def make_flows(n: int, *, node: str = "gw-a", first: int = 0, end_ms: int | None = None,
               events: int = 3, talkers: int = 7) -> list[Flow]:
    """n flows over a few sources, destinations and ports (so that rollups
    sum several flows), v4 and v6, TCP, UDP and ICMP, ending in the last
    minutes before `end_ms` (default: now)."""
    end_ms = int(time.time() * 1000) if end_ms is None else end_ms
    out = []
    for i in range(first, first + n):
        proto = PROTOS[i % 3]
        v6 = i % 5 == 4
        host = i % talkers + 1
        src = f"2001:2::{host:x}" if v6 else f"198.18.0.{host}"
        dst = f"2001:2:0:1::{i % 3 + 1:x}" if v6 else f"198.19.0.{i % 3 + 1}"
        out.append(Flow(node=node, ct_id=1_763_900_000_000_000_000 + i, family=6 if v6 else 4,
                        proto=proto, src=src, dst=dst, sport=20_000 + i % 40_000,
                        dport={"icmp": 7, "udp": 53}.get(proto, 443 if i % 2 else 8080),
                        end_ms=end_ms - 7_000 * (i % 40), events=events))
    return out


def lost(node: str, seq: int, **counters) -> dict:
    rep = LostReport(time_ms=int(time.time() * 1000), interval_s=10.0, lost=counters)
    return wire.validate(records.lost_record(rep, node, seq=seq))


def encoded(recs: list[dict]) -> list[tuple[bytes, bytes, int]]:
    """(key, value, timestamp) of records, as Producer.send takes them: the
    Kafka timestamp is the record's observation time, as the daemon sends it."""
    return [(records.message_key(r), wire.encode(r), r["observationTimeMilliseconds"])
            for r in recs]


async def produce(bootstrap: str, topic: str, pairs: list[tuple[bytes, bytes, int]]) -> None:
    """Send (key, value, timestamp) records with the project's producer (acks=all)."""
    producer = Producer(KafkaSettings(bootstrap=bootstrap, topic=topic))
    await producer.start(timeout_s=30)
    try:
        await producer.send(pairs)
    finally:
        await producer.stop()


def produce_sync(bootstrap: str, topic: str, pairs) -> None:
    asyncio.run(produce(bootstrap, topic, list(pairs)))


def account_argv(broker, topic: str, db_url: str, *extra: str) -> list[str]:
    return [CTSTREAM, "-v", "account", "--kafka", broker.bootstrap, "--topic", topic,
            "--db", db_url, "--session-timeout", "6", *extra]


def run_account(broker, topic: str, db_url: str, *extra: str, timeout: float = 90) -> dict:
    """`ctstream account ... --until-idle 1 -o json` to its end: its counts."""
    p = subprocess.run(account_argv(broker, topic, db_url, "--until-idle", "1", "-o", "json", *extra),
                       capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=timeout)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def ctstream(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([CTSTREAM, *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout)


# ---- what the database holds -------------------------------------------------------

def query(db_url: str, sql: str, params=()) -> list[tuple]:
    db = open_database(db_url, create=False)
    try:
        return db.query(sql, params)
    finally:
        db.close()


def flow_rows(db_url: str) -> dict[tuple, tuple]:
    """(node, ct_id) -> (node, ct_id, packets_orig, packets_reply, bytes_orig, bytes_reply)."""
    rows = query(db_url, "SELECT node_id, ct_id, packets_orig, packets_reply, bytes_orig, "
                         "bytes_reply FROM flows")
    out = {}
    for node, ct, *counters in rows:
        out[(node, wire_ct_id(ct))] = (node, wire_ct_id(ct), *counters)
    assert len(out) == len(rows)
    return out


def check_exactly(db_url: str, flows: list[Flow], events_applied: int | None = None) -> None:
    """The flow table holds each flow once with its final counters, nothing
    else; rollups are the sums of the flow rows; flow_events holds each
    event once."""
    got = flow_rows(db_url)
    want = {f.key: f.expected() for f in flows}
    missing = sorted(set(want) - set(got))[:5]
    extra = sorted(set(got) - set(want))[:5]
    assert not missing and not extra, f"missing {missing}, unexpected {extra}"
    wrong = [k for k in want if got[k] != want[k]][:5]
    assert not wrong, [(want[k], got[k]) for k in wrong]
    check_rollups(db_url)
    if events_applied is not None:
        n = query(db_url, "SELECT COUNT(*) FROM flow_events")[0][0]
        assert n == events_applied


def check_rollups(db_url: str) -> None:
    """Every rollup row equals the sum of the flow rows of its key, and no
    flow is missing from them."""
    sums: dict[tuple, Counter] = defaultdict(Counter)
    for node, src, dst, proto, dport, end_ms, po, pr, bo, br in query(
            db_url, "SELECT node_id, src, dst, protocol, dport, end_ms, packets_orig, "
                    "packets_reply, bytes_orig, bytes_reply FROM flows"):
        c = sums[(end_ms // 60_000 * 60_000, node, src, dst, proto, dport)]
        c.update(flows=1, po=po, pr=pr, bo=bo, br=br)
    rollups = {}
    for minute, node, src, dst, proto, dport, n, po, pr, bo, br in query(
            db_url, "SELECT minute_ms, node_id, src, dst, protocol, dport, flows, packets_orig, "
                    "packets_reply, bytes_orig, bytes_reply FROM rollups"):
        rollups[(minute, node, src, dst, proto, dport)] = Counter(
            flows=n, po=po, pr=pr, bo=bo, br=br)
    assert rollups == dict(sums)
