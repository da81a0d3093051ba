"""conntrack's own text: the lines of `conntrack -L` and `conntrack -E` for
ctstream's entries and events, and conntrack's filters for `ctstream list`.

The layout is libnetfilter_conntrack's default one (conntrack-tools 1.4.7,
checked against the kernel's conntrack in a namespace): an event tag padded
to 9 columns (`    [NEW]`, ` [UPDATE]`, `[DESTROY]`), with `extended` the
layer 3 name padded to 8 and its number (`ipv4     2`, `ipv6     10`), the
protocol likewise (`tcp      6`, `icmpv6   58`), the seconds left (not in a
DESTROY), the TCP state, the original tuple and its counters, `[UNREPLIED]`
while nothing came back, the reply tuple and its counters, `[ASSURED]`, and
in a listing `mark=0 use=1`. conntrack puts counters in DESTROY events and
listings only, so NEW and UPDATE lines have none here either.

What ctstream has not, or has otherwise, and prints anyway:
- mark=0, use=1: ctstream sets no marks and holds each entry once (the
  values conntrack shows for an unmarked entry nobody else holds);
- id=: ctstream's 64-bit ct_id (conntrack's is 32-bit), the id of the flow
  in every event, listing and Kafka record;
- ICMP: the datapath tracks echo request/reply only and keeps the echo id
  (key sport = dport = id), not type or code: the original tuple is an echo
  request (type 8, ICMPv6 128), the reply tuple an echo reply (0, 129), the
  code 0, as echo messages have it;
- [ASSURED]: ctstream's flag (traffic both ways; TCP: the handshake done).
  The kernel assures UDP only once a flow has lasted a while and never
  assures ICMP, so those lines may carry [ASSURED] where conntrack's do not;
- VLAN: conntrack has no VLAN field; ctstream keys flows by their VLAN too
  and prints `vlan=N` where conntrack puts a zone (`zone=N`), only if tagged;
- the timeout: conntrack's seconds left, from the pinned per-state timeouts
  and the entry's last packet (`list`), the state's whole timeout in a NEW or
  UPDATE (each is made by the packet that set it); ctstream has one timeout
  for all TCP closing states (fin) where the kernel has one per state.
"""

from __future__ import annotations

import ipaddress
import math
import struct
from dataclasses import dataclass

from . import abi, bpfsys
from .config import Timeouts
from .generation import config_in_force
from ..errors import ConfigError

FORMATS = ("conntrack", "text", "json")
CONNTRACK_OPTIONS = ("extended", "id")
FAMILIES = {"ipv4": 4, "ipv6": 6}
PROTO_NUMBERS = {name: num for num, name in abi.PROTO_NAMES.items()}
TCP_STATES = tuple(abi.STATE_NAMES.values())
_L3 = {4: ("ipv4", 2), 6: ("ipv6", 10)}          # AF_INET, AF_INET6
_ECHO = {4: (8, 0), 6: (128, 129)}               # (request, reply) types


@dataclass(frozen=True)
class Output:
    """What `-o` asked for: a format and conntrack's options."""

    format: str = "conntrack"
    extended: bool = False    # the layer 3 prefix
    id: bool = False          # id= at the end


def parse_output(spec: str) -> Output:
    """`-o` words, comma separated: one of conntrack, text, json, and
    conntrack's extended and id (which imply conntrack); `conntrack` alone
    when only options are given."""
    words = [w.strip() for w in str(spec).split(",") if w.strip()]
    formats = [w for w in words if w in FORMATS]
    unknown = [w for w in words if w not in FORMATS + CONNTRACK_OPTIONS]
    options = set(words) & set(CONNTRACK_OPTIONS)
    if unknown or not words or len(formats) > 1:
        raise ConfigError(f"-o takes one of {', '.join(FORMATS)} and conntrack's options "
                          f"{', '.join(CONNTRACK_OPTIONS)} (-o extended,id), got {spec!r}",
                          setting="output")
    fmt = formats[0] if formats else "conntrack"
    if options and fmt != "conntrack":
        raise ConfigError(f"-o {','.join(sorted(options))} goes with the conntrack format, "
                          f"not {fmt}", setting="output")
    return Output(fmt, "extended" in options, "id" in options)


# ---------------------------------------------------------------- timeouts

def state_timeout(flow, timeouts: Timeouts) -> float:
    """The timeout of the flow's state: bpf/ct_table.h's ct_timeout_class."""
    if flow.proto == "tcp":
        if flow.state in ("SYN_SENT", "SYN_RECV"):
            return timeouts.syn
        return timeouts.established if flow.state == "ESTABLISHED" else timeouts.fin
    if flow.proto == "udp":
        return timeouts.udp
    if flow.proto in ("icmp", "icmpv6"):
        return timeouts.icmp
    return timeouts.other


def pinned_timeouts(table) -> Timeouts:
    """The per-state timeouts in the pinned ct_config map of a PinnedTable
    (what the datapath expires by, whoever wrote them)."""
    raw = config_in_force(table.fd("ct_config"), table.fd("ct_meta"))
    ns = struct.unpack(abi.CONFIG.fmt, raw)[:abi.TO_MAX]
    return Timeouts(syn=ns[abi.TO_SYN] / 1e9, established=ns[abi.TO_EST] / 1e9,
                    fin=ns[abi.TO_FIN] / 1e9, udp=ns[abi.TO_UDP] / 1e9,
                    icmp=ns[abi.TO_ICMP] / 1e9, other=ns[abi.TO_OTHER] / 1e9)


def seconds_left(entry, timeouts: Timeouts) -> int:
    """Whole seconds until a live entry times out, as conntrack rounds them
    (down); an entry in the outbox has none left."""
    if entry.dying:
        return 0
    return max(0, math.floor(state_timeout(entry, timeouts) - entry.idle_s))


