"""Configuration validation and CLI parsing: no kernel needed."""

import pytest

from streamer import abi
from streamer.cli import _datapath_config, build_parser
from streamer.config import DatapathConfig, Timeouts
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
    a = build_parser().parse_args([
        "events", "-i", "eth0", "-i", "eth1", "--egress", "--timeout-udp", "7.5",
        "--ring-size", "64k", "--table-size", "1000", "--xdp-mode", "generic"])
    cfg = _datapath_config(a)
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
    assert rc == 1
    assert len(err) == 1 and err[0].startswith("ctstream: error:") and "power of two" in err[0]
