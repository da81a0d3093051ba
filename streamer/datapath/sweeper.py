"""The daemon's half of expiry and of table pressure.

Each BPF_PROG_TEST_RUN call runs a sweeper `repeat` times in the kernel; each
run examines at most SWEEP_BATCH index records of slots that are due. A tick
stops when nothing is due or its budget is spent, so a burst of expiries is
spread over several ticks instead of stalling the daemon.

Above the high watermark (live + outbox entries) the tick also runs the
early-drop programs, which end unassured live entries, soonest due first,
until the live entries are down to the low watermark (bpf/early_drop.c).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

from . import abi
from . import bpfsys

SWEEP_BATCH = 2        # CT_SWEEP_BATCH in bpf/ct_maps.h
CALL_REPEAT = 512      # runs per syscall
STALL_SLEEP = 0.002    # ring nearly full: let the reader drain it, then go on
STALL_LIMIT = 0.5      # seconds a tick may wait for ring space in all


@dataclass
class SweepResult:
    calls: int = 0
    runs: int = 0
    pending: int = 0     # slots still due after the tick
    early_dropped: int = 0
    pressure: bool = False  # above the high watermark when the tick ended
    stalls: int = 0         # calls that stopped for ring space


class Sweeper:
    def __init__(self, progs: dict[str, int], budget: int, global_fd: int | None = None,
                 high_entries: int = 0, low_entries: int = 0, horizon_s: float = 0.0,
                 lock: threading.Lock | None = None, room=None):
        self.progs = {4: progs["ct_sweep4"], 6: progs["ct_sweep6"]}
        self.early = {4: progs.get("ct_early4"), 6: progs.get("ct_early6")}
        self.budget = budget
        self.global_fd = global_fd
        self.set_watermarks(high_entries, low_entries, horizon_s)
        self.lock = lock or threading.Lock()
        # room(): events the ring can take now (ringbuf.RingSpace.room_records)
        self.room = room or (lambda: abi.ROOM_UNLIMITED)

    def set_watermarks(self, high_entries: int, low_entries: int, horizon_s: float) -> None:
        """Early-drop bounds (also Session.reconfigure's, under self.lock).
        Early drop looks `horizon` slots ahead: every live entry is filed
        under a slot no later than now + its timeout."""
        self.high, self.low = high_entries, low_entries
        self.horizon = math.ceil(horizon_s * 1e9 / (1 << abi.SLOT_SHIFT)) + 2

    def tick(self) -> SweepResult:
        res = SweepResult()
        max_runs = max(1, self.budget // SWEEP_BATCH)
        self._stall_deadline = time.monotonic() + STALL_LIMIT
        for family, fd in self.progs.items():
            runs = 0
            while runs < max_runs:
                # A first single run tells whether anything is due at all.
                repeat = 1 if runs == 0 else min(CALL_REPEAT, max_runs - runs)
                req = abi.pack_sweep_req(family, SWEEP_BATCH, room=self.room())
                out = self._call(fd, req, repeat, res)
                if out is None:
                    break  # waited for ring space long enough; next tick goes on
                if not out["stalled"]:
                    runs += repeat
                pending = out["pending"]
                if pending == 0:
                    break
            res.runs += runs
            res.pending += pending
        if self.high and self.global_fd is not None and self.early[4] is not None:
            g = self.glob()
            if g["entries"] >= self.high:
                res.early_dropped = self._early_drop(max_runs, res)
                g = self.glob()
            res.pressure = g["entries"] >= self.high
        return res

    def _call(self, fd: int, req: bytes, repeat: int, res: SweepResult) -> dict | None:
        """One test run under the lock. A run that found the event ring nearly
        full stopped without consuming anything; the ring reader (on the
        event loop) drains it meanwhile, so wait a moment - without the lock,
        acks must go on - unless this tick has waited enough."""
        with self.lock:
            _, _, raw = bpfsys.test_run(fd, req, repeat)
        res.calls += 1
        out = abi.unpack_sweep_req(raw)
        if out["stalled"]:
            res.stalls += 1
            if time.monotonic() > self._stall_deadline:
                return None
            time.sleep(STALL_SLEEP)
        return out

    def _early_drop(self, max_runs: int, res: SweepResult) -> int:
        dropped = 0
        for family, fd in self.early.items():
            runs = 0
            while runs < max_runs:
                req = abi.pack_sweep_req(family, SWEEP_BATCH, self.horizon, room=self.room())
                with self.lock:  # no ack lowers `dying` meanwhile: its growth is our drops
                    before = self.glob()
                    if before["entries"] - before["dying"] <= self.low:
                        return dropped
                    repeat = min(CALL_REPEAT, max_runs - runs)
                    _, _, raw = bpfsys.test_run(fd, req, repeat)
                    got = self.glob()["dying"] - before["dying"]
                res.calls += 1
                dropped += max(0, got)
                if abi.unpack_sweep_req(raw)["stalled"]:
                    res.stalls += 1
                    if time.monotonic() > self._stall_deadline:
                        return dropped
                    time.sleep(STALL_SLEEP)
                    continue
                runs += repeat
                if got <= 0:
                    break  # nothing unassured in this stretch; the walk goes on next tick
        return dropped

    def glob(self) -> dict:
        return abi.unpack_global(bpfsys.map_lookup(self.global_fd, b"\0" * 4, abi.GLOBAL.size))
