"""Configuration validation and CLI parsing: no kernel needed."""

import pytest

from streamer.datapath import abi
from streamer.cli import build_parser, load_config
from streamer.datapath.config import DatapathConfig, Timeouts
from streamer.errors import ConfigError


def test_defaults_are_valid_and_match_the_design():
    cfg = DatapathConfig().validate()
    t = cfg.timeouts
    assert (t.syn, t.established, t.fin, t.udp, t.icmp) == (20, 60, 10, 30, 10)
    ns = t.as_ns()
    assert ns[abi.TO_EST] == 60_000_000_000
    assert ns[abi.TO_SYN] == 20_000_000_000


@pytest.mark.parametrize("kw, needle", [
    ({"timeouts": Timeouts(udp=-5)}, "timeout udp"),
    ({"timeouts": Timeouts(syn=0)}, "timeout syn"),
    ({"timeouts": Timeouts(fin=float("nan"))}, "timeout fin"),
    ({"timeouts": Timeouts(established=10**9)}, "timeout established"),
    ({"table_limit": 0}, "table limit"),
    ({"table_limit": 1.5}, "table limit"),
    ({"ring_bytes": 5000}, "power of two"),
    ({"ring_bytes": 1024}, "ring size"),
    ({"report_interval": -1}, "report interval"),
    ({"xdp_mode": "turbo"}, "XDP mode"),
    ({"pin_dir": "/tmp/x"}, "pin directory"),
    ({"pin_dir": '/sys/fs/bpf/a"b'}, "pin directory"),
    ({"sweep_interval": 0}, "sweep interval"),
])
def test_bad_values_are_rejected_with_a_clear_message(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        DatapathConfig(**kw).validate()


def test_map_config_bytes_layout():
    cfg = DatapathConfig(table_limit=1234, report_interval=2.5, drop_untracked=True).validate()
    raw = cfg.map_config_bytes()
    assert len(raw) == abi.CONFIG.size
    import struct
    vals = struct.unpack(abi.CONFIG.fmt, raw)
    assert vals[abi.TO_UDP] == 30_000_000_000
    assert vals[abi.TO_MAX] == 2_500_000_000
    assert vals[abi.TO_MAX + 1] == 1234
    assert vals[abi.TO_MAX + 2] == abi.CFG_DROP_UNTRACKED


def test_cli_events_options_reach_the_config():
    a = load_config([
        "events", "-i", "eth0", "-i", "eth1", "--egress", "--timeout-udp", "7.5",
        "--ring-size", "64k", "--table-size", "1000", "--xdp-mode", "generic"])
    cfg = a.datapath
    assert a.ifaces == ["eth0", "eth1"] and a.egress
    assert cfg.timeouts.udp == 7.5 and cfg.ring_bytes == 65536 and cfg.table_limit == 1000
    assert cfg.xdp_mode == "generic"


def test_cli_rejects_non_numbers(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["events", "-i", "lo", "--timeout-syn", "abc"])
    assert e.value.code == 2
    assert "expected a number of seconds" in capsys.readouterr().err


def test_cli_bad_config_is_a_one_line_error(capsys):
    from streamer.cli import main
    rc = main(["events", "-i", "lo", "--ring-size", "5000"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("ctstream: error:") and "power of two" in err[0]


def test_run_config_file_settings_and_the_command_line_wins(tmp_path):
    f = tmp_path / "ct.toml"
    f.write_text('kafka = "127.0.0.1:9092"\ntopic = "flows"\ninterface = ["eth0", "eth1"]\n'
                 'egress = true\ntimeout-udp = 7\nspool_max = "64m"\n')
    a = load_config(["run", "--config", str(f), "--topic", "other", "-i", "eth2"])
    assert (a.kafka, a.topic, a.egress, a.timeout_udp, a.spool_max) == \
        ("127.0.0.1:9092", "other", True, 7.0, 64 << 20)
    assert a.ifaces == ["eth2"]      # a list on the command line replaces the file's


@pytest.mark.parametrize("text,says", [
    ('kafak = "x:1"\n', "unknown setting 'kafak'"),
    ('kafka = \n', "not valid TOML"),
    ('timeout-udp = {a = 1}\n', "must be a string, number, boolean"),
])
def test_run_config_file_errors(tmp_path, capsys, text, says):
    from streamer.cli import main
    f = tmp_path / "ct.toml"
    f.write_text(text)
    assert main(["run", "--config", str(f), "-i", "lo", "--kafka", "h:1", "--topic", "t"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0] and str(f) in err[0]


def test_run_bad_tls_file_is_refused_before_anything_is_loaded(tmp_path, capsys):
    from streamer.cli import main
    missing = tmp_path / "nope-ca.pem"
    rc = main(["run", "-i", "lo", "--pin-dir", "/sys/fs/bpf/ctstream_never", "--kafka", "127.0.0.1:1",
               "--topic", "t", "--kafka-security-protocol", "SSL", "--kafka-ssl-cafile", str(missing)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and str(missing) in err[0]
