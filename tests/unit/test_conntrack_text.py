"""streamer/datapath/conntrack_text.py: conntrack's lines and filters.

The expected lines are the kernel's own, printed by conntrack-tools 1.4.7
(`conntrack -L [-o extended,id]`, `conntrack -E [-o id|extended]`) for real
flows in a namespace; the flows below carry the same tuples, counters, ids
and timeouts (the kernel's default ones), so the lines must be equal byte
for byte. Where ctstream has something conntrack has not (a VLAN), or says
it otherwise ([ASSURED] of ICMP), the case says so.
"""

from __future__ import annotations

import io

import pytest

from streamer import cli
from streamer.cli import load_config
from streamer.datapath import abi, bpfsys, conntrack_text as ct
from streamer.datapath.config import Timeouts
from streamer.datapath.events import Event, LostReport
from streamer.datapath.table import Entry
from streamer.delivery.sink import StdoutSink
from streamer.errors import ConfigError

# The kernel's defaults for the states below: SYN_SENT 120, ESTABLISHED
# 432000, TIME_WAIT 120, UDP 30, ICMP 30.
KERNEL = Timeouts(syn=120, established=432_000, fin=120, udp=30, icmp=30, other=600)
V4 = ("198.18.117.1", "198.18.117.2")
V6 = ("2001:2:0:75::1", "2001:2:0:75::2")


def flow(cls, family=4, proto="tcp", ports=(41342, 5001), state=None, assured=False,
         counters=(0, 0, 0, 0), ct_id=1, vlan=0, **extra):
    src, dst = V4 if family == 4 else V6
    po, bo, pr, br = counters
    return cls(family=family, proto=proto, src=src, dst=dst, sport=ports[0], dport=ports[1],
               vlan=vlan, state=state, assured=assured, ct_id=ct_id, seq=0,
               packets_orig=po, packets_reply=pr, bytes_orig=bo, bytes_reply=br, **extra)


def event(type_, **kw):
    return flow(Event, type=type_, time_ms=0, first_ms=0, last_ms=0,
                end_reason="fin" if type_ == "DESTROY" else None, missed=0, **kw)


def entry(idle_s=0.0, dying=False, **kw):
    return flow(Entry, age_s=idle_s, idle_s=idle_s, dying=dying, **kw)


ID = ct.Output(id=True)
EXT = ct.Output(extended=True)
EXT_ID = ct.Output(extended=True, id=True)

