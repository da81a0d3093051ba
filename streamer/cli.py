"""ctstream command line: run, events, status, list, stats, detach, demo."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import sys
import time
import tomllib

from . import __version__
from .datapath.config import DEFAULT_PIN_DIR, XDP_MODES, DatapathConfig, Timeouts
from .errors import ConfigError, StreamerError

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


def _add_target_args(p: argparse.ArgumentParser, daemon: bool = False) -> None:
    p.add_argument("-i", "--interface", action="append", required=True, dest="ifaces", metavar="IFACE",
                   help="interface to attach XDP to (repeat for a gateway)")
    p.add_argument("--egress", action="store_true",
                   help="also attach a tc egress program, for connections that end on this host")
    p.add_argument("-n", "--netns", help="network namespace of the interfaces (name in /run/netns)")
    if daemon:
        # The daemon is restart-safe: a stop (systemctl restart, an upgrade)
        # leaves the kernel tracking for the next start to adopt.
        p.add_argument("--detach-on-stop", action="store_false", dest="keep",
                       help="on a requested stop (SIGTERM, Ctrl-C), detach the programs and "
                            "remove the maps, giving up live connections and unacked "
                            "DESTROYs; by default they stay for the next start to adopt")
        p.add_argument("--keep", action="store_true", default=True,
                       help="leave the programs attached and the maps pinned on stop "
                            "(the default of run)")
    else:
        p.add_argument("--keep", action="store_true",
                       help="on stop, leave the programs attached and the maps pinned: the "
                            "kernel keeps tracking, and the next start adopts the table and "
                            "its outbox (`ctstream detach` removes everything); a failure "
                            "always leaves them")
    p.add_argument("--lost-interval", type=_seconds, default=10.0, metavar="S",
                   help="seconds between LOST reports of new drops, 0 = off (%(default)g)")
    _add_datapath_args(p)


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


def _add_observe_args(p: argparse.ArgumentParser) -> None:
    m = p.add_argument_group("mqtt", "retained status and alerts under ctstream/<node id>/")
    m.add_argument("--mqtt", metavar="HOST[:PORT]",
                   help="publish status and alerts to this MQTT broker (port 1883 unless given)")
    m.add_argument("--mqtt-username", metavar="NAME")
    m.add_argument("--mqtt-password-file", metavar="FILE",
                   help="file holding the MQTT password (or set CTSTREAM_MQTT_PASSWORD)")
    m.add_argument("--mqtt-cafile", metavar="FILE", help="connect with TLS, trusting this CA")
    m.add_argument("--mqtt-interval", type=_seconds, default=5.0, metavar="S",
                   help="seconds between status messages (%(default)g)")
    m.add_argument("--alert-kafka-down", type=_seconds, default=30.0, metavar="S",
                   help="alert when Kafka has been unreachable for S seconds (%(default)g)")
    g = p.add_argument_group("metrics")
    g.add_argument("--metrics", metavar="ADDR:PORT",
                   help="serve Prometheus metrics at http://ADDR:PORT/metrics")
    g.add_argument("--metrics-walk-max", type=int, default=100_000, metavar="N",
                   help="count connections per state only while the table holds at most N "
                        "(a walk of the table at most every 30 s; %(default)s)")


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
    from .delivery.kafka_options import COMPRESSIONS, add_security_args

    p = argparse.ArgumentParser(prog="ctstream", description="Reliable conntrack event streamer (XDP/eBPF).")
    p.add_argument("--version", action="version", version=f"ctstream {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log what happens to stderr")
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="the daemon: track and ship every event to Kafka")
    _add_target_args(r, daemon=True)
    k = r.add_argument_group("kafka")
    k.add_argument("--config", metavar="FILE.toml",
                   help="settings file: top-level keys are these long options without "
                        "the dashes (kafka = \"host:9092\", timeout-udp = 30, interface = "
                        "[\"eth0\"], egress = true); the command line wins")
    k.add_argument("--kafka", required=True, metavar="HOST:PORT[,HOST:PORT]", help="bootstrap servers")
    k.add_argument("--topic", required=True, help="the topic (must exist: auto-create is not assumed)")
    k.add_argument("--node-id", help="this node's name in every record (default: the host name)")
    k.add_argument("--spool", metavar="DIR",
                   help="durable spool for when Kafka is down or slow "
                        "(default /var/lib/ctstream/spool/<pin dir name>)")
    k.add_argument("--spool-max", type=_size, default=1 << 30, metavar="SIZE",
                   help="spool bound; when full, DESTROYs stay in the kernel's outbox (1g)")
    k.add_argument("--archive-max", type=_size, default=256 << 20, metavar="SIZE",
                   help="keep up to SIZE of published records for `ctstream replay`, "
                        "0 = no archive (256m)")
    k.add_argument("--archive-age", type=_seconds, default=86400.0, metavar="S",
                   help="and for at most S seconds, 0 = no age limit (%(default)g)")
    k.add_argument("--kafka-timeout", type=_seconds, default=5.0, metavar="S",
                   help="a batch not acknowledged within S seconds goes to the spool (%(default)g)")
    k.add_argument("--kafka-compression", default="none", choices=COMPRESSIONS)
    add_security_args(k)
    _add_observe_args(r)

    e = sub.add_parser("events", help="attach and stream connection events, like conntrack -E")
    _add_target_args(e)
    e.add_argument("-o", "--output", choices=("text", "json"), default="text",
                   help="line format on stdout")
    e.add_argument("--sink", default="stdout", metavar="SPEC",
                   help="stdout, or jsonl:PATH (appended, fsync'd in batches); a DESTROY is "
                        "acked to the kernel's outbox only once the sink has it durably")
    _add_observe_args(e)

    ss = sub.add_parser("status", help="the daemon's state: Kafka, spool, outbox, in flight")
    ss.add_argument("--pin-dir", default=DEFAULT_PIN_DIR)
    ss.add_argument("-o", "--output", choices=("text", "json"), default="text")

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

    dm = sub.add_parser("demo", help="the whole pipeline: namespaces and traffic, a local Kafka, "
                                     "the daemon, the accounting consumer, a delivery report")
    dm.add_argument("-o", "--output", choices=("text", "json"), default="text")
    dm.add_argument("--datapath-only", action="store_true",
                    help="no Kafka: the events as they come and a per-flow summary next to "
                         "the kernel's conntrack")
    dm.add_argument("--pin-dir", default=f"{DEFAULT_PIN_DIR}_demo")

    # Commands that live in their own modules register themselves: each sets
    # `func`, called with the parsed arguments, returning the exit code.
    from .delivery import replay
    from .accounting import command as accounting
    accounting.add_parsers(sub)
    replay.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = _with_config_file(argv)
    except ConfigError as exc:
        print(f"ctstream: error: {exc}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
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


def _with_config_file(argv: list[str]) -> list[str]:
    """`run --config FILE`: the file's settings as options placed before the
    command line's own, so that the command line wins."""
    if "run" not in argv:
        return argv
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv[argv.index("run") + 1:])
    if not known.config:
        return argv
    try:
        with open(known.config, "rb") as f:
            settings = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {known.config}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {known.config} is not valid TOML: {exc}") from exc
    options = {a for act in build_parser()._subparsers._group_actions[0].choices["run"]._actions
               for a in act.option_strings if a.startswith("--")}
    extra: list[str] = []
    for name, value in settings.items():
        opt = "--" + name.replace("_", "-")
        if opt == "--config" or opt not in options:
            raise ConfigError(f"config file {known.config}: unknown setting {name!r}")
        values = value if isinstance(value, list) else [value]
        for v in values:
            if v is True:
                extra.append(opt)
            elif v is False:
                continue
            elif isinstance(v, (str, int, float)):
                extra += [opt, str(v)]
            else:
                raise ConfigError(f"config file {known.config}: {name} must be a string, "
                                  f"number, boolean or a list of them")
    at = argv.index("run") + 1
    return argv[:at] + extra + argv[at:]


