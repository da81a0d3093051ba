"""ctstream live configuration benchmark: the packet path's cost with a
traffic selection in force, and how long an apply takes.

One run, side by side, rounds rotated:

  1. packet path: ns per packet of ct_xdp_ingress on the established-flow
     hit path (TCP, original direction, IPv4 and IPv6) through
     BPF_PROG_TEST_RUN (the kernel-reported duration), beside the bare
     XDP_PASS program (bench/bare_pass.c), for four variants:
       old      the commit before live configuration (a8dc806): no selection
       new-0    live configuration, no prefixes (selection off: no lookup)
       new-100  100 prefixes in force, the hit flow still tracked
       new-10k  10,000 prefixes in force, the hit flow still tracked
     One worker process per (variant, round), PYTHONPATH set to the tree in
     question (a temporary git worktree of each commit), the order of the
     variants rotated every round. bench/datapath.py's pieces build the
     datapath and take the flow through the handshake.
  2. apply latency, (a) in process: Datapath.configure() (Generations.apply)
     wall time for 0, 100 and 10,000 prefixes, measured in the same workers,
     three prefix sets in turn so that every apply really rewrites the slot;
     the RCU waits (bpfsys.ProgramsBarrier) timed apart. (b) end to end:
     `ctstream config apply FILE` against a real `ctstream events` daemon on a
     network namespace pair, the subprocess timed from start to exit, beside
     the daemon's side alone (one control-socket request) and the client's
     side alone (`ctstream config check FILE`).

A table goes to stdout, progress to stderr, every sample to
bench/results/config-<timestamp>.json. Run as root; see bench/README.md
("Live configuration").
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OLD_REV = "a8dc806"            # the commit before live configuration existed
PIN_PREFIX = "ctsbcfg_"        # pin dirs: /sys/fs/bpf/ctsbcfg_<bench pid>_<name>
WORKTREE_RX = re.compile(r"^/tmp/ctbench-(old|new)-(\d+)$")
NS_PREFIX = "ctsbcfg"
PAIR_INDEX = 45

VARIANTS = ("old", "new-0", "new-100", "new-10k")
PREFIXES = {"old": 0, "new-0": 0, "new-100": 100, "new-10k": 10_000}
E2E_SIZES = (100, 10_000)
TRACK = ("198.18.0.0/15", "2001:2::/48")   # the benchmarking ranges, tracked

FULL = dict(rounds=5, repeat=1_000_000, reps=3, apply_samples={0: 40, 100: 40, 10_000: 12},
            barrier_samples=10, e2e_rounds=10, time_limit=290)
QUICK = dict(rounds=3, repeat=200_000, reps=2, apply_samples={0: 12, 100: 12, 10_000: 3},
             barrier_samples=5, e2e_rounds=3, time_limit=88)
# What the end-to-end phase is given when the packet rounds decide whether
# another round fits: namespaces and the daemon's start, then about 3 s a round.
E2E_SETUP_S, E2E_ROUND_S = 10, 3.5
WORKER_TIMEOUT_S = 120


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pid_alive(pid: int) -> bool:
    from streamer.demo.testbed import pid_alive as alive
    return alive(pid)


class Interrupted(BaseException):
    """SIGTERM: unwinds like Ctrl-C, so that every cleanup runs."""


def _raise_interrupted(signum, frame):
    raise Interrupted(f"signal {signum}")


# ---- prefix sets ----------------------------------------------------------------

def prefix_lists(n: int, k: int) -> tuple[list[str], list[str]]:
    """(track, ignore): n prefixes in all, set k (0..2) of three disjoint sets
    of the same shape. n == 0: none (selection off).

    Tracked: 198.18.0.0/15 and 2001:2::/48. Ignored, half IPv4 and half IPv6:
    /24s of 198.19.128-255 (an eighth of the IPv4 ones, at most 42 per set)
    and /32s from 198.19.1.0 up; /64s from 2001:2:0:2::/64 up and /128s in
    2001:2::/64. None covers 198.19.0.0/24 or 2001:2:0:1::/64, where
    bench/datapath.py's hit flow lives (HIT4, HIT6): it stays tracked."""
    if n == 0:
        return [], []
    if n < len(TRACK) or n > 20_000 or k not in (0, 1, 2):
        raise ValueError(f"bad prefix set size {n} or index {k}")
    m = n - len(TRACK)
    n4 = m // 2
    n6 = m - n4
    n24 = min(n4 // 8, 42)
    n32 = n4 - n24
    ign = [f"198.19.{128 + k * 42 + i}.0/24" for i in range(n24)]
    base = 256 + k * 10_000          # host number inside 198.19.0.0/16
    ign += [f"198.19.{(base + i) >> 8}.{(base + i) & 255}/32" for i in range(n32)]
    n64 = n6 // 2
    n128 = n6 - n64
    ign += [f"2001:2:0:{2 + k * 10_000 + i:x}::/64" for i in range(n64)]
    ign += [f"2001:2::{k * 10_000 + i + 1:x}/128" for i in range(n128)]
    return list(TRACK), ign


def toml_file(path: Path, n: int, k: int) -> None:
    track, ignore = prefix_lists(n, k)
    lines = [f"# bench/config_bench.py: {n} prefixes, set {k}",
             "track-prefixes = [" + ", ".join(f'"{p}"' for p in track) + "]",
             "ignore-prefixes = ["]
    lines += [f'  "{p}",' for p in ignore]
    lines.append("]")
    path.write_text("\n".join(lines) + "\n")


# ---- worker: one (variant, round) in its own process ------------------------------

def worker_main(a) -> int:
    """Runs with PYTHONPATH = the tree of the variant; prints one JSON object."""
    signal.signal(signal.SIGTERM, _raise_interrupted)
    tree = Path(os.environ["CTBENCH_TREE"]).resolve()
    if a.cpu >= 0:
        os.sched_setaffinity(0, {a.cpu})
    import streamer
    if not Path(streamer.__file__).resolve().is_relative_to(tree):
        raise SystemExit(f"streamer imported from {streamer.__file__}, not from {tree}")
    if str(ROOT) not in sys.path:       # bench/datapath.py would put ROOT first
        sys.path.append(str(ROOT))
    import datapath as bd               # bench/datapath.py (this directory)
    from streamer.datapath import loader
    from streamer.datapath.config import DatapathConfig, Timeouts
    from streamer.datapath.loader import Datapath

    if not Path(loader.BPF_DIR).resolve().is_relative_to(tree):
        raise SystemExit(f"BPF sources from {loader.BPF_DIR}, not from {tree}")
    variant, n = a.worker, PREFIXES[a.worker]
    # --old REV with live configuration already in it: the old tree runs
    # the same code path as new-0 (no prefixes), so the two compare the
    # packet path of two builds.
    new = variant != "old" or (tree / "streamer" / "datapath" / "generation.py").exists()
    problems: list[str] = []
    res: dict = {"variant": variant, "prefixes": n, "tree": str(tree),
                 "streamer": streamer.__file__, "bpf_dir": str(loader.BPF_DIR),
                 "problems": problems}
    pin = a.pin_dir
    base = dict(pin_dir=pin, table_limit=1 << 16)
    if new:
        from streamer.datapath.selection import (SEL_IGNORE, SEL_TRACK, VERDICT_NAMES,
                                                 PrefixSet, Selection)

        def cfg_of(k: int):
            if n == 0:       # nothing to select: the apply changes a timeout
                return DatapathConfig(**base, timeouts=Timeouts(fin=10 + k))
            track, ignore = prefix_lists(n, k)
            return DatapathConfig(**base, selection=Selection(PrefixSet.parse(track=track,
                                                                              ignore=ignore)))
        cfgs = [cfg_of(k).validate() for k in range(3)]
        for c in cfgs:
            for fam_hit in (bd.HIT4, bd.HIT6):
                if c.selection.classify(*fam_hit) != SEL_TRACK:
                    raise SystemExit(f"{variant}: the hit flow {fam_hit} would not be tracked")
        if n and cfgs[0].selection.classify("198.19.1.0", bd.HIT4[1]) != SEL_IGNORE:
            raise SystemExit(f"{variant}: 198.19.1.0 should be ignored by set 0")
    else:
        cfgs = [DatapathConfig(**base, timeouts=Timeouts(fin=10 + k)).validate() for k in range(3)]

    dp = bare_bpf = ring = None
    try:
        t0 = time.monotonic()
        dp = Datapath(cfgs[0]).load()
        res["load_s"] = round(time.monotonic() - t0, 3)
        bare_bpf, bare, _ = bd.load_bare()
        ring = bd.Ring(dp)
        prog = dp.prog_fd("ct_xdp_ingress")
        pkts = {4: bd.establish(dp, 4, ring)[0], 6: bd.establish(dp, 6, ring)[0]}
        res["packet_bytes"] = {"bare": len(pkts[4]), "hit4": len(pkts[4]), "hit6": len(pkts[6])}
        cp, sp = bd.HIT_PORTS

        def hit_pkts(fam: int) -> int:
            c, s = bd.HIT4 if fam == 4 else bd.HIT6
            e = bd.entry(dp, fam, c, s, cp, sp)
            return e["pkts"][0] if e else -1

        def run_case(case: str, repeat: int) -> int:
            fd, fam = (bare, 4) if case == "bare" else (prog, 4 if case == "hit4" else 6)
            s0 = bd.stats(dp)
            e0 = hit_pkts(fam)
            dur = bd.run_batched(fd, pkts[fam], repeat)
            d = bd.stat_delta(s0, bd.stats(dp))
            e1 = hit_pkts(fam)
            if case == "bare":
                want = {"packets": 0}
                grew = 0
            else:
                want = {"packets": repeat, "created": 0, "ignored_packets": 0}
                grew = repeat
            for k, v in want.items():
                if d.get(k, 0) != v:
                    problems.append(f"{case}: stat {k} moved by {d.get(k, 0)}, expected {v}")
            for k in ("invalid", "untracked_packets", "table_full", "destroyed"):
                if d.get(k, 0):
                    problems.append(f"{case}: stat {k} moved by {d[k]}")
            if e1 - e0 != grew:
                problems.append(f"{case}: the flow's original-direction packets grew by "
                                f"{e1 - e0}, expected {grew}")
            return dur

        cases = ["bare", "hit4", "hit6"]
        batched = {c: [] for c in cases}
        for rep in range(a.reps):
            order = cases[rep % 3:] + cases[:rep % 3]
            for c in order:
                batched[c].append(run_case(c, a.repeat))
        ring.drain()
        res["batched"] = batched
        log(f"    {variant}: load {res['load_s']:.1f} s; bare {batched['bare']}, "
            f"hit4 {batched['hit4']}, hit6 {batched['hit6']} ns")

        # The selection is really in the kernel: a SYN from an ignored
        # address is passed as ignored (new-100, new-10k), else tracked.
        for fam, src in ((4, "198.19.1.0"), (6, "2001:2::1")):
            dst = bd.HIT4[1] if fam == 4 else bd.HIT6[1]
            s0 = bd.stats(dp)
            rv, _, _ = bd.bpfsys.test_run(prog, bd.tcp_packet(fam, src, dst, 40001, 80, "S"), 1)
            d = bd.stat_delta(s0, bd.stats(dp))
            want = {"ignored_packets": 1, "created": 0} if n else {"created": 1}
            got = {k: d.get(k, 0) for k in want}
            if rv != bd.XDP_PASS or got != want:
                problems.append(f"IPv{fam} SYN from {src}: rv {rv}, {got}, expected {want}")
        ring.drain()

        # Apply latency in process: configure() with the three sets in turn.
        samples = a.apply_samples
        if new:
            gens = dp.generations
            orig_wait = gens.wait_for_programs
            barrier = []
            for _ in range(a.barrier_samples):
                t = time.perf_counter_ns()
                orig_wait()
                barrier.append((time.perf_counter_ns() - t) / 1e6)
            waits: list[int] = []

            def timed_wait():
                t = time.perf_counter_ns()
                orig_wait()
                waits.append(time.perf_counter_ns() - t)

            gens.wait_for_programs = timed_wait
            total, waited = [], []
            gen = dp.generation
            try:
                for i in range(1, samples + 1):
                    dp.cfg = cfgs[i % 3]
                    waits.clear()
                    t = time.perf_counter_ns()
                    g = dp.configure()
                    total.append((time.perf_counter_ns() - t) / 1e6)
                    waited.append(sum(waits) / 1e6)
                    if g != gen + 1:
                        problems.append(f"apply {i}: generation {g}, expected {gen + 1}")
                    gen = g
            finally:
                gens.wait_for_programs = orig_wait
            f = gens.in_force()
            last = cfgs[samples % 3]
            want_sel = ({str(p): VERDICT_NAMES[v] for p, v in last.selection.effective().items()}
                        if n else {})
            if f.generation != gen or f.selection.get(0, {}) != want_sel:
                problems.append(f"after the applies: generation {f.generation} (expected {gen}), "
                                f"{len(f.selection.get(0, {}))} entries in force "
                                f"(expected {len(want_sel)})")
            if f.config["timeout_ns"] != last.timeouts.as_ns():
                problems.append("after the applies: the timeouts in force are not the last set's")
            res["apply"] = {"total_ms": total, "wait_ms": waited, "barrier_ms": barrier,
                            "generation_at_end": gen}
        else:
            total = []
            for i in range(1, samples + 1):   # a8dc806: one write of ct_config
                dp.cfg = cfgs[i % 3]
                t = time.perf_counter_ns()
                dp.configure()
                total.append((time.perf_counter_ns() - t) / 1e6)
            res["apply"] = {"total_ms": total}
        # The hit flow is still tracked under the set now in force.
        after = run_case("hit4", 1000)
        res["hit4_after_applies_ns"] = after
        res["stats"] = {k: v for k, v in bd.stats(dp).items() if v}
        return_code = 0
    finally:
        if ring is not None:
            ring.close()
        if bare_bpf is not None:
            bare_bpf.cleanup()
        if dp is not None:
            dp.close()
        shutil.rmtree(pin, ignore_errors=True)
    print(json.dumps(res))
    return return_code


# ---- the parent: worktrees, workers, the daemon, the report ------------------------

class Bench:
    def __init__(self, a, p: dict):
        self.a = a
        self.p = p
        self.pid = os.getpid()
        self.worktrees: list[str] = []
        self.worker: subprocess.Popen | None = None
        self.serial = 0
        self.problems: list[str] = []
        self.truncated: list[str] = []

    # -- cleanup of what this bench (or a dead one) made --
    def pin(self, name: str) -> str:
        return f"/sys/fs/bpf/{PIN_PREFIX}{self.pid}_{name}"

    @staticmethod
    def cleanup_stale() -> None:
        for path in glob.glob(f"/sys/fs/bpf/{PIN_PREFIX}*"):
            m = re.match(rf"/sys/fs/bpf/{PIN_PREFIX}(\d+)_", path)
            if m and not pid_alive(int(m.group(1))):
                log(f"removing stale pin dir {path}")
                _remove_pin_dir(path)
        out = _git("worktree", "list", "--porcelain", check=False).stdout
        for line in out.splitlines():
            if line.startswith("worktree "):
                path = line.split(" ", 1)[1]
                m = WORKTREE_RX.match(path)
                if m and not pid_alive(int(m.group(2))):
                    log(f"removing stale worktree {path}")
                    _git("worktree", "remove", "--force", path, check=False)
        _git("worktree", "prune", check=False)

    def stop_worker(self) -> None:
        """SIGTERM the running worker (its own session: Ctrl-C reaches only
        this process), which then closes its datapath and removes its pins."""
        w, self.worker = self.worker, None
        if w is None or w.poll() is not None:
            return
        w.terminate()
        try:
            w.wait(timeout=15)
        except subprocess.TimeoutExpired:
            w.kill()
            w.wait(timeout=10)

    def cleanup(self) -> None:
        self.stop_worker()
        for path in glob.glob(f"/sys/fs/bpf/{PIN_PREFIX}{self.pid}_*"):
            _remove_pin_dir(path)
        for wt in self.worktrees:
            cp = _git("worktree", "remove", "--force", wt, check=False)
            if cp.returncode != 0:
                log(f"git worktree remove {wt}: {cp.stderr.strip()}")
                shutil.rmtree(wt, ignore_errors=True)
        self.worktrees.clear()
        _git("worktree", "prune", check=False)

    def add_worktree(self, kind: str, rev: str) -> tuple[str, str]:
        path = f"/tmp/ctbench-{kind}-{self.pid}"
        commit = _git("rev-parse", "--verify", f"{rev}^{{commit}}").stdout.strip()
        self.worktrees.append(path)
        _git("worktree", "add", "--detach", path, commit)
        return path, commit

    # -- workers --
    def run_worker(self, variant: str, tree: str) -> dict:
        self.serial += 1
        pin = self.pin(f"w{self.serial}")
        env = _tree_env(tree)
        argv = [sys.executable, str(Path(__file__).resolve()), "--worker", variant,
                "--pin-dir", pin, "--cpu", str(self.cpu), "--repeat", str(self.p["repeat"]),
                "--reps", str(self.p["reps"]),
                "--apply-samples", str(self.p["apply_samples"][PREFIXES[variant]]),
                "--barrier-samples", str(self.p["barrier_samples"])]
        t0 = time.monotonic()
        self.worker = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                       env=env, start_new_session=True)
        try:
            out, _ = self.worker.communicate(timeout=WORKER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.worker.kill()
            self.worker.communicate(timeout=10)
            raise RuntimeError(f"worker {variant} did not finish within {WORKER_TIMEOUT_S} s")
        finally:
            rc = self.worker.returncode
            self.stop_worker()              # still running: interrupted
            _remove_pin_dir(pin)
        if rc != 0:
            raise RuntimeError(f"worker {variant} failed (exit {rc})")
        res = json.loads(out.decode().strip().splitlines()[-1])
        res["wall_s"] = round(time.monotonic() - t0, 2)
        return res

    def packet_phase(self, trees: dict[str, str], deadline: float) -> list[dict]:
        rounds = []
        for r in range(self.p["rounds"]):
            if rounds:
                per_round = max(sum(w["wall_s"] for w in rr.values()) for rr in rounds)
                if time.monotonic() + per_round > deadline:
                    self.truncated.append(f"packet path: {len(rounds)} of {self.p['rounds']} "
                                          "rounds (time limit)")
                    break
            order = list(VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)])
            log(f"  round {r + 1}/{self.p['rounds']}: {', '.join(order)}")
            rr = {}
            for v in order:
                rr[v] = self.run_worker(v, trees["old" if v == "old" else "new"])
                self.problems += [f"{v} round {r + 1}: {x}" for x in rr[v]["problems"]]
            rounds.append(rr)
        return rounds

    # -- end to end through the CLI --
    def e2e_phase(self, tree: str, deadline: float) -> dict:
        """A `ctstream events` daemon (the new tree) on a veth pair; timed
        applies of 100 and 10,000 prefixes, rounds rotated."""
        if tree not in sys.path:
            sys.path.insert(0, tree)
        import streamer
        from streamer.control.server import control_path
        from streamer.demo import testbed

        if not Path(streamer.__file__).resolve().is_relative_to(Path(tree).resolve()):
            raise RuntimeError(f"streamer imported from {streamer.__file__}, not from {tree}")
        self.env = _tree_env(tree)
        self.cli = str(Path(sys.executable).with_name("ctstream"))
        pin = self.pin("e2e")
        tmp = Path(tempfile.mkdtemp(prefix="ctsbcfg-"))
        self.daemon = None
        res: dict = {"pin_dir": pin, "samples": {}}
        try:
            files = {}
            for n in E2E_SIZES:
                files[n] = []
                for k in range(3):
                    f = tmp / f"p{n}-{k}.toml"
                    toml_file(f, n, k)
                    files[n].append(f)
            res["file_bytes"] = {n: files[n][0].stat().st_size for n in E2E_SIZES}
            with testbed.make_pair(prefix=NS_PREFIX, offloads=False, conntrack=False,
                                   index=PAIR_INDEX) as pair:
                try:
                    self._start_daemon(pair, pin, files[E2E_SIZES[0]][2], tmp, res)
                    self._e2e_rounds(pin, files, deadline, res)
                    t0 = time.monotonic()
                    rc = self.stop_daemon()
                    res["daemon_stop_s"] = round(time.monotonic() - t0, 2)
                    res["daemon_log_bytes"] = (tmp / "events.err").stat().st_size
                    if rc != 0:
                        self.problems.append(f"e2e: ctstream events exited {rc} on SIGTERM: "
                                             + (tmp / "events.err").read_text()[-500:])
                finally:
                    self.stop_daemon()       # before the namespaces go
        finally:
            self.stop_daemon()
            if os.path.exists(pin) or any(Path(f).exists() for f in _state_files(pin)):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    cp = self.ctstream("detach", "--pin-dir", pin, timeout=30)
                    if cp.returncode != 0:
                        log(f"ctstream detach: {cp.stderr.strip()[-300:]}")
            _remove_pin_dir(pin)
            with contextlib.suppress(Exception):
                control_path(pin).unlink(missing_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        return res

    def ctstream(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([self.cli, *args], capture_output=True, text=True, env=self.env,
                              stdin=subprocess.DEVNULL, timeout=timeout)

    def stop_daemon(self) -> int | None:
        """SIGTERM the daemon, wait for it (SIGKILL after 30 s); its exit code."""
        d, self.daemon = getattr(self, "daemon", None), None
        if d is None:
            return None
        if d.poll() is None:
            d.send_signal(signal.SIGTERM)
            try:
                d.wait(timeout=30)
            except subprocess.TimeoutExpired:
                d.kill()
                d.wait(timeout=10)
        return d.returncode

    def _start_daemon(self, pair, pin: str, config: Path, tmp: Path, res: dict) -> None:
        """`ctstream events` on the server's veth (as tests/netns/test_live_config.py
        starts it); its output goes to files (a 10,000-prefix apply logs
        hundreds of KiB: a pipe nobody reads would stop it)."""
        err_path = tmp / "events.err"
        argv = [self.cli, "events", "-n", pair.server.netns, "-i", pair.server.ifname,
                "--egress", "-o", "json", "--pin-dir", pin, "--config", str(config)]
        t0 = time.monotonic()
        with open(err_path, "wb") as err, open(tmp / "events.out", "wb") as out:
            self.daemon = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                           env=self.env, start_new_session=True)
        while b"tracking on" not in err_path.read_bytes():
            if self.daemon.poll() is not None:
                raise RuntimeError(f"ctstream events exited ({self.daemon.returncode}): "
                                   + err_path.read_text()[-2000:])
            if time.monotonic() - t0 > 60:
                raise RuntimeError("ctstream events not attached after 60 s")
            time.sleep(0.05)
        res["daemon_start_s"] = round(time.monotonic() - t0, 2)
        log(f"  daemon attached in {res['daemon_start_s']:.1f} s "
            f"({pair.server.netns}/{pair.server.ifname})")

    def _e2e_rounds(self, pin: str, files: dict, deadline: float, res: dict) -> None:
        from streamer.control.server import request

        gen = request(pin, {"op": "generation"})["generation"]
        turn = {n: 0 for n in E2E_SIZES}
        samples = {n: {"cli_ms": [], "direct_ms": [], "check_ms": [], "cli_stdout_bytes": []}
                   for n in E2E_SIZES}
        res["samples"] = samples
        last_n = None

        def next_file(n: int) -> Path:
            f = files[n][turn[n] % 3]
            turn[n] += 1
            return f

        def direct(n: int) -> float:
            """The daemon's side: one control-socket request, as the CLI sends it."""
            nonlocal gen
            f = next_file(n)
            t = time.perf_counter_ns()
            reply = request(pin, {"op": "apply", "path": str(f)})
            ms = (time.perf_counter_ns() - t) / 1e6
            if not reply.get("ok") or reply.get("generation") != gen + 1:
                raise RuntimeError(f"apply {f.name}: {str(reply)[:500]}")
            gen += 1
            return ms

        for r in range(self.p["e2e_rounds"]):
            if time.monotonic() > deadline:
                self.truncated.append(f"end to end: {r} of {self.p['e2e_rounds']} rounds "
                                      "(time limit)")
                break
            order = E2E_SIZES[r % 2:] + E2E_SIZES[:r % 2]
            for n in order:
                s = samples[n]
                # Both slots get a set of this size first, so that each timed
                # apply replaces n prefixes with n others.
                direct(n)
                direct(n)
                f = next_file(n)
                t = time.perf_counter_ns()
                cp = self.ctstream("config", "apply", str(f), "--pin-dir", pin)
                ms = (time.perf_counter_ns() - t) / 1e6
                lines = cp.stdout.strip().splitlines()
                if cp.returncode != 0 or not lines or lines[-1] != f"generation {gen + 1} in force":
                    raise RuntimeError(f"ctstream config apply {f.name}: rc {cp.returncode}, "
                                       f"{(lines or [''])[-1][:200]!r} {cp.stderr[-500:]}")
                gen += 1
                s["cli_ms"].append(ms)
                s["cli_stdout_bytes"].append(len(cp.stdout))
                s["direct_ms"].append(direct(n))
                last_n = n
                # The client's side: the same checks of the file, no daemon.
                f = next_file(n)
                t = time.perf_counter_ns()
                cp = self.ctstream("config", "check", str(f))
                s["check_ms"].append((time.perf_counter_ns() - t) / 1e6)
                if cp.returncode != 0:
                    raise RuntimeError(f"ctstream config check {f.name}: {cp.stderr[-500:]}")
            log(f"  e2e round {r + 1}/{self.p['e2e_rounds']}: "
                + "; ".join(f"{n}: cli {samples[n]['cli_ms'][-1]:.0f} ms, direct "
                            f"{samples[n]['direct_ms'][-1]:.0f} ms, check "
                            f"{samples[n]['check_ms'][-1]:.0f} ms" for n in order))
        # What the kernel uses now is the last file applied.
        cp = self.ctstream("config", "show", "--pin-dir", pin, "-o", "json")
        if cp.returncode != 0:
            self.problems.append(f"e2e: config show failed: {cp.stderr[-300:]}")
            return
        shown = json.loads(cp.stdout)
        top = shown["selection"]["sets"].get("0", {})
        nshown = len(top.get("track-prefixes", [])) + len(top.get("ignore-prefixes", []))
        res["in_force_at_end"] = {"generation": shown["generation"], "prefixes": nshown}
        if shown["generation"] != gen or (last_n is not None and nshown != last_n):
            self.problems.append(f"e2e: in force at the end: generation {shown['generation']} "
                                 f"with {nshown} prefixes, expected {gen} with {last_n}")


def _git(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    cp = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                        stdin=subprocess.DEVNULL, timeout=60)
    if check and cp.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)}: {cp.stderr.strip()}")
    return cp


