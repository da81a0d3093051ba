"""Applying a batch of Kafka records to the accounting database, in one
transaction with the partitions' next offsets: the step that makes the
accounting exactly once.

What each record does:

- CREATE, UPDATE, DESTROY are events: their key (nodeId, ctId, seq) goes into
  `flow_events`; a key that is there already is a duplicate and changes
  nothing else. A new DESTROY makes the flow's row in `flows`, adds the flow
  to its rollup (the minute of the flow's end) and closes its open-flow
  state. A new CREATE or UPDATE of a flow that has not ended updates its
  open-flow state.
- SNAPSHOT is not an event (its seq is that of the connection's next event,
  schemas/README.md): it sets the open-flow state of a flow that has not
  ended, unless that state is as new already (an event with the snapshot's
  seq or a higher one); applying it twice changes nothing. It never goes
  into the dedupe set and never makes flows or rollups.
- LOST is kept in `lost_reports`, once per (nodeId, seq).
- Anything that is not a valid record (not msgpack, a schema version this
  consumer does not read, a missing field) goes to `rejected_records` with
  its partition and offset, so one bad record does not stop the accounting.

Every version in wire.READABLE_VERSIONS is read: a topic written across an
upgrade holds v1 records (TCP flags as tcpControlBitsInitiator and
tcpControlBitsResponder) before v2 ones (tcpControlBits and
reverseTcpControlBits, and observationTimeMilliseconds in every record); both
make the same rows.

Within a transaction, existing keys are looked up first and new rows are
inserted without ON CONFLICT: if another consumer (one that lost its
partitions in a rebalance and has not noticed yet) wrote the same keys in
between, the insert fails, the transaction rolls back and runs again, and
then sees them as duplicates. Rollups are updated in key order, so that two
consumers never wait for each other's rows in opposite orders.

A stored offset only moves forward. That same late consumer may commit its
batch after the partition's new owner committed later ones: its rows are
duplicates then, and its lower offsets must not win either, or a restart
would read again from there (store_offsets keeps the higher one, also when
the two transactions commit at the same moment).
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, fields

import msgpack

from ..delivery import wire
from .db import db_ct_id

SCHEMA_HEADER = wire.HEADER_NAME
# The header values this consumer reads, and the version each announces.
_HEADER_VERSIONS = {wire.header_of(v)[1]: v for v in wire.READABLE_VERSIONS}
_READS = " and ".join(str(v) for v in wire.READABLE_VERSIONS)
EVENT_TYPES = ("CREATE", "UPDATE", "DESTROY")
# Rows per lookup statement (3 parameters each; SQLite allows 32766).
LOOKUP_CHUNK = 400
_I63 = (1 << 63) - 1
_U64 = (1 << 64) - 1

# (field, largest value the database takes) of a flow record; counters and
# times are uint64 on the wire but BIGINT in the database.
_FLOW_INTS = (
    ("sourceTransportPort", 0xFFFF), ("destinationTransportPort", 0xFFFF),
    ("protocolIdentifier", 0xFF), ("vlanId", 4095),
    ("initiatorPackets", _I63), ("responderPackets", _I63),
    ("initiatorOctets", _I63), ("responderOctets", _I63),
    ("flowStartMilliseconds", _I63), ("flowEndMilliseconds", _I63),
    ("missedEvents", 7), ("retries", 255),
)
# The same for the TCP flags, whose names depend on the version.
_FLAG_INTS = {v: tuple((name, 255) for name in names)
              for v, names in wire.TCP_FLAG_FIELDS.items()}
_ADDRESSES = {4: ("sourceIPv4Address", "destinationIPv4Address", socket.AF_INET),
              6: ("sourceIPv6Address", "destinationIPv6Address", socket.AF_INET6)}


@dataclass
class BatchResult:
    """What a batch did. `events` are new CREATE/UPDATE/DESTROY records,
    `duplicates` the ones applied before, `flows` new finished flows."""

    records: int = 0
    events: int = 0
    duplicates: int = 0
    flows: int = 0
    snapshots: int = 0
    lost: int = 0
    rejected: int = 0
    # A DESTROY with a new seq for a flow that already has its row: kept out
    # of the accounting (the datapath gives each flow one DESTROY seq).
    conflicts: int = 0

    def add(self, other: "BatchResult") -> None:
        for f in fields(BatchResult):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(BatchResult)}


@dataclass(frozen=True)
class Offsets:
    """Where to resume each partition of `topic` once the batch is applied."""

    topic: str
    group: str
    next_offset: dict[int, int]


# ---- decoding --------------------------------------------------------------------

def _uint(v, hi: int) -> bool:
    return type(v) is int and 0 <= v <= hi


def check_record(rec) -> str | None:
    """Why a decoded record cannot be accounted, or None. A fast subset of
    wire.validate (which costs ~0.5 ms a record): what the tables need."""
    if not isinstance(rec, dict):
        return f"a record is a msgpack map, got {type(rec).__name__}"
    version = rec.get("schemaVersion")
    if type(version) is not int or version not in wire.READABLE_VERSIONS:
        return f"schemaVersion {version!r}, this consumer reads {_READS}"
    obs = rec.get("observationTimeMilliseconds")
    if obs is None and version >= 2:
        return "observationTimeMilliseconds is required from schema version 2 on"
    if obs is not None and not _uint(obs, _I63):
        return "observationTimeMilliseconds must be an integer"
    etype = rec.get("eventType")
    node = rec.get("nodeId")
    if not isinstance(node, str) or not 1 <= len(node) <= 255:
        return "nodeId must be a string of 1..255 characters"
    if not _uint(rec.get("seq"), 0xFFFFFFFF):
        return "seq must be an integer in 0..2^32-1"
    if not _uint(rec.get("ctId"), _U64):
        return "ctId must be an integer in 0..2^64-1"
    if etype == "LOST":
        lost = rec.get("lost")
        if rec["ctId"] != 0:
            return "a LOST record has ctId 0"
        if not isinstance(lost, dict) or not all(isinstance(k, str) and _uint(v, _U64)
                                                 for k, v in lost.items()):
            return "lost must map counter names to integers"
        return None
    if etype not in EVENT_TYPES and etype != "SNAPSHOT":
        return f"eventType {etype!r} is not one of CREATE, UPDATE, DESTROY, SNAPSHOT, LOST"
    if rec["ctId"] == 0:
        return "a flow record has a ctId other than 0"
    for name, hi in _FLOW_INTS + _FLAG_INTS[version]:
        if not _uint(rec.get(name), hi):
            return f"{name} must be an integer in 0..{hi}"
    reason = rec.get("flowEndReason")
    if etype == "DESTROY" and not _uint(reason, 5):
        return "a DESTROY has an integer flowEndReason"
    if not isinstance(rec.get("assured"), bool):
        return "assured must be a boolean"
    state = rec.get("tcpState")
    if state is not None and not isinstance(state, str):
        return "tcpState must be a string or null"
    if family_of(rec) is None:
        return "a flow record has the two addresses of exactly one family"
    return None


def family_of(rec: dict) -> int | None:
    """4 or 6 when the record has a valid pair of one family, else None."""
    found = None
    for fam, (src, dst, af) in _ADDRESSES.items():
        if src in rec or dst in rec:
            if found is not None:
                return None
            try:
                socket.inet_pton(af, rec[src])
                socket.inet_pton(af, rec[dst])
            except (KeyError, TypeError, OSError, ValueError):
                return None
            found = fam
    return found


def decode_message(headers, value) -> tuple[dict | None, str | None]:
    """(record, None) or (None, why it is rejected). A schema header, when
    there is one, must announce a version this consumer reads, and the one
    the record says it is."""
    announced = None
    for name, hv in headers or ():
        if name == SCHEMA_HEADER:
            announced = _HEADER_VERSIONS.get(hv)
            if announced is None:
                shown = hv.decode(errors="replace") if isinstance(hv, bytes) else hv
                return None, f"header {SCHEMA_HEADER}: {shown}, this consumer reads {_READS}"
    if value is None:
        return None, "empty record value"
    try:
        rec = msgpack.unpackb(value, raw=False)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError,
            TypeError) as exc:
        return None, f"not a msgpack record: {exc}"
    why = check_record(rec)
    if why is None and announced is not None and rec["schemaVersion"] != announced:
        why = (f"header {SCHEMA_HEADER}: {announced}, but the record is schemaVersion "
               f"{rec['schemaVersion']}")
    if why is None:
        return rec, None
    # The schema's words name the field, unless the version is one this
    # consumer does not read: then check_record's reason says so.
    if isinstance(rec, dict) and rec.get("schemaVersion") in _HEADER_VERSIONS.values():
        try:
            wire.validate(rec)
        except wire.WireError as exc:   # says which field, in the schema's words
            return None, str(exc)
    return None, why


# ---- the batch -------------------------------------------------------------------

def _flow_fields(rec: dict, fam: int) -> tuple:
    src, dst, _ = _ADDRESSES[fam]
    return (fam, rec["protocolIdentifier"], rec[src], rec[dst], rec["sourceTransportPort"],
            rec["destinationTransportPort"], rec["vlanId"], rec["initiatorPackets"],
            rec["responderPackets"], rec["initiatorOctets"], rec["responderOctets"])


@dataclass
class _Prepared:
    events: list[tuple]          # (key, rec) of new-in-batch CREATE/UPDATE/DESTROY
    snapshots: list[tuple]       # (flow key, rec)
    lost: list[tuple]
    rejected: list[tuple]
    result: BatchResult


def prepare(messages, now_ms: int | None = None) -> _Prepared:
    """Decode and sort a batch's records (aiokafka ConsumerRecords, or
    anything with topic, partition, offset, headers and value), in order."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    res = BatchResult()
    seen: set[tuple] = set()
    events, snapshots, lost, rejected = [], [], [], []
    for m in messages:
        res.records += 1
        rec, why = decode_message(m.headers, m.value)
        if rec is None:
            rejected.append((m.topic, m.partition, m.offset, why[:1000], now_ms))
            continue
        etype = rec["eventType"]
        if etype == "LOST":
            lost.append((rec["nodeId"], rec["seq"], rec.get("observationTimeMilliseconds"),
                         json.dumps(rec["lost"], sort_keys=True)))
            continue
        flow = (rec["nodeId"], db_ct_id(rec["ctId"]))
        if etype == "SNAPSHOT":
            snapshots.append((flow, rec))
            continue
        key = flow + (rec["seq"],)
        if key in seen:
            res.duplicates += 1
            continue
        seen.add(key)
        events.append((key, rec))
    res.lost = len(lost)
    res.rejected = len(rejected)
    res.snapshots = len(snapshots)
    return _Prepared(events, snapshots, lost, rejected, res)


