"""`ctstream migrate`: move a pinned table into another layout of the maps
while the kernel goes on tracking.

The daemon must be stopped (its programs stay attached and track; migrate
takes the pin dir's lock). Then:

1. load this build's programs for the new layout on the same pin dir: its
   tables are new maps (another pin name), everything else (the index, the
   ring, the global state, the counters, the configuration) is shared;
2. freeze: ct_meta.frozen = the old layout, and a wait for running
   programs. From now on the old programs only add each packet to a hold
   record of its tuple (ct_hold4/6), and touch nothing else;
3. copy every entry, live and in the outbox, into the new tables: the table
   is frozen, so the copy is exact;
4. replace the old programs by the new ones on every recorded attachment
   (XDP: replace against the old program; tc: tc's replace), and wait until
   no old program runs;
5. merge the holds into the new entries (ct_merge4/6: counters exactly,
   state moved on by the held flags; a flow that started during the hold
   gets its entry and its CREATE now);
6. write the new layout into ct_meta, unfreeze, remove the old tables.

A DESTROY waiting in the outbox moves with its entry, and one already in
the ring is read by the next daemon as before: none is lost. A run that
stops half way leaves the old layout frozen (the packets are held, not
lost) and the daemon refuses to start on it; running migrate again
finishes it (the copy skips what it copied before).
"""

from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass

from . import abi, bpfsys
from .config import DatapathConfig
from .loader import (Datapath, acquire_lock, build_layout, check_environment, load_attachments,
                     pinned_layout, pinned_meta)
from ..errors import LoadError, NotAttachedError, StreamerError

_ZERO = b"\0" * 4
_MERGE_HDR = struct.Struct(abi.MERGE_HDR.fmt)
NOEXIST = 1            # BPF_NOEXIST
MAP_SLACK = 256        # CT_MAP_SLACK in bpf/ct_maps.h


@dataclass
class MigrateReport:
    from_layout: int
    to_layout: int
    live: int = 0
    outbox: int = 0
    already: int = 0          # copied by an earlier run that stopped half way
    programs: int = 0
    merged: int = 0
    created: int = 0
    lost: int = 0
    held_packets: int = 0
    frozen_s: float = 0.0         # from the freeze until no old program ran
    seconds: float = 0.0

    def text(self) -> str:
        return (f"layout {self.from_layout} -> {self.to_layout}: moved {self.live} live entries "
                f"and {self.outbox} in the outbox"
                + (f" ({self.already} moved by an earlier run)" if self.already else "")
                + f", replaced {self.programs} programs, merged the packets held meanwhile "
                f"({self.held_packets} packets: {self.merged} flows added to, {self.created} "
                f"started during the hold, {self.lost} lost) in {self.seconds:.2f} s, "
                f"{self.frozen_s * 1000:.0f} ms of it frozen")


def _pinned_fd(pin_dir: str, name: str) -> int:
    try:
        return bpfsys.obj_get(os.path.join(pin_dir, name))
    except FileNotFoundError as exc:
        raise NotAttachedError(f"{pin_dir}/{name} is not pinned: not a ctstream datapath "
                               "(or an incomplete one)") from exc


def _sizes(pin_dir: str, table: abi.TableLayout) -> DatapathConfig:
    """A DatapathConfig whose map sizes are those of the pinned maps (the
    new tables must hold what the old ones hold, the shared maps must match)."""
    out = {}
    for name in (table.pin4, table.pin6, "ct_events"):
        fd = _pinned_fd(pin_dir, name)
        try:
            out[name] = bpfsys.map_info(fd)["max_entries"]
        finally:
            os.close(fd)
    limit = out[table.pin4] - MAP_SLACK
    return DatapathConfig(pin_dir=pin_dir, table_limit=limit, ring_bytes=out["ct_events"],
                          ipv6_limit=min(limit, out[table.pin6] - MAP_SLACK))


def _convert(raw: bytes, dst: abi.TableLayout, now_ns: int) -> bytes:
    """An entry of any layout in dst's: layout 2's fields first in all of
    them; layout 3 adds moved_ns."""
    head = raw[:abi.ENTRY.size]
    if dst.layout >= abi.LAYOUT_NEXT:
        head += now_ns.to_bytes(8, "little")
    return head.ljust(dst.entry_size, b"\0")[:dst.entry_size]


