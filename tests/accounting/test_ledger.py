"""streamer.accounting.ledger against real databases (an SQLite file and the
PostgreSQL server of scripts/postgres.sh), without Kafka: records are handed
to prepare/apply as the consumer would, with their partition and offset."""

from __future__ import annotations

from collections import namedtuple

import msgpack
import pytest

from streamer.delivery import wire
from streamer.accounting import db as dbm
from streamer.accounting import ledger
from tests.accounting.support import Flow, check_exactly, lost, query

Message = namedtuple("Message", "topic partition offset headers value")
TOPIC = "t"


class Feed:
    """Numbers records as Kafka would (one partition) and applies batches."""

    def __init__(self, db):
        self.db = db
        self.offset = 0

    def messages(self, recs, headers=(wire.HEADER,)):
        out = []
        for r in recs:
            value = r if isinstance(r, bytes) else wire.encode(r)
            out.append(Message(TOPIC, 0, self.offset, list(headers), value))
            self.offset += 1
        return out

    def apply(self, recs=(), messages=None) -> ledger.BatchResult:
        msgs = messages if messages is not None else self.messages(recs)
        prepared = ledger.prepare(msgs)
        offsets = ledger.Offsets(TOPIC, "g", {0: msgs[-1].offset + 1})
        return self.db.transaction(ledger.apply, prepared, offsets)


@pytest.fixture
def feed(db_url):
    db = dbm.open_database(db_url)
    try:
        yield Feed(db)
    finally:
        db.close()


def flow(i: int, events: int = 3, **kw) -> Flow:
    return Flow(node=kw.get("node", "gw-l"), ct_id=kw.get("ct_id", 1_000 + i), family=4,
                proto="tcp", src=f"198.18.1.{i + 1}", dst="198.19.1.1", sport=30_000 + i,
                dport=443, end_ms=kw.get("end_ms", 1_790_000_000_000 + i * 1000), events=events)


def open_flow(db_url, f: Flow):
    rows = query(db_url, "SELECT last_seq, last_type, snapshot_seq, packets_orig, bytes_reply "
                         "FROM open_flows WHERE node_id = ? AND ct_id = ?", (f.node, f.ct_id))
    return rows[0] if rows else None


def test_snapshot_is_an_idempotent_upsert_of_open_state(feed, db_url):
    # A SNAPSHOT's seq is the connection's next event's (schemas/README.md).
    f = flow(1, events=4)
    res = feed.apply([f.event(0), f.event(1)])
    assert (res.events, res.flows, res.snapshots) == (2, 0, 0)
    snap = f.event(2, "SNAPSHOT", initiatorPackets=50)
    for _ in range(2):                       # twice: the same state
        res = feed.apply([snap])
        assert (res.events, res.duplicates, res.snapshots) == (0, 0, 1)
        assert open_flow(db_url, f) == (2, "SNAPSHOT", 2, 50, f.counters(2)[3])
    # An older snapshot (a stale replay) does not take the state back; nor
    # does one with the seq of an event already held (the event is newer).
    feed.apply([f.event(1, "SNAPSHOT", initiatorPackets=1)])
    assert open_flow(db_url, f)[3] == 50
    # Snapshots are not events: not in the dedupe set, no rows, no rollups.
    assert query(db_url, "SELECT COUNT(*) FROM flow_events")[0][0] == 2
    assert query(db_url, "SELECT COUNT(*) FROM flows")[0][0] == 0
    assert query(db_url, "SELECT COUNT(*) FROM rollups")[0][0] == 0
    # The event with the snapshot's seq is newer than the snapshot and is
    # not taken for a duplicate of it.
    res = feed.apply([f.event(2)])
    assert (res.events, res.duplicates) == (1, 0)
    assert open_flow(db_url, f) == (2, "UPDATE", 2, f.counters(2)[0], f.counters(2)[3])
    feed.apply([snap])
    assert open_flow(db_url, f)[:2] == (2, "UPDATE")
    # In one batch too: the event wins over the snapshot of the same seq.
    g = flow(2, events=4)
    feed.apply([g.event(0), g.event(1, "SNAPSHOT", initiatorPackets=77), g.event(1)])
    assert open_flow(db_url, g)[:4] == (1, "UPDATE", None, g.counters(1)[0])
    # The DESTROY closes the flow; a snapshot of a finished flow does not
    # bring it back.
    res = feed.apply([f.event(3)])
    assert (res.events, res.flows) == (1, 1)
    assert open_flow(db_url, f) is None
    res = feed.apply([f.event(3, "SNAPSHOT")])
    assert res.snapshots == 1 and open_flow(db_url, f) is None
    check_exactly(db_url, [f], events_applied=4 + 2)   # and g's two


