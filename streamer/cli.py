"""ctstream command line: run, events, status, list, stats, detach, config,
demo, account, top, replay, ipfix.

The options of run, events, account and replay come from one table,
streamer/settings.py's SETTINGS; what a command gets is a settings.Config
(defaults < --config FILE < the options given), never the parsed arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time

from . import __version__, settings
from .datapath.config import DEFAULT_PIN_DIR
from .errors import ConfigError, StreamerError
from .settings import KINDS, Config, Setting, settings_of

log = logging.getLogger("ctstream")

_GROUP_TITLES = {"target": None, "datapath": "datapath", "kafka": "kafka", "spool": "spool",
                 "mqtt": "mqtt", "metrics": "metrics", "account": None, "replay": None,
                 "ipfix": None}
_DESCRIPTIONS = {
    "run": ("the daemon: track and ship every event to Kafka",
            "Track every connection on the interfaces with the XDP (and tc egress) "
            "datapath and ship each event to Kafka as a msgpack record; while Kafka is "
            "down or slow, to a durable local spool. A stop leaves the programs attached "
            "and the maps pinned for the next start to adopt."),
    "events": ("attach and stream connection events, like conntrack -E",
               "Attach the datapath and print every connection event as it comes (NEW, "
               "UPDATE, DESTROY with per-direction counters), or append them to a jsonl "
               "file; a stop detaches and removes the pins unless --keep."),
    "account": ("consume the stream into a flow-accounting database",
                "Consume ctstream records from Kafka into finished-flow rows and per-minute "
                "rollups, exactly once (dedupe on nodeId, ctId, seq; Kafka offsets stored in "
                "the database in the same transaction as the rows). With --report: print "
                "the gap report of the database and exit."),
    "replay": ("re-publish archived records, or the live table (--snapshot)",
               "Publish archived records of a time range again, byte for byte (the dedupe "
               "keys are the same, so exactly-once consumers stay exactly once), or with "
               "--snapshot one SNAPSHOT record per live connection."),
    "ipfix": ("export every DESTROY to an IPFIX collector (nfcapd, ...)",
              "Send the DESTROY records of the topic to an IPFIX collector as RFC 5103 "
              "biflows (RFC 7011, over UDP or TCP), as a Kafka consumer group that commits "
              "a batch's offsets only once the collector has it (at least once)."),
}


def _word(s: Setting):
    """argparse's type for one command-line word of setting s."""
    conv = KINDS[s.kind][0]

    def parse(text: str):
        try:
            return conv(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc
    parse.__name__ = s.kind
    return parse


def add_settings(p: argparse.ArgumentParser, command: str) -> None:
    """The options of `command`, one per row of settings.SETTINGS. Nothing
    has a default here: an option that was not given is not in the result,
    so that the file and then the defaults fill it (settings.build)."""
    groups: dict[str, object] = {}
    for s in settings_of(command):
        title = _GROUP_TITLES.get(s.group)
        where = p if title is None else groups.setdefault(title, p.add_argument_group(title))
        names = ([s.short] if s.short else []) + [f"--{s.name}"]
        default = s.default_for(command)
        help_text = s.help or None
        # `1 in (True,)` holds: compare booleans by identity, so 0 and 1 are shown.
        if help_text and default is not None and not isinstance(default, bool) and default != []:
            help_text += f" (default {default if not isinstance(default, tuple) else ','.join(map(str, default))})"
        kw = {"dest": s.key, "default": argparse.SUPPRESS, "help": help_text}
        if s.kind == "bool":
            where.add_argument(*names, action=argparse.BooleanOptionalAction, **kw)
            continue
        if s.kind in settings.LIST_KINDS:
            kw["action"] = "append"   # the first use starts a new list: it replaces the file's
        if s.choices:
            kw["choices"] = s.choices
        else:
            kw["metavar"] = s.metavar
        kw["type"] = _word(s)
        where.add_argument(*names, **kw)
    p.add_argument("--config", metavar="FILE.toml",
                   help="settings file: top-level keys are the long options without the "
                        "dashes (kafka = \"host:9092\", timeout-udp = 30, interface = "
                        "[\"eth0\"], egress = true); options given here win, a list given "
                        "here replaces the file's")


_PIN_DIR_HELP = f"bpffs directory of the pinned maps (default {DEFAULT_PIN_DIR})"
_OUTPUT_HELP = "text (aligned, for people) or json (for programs)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ctstream", description="Reliable conntrack event streamer (XDP/eBPF).")
    p.add_argument("--version", action="version", version=f"ctstream {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log what happens to stderr")
    sub = p.add_subparsers(dest="cmd", required=True)

    for command in ("run", "events"):
        short, description = _DESCRIPTIONS[command]
        add_settings(sub.add_parser(command, help=short, description=description), command)

    ss = sub.add_parser("status", help="the daemon's state: Kafka, spool, outbox, in flight",
                        description="The state of the daemon that owns --pin-dir, from the "
                                    "status file it rewrites every second (Kafka connected, "
                                    "spool and outbox depth, records in flight, last ack), "
                                    "and the pinned counters; also when no daemon runs.")
    ss.add_argument("--pin-dir", default=DEFAULT_PIN_DIR, help=_PIN_DIR_HELP)
    ss.add_argument("-o", "--output", choices=("text", "json"), default="text", help=_OUTPUT_HELP)

    ls = sub.add_parser("list", help="the live table, like conntrack -L",
                        description="The connections in the pinned table, read from the maps "
                                    "(nothing is compiled; works while a daemon runs and when "
                                    "none does), or with --dying the outbox.")
    ls.add_argument("--pin-dir", default=DEFAULT_PIN_DIR, help=_PIN_DIR_HELP)
    ls.add_argument("--dying", action="store_true",
                    help="show the outbox instead: ended connections whose DESTROY awaits an ack")
    ls.add_argument("-o", "--output", default="conntrack", metavar="FORMAT",
                    help="conntrack (the default: the layout of conntrack -L; timeout 0 for "
                         "--dying), text (ctstream's line: idle time; end reason and retries "
                         "for --dying) or json; with conntrack's comma options extended (the "
                         "ipv4 2 prefix) and id (id=, the ct_id): -o extended,id")
    _add_list_filters(ls.add_argument_group(
        "filters", "conntrack -L's filters; every one given must match, in every format"))

    st = sub.add_parser("stats", help="datapath counters",
                        description="The datapath's counters (packets tracked and not, drops, "
                                    "ring full, early drops, ...) and the fill of the table "
                                    "and the outbox, from the pinned maps.")
    st.add_argument("--pin-dir", default=DEFAULT_PIN_DIR, help=_PIN_DIR_HELP)
    st.add_argument("-o", "--output", choices=("text", "json"), default="text", help=_OUTPUT_HELP)

    dt = sub.add_parser("detach", help="detach programs and remove the pinned maps",
                        description="Detach every program recorded for --pin-dir (also those a "
                                    "dead daemon left attached) and remove the pinned maps: "
                                    "live connections and unacked DESTROYs are given up.")
    dt.add_argument("--pin-dir", default=DEFAULT_PIN_DIR, help=_PIN_DIR_HELP)

    cf = sub.add_parser("config", help="check a settings file, apply it live, show what is in force",
                        description="The TOML settings file is the source of truth: check says "
                                    "every problem as FILE:LINE: reason (exit 2); apply hands it "
                                    "to the running daemon, which switches to it as one new "
                                    "generation (SIGHUP to the daemon re-reads its own --config); "
                                    "show reads back from the maps what the kernel uses now.")
    cfs = cf.add_subparsers(dest="config_cmd", required=True)
    c1 = cfs.add_parser("check", help="validate a settings file (exit 0, or 2 with each problem)",
                        description="Validate FILE as `run` reads it: TOML syntax, unknown keys, "
                                    "values, prefixes, per-interface tables and settings that "
                                    "contradict each other; every problem is said as "
                                    "FILE:LINE: reason, and the exit code is 2 if there is any.")
    c1.add_argument("file", metavar="FILE.toml", help="the settings file")
    c2 = cfs.add_parser("apply", help="apply a settings file to the running daemon, atomically",
                        description="Check FILE, then have the daemon of --pin-dir switch to it "
                                    "as one new generation: a packet sees the whole old or the "
                                    "whole new configuration. The daemon's command line still "
                                    "wins over the file, as at its start; a setting that needs a "
                                    "restart, a bad file or no daemon changes nothing. Prints "
                                    "what changed and the generation now in force.")
    c2.add_argument("file", metavar="FILE.toml", help="the settings file")
    c2.add_argument("--pin-dir", default=DEFAULT_PIN_DIR, help=_PIN_DIR_HELP)
    c3 = cfs.add_parser("show", help="the configuration in force, read back from the kernel",
                        description="What the datapath uses now, read back from the pinned maps "
                                    "(not from a file): its generation, timeouts, report "
                                    "interval, event mask, grace, limits and the traffic "
                                    "selection per interface.")
    c3.add_argument("--pin-dir", default=DEFAULT_PIN_DIR, help=_PIN_DIR_HELP)
    c3.add_argument("-o", "--output", choices=("text", "json"), default="text", help=_OUTPUT_HELP)

    mg = sub.add_parser("migrate", help="move a pinned table into this build's layout of the maps",
                        description="Move the table pinned at --pin-dir (live entries and the "
                                    "outbox) into the layout of the maps this build makes, while "
                                    "the kernel tracks on: the old programs are frozen (they hold "
                                    "each packet aside), the table is copied, the new programs "
                                    "replace the old ones, and what was held is added to the "
                                    "moved entries. Stop the daemon first (its programs stay "
                                    "attached); start the new build afterwards.")
    mg.add_argument("--pin-dir", default=DEFAULT_PIN_DIR, help=_PIN_DIR_HELP)
    mg.add_argument("--to-layout", type=int, metavar="N",
                    help="the layout to move to (default: this build's, "
                         "$CTSTREAM_LAYOUT or the source's)")

    dm = sub.add_parser("demo", help="the whole pipeline: namespaces and traffic, a local Kafka, "
                                     "the daemon, the accounting consumer, a delivery report",
                        description="Run the whole pipeline on this machine and remove what it "
                                    "made when it ends: a local Kafka broker, two network "
                                    "namespaces with real traffic, the daemon, the accounting "
                                    "consumer; exit 0 when the delivery report is all equal.")
    dm.add_argument("-o", "--output", choices=("text", "json"), default="text",
                    help="the report as text or as one JSON object")
    dm.add_argument("--datapath-only", action="store_true",
                    help="no Kafka: the events as they come and a per-flow summary next to "
                         "the kernel's conntrack")
    dm.add_argument("--pin-dir", default=f"{DEFAULT_PIN_DIR}_demo",
                    help="bpffs directory of the demo's pinned maps (%(default)s)")

    for command in ("account", "ipfix", "replay"):
        short, description = _DESCRIPTIONS[command]
        add_settings(sub.add_parser(command, help=short, description=description), command)
    tp = sub.add_parser("top", help="top talkers from the accounting database",
                        description="The top talkers of the accounting database that "
                                    "`ctstream account` fills: bytes, packets and flows by "
                                    "source, destination, or protocol and port (ICMP: by type).")
    tp.add_argument("--db", default=settings.DEFAULT_DB, metavar="URL",
                    help="sqlite:PATH (embedded) or postgresql://USER@HOST:PORT/DB "
                         "(default %(default)s)")
    tp.add_argument("--db-password-file", metavar="FILE",
                    help=f"file holding the PostgreSQL password (or set {settings.DB_PASSWORD_ENV})")
    tp.add_argument("--by", choices=("src", "dst", "port"), default="src",
                    help="initiator address, responder address, or protocol/responder port "
                         "(%(default)s)")
    tp.add_argument("--since", default="all", metavar="DURATION",
                    help="flows that ended within DURATION (90s, 10m, 2h, 1d) or all (%(default)s)")
    # No -n: that is a network namespace, as in `ip -n` (run, events).
    tp.add_argument("--limit", type=int, default=10, metavar="N", help="rows (%(default)s)")
    tp.add_argument("-o", "--output", choices=("text", "json"), default="text", help=_OUTPUT_HELP)
    return p


