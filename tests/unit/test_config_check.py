"""streamer/control/check.py: `ctstream config check FILE` lists every
problem of a config file, each at its line, and nothing for a good one."""

from __future__ import annotations

import pytest

from streamer import settings
from streamer.control import check as config_check
from streamer.control.check import check_file
from streamer.errors import ConfigError

GOOD = '''\
# One file for run, events and account.
interface = ["eth0", "eth1"]
kafka = "127.0.0.1:9092"
topic = "flows"
node-id = "gw1"
table-size = 100000
ipv6-limit = 30000
ring-size = "8m"
early-drop = [0.95, 0.85]
timeout-udp = "2m"
timeout_established = "5d"
event-mask = ["new", "destroy"]
track-prefixes = [
    "10.0.0.0/8",         # the sites
    "2001:db8::/32",
]
ignore-prefixes = ["10.9.0.0/16", "2001:db8:ffff::/48"]
spool-max = "2g"
kafka-timeout = 9
output = "json"
db = "sqlite:/tmp/ct.db"
group = "billing"
session-timeout = 20
report = false
horizon = "2h"
kafka-ssl-cafile = "/nonexistent/ca.pem"
kafka-sasl-password-file = "/nonexistent/password"

[interfaces.eth0]
track-prefixes = ["192.168.0.0/16", "fd00::/8"]
ignore-prefixes = [
    "192.168.99.0/24",
    "fd00:99::/32",
]

[interfaces."eth1.100"]
ignore_prefixes = ["10.1.0.0/16"]
'''


