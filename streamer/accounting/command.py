"""`ctstream account` and `ctstream top`: argument parsing and entry points."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

from ..errors import ConfigError
from ..settings import Config, check_kafka_timeout, kafka_settings
from .db import DEFAULT_URL

MAX_HORIZON_S = 366 * 86400
_DB_HELP = ("sqlite:PATH (embedded) or postgresql://USER:PASSWORD@HOST:PORT/DB "
            "(default %(default)s)")


def add_top_parser(sub) -> None:
    """`top`; `account` is made from streamer/settings.py's table (cli.py)."""
    tp = sub.add_parser("top", help="top talkers from the accounting database")
    tp.add_argument("--db", default=DEFAULT_URL, metavar="URL", help=_DB_HELP)
    tp.add_argument("--by", choices=("src", "dst", "port"), default="src",
                    help="initiator address, responder address, or protocol/responder port "
                         "(%(default)s)")
    tp.add_argument("--since", default="all", metavar="DURATION",
                    help="flows that ended within DURATION (90s, 10m, 2h, 1d) or all (%(default)s)")
    tp.add_argument("-n", type=int, default=10, dest="limit", metavar="N", help="rows (%(default)s)")
    tp.add_argument("-o", "--output", choices=("text", "json"), default="text")
    tp.set_defaults(func=top_main)


def account_main(a: Config) -> int:
    from .db import parse_url

    target = parse_url(a.db)
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


def top_main(a: argparse.Namespace) -> int:
    from .db import parse_url
    from .top import parse_duration, top_talkers

    parse_url(a.db)
    since = parse_duration(a.since)
    rows = top_talkers(a.db, a.by, since, a.limit)
    if a.output == "json":
        print(json.dumps(rows))
        return 0
    head = {"src": "SOURCE", "dst": "DESTINATION", "port": "PORT"}[a.by]
    width = max([len(head)] + [len(str(r["talker"])) for r in rows])
    print(f"{head.ljust(width)}  {'BYTES':>14}  {'PACKETS':>11}  {'FLOWS':>8}  {'OUT/IN BYTES':>23}")
    for r in rows:
        print(f"{str(r['talker']).ljust(width)}  {r['bytes']:>14,}  {r['packets']:>11,}  "
              f"{r['flows']:>8,}  {r['bytes_orig']:>11,}/{r['bytes_reply']:<11,}")
    if not rows:
        print("ctstream: no flows in that window", file=sys.stderr)
    return 0