def _tree_env(tree: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CTSTREAM_BPF_DIR")}
    env["PYTHONPATH"] = tree
    env["CTBENCH_TREE"] = tree
    return env


def _state_files(pin: str) -> list[str]:
    stem = "/run/ctstream/" + pin.strip("/").replace("/", "_")
    return [stem + s for s in (".json", ".lock", ".ctl")]


def _remove_pin_dir(pin: str) -> None:
    shutil.rmtree(pin, ignore_errors=True)
    for f in _state_files(pin):
        with contextlib.suppress(OSError):
            os.unlink(f)


# ---- summaries and the report ------------------------------------------------------

def spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))]


def summarize(rounds: list[dict], e2e: dict | None) -> dict:
    out: dict = {"packet_path": {}, "apply_in_process": {}, "end_to_end": {}}
    for v in VARIANTS:
        per = [rr[v] for rr in rounds if v in rr]
        if not per:
            continue
        row = {}
        for case in ("bare", "hit4", "hit6"):
            vals = [statistics.median(w["batched"][case]) for w in per]
            row[case] = spread(vals)
            if case != "bare":
                row[case + "_minus_bare"] = spread(
                    [statistics.median(w["batched"][case]) - statistics.median(w["batched"]["bare"])
                     for w in per])
                if v != "old":
                    row[case + "_vs_old"] = spread(
                        [statistics.median(rr[v]["batched"][case])
                         - statistics.median(rr["old"]["batched"][case]) for rr in rounds
                         if v in rr and "old" in rr])
        row["load_s"] = spread([w["load_s"] for w in per])
        out["packet_path"][v] = row
        tot = [x for w in per for x in w["apply"]["total_ms"]]
        ap = {"samples": len(tot), "median": statistics.median(tot), "p99": pct(tot, 0.99),
              "min": min(tot), "max": max(tot),
              "round_medians": spread([statistics.median(w["apply"]["total_ms"]) for w in per])}
        if "wait_ms" in per[0]["apply"]:
            waits = [x for w in per for x in w["apply"]["wait_ms"]]
            rest = [t - x for w in per
                    for t, x in zip(w["apply"]["total_ms"], w["apply"]["wait_ms"])]
            ap["wait_median"] = statistics.median(waits)
            ap["rest_median"] = statistics.median(rest)
            ap["rest_p99"] = pct(rest, 0.99)
            ap["barrier"] = spread([x for w in per for x in w["apply"]["barrier_ms"]])
        out["apply_in_process"][v] = ap
    if e2e and e2e.get("samples"):
        for n, s in e2e["samples"].items():
            if not s["cli_ms"]:
                continue
            out["end_to_end"][n] = {k: spread(s[k]) | {"p99": pct(s[k], 0.99)}
                                    for k in ("cli_ms", "direct_ms", "check_ms")}
            out["end_to_end"][n]["file_bytes"] = e2e["file_bytes"][n]
            out["end_to_end"][n]["cli_stdout_bytes"] = statistics.median(s["cli_stdout_bytes"])
    return out


