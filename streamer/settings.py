"""One typed configuration for `run`, `events`, `account` and `replay`.

Every setting is one row of SETTINGS: its name (the TOML key and the long
option, `--name`), its kind, its default (per command where they differ),
the commands that take it, and its help. From that table come the command
line options (cli.py adds them to each subcommand), the reading of a TOML
file, and the values of a `Config`, in this order of precedence:

    an option given on the command line  >  the --config file  >  the default

A list given on the command line replaces the file's list. Every boolean
has a `--no-...` form, so the command line can turn off what the file turns
on. A file may hold settings of other commands (one file for `run` and
`account`): they are passed over; a name no command knows is an error.

Values are checked in one place: each kind's parser, then the typed parts a
Config is made of (DatapathConfig, KafkaSettings, SpoolConfig, MqttConfig,
MetricsConfig, ...), whose validate() raise ConfigError naming the setting.
The message then says where the value came from: `FILE:LINE: name: ...`
for the file, `--name: ...` for an option, `name: ...` for a default.
"""

from __future__ import annotations

import math
import os
import re
import socket
import tomllib
from dataclasses import dataclass

from .datapath.config import (DEFAULT_PIN_DIR, EVENT_MASK_NAMES, RUN_EVENT_MASK,
                              SYN_COOKIE_MODES, XDP_MODES, DatapathConfig, Timeouts)
from .datapath.conntrack_text import parse_output
from .datapath.selection import PrefixSet, Selection, parse_prefix
from .errors import ConfigError

COMMANDS = ("run", "events", "account", "replay", "ipfix")
KAFKA_CMDS = ("run", "account", "replay", "ipfix")
DAEMON_CMDS = ("run", "events")
COMPRESSIONS = ("none", "gzip", "snappy", "lz4", "zstd")
SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
PASSWORD_ENV = "CTSTREAM_KAFKA_SASL_PASSWORD"
MQTT_PASSWORD_ENV = "CTSTREAM_MQTT_PASSWORD"
DB_PASSWORD_ENV = "CTSTREAM_DB_PASSWORD"
DEFAULT_DB = "sqlite:/var/lib/ctstream/accounting.db"
# account --report: a flow without a DESTROY is unfinished once silent this
# long (the longest default timeout, plus a minute or two graces for the
# DESTROY's retries; streamer/accounting/report.py says why).
DEFAULT_HORIZON_S = Timeouts().longest() + max(60.0, 2 * DatapathConfig().grace)
MAX_SECONDS = 100 * 365 * 86400.0


# ---------------------------------------------------------------- kinds

_UNITS_S = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_UNITS_B = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def seconds(text) -> float:
    """10, 2.5, "10s", "5m", "2h", "1d" -> seconds."""
    if isinstance(text, bool):
        raise ValueError("expected a number of seconds, got a boolean")
    if isinstance(text, (int, float)):
        value = float(text)
    elif _is_float(text):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*(-?[0-9.]+(?:e-?\d+)?)\s*([smhd]?)\s*", str(text), re.I)
        if not m:
            raise ValueError(f"expected a number of seconds, got {text!r}")
        try:
            value = float(m.group(1)) * _UNITS_S[m.group(2).lower()]
        except ValueError as exc:
            raise ValueError(f"expected a number of seconds, got {text!r}") from exc
    return value        # inf and nan are numbers: the setting's own check refuses them


def _is_float(text) -> bool:
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True


def size(text) -> int:
    """4096, "64k", "4m", "1g" (a trailing b is allowed) -> bytes."""
    if isinstance(text, bool):
        raise ValueError("expected a size like 4096, 64k or 4m, got a boolean")
    if isinstance(text, int):
        return text
    t = str(text).strip().lower().removesuffix("b")
    mult = _UNITS_B.get(t[-1:], 1) if t[-1:].isalpha() else 1
    if t[-1:].isalpha():
        if t[-1:] not in _UNITS_B:
            raise ValueError(f"expected a size like 4096, 64k or 4m, got {text!r}")
        t = t[:-1]
    try:
        return int(t) * mult
    except ValueError as exc:
        raise ValueError(f"expected a size like 4096, 64k or 4m, got {text!r}") from exc


def fractions(text) -> tuple[float, float]:
    """"0.9,0.8", "90%,80%" or [0.9, 0.8] -> (high, low)."""
    parts = list(text) if isinstance(text, (list, tuple)) else str(text).split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        pct = any("%" in str(p) for p in parts)
        hi, lo = (float(str(p).strip().rstrip("%")) for p in parts)
    except ValueError as exc:
        raise ValueError(f"expected HIGH,LOW fractions like 0.9,0.8 (or 90%,80%), "
                         f"got {text!r}") from exc
    return (hi / 100, lo / 100) if pct else (hi, lo)


