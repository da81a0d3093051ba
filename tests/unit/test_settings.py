"""streamer/settings.py: one typed configuration from defaults, a TOML file
and the options given, in that order of precedence, with errors that say
where the bad value came from (FILE:LINE or --option)."""

from __future__ import annotations

import pytest

from streamer import settings
from streamer.cli import build_parser, load_config, main
from streamer.datapath.config import DatapathConfig
from streamer.errors import ConfigError

RUN = ["run", "--kafka", "127.0.0.1:9092", "--topic", "t"]

# One setting of each kind: (name, key, default, file text, file value, option words, option value)
KINDS = [
    ("str", "node-id", "node_id", None, 'node-id = "from-file"', "from-file",
     ["--node-id", "from-cli"], "from-cli"),
    ("int", "table-size", "table_size", 262144, "table-size = 1000", 1000,
     ["--table-size", "2000"], 2000),
    ("seconds", "timeout-udp", "timeout_udp", 30.0, 'timeout-udp = "2m"', 120.0,
     ["--timeout-udp", "7.5"], 7.5),
    ("size", "spool-max", "spool_max", 1 << 30, 'spool-max = "64m"', 64 << 20,
     ["--spool-max", "2g"], 2 << 30),
    ("bool", "egress", "egress", False, "egress = true", True, ["--no-egress"], False),
    ("list", "interface", "ifaces", None, 'interface = ["eth0", "eth1"]', ["eth0", "eth1"],
     ["-i", "eth2"], ["eth2"]),
    ("choice", "xdp-mode", "xdp_mode", "auto", 'xdp-mode = "generic"', "generic",
     ["--xdp-mode", "native"], "native"),
    ("fractions", "early-drop", "early_drop", (0.9, 0.8), "early-drop = [0.95, 0.5]",
     (0.95, 0.5), ["--early-drop", "70%,60%"], (0.7, 0.6)),
    ("fraction", "syn-cookie-high", "syn_cookie_high", 0.9, "syn-cookie-high = 0.5", 0.5,
     ["--syn-cookie-high", "75%"], 0.75),
]


def config(tmp_path, text: str | None, *argv: str, command=RUN, typed=True):
    args = list(command) + list(argv)
    if text is not None:
        f = tmp_path / "ct.toml"
        f.write_text(text)
        args += ["--config", str(f)]
    return load_config(args, typed=typed)


@pytest.mark.parametrize("kind,name,key,default,text,in_file,words,on_cli", KINDS,
                         ids=[k[0] for k in KINDS])
def test_option_beats_file_beats_default(tmp_path, kind, name, key, default, text, in_file,
                                         words, on_cli):
    base = [] if name == "interface" else ["-i", "lo"]
    plain = config(tmp_path, None, *base, typed=False)
    assert plain.values[key] == default and plain.origins[name] == "default"
    filed = config(tmp_path, text + "\n", *base, typed=False)
    assert filed.values[key] == in_file
    assert filed.origins[name] == f"{tmp_path / 'ct.toml'}:1"
    both = config(tmp_path, text + "\n", *base, *words, typed=False)
    assert both.values[key] == on_cli and both.origins[name] == f"--{name}"


def test_the_typed_parts_carry_the_merged_values(tmp_path):
    text = ('interface = ["eth0"]\ntimeout-udp = 7\nspool-max = "64m"\nkafka-timeout = 3\n'
            'early-drop = "0.95,0.5"\nmetrics = "127.0.0.1:9108"\n')
    cfg = config(tmp_path, text, "--timeout-fin", "4", "--archive-max", "0")
    dp = cfg.datapath
    assert isinstance(dp, DatapathConfig)
    assert (dp.timeouts.udp, dp.timeouts.fin, dp.early_drop_high, dp.early_drop_low) == \
        (7, 4, 0.95, 0.5)
    assert (cfg.spool_config.max_bytes, cfg.spool_config.archive_max) == (64 << 20, 0)
    assert cfg.kafka_settings.bootstrap == "127.0.0.1:9092"
    assert cfg.kafka_settings.delivery_timeout_ms == 3000
    assert (cfg.metrics_config.host, cfg.metrics_config.port) == ("127.0.0.1", 9108)
    assert cfg.keep_on_stop and not config(tmp_path, text, "--detach-on-stop").keep_on_stop


