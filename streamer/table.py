"""Read the live table and the counters from the pinned maps, without
compiling or loading anything: `ctstream list` and `ctstream stats` work
beside a running `events` or `run`, from any process."""

from __future__ import annotations

import ipaddress
import os
import struct
from dataclasses import dataclass

from . import abi, bpfsys
from .abi import _ntohs
from .errors import NotAttachedError
from .events import flow_text

_KEY4 = struct.Struct(abi.KEY4.fmt)
_KEY6 = struct.Struct(abi.KEY6.fmt)
_ENTRY = struct.Struct(abi.ENTRY.fmt)


@dataclass
class Entry:
    family: int
    proto: str
    src: str
    dst: str
    sport: int
    dport: int
    vlan: int
    state: str | None
    assured: bool
    ct_id: int
    seq: int
    packets_orig: int
    packets_reply: int
    bytes_orig: int
    bytes_reply: int
    age_s: float
    idle_s: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    def text(self) -> str:
        return f"{flow_text(self)} idle={self.idle_s:.1f}s ct_id={self.ct_id}"


class PinnedTable:
    def __init__(self, pin_dir: str):
        self.pin_dir = pin_dir
        self._fds: dict[str, int] = {}

    def fd(self, name: str) -> int:
        if name not in self._fds:
            path = os.path.join(self.pin_dir, name)
            try:
                self._fds[name] = bpfsys.obj_get(path)
            except FileNotFoundError:
                raise NotAttachedError(
                    f"no ctstream datapath pinned at {self.pin_dir} "
                    "(start `ctstream events` or `ctstream run` first)") from None
        return self._fds[name]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def entries(self) -> list[Entry]:
        now = _monotonic_ns()
        out = []
        for family, kstruct in ((4, _KEY4), (6, _KEY6)):
            fd = self.fd(f"ct{family}")
            seen = set()
            for key in bpfsys.map_keys(fd, kstruct.size):
                if key in seen:
                    continue
                seen.add(key)
                val = bpfsys.map_lookup(fd, key, abi.ENTRY.size)
                if val is None:
                    continue  # expired while we walked
                e = _decode(family, kstruct.unpack(key), _ENTRY.unpack(val), now)
                if e is not None:
                    out.append(e)
        return out

    def stats(self) -> dict:
        fd = self.fd("ct_stats")
        totals = {}
        for idx, name in enumerate(abi.STAT_NAMES):
            per_cpu = bpfsys.percpu_lookup(fd, idx.to_bytes(4, "little"), 8)
            totals[name] = sum(int.from_bytes(v, "little") for v in per_cpu)
        g = bpfsys.map_lookup(self.fd("ct_global"), b"\0" * 4, abi.GLOBAL.size)
        glob = abi.unpack_global(g)
        totals["entries"] = glob["entries"]
        return totals


def _monotonic_ns() -> int:
    import time
    return time.monotonic_ns()


def _decode(family, k, v, now) -> Entry | None:
    saddr, daddr, sport, dport, proto, _pad, vlan = k
    ct_id, first, last, po, pr, bo, br, status_seq, _sched = v
    if last == abi.DEAD:
        return None
    ip = ipaddress.IPv4Address if family == 4 else ipaddress.IPv6Address
    status = status_seq & 0xFFFFFFFF
    state = status & 0xFF
    flags = (status >> 8) & 0xFF
    return Entry(
        family=family, proto=abi.PROTO_NAMES.get(proto, str(proto)),
        src=str(ip(saddr)), dst=str(ip(daddr)), sport=_ntohs(sport), dport=_ntohs(dport),
        vlan=vlan, state=abi.STATE_NAMES.get(state) if proto == 6 else None,
        assured=bool(flags & abi.F_ASSURED), ct_id=ct_id, seq=status_seq >> 32,
        packets_orig=po, packets_reply=pr, bytes_orig=bo, bytes_reply=br,
        age_s=max(0, now - first) / 1e9, idle_s=max(0, now - last) / 1e9,
    )