def fraction(text) -> float:
    """0.9, "0.9" or "90%" -> 0.9."""
    if isinstance(text, bool):
        raise ValueError(f"expected a fraction like 0.9 or 90%, got {text!r}")
    t = str(text).strip()
    try:
        v = float(t.rstrip("%"))
    except ValueError as exc:
        raise ValueError(f"expected a fraction like 0.9 or 90%, got {text!r}") from exc
    return v / 100 if t.endswith("%") else v


def integer(text) -> int:
    if isinstance(text, bool) or isinstance(text, float):
        raise ValueError(f"expected an integer, got {text!r}")
    try:
        return int(text)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"expected an integer, got {text!r}") from exc


def connection_id(text) -> int:
    try:
        value = integer(text)
    except ValueError:
        value = -1
    if not 0 <= value < 1 << 64:
        raise ValueError(f"expected a connection id (0 .. 2^64-1), got {text!r}")
    return value


def string(text) -> str:
    if not isinstance(text, str):
        raise ValueError(f"expected a string, got {text!r}")
    return text


def prefix(text) -> str:
    """One CIDR of track-prefixes or ignore-prefixes, in its canonical form."""
    return str(parse_prefix(text))


# kind -> (what a command-line word becomes, what a TOML value becomes)
KINDS = {
    "str": (str, string),
    "int": (integer, integer),
    "seconds": (seconds, seconds),
    "size": (size, size),
    "bool": (None, None),
    "list": (str, string),
    "ints": (connection_id, connection_id),
    "choice": (str, string),
    "fractions": (fractions, fractions),
    "fraction": (fraction, fraction),
    "prefixes": (prefix, prefix),
}


LIST_KINDS = ("list", "ints", "prefixes")


@dataclass(frozen=True)
class Setting:
    name: str
    kind: str
    default: object                  # a value, or {command: value}
    help: str
    commands: tuple[str, ...]
    short: str | None = None
    metavar: str | None = None
    choices: tuple = ()
    group: str = ""                  # the help section
    dest: str = ""                   # the attribute in Config.values (default: name with _)

    @property
    def key(self) -> str:
        return self.dest or self.name.replace("-", "_")

    def default_for(self, command: str):
        d = self.default
        return d.get(command) if isinstance(d, dict) else d

    def parse(self, value, from_file: bool):
        """A command-line word or a TOML value of this setting, converted and
        checked against the kind; ValueError says why not."""
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise ValueError(f"expected true or false, got {value!r}")
            return value
        conv = KINDS[self.kind][1 if from_file else 0]
        if self.kind in LIST_KINDS:
            items = value if isinstance(value, list) else [value]
            if from_file and any(isinstance(v, (dict, list)) for v in items):
                raise ValueError("must be a string, number, boolean or a list of them")
            return [conv(str(v) if self.kind == "list" and from_file and not isinstance(v, str)
                         else v) for v in items]
        if from_file and isinstance(value, (dict, list)) and self.kind != "fractions":
            raise ValueError("must be a string, number, boolean or a list of them")
        if from_file and self.kind in ("str", "choice") and isinstance(value, (int, float)) \
                and not isinstance(value, bool):
            value = str(value)
        out = conv(value)
        if self.choices and out not in self.choices:
            raise ValueError(f"must be one of {', '.join(self.choices)}, got {out!r}")
        return out


def _s(name, kind, default, help, commands, **kw) -> Setting:
    return Setting(name, kind, default, help, tuple(commands), **kw)


_T = Timeouts()
_D = DatapathConfig()

