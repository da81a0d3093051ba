"""abi.EVENT_FIELDS, the one table of struct ct_event, against bpf/ct_abi.h:
every row's name, offset and size, as BCC compiles the header (the static
assertions of tests/bpf/test_abi.py), also as the daemon's encoder reads
them; and both decoders (abi.decode_event, ring_records.RingEncoder) on a
record that a BPF program wrote field by field (bpf/test_abi_roundtrip.c).
"""

from __future__ import annotations

import pytest

from streamer.datapath import abi
from streamer.datapath.events import Clock, Event
from streamer.delivery import records, wire
from streamer.delivery.ring_records import RingEncoder
from tests.bpf import test_abi
from tests.bpf.test_abi import DADDR, EXPECTED, SADDR, compile_with_header, static_asserts

pytestmark = pytest.mark.root

roundtrip = test_abi.roundtrip      # the fixture: one record as the BPF program wrote it

NODE = "node-1"


def table_layout(fields, ring: bool = False) -> abi.Layout:
    return abi.Layout("ct_event", tuple((f.name, f.ring_code if ring else f.code)
                                        for f in fields))


def test_every_row_is_the_c_member_of_its_name_offset_and_size():
    text = static_asserts([table_layout(abi.EVENT_FIELDS)], constants={})
    text += static_asserts([table_layout(abi.EVENT_FIELDS, ring=True)], constants={})
    assert text.count("__builtin_offsetof") == 2 * len(abi.EVENT_FIELDS)
    assert text.count("sizeof(struct ct_event) == 120") == 2
    compile_with_header(text)


def test_rows_in_another_order_fail_to_compile(capfd):
    """The check can fail: two rows of the same size swapped (the Python
    side alone cannot tell, its decoders follow the table)."""
    rows = list(abi.EVENT_FIELDS)
    names = [f.name for f in rows]
    i, j = names.index("tcp_flags_orig"), names.index("tcp_flags_reply")
    rows[i], rows[j] = rows[j], rows[i]
    with pytest.raises(Exception, match="[Ff]ailed to compile"):
        compile_with_header(static_asserts([table_layout(rows)], constants={}))
    err = capfd.readouterr().err
    assert "offset of ct_event.tcp_flags_orig" in err
    assert "offset of ct_event.ct_id" not in err


def expected_raw(family: int, **over) -> abi.RawEvent:
    """What bpf/test_abi_roundtrip.c wrote, by C member name."""
    alen = 4 if family == 4 else 16
    return abi.RawEvent(**{**EXPECTED, "family": family, "saddr": SADDR[:alen],
                           "daddr": DADDR[:alen], **over})


@pytest.mark.parametrize("proto", [0x84, 6], ids=["proto-0x84", "tcp"])
@pytest.mark.parametrize("family", [4, 6])
def test_both_decoders_read_what_bpf_wrote(roundtrip, family, proto):
    buf = bytearray(roundtrip(family))
    # The BPF program writes proto 0x84; as TCP, the encoder also shows the
    # TCP state and flags. The offset is the table's, checked above.
    buf[abi.EVENT.offsets()["proto"]] = proto
    want = expected_raw(family, proto=proto)
    assert abi.decode_event(bytes(buf)) == want

    clock = Clock()
    (key, value, time_ms), ref, etype, missed, retries = \
        RingEncoder(NODE, clock).encode(memoryview(bytes(buf)))
    record = records.record_of_raw(want, clock, NODE)
    assert wire.decode(value) == record
    assert key == records.message_key(record)
    assert time_ms == record["observationTimeMilliseconds"]
    assert ref == Event.from_raw(want, clock).ack_ref
    assert ref[1] == want.outbox_key() and ref[1][-3] == EXPECTED["dying"]
    assert (etype, missed, retries) == (EXPECTED["type"], EXPECTED["missed"], EXPECTED["retries"])
    if proto == 6:
        assert record["tcpState"] == "LAST_ACK"
        assert (record["tcpControlBits"], record["reverseTcpControlBits"]) == \
            (EXPECTED["tcp_flags_orig"], EXPECTED["tcp_flags_reply"])
