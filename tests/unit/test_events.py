"""Event decoding and presentation: no kernel needed."""

import struct

import pytest

from streamer.datapath import abi
from streamer.errors import AbiError
from streamer.datapath.events import Clock, Event


def _raw_event(**over):
    f = dict(type=abi.EV_DESTROY, version=abi.ABI_VERSION, len=abi.EVENT_SIZE, family=4, proto=6,
             state=abi.S_TIME_WAIT, flags=abi.F_ASSURED, ct_id=77, seq=5, end_reason=abi.END_FIN,
             missed=0, tcp_flags_orig=0x1b, tcp_flags_reply=0x13, ts_ns=3_000_000_000,
             first_ns=1_000_000_000, last_ns=2_000_000_000, pkts_orig=10, pkts_reply=8,
             bytes_orig=1000, bytes_reply=5000, saddr=bytes([198, 18, 0, 1]) + bytes(12),
             daddr=bytes([198, 18, 0, 2]) + bytes(12), sport=0x3930, dport=0x8913, vlan=0, dying=0, retries=0)
    f.update(over)
    return struct.pack(abi.EVENT.fmt, *[f[name] for name, _ in abi.EVENT.fields])


def test_decode_and_present_a_destroy():
    raw = abi.decode_event(_raw_event())
    assert raw.sport == 12345 and raw.dport == 5001  # network order in the ring
    ev = Event.from_raw(raw, Clock())
    assert ev.type == "DESTROY" and ev.end_reason == "fin" and ev.state == "TIME_WAIT"
    assert ev.src == "198.18.0.1" and ev.dst == "198.18.0.2" and ev.assured
    assert ev.last_ms - ev.first_ms == 1000
    # (Its JSON form is its wire record: tests/unit/test_records.py, test_sink.py.)
    assert ev.bytes_reply == 5000 and ev.ct_id == 77 and ev.seq == 5
    assert "reason=fin" in ev.text() and "[ASSURED]" in ev.text()


def test_ipv6_and_icmp_presentation():
    addr = bytes.fromhex("20010002000000000000000000000001")
    raw = abi.decode_event(_raw_event(family=6, proto=58, type=abi.EV_CREATE, saddr=addr,
                                      daddr=addr[:-1] + b"\x02", sport=0x0100, dport=0x0100))
    ev = Event.from_raw(raw, Clock())
    assert ev.src == "2001:2::1" and ev.dst == "2001:2::2"
    assert ev.proto == "icmpv6" and ev.state is None and ev.end_reason is None
    assert "id=1" in ev.text() and ev.sport == 1


@pytest.mark.parametrize("over, needle", [
    ({"version": 9}, "version"),
    ({"len": 64}, "length"),
    ({"type": 42}, "unknown event type"),
    ({"family": 5}, "family"),
])
def test_decoder_rejects_what_it_does_not_know(over, needle):
    with pytest.raises(AbiError, match=needle):
        abi.decode_event(_raw_event(**over))


def test_decoder_rejects_short_records():
    with pytest.raises(AbiError):
        abi.decode_event(_raw_event()[:40])