SETTINGS: tuple[Setting, ...] = (
    # -- where to attach
    _s("interface", "list", None, "interface to attach XDP to (repeat for a gateway)",
       DAEMON_CMDS, short="-i", metavar="IFACE", dest="ifaces", group="target"),
    _s("egress", "bool", False, "also attach a tc egress program, for connections that end "
       "on this host", DAEMON_CMDS, group="target"),
    _s("ingress-hook", "choice", "xdp", "where packets received are tracked: xdp (before "
       "the kernel's stack; --xdp-mode says how), or tc (the clsact ingress hook, after GRO, "
       "where nf_conntrack looks too)", DAEMON_CMDS, choices=("xdp", "tc"), group="target"),
    _s("netns", "str", None, "network namespace of the interfaces (name in /run/netns)",
       DAEMON_CMDS, short="-n", group="target"),
    _s("keep", "bool", {"run": True, "events": False},
       "on stop, leave the programs attached and the maps pinned: the kernel keeps tracking, "
       "and the next start adopts the table and its outbox (`ctstream detach` removes "
       "everything); the default of run; a failure always leaves them", DAEMON_CMDS,
       group="target"),
    _s("detach-on-stop", "bool", False,
       "on a requested stop (SIGTERM, Ctrl-C), detach the programs and remove the maps, giving "
       "up live connections and unacked DESTROYs; by default they stay for the next start "
       "to adopt", ("run",), group="target"),
    _s("lost-interval", "seconds", 10.0, "seconds between LOST reports of new drops, 0 = off",
       DAEMON_CMDS, metavar="S", group="target"),
    # -- the datapath
    _s("pin-dir", "str", DEFAULT_PIN_DIR, "bpffs directory of the pinned maps",
       DAEMON_CMDS + ("replay",), group="datapath"),
    _s("table-size", "int", _D.table_limit, "connections tracked at most, live and awaiting "
       "the ack of their DESTROY", DAEMON_CMDS, group="datapath"),
    _s("ring-size", "size", _D.ring_bytes, "event ring bytes, a power of two (4m)",
       DAEMON_CMDS, group="datapath"),
    _s("report-interval", "seconds", _D.report_interval,
       "seconds between UPDATEs of a long flow, 0 = off", DAEMON_CMDS, metavar="S",
       group="datapath"),
    _s("event-mask", "list", {"run": list(RUN_EVENT_MASK),
                              "events": list(EVENT_MASK_NAMES)},
       "the events a flow emits, of new, assured (the UPDATE that marks it ASSURED), state "
       "(an UPDATE on every other TCP state change) and destroy (always); periodic reports "
       "come with --report-interval", DAEMON_CMDS, metavar="EVENT[,EVENT]",
       group="datapath"),
    _s("track-prefixes", "prefixes", [], "track only flows with an address in these CIDRs "
       "(repeat; the longest matching prefix of either address wins, and ignore wins a tie; "
       "per interface in the file's [interfaces.NAME] tables); live: `ctstream config apply`",
       DAEMON_CMDS, metavar="CIDR", group="datapath"),
    _s("ignore-prefixes", "prefixes", [], "pass flows with an address in these CIDRs "
       "untouched, untracked and without events (counted as ignored_packets)", DAEMON_CMDS,
       metavar="CIDR", group="datapath"),
    _s("syn-cookies", "choice", _D.syn_cookies, "answer SYNs to local listeners from XDP "
       "with SYN cookies, so a SYN flood creates no entry: off, on, or auto (on for a port "
       "while its SYNs exceed --syn-cookie-rate per second, or while the table is above "
       "--syn-cookie-high); needs the xdp ingress hook", DAEMON_CMDS,
       choices=SYN_COOKIE_MODES, group="datapath"),
    _s("syn-cookie-rate", "int", _D.syn_cookie_rate, "auto: SYNs per second to one port "
       "that turn cookies on for it, 0 = never", DAEMON_CMDS, metavar="N", group="datapath"),
    _s("syn-cookie-high", "fraction", _D.syn_cookie_high, "auto: table fill (live and awaiting "
       "ack) that turns cookies on for every port, 0 = never", DAEMON_CMDS, metavar="F",
       group="datapath"),
    _s("xdp-mode", "choice", _D.xdp_mode, "auto tries native, then generic", DAEMON_CMDS,
       choices=XDP_MODES, group="datapath"),
    _s("drop-untracked", "bool", False, "drop new connections when the table is full",
       DAEMON_CMDS, group="datapath"),
    _s("ipv6-limit", "int", None, "IPv6 connections at most (default: a quarter of a large "
       "table, at least 65536; each place costs a 16-byte hash bucket)", DAEMON_CMDS,
       metavar="N", group="datapath"),
    _s("grace", "seconds", _D.grace, "re-emit an unacked DESTROY after uniform [S/2, S] "
       "seconds", DAEMON_CMDS, metavar="S", group="datapath"),
    _s("early-drop", "fractions", (_D.early_drop_high, _D.early_drop_low),
       "above HIGH (fraction of the table) drop unassured entries early, until LOW",
       DAEMON_CMDS, metavar="HIGH,LOW", group="datapath"),
    *(_s(f"timeout-{n}", "seconds", getattr(_T, n), f"{n} timeout in seconds", DAEMON_CMDS,
         metavar="S", group="datapath")
      for n in ("syn", "established", "fin", "udp", "icmp", "other")),
    # -- Kafka
    _s("kafka", "str", None, "bootstrap servers", KAFKA_CMDS,
       metavar="HOST:PORT[,HOST:PORT]", group="kafka"),
    _s("topic", "str", None, "the topic (must exist: auto-create is not assumed)",
       KAFKA_CMDS, group="kafka"),
    _s("node-id", "str", None, "this node's name in every record (default: the host name); "
       "events: the nodeId of its JSON records; replay: only this node's records, or the "
       "node of --snapshot records", ("run", "events", "replay"), group="kafka"),
    _s("kafka-timeout", "seconds", {"run": 5.0, "account": 15.0, "replay": 30.0, "ipfix": 15.0},
       "run: a batch not acknowledged within S seconds goes to the spool; account, ipfix: give "
       "up when Kafka cannot be reached within S at start; replay: a send not acknowledged "
       "within S fails the replay", KAFKA_CMDS, metavar="S", group="kafka"),
    _s("kafka-compression", "choice", "none", "record batch compression", ("run", "replay"),
       choices=COMPRESSIONS, group="kafka"),
    _s("kafka-security-protocol", "choice", "PLAINTEXT", "how to talk to the brokers: "
       "plain TCP, TLS (SSL), SASL over plain TCP or over TLS", KAFKA_CMDS,
       choices=SECURITY_PROTOCOLS, group="kafka"),
    _s("kafka-ssl-cafile", "str", None, "TLS: CA certificates (PEM) to trust for the brokers' "
       "certificates, besides the system's", KAFKA_CMDS, metavar="FILE",
       group="kafka"),
    _s("kafka-ssl-certfile", "str", None, "TLS: this client's certificate (PEM), for brokers "
       "that authenticate clients", KAFKA_CMDS, metavar="FILE", group="kafka"),
    _s("kafka-ssl-keyfile", "str", None, "TLS: the private key of --kafka-ssl-certfile (PEM), "
       "if that file does not hold it",
       KAFKA_CMDS, metavar="FILE", group="kafka"),
    _s("kafka-sasl-mechanism", "choice", None, "SASL: how to authenticate (with "
       "--kafka-security-protocol SASL_PLAINTEXT or SASL_SSL)", KAFKA_CMDS, choices=SASL_MECHANISMS,
       group="kafka"),
    _s("kafka-sasl-username", "str", None, "SASL: the user name", KAFKA_CMDS, metavar="NAME",
       group="kafka"),
    _s("kafka-sasl-password-file", "str", None,
       f"file holding the SASL password (or set {PASSWORD_ENV})", KAFKA_CMDS, metavar="FILE",
       group="kafka"),
    # -- spool and archive
    _s("spool", "str", None, "run: durable spool for when Kafka is down or slow (default "
       "/var/lib/ctstream/spool/<pin dir name>); replay: the daemon's --spool, the archive "
       "is DIR/archive", ("run", "replay"), metavar="DIR", group="spool"),
    _s("spool-max", "size", 1 << 30, "spool bound; when full, DESTROYs stay in the kernel's "
       "outbox (1g)", ("run",), metavar="SIZE", group="spool"),
    _s("archive-max", "size", 256 << 20, "keep up to SIZE of published records for "
       "`ctstream replay`, 0 = no archive (256m)", ("run",), metavar="SIZE", group="spool"),
    _s("archive-age", "seconds", 86400.0, "and for at most S seconds, 0 = no age limit",
       ("run",), metavar="S", group="spool"),
    # -- MQTT and metrics
    _s("mqtt", "str", None, "publish status and alerts to this MQTT broker (port 1883 "
       "unless given)", DAEMON_CMDS, metavar="HOST[:PORT]", group="mqtt"),
    _s("mqtt-username", "str", None, "the user name at the MQTT broker", DAEMON_CMDS,
       metavar="NAME", group="mqtt"),
    _s("mqtt-password-file", "str", None, f"file holding the MQTT password (or set "
       f"{MQTT_PASSWORD_ENV})", DAEMON_CMDS, metavar="FILE", group="mqtt"),
    _s("mqtt-cafile", "str", None, "connect with TLS, trusting this CA", DAEMON_CMDS,
       metavar="FILE", group="mqtt"),
    _s("mqtt-interval", "seconds", 5.0, "seconds between status messages", DAEMON_CMDS,
       metavar="S", group="mqtt"),
    _s("alert-kafka-down", "seconds", 30.0, "alert when Kafka has been unreachable for S "
       "seconds", DAEMON_CMDS, metavar="S", group="mqtt"),
    _s("metrics", "str", None, "serve Prometheus metrics at http://ADDR:PORT/metrics",
       DAEMON_CMDS, metavar="ADDR:PORT", group="metrics"),
    _s("metrics-walk-max", "int", 100_000, "count connections per state only while the "
       "table holds at most N (a walk of the table at most every 30 s)", DAEMON_CMDS,
       metavar="N", group="metrics"),
    # -- events
    # events: comma words (conntrack's -o extended,id), so a str checked in _make_parts.
    _s("output", "str", {"events": "conntrack", "account": "text"},
       "events: the line format on stdout: conntrack (the layout of conntrack -E, with "
       "conntrack's options extended and id: -o extended,id), text (ctstream's line: end "
       "reason, missed events, seq) or json; account: text or json, the format of the "
       "report, or of the final counts", ("events", "account"), short="-o", metavar="FORMAT"),
    _s("sink", "str", "stdout", "stdout, or jsonl:PATH (appended, fsync'd in batches); a "
       "DESTROY is acked to the kernel's outbox only once the sink has it durably",
       ("events",), metavar="SPEC"),
    # -- account
    _s("db", "str", DEFAULT_DB, "sqlite:PATH (embedded) or postgresql://USER@HOST:PORT/DB "
       f"(the password: --db-password-file or {DB_PASSWORD_ENV}; one in the URL is warned "
       "about, every local user can read it in the process list)", ("account",),
       metavar="URL", group="account"),
    _s("db-password-file", "str", None, f"file holding the PostgreSQL password (or set "
       f"{DB_PASSWORD_ENV}); either wins over a password in --db", ("account",),
       metavar="FILE", group="account"),
    _s("group", "str", {"account": "ctstream-account", "ipfix": "ctstream-ipfix"},
       "Kafka consumer group; consumers of one group split the partitions",
       ("account", "ipfix"), group="account"),
    _s("until-idle", "seconds", None, "exit once every assigned partition is read to its end "
       "and nothing arrived for S seconds (default: run until SIGINT/SIGTERM)",
       ("account", "ipfix"), metavar="S", group="account"),
    _s("session-timeout", "seconds", 10.0, "Kafka group session timeout: a consumer that "
       "died loses its partitions after S seconds", ("account", "ipfix"), metavar="S",
       group="account"),
    _s("report", "bool", False, "print the gap report (seq gaps, flows without a DESTROY) "
       "and exit; needs no Kafka", ("account",), group="account"),
    _s("horizon", "seconds", DEFAULT_HORIZON_S, "--report: a flow without a DESTROY and silent for S "
       "seconds is unfinished (the longest default timeout plus a grace)", ("account",),
       metavar="S", group="account"),
    # -- ipfix
    _s("collector", "str", None, "the IPFIX collector (e.g. nfcapd -p 4739)", ("ipfix",),
       metavar="HOST:PORT", group="ipfix"),
    _s("transport", "choice", "udp", "udp (templates at start and every --template-interval) "
       "or tcp (templates at each connection; offsets committed once the collector's TCP "
       "acknowledged the records)", ("ipfix",), choices=("udp", "tcp"), group="ipfix"),
    _s("template-interval", "seconds", 60.0, "udp: send the templates again every S seconds",
       ("ipfix",), metavar="S", group="ipfix"),
    _s("observation-domain", "int", 1, "the IPFIX observation domain id of the messages",
       ("ipfix",), metavar="ID", group="ipfix"),
    # -- replay
    _s("from", "str", None, "start of the range (included): ISO 8601 (2024-05-01T12:00:00Z; "
       "without a zone: local time), epoch seconds, 'now', or relative like -10m, -2h, -1d",
       ("replay",), metavar="TIME", dest="time_from", group="replay"),
    _s("to", "str", "now", "end of the range (excluded), same forms", ("replay",),
       metavar="TIME", dest="time_to", group="replay"),
    _s("ct-id", "ints", None, "only this connection's records (repeat for more)", ("replay",),
       metavar="ID", group="replay"),
    _s("snapshot", "bool", False, "publish the live table as SNAPSHOT records instead (needs "
       "--pin-dir of the running datapath)", ("replay",), group="replay"),
)
BY_NAME = {s.name: s for s in SETTINGS}