def _dispatch(a: argparse.Namespace) -> int:
    if getattr(a, "func", None) is not None:
        return a.func(a)
    if a.cmd == "run":
        return asyncio.run(_run(a))
    if a.cmd == "events":
        return asyncio.run(_events(a))
    if a.cmd == "status":
        return _status(a)
    if a.cmd == "list":
        return _list(a)
    if a.cmd == "stats":
        return _stats(a)
    if a.cmd == "detach":
        return _detach(a)
    if a.cmd == "demo":
        if a.datapath_only:
            from .demo.datapath_demo import run_demo
            return asyncio.run(run_demo(a.pin_dir, a.output))
        from .demo.pipeline_demo import run_pipeline_demo
        return asyncio.run(run_pipeline_demo(a.pin_dir, a.output))
    raise AssertionError(a.cmd)


def _kafka_sink(a: argparse.Namespace):
    from .delivery.archive import default_spool_dir
    from .delivery.kafka_options import check_timeout, settings_from_args
    from .delivery.kafka_sink import KafkaSink

    check_timeout(a)
    if a.spool_max < 1 << 20:
        raise ConfigError(f"--spool-max must be at least 1m, got {a.spool_max}")
    if a.archive_max and a.archive_max < 1 << 20:
        raise ConfigError(f"--archive-max must be 0 (no archive) or at least 1m, got {a.archive_max}")
    if a.archive_age < 0:
        raise ConfigError(f"--archive-age must be 0 (no age limit) or positive, got {a.archive_age}")
    timeout_ms = int(a.kafka_timeout * 1000)
    settings = settings_from_args(
        a, compression=a.kafka_compression, request_timeout_ms=max(100, min(timeout_ms, 10_000)),
        delivery_timeout_ms=max(100, timeout_ms))
    spool = a.spool or default_spool_dir(a.pin_dir)
    return KafkaSink(settings, spool, a.spool_max, a.node_id,
                     archive_max=a.archive_max, archive_s=a.archive_age)