def _relative_times(argv: list[str]) -> list[str]:
    """`replay --from -10m`: argparse takes a word that starts with '-' for
    an option; glue such a value to its option (--from=-10m)."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] in ("--from", "--to") and i + 1 < len(argv) and argv[i + 1].startswith("-") \
                and argv[i + 1][1:2].isdigit():
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


def load_config(argv: list[str], typed: bool = True) -> Config:
    """The Config of a run/events/account/replay command line (for tests and
    tools: main() does the same); typed=False leaves the typed parts out."""
    args = build_parser().parse_args(_relative_times(list(argv)))
    return _config_of(args, typed)


def _config_of(args: argparse.Namespace, typed: bool = True) -> Config:
    options = {s.name: getattr(args, s.key) for s in settings_of(args.cmd)
               if hasattr(args, s.key)}
    return settings.build(args.cmd, options, getattr(args, "config", None), typed)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(_relative_times(argv))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="ctstream: %(message)s", stream=sys.stderr)
    # aiokafka logs every failed connect; the Kafka sink says it once, in words.
    logging.getLogger("aiokafka").setLevel(logging.DEBUG if args.verbose and
                                           os.environ.get("CTSTREAM_DEBUG_KAFKA") else logging.CRITICAL)
    try:
        return _dispatch(args)
    except ConfigError as exc:  # a bad value: like argparse's usage errors
        print(f"ctstream: error: {exc}", file=sys.stderr)
        return 2
    except StreamerError as exc:
        print(f"ctstream: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _dispatch(a: argparse.Namespace) -> int:
    if a.cmd in settings.COMMANDS:
        cfg = _config_of(a)
        if a.cmd == "run":
            return asyncio.run(_run(cfg))
        if a.cmd == "events":
            return asyncio.run(_events(cfg))
        if a.cmd == "account":
            from .accounting.command import account_main
            return account_main(cfg)
        if a.cmd == "ipfix":
            from .export.command import ipfix_main
            return ipfix_main(cfg)
        from .delivery.replay import main as replay_main
        return replay_main(cfg, lambda: settings.kafka_settings(
            cfg.values, client_id="ctstream-replay", compression=cfg.kafka_compression,
            **settings.send_timeouts(cfg.kafka_timeout)))
    if a.cmd == "top":
        from .accounting.command import top_main
        return top_main(a.db, a.by, a.since, a.limit, a.output, a.db_password_file)
    if a.cmd == "status":
        return _status(a)
    if a.cmd == "list":
        return _list(a)
    if a.cmd == "stats":
        return _stats(a)
    if a.cmd == "detach":
        return _detach(a)
    if a.cmd == "migrate":
        from .datapath.migrate import migrate
        report = migrate(a.pin_dir, a.to_layout,
                         progress=lambda msg: print(f"ctstream: {msg}", file=sys.stderr))
        print(f"ctstream: {report.text()}")
        return 0
    if a.cmd == "config":
        from .control.command import config_main
        return config_main(a)
    if a.cmd == "demo":
        if a.datapath_only:
            from .demo.datapath_demo import run_demo
            return asyncio.run(run_demo(a.pin_dir, a.output))
        from .demo.pipeline_demo import run_pipeline_demo
        return asyncio.run(run_pipeline_demo(a.pin_dir, a.output))
    raise AssertionError(a.cmd)


def _kafka_sink(cfg: Config):
    from .delivery.kafka_sink import KafkaSink

    sp = cfg.spool_config
    return KafkaSink(cfg.kafka_settings, sp.dir_for(cfg.datapath.pin_dir), sp.max_bytes,
                     cfg.values["node_id"], archive_max=sp.archive_max, archive_s=sp.archive_age_s)


async def _run(cfg: Config) -> int:
    # Settings first (a bad TLS file, a bad bootstrap address): nothing of
    # the datapath is touched when they are wrong.
    sink = _kafka_sink(cfg)
    return await _serve(cfg, sink, f"to Kafka {cfg.kafka} topic {cfg.topic}")


async def _events(cfg: Config) -> int:
    from .datapath.conntrack_text import parse_output
    from .delivery.sink import parse_sink

    stop = asyncio.Event()
    out = parse_output(cfg.output)
    sink = parse_sink(cfg.sink, "json" if out.format == "json" else "text", on_closed=stop.set,
                      text_line=_conntrack_event_lines(out, cfg.datapath.timeouts),
                      node_id=cfg.node_or_host)
    return await _serve(cfg, sink, "", stop)


def _conntrack_event_lines(out, timeouts):
    """StdoutSink's line maker for -o conntrack (None for the other formats).
    A LOST report goes to stderr, where conntrack -E warns of lost events:
    conntrack's stdout has no such line."""
    if out.format != "conntrack":
        return None
    from .datapath.conntrack_text import event_line

    def line(ev):
        if ev.type == "LOST":
            print(f"ctstream: {ev.text()}", file=sys.stderr, flush=True)
            return None
        return event_line(ev, timeouts, out)
    return line