def settings_of(command: str) -> list[Setting]:
    return [s for s in SETTINGS if command in s.commands]


# ---------------------------------------------------------------- sources

# A table header: [interfaces.NAME] (NAME bare or quoted).
_TABLE = re.compile(r"""\s*\[\s*([A-Za-z0-9_-]+)\s*(?:\.\s*(?:([A-Za-z0-9_.@:-]+)|"([^"]*)"|'([^']*)')\s*)?\]""")


def read_file(path: str) -> tuple[dict, dict[str, int]]:
    """The settings of a TOML file and the line of each: top-level keys by
    name, keys of a [TABLE.NAME] table as "TABLE.NAME.key", and the table
    header itself as "TABLE.NAME" (or "TABLE")."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {path}: {exc.strerror}") from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        line = re.search(r"line (\d+)", str(exc))
        at = f"{path}:{line.group(1)}" if line else path
        raise ConfigError(f"{at}: config file {path} is not valid TOML: {exc}") from exc
    lines: dict[str, int] = {}
    table = ""
    for n, text in enumerate(raw.decode("utf-8").splitlines(), 1):
        t = _TABLE.match(text)
        if t and not text.lstrip().startswith("[["):
            name = t.group(2) or t.group(3) or t.group(4)
            table = t.group(1) + ("." + name if name is not None else "")
            lines.setdefault(table, n)
            continue
        m = re.match(r"\s*([\"']?)([A-Za-z0-9_-]+)\1\s*=", text)
        if m:
            lines.setdefault(f"{table}.{m.group(2)}" if table else m.group(2), n)
    return data, lines


@dataclass
class Config:
    """The settings of one command: `values` by setting key (also read as
    attributes: cfg.ifaces, cfg.kafka), `origins` by setting name
    ("default", "FILE:LINE" or "--name"), and the typed parts built from
    them (None where the command has no such part)."""

    command: str
    values: dict
    origins: dict
    config_file: str | None = None
    options: dict | None = None           # what the command line gave (setting name -> value)
    datapath: DatapathConfig | None = None
    kafka_settings: object = None         # delivery.kafka_settings.KafkaSettings
    spool_config: "SpoolConfig | None" = None
    mqtt_config: "MqttConfig | None" = None
    metrics_config: "MetricsConfig | None" = None

    def __getattr__(self, key: str):
        # The plain settings (ifaces, keep, output, db, ...) by their key.
        try:
            return self.__dict__["values"][key]
        except KeyError:
            raise AttributeError(key) from None

    def given(self, name: str) -> bool:
        return self.origins.get(name, "default") != "default"

    def where(self, name: str) -> str:
        origin = self.origins.get(name, "default")
        if origin == "default":
            return name
        if origin.startswith("--"):
            return origin
        return f"{origin}: {name}"

    @property
    def keep_on_stop(self) -> bool:
        return bool(self.values.get("keep")) and not self.values.get("detach_on_stop")

    @property
    def node_or_host(self) -> str:
        """node-id if given, else the host name."""
        return self.values.get("node_id") or socket.gethostname()


def build(command: str, options: dict, config_file: str | None = None,
          typed: bool = True) -> Config:
    """The Config of `command` from the options given on its command line
    (setting name -> converted value: only those given) and the file; with
    typed, also its typed parts (validated, TLS and password files read)."""
    known = settings_of(command)
    values = {s.key: s.default_for(command) for s in known}
    origins = {s.name: "default" for s in known}
    if config_file:
        data, lines = read_file(config_file)
        for name, value in data.items():
            canon = name.replace("_", "-")
            at = f"{config_file}:{lines.get(name, '?')}"
            if canon == INTERFACES_TABLE:
                at = f"{config_file}:{_table_line(lines, name)}"
                if command in DAEMON_CMDS:
                    values["interfaces"] = interface_sets(value, config_file, lines)
                    origins[INTERFACES_TABLE] = at
                continue
            s = BY_NAME.get(canon)
            if s is None:
                raise ConfigError(f"{at}: config file {config_file}: unknown setting {name!r}")
            if command not in s.commands:
                continue        # another command's setting
            try:
                values[s.key] = s.parse(value, from_file=True)
            except ValueError as exc:
                raise ConfigError(f"{at}: {canon}: {exc}") from exc
            origins[s.name] = at
    for name, value in options.items():
        s = BY_NAME[name]
        values[s.key] = value
        origins[s.name] = f"--{name}"
    cfg = Config(command, values, origins, config_file, dict(options))
    if typed:
        _make_parts(cfg)
    return cfg


INTERFACES_TABLE = "interfaces"
INTERFACE_KEYS = ("track-prefixes", "ignore-prefixes")


def _table_line(lines: dict, name: str) -> int | str:
    return lines.get(name) or min((n for k, n in lines.items() if k.startswith(name + ".")),
                                  default="?")


def interface_sets(value, path: str, lines: dict) -> tuple[tuple[str, PrefixSet], ...]:
    """The [interfaces.NAME] tables: each interface's own track-prefixes and
    ignore-prefixes (added to the top-level lists for that interface)."""
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise ConfigError(f"{path}:{_table_line(lines, INTERFACES_TABLE)}: interfaces: must be "
                          "tables, one per interface: [interfaces.eth0] with track-prefixes "
                          "and ignore-prefixes")
    out = []
    for ifname, table in value.items():
        where = f"{INTERFACES_TABLE}.{ifname}"
        lists = {}
        for key, items in table.items():
            canon = key.replace("_", "-")
            at = f"{path}:{lines.get(f'{where}.{key}', _table_line(lines, where))}"
            if canon not in INTERFACE_KEYS:
                raise ConfigError(f"{at}: {where}: unknown key {key!r} (an interface's table "
                                  f"takes {' and '.join(INTERFACE_KEYS)})")
            try:
                lists[canon] = BY_NAME[canon].parse(items, from_file=True)
            except ValueError as exc:
                raise ConfigError(f"{at}: {where}.{canon}: {exc}") from exc
        try:
            sel = PrefixSet.parse(lists.get("track-prefixes", ()), lists.get("ignore-prefixes", ()))
        except ValueError as exc:
            at = lines.get(f"{where}.ignore-prefixes") or _table_line(lines, where)
            raise ConfigError(f"{path}:{at}: {where}: {exc}") from exc
        out.append((ifname, sel))
    return tuple(out)


def _make_parts(cfg: Config) -> None:
    """The typed parts of the command's Config, validated; a ConfigError
    from a part names its setting, which is said with its origin."""
    v, cmd = cfg.values, cfg.command
    try:
        if cmd in DAEMON_CMDS:
            _require(cfg, "interface")
            if not math.isfinite(v["lost_interval"]) or v["lost_interval"] < 0:
                raise ConfigError("--lost-interval must be 0 (off) or positive, got "
                                  f"{v['lost_interval']:g}", setting="lost-interval")
            cfg.datapath = datapath_config(v)
            cfg.mqtt_config = MqttConfig.from_values(v)
            cfg.metrics_config = MetricsConfig.from_values(v)
        if cmd == "run":
            _require(cfg, "kafka", "topic")
            cfg.spool_config = SpoolConfig.from_values(v)
            cfg.kafka_settings = kafka_settings(v, compression=v["kafka_compression"],
                                       **send_timeouts(v["kafka_timeout"]))
        if "output" in v:
            check_output(cmd, v["output"])
    except ConfigError as exc:
        raise _located(cfg, exc) from exc.__cause__


def check_output(command: str, spec: str) -> None:
    """events: conntrack_text's -o words; account: text or json."""
    if command == "events":
        parse_output(spec)
    elif spec not in ("text", "json"):
        raise ConfigError(f"must be text or json, got {spec!r}", setting="output")