# (id, file text, command, [(line, what the reason says), ...] in the order of the lines)
BAD = [
    ("syntax", 'kafka = "h:1"\ntopic = \nnode-id = 5\n', "run",
     [(2, "not valid TOML: invalid value (column 9)")]),
    ("syntax-at-end", 'interface = ["eth0",\n', "run",
     [(1, "not valid TOML")]),
    ("not-utf8", b'kafka = "h:1"\ntopic = "\xff"\n', "run",
     [(2, "not valid TOML: not UTF-8 (byte 0xff at column 10)")]),
    ("unknown-with-suggestion", 'kafka = "h:1"\n\ntimout-udp = 5\n', "run",
     [(3, "unknown setting 'timout-udp' (did you mean 'timeout-udp'?)")]),
    ("unknown-without-suggestion", 'zzz = 1\n', "run",
     [(1, "unknown setting 'zzz' (no command takes it)")]),
    ("unknown-table", '[kafka_options]\nacks = "all"\n', "run",
     [(1, "unknown setting 'kafka_options'")]),
    ("wrong-type", '# udp\ntimeout-udp = "abc"\n', "run",
     [(2, "timeout-udp: expected a number of seconds, got 'abc'")]),
    ("not-a-boolean", 'egress = "yes"\n', "run",
     [(1, "egress: expected true or false, got 'yes'")]),
    ("out-of-range", 'table-size = 3\n', "run",
     [(1, "table-size: table limit must be an integer in [16, 134217728], got 3")]),
    ("not-a-power-of-two", 'ring-size = "5000"\n', "run",
     [(1, "ring-size: ring size must be a power of two (bytes), got 5000")]),
    ("spool-part", 'spool-max = "10k"\n', "run",
     [(1, "spool-max: --spool-max must be at least 1m, got 10240")]),
    ("kafka-timeout", 'kafka-timeout = 0\n', "account",
     [(1, "kafka-timeout: --kafka-timeout must be in (0, 3600] seconds, got 0")]),
    ("bad-cidr", 'track-prefixes = ["10.0.0.0/33"]\n', "run",
     [(1, "track-prefixes: '10.0.0.0/33' is not a CIDR")]),
    ("not-a-cidr", 'ignore-prefixes = "10.0.0.1"\n', "run",
     [(1, "ignore-prefixes: '10.0.0.1' is not a CIDR (address/length")]),
    ("host-bits", 'ignore-prefixes = ["192.168.1.1/24"]\n', "run",
     [(1, "ignore-prefixes: '192.168.1.1/24' has host bits set (the network is 192.168.1.0/24)")]),
    ("v6-host-bits", 'track-prefixes = ["2001:db8::1/32"]\n', "run",
     [(1, "has host bits set (the network is 2001:db8::/32)")]),
    ("multi-line-array", 'track-prefixes = [\n  "10.0.0.0/8",\n  "10.0.0.0/40",  # typo\n'
     '  "fd00::/8", "fd00::1/8",\n]\n', "run",
     [(3, "track-prefixes: '10.0.0.0/40' is not a CIDR"),
      (4, "track-prefixes: 'fd00::1/8' has host bits set")]),
    ("not-a-string-element", 'track-prefixes = [\n  "10.0.0.0/8",\n  10,\n]\n', "run",
     [(3, "track-prefixes: a prefix is a string like")]),
    ("nested-list-element", 'interface = ["eth0", ["x"]]\n', "run",
     [(1, "interface: must be a string, number, boolean or a list of them")]),
    ("in-both-lists", 'track-prefixes = ["10.0.0.0/8", "10.1.0.0/16"]\n'
     'ignore-prefixes = ["10.1.0.0/16"]\n', "run",
     [(2, "ignore-prefixes: 10.1.0.0/16 is in both track-prefixes and ignore-prefixes")]),
    ("in-both-lists-multi-line", 'track-prefixes = ["10.0.0.0/8", "fd00::/8"]\n'
     'ignore-prefixes = [\n  "10.2.0.0/16",\n  "10.0.0.0/8",\n  "fd00::/8",\n]\n', "run",
     [(4, "ignore-prefixes: 10.0.0.0/8 is in both"),
      (5, "ignore-prefixes: fd00::/8 is in both")]),
    ("interface-unknown-key", '[interfaces.eth0]\ntrack-prefixes = ["10.0.0.0/8"]\n'
     'track-prefix = ["10.1.0.0/16"]\n', "run",
     [(3, "interfaces.eth0: unknown key 'track-prefix' (an interface's table takes "
          "track-prefixes and ignore-prefixes)")]),
    ("top-level-setting-below-a-table", 'interface = ["eth0"]\n[interfaces.eth0]\n'
     'ignore-prefixes = ["10.0.0.0/8"]\nkafka = "h:1"\n', "run",
     [(4, "kafka is a top-level setting: put it above the first [table]")]),
    ("interface-bad-cidr", '[interfaces.eth0]\ntrack-prefixes = [\n  "10.0.0.0/8",\n'
     '  "10.300.0.0/16",\n]\n[interfaces.eth1]\nignore-prefixes = "fd00::/300"\n', "run",
     [(4, "interfaces.eth0.track-prefixes: '10.300.0.0/16' is not a CIDR"),
      (7, "interfaces.eth1.ignore-prefixes: 'fd00::/300' is not a CIDR")]),
    ("interface-in-both-lists", '[interfaces.eth0]\ntrack-prefixes = ["10.0.0.0/8"]\n'
     'ignore-prefixes = ["10.0.0.0/8"]\n', "run",
     [(3, "interfaces.eth0: 10.0.0.0/8 is in both track-prefixes and ignore-prefixes")]),
    ("interfaces-not-tables", 'kafka = "h:1"\ninterfaces = 5\n', "run",
     [(2, "interfaces: must be tables, one per interface: [interfaces.eth0]")]),
    ("interface-not-a-table", '[interfaces]\neth0 = ["10.0.0.0/8"]\n', "run",
     [(2, "interfaces.eth0: must be a table, [interfaces.eth0], with track-prefixes")]),
    ("early-drop-low-above-high", 'early-drop = [0.5, 0.8]\n', "run",
     [(1, "early-drop: early drop low watermark (0.8) must be below the high one (0.5)")]),
    ("cross-field", 'ipv6-limit = 2000\ntable-size = 1000\n', "run",
     [(1, "ipv6-limit: IPv6 limit must be an integer in [16, 1000], got 2000")]),
    ("event-mask", 'event-mask = ["new", "assured"]\n', "events",
     [(1, "event-mask: event mask: destroy cannot be left out")]),
    ("given-twice", 'timeout-udp = 5\ntimeout_udp = 6\n', "run",
     [(2, "timeout-udp: given twice, as 'timeout-udp' and as 'timeout_udp'")]),
    ("account-only-settings", 'kafka = "h:1"\nsession-timeout = "soon"\nreport = 1\n'
     'output = "xml"\n', "run",
     [(2, "session-timeout: expected a number of seconds, got 'soon'"),
      (3, "report: expected true or false, got 1"),
      (4, "output: -o takes one of conntrack, text, json")]),
    ("account-output", 'output = "extended,id"\n', "account",
     [(1, "output: must be text or json, got 'extended,id'")]),
    ("several", '''\
timout-udp = 5
timeout-fin = "abc"
table-size = 3
ring-size = "5000"
kafka = ["h:1", "h:2"]
track-prefixes = [
  "10.0.0.0/8",
  "10.0.0.1/8",
  "nope",
]
ignore-prefixes = ["10.0.0.0/8"]
spool-max = "1k"
horizon = "later"

[interfaces.eth0]
track-prefixes = ["192.168.0.0/16"]
ignore-prefixes = [
  "192.168.0.0/16",
]
foo = 1
''', "run",
     [(1, "unknown setting 'timout-udp' (did you mean 'timeout-udp'?)"),
      (2, "timeout-fin: expected a number of seconds"),
      (3, "table-size: table limit must be an integer"),
      (4, "ring-size: ring size must be a power of two"),
      (5, "kafka: must be a string, number, boolean"),
      (8, "track-prefixes: '10.0.0.1/8' has host bits set"),
      (9, "track-prefixes: 'nope' is not a CIDR"),
      (11, "ignore-prefixes: 10.0.0.0/8 is in both"),
      (12, "spool-max: --spool-max must be at least 1m"),
      (13, "horizon: expected a number of seconds"),
      (18, "interfaces.eth0: 192.168.0.0/16 is in both"),
      (20, "interfaces.eth0: unknown key 'foo'")]),
]


