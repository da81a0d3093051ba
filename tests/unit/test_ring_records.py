"""streamer.delivery.ring_records: the daemon's one-step encoder makes, from the
ring's bytes, the same records as the reference path (abi.decode_event, then
records.record_of_raw), the same keys and the same ack references; it
refuses what decode_event refuses."""

from __future__ import annotations

import pytest

from streamer.datapath import abi
from streamer.delivery import records
from streamer.delivery import wire
from streamer.errors import AbiError
from streamer.datapath.events import Clock, Event
from streamer.delivery.kafka_sink import KafkaSink
from streamer.delivery.kafka_settings import KafkaSettings
from streamer.delivery.ring_records import RingEncoder

from .test_records import NODE, U64_MAX, V6, raw_event, random_ring_records


class SteppedClock(Clock):
    """A clock whose monotonic-to-wall offset the test sets."""

    def __init__(self, offset: int):
        self.offset = offset

    def wall_ns(self, mono_ns: int) -> int:
        return mono_ns + self.offset


def reference(buf: bytes, clock) -> tuple[dict, tuple | None]:
    raw = abi.decode_event(buf)
    return records.record_of_raw(raw, clock, NODE), Event.from_raw(raw, clock).ack_ref


def test_random_events_equal_the_reference_path():
    clock = Clock()
    enc = RingEncoder(NODE, clock)
    kinds = set()
    for buf in random_ring_records(5_000, seed=23):
        (key, value, time_ms), ref, etype, missed, retries = enc.encode(memoryview(buf))
        expected, expected_ref = reference(buf, clock)
        record = wire.decode(value)
        assert record == expected
        wire.validate(record)
        assert key == records.message_key(expected)
        assert ref == expected_ref
        assert time_ms == expected["observationTimeMilliseconds"]
        raw = abi.decode_event(buf)
        assert (etype, missed, retries) == (raw.type, raw.missed, raw.retries)
        kinds.add((record["eventType"], raw.family, raw.proto))
    assert len(kinds) == 3 * 2 * 5      # every type, family and protocol was drawn


@pytest.mark.parametrize("over", [
    dict(ct_id=U64_MAX, seq=2**32 - 1, pkts_orig=U64_MAX, pkts_reply=U64_MAX,
         bytes_orig=U64_MAX, bytes_reply=U64_MAX, sport=0xFFFF, dport=0xFFFF, vlan=0xFFFF,
         missed=255, retries=255, tcp_flags_orig=255, tcp_flags_reply=255),
    dict(ts_ns=U64_MAX, first_ns=U64_MAX, last_ns=U64_MAX),
    dict(ct_id=1, seq=0, pkts_orig=0, pkts_reply=0, bytes_orig=0, bytes_reply=0, sport=0,
         dport=0, ts_ns=0, first_ns=0, last_ns=0),
    dict(family=6, saddr=V6[0], daddr=V6[1], state=200, end_reason=99, flags=0),
    dict(family=6, saddr=bytes(10) + b"\xff\xff" + bytes([198, 18, 0, 9]), daddr=bytes(16),
         type=abi.EV_UPDATE, proto=58),
    dict(family=6, saddr=bytes.fromhex("20010002ffffffffffffffffffffffff"),
         daddr=bytes(10) + b"\xff\xff" + bytes([255, 255, 255, 255])),
], ids=["maxima", "latest-times", "zeros", "unknown-state-and-reason", "v4-mapped-v6", "longest-v6-texts"])
def test_extremes_equal_the_reference_path(over):
    clock = Clock()
    buf = raw_event(**over)
    (key, value, _), ref, *_ = RingEncoder(NODE, clock).encode(memoryview(buf))
    expected, expected_ref = reference(buf, clock)
    assert wire.decode(value) == expected
    assert key == records.message_key(expected) and ref == expected_ref


def test_integers_are_written_at_their_kernel_width():
    # One struct format for the fixed part: a counter of 0 still takes 9 bytes.
    small = RingEncoder(NODE, Clock()).encode(memoryview(raw_event(pkts_orig=0)))[0][1]
    big = RingEncoder(NODE, Clock()).encode(memoryview(raw_event(pkts_orig=U64_MAX)))[0][1]
    assert len(small) == len(big)
    assert wire.decode(big)["initiatorPackets"] == U64_MAX


def test_times_follow_the_clock_after_refresh():
    clock = SteppedClock(offset=1_700_000_000_000_000_000)
    enc = RingEncoder(NODE, clock)
    buf = memoryview(raw_event(ts_ns=5_000_000_000))
    assert enc.encode(buf)[0][2] == 1_700_000_005_000
    clock.offset += 3_000_000_000          # the wall clock was stepped 3 s ahead
    assert enc.encode(buf)[0][2] == 1_700_000_005_000   # not before refresh()
    enc.refresh()
    rec = wire.decode(enc.encode(buf)[0][1])
    assert rec["observationTimeMilliseconds"] == 1_700_000_008_000
    assert rec["flowStartMilliseconds"] == 1_700_000_004_000  # first_ns 1 s


@pytest.mark.parametrize("over, words", [
    (dict(version=abi.ABI_VERSION + 1), "ABI version"),
    (dict(len=abi.EVENT_SIZE - 8), "event length"),
    (dict(type=9), "unknown event type"),
    (dict(family=5), "unknown address family"),
])
def test_refuses_what_decode_event_refuses(over, words):
    enc = RingEncoder(NODE, Clock())
    with pytest.raises(AbiError, match=words):
        enc.encode(memoryview(raw_event(**over)))


def test_refuses_a_short_record():
    with pytest.raises(AbiError, match="expected"):
        RingEncoder(NODE, Clock()).encode(memoryview(raw_event()[:40]))


def test_the_kafka_sink_queues_what_the_ring_writer_encodes(tmp_path):
    sink = KafkaSink(KafkaSettings(bootstrap="127.0.0.1:9", topic="t"), str(tmp_path),
                     node_id=NODE)
    write = sink.ring_writer(Clock())
    destroy, create = raw_event(), raw_event(type=abi.EV_CREATE, ct_id=78)
    assert write(memoryview(destroy))[:2] == (Event.from_raw(abi.decode_event(destroy),
                                                             Clock()).ack_ref, abi.EV_DESTROY)
    assert write(memoryview(create))[:2] == (None, abi.EV_CREATE)
    assert sink.backlog() == 2
    assert [key for key, _, _ in sink._pending] == [f"{NODE}/77".encode(), f"{NODE}/78".encode()]
    assert list(sink._refs) == [0]        # the DESTROY's ack reference, by index