def _require(cfg: Config, *names: str) -> None:
    for name in names:
        if cfg.values[BY_NAME[name].key] in (None, []):
            raise ConfigError(f"the following setting is required: --{name} (or {name} = ... "
                              f"in --config)")


def _located(cfg: Config, exc: ConfigError) -> ConfigError:
    name = getattr(exc, "setting", None)
    if name is None or name not in cfg.origins:
        return exc
    where = cfg.where(name)
    text = str(exc)
    if text.startswith(where) or (where.startswith("--") and text.startswith("--")):
        return exc      # the message names its option already
    out = ConfigError(f"{where}: {text}")
    out.setting = name
    return out


# ---------------------------------------------------------------- the typed parts

def selection(v: dict) -> Selection:
    try:
        top = PrefixSet.parse(v["track_prefixes"] or (), v["ignore_prefixes"] or ())
    except ValueError as exc:
        raise ConfigError(str(exc), setting="ignore-prefixes") from exc
    return Selection(top, tuple(v.get("interfaces") or ()))


def datapath_config(v: dict) -> DatapathConfig:
    hi, lo = v["early_drop"]
    return DatapathConfig(
        pin_dir=v["pin_dir"], table_limit=v["table_size"], ring_bytes=v["ring_size"],
        report_interval=v["report_interval"], xdp_mode=v["xdp_mode"],
        drop_untracked=v["drop_untracked"], ipv6_limit=v["ipv6_limit"], grace=v["grace"],
        early_drop_high=hi, early_drop_low=lo, event_mask=tuple(n.strip() for item in v["event_mask"]
                                                           for n in item.split(",") if n.strip()),
        timeouts=Timeouts(syn=v["timeout_syn"], established=v["timeout_established"],
                          fin=v["timeout_fin"], udp=v["timeout_udp"], icmp=v["timeout_icmp"],
                          other=v["timeout_other"]),
        selection=selection(v), syn_cookies=v["syn_cookies"],
        syn_cookie_rate=v["syn_cookie_rate"], syn_cookie_high=v["syn_cookie_high"],
    ).validate()


