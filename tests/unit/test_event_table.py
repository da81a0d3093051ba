"""struct ct_event is one table, abi.EVENT_FIELDS: the layout, RawEvent,
abi.decode_event and the daemon's encoder (streamer/delivery/ring_records.py)
are derived from it, and both decoders read every field from its own bytes.
The table against the C header: tests/bpf/test_event_table.py."""

from __future__ import annotations

import dataclasses
import inspect
import struct

import pytest

from streamer.datapath import abi
from streamer.datapath.events import Clock, Event
from streamer.delivery import records, ring_records, wire
from streamer.delivery.ring_records import RingEncoder
from streamer.errors import AbiError

from .test_records import NODE

FIELDS = abi.EVENT_FIELDS
HANDED_ON = [f.name for f in FIELDS if f.kind != "header"]

# Fields whose values the decoders check or interpret: valid values, distinct
# from each other (family is chosen per test). Every other field gets bytes
# that no other field holds.
PINNED = dict(type=abi.EV_DESTROY, version=abi.ABI_VERSION, len=abi.EVENT_SIZE, proto=6,
              state=abi.S_TIME_WAIT, flags=abi.F_ASSURED | abi.F_SEEN_REPLY | abi.F_PICKUP,
              end_reason=abi.END_EARLY)


def _at(f: abi.EventField) -> tuple[int, int]:
    return abi.EVENT.offsets()[f.name], struct.calcsize("<" + f.code)


def distinct_event(family: int) -> bytearray:
    """A record in which each field not pinned holds its own bytes: 0x80,
    0x81, ... in memory order, so a field read at another's place, or with
    another's width, reads a value that is not its own."""
    buf = bytearray(abi.EVENT_SIZE)
    nxt = 0x80
    for f in FIELDS:
        off, size = _at(f)
        if f.name == "family":
            struct.pack_into("<B", buf, off, family)
        elif f.name in PINNED:
            struct.pack_into("<" + f.code, buf, off, PINNED[f.name])
        else:
            buf[off:off + size] = bytes((nxt + i) & 0xFF for i in range(size))
            nxt += size
    return buf


def expected_raw(buf: bytes) -> abi.RawEvent:
    """The RawEvent of a record, field by field from its place in the
    table's layout (not through decode_event)."""
    stored = {f.name: struct.unpack_from("<" + f.code, buf, _at(f)[0])[0] for f in FIELDS}
    alen = 4 if stored["family"] == 4 else 16
    want = {}
    for f in FIELDS:
        value = stored[f.name]
        if f.kind == "header":
            continue
        if f.kind == "port":        # network order in the ring, host order in RawEvent
            value = int.from_bytes(value.to_bytes(2, "little"), "big")
        elif f.kind == "addr":
            value = value[:alen]
        want[f.name] = value
    return abi.RawEvent(**want)


def encoded(buf: bytes, clock: Clock) -> tuple:
    (key, value, time_ms), ref, etype, missed, retries = \
        RingEncoder(NODE, clock).encode(memoryview(bytes(buf)))
    return wire.decode(value), key, ref, time_ms, (etype, missed, retries)


def reference(raw: abi.RawEvent, clock: Clock) -> tuple:
    record = records.record_of_raw(raw, clock, NODE)
    return (record, records.message_key(record), Event.from_raw(raw, clock).ack_ref,
            record["observationTimeMilliseconds"], (raw.type, raw.missed, raw.retries))


def test_the_layouts_and_raw_event_are_the_table():
    assert abi.EVENT.fields == tuple((f.name, f.code) for f in FIELDS)
    assert abi.EVENT_SIZE == struct.calcsize(abi.EVENT.fmt) == 120
    assert [f.name for f in dataclasses.fields(abi.RawEvent)] == HANDED_ON
    assert {f.name for f in FIELDS if f.kind == "header"} == {"version", "len"}
    # The encoder reads the same places: only the ports' codes differ, not their sizes.
    assert ring_records._RING.format == "<" + "".join(f.ring_code for f in FIELDS)
    for f in FIELDS:
        assert struct.calcsize("<" + f.ring_code) == struct.calcsize("<" + f.code), f.name
    assert [f.name for f in FIELDS if f.ring_code != f.code] == ["sport", "dport"]