def _mm(d: dict, fmt: str = "{:.0f}") -> str:
    return f"{fmt.format(d['median'])} ({fmt.format(d['min'])}..{fmt.format(d['max'])})"


def _signed(d: dict) -> str:
    def one(x: float) -> str:
        return f"{round(x):+d}"     # no "-0"
    return f"{one(d['median'])} ({one(d['min'])}..{one(d['max'])})"


def table(res: dict) -> str:
    s = res["summary"]
    m = res["machine"]
    p = res["params"]
    L = []
    L.append(f"ctstream live configuration benchmark: kernel {m['kernel']}, {m['cpus']} CPUs "
             f"({m['cpu_model']}), workers pinned to CPU {m['pinned_cpu']}, load average "
             f"{m['loadavg_start']} at the start, {m['loadavg_end']} at the end")
    old = res["trees"]["old"]["commit"][:7]
    what = "before live configuration" if OLD_REV.startswith(old) or old.startswith(OLD_REV) \
        else "with live configuration: new-0's code path"
    L.append(f"old = {old} ({what}), "
             f"new = {res['trees']['new']['commit'][:7]}{res['trees']['new']['note']}; "
             f"{res['rounds_done']} rounds, variants rotated each round, one worker process "
             "per (variant, round)")
    L.append("")
    L.append(f"1. packet path: ct_xdp_ingress on an established TCP flow, original direction "
             f"(IPv4 64 bytes, IPv6 84), ns per packet as BPF_PROG_TEST_RUN reports it "
             f"(repeat={p['repeat']}, median of {p['reps']} runs per worker); median (min..max) "
             "over rounds; vs old: paired with old's figure of the same round")
    hdr = (f"{'variant':9} {'prefixes':>8} {'bare':>12} {'hit IPv4':>14} {'-bare':>6} "
           f"{'vs old':>16} {'hit IPv6':>14} {'-bare':>6} {'vs old':>16}")
    L.append(hdr)
    for v, row in s["packet_path"].items():
        n = PREFIXES[v]
        cells = [f"{v:9}", f"{('-' if v == 'old' else n):>8}", f"{_mm(row['bare']):>12}"]
        for case in ("hit4", "hit6"):
            cells.append(f"{_mm(row[case]):>14}")
            cells.append(f"{row[case + '_minus_bare']['median']:>6.0f}")
            cells.append(f"{(_signed(row[case + '_vs_old']) if v != 'old' else '-'):>16}")
        L.append(" ".join(cells))
    L.append("")
    L.append("2a. apply in process: wall time of Datapath.configure() (= Generations.apply), ms; "
             "three sets of the same size in turn, so every apply rewrites its slot")
    L.append(f"{'':26} {'samples':>7} {'median':>8} {'p99':>8} {'min..max':>15} "
             f"{'round medians':>19} {'RCU waits':>9} {'rest':>7} {'rest p99':>8}")
    for v, ap in s["apply_in_process"].items():
        label = ("old: 1 ct_config write" if v == "old"
                 else f"new, {PREFIXES[v]} prefixes" if PREFIXES[v] else "new, 0 (a timeout)")
        cells = [f"{label:26}", f"{ap['samples']:>7}", f"{ap['median']:>8.2f}",
                 f"{ap['p99']:>8.2f}",
                 f"{ap['min']:.2f}..{ap['max']:.2f}".rjust(15),
                 _mm(ap["round_medians"], "{:.2f}").rjust(19)]
        if "wait_median" in ap:
            cells += [f"{ap['wait_median']:>9.2f}", f"{ap['rest_median']:>7.2f}",
                      f"{ap['rest_p99']:>8.2f}"]
        L.append(" ".join(cells))
    bars = [ap["barrier"] for ap in s["apply_in_process"].values() if "barrier" in ap]
    if bars:
        L.append(f"one ProgramsBarrier.wait() alone (a map-in-map update: an RCU grace period): "
                 f"median {statistics.median([b['median'] for b in bars]):.2f} ms, "
                 f"{min(b['min'] for b in bars):.2f}..{max(b['max'] for b in bars):.2f} over "
                 f"{sum(b['n'] for b in bars)} samples; an apply waits twice")
    e = s["end_to_end"]
    if e:
        L.append("")
        L.append("2b. end to end: `ctstream config apply FILE` against a running `ctstream events` "
                 "(veth pair), subprocess start to exit, ms; median (min..max), p99")
        L.append(f"{'prefixes':>8} {'file KiB':>8} {'CLI apply':>24} {'daemon side':>24} "
                 f"{'client side':>24}   CLI output")
        for n, row in e.items():
            cells = [f"{n:>8}", f"{row['file_bytes'] / 1024:>8.1f}"]
            for k in ("cli_ms", "direct_ms", "check_ms"):
                cells.append(f"{_mm(row[k])} p99 {row[k]['p99']:.0f}".rjust(24))
            cells.append(f"  {row['cli_stdout_bytes'] / 1024:.0f} KiB")
            L.append(" ".join(cells))
        n_samples = next(iter(e.values()))["cli_ms"]["n"]
        L.append(f"{n_samples} samples each. daemon side: one control-socket request from this "
                 "process (the daemon's settings.build, the apply, the reply); client side: "
                 "`ctstream config check FILE` (interpreter start, imports, the file's checks)")
    L.append("")
    if res["problems"]:
        L.append("PROBLEMS:")
        L += [f"  {x}" for x in res["problems"]]
    else:
        L.append("checks: every hit run counted exactly its packets on the flow's entry "
                 "(no create, nothing ignored or untracked), the selection was in the kernel "
                 "(a SYN from an ignored address ignored), every apply raised the generation "
                 "by one and the last set was read back")
    for t in res["truncated"]:
        L.append(f"TRUNCATED: {t}")
    L.append(f"total time {res['elapsed_s']:.0f} s; command: {res['command']}")
    return "\n".join(L)