EVENTS = [
    ("tcp-v4-new-unreplied", event("NEW", state="SYN_SENT", ct_id=3167942137), ID,
     "    [NEW] tcp      6 120 SYN_SENT src=198.18.117.1 dst=198.18.117.2 sport=41342 "
     "dport=5001 [UNREPLIED] src=198.18.117.2 dst=198.18.117.1 sport=5001 dport=41342 "
     "id=3167942137"),
    ("tcp-v4-update-assured",
     event("UPDATE", state="ESTABLISHED", assured=True, counters=(3, 180, 1, 60),
           ct_id=3167942137), ID,
     " [UPDATE] tcp      6 432000 ESTABLISHED src=198.18.117.1 dst=198.18.117.2 sport=41342 "
     "dport=5001 src=198.18.117.2 dst=198.18.117.1 sport=5001 dport=41342 [ASSURED] "
     "id=3167942137"),
    ("tcp-v6-update-time-wait",
     event("UPDATE", family=6, ports=(39218, 5001), state="TIME_WAIT", assured=True,
           counters=(11, 2800, 9, 6656), ct_id=1775418895), ID,
     " [UPDATE] tcp      6 120 TIME_WAIT src=2001:2:0:75::1 dst=2001:2:0:75::2 sport=39218 "
     "dport=5001 src=2001:2:0:75::2 dst=2001:2:0:75::1 sport=5001 dport=39218 [ASSURED] "
     "id=1775418895"),
    ("tcp-v6-destroy",
     event("DESTROY", family=6, ports=(39218, 5001), state="TIME_WAIT", assured=True,
           counters=(11, 2800, 9, 6656), ct_id=1775418895), ID,
     "[DESTROY] tcp      6 TIME_WAIT src=2001:2:0:75::1 dst=2001:2:0:75::2 sport=39218 "
     "dport=5001 packets=11 bytes=2800 src=2001:2:0:75::2 dst=2001:2:0:75::1 sport=5001 "
     "dport=39218 packets=9 bytes=6656 [ASSURED] id=1775418895"),
    ("udp-v4-destroy-unreplied",
     event("DESTROY", proto="udp", ports=(57033, 5999), counters=(1, 38, 0, 0),
           ct_id=3718918710), ID,
     "[DESTROY] udp      17 src=198.18.117.1 dst=198.18.117.2 sport=57033 dport=5999 "
     "packets=1 bytes=38 [UNREPLIED] src=198.18.117.2 dst=198.18.117.1 sport=5999 "
     "dport=57033 packets=0 bytes=0 id=3718918710"),
    ("udp-v4-destroy-no-id",
     event("DESTROY", proto="udp", ports=(36324, 5002), counters=(2, 256, 2, 256)), ct.Output(),
     "[DESTROY] udp      17 src=198.18.117.1 dst=198.18.117.2 sport=36324 dport=5002 "
     "packets=2 bytes=256 src=198.18.117.2 dst=198.18.117.1 sport=5002 dport=36324 "
     "packets=2 bytes=256"),
    ("udp-v6-update-extended",
     event("UPDATE", family=6, proto="udp", ports=(51635, 5002), counters=(1, 148, 1, 148)),
     EXT,
     " [UPDATE] ipv6     10 udp      17 30 src=2001:2:0:75::1 dst=2001:2:0:75::2 sport=51635 "
     "dport=5002 src=2001:2:0:75::2 dst=2001:2:0:75::1 sport=5002 dport=51635"),
    ("icmp-v4-new", event("NEW", proto="icmp", ports=(10093, 10093), counters=(1, 84, 0, 0),
                          ct_id=1575562660), ID,
     "    [NEW] icmp     1 30 src=198.18.117.1 dst=198.18.117.2 type=8 code=0 id=10093 "
     "[UNREPLIED] src=198.18.117.2 dst=198.18.117.1 type=0 code=0 id=10093 id=1575562660"),
    ("icmp-v4-new-extended", event("NEW", proto="icmp", ports=(34132, 34132),
                                   counters=(1, 84, 0, 0)), EXT,
     "    [NEW] ipv4     2 icmp     1 30 src=198.18.117.1 dst=198.18.117.2 type=8 code=0 "
     "id=34132 [UNREPLIED] src=198.18.117.2 dst=198.18.117.1 type=0 code=0 id=34132"),
    ("icmp-v4-destroy-unassured",
     event("DESTROY", proto="icmp", ports=(59897, 59897), counters=(1, 84, 1, 84),
           ct_id=3882034585), ID,
     "[DESTROY] icmp     1 src=198.18.117.1 dst=198.18.117.2 type=8 code=0 id=59897 "
     "packets=1 bytes=84 src=198.18.117.2 dst=198.18.117.1 type=0 code=0 id=59897 "
     "packets=1 bytes=84 id=3882034585"),
    # ctstream assures an answered ICMP flow; the kernel never does.
    ("icmp-v4-destroy-assured-by-ctstream",
     event("DESTROY", proto="icmp", ports=(59897, 59897), assured=True,
           counters=(1, 84, 1, 84), ct_id=3882034585), ID,
     "[DESTROY] icmp     1 src=198.18.117.1 dst=198.18.117.2 type=8 code=0 id=59897 "
     "packets=1 bytes=84 src=198.18.117.2 dst=198.18.117.1 type=0 code=0 id=59897 "
     "packets=1 bytes=84 [ASSURED] id=3882034585"),
    ("icmpv6-new-extended-id",
     event("NEW", family=6, proto="icmpv6", ports=(7386, 7386), counters=(1, 104, 0, 0),
           ct_id=3267923624), EXT_ID,
     "    [NEW] ipv6     10 icmpv6   58 30 src=2001:2:0:75::1 dst=2001:2:0:75::2 type=128 "
     "code=0 id=7386 [UNREPLIED] src=2001:2:0:75::2 dst=2001:2:0:75::1 type=129 code=0 "
     "id=7386 id=3267923624"),
    ("icmpv6-update", event("UPDATE", family=6, proto="icmpv6", ports=(7386, 7386),
                            counters=(1, 104, 1, 104)), ct.Output(),
     " [UPDATE] icmpv6   58 30 src=2001:2:0:75::1 dst=2001:2:0:75::2 type=128 code=0 id=7386 "
     "src=2001:2:0:75::2 dst=2001:2:0:75::1 type=129 code=0 id=7386"),
    # conntrack has no VLAN: ctstream's vlan= stands where conntrack puts a zone.
    ("tcp-vlan-destroy",
     event("DESTROY", state="CLOSE", counters=(2, 120, 1, 40), vlan=100, ct_id=9), ID,
     "[DESTROY] tcp      6 CLOSE src=198.18.117.1 dst=198.18.117.2 sport=41342 dport=5001 "
     "packets=2 bytes=120 src=198.18.117.2 dst=198.18.117.1 sport=5001 dport=41342 "
     "packets=1 bytes=40 vlan=100 id=9"),
]