# ---------------------------------------------------------------- lines

def entry_line(entry, timeouts: Timeouts, out: Output = Output()) -> str:
    """One `conntrack -L` line for a table.Entry."""
    return _line(entry, seconds_left(entry, timeouts), counters=True, listing=True, out=out)


def event_line(ev, timeouts: Timeouts, out: Output = Output()) -> str:
    """One `conntrack -E` line for an events.Event."""
    tag = f"[{ev.type}]".rjust(9)
    destroy = ev.type == "DESTROY"
    left = None if destroy else math.floor(state_timeout(ev, timeouts))
    return f"{tag} {_line(ev, left, counters=destroy, listing=False, out=out)}"


def _line(f, left: int | None, counters: bool, listing: bool, out: Output) -> str:
    parts = []
    if out.extended:
        name, num = _L3[f.family]
        parts.append(f"{name:<8} {num}")
    num = PROTO_NUMBERS.get(f.proto)
    parts.append(f"{f.proto:<8} {num}" if num is not None else f"{'unknown':<8} {f.proto}")
    if left is not None:
        parts.append(str(left))
    if f.proto == "tcp" and f.state:
        parts.append(f.state)
    parts.append(_tuple(f, reply=False))
    if counters:
        parts.append(f"packets={f.packets_orig} bytes={f.bytes_orig}")
    if not f.packets_reply:
        parts.append("[UNREPLIED]")
    parts.append(_tuple(f, reply=True))
    if counters:
        parts.append(f"packets={f.packets_reply} bytes={f.bytes_reply}")
    if f.assured:
        parts.append("[ASSURED]")
    if listing:
        parts.append("mark=0")
    if f.vlan:
        parts.append(f"vlan={f.vlan}")
    if listing:
        parts.append("use=1")
    if out.id:
        parts.append(f"id={f.ct_id}")
    return " ".join(parts)


def _tuple(f, reply: bool) -> str:
    src, dst = (f.dst, f.src) if reply else (f.src, f.dst)
    if f.proto in ("icmp", "icmpv6"):
        return f"src={src} dst={dst} type={_ECHO[f.family][reply]} code=0 id={f.sport}"
    if not _ported(f):
        return f"src={src} dst={dst}"    # conntrack shows no L4 part it does not know
    sport, dport = (f.dport, f.sport) if reply else (f.sport, f.dport)
    return f"src={src} dst={dst} sport={sport} dport={dport}"


# ---------------------------------------------------------------- filters

@dataclass(frozen=True)
class Filter:
    """conntrack's filters of `-L`; every one given must match. Addresses
    are networks (an address alone is a /32 or /128). ctstream does no NAT,
    so the reply tuple is the original one reversed."""

    family: int | None = None
    proto: str | None = None
    src: object = None             # ipaddress network, original source
    dst: object = None
    reply_src: object = None
    reply_dst: object = None
    sport: int | None = None       # TCP/UDP ports of the original direction
    dport: int | None = None
    state: str | None = None       # TCP state

    @classmethod
    def of(cls, family=None, proto=None, src=None, dst=None, reply_src=None, reply_dst=None,
           sport=None, dport=None, state=None) -> "Filter":
        """From the words of the command line; ConfigError names the one at fault."""
        return cls(family=_family(family), proto=_proto(proto),
                   src=_net(src, "--src"), dst=_net(dst, "--dst"),
                   reply_src=_net(reply_src, "--reply-src"),
                   reply_dst=_net(reply_dst, "--reply-dst"),
                   sport=_port(sport, "--sport"), dport=_port(dport, "--dport"),
                   state=_state(state))

    def matches(self, f) -> bool:
        checks = (
            self.family is None or f.family == self.family,
            self.proto is None or f.proto == self.proto,
            _in(f.src, self.src) and _in(f.dst, self.dst),
            _in(f.dst, self.reply_src) and _in(f.src, self.reply_dst),
            self.sport is None or (_ported(f) and f.sport == self.sport),
            self.dport is None or (_ported(f) and f.dport == self.dport),
            self.state is None or (f.proto == "tcp" and f.state == self.state),
        )
        return all(checks)


def _ported(f) -> bool:
    return f.proto in ("tcp", "udp")


def _in(addr: str, net) -> bool:
    return net is None or ipaddress.ip_address(addr) in net


def _family(word):
    if word is None:
        return None
    if word not in FAMILIES:
        raise ConfigError(f"--family must be ipv4 or ipv6, got {word!r}")
    return FAMILIES[word]


def _proto(word):
    """A protocol name or number, as the entries name it."""
    if word is None:
        return None
    w = str(word).lower()
    if w in PROTO_NUMBERS:
        return w
    if w.isdigit() and 0 <= int(w) <= 255:
        return abi.PROTO_NAMES.get(int(w), w)
    raise ConfigError(f"--proto must be tcp, udp, icmp, icmpv6 or a number 0-255, got {word!r}")


def _net(word, option: str):
    if word is None:
        return None
    try:
        return ipaddress.ip_network(word, strict=False)
    except ValueError as exc:
        raise ConfigError(f"{option} must be an address or a network (ADDR/LEN), "
                          f"got {word!r}") from exc


def _port(word, option: str):
    if word is None:
        return None
    if not str(word).isdigit() or not 0 <= int(word) <= 65535:
        raise ConfigError(f"{option} must be a port 0-65535, got {word!r}")
    return int(word)


def _state(word):
    if word is None:
        return None
    if str(word).upper() not in TCP_STATES:
        raise ConfigError(f"--state must be a TCP state ({', '.join(TCP_STATES)}), got {word!r}")
    return str(word).upper()
