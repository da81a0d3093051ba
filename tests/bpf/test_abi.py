"""The event ABI has one source of truth: bpf/ct_abi.h.

1. Static assertions generated from the Python layouts (streamer/datapath/abi.py) are
   compiled against the header with BCC: every struct's size and every
   field's offset and size, and every constant Python mirrors.
2. A test-only BPF program (bpf/test_abi_roundtrip.c) fills every field of a
   struct ct_event with a distinct value; abi.decode_event must read them back.
3. decode_event rejects what this version does not know.
"""

from __future__ import annotations

import re
import struct

import pytest

from streamer.datapath import abi
from streamer.datapath import bpfsys
from streamer.errors import AbiError
from streamer.datapath.loader import BPF_DIR
from tests.bpf.packets import INDEX_LAYOUTS, XDP_PASS

pytestmark = pytest.mark.root

ABI_HEADER = BPF_DIR / "ct_abi.h"

# Python name -> C name where the two do not follow the CT_<NAME> rule.
_RENAMED = {"TO_MAX": "CT_TO__MAX", "STAT_MAX": "CT_STAT__MAX"}
_STAT_RENAMED = {"untracked_packets": "UNTRACKED_PKTS", "missed_redelivered": "MISSED_SENT",
                 "destroy_retries": "RETRIES"}
_CONST_PREFIXES = ("EV_", "DIR_", "S_", "F_", "END_", "TO_", "CFG_", "STAT_MAX",
                   "ABI_VERSION", "LAST_", "SLOT_SHIFT", "WHEEL", "MISSED_", "KEY_DYING",
                   "OUTBOX_TRIES", "ACK_BATCH", "SCHED_MISSED_SHIFT", "SCHED_REASON_SHIFT",
                   "CONFIG_SLOTS", "LAYOUT_VERSION", "LAYOUT_NEXT", "SEL_", "MERGE_BATCH")


def _c_constants() -> dict[str, int]:
    """C macro name -> the value Python holds for it."""
    out = {}
    for name, value in vars(abi).items():
        if not name.isupper() or not isinstance(value, int) or not name.startswith(_CONST_PREFIXES):
            continue
        out[_RENAMED.get(name, "CT_" + name)] = value
    for i, stat in enumerate(abi.STAT_NAMES):
        out["CT_STAT_" + _STAT_RENAMED.get(stat, stat.upper())] = i
    return out


def static_asserts(layouts=abi.LAYOUTS + INDEX_LAYOUTS, constants=None) -> str:
    lines = []
    for lay in layouts:
        s = f"struct {lay.c_name}"
        lines.append(f'_Static_assert(sizeof({s}) == {lay.size}, "sizeof {lay.c_name}");')
        for fname, off in lay.offsets().items():
            fsize = struct.calcsize("<" + dict(lay.fields)[fname])
            lines.append(f"_Static_assert(__builtin_offsetof({s}, {fname}) == {off}, "
                         f'"offset of {lay.c_name}.{fname}");')
            lines.append(f"_Static_assert(sizeof((({s} *)0)->{fname}) == {fsize}, "
                         f'"size of {lay.c_name}.{fname}");')
    for cname, value in (constants if constants is not None else _c_constants()).items():
        lines.append(f'_Static_assert({cname} == {value}ULL, "{cname}");')
    return "\n".join(lines) + "\n"


def compile_with_header(asserts: str) -> None:
    """Compile the assertions against ct_abi.h; BCC raises if they fail."""
    from bcc import BPF

    text = ('#include "ct_abi.h"\n' + asserts +
            "int ct_abi_check(void *ctx) { return 0; }\n")
    b = BPF(text=text.encode(), cflags=[f"-I{BPF_DIR}"])
    b.cleanup()


# ---- layouts ---------------------------------------------------------------------

def test_python_layouts_tile_their_structs():
    """No implicit padding on the Python side: every field starts where the
    previous one ended, so checking each field's offset and size (below)
    leaves no room for a C field Python does not know."""
    for lay in abi.LAYOUTS + INDEX_LAYOUTS:
        offs = lay.offsets()
        end = 0
        for name, f in lay.fields:
            assert offs[name] == end, (lay.c_name, name)
            end += struct.calcsize("<" + f)
        assert end == lay.size == struct.calcsize(lay.fmt)


