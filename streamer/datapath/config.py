"""Datapath and daemon configuration, validated before anything reaches the
kernel. Sizes become -D flags built from these integers; everything else goes
into the ct_config map, which the daemon can rewrite while attached."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from . import abi
from .selection import EMPTY as NO_SELECTION, Selection
from ..errors import ConfigError

DEFAULT_PIN_DIR = "/sys/fs/bpf/ctstream"
XDP_MODES = ("auto", "native", "generic")
MAX_TIMEOUT_S = 7 * 24 * 3600
PAGE = 4096


@dataclass
class Timeouts:
    """Per-state timeouts in seconds (nf_conntrack's names in brackets)."""

    syn: float = 20.0          # SYN_SENT, SYN_RECV
    established: float = 60.0  # ESTABLISHED
    fin: float = 10.0          # FIN_WAIT .. TIME_WAIT, CLOSE (after RST)
    udp: float = 30.0
    icmp: float = 10.0
    other: float = 30.0

    def validate(self) -> None:
        for name in ("syn", "established", "fin", "udp", "icmp", "other"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) \
                    or v <= 0 or v > MAX_TIMEOUT_S:
                raise ConfigError(
                    f"timeout {name} must be a number of seconds in (0, {MAX_TIMEOUT_S}], got {v!r}",
                    setting=f"timeout-{name}")

    def as_ns(self) -> list[int]:
        out = [0] * abi.TO_MAX
        out[abi.TO_SYN] = _ns(self.syn)
        out[abi.TO_EST] = _ns(self.established)
        out[abi.TO_FIN] = _ns(self.fin)
        out[abi.TO_UDP] = _ns(self.udp)
        out[abi.TO_ICMP] = _ns(self.icmp)
        out[abi.TO_OTHER] = _ns(self.other)
        return out

    def longest(self) -> float:
        return max(self.syn, self.established, self.fin, self.udp, self.icmp, self.other)


def _ns(seconds: float) -> int:
    return int(round(seconds * 1e9))


# The event mask's names: the events a flow can emit. "assured" is the
# UPDATE that marks a flow ASSURED (TCP: the handshake completed; UDP, ICMP:
# a reply seen), "state" an UPDATE on any other TCP state change. Periodic
# reports (report_interval) and the re-delivery of events a full ring
# refused are not masked. A DESTROY is never left out: the outbox and its
# acks exist for it.
EVENT_MASK_NAMES = ("new", "assured", "state", "destroy")
# What a flow-accounting user wants, `run`'s default: a short TCP connection
# costs 3 events (NEW, the UPDATE to ESTABLISHED+ASSURED, DESTROY), not 7.
RUN_EVENT_MASK = ("new", "assured", "destroy")
_QUIET_FLAGS = {"new": abi.CFG_QUIET_CREATE, "assured": abi.CFG_QUIET_ASSURED,
                "state": abi.CFG_QUIET_STATE}


SYN_COOKIE_MODES = ("off", "on", "auto")
_SYN_COOKIE_FLAGS = {"off": 0, "on": abi.CFG_SYNCOOKIE, "auto": abi.CFG_SYNCOOKIE_AUTO}


@dataclass
class DatapathConfig:
    pin_dir: str = DEFAULT_PIN_DIR
    table_limit: int = 262_144           # live entries, both families together
    ring_bytes: int = 4 << 20            # event ring size, a power of two
    report_interval: float = 60.0        # seconds between UPDATEs of a long flow; 0 = off
    sweep_interval: float = 0.25         # seconds between sweeper ticks
    sweep_budget: int = 200_000          # index records the sweeper may examine per tick
    drop_untracked: bool = False         # table full: drop instead of pass
    xdp_mode: str = "auto"
    timeouts: Timeouts = field(default_factory=Timeouts)
    grace: float = 15.0                  # outbox: re-emit an unacked DESTROY after [grace/2, grace]
    early_drop_high: float = 0.90        # fill (live + outbox) that starts early drop
    early_drop_low: float = 0.80         # live fill at which early drop stops
    ipv6_limit: int | None = None        # IPv6 entries at most; None: see ipv6_capacity()
    # The events emitted (EVENT_MASK_NAMES); a DESTROY always is.
    event_mask: tuple[str, ...] = EVENT_MASK_NAMES
    # Which flows are tracked (track-prefixes, ignore-prefixes); empty: all.
    selection: Selection = NO_SELECTION
    # SYN cookies from XDP (bpf/syn_cookie.h): off, on, or auto (on for a
    # port while its SYNs of no entry exceed syn_cookie_rate per second, or
    # while the table is above syn_cookie_high of its size).
    syn_cookies: str = "off"
    syn_cookie_rate: int = 2000
    syn_cookie_high: float = 0.90
    # The window scale our SYN-ACKs offer: the one the kernel will use for
    # the connection (streamer/datapath/syncookies.py reads it off sysctls).
    syn_wscale: int = 7

    def ipv6_capacity(self) -> int:
        """The IPv6 map's capacity. Each place costs a 16-byte hash bucket
        whether used or not, so by default IPv6 may fill a quarter of a large
        table (at least 65,536 entries, or the whole of a smaller table)."""
        if self.ipv6_limit is not None:
            return self.ipv6_limit
        return min(self.table_limit, max(self.table_limit // 4, 65_536))

    def early_high_entries(self) -> int:
        return int(self.table_limit * self.early_drop_high)

    def early_low_entries(self) -> int:
        return int(self.table_limit * self.early_drop_low)

    def validate(self) -> "DatapathConfig":
        self.timeouts.validate()
        if not re.fullmatch(r"/sys/fs/bpf(/[A-Za-z0-9_.-]+)+", self.pin_dir or ""):
            raise ConfigError(
                f"pin directory must be a path below /sys/fs/bpf made of [A-Za-z0-9_.-], "
                f"got {self.pin_dir!r}", setting="pin-dir")
        _int_in("table limit", self.table_limit, 16, 1 << 27, "table-size")
        _int_in("ring size", self.ring_bytes, PAGE, 1 << 30, "ring-size")
        if self.ring_bytes & (self.ring_bytes - 1):
            raise ConfigError(f"ring size must be a power of two (bytes), got {self.ring_bytes}",
                              setting="ring-size")
        if not _finite(self.report_interval) or not 0 <= self.report_interval <= MAX_TIMEOUT_S:
            raise ConfigError(
                f"report interval must be 0 (off) or seconds up to {MAX_TIMEOUT_S}, "
                f"got {self.report_interval!r}", setting="report-interval")
        if not _finite(self.sweep_interval) or not 0.01 <= self.sweep_interval <= 10:
            raise ConfigError(f"sweep interval must be in [0.01, 10] s, got {self.sweep_interval!r}")
        _int_in("sweep budget", self.sweep_budget, 1, 100_000_000)
        if not _finite(self.grace) or not 2.0 <= self.grace <= 3600:
            raise ConfigError(f"grace must be seconds in [2, 3600] (the index counts in ~1 s slots), "
                              f"got {self.grace!r}", setting="grace")
        for name in ("early_drop_high", "early_drop_low"):
            v = getattr(self, name)
            if not _finite(v) or not 0 < v <= 1:
                raise ConfigError(f"{name.replace('_', ' ')} must be a fraction in (0, 1], got {v!r}",
                                  setting="early-drop")
        if self.early_drop_low >= self.early_drop_high:
            raise ConfigError(f"early drop low watermark ({self.early_drop_low}) must be below the "
                              f"high one ({self.early_drop_high})", setting="early-drop")
        if self.ipv6_limit is not None:
            _int_in("IPv6 limit", self.ipv6_limit, 16, self.table_limit, "ipv6-limit")
        unknown = [n for n in self.event_mask if n not in EVENT_MASK_NAMES]
        if unknown:
            raise ConfigError(f"event mask: unknown event {unknown[0]!r}; the events are "
                              f"{', '.join(EVENT_MASK_NAMES)}", setting="event-mask")
        if "destroy" not in self.event_mask:
            raise ConfigError("event mask: destroy cannot be left out (every DESTROY is "
                              "delivered: the outbox keeps it until it is acked)",
                              setting="event-mask")
        if self.syn_cookies not in SYN_COOKIE_MODES:
            raise ConfigError(f"syn-cookies must be one of {', '.join(SYN_COOKIE_MODES)}, got "
                              f"{self.syn_cookies!r}", setting="syn-cookies")
        _int_in("SYN cookie rate", self.syn_cookie_rate, 0, 1 << 30, "syn-cookie-rate")
        if not _finite(self.syn_cookie_high) or not 0 <= self.syn_cookie_high <= 1:
            raise ConfigError(f"syn-cookie-high must be a fraction in [0, 1] (0: the table's "
                              f"fill never turns cookies on), got {self.syn_cookie_high!r}",
                              setting="syn-cookie-high")
        _int_in("SYN-ACK window scale", self.syn_wscale, 0, 14)
        if self.xdp_mode not in XDP_MODES:
            raise ConfigError(f"XDP mode must be one of {', '.join(XDP_MODES)}, got {self.xdp_mode!r}",
                              setting="xdp-mode")
        return self

    def map_config_bytes(self) -> bytes:
        flags = abi.CFG_DROP_UNTRACKED if self.drop_untracked else 0
        for name, quiet in _QUIET_FLAGS.items():
            if name not in self.event_mask:
                flags |= quiet
        if self.selection.active():
            flags |= abi.CFG_SELECT
            if self.selection.per_interface():
                flags |= abi.CFG_SELECT_IFACE
        flags |= _SYN_COOKIE_FLAGS[self.syn_cookies]
        return abi.pack_config(self.timeouts.as_ns(), _ns(self.report_interval),
                               self.table_limit, flags, grace_ns=_ns(self.grace),
                               early_low=self.early_low_entries(),
                               ipv6_limit=self.ipv6_capacity(),
                               syn_rate=self.syn_cookie_rate,
                               syn_high_pct=int(round(self.syn_cookie_high * 100)),
                               syn_wscale=self.syn_wscale)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int_in(what: str, v, lo: int, hi: int, setting: str | None = None) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ConfigError(f"{what} must be an integer in [{lo}, {hi}], got {v!r}", setting=setting)