@pytest.mark.parametrize("ev,out,line", [c[1:] for c in EVENTS], ids=[c[0] for c in EVENTS])
def test_event_lines_are_conntrack_E_lines(ev, out, line):
    assert ct.event_line(ev, KERNEL, out) == line


ENTRIES = [
    ("tcp-v4-time-wait", entry(idle_s=0.4, state="TIME_WAIT", assured=True,
                               counters=(11, 2580, 9, 6476)), ct.Output(),
     "tcp      6 119 TIME_WAIT src=198.18.117.1 dst=198.18.117.2 sport=41342 dport=5001 "
     "packets=11 bytes=2580 src=198.18.117.2 dst=198.18.117.1 sport=5001 dport=41342 "
     "packets=9 bytes=6476 [ASSURED] mark=0 use=1"),
    ("tcp-v4-extended-id", entry(idle_s=0.4, state="TIME_WAIT", assured=True,
                                 counters=(11, 2580, 9, 6476), ct_id=3167942137), EXT_ID,
     "ipv4     2 tcp      6 119 TIME_WAIT src=198.18.117.1 dst=198.18.117.2 sport=41342 "
     "dport=5001 packets=11 bytes=2580 src=198.18.117.2 dst=198.18.117.1 sport=5001 "
     "dport=41342 packets=9 bytes=6476 [ASSURED] mark=0 use=1 id=3167942137"),
    ("udp-v6-id", entry(idle_s=0.9, family=6, proto="udp", ports=(51635, 5002),
                        counters=(2, 296, 2, 296), ct_id=413953592), ID,
     "udp      17 29 src=2001:2:0:75::1 dst=2001:2:0:75::2 sport=51635 dport=5002 packets=2 "
     "bytes=296 src=2001:2:0:75::2 dst=2001:2:0:75::1 sport=5002 dport=51635 packets=2 "
     "bytes=296 mark=0 use=1 id=413953592"),
    ("udp-v4-unreplied", entry(idle_s=28.2, proto="udp", ports=(57033, 5999),
                               counters=(1, 38, 0, 0)), ct.Output(),
     "udp      17 1 src=198.18.117.1 dst=198.18.117.2 sport=57033 dport=5999 packets=1 "
     "bytes=38 [UNREPLIED] src=198.18.117.2 dst=198.18.117.1 sport=5999 dport=57033 "
     "packets=0 bytes=0 mark=0 use=1"),
    ("icmp-v4", entry(idle_s=0.3, proto="icmp", ports=(10093, 10093),
                      counters=(2, 168, 2, 168)), ct.Output(),
     "icmp     1 29 src=198.18.117.1 dst=198.18.117.2 type=8 code=0 id=10093 packets=2 "
     "bytes=168 src=198.18.117.2 dst=198.18.117.1 type=0 code=0 id=10093 packets=2 "
     "bytes=168 mark=0 use=1"),
    ("icmpv6-extended-id", entry(idle_s=0.3, family=6, proto="icmpv6", ports=(7386, 7386),
                                 counters=(1, 104, 1, 104), ct_id=3267923624), EXT_ID,
     "ipv6     10 icmpv6   58 29 src=2001:2:0:75::1 dst=2001:2:0:75::2 type=128 code=0 "
     "id=7386 packets=1 bytes=104 src=2001:2:0:75::2 dst=2001:2:0:75::1 type=129 code=0 "
     "id=7386 packets=1 bytes=104 mark=0 use=1 id=3267923624"),
    ("tcp-vlan", entry(idle_s=1.0, state="ESTABLISHED", assured=True, vlan=4094,
                       counters=(5, 300, 4, 240), ct_id=2**64 - 1), ID,
     "tcp      6 431999 ESTABLISHED src=198.18.117.1 dst=198.18.117.2 sport=41342 dport=5001 "
     "packets=5 bytes=300 src=198.18.117.2 dst=198.18.117.1 sport=5001 dport=41342 "
     "packets=4 bytes=240 [ASSURED] mark=0 vlan=4094 use=1 id=18446744073709551615"),
    ("past-its-timeout", entry(idle_s=31.5, proto="udp", ports=(1, 2), counters=(1, 29, 1, 29)),
     ct.Output(),
     "udp      17 0 src=198.18.117.1 dst=198.18.117.2 sport=1 dport=2 packets=1 bytes=29 "
     "src=198.18.117.2 dst=198.18.117.1 sport=2 dport=1 packets=1 bytes=29 mark=0 use=1"),
    ("dying-has-no-time-left",
     entry(idle_s=0.5, dying=True, state="TIME_WAIT", assured=True, counters=(3, 1, 3, 1),
           end_reason="fin"), ct.Output(),
     "tcp      6 0 TIME_WAIT src=198.18.117.1 dst=198.18.117.2 sport=41342 dport=5001 "
     "packets=3 bytes=1 src=198.18.117.2 dst=198.18.117.1 sport=5001 dport=41342 packets=3 "
     "bytes=1 [ASSURED] mark=0 use=1"),
    ("unknown-protocol", entry(idle_s=0, proto="47", ports=(0, 0), counters=(1, 1, 0, 0)),
     ct.Output(),
     "unknown  47 600 src=198.18.117.1 dst=198.18.117.2 packets=1 bytes=1 [UNREPLIED] "
     "src=198.18.117.2 dst=198.18.117.1 packets=0 bytes=0 mark=0 use=1"),
]