def sasl_password(v: dict) -> str | None:
    path = v["kafka_sasl_password_file"]
    if not path:
        return os.environ.get(PASSWORD_ENV)
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read --kafka-sasl-password-file {path}: {exc.strerror}",
                          setting="kafka-sasl-password-file") from exc


def check_kafka_timeout(timeout_s: float) -> float:
    if not 0 < timeout_s <= 3600:
        raise ConfigError(f"--kafka-timeout must be in (0, 3600] seconds, got {timeout_s:g}",
                          setting="kafka-timeout")
    return timeout_s


def send_timeouts(timeout_s: float) -> dict:
    """A send's timeouts from --kafka-timeout: one request at most 10 s of
    it, the whole delivery all of it."""
    timeout_ms = int(check_kafka_timeout(timeout_s) * 1000)
    return {"request_timeout_ms": max(100, min(timeout_ms, 10_000)),
            "delivery_timeout_ms": max(100, timeout_ms)}


def kafka_settings(v: dict, **extra):
    """KafkaSettings from kafka, topic and the security settings, plus
    `extra` (compression, client id, timeouts) as the command wants,
    validated."""
    from .delivery.kafka_settings import KafkaSettings

    return KafkaSettings(
        bootstrap=v["kafka"], topic=v["topic"],
        security_protocol=v["kafka_security_protocol"], ssl_cafile=v["kafka_ssl_cafile"],
        ssl_certfile=v["kafka_ssl_certfile"], ssl_keyfile=v["kafka_ssl_keyfile"],
        sasl_mechanism=v["kafka_sasl_mechanism"], sasl_username=v["kafka_sasl_username"],
        sasl_password=sasl_password(v), **extra).validate()