def machine(cpu: int | None) -> dict:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"kernel": os.uname().release, "cpus": os.cpu_count(), "cpu_model": model,
            "pinned_cpu": cpu if cpu is not None else "none",
            "loadavg_start": Path("/proc/loadavg").read_text().split()[0]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="3 rounds, fewer packets and applies (about 65 s; full: 2.5 min)")
    ap.add_argument("--rounds", type=int, help="packet-path rounds (5; quick 3)")
    ap.add_argument("--e2e-rounds", type=int,
                    help="end-to-end rounds, one CLI apply per size each (10; quick 3; 0 skips)")
    ap.add_argument("--old", default=OLD_REV,
                    help=f"the old code: a commit ({OLD_REV}, before live configuration, by "
                         "default; a later one runs new-0's code path)")
    ap.add_argument("--new", default="HEAD",
                    help="the new code: a revision, checked out in a temporary worktree "
                         "(default HEAD), or 'worktree' for this checkout as it is")
    ap.add_argument("--cpu", type=int, default=-2,
                    help="CPU to pin the workers to (default: the last one allowed; -1: none)")
    ap.add_argument("--time-limit", type=float, help="seconds (290; quick 88): past it, "
                    "the bench stops measuring, reports what it has and exits 1")
    ap.add_argument("--out", help="the JSON file (default bench/results/config-<timestamp>.json)")
    # worker mode (internal)
    ap.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--pin-dir", help=argparse.SUPPRESS)
    ap.add_argument("--repeat", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--reps", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--apply-samples", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--barrier-samples", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        try:
            return worker_main(a)
        except Interrupted:             # the parent stops it: its cleanup has run
            return 143

    if os.geteuid() != 0:
        log("bench needs root (BPF_PROG_TEST_RUN, bpffs, network namespaces): run it with sudo")
        return 2
    p = dict(QUICK if a.quick else FULL)
    p["apply_samples"] = dict(p["apply_samples"])
    if a.rounds is not None:
        p["rounds"] = a.rounds
    if a.e2e_rounds is not None:
        p["e2e_rounds"] = a.e2e_rounds
    if a.time_limit is not None:
        p["time_limit"] = a.time_limit
    if p["rounds"] < 1 or p["e2e_rounds"] < 0:
        ap.error("--rounds must be positive, --e2e-rounds not negative")

    start = time.monotonic()
    deadline = start + p["time_limit"]
    signal.signal(signal.SIGTERM, _raise_interrupted)
    b = Bench(a, p)
    cpu = None
    if a.cpu != -1:
        allowed = sorted(os.sched_getaffinity(0))
        cpu = allowed[-1] if a.cpu == -2 else a.cpu
    b.cpu = -1 if cpu is None else cpu
    res: dict = {"params": p, "machine": machine(cpu), "quick": a.quick,
                 "command": " ".join(["sudo", ".venv/bin/python", "bench/config_bench.py"]
                                     + sys.argv[1:]),
                 "trees": {}, "prefix_sets": {}}
    for n in sorted(set(PREFIXES.values()) | set(E2E_SIZES)):
        t, i = prefix_lists(n, 0)
        res["prefix_sets"][n] = {"track": t, "ignore": len(i), "ignore_first": i[:4]}
    rounds: list[dict] = []
    e2e = None
    status = 0
    try:
        b.cleanup_stale()
        log(f"worktree of {a.old} (old) ...")
        old_tree, old_commit = b.add_worktree("old", a.old)
        res["trees"]["old"] = {"path": old_tree, "commit": old_commit, "note": ""}
        if a.new == "worktree":
            dirty = _git("status", "--short", check=False).stdout.splitlines()
            new_commit = _git("rev-parse", "HEAD").stdout.strip()
            res["trees"]["new"] = {"path": str(ROOT), "commit": new_commit, "dirty": dirty,
                                   "note": f" + this checkout's changes ({len(dirty)} files)"
                                   if dirty else ""}
            new_tree = str(ROOT)
        else:
            new_tree, new_commit = b.add_worktree("new", a.new)
            res["trees"]["new"] = {"path": new_tree, "commit": new_commit,
                                   "note": f" ({a.new})" if a.new != "HEAD" else " (HEAD)"}
        trees = {"old": old_tree, "new": new_tree}
        log(f"packet path and in-process applies: {p['rounds']} rounds of "
            f"{', '.join(VARIANTS)}, repeat={p['repeat']}")
        e2e_reserve = E2E_SETUP_S + E2E_ROUND_S * p["e2e_rounds"] if p["e2e_rounds"] else 5
        rounds = b.packet_phase(trees, deadline - e2e_reserve)
        if p["e2e_rounds"]:
            log(f"end to end: {p['e2e_rounds']} rounds of `ctstream config apply` with "
                f"{' and '.join(map(str, E2E_SIZES))} prefixes")
            e2e = b.e2e_phase(new_tree, deadline - 12)
    except (KeyboardInterrupt, Interrupted) as exc:
        log(f"interrupted ({exc.__class__.__name__}): cleaning up")
        b.problems.append("interrupted")
        status = 130
    except Exception as exc:
        log(f"error: {exc}")
        b.problems.append(f"error: {exc}")
        status = 1
    finally:
        b.cleanup()
    res["machine"]["loadavg_end"] = Path("/proc/loadavg").read_text().split()[0]
    res["rounds"] = rounds
    res["rounds_done"] = len(rounds)
    res["end_to_end_raw"] = e2e
    res["problems"] = b.problems
    res["truncated"] = b.truncated
    res["elapsed_s"] = round(time.monotonic() - start, 1)
    if rounds and "old" in rounds[0]:
        res["summary"] = summarize(rounds, e2e)
    out = Path(a.out) if a.out else HERE / "results" / time.strftime("config-%Y%m%d-%H%M%S.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=str) + "\n")
    if "summary" in res:
        print(table(res))
    log(f"JSON: {out}")
    if status:
        return status
    return 1 if (b.problems or b.truncated) else 0


if __name__ == "__main__":
    sys.exit(main())