def test_layouts_and_constants_match_the_header():
    text = static_asserts()
    n_fields = sum(len(lay.fields) for lay in abi.LAYOUTS + INDEX_LAYOUTS)
    assert text.count("__builtin_offsetof") == n_fields
    assert len(abi.LAYOUTS) == 16  # a layout added to abi.py is checked too
    compile_with_header(text)


def test_every_c_constant_has_a_python_mirror():
    """The other direction: a counter or flag added to the header that Python
    does not name would be invisible to the daemon."""
    header = ABI_HEADER.read_text()
    mirrored = set(_c_constants())
    groups = ("CT_EV_", "CT_S_", "CT_F_", "CT_END_", "CT_TO_", "CT_STAT_", "CT_DIR_",
              "CT_MISSED_", "CT_KEY_", "CT_OUTBOX_", "CT_ACK_", "CT_CFG_", "CT_SEL_",
              "CT_LAYOUT_", "CT_CONFIG_", "CT_MERGE_")
    defined = {m for m in re.findall(r"^#define\s+(CT_[A-Z0-9_]+)\s", header, re.M)
               if m.startswith(groups)}
    assert defined, "no constants found in ct_abi.h"
    assert defined - mirrored == set()


def test_a_wrong_offset_fails_to_compile(capfd):
    """The check can fail: ct_event with seq and ct_id swapped."""
    fields = list(abi.EVENT.fields)
    i, j = fields.index(("ct_id", "Q")), fields.index(("seq", "I"))
    fields[i], fields[j] = fields[j], fields[i]
    wrong = abi.Layout("ct_event", tuple(fields))
    assert wrong.size == abi.EVENT.size  # only offsets differ
    with pytest.raises(Exception, match="[Ff]ailed to compile"):
        compile_with_header(static_asserts([wrong], constants={}))
    err = capfd.readouterr().err
    assert "offset of ct_event.ct_id" in err and "offset of ct_event.seq" in err
    assert "offset of ct_event.ts_ns" not in err


def test_a_wrong_size_or_constant_fails_to_compile(capfd):
    short = abi.Layout("ct_key4", abi.KEY4.fields[:-1])
    with pytest.raises(Exception, match="[Ff]ailed to compile"):
        compile_with_header(static_asserts([short], constants={}))
    assert "sizeof ct_key4" in capfd.readouterr().err
    with pytest.raises(Exception, match="[Ff]ailed to compile"):
        compile_with_header(static_asserts([], constants={"CT_STAT_SWEPT": 12}))
    assert '"CT_STAT_SWEPT"' in capfd.readouterr().err


# ---- round trip through BPF -----------------------------------------------------

EXPECTED = dict(
    type=abi.EV_DESTROY, proto=0x84, state=abi.S_LAST_ACK,
    flags=abi.F_ASSURED | abi.F_SEEN_REPLY | abi.F_PICKUP,
    ct_id=0x0102030405060708, seq=0x11121314, end_reason=abi.END_REUSE, missed=0x25, dying=0x83, retries=0x97,
    tcp_flags_orig=0x1B, tcp_flags_reply=0x2D,
    ts_ns=0x2122232425262728, first_ns=0x3132333435363738, last_ns=0x4142434445464748,
    pkts_orig=0x5152535455565758, pkts_reply=0x6162636465666768,
    bytes_orig=0x7172737475767778, bytes_reply=0x8182838485868788,
    sport=0xC1C2, dport=0xD1D2, vlan=0x0E0F,
)
SADDR = bytes(range(0xA0, 0xB0))
DADDR = bytes(range(0xB0, 0xC0))