@pytest.mark.parametrize("e,out,line", [c[1:] for c in ENTRIES], ids=[c[0] for c in ENTRIES])
def test_entry_lines_are_conntrack_L_lines(e, out, line):
    assert ct.entry_line(e, KERNEL, out) == line


# (protocol, state) -> the Timeouts attribute: bpf/ct_table.h's ct_timeout_class
STATE_TIMEOUTS = [
    ("tcp", "SYN_SENT", "syn"), ("tcp", "SYN_RECV", "syn"), ("tcp", "ESTABLISHED", "established"),
    ("tcp", "FIN_WAIT", "fin"), ("tcp", "CLOSE_WAIT", "fin"), ("tcp", "LAST_ACK", "fin"),
    ("tcp", "TIME_WAIT", "fin"), ("tcp", "CLOSE", "fin"), ("tcp", "NONE", "fin"),
    ("udp", None, "udp"), ("icmp", None, "icmp"), ("icmpv6", None, "icmp"), ("47", None, "other"),
]


@pytest.mark.parametrize("proto,state,which", STATE_TIMEOUTS)
def test_state_timeout_follows_the_datapath_classes(proto, state, which):
    distinct = Timeouts(syn=1, established=2, fin=3, udp=4, icmp=5, other=6)
    assert ct.state_timeout(entry(proto=proto, state=state), distinct) == getattr(distinct, which)


def test_event_timeout_is_the_whole_timeout_of_its_state_rounded_down():
    t = Timeouts(syn=7.9, established=60, fin=10, udp=2.5, icmp=1, other=3)
    assert ct.event_line(event("NEW", state="SYN_SENT"), t).split()[3] == "7"
    assert ct.event_line(event("NEW", proto="udp"), t).split()[3] == "2"