async def _serve(cfg: Config, sink, where: str, stop: asyncio.Event | None = None) -> int:
    from .daemon import Session, Target, install_signal_handlers

    stop = stop or asyncio.Event()
    parts = _observe_parts(cfg, sink)  # binds --metrics: a port in use fails here
    v = cfg.values
    try:
        install_signal_handlers(stop)
        asyncio.get_running_loop().set_exception_handler(_quiet_kafka_internals)
        target = Target(v["ifaces"], v["netns"], v["egress"], v["ingress_hook"])
        async with Session(cfg.datapath, target, sink=sink, keep=cfg.keep_on_stop,
                           lost_interval=v["lost_interval"], parts=parts, config=cfg) as s:
            adopted = " (adopted the pinned table)" if s.dp.adopted else ""
            print(f"ctstream: tracking on {', '.join(v['ifaces'])}"
                  f"{' (tc ingress)' if target.ingress == 'tc' else ''}"
                  f"{' (+egress)' if v['egress'] else ''}{adopted}{' ' + where if where else ''}; "
                  f"Ctrl-C to stop", file=sys.stderr)
            waiter = asyncio.create_task(stop.wait())
            failed = asyncio.create_task(s.stopping.wait())
            await asyncio.wait({waiter, failed}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            failed.cancel()
    finally:
        for part in parts:
            if hasattr(part, "close"):  # the metrics server, if the session never started it
                part.close()
    if s.failure:
        raise StreamerError(str(s.failure))
    return 0


def _observe_parts(cfg: Config, sink) -> list:
    """The MQTT publisher and the metrics server the settings ask for; the
    metrics socket is bound here, before the datapath is touched."""
    parts = []
    node = getattr(sink, "node_id", None) or cfg.node_or_host
    if cfg.mqtt_config.broker:
        from .observe.mqtt_status import MqttSettings, MqttStatus

        m = cfg.mqtt_config
        parts.append(MqttStatus(MqttSettings(m.host, m.port, username=m.username,
                                             password=m.password, tls=m.tls, interval=m.interval,
                                             kafka_down_s=m.kafka_down_s), node))
    m = cfg.metrics_config
    if m.listen:
        from .observe.metrics import Metrics

        parts.append(Metrics(m.host, m.port, walk_max=m.walk_max).serve())
    return parts


def _quiet_kafka_internals(loop, context) -> None:
    """aiokafka 0.14's sender and accumulator raise in their own callbacks when
    the producer is torn down after a failed delivery (the records are spooled
    already); say that in one line instead of a traceback."""
    exc = context.get("exception")
    from .errors import KafkaUnavailable
    tb = getattr(exc, "__traceback__", None)
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    if isinstance(exc, KafkaUnavailable) or any("/aiokafka/" in f for f in frames):
        log.debug("Kafka client teardown: %s: %s", type(exc).__name__, exc)
        return
    loop.default_exception_handler(context)


def _status(a: argparse.Namespace) -> int:
    from .daemon import status_path
    from .datapath.table import PinnedTable

    st: dict = {"pin_dir": a.pin_dir, "daemon_running": False}
    try:
        daemon = json.loads(status_path(a.pin_dir).read_text())
    except (OSError, ValueError):
        daemon = None
    if daemon:
        st["daemon_running"] = _alive(daemon.get("pid", 0))
        st["status_age_s"] = round(time.time() - daemon.get("time", 0), 1)
        st.update({k: v for k, v in daemon.items() if k not in ("entries", "outbox", "time")})
        if not st["daemon_running"]:
            st["kafka_connected"] = False
    with PinnedTable(a.pin_dir) as t:
        st.update(t.stats())
    if a.output == "json":
        print(json.dumps(st))
        return 0
    width = max(len(k) for k in st)
    for k, v in st.items():
        if k == "last_ack_time" and v:
            v = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v))
        print(f"{k.ljust(width)}  {v}")
    return 0


