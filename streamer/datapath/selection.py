"""Traffic selection: which flows the datapath tracks.

`track-prefixes` and `ignore-prefixes` are lists of IPv4/IPv6 CIDRs, at
the top of the configuration and optionally per interface
(`[interfaces.NAME]`, added to the top-level lists for that interface; an
interface's statement about a prefix wins over the top level's). A flow is
classified by the most specific statement about either of its addresses:
each address finds its longest matching prefix, the longer of the two
decides, and on a tie between track and ignore, ignore wins. An address no
prefix matches takes the default: track when no track-prefixes are set
(for that interface), ignore when some are. Neither list set: everything
is tracked and the datapath does no lookup at all.

In the kernel a selection is a set of LPM-trie entries keyed by (slot,
ifindex, prefix): two slots, so that the set of the next generation is
built beside the one in force and switched in with it by one write
(streamer/datapath/generation.py). Every set holds a /0 entry per family
with its default, so a lookup in a set always finds a verdict, and a miss
means that the interface has no set of its own (then ifindex 0, the top
level's, is used).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Iterable

from . import abi
from .abi import SEL_IGNORE, SEL_TRACK

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

VERDICT_NAMES = {SEL_TRACK: "track", SEL_IGNORE: "ignore"}

# bpf/ct_abi.h: struct ct_sel_key4/6 (prefixlen counts slot, ifindex and
# address bits: the first two always match in full) and struct ct_sel.
KEY_FIXED_BITS = 64
SEL_KEY4 = struct.Struct(abi.SEL_KEY4.fmt)
SEL_KEY6 = struct.Struct(abi.SEL_KEY6.fmt)
SEL_VALUE = struct.Struct(abi.SEL.fmt)


def parse_prefix(text) -> IpNetwork:
    """One CIDR of a prefix list; ValueError says what is wrong with it."""
    if not isinstance(text, str):
        raise ValueError(f"a prefix is a string like \"198.18.0.0/15\", got {text!r}")
    t = text.strip()
    if "/" not in t:
        raise ValueError(f"{text!r} is not a CIDR (address/length, like 198.18.0.0/15)")
    try:
        return ipaddress.ip_network(t, strict=True)
    except ValueError as exc:
        msg = str(exc)
        if "host bits set" in msg:
            net = ipaddress.ip_network(t, strict=False)
            raise ValueError(f"{text!r} has host bits set (the network is {net})") from None
        raise ValueError(f"{text!r} is not a CIDR: {msg}") from None


@dataclass(frozen=True)
class PrefixSet:
    """The track and ignore lists of one table of the file."""

    track: tuple[IpNetwork, ...] = ()
    ignore: tuple[IpNetwork, ...] = ()

    @classmethod
    def parse(cls, track: Iterable = (), ignore: Iterable = ()) -> "PrefixSet":
        """From the lists' texts; ValueError for a bad CIDR, or a prefix in
        both lists (a contradiction: which one would win?)."""
        t = tuple(parse_prefix(x) for x in track)
        i = tuple(parse_prefix(x) for x in ignore)
        both = sorted(set(t) & set(i), key=str)
        if both:
            raise ValueError(f"{both[0]} is in both track-prefixes and ignore-prefixes")
        return cls(_unique(t), _unique(i))

    def __bool__(self) -> bool:
        return bool(self.track or self.ignore)


def _unique(nets: tuple) -> tuple:
    return tuple(dict.fromkeys(nets))


@dataclass(frozen=True)
class Selection:
    """The whole selection: the top level's set and the interfaces' own."""

    top: PrefixSet = PrefixSet()
    interfaces: tuple[tuple[str, PrefixSet], ...] = ()

    def active(self) -> bool:
        """Whether any list is set: otherwise everything is tracked, with
        no lookup in the datapath."""
        return bool(self.top) or any(s for _, s in self.interfaces)

    def per_interface(self) -> bool:
        return any(s for _, s in self.interfaces)

    def effective(self, ifname: str | None = None) -> dict[IpNetwork, int]:
        """prefix -> verdict for one interface (None: the top level), with
        the /0 defaults of both families."""
        sets = [self.top]
        if ifname is not None:
            sets += [s for name, s in self.interfaces if name == ifname]
        tracking = any(s.track for s in sets)
        default = SEL_IGNORE if tracking else SEL_TRACK
        out: dict[IpNetwork, int] = {ipaddress.ip_network("0.0.0.0/0"): default,
                                     ipaddress.ip_network("::/0"): default}
        for s in sets:      # later sets (the interface's) override the top level
            for net in s.track:
                out[net] = SEL_TRACK
            for net in s.ignore:
                out[net] = SEL_IGNORE
        return out

    def classify(self, a: str, b: str, ifname: str | None = None) -> int:
        """The verdict for a flow between addresses a and b, as the datapath
        gives it (the reference for tests)."""
        if not self.active():
            return SEL_TRACK
        if ifname is not None and not any(n == ifname and s for n, s in self.interfaces):
            ifname = None
        table = self.effective(ifname)
        best = []
        for addr in (ipaddress.ip_address(a), ipaddress.ip_address(b)):
            match = max((n for n in table if n.version == addr.version and addr in n),
                        key=lambda n: n.prefixlen)
            best.append((match.prefixlen, table[match]))
        top = max(p for p, _ in best)
        verdicts = {v for p, v in best if p == top}
        return SEL_IGNORE if SEL_IGNORE in verdicts else SEL_TRACK

    def describe(self) -> dict:
        """A plain form (for `config show -o json` and comparisons)."""
        def one(s: PrefixSet) -> dict:
            return {"track-prefixes": [str(n) for n in s.track],
                    "ignore-prefixes": [str(n) for n in s.ignore]}
        return {**one(self.top),
                "interfaces": {name: one(s) for name, s in self.interfaces if s}}


EMPTY = Selection()


def trie_entries(sel: Selection, slot: int, ifindexes: dict[str, int]
                 ) -> tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes]]]:
    """The (key, value) pairs of the IPv4 and IPv6 tries for one slot: the
    top level's set under ifindex 0 and each interface's own set (merged
    with the top level's) under its ifindex. Nothing when the selection
    is not active (the datapath does no lookup then)."""
    v4: list[tuple[bytes, bytes]] = []
    v6: list[tuple[bytes, bytes]] = []
    if not sel.active():
        return v4, v6
    tables = [(0, None)] + [(ifindexes[name], name) for name, s in sel.interfaces if s]
    for idx, name in tables:
        for net, verdict in sel.effective(name).items():
            value = SEL_VALUE.pack(verdict, net.prefixlen, 0)
            plen = KEY_FIXED_BITS + net.prefixlen
            if net.version == 4:
                v4.append((SEL_KEY4.pack(plen, slot, idx, net.network_address.packed), value))
            else:
                v6.append((SEL_KEY6.pack(plen, slot, idx, net.network_address.packed), value))
    return v4, v6


def decode_entries(v4: Iterable[tuple[bytes, bytes]], v6: Iterable[tuple[bytes, bytes]],
                   slot: int) -> dict[int, dict[str, str]]:
    """ifindex -> {prefix: verdict} of one slot's trie entries, read back
    from the kernel (for `config show`)."""
    out: dict[int, dict[str, str]] = {}
    for keys, fmt, width in ((v4, SEL_KEY4, 4), (v6, SEL_KEY6, 16)):
        for k, v in keys:
            plen, s, idx, addr = fmt.unpack(k)
            if s != slot:
                continue
            verdict, _, _ = SEL_VALUE.unpack(v)
            net = ipaddress.ip_network((addr, plen - KEY_FIXED_BITS))
            out.setdefault(idx, {})[str(net)] = VERDICT_NAMES.get(verdict, str(verdict))
    return out