async def _run(a: argparse.Namespace) -> int:
    # Settings first (a bad TLS file, a bad bootstrap address): nothing of
    # the datapath is touched when they are wrong.
    sink = _kafka_sink(a)
    return await _serve(a, sink, f"to Kafka {a.kafka} topic {a.topic}")


async def _events(a: argparse.Namespace) -> int:
    from .delivery.sink import parse_sink

    stop = asyncio.Event()
    sink = parse_sink(a.sink, a.output, on_closed=stop.set)
    return await _serve(a, sink, "", stop)


async def _serve(a: argparse.Namespace, sink, where: str, stop: asyncio.Event | None = None) -> int:
    from .daemon import Session, Target, install_signal_handlers

    cfg = _datapath_config(a)
    if a.lost_interval < 0:
        raise ConfigError(f"--lost-interval must be 0 (off) or positive, got {a.lost_interval}")
    stop = stop or asyncio.Event()
    parts = _observe_parts(a, sink)  # binds --metrics: a port in use fails here
    try:
        install_signal_handlers(stop)
        asyncio.get_running_loop().set_exception_handler(_quiet_kafka_internals)
        async with Session(cfg, Target(a.ifaces, a.netns, a.egress), sink=sink, keep=a.keep,
                           lost_interval=a.lost_interval, parts=parts) as s:
            adopted = " (adopted the pinned table)" if s.dp.adopted else ""
            print(f"ctstream: tracking on {', '.join(a.ifaces)}"
                  f"{' (+egress)' if a.egress else ''}{adopted}{' ' + where if where else ''}; "
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


def _observe_parts(a: argparse.Namespace, sink) -> list:
    """The MQTT publisher and the metrics server the options ask for; the
    metrics socket is bound here, before the datapath is touched."""
    parts = []
    node = getattr(sink, "node_id", None) or socket.gethostname()
    if a.mqtt:
        parts.append(_mqtt_status(a, node))
    if a.metrics:
        from .observe.metrics import Metrics, parse_listen

        if a.metrics_walk_max < 0:
            raise ConfigError(f"--metrics-walk-max must be 0 or more, got {a.metrics_walk_max}")
        host, port = parse_listen(a.metrics)
        parts.append(Metrics(host, port, walk_max=a.metrics_walk_max).serve())
    return parts


def _mqtt_status(a: argparse.Namespace, node: str):
    import ssl

    from .observe.mqtt_status import MqttSettings, MqttStatus, parse_broker

    host, port = parse_broker(a.mqtt)
    password = os.environ.get("CTSTREAM_MQTT_PASSWORD")
    if a.mqtt_password_file:
        try:
            with open(a.mqtt_password_file) as f:
                password = f.readline().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read --mqtt-password-file {a.mqtt_password_file}: "
                              f"{exc.strerror}") from exc
    if password and not a.mqtt_username:
        raise ConfigError("an MQTT password needs --mqtt-username")
    tls = None
    if a.mqtt_cafile:
        try:
            tls = ssl.create_default_context(cafile=a.mqtt_cafile)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"--mqtt-cafile {a.mqtt_cafile}: "
                              f"{getattr(exc, 'strerror', None) or exc}") from exc
    if not (0.5 <= a.mqtt_interval <= 3600):
        raise ConfigError(f"--mqtt-interval must be in [0.5, 3600] seconds, got {a.mqtt_interval}")
    if not (0 <= a.alert_kafka_down <= 86400):
        raise ConfigError(f"--alert-kafka-down must be in [0, 86400] seconds, got {a.alert_kafka_down}")
    settings = MqttSettings(host, port, username=a.mqtt_username, password=password, tls=tls,
                            interval=a.mqtt_interval, kafka_down_s=a.alert_kafka_down)
    return MqttStatus(settings, node)


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
    """The status file of a daemon that is gone (SIGKILLed daemons leave it)."""
    from .daemon import status_path

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


def _list(a: argparse.Namespace) -> int:
    from .datapath.table import PinnedTable

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
    for p in problems:
        print(f"ctstream: could not detach {p}", file=sys.stderr)
    print(f"ctstream: detached {len(atts) - len(problems)} program(s), removed {a.pin_dir}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