def test_pinned_timeouts_decode_the_config_map(monkeypatch):
    t = Timeouts(syn=21, established=61.5, fin=11, udp=31, icmp=12, other=33)
    raw = abi.pack_config(t.as_ns(), 0, 1024, 0)
    asked = []

    class Table:
        def fd(self, name):
            asked.append(name)
            return {"ct_config": 99, "ct_meta": 98}[name]

    def lookup(fd, key, size):
        if fd == 98:
            return abi.pack_meta(7)           # generation 7: slot 1 is in force
        return raw if (fd, key) == (99, (1).to_bytes(4, "little")) else b"\0" * size
    monkeypatch.setattr(bpfsys, "map_lookup", lookup)
    assert ct.pinned_timeouts(Table()) == t
    assert sorted(asked) == ["ct_config", "ct_meta"]


OUTPUTS = [
    ("conntrack", ct.Output()), ("id", ID), ("extended", EXT), ("extended,id", EXT_ID),
    ("id,extended", EXT_ID), ("conntrack,id", ID), ("text", ct.Output("text")),
    ("json", ct.Output("json")),
]


@pytest.mark.parametrize("spec,want", OUTPUTS)
def test_parse_output(spec, want):
    assert ct.parse_output(spec) == want


@pytest.mark.parametrize("spec,says", [
    ("xml", "got 'xml'"), ("", "got ''"), ("json,text", "got 'json,text'"),
    ("json,id", "-o id goes with the conntrack format, not json"),
    ("text,extended", "-o extended goes with the conntrack format, not text"),
])
def test_parse_output_refuses(spec, says):
    with pytest.raises(ConfigError, match=says) as err:
        ct.parse_output(spec)
    assert err.value.setting == "output"


FLOWS = {
    "tcp4": entry(state="ESTABLISHED", ports=(40000, 80)),
    "udp4": entry(proto="udp", ports=(40001, 53)),
    "icmp4": entry(proto="icmp", ports=(53, 53)),
    "tcp6": entry(family=6, state="TIME_WAIT", ports=(40002, 80)),
    "icmp6": entry(family=6, proto="icmpv6", ports=(80, 80)),
}
FILTERS = [
    (dict(), set(FLOWS)),
    (dict(proto="tcp"), {"tcp4", "tcp6"}),
    (dict(proto="6"), {"tcp4", "tcp6"}),
    (dict(proto="58"), {"icmp6"}),
    (dict(proto="ICMP"), {"icmp4"}),
    (dict(family="ipv6"), {"tcp6", "icmp6"}),
    (dict(src="198.18.117.1"), {"tcp4", "udp4", "icmp4"}),
    (dict(src="198.18.117.0/24"), {"tcp4", "udp4", "icmp4"}),
    (dict(src="198.18.117.2"), set()),                   # the server is the destination
    (dict(dst="2001:2:0:75::2"), {"tcp6", "icmp6"}),
    (dict(dst="2001:2::/48", proto="tcp"), {"tcp6"}),
    (dict(reply_src="198.18.117.2"), {"tcp4", "udp4", "icmp4"}),
    (dict(reply_dst="2001:2:0:75::1"), {"tcp6", "icmp6"}),
    (dict(reply_dst="198.18.117.2"), set()),
    (dict(dport="80"), {"tcp4", "tcp6"}),                # the ICMP echo id 80 is no port
    (dict(sport="40001"), {"udp4"}),
    (dict(dport="53"), {"udp4"}),
    (dict(state="established"), {"tcp4"}),
    (dict(state="TIME_WAIT", family="ipv4"), set()),
    (dict(proto="udp", state="ESTABLISHED"), set()),     # only TCP has states
]


@pytest.mark.parametrize("words,want", FILTERS, ids=[repr(w) for w, _ in FILTERS])
def test_filters_match_like_conntrack(words, want):
    f = ct.Filter.of(**words)
    assert {name for name, e in FLOWS.items() if f.matches(e)} == want