@dataclass(frozen=True)
class SpoolConfig:
    directory: str | None         # None: the default of the pin dir
    max_bytes: int
    archive_max: int
    archive_age_s: float

    @classmethod
    def from_values(cls, v: dict) -> "SpoolConfig":
        return cls(v["spool"], v["spool_max"], v["archive_max"], v["archive_age"]).validate()

    def validate(self) -> "SpoolConfig":
        if self.max_bytes < 1 << 20:
            raise ConfigError(f"--spool-max must be at least 1m, got {self.max_bytes}",
                              setting="spool-max")
        if self.archive_max < 0 or (self.archive_max and self.archive_max < 1 << 20):
            raise ConfigError(f"--archive-max must be 0 (no archive) or at least 1m, got "
                              f"{self.archive_max}", setting="archive-max")
        if not 0 <= self.archive_age_s <= MAX_SECONDS:
            raise ConfigError(f"--archive-age must be 0 (no age limit) or positive, got "
                              f"{self.archive_age_s:g}", setting="archive-age")
        return self

    def dir_for(self, pin_dir: str) -> str:
        from .delivery.archive import default_spool_dir
        return self.directory or default_spool_dir(pin_dir)


@dataclass
class MqttConfig:
    """--mqtt and its options; validate() also reads the password and loads
    the CA, so that a bad file fails before anything starts."""

    broker: str | None
    username: str | None = None
    password_file: str | None = None
    cafile: str | None = None
    interval: float = 5.0
    kafka_down_s: float = 30.0
    host: str | None = None
    port: int = 0
    password: str | None = None
    tls: object = None              # ssl.SSLContext

    @classmethod
    def from_values(cls, v: dict) -> "MqttConfig":
        return cls(v["mqtt"], v["mqtt_username"], v["mqtt_password_file"], v["mqtt_cafile"],
                   v["mqtt_interval"], v["alert_kafka_down"]).validate()

    def validate(self) -> "MqttConfig":
        if not self.broker:
            return self
        import ssl

        from .observe.mqtt_status import parse_broker

        try:
            self.host, self.port = parse_broker(self.broker)
        except ConfigError as exc:
            exc.setting = "mqtt"
            raise
        self.password = os.environ.get(MQTT_PASSWORD_ENV)
        if self.password_file:
            try:
                with open(self.password_file) as f:
                    self.password = f.readline().strip()
            except OSError as exc:
                raise ConfigError(f"cannot read --mqtt-password-file {self.password_file}: "
                                  f"{exc.strerror}", setting="mqtt-password-file") from exc
        if self.password and not self.username:
            raise ConfigError("an MQTT password needs --mqtt-username", setting="mqtt-username")
        if self.cafile:
            try:
                self.tls = ssl.create_default_context(cafile=self.cafile)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"--mqtt-cafile {self.cafile}: "
                                  f"{getattr(exc, 'strerror', None) or exc}",
                                  setting="mqtt-cafile") from exc
        if not 0.5 <= self.interval <= 3600:
            raise ConfigError(f"--mqtt-interval must be in [0.5, 3600] seconds, got "
                              f"{self.interval:g}", setting="mqtt-interval")
        if not 0 <= self.kafka_down_s <= 86400:
            raise ConfigError(f"--alert-kafka-down must be in [0, 86400] seconds, got "
                              f"{self.kafka_down_s:g}", setting="alert-kafka-down")
        return self