def test_the_encoder_writes_copied_fields_at_their_kernel_width():
    codes = {f.local: f.ring_code for f in FIELDS}
    copied = [row for row in ring_records._FIXED if len(row) == 2]
    assert len(copied) == 14
    for key, field in copied:
        assert field in codes, key
        assert ring_records._fixed_code((key, field)) == codes[field]


@pytest.mark.parametrize("family", [4, 6])
def test_both_decoders_read_every_field_from_its_own_bytes(family):
    buf = distinct_event(family)
    want = expected_raw(buf)
    assert abi.decode_event(bytes(buf)) == want
    clock = Clock()
    assert encoded(buf, clock) == reference(want, clock)


@pytest.mark.parametrize("field", [f for f in FIELDS if f.name not in ("version", "len", "family")],
                         ids=lambda f: f.name)
def test_a_field_changed_alone_changes_only_its_own_value(field):
    base = distinct_event(4)
    buf = bytearray(base)
    off, _ = _at(field)
    buf[off] ^= 0x01      # type 3 -> 2, proto 6 -> 7, state 7 -> 6, end_reason 5 -> 4, ...
    before, after = abi.decode_event(bytes(base)), abi.decode_event(bytes(buf))
    changed = {n for n in HANDED_ON if getattr(before, n) != getattr(after, n)}
    assert changed == {field.name}
    assert after == expected_raw(buf)
    clock = Clock()
    assert encoded(buf, clock) == reference(after, clock)


def test_a_new_row_is_a_new_field_everywhere_in_abi():
    """What a new member of struct ct_event takes on the Python side: a row
    (here at the end, with a default for callers that do not name it)."""
    table = FIELDS + (abi.EventField("extra", "I", default=0),)
    layout = abi.event_layout(table)
    assert layout.size == abi.EVENT_SIZE + 4 and layout.offsets()["extra"] == abi.EVENT_SIZE
    raw_class = abi.raw_event_class(table)
    decode = abi.event_decoder(table, raw_class)
    old = bytes(distinct_event(6))
    new = bytearray(old + struct.pack("<I", 0xE1E2E3E4))
    struct.pack_into("<H", new, _at(FIELDS[2])[0], layout.size)      # len
    ev = decode(bytes(new))
    assert ev.extra == 0xE1E2E3E4
    assert dataclasses.astuple(ev)[:-1] == dataclasses.astuple(abi.decode_event(old))
    assert raw_class(**dataclasses.asdict(abi.decode_event(old))).extra == 0
    with pytest.raises(AbiError, match=f"event length {layout.size}"):
        abi.decode_event(bytes(new))                 # this version's decoder refuses it
    with pytest.raises(AbiError, match=f"expected {layout.size}"):
        decode(old)


def test_the_generated_code_is_checked_and_readable():
    with pytest.raises(ValueError, match="kind"):
        abi.EventField("x", "B", "bogus")
    with pytest.raises(ValueError, match="twice"):
        abi.event_layout(FIELDS + (FIELDS[-1],))
    with pytest.raises(ValueError, match="without"):
        abi.event_layout(FIELDS[1:])
    with pytest.raises(ValueError, match="alen"):   # a name decode_event uses itself
        abi.event_decoder(FIELDS + (abi.EventField("alen", "B", default=0),))
    source = inspect.getsource(abi.decode_event)
    assert "unpack_from(buf)" in source and "_ntohs(sport)" in source
    assert all(f.local in source for f in FIELDS)
    assert all(f.local in inspect.getsource(ring_records._make_encode) for f in FIELDS)
