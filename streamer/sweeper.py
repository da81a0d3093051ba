"""The daemon's half of expiry: run the sweeper programs every tick.

Each BPF_PROG_TEST_RUN call runs a sweeper `repeat` times in the kernel; each
run examines at most SWEEP_BATCH index records of slots that are due. A tick
stops when nothing is due or its budget is spent, so a burst of expiries is
spread over several ticks instead of stalling the daemon.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import abi, bpfsys

SWEEP_BATCH = 2        # CT_SWEEP_BATCH in bpf/ct_maps.h
CALL_REPEAT = 512      # runs per syscall


@dataclass
class SweepResult:
    calls: int = 0
    runs: int = 0
    pending: int = 0   # slots still due after the tick


class Sweeper:
    def __init__(self, prog4_fd: int, prog6_fd: int, budget: int):
        self.progs = {4: prog4_fd, 6: prog6_fd}
        self.budget = budget

    def tick(self) -> SweepResult:
        res = SweepResult()
        max_runs = max(1, self.budget // SWEEP_BATCH)
        for family, fd in self.progs.items():
            req = abi.pack_sweep_req(family, SWEEP_BATCH)
            runs = 0
            while runs < max_runs:
                # A first single run tells whether anything is due at all.
                repeat = 1 if runs == 0 else min(CALL_REPEAT, max_runs - runs)
                _, _, out = bpfsys.test_run(fd, req, repeat)
                runs += repeat
                res.calls += 1
                pending = abi.unpack_sweep_req(out)["pending"]
                if pending == 0:
                    break
            res.runs += runs
            res.pending += pending
        return res