BAD_FILES = [
    ('kafka = "h:1"\n\nkafak = "x:1"\n', 3, "unknown setting 'kafak'"),
    ("egress = 1\n", 1, "egress: expected true or false"),
    ('ring-size = "5000"\n', 1, "ring size must be a power of two"),
    ('timeout-udp = "soon"\n', 1, "timeout-udp: expected a number of seconds"),
    ("table-size = 1.5\n", 1, "table-size: expected an integer"),
    ('xdp-mode = "turbo"\n', 1, "xdp-mode: must be one of auto, native, generic"),
    ('# a comment\nspool-max = "100k"\n', 2, "--spool-max must be at least 1m"),
    ('interface = ["eth0", ["x"]]\n', 1, "must be a string, number, boolean"),
    ('early-drop = "0.5,0.9"\n', 1, "low watermark"),
    ("kafka = \n", 1, "not valid TOML"),
    ('event-mask = ["new", "assured"]\n', 1, "event-mask: event mask: destroy cannot be left out"),
    ('event-mask = ["new", "destroy", "reports"]\n', 1, "unknown event 'reports'"),
    ('syn-cookies = "always"\n', 1, "syn-cookies: must be one of off, on, auto"),
    ('syn-cookie-high = 1.5\n', 1, "syn-cookie-high must be a fraction in [0, 1]"),
    ('syn-cookie-high = "lots"\n', 1, "expected a fraction like 0.9 or 90%"),
    ('syn-cookie-rate = -1\n', 1, "SYN cookie rate must be an integer"),
]


@pytest.mark.parametrize("text,line,says", BAD_FILES, ids=[b[2][:24] for b in BAD_FILES])
def test_a_bad_file_says_file_and_line(tmp_path, text, line, says):
    with pytest.raises(ConfigError) as info:
        config(tmp_path, text, *([] if "interface" in text else ["-i", "lo"]))
    msg = str(info.value)
    assert msg.startswith(f"{tmp_path / 'ct.toml'}:{line}: "), msg
    assert says in msg, msg


def test_a_bad_option_says_the_option(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"^--ring-size: ring size must be a power of two"):
        config(tmp_path, None, "-i", "lo", "--ring-size", "5000")
    with pytest.raises(ConfigError, match=r"^--early-drop: early drop low watermark"):
        config(tmp_path, None, "-i", "lo", "--early-drop", "0.5,0.9")
    # The option wins over a bad file value: nothing of the file's is used.
    cfg = config(tmp_path, 'ring-size = "5000"\n', "-i", "lo", "--ring-size", "8m")
    assert cfg.datapath.ring_bytes == 8 << 20
    with pytest.raises(ConfigError, match="the following setting is required: --interface"):
        config(tmp_path, None)


def test_one_file_serves_every_command_that_takes_its_settings(tmp_path):
    text = ('kafka = "127.0.0.1:9092"\ntopic = "flows"\ninterface = ["eth0"]\n'
            'db = "sqlite:/tmp/x.db"\nkafka-timeout = 9\n')
    run = config(tmp_path, text, command=["run"])
    assert (run.kafka, run.topic, run.ifaces, run.kafka_timeout) == \
        ("127.0.0.1:9092", "flows", ["eth0"], 9.0)
    acc = config(tmp_path, text, command=["account"])
    assert (acc.kafka, acc.topic, acc.db, acc.kafka_timeout) == \
        ("127.0.0.1:9092", "flows", "sqlite:/tmp/x.db", 9.0)
    assert "ifaces" not in acc.values                 # run's setting, passed over
    rep = config(tmp_path, text, "--from", "-10m", command=["replay"])
    assert (rep.kafka, rep.time_from, rep.time_to) == ("127.0.0.1:9092", "-10m", "now")
    ev = config(tmp_path, text, command=["events"])
    assert ev.ifaces == ["eth0"] and "kafka" not in ev.values
    # Defaults differ by command where they should.
    assert config(tmp_path, None, command=["account"]).kafka_timeout == 15.0
    assert config(tmp_path, None, command=["replay"]).kafka_timeout == 30.0
    assert config(tmp_path, None, "-i", "lo", command=["events"]).keep is False
    assert config(tmp_path, None, "-i", "lo").keep is True


