"""Read the live table and the counters from the pinned maps, without
compiling or loading anything: `ctstream list` and `ctstream stats` work
beside a running `events` or `run`, from any process."""

from __future__ import annotations

import ipaddress
import os
import struct
from dataclasses import dataclass, fields
from typing import Iterator

from . import abi
from . import bpfsys
from .abi import _ntohs
from ..errors import NotAttachedError
from .events import Flow, flow_text

_KEY4 = struct.Struct(abi.KEY4.fmt)
_KEY6 = struct.Struct(abi.KEY6.fmt)
_ENTRY = struct.Struct(abi.ENTRY.fmt)


@dataclass
class Entry(Flow):
    age_s: float
    idle_s: float
    dying: bool = False          # in the outbox: its DESTROY awaits an ack
    end_reason: str | None = None
    retries: int = 0

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def text(self) -> str:
        if self.dying:
            return (f"{flow_text(self)} reason={self.end_reason} retries={self.retries} "
                    f"ended={self.idle_s:.1f}s ago ct_id={self.ct_id}")
        return f"{flow_text(self)} idle={self.idle_s:.1f}s ct_id={self.ct_id}"


class PinnedTable:
    def __init__(self, pin_dir: str):
        self.pin_dir = pin_dir
        self._fds: dict[str, int] = {}

    def fd(self, name: str) -> int:
        """A pinned map by its name in the programs (ct4 and ct6 are pinned
        under their layout's names)."""
        if name not in self._fds:
            path = os.path.join(self.pin_dir, self._pinned_name(name))
            try:
                self._fds[name] = bpfsys.obj_get(path)
            except FileNotFoundError as exc:
                raise NotAttachedError(
                    f"no ctstream datapath pinned at {self.pin_dir} "
                    "(start `ctstream events` or `ctstream run` first)") from exc
        return self._fds[name]

    def _pinned_name(self, name: str) -> str:
        if name not in ("ct4", "ct6"):
            return name
        for layout in abi.TABLE_LAYOUTS.values():
            pinned = layout.pin4 if name == "ct4" else layout.pin6
            if os.path.exists(os.path.join(self.pin_dir, pinned)):
                return pinned
        return name

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def entries(self, dying: bool = False) -> list[Entry]:
        """Live connections, or (dying=True) the outbox: ended connections whose
        DESTROY awaits an ack."""
        return [e for e, _value in self.walk() if e.dying == dying]

    def walk(self, now_ns: int | None = None) -> Iterator[tuple[Entry, tuple]]:
        """Every entry of both tables, live and in the outbox, once each
        (the kernel may restart a walk under deletes), as of `now_ns`
        (monotonic): (Entry, the raw entry value's fields). An entry being
        ended this moment, or gone before it was read, is left out."""
        now = _monotonic_ns() if now_ns is None else now_ns
        for family, kstruct in ((4, _KEY4), (6, _KEY6)):
            fd = self.fd(f"ct{family}")
            size = entry_size(fd)
            seen = set()
            for key in bpfsys.map_keys(fd, kstruct.size):
                if key in seen:
                    continue
                seen.add(key)
                raw = bpfsys.map_lookup(fd, key, size)
                if raw is None:
                    continue  # expired while we walked
                value = _ENTRY.unpack_from(raw)
                e = _decode(family, kstruct.unpack(key), value, now)
                if e is not None:
                    yield e, value

    def stats(self) -> dict:
        """The counters; the SYN-cookie ones too where the programs pinned
        them (a datapath from before them has none)."""
        try:
            syn = self.fd("ct_syn_stats")
        except NotAttachedError:
            syn = None
        return read_counters(self.fd("ct_stats"), self.fd("ct_global"), syn)


def entry_size(fd: int) -> int:
    """The value size of a table map: struct ct_entry of its layout, which
    starts with layout 2's fields (abi.TABLE_LAYOUTS)."""
    size = bpfsys.map_info(fd)["value_size"]
    if size < abi.ENTRY.size:
        raise NotAttachedError(f"a table map with {size}-byte values: not a ctstream table")
    return size


def read_counters(stats_fd: int, global_fd: int, syn_fd: int | None = None) -> dict:
    """The per-CPU counters summed, plus the table's fill: entries (live and
    outbox together, what the limit counts) and the outbox alone; with
    syn_fd, the SYN-cookie counters too (abi.SYN_STAT_NAMES)."""
    totals = {}
    for idx, name in enumerate(abi.STAT_NAMES):
        per_cpu = bpfsys.percpu_lookup(stats_fd, idx.to_bytes(4, "little"), 8)
        totals[name] = sum(int.from_bytes(v, "little") for v in per_cpu)
    if syn_fd is not None:
        for idx, name in enumerate(abi.SYN_STAT_NAMES):
            per_cpu = bpfsys.percpu_lookup(syn_fd, idx.to_bytes(4, "little"), 8)
            totals[name] = sum(int.from_bytes(v, "little") for v in per_cpu)
    glob = abi.unpack_global(bpfsys.map_lookup(global_fd, b"\0" * 4, abi.GLOBAL.size))
    totals["entries"] = glob["entries"]
    totals["outbox"] = glob["dying"]
    return totals


def _monotonic_ns() -> int:
    import time
    return time.monotonic_ns()


def _decode(family, k, v, now) -> Entry | None:
    saddr, daddr, sport, dport, proto, dying, vlan = k
    ct_id, first, last, po, pr, bo, br, status_seq, sched = v
    if last & abi.LAST_DEAD and not last & abi.LAST_OUTBOX:
        return None  # being ended this moment: neither live nor in the outbox yet
    in_outbox = bool(dying & abi.KEY_DYING or last & abi.LAST_OUTBOX)
    last &= ~abi.LAST_FLAGS
    seq = status_seq >> 32
    reason, retries = None, 0
    if in_outbox:
        seq -= 1  # the copy holds its DESTROY's seq + 1
        reason = abi.END_NAMES.get((sched >> abi.SCHED_REASON_SHIFT) & 0xFF)
        retries = (sched >> 32) & 0xFFFF
    ip = ipaddress.IPv4Address if family == 4 else ipaddress.IPv6Address
    status = status_seq & 0xFFFFFFFF
    state = status & 0xFF
    flags = (status >> 8) & 0xFF
    return Entry(
        family=family, proto=abi.PROTO_NAMES.get(proto, str(proto)),
        src=str(ip(saddr)), dst=str(ip(daddr)), sport=_ntohs(sport), dport=_ntohs(dport),
        vlan=vlan, state=abi.STATE_NAMES.get(state) if proto == 6 else None,
        assured=bool(flags & abi.F_ASSURED), ct_id=ct_id, seq=seq,
        packets_orig=po, packets_reply=pr, bytes_orig=bo, bytes_reply=br,
        age_s=max(0, now - first) / 1e9, idle_s=max(0, now - last) / 1e9,
        dying=in_outbox, end_reason=reason, retries=retries,
    )
