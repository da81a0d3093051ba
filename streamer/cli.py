"""ctstream command line: events, list, stats, detach, demo."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys

from . import __version__
from .config import DEFAULT_PIN_DIR, XDP_MODES, DatapathConfig, Timeouts
from .errors import StreamerError

log = logging.getLogger("ctstream")


def _seconds(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("b")
    mult = units.get(t[-1:], 1)
    if t[-1:] in units:
        t = t[:-1]
    try:
        return int(t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 4096, 64k or 4m, got {text!r}") from None


def _add_datapath_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("datapath")
    d = DatapathConfig()
    t = Timeouts()
    g.add_argument("--pin-dir", default=DEFAULT_PIN_DIR, help="bpffs directory of the pinned maps (%(default)s)")
    g.add_argument("--table-size", type=int, default=d.table_limit, help="connections tracked at most, live and awaiting the ack of their DESTROY "
                        "(%(default)s)")
    g.add_argument("--ring-size", type=_size, default=d.ring_bytes, help="event ring bytes, a power of two (4m)")
    g.add_argument("--report-interval", type=_seconds, default=d.report_interval,
                   help="seconds between UPDATEs of a long flow, 0 = off (%(default)s)")
    g.add_argument("--xdp-mode", choices=XDP_MODES, default=d.xdp_mode,
                   help="auto tries native, then generic (%(default)s)")
    g.add_argument("--drop-untracked", action="store_true", help="drop new connections when the table is full")
    g.add_argument("--ipv6-limit", type=int, default=None, metavar="N",
                   help="IPv6 connections at most (default: a quarter of a large table, "
                        "at least 65536; each place costs a 16-byte hash bucket)")
    g.add_argument("--grace", type=_seconds, default=d.grace, metavar="S",
                   help="re-emit an unacked DESTROY after uniform [S/2, S] seconds (%(default)g)")
    g.add_argument("--early-drop", type=_watermarks, default=f"{d.early_drop_high},{d.early_drop_low}",
                   metavar="HIGH,LOW",
                   help="above HIGH (fraction of the table) drop unassured entries early, "
                        "until LOW (%(default)s)")
    for name, default in (("syn", t.syn), ("established", t.established), ("fin", t.fin),
                          ("udp", t.udp), ("icmp", t.icmp), ("other", t.other)):
        g.add_argument(f"--timeout-{name}", type=_seconds, default=default, metavar="S",
                       help=f"{name} timeout in seconds ({default:g})")


def _watermarks(text: str) -> tuple[float, float]:
    try:
        hi, lo = (float(x.strip().rstrip("%")) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected HIGH,LOW fractions like 0.9,0.8 (or 90%,80%), got {text!r}") from None
    if "%" in text:
        hi, lo = hi / 100, lo / 100
    return hi, lo


def _datapath_config(a: argparse.Namespace) -> DatapathConfig:
    return DatapathConfig(
        pin_dir=a.pin_dir, table_limit=a.table_size, ring_bytes=a.ring_size,
        report_interval=a.report_interval, xdp_mode=a.xdp_mode, drop_untracked=a.drop_untracked,
        ipv6_limit=a.ipv6_limit, grace=a.grace,
        early_drop_high=a.early_drop[0], early_drop_low=a.early_drop[1],
        timeouts=Timeouts(syn=a.timeout_syn, established=a.timeout_established, fin=a.timeout_fin,
                          udp=a.timeout_udp, icmp=a.timeout_icmp, other=a.timeout_other),
    ).validate()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ctstream", description="Reliable conntrack event streamer (XDP/eBPF).")
    p.add_argument("--version", action="version", version=f"ctstream {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log what happens to stderr")
    sub = p.add_subparsers(dest="cmd", required=True)

    e = sub.add_parser("events", help="attach and stream connection events, like conntrack -E")
    e.add_argument("-i", "--interface", action="append", required=True, dest="ifaces", metavar="IFACE",
                   help="interface to attach XDP to (repeat for a gateway)")
    e.add_argument("--egress", action="store_true",
                   help="also attach a tc egress program, for connections that end on this host")
    e.add_argument("-n", "--netns", help="network namespace of the interfaces (name in /run/netns)")
    e.add_argument("-o", "--output", choices=("text", "json"), default="text",
                   help="line format on stdout")
    e.add_argument("--sink", default="stdout", metavar="SPEC",
                   help="stdout, or jsonl:PATH (appended, fsync'd in batches); a DESTROY is "
                        "acked to the kernel's outbox only once the sink has it durably")
    e.add_argument("--keep", action="store_true",
                   help="on stop, leave the programs attached and the maps pinned: the kernel "
                        "keeps tracking, and the next start adopts the table and its outbox "
                        "(`ctstream detach` removes everything)")
    e.add_argument("--lost-interval", type=_seconds, default=10.0, metavar="S",
                   help="seconds between LOST reports of new drops, 0 = off (%(default)g)")
    _add_datapath_args(e)

    ls = sub.add_parser("list", help="the live table, like conntrack -L")
    ls.add_argument("--pin-dir", default=DEFAULT_PIN_DIR)
    ls.add_argument("--dying", action="store_true",
                    help="show the outbox instead: ended connections whose DESTROY awaits an ack")
    ls.add_argument("-o", "--output", choices=("text", "json"), default="text")

    st = sub.add_parser("stats", help="datapath counters")
    st.add_argument("--pin-dir", default=DEFAULT_PIN_DIR)
    st.add_argument("-o", "--output", choices=("text", "json"), default="text")

    dt = sub.add_parser("detach", help="detach programs and remove the pinned maps")
    dt.add_argument("--pin-dir", default=DEFAULT_PIN_DIR)

    dm = sub.add_parser("demo", help="namespaces, real traffic, events and a per-flow summary")
    dm.add_argument("-o", "--output", choices=("text", "json"), default="text")
    dm.add_argument("--pin-dir", default=f"{DEFAULT_PIN_DIR}_demo")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="ctstream: %(message)s", stream=sys.stderr)
    try:
        return _dispatch(args)
    except StreamerError as exc:
        print(f"ctstream: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _dispatch(a: argparse.Namespace) -> int:
    if a.cmd == "events":
        return asyncio.run(_events(a))
    if a.cmd == "list":
        return _list(a)
    if a.cmd == "stats":
        return _stats(a)
    if a.cmd == "detach":
        return _detach(a)
    if a.cmd == "demo":
        from .demo import run_demo
        return asyncio.run(run_demo(a.pin_dir, a.output))
    raise AssertionError(a.cmd)


async def _events(a: argparse.Namespace) -> int:
    from .daemon import Session, Target, install_signal_handlers
    from .sink import parse_sink

    cfg = _datapath_config(a)
    if a.lost_interval < 0:
        raise StreamerError(f"--lost-interval must be 0 (off) or positive, got {a.lost_interval}")
    stop = asyncio.Event()
    install_signal_handlers(stop)
    sink = parse_sink(a.sink, a.output, on_closed=stop.set)
    async with Session(cfg, Target(a.ifaces, a.netns, a.egress), sink=sink, keep=a.keep,
                       lost_interval=a.lost_interval) as s:
        adopted = " (adopted the pinned table)" if s.dp.adopted else ""
        print(f"ctstream: tracking on {', '.join(a.ifaces)}"
              f"{' (+egress)' if a.egress else ''}{adopted}; Ctrl-C to stop", file=sys.stderr)
        waiter = asyncio.create_task(stop.wait())
        failed = asyncio.create_task(s.stopping.wait())
        await asyncio.wait({waiter, failed}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        failed.cancel()
    if s.failure:
        raise StreamerError(str(s.failure))
    return 0


def _list(a: argparse.Namespace) -> int:
    from .table import PinnedTable

    with PinnedTable(a.pin_dir) as t:
        entries = t.entries(dying=a.dying)
    entries.sort(key=lambda e: e.ct_id)
    if a.output == "json":
        for e in entries:
            print(json.dumps(e.as_dict(), separators=(",", ":")))
    else:
        for e in entries:
            print(e.text())
        what = "ended connections in the outbox" if a.dying else "connections"
        print(f"ctstream: {len(entries)} {what}", file=sys.stderr)
    return 0


def _stats(a: argparse.Namespace) -> int:
    from .table import PinnedTable

    with PinnedTable(a.pin_dir) as t:
        stats = t.stats()
    if a.output == "json":
        print(json.dumps(stats))
    else:
        width = max(len(k) for k in stats)
        for k, v in stats.items():
            print(f"{k.ljust(width)}  {v}")
    return 0


def _detach(a: argparse.Namespace) -> int:
    from .loader import check_environment, detach, load_attachments, remove_pins, save_attachments

    check_environment()
    atts = load_attachments(a.pin_dir)
    problems = detach(atts)
    save_attachments(a.pin_dir, [])
    remove_pins(a.pin_dir)
    for p in problems:
        print(f"ctstream: could not detach {p}", file=sys.stderr)
    print(f"ctstream: detached {len(atts) - len(problems)} program(s), removed {a.pin_dir}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