def test_duplicates_in_and_across_batches(feed, db_url):
    flows = [flow(i) for i in range(20)]
    recs = [r for f in flows for r in f.all_events()]
    res = feed.apply(recs + recs[:10])
    assert (res.records, res.events, res.duplicates, res.flows) == (70, 60, 10, 20)
    res = feed.apply(recs)
    assert (res.events, res.duplicates, res.flows) == (0, 60, 0)
    # The same ct_id on another node is another flow.
    other = flow(0, node="gw-other")
    res = feed.apply(other.all_events())
    assert (res.events, res.flows) == (3, 1)
    # A DESTROY re-emitted with retries > 0 keeps its seq: a duplicate.
    res = feed.apply([flows[3].event(2, retries=2)])
    assert (res.duplicates, res.flows) == (1, 0)
    # A second DESTROY with another seq of a finished flow is not counted.
    res = feed.apply([flows[4].event(5, "DESTROY")])
    assert (res.events, res.flows, res.conflicts) == (1, 0, 1)
    check_exactly(db_url, flows + [other], events_applied=64)


def test_bad_records_are_kept_apart_and_the_batch_goes_on(feed, db_url):
    good = flow(7)
    no_ports = good.event(0)
    del no_ports["sourceTransportPort"]
    msgs = (feed.messages([good.event(0)])
            + feed.messages([b"\xc1 not msgpack"])
            + feed.messages([good.event(1)], headers=[("ctstream-schema", b"3")])
            + feed.messages([msgpack.packb([1, 2, 3])])
            + feed.messages([no_ports])
            + feed.messages([good.event(1), good.event(2)]))
    res = feed.apply(messages=msgs)
    assert (res.records, res.rejected, res.events, res.flows) == (7, 4, 3, 1)
    reasons = dict(query(db_url, "SELECT koffset, reason FROM rejected_records"))
    assert sorted(reasons) == [1, 2, 3, 4]
    assert "msgpack" in reasons[1]
    assert "ctstream-schema: 3" in reasons[2]
    assert "msgpack map" in reasons[3]
    assert "sourceTransportPort" in reasons[4]
    assert query(db_url, "SELECT next_offset FROM kafka_offsets") == [(7,)]


def test_large_ct_ids_and_lost_records(feed, db_url):
    big = flow(1, ct_id=(1 << 64) - 5)     # stored as a negative BIGINT
    feed.apply(big.all_events() + [lost("gw-l", 1, ring_full=3), lost("gw-l", 1, ring_full=3),
                                   lost("gw-l", 2, ring_full=9)])
    check_exactly(db_url, [big], events_applied=3)
    assert sorted(query(db_url, "SELECT seq FROM lost_reports")) == [(1,), (2,)]


def test_a_failed_transaction_leaves_neither_rows_nor_offsets(feed, db_url):
    f = flow(2)
    msgs = feed.messages(f.all_events())
    prepared = ledger.prepare(msgs)

    def apply_then_fail(cur):
        ledger.apply(cur, prepared, ledger.Offsets(TOPIC, "g", {0: 3}))
        raise RuntimeError("killed between the rows and the commit")

    with pytest.raises(dbm.DatabaseError, match="killed between"):
        feed.db.transaction(apply_then_fail)
    for table in dbm.TABLES:
        assert query(db_url, f"SELECT COUNT(*) FROM {table}") == [(0,)], table
    res = feed.apply(messages=msgs)
    assert res.flows == 1
    assert query(db_url, "SELECT kpartition, next_offset FROM kafka_offsets") == [(0, 3)]


# ---- schema versions ----------------------------------------------------------------