def apply(cur, batch: _Prepared, offsets: Offsets, now_ms: int | None = None) -> BatchResult:
    """Write a prepared batch and the offsets; run inside Database.transaction
    (it is run again from the start when the transaction is retried)."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    res = BatchResult(**batch.result.as_dict())
    known = _existing(cur, "flow_events", ("node_id", "ct_id", "seq"), [k for k, _ in batch.events])
    new = [(k, r) for k, r in batch.events if k not in known]
    res.duplicates += len(batch.events) - len(new)
    res.events = len(new)
    cur.executemany(
        "INSERT INTO flow_events (node_id, ct_id, seq, event_type, missed_events, observed_ms) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        [(k[0], k[1], k[2], r["eventType"], r["missedEvents"], r.get("observationTimeMilliseconds"))
         for k, r in new])

    touched = {k[:2] for k, _ in new} | {f for f, _ in batch.snapshots}
    ended = _existing(cur, "flows", ("node_id", "ct_id"), sorted(touched))
    flow_rows, rollups, closed = [], {}, []
    for key, rec in new:
        if rec["eventType"] != "DESTROY":
            continue
        flow = key[:2]
        if flow in ended:
            res.conflicts += 1
            continue
        ended.add(flow)
        closed.append(flow)
        fam = family_of(rec)
        ff = _flow_fields(rec, fam)
        flow_rows.append(key + ff + (
            rec["flowStartMilliseconds"], rec["flowEndMilliseconds"], rec["flowEndReason"],
            rec["tcpState"], int(rec["assured"]), *wire.tcp_control_bits(rec), rec["retries"]))
        minute = rec["flowEndMilliseconds"] // 60_000 * 60_000
        rk = (minute, key[0], ff[2], ff[3], ff[1], ff[5])
        acc = rollups.setdefault(rk, [0, 0, 0, 0, 0])
        acc[0] += 1
        for i in range(4):
            acc[1 + i] += ff[7 + i]
    res.flows = len(flow_rows)
    cur.executemany(
        "INSERT INTO flows (node_id, ct_id, seq, family, protocol, src, dst, sport, dport, vlan, "
        "packets_orig, packets_reply, bytes_orig, bytes_reply, start_ms, end_ms, end_reason, "
        "tcp_state, assured, tcp_flags_orig, tcp_flags_reply, retries) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", flow_rows)
    cur.executemany(
        "INSERT INTO rollups (minute_ms, node_id, src, dst, protocol, dport, flows, "
        "packets_orig, packets_reply, bytes_orig, bytes_reply) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (minute_ms, node_id, src, dst, protocol, dport) DO UPDATE SET "
        "flows = rollups.flows + excluded.flows, "
        "packets_orig = rollups.packets_orig + excluded.packets_orig, "
        "packets_reply = rollups.packets_reply + excluded.packets_reply, "
        "bytes_orig = rollups.bytes_orig + excluded.bytes_orig, "
        "bytes_reply = rollups.bytes_reply + excluded.bytes_reply",
        [rk + tuple(acc) for rk, acc in sorted(rollups.items())])

    _update_open_flows(cur, new, batch.snapshots, ended, now_ms)
    cur.executemany("DELETE FROM open_flows WHERE node_id = ? AND ct_id = ?", closed)
    cur.executemany(
        "INSERT INTO lost_reports (node_id, seq, observed_ms, counters) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (node_id, seq) DO NOTHING", batch.lost)
    cur.executemany(
        "INSERT INTO rejected_records (topic, kpartition, koffset, reason, received_ms) "
        "VALUES (?, ?, ?, ?, ?) ON CONFLICT (topic, kpartition, koffset) DO NOTHING", batch.rejected)
    store_offsets(cur, offsets, now_ms)
    return res


def _update_open_flows(cur, new, snapshots, ended: set, now_ms: int) -> None:
    """The newest state per flow that has not ended (see _newer)."""
    latest: dict[tuple, tuple] = {}
    for key, rec in new:
        if rec["eventType"] != "DESTROY":
            _keep_newest(latest, key[:2], rec)
    for flow, rec in snapshots:
        _keep_newest(latest, flow, rec)
    rows = []
    for flow, (rec, snap_seq) in sorted(latest.items()):
        if flow in ended:
            continue
        rows.append(flow + (rec["seq"], rec["eventType"], snap_seq)
                    + _flow_fields(rec, family_of(rec))
                    + (rec["flowStartMilliseconds"], rec["flowEndMilliseconds"],
                       rec.get("observationTimeMilliseconds") or now_ms, rec["tcpState"]))
    # The WHERE is _newer in SQL, against what earlier batches stored.
    cur.executemany(
        "INSERT INTO open_flows (node_id, ct_id, last_seq, last_type, snapshot_seq, family, "
        "protocol, src, dst, sport, dport, vlan, packets_orig, packets_reply, bytes_orig, "
        "bytes_reply, start_ms, last_ms, observed_ms, tcp_state) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (node_id, ct_id) DO UPDATE SET "
        "last_seq = excluded.last_seq, last_type = excluded.last_type, "
        "snapshot_seq = COALESCE(excluded.snapshot_seq, open_flows.snapshot_seq), "
        "packets_orig = excluded.packets_orig, packets_reply = excluded.packets_reply, "
        "bytes_orig = excluded.bytes_orig, bytes_reply = excluded.bytes_reply, "
        "last_ms = excluded.last_ms, observed_ms = excluded.observed_ms, "
        "tcp_state = excluded.tcp_state "
        "WHERE excluded.last_seq > open_flows.last_seq "
        "OR (excluded.last_seq = open_flows.last_seq "
        "AND (excluded.last_type <> 'SNAPSHOT' OR open_flows.last_type = 'SNAPSHOT'))", rows)


def _newer(rec: dict, have: dict) -> bool:
    """Whether `rec` is newer state than `have` (schemas/README.md): a
    SNAPSHOT's seq is that of the connection's NEXT event, so an event with
    the snapshot's seq is newer than it, and a snapshot with an event's seq
    is older. Equal kinds with equal seqs: the same state, either will do."""
    if rec["seq"] != have["seq"]:
        return rec["seq"] > have["seq"]
    return rec["eventType"] != "SNAPSHOT" or have["eventType"] == "SNAPSHOT"


def _keep_newest(latest: dict, flow: tuple, rec: dict) -> None:
    have = latest.get(flow)
    snap_seq = rec["seq"] if rec["eventType"] == "SNAPSHOT" else None
    if have is None:
        latest[flow] = (rec, snap_seq)
    elif _newer(rec, have[0]):
        latest[flow] = (rec, snap_seq if snap_seq is not None else have[1])


_UPSERT_OFFSETS = (
    "INSERT INTO kafka_offsets (topic, kpartition, next_offset, consumer_group, updated_ms) "
    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (topic, kpartition) DO UPDATE SET "
    "next_offset = excluded.next_offset, consumer_group = excluded.consumer_group, "
    "updated_ms = excluded.updated_ms")
_FORWARD_ONLY = " WHERE excluded.next_offset > kafka_offsets.next_offset"


def store_offsets(cur, offsets: Offsets, now_ms: int) -> None:
    """Store where each partition resumes, unless its stored offset is as
    high already: then the row is left as its writer left it.

    The WHERE is evaluated against the latest committed row in both engines:
    SQLite runs one writer at a time, and PostgreSQL's upsert waits for a
    concurrent writer of the row to commit and then tests that version, so
    the higher of two racing transactions wins whichever commits last."""
    _upsert_offsets(cur, _UPSERT_OFFSETS + _FORWARD_ONLY, offsets, now_ms)


def _upsert_offsets(cur, sql: str, offsets: Offsets, now_ms: int) -> None:
    cur.executemany(sql, [(offsets.topic, p, o, offsets.group, now_ms)
                          for p, o in sorted(offsets.next_offset.items())])


def stored_offsets(cur, topic: str, partitions) -> dict[int, int]:
    """The next offset to read of each of `partitions` that has one stored."""
    wanted = set(partitions)
    cur.execute("SELECT kpartition, next_offset FROM kafka_offsets WHERE topic = ?", (topic,))
    return {p: o for p, o in cur.fetchall() if p in wanted}


def _existing(cur, table: str, columns: tuple[str, ...], keys: list[tuple]) -> set[tuple]:
    """The keys (tuples of `columns`) that `table` has."""
    found: set[tuple] = set()
    width = len(columns)
    cols = ", ".join(columns)
    on = " AND ".join(f"t.{c} = k.{c}" for c in columns)
    row = "(" + ", ".join("?" * width) + ")"
    for i in range(0, len(keys), LOOKUP_CHUNK):
        chunk = keys[i:i + LOOKUP_CHUNK]
        cur.execute(f"WITH k ({cols}) AS (VALUES {', '.join([row] * len(chunk))}) "
                    f"SELECT {', '.join('t.' + c for c in columns)} FROM {table} t JOIN k ON {on}",
                    [v for key in chunk for v in key])
        found.update(tuple(r) for r in cur.fetchall())
    return found
