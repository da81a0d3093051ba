"""The gap report (`ctstream account --report`): what the accounting may be
missing.

- seq gaps: per flow, the seqs missing from 0 (a connection's first event,
  its CREATE) to the highest event seq applied. Every event of a connection takes the next seq in the
  datapath, delivered or not, so a hole is an event that never got here.
  `ring` marks holes whose next event carries missedEvents: the datapath's
  ring had no room and that record stands in for the lost ones (its
  counters are cumulative). The other holes were lost after the datapath.
- unfinished flows: flows with a CREATE, UPDATE or SNAPSHOT but no DESTROY
  whose last news (the newest of the last packet and the record's time) is
  older than the horizon. A live flow sends an UPDATE at least every report
  interval and an idle one ends within its timeout, so past the longest
  timeout plus a grace its DESTROY should have arrived.
- the newest loss counters of each node (LOST records) and the number of
  rejected Kafka records.

Python API: gap_report(db_url, horizon_s=DEFAULT_HORIZON_S) -> dict.
"""

from __future__ import annotations

import json
import time

# The DESTROY of a flow idle for its timeout leaves the datapath within a
# sweep, and is re-emitted after the outbox grace if Kafka did not take it;
# DEFAULT_HORIZON_S allows a minute for all that on top of the longest timeout.
from ..settings import DEFAULT_HORIZON_S
from .db import Database, open_database, wire_ct_id

# Missing seqs listed per flow at most (the count is always whole).
LIST_MISSING = 20


def gap_report(db_url: str | Database, horizon_s: float = DEFAULT_HORIZON_S,
               now_ms: int | None = None) -> dict:
    db = db_url if isinstance(db_url, Database) else open_database(db_url, create=False)
    try:
        return db.transaction(_report, horizon_s,
                              int(time.time() * 1000) if now_ms is None else now_ms)
    finally:
        if db is not db_url:
            db.close()


def _report(cur, horizon_s: float, now_ms: int) -> dict:
    cur.execute("SELECT node_id, ct_id FROM flow_events GROUP BY node_id, ct_id "
                "HAVING MAX(seq) + 1 > COUNT(*) ORDER BY node_id, ct_id")
    gappy = cur.fetchall()
    gaps = []
    for node, ct in gappy:
        cur.execute("SELECT seq, missed_events FROM flow_events WHERE node_id = ? AND ct_id = ? "
                    "ORDER BY seq", (node, ct))
        gaps.append(_flow_gaps(node, ct, cur.fetchall()))
    cutoff = now_ms - int(horizon_s * 1000)
    cur.execute(
        "SELECT node_id, ct_id, last_type, last_seq, family, protocol, src, dst, sport, dport, "
        "start_ms, last_ms, observed_ms, packets_orig + packets_reply, bytes_orig + bytes_reply "
        "FROM open_flows WHERE last_ms < ? AND observed_ms < ? ORDER BY observed_ms, node_id, ct_id",
        (cutoff, cutoff))
    unfinished = [{
        "node": r[0], "ct_id": wire_ct_id(r[1]), "last_event": r[2], "last_seq": r[3],
        "family": r[4], "protocol": r[5], "src": r[6], "dst": r[7], "sport": r[8], "dport": r[9],
        "start_ms": r[10], "last_ms": r[11], "observed_ms": r[12],
        "silent_s": round((now_ms - max(r[11], r[12])) / 1000, 1),
        "packets": int(r[13]), "bytes": int(r[14]),
    } for r in cur.fetchall()]
    cur.execute("SELECT COUNT(*) FROM flows")
    flows = int(cur.fetchone()[0])
    cur.execute("SELECT COUNT(*) FROM open_flows")
    open_flows = int(cur.fetchone()[0])
    cur.execute("SELECT COUNT(*) FROM rejected_records")
    rejected = int(cur.fetchone()[0])
    cur.execute("SELECT l.node_id, l.seq, l.observed_ms, l.counters FROM lost_reports l "
                "JOIN (SELECT node_id, MAX(seq) AS seq FROM lost_reports GROUP BY node_id) m "
                "ON l.node_id = m.node_id AND l.seq = m.seq ORDER BY l.node_id")
    lost = [{"node": r[0], "seq": r[1], "observed_ms": r[2], "counters": json.loads(r[3])}
            for r in cur.fetchall()]
    return {
        "horizon_s": horizon_s, "now_ms": now_ms, "flows": flows, "open_flows": open_flows,
        "seq_gaps": gaps, "missing_events": sum(g["missing"] for g in gaps),
        "unfinished": unfinished, "lost": lost, "rejected_records": rejected,
    }


def _flow_gaps(node: str, ct: int, rows: list[tuple]) -> dict:
    holes = []
    missing = 0
    # A connection's first event (its CREATE) has seq 0: seqs missing below
    # the lowest one seen are a gap too (a CREATE lost to a full ring).
    for (prev, _), (seq, missed) in zip([(-1, 0)] + rows[:-1], rows):
        if seq > prev + 1:
            holes.append({"from": prev + 1, "to": seq - 1, "ring": bool(missed)})
            missing += seq - prev - 1
    listed = [s for h in holes for s in range(h["from"], h["to"] + 1)][:LIST_MISSING]
    return {"node": node, "ct_id": wire_ct_id(ct), "missing": missing, "seqs": listed,
            "holes": holes, "ring_only": all(h["ring"] for h in holes)}


def format_text(rep: dict) -> list[str]:
    lines = [f"flows {rep['flows']}, open flows {rep['open_flows']}, "
             f"rejected records {rep['rejected_records']}, horizon {rep['horizon_s']:g}s"]
    lines.append(f"seq gaps: {len(rep['seq_gaps'])} flow(s), {rep['missing_events']} event(s) missing")
    for g in rep["seq_gaps"]:
        holes = ", ".join(f"{h['from']}" + (f"-{h['to']}" if h["to"] != h["from"] else "")
                          + (" (ring)" if h["ring"] else "") for h in g["holes"])
        lines.append(f"  {g['node']} ct {g['ct_id']}: missing seq {holes}")
    lines.append(f"unfinished (no DESTROY, silent > {rep['horizon_s']:g}s): {len(rep['unfinished'])}")
    for u in rep["unfinished"]:
        lines.append(f"  {u['node']} ct {u['ct_id']}: proto {u['protocol']} "
                     f"{_endpoint(u['src'], u['sport'])} -> {_endpoint(u['dst'], u['dport'])}, last {u['last_event']} seq {u['last_seq']}, "
                     f"silent {u['silent_s']:g}s, {u['packets']} packets {u['bytes']} bytes")
    for lo in rep["lost"]:
        counters = " ".join(f"{k}={v}" for k, v in lo["counters"].items())
        lines.append(f"lost at {lo['node']} (LOST seq {lo['seq']}): {counters}")
    return lines


def _endpoint(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"