def write(tmp_path, text) -> str:
    f = tmp_path / "ct.toml"
    if isinstance(text, bytes):
        f.write_bytes(text)
    else:
        f.write_text(text)
    return str(f)


@pytest.mark.parametrize("text,command,expected", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_every_problem_at_its_line(tmp_path, text, command, expected):
    path = write(tmp_path, text)
    problems = check_file(path, command)
    assert [int(p.split(":")[1]) for p in problems] == [line for line, _ in expected], problems
    for problem, (line, says) in zip(problems, expected):
        assert problem.startswith(f"{path}:{line}: "), problem
        assert says in problem, problem


# One problem that settings.build finds too: check and build say the same.
SAME_AS_BUILD = ["wrong-type", "not-a-boolean", "out-of-range", "not-a-power-of-two",
                 "spool-part", "bad-cidr", "host-bits", "nested-list-element", "in-both-lists",
                 "interface-unknown-key", "interface-in-both-lists", "interfaces-not-tables",
                 "early-drop-low-above-high", "cross-field"]


@pytest.mark.parametrize("name", SAME_AS_BUILD)
def test_check_says_what_build_says(tmp_path, name):
    _, text, command, _ = next(b for b in BAD if b[0] == name)
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        settings.build(command, {"interface": ["lo"], "kafka": "h:1", "topic": "t"}, path)
    assert check_file(path, command) == [str(info.value)]


@pytest.mark.parametrize("command", settings.COMMANDS)
def test_a_good_file_has_no_problem(tmp_path, command):
    path = write(tmp_path, GOOD)
    assert check_file(path, command) == []


def test_the_good_file_is_what_build_reads(tmp_path):
    path = write(tmp_path, GOOD)
    cfg = settings.build("run", {}, path, typed=False)
    sel = settings.datapath_config(cfg.values).selection
    assert [name for name, _ in sel.interfaces] == ["eth0", "eth1.100"]
    assert [str(n) for n in sel.top.track] == ["10.0.0.0/8", "2001:db8::/32"]


@pytest.mark.parametrize("text", ["", "# nothing but a comment\n"])
def test_an_empty_file_has_no_problem(tmp_path, text):
    # Required settings are not problems: the command line may give them.
    path = write(tmp_path, text)
    assert all(check_file(path, c) == [] for c in settings.COMMANDS)


def test_an_unreadable_file_is_one_problem_without_a_line(tmp_path):
    missing = str(tmp_path / "nope.toml")
    assert check_file(missing) == [f"{missing}: cannot read the config file: "
                                   f"No such file or directory"]
    assert check_file(str(tmp_path)) == [f"{tmp_path}: cannot read the config file: "
                                         f"Is a directory"]


def test_the_path_is_given_back_as_given(tmp_path, monkeypatch):
    (tmp_path / "ct.toml").write_text("zzz = 1\n")
    monkeypatch.chdir(tmp_path)
    assert check_file("ct.toml") == ["ct.toml:1: unknown setting 'zzz' (no command takes it)"]


def test_only_the_values_of_the_command_are_checked_together(tmp_path):
    # ipv6-limit above table-size is wrong for run, and not a problem of
    # account, which has no datapath: each value alone is fine.
    path = write(tmp_path, "table-size = 1000\nipv6-limit = 2000\n")
    assert [p.split(": ", 1)[0] for p in check_file(path, "run")] == [f"{path}:2"]
    assert check_file(path, "account") == []


def test_a_default_at_fault_is_said_at_line_one(tmp_path, monkeypatch):
    def fault(cmd, v):
        if v["table_size"] == 1000:
            raise ConfigError("grace does not go with a table of 1000", setting="grace")
    part = config_check._Part(("run",), frozenset({"table-size"}), fault)
    monkeypatch.setattr(config_check, "_PARTS", (part,))
    path = write(tmp_path, "# the table\ntable-size = 1000\n")
    # Alone against the defaults the value is blamed at its own line ...
    assert check_file(path) == [f"{path}:2: grace: grace does not go with a table of 1000"]
    # ... and together (where no value alone is wrong), a default at line 1.
    calls = []

    def together_only(cmd, v):
        calls.append(v["table_size"])
        if len(calls) > 1:
            fault(cmd, v)
    monkeypatch.setattr(config_check, "_PARTS", (config_check._Part(("run",),
                        frozenset({"table-size"}), together_only),))
    assert check_file(path) == [f"{path}:1: grace: grace does not go with a table of 1000 "
                                f"(grace is not in the file: its default does not go with "
                                f"the file's values)"]


def test_no_file_a_value_names_is_read(tmp_path, monkeypatch):
    opened = []
    real_open = open

    def spy(file, *a, **kw):
        opened.append(str(file))
        return real_open(file, *a, **kw)
    monkeypatch.setattr("builtins.open", spy)
    text = ('kafka-ssl-cafile = "/x/ca.pem"\nkafka-sasl-password-file = "/x/pw"\n'
            'mqtt = "h"\nmqtt-password-file = "/x/mpw"\nmqtt-cafile = "/x/mca"\n'
            'db-password-file = "/x/dpw"\n')
    path = write(tmp_path, text)
    assert check_file(path) == []
    assert set(opened) == {path}


def test_an_unknown_command_is_a_caller_error(tmp_path):
    with pytest.raises(ValueError, match="unknown command 'rum'"):
        check_file(write(tmp_path, ""), "rum")


def test_array_lines_skips_strings_comments_and_nesting():
    text = ['k = [', '  "a,]#",  # a comment, ]', "  '''x", "y''', [1,", '   2], {a = "]"},',
            '  """q\\"""" ,"z"]']
    assert config_check._array_lines(text, 1, "k") == [2, 3, 4, 5, 6, 6]
    assert config_check._array_lines(["k = 1"], 1, "k") is None
