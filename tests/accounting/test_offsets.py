"""Stored offsets only move forward (ledger.store_offsets), on real
databases (an SQLite file and the PostgreSQL server of scripts/postgres.sh),
without Kafka: batches are handed to ledger.apply as the consumer would.

The case is a consumer that lost partition 0 in a rebalance and commits its
last batch (offsets 0..99, so next offset 100) after the new owner committed
offsets 0..199 (next offset 200). The late batch also holds records of
partition 1, which that consumer still owns. Expected: partition 0 stays at
200, the late rows of partition 0 are duplicates, those of partition 1 are
applied and partition 1 moves forward."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import psycopg
import pytest

from streamer.delivery import wire
from streamer.accounting import db as dbm
from streamer.accounting import ledger
from tests.accounting.support import check_exactly, query
from tests.accounting.test_ledger import TOPIC, Message, flow

GROUP = "g"
STEP_S = 30            # any one wait of the race test

# Partition 0: 50 flows of 4 records, offsets 0..199, node gw-l.
P0_FLOWS = [flow(i, events=4) for i in range(50)]
# Partition 1: 3 flows of 4 records, offsets 0..11, node gw-m; the first
# one (offsets 0..3) was applied before the rebalance.
P1_FLOWS = [flow(i, events=4, node="gw-m") for i in range(3)]


def messages(partition: int, first: int, flows) -> list[Message]:
    recs = [r for f in flows for r in f.all_events()]
    return [Message(TOPIC, partition, first + i, [wire.HEADER], wire.encode(r))
            for i, r in enumerate(recs)]


P0 = messages(0, 0, P0_FLOWS)
P1 = messages(1, 0, P1_FLOWS)
assert len(P0) == 200 and len(P1) == 12


def batch(msgs):
    """(prepared batch, Offsets) as consumer._apply makes them."""
    ends = {}
    for m in msgs:
        ends[m.partition] = max(ends.get(m.partition, 0), m.offset + 1)
    return ledger.prepare(msgs), ledger.Offsets(TOPIC, GROUP, ends)


def apply_batch(db, msgs, now_ms: int) -> ledger.BatchResult:
    prepared, offsets = batch(msgs)
    return db.transaction(ledger.apply, prepared, offsets, now_ms)


def stored(db) -> dict[int, int]:
    """What a consumer assigned partitions 0 and 1 would resume at."""
    return db.transaction(ledger.stored_offsets, TOPIC, [0, 1])


def updated_ms(db_url, partition: int) -> int:
    return query(db_url, "SELECT updated_ms FROM kafka_offsets WHERE kpartition = ?",
                 (partition,))[0][0]


@pytest.fixture
def database(db_url):
    db = dbm.open_database(db_url)
    try:
        yield db
    finally:
        db.close()


def check_late_batch(db_url, db, late: ledger.BatchResult) -> None:
    assert stored(db) == {0: 200, 1: 12}
    # Partition 0's late rows were all applied by the new owner already.
    assert (late.records, late.duplicates, late.events, late.flows) == (108, 100, 8, 2)
    check_exactly(db_url, P0_FLOWS + P1_FLOWS, events_applied=212)


def test_a_late_lower_offset_does_not_move_the_stored_one_back(database, db_url):
    apply_batch(database, P1[:4], now_ms=1_000)
    assert stored(database) == {1: 4}
    owner = apply_batch(database, P0, now_ms=2_000)         # the new owner
    assert (owner.events, owner.flows) == (200, 50)
    assert stored(database) == {0: 200, 1: 4}
    late = apply_batch(database, P0[:100] + P1[4:], now_ms=3_000)
    check_late_batch(db_url, database, late)
    # The lower offset changed nothing of partition 0's row; partition 1's
    # row is the late batch's.
    assert (updated_ms(db_url, 0), updated_ms(db_url, 1)) == (2_000, 3_000)
    # An offset equal to the stored one is not a move either.
    apply_batch(database, P0[199:], now_ms=4_000)
    assert stored(database)[0] == 200 and updated_ms(db_url, 0) == 2_000


# ---- the race, on PostgreSQL -------------------------------------------------------

def blocked_by(watch: psycopg.Connection, holder: int) -> tuple[int, str] | None:
    """(pid, query) of the backend waiting for a lock that backend `holder` holds."""
    rows = watch.execute(
        "SELECT pid, query FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))",
        (holder,)).fetchall()
    assert len(rows) <= 1, rows
    return rows[0] if rows else None


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize("owner_committed_first, waits_on, attempts", [
    # The owner committed offsets 0..99 in an earlier batch and holds its
    # next one (100..199) open: the late rows of partition 0 are committed
    # duplicates, and the late transaction waits on partition 0's offset
    # row, whose WHERE is then tested against the owner's committed 200.
    (True, "kafka_offsets", 1),
    # The owner's open batch holds the very rows of the late one: the late
    # insert waits on their keys, fails when the owner commits, runs again
    # and finds them duplicates.
    (False, "flow_events", 2),
], ids=["waits-on-the-offset-row", "waits-on-the-event-rows"])
def test_two_open_transactions_the_lower_offset_commits_last(
        database, db_url, owner_committed_first, waits_on, attempts):
    apply_batch(database, P1[:4], now_ms=1_000)
    if owner_committed_first:
        apply_batch(database, P0[:100], now_ms=1_500)
    owner_batch = batch(P0[100:] if owner_committed_first else P0)
    late_batch = batch(P0[:100] + P1[4:])
    late_db = dbm.open_database(db_url)
    late_opened, owner_wrote, owner_commits = (threading.Event() for _ in range(3))
    late_saw = []     # the offsets each attempt of the late transaction read

    def late_transaction(cur):
        late_saw.append(ledger.stored_offsets(cur, TOPIC, [0, 1]))
        late_opened.set()
        assert owner_wrote.wait(STEP_S), "the owner did not write its batch"
        return ledger.apply(cur, *late_batch, now_ms=3_000)

    def owner_transaction(cur):
        res = ledger.apply(cur, *owner_batch, now_ms=2_000)
        owner_wrote.set()
        assert owner_commits.wait(STEP_S), "the test did not let the owner commit"
        return res

    try:
        with psycopg.connect(db_url, autocommit=True) as watch, \
                concurrent.futures.ThreadPoolExecutor(2) as pool:
            late_future = pool.submit(late_db.transaction, late_transaction)
            assert late_opened.wait(STEP_S)
            owner_future = pool.submit(database.transaction, owner_transaction)
            assert owner_wrote.wait(STEP_S)
            owner_pid = database.conn.info.backend_pid
            deadline = time.monotonic() + STEP_S
            while (waiting := blocked_by(watch, owner_pid)) is None:
                assert time.monotonic() < deadline, "the late transaction never waited"
                assert not late_future.done(), late_future.result()
                time.sleep(0.01)
            pid, sql = waiting
            assert pid == late_db.conn.info.backend_pid and waits_on in sql, (pid, sql)
            owner_commits.set()
            owner_future.result(timeout=STEP_S)
            late = late_future.result(timeout=STEP_S)
    finally:
        owner_wrote.set()
        owner_commits.set()
        late_db.close()
    # The late transaction was open before the owner's commit and saw the
    # offsets from before it.
    assert late_saw[0] == ({0: 100, 1: 4} if owner_committed_first else {1: 4})
    assert len(late_saw) == attempts
    check_late_batch(db_url, database, late)
    assert (updated_ms(db_url, 0), updated_ms(db_url, 1)) == (2_000, 3_000)
