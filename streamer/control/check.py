"""`ctstream config check FILE`: every problem of a TOML config file.

settings.build() stops at the first bad value, which is right for starting
a daemon and tiresome for editing a file. check_file() reads the file the
same way (settings.read_file, the same kinds' parsers, the same typed parts'
checks) and goes on after each problem, so that one run lists them all,
each as `FILE:LINE: reason` with FILE as given.

What is checked, in this order:

* the file can be read, is UTF-8 and is TOML (if not: that one problem);
* every top-level key is a setting of some command, or the `interfaces`
  table; an unknown one is named with the closest known name, if any;
* every value parses as its setting's kind, for the settings of every
  command, not only `command`'s (one file may serve run and account); a
  list is checked element by element, and an element of an array written
  over several lines is reported at its own line;
* track-prefixes and ignore-prefixes, at the top and in each
  `[interfaces.NAME]` table: each bad CIDR, and each ignored prefix that
  the same table's track-prefixes also hold;
* the range checks of the typed parts (DatapathConfig, SpoolConfig,
  MetricsConfig, --kafka-timeout, --output), for one value of the file at
  a time with the defaults for the rest, so that every value out of range
  is found, not only the first (the defaults of `command` if it takes the
  setting, else of the first command that does: output is checked as
  events takes it when `command` is run);
* then, for `command` only and only if those parts' own values passed,
  the values together (the defaults of `command` and the file's values, as
  settings.build makes them), for what is wrong only in combination: an
  ipv6-limit above table-size, say. A part raises at its first problem, so
  this finds at most one per part.

Not problems: a missing setting (interface, kafka and topic may be given on
the command line), nor a value that a file names (TLS certificates and
password files are not read: what they hold is for the daemon to find).
The MQTT settings and --lost-interval have no check outside of building a
whole Config, so only their kinds are checked here.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from dataclasses import dataclass
from typing import Callable

from .. import settings
from ..datapath.selection import parse_prefix
from ..errors import ConfigError
from ..settings import BY_NAME, COMMANDS, DAEMON_CMDS, INTERFACE_KEYS, INTERFACES_TABLE, \
    KAFKA_CMDS, LIST_KINDS


@dataclass(frozen=True)
class _Part:
    """A check of settings.py over the values of one command: `names`, the
    settings it reads that a file may set."""

    commands: tuple[str, ...]
    names: frozenset
    check: Callable[[str, dict], object]


def _group(*groups: str) -> frozenset:
    return frozenset(s.name for s in settings.SETTINGS if s.group in groups)


# What settings._make_parts (and the commands after it) check, less what
# reads files (Kafka's TLS and SASL, MQTT's password and CA).
_PARTS = (
    _Part(DAEMON_CMDS, _group("datapath") | {INTERFACES_TABLE},
          lambda cmd, v: settings.datapath_config(v)),
    _Part(DAEMON_CMDS, _group("metrics"), lambda cmd, v: settings.MetricsConfig.from_values(v)),
    _Part(("run",), _group("spool"), lambda cmd, v: settings.SpoolConfig.from_values(v)),
    _Part(KAFKA_CMDS, frozenset({"kafka-timeout"}),
          lambda cmd, v: settings.check_kafka_timeout(v["kafka_timeout"])),
    _Part(("events", "account"), frozenset({"output"}),
          lambda cmd, v: settings.check_output(cmd, v["output"])),
)


def check_file(path: str, command: str = "run") -> list[str]:
    """Every problem of the config file at `path`, as "FILE:LINE: reason"
    in the order of the lines; [] when there is none. `command` is the one
    whose defaults the file's values are checked together with.

    A file that cannot be read has no line to point at: its one problem is
    "FILE: cannot read the config file: REASON". A file that is not UTF-8
    or not TOML has one problem, at the line where reading stopped. A
    problem of the values together that a setting the file does not set is
    blamed for is put at line 1, and says that the default is at fault."""
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}; the commands are {', '.join(COMMANDS)}")
    try:
        data, lines = settings.read_file(path)
    except ConfigError as exc:
        return [_unreadable(path, exc)]
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().splitlines()
    except (OSError, UnicodeDecodeError):
        text = []                       # gone since: the keys' lines still serve
    return _Check(path, command, data, lines, text).run()


def _unreadable(path: str, exc: ConfigError) -> str:
    cause = exc.__cause__
    if isinstance(cause, OSError):
        return f"{path}: cannot read the config file: {cause.strerror or cause}"
    if isinstance(cause, UnicodeDecodeError):
        line = cause.object[:cause.start].count(b"\n") + 1
        column = cause.start - (cause.object.rfind(b"\n", 0, cause.start) + 1) + 1
        return (f"{path}:{line}: not valid TOML: not UTF-8 (byte 0x{cause.object[cause.start]:02x} "
                f"at column {column})")
    if isinstance(cause, tomllib.TOMLDecodeError):
        return _syntax(path, cause)
    return str(exc)


def _syntax(path: str, exc: tomllib.TOMLDecodeError) -> str:
    msg = getattr(exc, "msg", None) or str(exc)
    line, column = getattr(exc, "lineno", None), getattr(exc, "colno", None)
    m = re.search(r"\s*\(at line (\d+), column (\d+)\)$", msg)
    if m:
        line, column, msg = int(m.group(1)), int(m.group(2)), msg[:m.start()]
    elif msg.endswith("(at end of document)"):
        msg = msg.removesuffix("(at end of document)").rstrip() + " at the end of the file"
        try:
            with open(path, encoding="utf-8") as f:
                line = max(1, len(f.read().splitlines()))
        except (OSError, UnicodeDecodeError):
            line = None
    msg = msg[:1].lower() + msg[1:]
    where = f"{path}:{line}" if line else path
    return f"{where}: not valid TOML: {msg}" + (f" (column {column})" if column else "")


class _Check:
    def __init__(self, path: str, command: str, data: dict, lines: dict, text: list[str]):
        self.path, self.command, self.data, self.lines, self.text = path, command, data, lines, text
        self.problems: list[tuple[int, str]] = []
        self.bad: set[str] = set()              # the settings with a problem
        self.parsed: dict[str, object] = {}     # setting name -> the file's value
        self.at: dict[str, int] = {}            # setting name -> its line

    def run(self) -> list[str]:
        seen: dict[str, str] = {}
        for name, value in self.data.items():
            canon = name.replace("_", "-")
            line = self._top_line(name)
            if canon in seen:
                self._add(line, f"{canon}: given twice, as {seen[canon]!r} and as {name!r} "
                                "(- and _ are the same in a name): give it once", canon)
            seen[canon] = name
            if canon == INTERFACES_TABLE:
                self.at[canon] = line
                self._interfaces(value, line)
            elif canon in BY_NAME:
                self.at[canon] = line
                self._setting(BY_NAME[canon], name, value, line)
            else:
                self._add(line, f"unknown setting {name!r}{_suggest(canon)}")
        self._prefix_sets("", self.data_of("track-prefixes"), self.data_of("ignore-prefixes"),
                          {"track-prefixes": self.at.get("track-prefixes"),
                           "ignore-prefixes": self.at.get("ignore-prefixes")}, top=True)
        self._one_at_a_time()
        self._together()
        self.problems.sort(key=lambda p: p[0])
        return list(dict.fromkeys(f"{self.path}:{line}: {msg}" for line, msg in self.problems))

    # ---------------------------------------------------------------- lines

    def _add(self, line: int, msg: str, setting: str | None = None) -> None:
        self.problems.append((line, msg))
        if setting:
            self.bad.add(setting)

    def _top_line(self, name: str) -> int:
        return self.lines.get(name) or self._table_line(name) or self._search(name) or 1

    def _table_line(self, name: str) -> int | None:
        return self.lines.get(name) or min(
            (n for k, n in self.lines.items() if k.startswith(name + ".")), default=None)

    def _search(self, name: str) -> int | None:
        """The first line that starts with `name` as a key, a dotted key or a
        table (for what read_file does not record: a.b = 1, [[a]])."""
        key = re.compile(rf"""\s*\[*\s*(["']?){re.escape(name)}\1\s*[.=\]]""")
        return next((n for n, t in enumerate(self.text, 1) if key.match(t)), None)

    def _element_lines(self, line: int, key: str, count: int) -> list[int]:
        """The line of each element of the array `key = [...]` that starts
        at `line` (all `line` when it cannot be told)."""
        found = _array_lines(self.text, line, key)
        return found if found is not None and len(found) == count else [line] * count

    def data_of(self, name: str):
        """The file's value of a top-level setting, by its canonical name (the
        last one given, as settings.build takes it)."""
        found = [v for k, v in self.data.items() if k.replace("_", "-") == name]
        return found[-1] if found else None

    # ---------------------------------------------------------------- one value

    def _setting(self, s: settings.Setting, name: str, value, line: int) -> None:
        if s.kind in LIST_KINDS and isinstance(value, list):
            ok = True
            for item, at in zip(value, self._element_lines(line, name, len(value))):
                try:
                    s.parse([item], from_file=True)
                except ValueError as exc:
                    self._add(at, f"{s.name}: {exc}", s.name)
                    ok = False
            if not ok:
                return
        try:
            self.parsed[s.name] = s.parse(value, from_file=True)
        except ValueError as exc:
            self._add(line, f"{s.name}: {exc}", s.name)

    def _interfaces(self, value, line: int) -> None:
        if not isinstance(value, dict):
            self._add(line, "interfaces: must be tables, one per interface: [interfaces.eth0] "
                            "with track-prefixes and ignore-prefixes", INTERFACES_TABLE)
            return
        for ifname, table in value.items():
            where = f"{INTERFACES_TABLE}.{ifname}"
            tline = self._table_line(where) or line
            if not isinstance(table, dict):
                self._add(tline, f"{where}: must be a table, [{where}], with track-prefixes "
                                 f"and ignore-prefixes, got {table!r}", INTERFACES_TABLE)
                continue
            lists, at, seen = {}, {}, {}
            for key, items in table.items():
                canon = key.replace("_", "-")
                kline = self.lines.get(f"{where}.{key}") or tline
                if canon not in INTERFACE_KEYS:
                    hint = (f"; {canon} is a top-level setting: put it above the first [table]"
                            if canon in BY_NAME else "")
                    self._add(kline, f"{where}: unknown key {key!r} (an interface's table takes "
                                     f"{' and '.join(INTERFACE_KEYS)}{hint})", INTERFACES_TABLE)
                    continue
                if canon in seen:
                    self._add(kline, f"{where}: {canon} given twice, as {seen[canon]!r} and as "
                                     f"{key!r} (- and _ are the same in a name): give it once",
                              INTERFACES_TABLE)
                seen[canon] = key
                lists[canon], at[canon] = items, kline
                if isinstance(items, list):
                    elements = zip(items, self._element_lines(kline, key, len(items)))
                else:
                    elements = [(items, kline)]
                for item, eline in elements:
                    try:
                        BY_NAME[canon].parse([item], from_file=True)
                    except ValueError as exc:
                        self._add(eline, f"{where}.{canon}: {exc}", INTERFACES_TABLE)
            self._prefix_sets(where, lists.get("track-prefixes"), lists.get("ignore-prefixes"),
                              at, top=False)

    def _prefix_sets(self, where: str, track, ignore, at: dict, top: bool) -> None:
        """Each prefix of `ignore` that `track` holds too (the elements that
        are no CIDR are reported already)."""
        if track is None or ignore is None:
            return
        track = track if isinstance(track, list) else [track]
        ignore_list = ignore if isinstance(ignore, list) else [ignore]
        tracked = {parse_prefix(t) for t in track if _is_prefix(t)}   # once: files hold thousands
        line = at.get("ignore-prefixes") or 1
        key = self._raw_key(where, "ignore-prefixes")
        for item, eline in zip(ignore_list, self._element_lines(line, key, len(ignore_list))
                               if isinstance(ignore, list) else [line]):
            if not _is_prefix(item):
                continue
            net = parse_prefix(item)
            if net in tracked:
                why = f"{net} is in both track-prefixes and ignore-prefixes"
                if top:
                    self._add(eline, f"ignore-prefixes: {why}", "ignore-prefixes")
                else:
                    self._add(eline, f"{where}: {why}", INTERFACES_TABLE)

    def _raw_key(self, where: str, canon: str) -> str:
        """The key as the file spells it (ignore_prefixes or ignore-prefixes)."""
        table = self.data if not where else self.data.get(INTERFACES_TABLE, {}).get(
            where.split(".", 1)[1], {})
        return next((k for k in table if k.replace("_", "-") == canon), canon)

    # ---------------------------------------------------------------- the typed parts

    def _one_at_a_time(self) -> None:
        """Each value of the file with the defaults for the rest, through the
        checks of every part that reads it."""
        for name, value in self.parsed.items():
            if name in self.bad:
                continue
            s = BY_NAME[name]
            for part in _PARTS:
                cmds = [c for c in part.commands if c in s.commands]
                if name not in part.names or not cmds:
                    continue
                cmd = self.command if self.command in cmds else cmds[0]
                values = _defaults(cmd)
                values[s.key] = value
                try:
                    part.check(cmd, values)
                except ConfigError as exc:
                    self._add(self.at[name], f"{exc.setting or name}: {exc}", name)
                    break

    def _together(self) -> None:
        """The values of `command`, defaults and file, through its parts:
        for what no value is wrong alone."""
        values = _defaults(self.command)
        for name, value in self.parsed.items():
            if self.command in BY_NAME[name].commands:
                values[BY_NAME[name].key] = value
        if self.command in DAEMON_CMDS and INTERFACES_TABLE in self.at \
                and INTERFACES_TABLE not in self.bad:
            try:
                values["interfaces"] = settings.interface_sets(
                    self.data_of(INTERFACES_TABLE), self.path, self.lines)
            except ConfigError as exc:        # not expected: its checks are above
                self._add(self.at[INTERFACES_TABLE],
                          re.sub(rf"^{re.escape(self.path)}:\S*: ", "", str(exc)),
                          INTERFACES_TABLE)
        for part in _PARTS:
            if self.command not in part.commands or part.names & self.bad:
                continue
            try:
                part.check(self.command, values)
            except ConfigError as exc:
                name = exc.setting
                if name in self.at:
                    self._add(self.at[name], f"{name}: {exc}", name)
                elif name:
                    self._add(1, f"{name}: {exc} ({name} is not in the file: its default "
                                 f"does not go with the file's values)", name)
                else:
                    self._add(1, f"{exc} (with the file's values and the defaults of "
                                 f"{self.command})")


def _defaults(command: str) -> dict:
    return {s.key: s.default_for(command) for s in settings.settings_of(command)}


def _suggest(name: str) -> str:
    close = difflib.get_close_matches(name, [*BY_NAME, INTERFACES_TABLE], n=1)
    return f" (did you mean {close[0]!r}?)" if close else " (no command takes it)"


def _is_prefix(item) -> bool:
    try:
        settings.prefix(item)
    except ValueError:
        return False
    return True


def _array_lines(text: list[str], line: int, key: str) -> list[int] | None:
    """The line of each element of the array that is the value of `key` on
    line `line` of `text` (1-based); None if that line holds no `key = [`.
    The file is valid TOML already: strings, comments and nesting are all
    that matter."""
    if not 1 <= line <= len(text):
        return None
    src = "\n".join(text[line - 1:])
    m = re.match(rf"""\s*(?:[^=\n]*\.\s*)?(["']?){re.escape(key)}\1\s*=\s*\[""", src)
    if not m:
        return None
    out: list[int] = []
    i, n, depth, expect = m.end(), line, 1, True
    while i < len(src):
        c = src[i]
        if c == "\n":
            n += 1
        elif c == "#":
            j = src.find("\n", i)
            if j < 0:
                return None
            i = j
            continue
        elif c in " \t\r":
            pass
        else:
            if expect and depth == 1 and c not in ",]":
                out.append(n)
                expect = False
            if c in "\"'":
                end = _string_end(src, i)
                if end is None:
                    return None
                n += src.count("\n", i, end)
                i = end
                continue
            if c in "[{":
                depth += 1
            elif c in "]}":
                depth -= 1
                if depth == 0:
                    return out
            elif c == "," and depth == 1:
                expect = True
        i += 1
    return None


def _string_end(src: str, i: int) -> int | None:
    """The index just past the string that starts at src[i]."""
    q = src[i]
    if src.startswith(q * 3, i):
        j = i + 3
        while True:
            k = src.find(q * 3, j)
            if k < 0:
                return None
            if q == '"' and _escaped(src, k):
                j = k + 1
                continue
            k += 3
            for _ in range(2):              # """a"""" ends with a quote in the string
                if src.startswith(q, k):
                    k += 1
            return k
    j = i + 1
    while j < len(src) and src[j] != "\n":
        if src[j] == "\\" and q == '"':
            j += 2
            continue
        if src[j] == q:
            return j + 1
        j += 1
    return None


def _escaped(src: str, k: int) -> bool:
    backslashes = 0
    while k - backslashes - 1 >= 0 and src[k - backslashes - 1] == "\\":
        backslashes += 1
    return backslashes % 2 == 1