def _remove_stale_state(pin_dir: str) -> None:
    """The status file and the control socket of a daemon that is gone
    (SIGKILLed daemons leave them)."""
    import socket

    from .control.server import control_path
    from .daemon import status_path

    ctl = control_path(pin_dir)
    if ctl.exists():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(str(ctl))
            except ConnectionRefusedError:
                ctl.unlink(missing_ok=True)     # nobody listens: a dead daemon's
            except OSError:
                pass
    path = status_path(pin_dir)
    try:
        pid = json.loads(path.read_text()).get("pid", 0)
    except (OSError, ValueError):
        return
    if not _alive(pid):
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError, ValueError, OverflowError):
        return False
    return pid > 0


def _add_list_filters(g) -> None:
    g.add_argument("-p", "--proto", metavar="PROTO",
                   help="tcp, udp, icmp, icmpv6 or a protocol number")
    g.add_argument("-f", "--family", choices=("ipv4", "ipv6"), help="ipv4 or ipv6 entries")
    for names, what in ((("-s", "--src", "--orig-src"), "original source"),
                        (("-d", "--dst", "--orig-dst"), "original destination"),
                        (("-r", "--reply-src"), "reply source (ctstream does no NAT: the "
                                                "original destination)"),
                        (("-q", "--reply-dst"), "reply destination (the original source)")):
        g.add_argument(*names, metavar="ADDR[/LEN]", help=f"{what}: an address or a network")
    g.add_argument("--sport", "--orig-port-src", metavar="PORT",
                   help="TCP/UDP source port of the original direction")
    g.add_argument("--dport", "--orig-port-dst", metavar="PORT",
                   help="TCP/UDP destination port of the original direction")
    g.add_argument("--state", metavar="STATE",
                   help="TCP state (SYN_SENT, ESTABLISHED, TIME_WAIT, ...): TCP entries only")