V1_FLAGS = {"tcpControlBits": "tcpControlBitsInitiator",
            "reverseTcpControlBits": "tcpControlBitsResponder"}


def as_v1(rec: dict, keep_time: bool = True) -> dict:
    """A record as a ctstream of schema version 1 wrote it: the old flag
    names, observationTimeMilliseconds optional (left out unless keep_time)."""
    old = {V1_FLAGS.get(k, k): v for k, v in rec.items()}
    old["schemaVersion"] = 1
    if not keep_time:
        old.pop("observationTimeMilliseconds")
    assert "tcpControlBits" not in old and "tcpControlBitsInitiator" in old
    return wire.validate(old)          # against ctstream-event.v1.json


def test_v1_and_v2_records_are_both_accounted(feed, db_url):
    """A topic written across an upgrade: v1 records (their flag names, no
    observation time) and v2 ones make the same rows, the TCP flags of both
    land in the flow table, and a connection begun under v1 ends under v2."""
    old, new, across = flow(1), flow(2), flow(3, events=4)
    flags = {"tcpControlBits": 0x1B, "reverseTcpControlBits": 0x13}
    v1_header, v2_header = [wire.header_of(1)], [wire.header_of(2)]
    msgs = (feed.messages([as_v1(old.event(s, **flags), keep_time=s != 1) for s in range(3)],
                          headers=v1_header)
            + feed.messages([new.event(s, **flags) for s in range(3)], headers=v2_header)
            + feed.messages([as_v1(across.event(s)) for s in range(2)], headers=v1_header)
            + feed.messages([across.event(s, tcpControlBits=0x02) for s in range(2, 4)]))
    res = feed.apply(messages=msgs)
    assert (res.records, res.rejected, res.events, res.flows) == (10, 0, 10, 3)
    check_exactly(db_url, [old, new, across], events_applied=10)
    rows = dict(((ct, (fo, fr)) for ct, fo, fr in query(
        db_url, "SELECT ct_id, tcp_flags_orig, tcp_flags_reply FROM flows")))
    assert rows == {old.ct_id: (0x1B, 0x13), new.ct_id: (0x1B, 0x13), across.ct_id: (0x02, 0)}
    # Each event once, whatever its version: v1 copies of v2 events are duplicates.
    res = feed.apply(messages=feed.messages([as_v1(new.event(2, **flags))], headers=v1_header))
    assert (res.duplicates, res.flows) == (1, 0)


@pytest.mark.parametrize("headers, rec, reason", [
    pytest.param([wire.header_of(1)], lambda f: f.event(2), "header ctstream-schema: 1, but the "
                 "record is schemaVersion 2", id="v2-record-under-a-v1-header"),
    pytest.param([wire.header_of(2)], lambda f: as_v1(f.event(2)), "header ctstream-schema: 2, "
                 "but the record is schemaVersion 1", id="v1-record-under-a-v2-header"),
    pytest.param([], lambda f: dict(f.event(2), schemaVersion=3), "schemaVersion 3, this "
                 "consumer reads 1 and 2", id="unknown-version"),
    pytest.param([], lambda f: {k: v for k, v in f.event(2).items()
                                if k != "observationTimeMilliseconds"},
                 "observationTimeMilliseconds", id="v2-without-time"),
    pytest.param([], lambda f: {k: v for k, v in f.event(2).items() if k != "tcpControlBits"},
                 "tcpControlBits", id="v2-without-flags"),
    pytest.param([], lambda f: {k: v for k, v in as_v1(f.event(2)).items()
                                if k != "tcpControlBitsResponder"},
                 "tcpControlBitsResponder", id="v1-without-flags"),
    pytest.param([], lambda f: dict(as_v1(f.event(2)), tcpControlBitsInitiator=256),
                 "tcpControlBitsInitiator", id="v1-flags-too-big"),
])
def test_records_of_the_wrong_version_or_names_are_rejected(feed, db_url, headers, rec, reason):
    f = flow(4)
    res = feed.apply(messages=feed.messages([rec(f)], headers=headers))
    assert (res.rejected, res.events, res.flows) == (1, 0, 0)
    (got,) = query(db_url, "SELECT reason FROM rejected_records")
    assert reason in got[0], got[0]