@dataclass(frozen=True)
class MetricsConfig:
    listen: str | None
    walk_max: int
    host: str | None = None
    port: int = 0

    @classmethod
    def from_values(cls, v: dict) -> "MetricsConfig":
        if v["metrics_walk_max"] < 0:
            raise ConfigError(f"--metrics-walk-max must be 0 or more, got "
                              f"{v['metrics_walk_max']}", setting="metrics-walk-max")
        if not v["metrics"]:
            return cls(None, v["metrics_walk_max"])
        from .observe.metrics import parse_listen

        try:
            host, port = parse_listen(v["metrics"])
        except ConfigError as exc:
            exc.setting = "metrics"
            raise
        return cls(v["metrics"], v["metrics_walk_max"], host, port)


# What Session.reconfigure may change while the datapath runs, and what
# needs a new load (the maps' sizes are fixed when they are made).
NEEDS_RELOAD = {"table_limit": "table-size", "ring_bytes": "ring-size",
                "ipv6_limit": "ipv6-limit", "pin_dir": "pin-dir", "xdp_mode": "xdp-mode"}


def reload_needed(old: DatapathConfig, new: DatapathConfig) -> list[str]:
    """The settings that differ between two datapath configs and cannot
    change while the datapath is loaded, as 'name: old -> new'."""
    out = []
    for attr, name in NEEDS_RELOAD.items():
        a = old.ipv6_capacity() if attr == "ipv6_limit" else getattr(old, attr)
        b = new.ipv6_capacity() if attr == "ipv6_limit" else getattr(new, attr)
        if a != b:
            out.append(f"{name}: {a} -> {b}")
    return out