@pytest.mark.parametrize("words,says", [
    (dict(proto="gre"), "--proto"), (dict(proto="256"), "--proto"),
    (dict(family="inet"), "--family"), (dict(src="198.18.0.300"), "--src"),
    (dict(reply_dst="x"), "--reply-dst"), (dict(dport="65536"), "--dport"),
    (dict(sport="-1"), "--sport"), (dict(state="OPEN"), "--state"),
])
def test_bad_filter_words_are_config_errors(words, says):
    with pytest.raises(ConfigError, match=says):
        ct.Filter.of(**words)


def test_list_with_a_bad_filter_exits_2_with_one_line_before_opening_the_maps(capsys):
    rc = cli.main(["list", "-p", "gre", "--pin-dir", "/sys/fs/bpf/ctstest_never_made"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("ctstream: error: --proto"), err


def test_list_with_a_bad_output_exits_2(capsys):
    rc = cli.main(["list", "-o", "xml", "--pin-dir", "/sys/fs/bpf/ctstest_never_made"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "-o takes one of" in err[0], err


# ---------------------------------------------------------------- events: the setting, the sink

def test_events_prints_conntrack_lines_by_default_and_account_text():
    assert load_config(["events", "-i", "lo"]).output == "conntrack"
    assert load_config(["events", "-i", "lo", "-o", "extended,id"]).output == "extended,id"
    assert load_config(["account", "--kafka", "h:1", "--topic", "t"], typed=False).output == "text"


@pytest.mark.parametrize("argv,says", [
    (["events", "-i", "lo", "-o", "json,id"], "--output: -o id goes with the conntrack format"),
    (["events", "-i", "lo", "-o", "csv"], "--output: -o takes one of"),
    (["account", "--kafka", "h:1", "--topic", "t", "-o", "conntrack"],
     "--output: must be text or json, got 'conntrack'"),
])
def test_output_words_are_checked_per_command(argv, says):
    with pytest.raises(ConfigError) as err:
        load_config(argv)
    assert str(err.value).startswith(says), str(err.value)


def _sink_lines(output: str, *events) -> tuple[str, str]:
    out = ct.parse_output(output)
    stream = io.StringIO()
    sink = StdoutSink("json" if out.format == "json" else "text", stream=stream,
                      text_line=cli._conntrack_event_lines(out, KERNEL))
    for ev in events:
        sink.write(ev)
    return stream.getvalue(), out.format


def test_stdout_sink_writes_conntrack_lines_and_lost_reports_to_stderr(capsys):
    new = event("NEW", proto="icmp", ports=(34132, 34132), counters=(1, 84, 0, 0))
    lost = LostReport(time_ms=0, interval_s=10, lost={"ring_full": 3})
    written, _ = _sink_lines("extended", new, lost)
    assert written == ("    [NEW] ipv4     2 icmp     1 30 src=198.18.117.1 dst=198.18.117.2 "
                       "type=8 code=0 id=34132 [UNREPLIED] src=198.18.117.2 "
                       "dst=198.18.117.1 type=0 code=0 id=34132\n")
    assert capsys.readouterr().err == "ctstream: [LOST]     ring_full=3 in the last 10s\n"


def test_stdout_sink_text_keeps_ctstreams_own_line():
    ev = event("DESTROY", state="TIME_WAIT", assured=True, counters=(8, 1424, 6, 3320))
    lost = LostReport(time_ms=0, interval_s=10, lost={"ring_full": 3})
    written, _ = _sink_lines("text", ev, lost)
    assert written == ev.text() + "\n" + lost.text() + "\n"
    assert "reason=fin" in written and "[LOST]" in written


def test_conntrack_layout_fields_pad_like_snprintf():
    """%9s for the tag, %-8s %u for the protocols: the columns line up."""
    for ev, width in ((event("NEW", state="SYN_SENT"), 9), (event("UPDATE", proto="udp"), 9),
                      (event("DESTROY", proto="udp"), 9)):
        line = ct.event_line(ev, KERNEL, EXT)
        assert line[width] == " " and line[width + 1:width + 10] == "ipv4     "
        assert line[width + 12:width + 21] in ("tcp      ", "udp      ")
