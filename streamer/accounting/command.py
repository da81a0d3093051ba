"""`ctstream account` and `ctstream top`: their entry points (the options
are the command line's, streamer/cli.py)."""

from __future__ import annotations

import asyncio
import json
import signal
import sys

from ..errors import ConfigError
from ..settings import DB_PASSWORD_ENV, Config, check_kafka_timeout, kafka_settings

MAX_HORIZON_S = 366 * 86400


def account_main(a: Config) -> int:
    target = _target(a.db, a.db_password_file,
                     on_command_line=a.origins.get("db", "").startswith("--"))
    if a.report:
        return _report(a, target)
    if not a.kafka or not a.topic:
        raise ConfigError("account needs --kafka HOST:PORT and --topic NAME (or --report)")
    check_kafka_timeout(a.kafka_timeout)
    settings = kafka_settings(a.values)
    stats = asyncio.run(_account(a, settings, target))
    counts = stats.as_dict()
    if a.output == "json":
        print(json.dumps(counts))
    print(f"ctstream: accounted {stats.records} records in {stats.batches} transaction(s): "
          f"{stats.flows} flows, {stats.events} events, {stats.duplicates} duplicates, "
          f"{stats.snapshots} snapshots, {stats.lost} LOST, {stats.rejected} rejected"
          + (f", {stats.conflicts} conflicting DESTROYs" if stats.conflicts else "")
          + "; records by partition: "
          + (" ".join(f"{p}:{n}" for p, n in sorted(stats.by_partition.items())) or "none"),
          file=sys.stderr)
    return 0


async def _account(a: Config, settings, target):
    from .consumer import consume

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"ctstream: accounting topic {a.topic} from {a.kafka} into {target} (group {a.group})"
          + (f" until idle for {a.until_idle:g}s" if a.until_idle else "; Ctrl-C to stop"),
          file=sys.stderr)
    return await consume(settings, target, group=a.group, stop=stop, until_idle=a.until_idle,
                         connect_timeout_s=a.kafka_timeout, session_timeout_s=a.session_timeout)


def _target(url: str, password_file: str | None, on_command_line: bool):
    """The database of --db, with the password of --db-password-file or
    $CTSTREAM_DB_PASSWORD. A password in a --db given on the command line
    works but is warned about: every local user can read it in ps."""
    from .db import db_password, parse_url, url_has_password, with_password

    target = parse_url(url)
    if on_command_line and url_has_password(url):
        print(f"ctstream: warning: --db {target} carries a password, which every local user "
              f"can read in the process list: give it with --db-password-file FILE or "
              f"{DB_PASSWORD_ENV} instead", file=sys.stderr)
    return with_password(target, db_password(password_file))


def _report(a: Config, target) -> int:
    from .report import format_text, gap_report

    # Bounded: an infinite or huge horizon overflowed into a misleading
    # database error (exit 1) instead of a bad-value one.
    if not 0 < a.horizon <= MAX_HORIZON_S:
        raise ConfigError(f"--horizon must be in (0, {MAX_HORIZON_S}] seconds, got {a.horizon}")
    rep = gap_report(target, a.horizon)
    if a.output == "json":
        print(json.dumps(rep))
    else:
        print("\n".join(format_text(rep)))
    return 0


def top_main(db: str, by: str, since_text: str, limit: int, output: str,
             password_file: str | None = None) -> int:
    """`ctstream top`: the top talkers of the accounting database."""
    from .top import parse_duration, top_talkers

    target = _target(db, password_file, on_command_line=True)
    since = parse_duration(since_text)
    rows = top_talkers(target, by, since, limit)
    if output == "json":
        print(json.dumps(rows))
        return 0
    head = {"src": "SOURCE", "dst": "DESTINATION", "port": "PORT"}[by]
    width = max([len(head)] + [len(str(r["talker"])) for r in rows])
    print(f"{head.ljust(width)}  {'BYTES':>14}  {'PACKETS':>11}  {'FLOWS':>8}  {'OUT/IN BYTES':>23}")
    for r in rows:
        print(f"{str(r['talker']).ljust(width)}  {r['bytes']:>14,}  {r['packets']:>11,}  "
              f"{r['flows']:>8,}  {r['bytes_orig']:>11,}/{r['bytes_reply']:<11,}")
    if not rows:
        print("ctstream: no flows in that window", file=sys.stderr)
    return 0
