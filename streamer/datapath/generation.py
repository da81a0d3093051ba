"""Configuration generations: the next configuration is built beside the
one in force and switched in with one write.

The kernel holds two slots: ct_config[0..1] (timeouts, report interval,
event mask, grace, watermarks, full-table policy) and two selection sets in
the ct_sel4/ct_sel6 tries (the slot is the first word of their key).
ct_meta.generation says which slot is in force (generation & 1); every
program run reads it once and takes everything from that slot, so a packet
sees the whole old or the whole new configuration, never a mix.

An apply: wait until no program still runs under the generation that last
used the other slot, rewrite that slot (its trie entries, then its
ct_config), write ct_meta with the next generation, and wait once more, so
that when apply returns the old generation is out of use everywhere.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from . import abi, bpfsys
from .config import DatapathConfig
from .selection import SEL_KEY4, SEL_KEY6, decode_entries, trie_entries
from ..errors import StreamerError

_ZERO = b"\0" * 4


@dataclass
class InForce:
    generation: int
    slot: int
    layout: int
    config: dict           # abi.unpack_config of the slot in force
    selection: dict        # ifindex -> {prefix: verdict}


def _slot_key(slot: int) -> bytes:
    return slot.to_bytes(4, "little")


class Generations:
    """The generation maps of one datapath, by their fds (meta, config,
    sel4, sel6). One writer at a time: the daemon; its lock is here."""

    def __init__(self, fds: dict[str, int], layout: int = abi.LAYOUT_VERSION):
        self.fds = fds
        self.layout = layout
        self.lock = threading.Lock()
        self._barrier: bpfsys.ProgramsBarrier | None = None

    def meta(self) -> dict:
        return abi.unpack_meta(bpfsys.map_lookup(self.fds["ct_meta"], _ZERO, abi.META.size))

    def wait_for_programs(self) -> None:
        if self._barrier is None:
            self._barrier = bpfsys.ProgramsBarrier()
        self._barrier.wait()

    def apply(self, cfg: DatapathConfig, ifindexes: dict[str, int] | None = None) -> int:
        """Make cfg the configuration in force; returns its generation.
        ifindexes: the interfaces named by per-interface sets."""
        ifindexes = ifindexes or {}
        missing = [n for n, s in cfg.selection.interfaces if s and n not in ifindexes]
        if missing:
            raise StreamerError(f"per-interface prefixes for {missing[0]}, which this daemon "
                                "does not track")
        with self.lock:
            m = self.meta()
            if m["layout"] not in (0, self.layout) or m["frozen"]:
                raise StreamerError(f"the pinned maps have layout {m['layout']}"
                                    f"{' (frozen by a migration)' if m['frozen'] else ''}, "
                                    f"this build writes layout {self.layout}")
            gen = m["generation"] + 1
            slot = gen & 1
            self.wait_for_programs()
            v4, v6 = trie_entries(cfg.selection, slot, ifindexes)
            self._rewrite_set(self.fds["ct_sel4"], SEL_KEY4.size, slot, v4)
            self._rewrite_set(self.fds["ct_sel6"], SEL_KEY6.size, slot, v6)
            bpfsys.map_update(self.fds["ct_config"], _slot_key(slot), cfg.map_config_bytes())
            bpfsys.map_update(self.fds["ct_meta"], _ZERO,
                              abi.pack_meta(gen, self.layout))
            self.wait_for_programs()
            return gen

    @staticmethod
    def _rewrite_set(fd: int, key_size: int, slot: int, entries: list[tuple[bytes, bytes]]) -> None:
        """The slot's entries become `entries`; the other slot's stay."""
        want = dict(entries)
        stale = [k for k in set(bpfsys.map_keys(fd, key_size))
                 if int.from_bytes(k[4:8], "little") == slot and k not in want]
        for k in stale:
            bpfsys.map_delete(fd, k)
        for k, v in want.items():
            bpfsys.map_update(fd, k, v)

    def in_force(self) -> InForce:
        """What the kernel uses now, read back from the maps."""
        m = self.meta()
        slot = m["generation"] & 1
        raw = bpfsys.map_lookup(self.fds["ct_config"], _slot_key(slot), abi.CONFIG.size)
        sets = []
        for name, kfmt in (("ct_sel4", SEL_KEY4), ("ct_sel6", SEL_KEY6)):
            fd = self.fds[name]
            pairs = []
            for k in set(bpfsys.map_keys(fd, kfmt.size)):
                v = bpfsys.map_lookup(fd, k, abi.SEL.size)
                if v is not None:
                    pairs.append((k, v))
            sets.append(pairs)
        return InForce(m["generation"], slot, m["layout"], abi.unpack_config(raw),
                       decode_entries(sets[0], sets[1], slot))

    def close(self) -> None:
        if self._barrier is not None:
            self._barrier.close()
            self._barrier = None


def config_in_force(config_fd: int, meta_fd: int) -> bytes:
    """The raw ct_config of the slot in force (for readers of pinned maps)."""
    raw = bpfsys.map_lookup(meta_fd, _ZERO, abi.META.size)
    gen = int.from_bytes(raw[:8], "little") if raw else 0
    return bpfsys.map_lookup(config_fd, _slot_key(gen & 1), abi.CONFIG.size)