def test_every_boolean_has_a_no_form():
    parser = build_parser()
    for s in settings.SETTINGS:
        if s.kind != "bool":
            continue
        for command in s.commands:
            argv = [command, f"--no-{s.name}"]
            ns = parser.parse_args(argv)
            assert getattr(ns, s.key) is False, (command, s.name)


def test_every_setting_is_an_option_of_its_commands():
    parser = build_parser()
    for s in settings.SETTINGS:
        if s.kind == "bool":
            continue
        for command in s.commands:
            with pytest.raises(SystemExit):       # an option that wants a value
                parser.parse_args([command, f"--{s.name}"])


def test_bad_config_exits_2_with_one_line(tmp_path, capsys):
    f = tmp_path / "ct.toml"
    f.write_text('topic = "t"\nspool-max = "10k"\n')
    rc = main(["run", "-i", "lo", "--kafka", "h:1", "--config", str(f)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [f"ctstream: error: {f}:2: spool-max: --spool-max must be at "
                               f"least 1m, got 10240"]


def test_syn_cookies_reach_the_map_config(tmp_path):
    from streamer.datapath import abi

    cfg = config(tmp_path, 'syn-cookies = "auto"\nsyn-cookie-rate = 500\n', "-i", "lo",
                 "--syn-cookie-high", "0.8").datapath
    c = abi.unpack_config(cfg.map_config_bytes())
    assert c["flags"] & abi.CFG_SYNCOOKIE_AUTO and not c["flags"] & abi.CFG_SYNCOOKIE
    assert (c["syn_rate"], c["syn_high_pct"], c["syn_wscale"]) == (500, 80, 7)
    on = abi.unpack_config(config(tmp_path, None, "-i", "lo", "--syn-cookies", "on")
                           .datapath.map_config_bytes())
    assert on["flags"] & abi.CFG_SYNCOOKIE
    off = abi.unpack_config(config(tmp_path, None, "-i", "lo").datapath.map_config_bytes())
    assert not off["flags"] & (abi.CFG_SYNCOOKIE | abi.CFG_SYNCOOKIE_AUTO)


def test_reload_needed_names_what_only_a_restart_changes():
    a = DatapathConfig()
    b = DatapathConfig(table_limit=1000, ring_bytes=1 << 20, grace=20)
    assert settings.reload_needed(a, b) == ["table-size: 262144 -> 1000",
                                            "ring-size: 4194304 -> 1048576",
                                            "ipv6-limit: 65536 -> 1000"]
    assert settings.reload_needed(a, DatapathConfig(grace=20, report_interval=5)) == []


def test_events_takes_a_node_id_for_its_json_records(tmp_path):
    import socket

    events = ["events", "-i", "lo"]
    assert config(tmp_path, 'node-id = "gw-file"\n', command=events).node_or_host == "gw-file"
    assert config(tmp_path, None, "--node-id", "gw-cli", command=events).node_or_host == "gw-cli"
    assert config(tmp_path, None, command=events).node_or_host == socket.gethostname()


def test_event_mask_defaults_per_command_and_takes_commas(tmp_path):
    """run emits NEW, the ASSURED UPDATE and DESTROY (3 events for a short
    TCP connection); events, a tool read by people as conntrack -E is, every
    state change too. One word may list several events, comma separated."""
    run = config(tmp_path, None, "-i", "lo").datapath
    assert run.event_mask == ("new", "assured", "destroy")
    assert run.map_config_bytes() != DatapathConfig().map_config_bytes()
    events = config(tmp_path, None, "-i", "lo", command=["events"]).datapath
    assert events.event_mask == ("new", "assured", "state", "destroy")
    assert events.map_config_bytes() == DatapathConfig().map_config_bytes()
    mine = config(tmp_path, None, "-i", "lo", "--event-mask", "state,destroy").datapath
    assert mine.event_mask == ("state", "destroy")
