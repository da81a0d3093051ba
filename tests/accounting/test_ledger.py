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
            + feed.messages([good.event(1)], headers=[("ctstream-schema", b"2")])
            + feed.messages([msgpack.packb([1, 2, 3])])
            + feed.messages([no_ports])
            + feed.messages([good.event(1), good.event(2)]))
    res = feed.apply(messages=msgs)
    assert (res.records, res.rejected, res.events, res.flows) == (7, 4, 3, 1)
    reasons = dict(query(db_url, "SELECT koffset, reason FROM rejected_records"))
    assert sorted(reasons) == [1, 2, 3, 4]
    assert "msgpack" in reasons[1]
    assert "ctstream-schema: 2" in reasons[2]
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
