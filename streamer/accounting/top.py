"""Top talkers from the per-minute rollups, and totals of the flow table.

Python API (for `ctstream top` and the pipeline demo):

    top_talkers("sqlite:/tmp/acct.db", by="src", since_s=600, limit=10)
        -> [{"talker": "198.18.0.1", "src": "198.18.0.1", "bytes": 123456,
             "bytes_orig": ..., "bytes_reply": ..., "packets": ..., "flows": ...}, ...]
    flow_count("sqlite:/tmp/acct.db") -> 300
    flow_totals("sqlite:/tmp/acct.db") -> {"flows": ..., "packets": ..., "bytes": ...}

`by` is "src" (initiator address), "dst" (responder address) or "port" (the
protocol and the responder's port; rows carry "protocol" and "port", and
"talker" reads like "tcp/443"). ICMP and ICMPv6 have no ports: the datapath
tracks echo exchanges only and keys them by the echo id, which the records
carry in both port fields. An id says nothing about a talker (each ping
picks one), so `port` puts every echo flow of a protocol in one row, with
"port" None, "icmp_type"/"icmp_code" of the request (8/0, 128/0) and the
talker "icmp/echo" ("icmpv6/echo"). Bytes and packets count both directions.
Ordered by bytes, then packets, then the talker. `since_s` (None: all time)
keeps flows that ended within the last since_s seconds, at the rollups'
one-minute granularity: a minute that overlaps the window counts whole.
"""

from __future__ import annotations

import time

from ..errors import ConfigError
from .db import Database, DbTarget, open_database

BY = ("src", "dst", "port")
PROTOCOL_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6"}
# Protocol -> (type, code) of the echo request, the only ICMP the datapath tracks.
ICMP_ECHO = {1: (8, 0), 58: (128, 0)}
# The port of a rollup row, as `--by port` groups it: none for ICMP.
_PORT = f"CASE WHEN protocol IN ({', '.join(map(str, ICMP_ECHO))}) THEN NULL ELSE dport END"
MAX_SINCE_S = 100 * 366 * 86400


def top_talkers(db_url: "str | DbTarget | Database", by: str = "src", since_s: float | None = None,
                limit: int = 10, now_ms: int | None = None) -> list[dict]:
    if by not in BY:
        raise ConfigError(f"--by must be one of {', '.join(BY)}, got {by!r}")
    if not isinstance(limit, int) or limit < 1:
        raise ConfigError(f"--limit must be a positive number of rows, got {limit!r}")
    if since_s is not None and not since_s > 0:
        raise ConfigError(f"--since must be a positive duration, got {since_s!r}")
    group = {"src": "src", "dst": "dst", "port": f"protocol, {_PORT}"}[by]
    where, params = "", []
    if since_s is not None:
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        # The minute [m, m + 60 s) overlaps the window when m + 60 s > start.
        where = "WHERE minute_ms > ?"
        params.append(now_ms - int(since_s * 1000) - 60_000)
    sql = (f"SELECT {group}, CAST(SUM(bytes_orig) AS BIGINT), CAST(SUM(bytes_reply) AS BIGINT), "
           f"CAST(SUM(packets_orig + packets_reply) AS BIGINT), CAST(SUM(flows) AS BIGINT) "
           f"FROM rollups {where} GROUP BY {group} "
           f"ORDER BY SUM(bytes_orig + bytes_reply) DESC, SUM(packets_orig + packets_reply) DESC, "
           f"{group} LIMIT ?")
    params.append(limit)
    rows = _query(db_url, sql, params)
    out = []
    for row in rows:
        if by == "port":
            head = port_talker(row[0], row[1])
            nums = row[2:]
        else:
            head = {"talker": row[0], by: row[0]}
            nums = row[1:]
        bo, br, packets, flows = (int(v) for v in nums)
        out.append(head | {"bytes": bo + br, "bytes_orig": bo, "bytes_reply": br,
                           "packets": packets, "flows": flows})
    return out


def port_talker(proto: int, port: int | None) -> dict:
    """The head of a `--by port` row: talker, protocol, port (and for ICMP
    the echo request's type and code instead of a port)."""
    name = PROTOCOL_NAMES.get(proto, str(proto))
    if proto in ICMP_ECHO:
        icmp_type, icmp_code = ICMP_ECHO[proto]
        return {"talker": f"{name}/echo", "protocol": proto, "port": None,
                "icmp_type": icmp_type, "icmp_code": icmp_code}
    return {"talker": f"{name}/{port}", "protocol": proto, "port": port}


def flow_count(db_url: str | Database) -> int:
    """Finished flows accounted (rows of the flow table)."""
    return int(_query(db_url, "SELECT COUNT(*) FROM flows", ())[0][0])


def flow_totals(db_url: str | Database) -> dict:
    """Flows, packets and bytes (both directions) of the flow table."""
    row = _query(db_url, "SELECT COUNT(*), CAST(COALESCE(SUM(packets_orig + packets_reply), 0) AS BIGINT), "
                         "CAST(COALESCE(SUM(bytes_orig + bytes_reply), 0) AS BIGINT) FROM flows", ())[0]
    return {"flows": int(row[0]), "packets": int(row[1]), "bytes": int(row[2])}


def _query(db_url, sql: str, params) -> list[tuple]:
    if isinstance(db_url, Database):
        return db_url.query(sql, params)
    db = open_database(db_url, create=False)
    try:
        return db.query(sql, params)
    finally:
        db.close()


def parse_duration(text: str) -> float | None:
    """Seconds of "90", "90s", "10m", "2h", "1d"; None for "all"."""
    t = text.strip().lower()
    if t in ("all", "0"):
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    mult = units.get(t[-1:], None)
    number = t[:-1] if mult else t
    try:
        value = float(number) * (mult or 1)
    except ValueError as exc:
        raise ConfigError(f"expected a duration like 90s, 10m, 2h, 1d or all, got {text!r}") from exc
    # Bounded: a huge value (1e300s) overflowed the database's integers.
    if not 0 < value <= MAX_SINCE_S:
        raise ConfigError(f"expected a positive duration up to {MAX_SINCE_S // 86400} days "
                          f"(or all), got {text!r}")
    return value