def migrate(pin_dir: str, to_layout: int | None = None, progress=lambda msg: None) -> MigrateReport:
    check_environment()
    target = to_layout or build_layout()
    if target not in abi.TABLE_LAYOUTS:
        raise LoadError(f"layout {target}: this build makes layouts "
                        f"{', '.join(map(str, abi.TABLE_LAYOUTS))}")
    t0 = time.monotonic()
    with acquire_lock(pin_dir):          # a running daemon holds it: stop it first
        old = pinned_layout(pin_dir)
        if old is None:
            raise NotAttachedError(f"no ctstream datapath pinned at {pin_dir}: nothing to migrate")
        meta = pinned_meta(pin_dir)
        if old == target and not meta["frozen"]:
            progress(f"the maps at {pin_dir} have layout {target} already: nothing to do")
            return MigrateReport(old, target)
        if old not in abi.TABLE_LAYOUTS or meta is None:
            raise LoadError(f"the maps at {pin_dir} have layout {old}, which this build cannot "
                            f"read (it knows layouts {', '.join(map(str, abi.TABLE_LAYOUTS))})")
        src, dst = abi.TABLE_LAYOUTS[old], abi.TABLE_LAYOUTS[target]
        report = MigrateReport(old, target)
        barrier = bpfsys.ProgramsBarrier()
        meta_fd = _pinned_fd(pin_dir, "ct_meta")
        dp = None
        try:
            # 1. this build's programs for the new layout, on the same pins
            # (compiled before the freeze, which then lasts only as long as
            # the copy and the swap)
            dp = Datapath(_sizes(pin_dir, src))
            dp.load(configure=False, layout=target)
            # 2. freeze the old layout's programs
            t_freeze = time.monotonic()
            bpfsys.map_update(meta_fd, _ZERO, abi.pack_meta(meta["generation"], old, old))
            barrier.wait()
            progress(f"froze layout {old}: its programs hold packets, the table stands still")
            # 3. copy the frozen table
            now = time.monotonic_ns()
            for fam, ksize in ((4, abi.KEY4.size), (6, abi.KEY6.size)):
                old_fd = _pinned_fd(pin_dir, src.pin4 if fam == 4 else src.pin6)
                new_fd = dp.fd(f"ct{fam}")
                dying_at = (abi.KEY4 if fam == 4 else abi.KEY6).offsets()["dying"]
                try:
                    for key in set(bpfsys.map_keys(old_fd, ksize)):
                        raw = bpfsys.map_lookup(old_fd, key, src.entry_size)
                        if raw is None:
                            continue
                        last = int.from_bytes(raw[16:24], "little")
                        try:
                            bpfsys.map_update(new_fd, key, _convert(raw, dst, now), NOEXIST)
                        except StreamerError:
                            if bpfsys.map_lookup(new_fd, key, dst.entry_size) is None:
                                raise
                            report.already += 1
                            continue
                        if key[dying_at] or last & abi.LAST_OUTBOX:
                            report.outbox += 1
                        else:
                            report.live += 1
                finally:
                    os.close(old_fd)
            progress(f"copied {report.live} live entries and {report.outbox} in the outbox")
            # 4. the new programs in place of the old ones, everywhere
            for att in load_attachments(pin_dir):
                if att.kind == "xdp":
                    dp.attach_xdp(att.ifname, att.netns, att.mode or None)
                else:
                    dp.attach_tc(att.ifname, att.kind, att.netns)
                report.programs += 1
            barrier.wait()
            report.frozen_s = time.monotonic() - t_freeze
            # 5. what the old programs held meanwhile
            report.held_packets = _held_packets(dp)
            for fam in (4, 6):
                _merge(dp, fam, report)
            # 6. the new layout in force
            bpfsys.map_update(meta_fd, _ZERO, abi.pack_meta(meta["generation"], target, 0))
            for name in (src.pin4, src.pin6):
                if name not in (dst.pin4, dst.pin6):
                    os.unlink(os.path.join(pin_dir, name))
        except BaseException as exc:
            raise StreamerError(
                f"migration from layout {old} to {target} stopped: {exc}; the old layout stays "
                f"frozen (packets are held, not lost): run `ctstream migrate --pin-dir {pin_dir}` "
                "again to finish it") from exc
        finally:
            os.close(meta_fd)
            barrier.close()
            if dp is not None:
                dp.close()           # the attached programs stay: the kernel holds them
    report.seconds = time.monotonic() - t0
    return report


def _held_packets(dp: Datapath) -> int:
    total = 0
    for name, ksize in (("ct_hold4", abi.KEY4.size), ("ct_hold6", abi.KEY6.size)):
        fd = dp.fd(name)
        for key in set(bpfsys.map_keys(fd, ksize)):
            raw = bpfsys.map_lookup(fd, key, abi.HOLD.size)
            if raw:
                total += int.from_bytes(raw[:8], "little")
    return total


def _merge(dp: Datapath, fam: int, report: MigrateReport) -> None:
    fd = dp.fd(f"ct_hold{fam}")
    ksize = abi.KEY4.size if fam == 4 else abi.KEY6.size
    prog = dp.prog_fd(f"ct_merge{fam}")
    keys = sorted(set(bpfsys.map_keys(fd, ksize)))
    for i in range(0, len(keys), abi.MERGE_BATCH):
        batch = keys[i:i + abi.MERGE_BATCH]
        data = _MERGE_HDR.pack(len(batch), 0, 0, 0) + b"".join(batch)
        _, _, out = bpfsys.test_run(prog, data)
        _, merged, created, lost = _MERGE_HDR.unpack_from(out)
        report.merged += merged
        report.created += created
        report.lost += lost
    left = len(set(bpfsys.map_keys(fd, ksize)))
    if left:
        raise StreamerError(f"{left} IPv{fam} hold records were not merged")