@pytest.fixture(scope="module")
def roundtrip():
    from bcc import BPF

    b = BPF(src_file=str(BPF_DIR / "test_abi_roundtrip.c").encode(), cflags=[f"-I{BPF_DIR}"])
    records: list[bytes] = []
    ring = bpfsys.RingBuffer(b[b"rt_events"].map_fd, lambda mv: records.append(bytes(mv)))
    try:
        fn = b.load_func(b"rt_fill_event", BPF.XDP)

        def run(family: int, events: int = 1, limit: int = 0) -> bytes | list[int]:
            for _ in range(events):
                retval, _, _ = bpfsys.test_run(fn.fd, bytes([family]) + bytes(63))
                assert retval == XDP_PASS
            if events > 1:   # the counts of consume() calls with `limit` until empty
                counts = []
                while counts[-1:] != [0]:
                    counts.append(ring.consume(limit))
                assert len(records) == events
                records.clear()
                return counts
            ring.consume()
            assert len(records) == 1
            return records.pop()

        yield run
    finally:
        ring.close()
        b.cleanup()


def test_consume_with_a_limit_hands_on_at_most_that_many_and_loses_none(roundtrip):
    assert roundtrip(4, events=5, limit=2) == [2, 2, 1, 0]
    assert roundtrip(4, events=4, limit=2) == [2, 2, 0]
    assert roundtrip(4, events=3, limit=0) == [3, 0]


@pytest.mark.parametrize("family", [4, 6])
def test_every_event_field_survives_the_round_trip(roundtrip, family):
    raw = roundtrip(family)
    assert len(raw) == abi.EVENT_SIZE == abi.EVENT.size

    ev = abi.decode_event(raw)
    for name, want in EXPECTED.items():
        assert getattr(ev, name) == want, name
    assert ev.family == family
    alen = 4 if family == 4 else 16
    assert ev.saddr == SADDR[:alen]
    assert ev.daddr == DADDR[:alen]
    decoded = {f for f in ev.__slots__}
    assert decoded == set(EXPECTED) | {"family", "saddr", "daddr"}

    # Byte for byte, including the header fields the decoder does not hand on.
    offs = abi.EVENT.offsets()
    assert raw[offs["version"]] == abi.ABI_VERSION
    assert struct.unpack_from("<H", raw, offs["len"])[0] == abi.EVENT.size
    assert raw[offs["sport"]:offs["sport"] + 2] == b"\xc1\xc2"  # network byte order
    assert raw[offs["dying"]:] == b"\x83\x97"


# ---- the decoder rejects what it does not know ---------------------------------

def _event(**over) -> bytes:
    f = dict(type=abi.EV_CREATE, version=abi.ABI_VERSION, len=abi.EVENT.size, family=4,
             proto=6, state=1, flags=0, ct_id=7, seq=0, end_reason=0, missed=0,
             tcp_flags_orig=2, tcp_flags_reply=0, ts_ns=1, first_ns=1, last_ns=1,
             pkts_orig=1, pkts_reply=0, bytes_orig=60, bytes_reply=0,
             saddr=bytes([10, 0, 0, 1]) + bytes(12), daddr=bytes([10, 0, 0, 2]) + bytes(12),
             sport=0x0102, dport=0x5000, vlan=0, dying=0, retries=0)
    f.update(over)
    return struct.pack(abi.EVENT.fmt, *(f[name] for name, _ in abi.EVENT.fields))


def test_decoder_accepts_a_well_formed_record():
    ev = abi.decode_event(_event())
    assert (ev.type, ev.ct_id, ev.saddr, ev.sport, ev.dport) == (1, 7, bytes([10, 0, 0, 1]),
                                                                  0x0201, 0x0050)


@pytest.mark.parametrize("buf, match", [
    (_event(version=abi.ABI_VERSION + 1), "version"),
    (_event(version=0), "version"),
    (_event(len=abi.EVENT.size - 8), "length"),
    (_event(len=abi.EVENT.size + 8), "length"),
    (_event(type=0), "type"),
    (_event(type=4), "type"),
    (_event(family=2), "family"),
    (_event()[:abi.EVENT.size - 1], "bytes"),
    (_event()[:3], "bytes"),
    (b"", "bytes"),
], ids=["version+1", "version0", "len-short", "len-long", "type0", "type4", "family2",
        "short-by-1", "3-bytes", "empty"])
def test_decoder_rejects(buf, match):
    with pytest.raises(AbiError, match=match):
        abi.decode_event(buf)