def _list(a: argparse.Namespace) -> int:
    from .datapath.conntrack_text import Filter, entry_line, parse_output, pinned_timeouts
    from .datapath.table import PinnedTable

    # Bad words fail (exit 2) before the maps are opened.
    out = parse_output(a.output)
    keep = Filter.of(family=a.family, proto=a.proto, src=a.src, dst=a.dst,
                     reply_src=a.reply_src, reply_dst=a.reply_dst, sport=a.sport,
                     dport=a.dport, state=a.state)
    with PinnedTable(a.pin_dir) as t:
        entries = [e for e in t.entries(dying=a.dying) if keep.matches(e)]
        timeouts = pinned_timeouts(t) if out.format == "conntrack" else None
    entries.sort(key=lambda e: e.ct_id)
    if out.format == "json":
        for e in entries:
            print(json.dumps(e.as_dict(), separators=(",", ":")))
    else:
        for e in entries:
            print(e.text() if out.format == "text" else entry_line(e, timeouts, out))
        what = "ended connections in the outbox" if a.dying else "connections"
        print(f"ctstream: {len(entries)} {what}", file=sys.stderr)
    return 0


def _stats(a: argparse.Namespace) -> int:
    from .datapath.table import PinnedTable

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
    from .datapath.loader import check_environment, detach, load_attachments, remove_pins, save_attachments

    check_environment()
    atts = load_attachments(a.pin_dir)
    problems = detach(atts)
    save_attachments(a.pin_dir, [])
    remove_pins(a.pin_dir)
    _remove_stale_state(a.pin_dir)
    from .datapath import syncookies
    back = syncookies.restore(a.pin_dir)
    if back:
        print("ctstream: syn-cookies: restored " + ", ".join(
            f"{n.replace('/', '.')}={v}" for n, v in back.items()), file=sys.stderr)
    for p in problems:
        print(f"ctstream: could not detach {p}", file=sys.stderr)
    print(f"ctstream: detached {len(atts) - len(problems)} program(s), removed {a.pin_dir}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
