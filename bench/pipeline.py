"""End-to-end benchmark of `ctstream run`: kernel table -> event ring -> the
daemon -> Kafka (idempotent, acks=all) -> DESTROY acked back to the kernel.

    sudo .venv/bin/python bench/pipeline.py                       # about 2 min
    sudo .venv/bin/python bench/pipeline.py --flows 200000 --variants default,no-archive

What runs: a private single-node broker (scripts/kafka.sh, a temporary
directory, a free loopback port; always stopped), a topic of --partitions
partitions, a test-bed namespace pair whose server side `ctstream run`
attaches to (a subprocess, exactly as a user starts it), and the flows.

The flows come from bench/table_fill.c, compiled against the daemon's pinned
maps and run with BPF_PROG_TEST_RUN: each run goes through ct_handle(), the
datapath's own create path, so every flow is a real table entry with a real
CREATE event in the daemon's ring. The fill keeps at most the ring, less 1 MiB,
ahead of the daemon's reader (ring positions read through the ring's mmap),
so no event is dropped for want of ring space; the ring is sized to hold
every CREATE, so the fill takes a fraction of a second and the flows expire
together. After --timeout-udp seconds
the daemon's own sweeper expires the flows: each DESTROY goes through the
ring, into a Kafka record, is acknowledged by the broker and only then acked
to the kernel, which frees the entry. That is the guarantee, on.

Reported per variant (extra `ctstream run` options, side by side in one run):
  create rec/s     CREATE records per second of the fill phase (the daemon
                   keeping up with the fill, paced by the ring)
  destroy acked/s  DESTROYs per second from the first expiry to an empty
                   table (entries and outbox 0): every one acknowledged by
                   Kafka and acked to the kernel
  steady/s         the same rate between the entries falling to 90 % and to
                   10 % of the flows: without the phase's first sweeper tick
                   and its last round trip (the sustained rate)
  daemon s/100k    the daemon process's CPU seconds (user + system) per 100k
                   records over the destroy phase
  broker s/100k    the broker JVM's, same phase
  other CPU s      CPU the rest of the machine used in that phase
The topic's end offsets are checked against 2 x flows (plus LOST records).
JSON goes to bench/results/pipeline.json (--json elsewhere).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import mmap
import os
import platform
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from kafka_produce import (broker_pids, cpu_machine, cpu_of, end_offsets,  # noqa: E402
                           free_port_pair, kafka_sh)
from table_scale import DST_FILL, EVENT_REC, TC_ACT_OK, fill_source, flow_frame  # noqa: E402

from streamer.datapath import bpfsys
from streamer import testbed  # noqa: E402
from streamer.cli import load_config  # noqa: E402
from streamer.datapath.table import PinnedTable  # noqa: E402

CTSTREAM = str(ROOT / ".venv" / "bin" / "ctstream")
NODE = "gw-bench-01"
VARIANTS = {
    "default": [],
    "no-archive": ["--archive-max", "0"],
    "gzip": ["--kafka-compression", "gzip"],
    "lz4": ["--kafka-compression", "lz4"],
    "zstd": ["--kafka-compression", "zstd"],
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Failed(Exception):
    pass


class RingPositions:
    """The ring's consumer and producer positions, read-only, through its
    mmap pages (the same pages libbpf's consumer in the daemon uses)."""

    def __init__(self, fd: int):
        page = mmap.PAGESIZE
        self.cons = mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ, offset=0)
        self.prod = mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)

    def unread(self) -> int:
        return struct.unpack_from("<Q", self.prod, 0)[0] - struct.unpack_from("<Q", self.cons, 0)[0]

    def close(self) -> None:
        self.cons.close()
        self.prod.close()


class Filler:
    """bench/table_fill.c opened on the daemon's pinned maps."""

    def __init__(self, run_argv: list[str]):
        from bcc import BPF
        from streamer.datapath.loader import cflags

        self.cfg = load_config(run_argv).datapath
        self.bpf = BPF(text=fill_source(), cflags=cflags(self.cfg))
        self.fd = self.bpf.load_func("ct_bench_fill", BPF.SCHED_CLS).fd
        self.ctl = self.bpf["fill_ctl"].map_fd
        self.frame = flow_frame(DST_FILL, 53, "udp")

    def create(self, first: int, n: int) -> None:
        bpfsys.map_update(self.ctl, b"\0" * 4, struct.pack("<QIIII", 0, 0, first, 0, 0))
        rv, _, _ = bpfsys.test_run(self.fd, self.frame, n)
        if rv != TC_ACT_OK:
            raise Failed(f"fill program returned {rv}")

    def close(self) -> None:
        self.bpf.cleanup()


def read_status(pin: str) -> dict | None:
    path = Path("/run/ctstream") / (pin.strip("/").replace("/", "_") + ".status.json")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def wait(what: str, predicate, timeout: float, proc: subprocess.Popen, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        v = predicate()
        if v:
            return v
        if proc.poll() is not None:
            raise Failed(f"{what}: the daemon exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise Failed(f"{what}: not within {timeout:g} s")
        time.sleep(interval)


def run_variant(args, name: str, extra: list[str], pair, bootstrap: str, broker_pid: int,
                workdir: Path) -> dict:
    topic = f"ctstream.pipe.{workdir.name}"   # one topic per run: the end offsets count it
    made = kafka_sh("topic", "create", topic, "--partitions", str(args.partitions),
                    "--dir", str(args.dir))
    if made.returncode != 0:
        raise Failed(f"topic create failed: {made.stderr.strip()}")
    workdir.mkdir(parents=True, exist_ok=True)
    pin = f"/sys/fs/bpf/ctsbench_pipe_{name.replace('-', '_')}"
    run_argv = ["run", "-n", pair.server.netns, "-i", pair.server.ifname, "--pin-dir", pin,
                "--kafka", bootstrap, "--topic", topic, "--node-id", NODE,
                "--spool", str(workdir / f"spool-{name}"),
                "--timeout-udp", str(args.timeout_udp), "--report-interval", "0",
                "--ring-size", str(args.ring_mb << 20), "--table-size", str(max(args.flows * 2, 1 << 16)),
                "--lost-interval", "0", "--detach-on-stop", *extra]
    logf = open(workdir / f"daemon-{name}.log", "w")
    proc = subprocess.Popen([CTSTREAM, *run_argv], stdout=logf, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        return _measure(args, name, extra, run_argv, proc, pin, topic, bootstrap, broker_pid,
                        workdir, logf)
    except Failed as exc:
        logf.flush()
        tail = (workdir / f"daemon-{name}.log").read_text()[-3000:]
        raise Failed(f"{exc}\n--- the daemon's log (tail):\n{tail}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        logf.close()
        subprocess.run([CTSTREAM, "detach", "--pin-dir", pin], capture_output=True)


def _measure(args, name, extra, run_argv, proc, pin, topic, bootstrap, broker_pid, workdir,
             logf) -> dict:
    filler = ring = table = None
    try:
        wait("the daemon's first status", lambda: read_status(pin), 60, proc, 0.1)
        st = wait("Kafka connected", lambda: (read_status(pin) or {}).get("kafka_connected"),
                  30, proc, 0.1)
        table = PinnedTable(pin)
        ring = RingPositions(table.fd("ct_events"))
        filler = Filler(run_argv)
        spy = None
        if args.py_spy:
            # Sampling profile of the daemon over both phases (collapsed stacks).
            spy = subprocess.Popen([str(ROOT / ".venv" / "bin" / "py-spy"), "record", "--pid",
                                    str(proc.pid), "--format", "raw", "--rate", "200", "--nonblocking",
                                    "-o", f"{args.py_spy}.{name}.txt"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # The fill runs at kernel speed; the ring takes every CREATE (its size
        # is checked in main), so the flows are created within a fraction of a
        # second and expire together: the destroy phase is then paced by the
        # daemon and Kafka alone, not by the fill.
        room = (args.ring_mb << 20) - (1 << 20)

        # -- fill: CREATEs, paced by the ring ------------------------------------------
        t0 = time.perf_counter()
        done, chunk = 0, max(1000, room // EVENT_REC // 4)
        while done < args.flows:
            while ring.unread() > room - chunk * EVENT_REC:
                if proc.poll() is not None:
                    raise Failed(f"the daemon exited with {proc.returncode} during the fill")
                time.sleep(0.002)
            n = min(chunk, args.flows - done)
            filler.create(done, n)
            done += n
        t_fill = time.perf_counter()
        created = table.stats()
        if created["entries"] != args.flows:
            raise Failed(f"{created['entries']} entries after creating {args.flows} flows "
                         f"(ring_full={created.get('ring_full')})")
        # Every CREATE acknowledged by Kafka.
        wait("CREATEs acknowledged", lambda: (read_status(pin) or {}).get("kafka_acked", 0)
             >= args.flows, 120, proc, 0.01)
        t_created = time.perf_counter()

        # -- expiry: DESTROYs, through Kafka, acked back ---------------------------------
        # The first DESTROY: an entry entered the outbox (or already left it).
        wait("first expiry", lambda: (lambda s: s["outbox"] > 0 or s["entries"] < args.flows)(
             table.stats()),
             args.timeout_udp * 4 + 30, proc, 0.005)
        t1, d1, b1, m1 = time.perf_counter(), cpu_of(proc.pid), cpu_of(broker_pid), cpu_machine()
        # When the entries (live and outbox) first fell to 90 % and to 10 %
        # of the flows: the steady rate, without the phase's start and its
        # last round trip.
        marks: dict[float, float] = {}

        def emptied() -> bool:
            s = table.stats()
            for frac in (0.9, 0.1):
                if frac not in marks and s["entries"] <= frac * args.flows:
                    marks[frac] = time.perf_counter()
            return s["entries"] == 0 and s["outbox"] == 0
        wait("table empty (every DESTROY acked)", emptied, 600, proc, 0.005)
        t2, d2, b2, m2 = time.perf_counter(), cpu_of(proc.pid), cpu_of(broker_pid), cpu_machine()
        final = table.stats()
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(timeout=30)
        st = wait("status after the run", lambda: read_status(pin), 5, proc, 0.1)
    finally:
        if filler is not None:
            filler.close()
        if ring is not None:
            ring.close()
        if table is not None:
            table.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if proc.returncode != 0:
        raise Failed(f"the daemon exited with {proc.returncode}: "
                     f"{(workdir / f'daemon-{name}.log').read_text()[-2000:]}")
    in_topic = asyncio.run(end_offsets(bootstrap, topic, args.partitions))
    phase = t2 - t1
    dcpu, bcpu, mcpu = d2 - d1, b2 - b1, m2 - m1
    res = {
        "variant": name, "extra_args": extra, "flows": args.flows,
        "fill_s": round(t_fill - t0, 3),
        "create_records_per_s": round(args.flows / (t_created - t0)),
        "destroy_s": round(phase, 3),
        "destroy_acked_per_s": round(args.flows / phase),
        "steady_acked_per_s": round(0.8 * args.flows / max(1e-9, marks[0.1] - marks[0.9])),
        "daemon_cpu_s_per_100k": round(dcpu / args.flows * 1e5, 3),
        "daemon_cpu_share": round(dcpu / phase, 2),
        "broker_cpu_s_per_100k": round(bcpu / args.flows * 1e5, 3),
        "other_cpu_s": round(mcpu - dcpu - bcpu, 2),
        "records_in_topic": in_topic,
        "kafka_acked": st.get("kafka_acked"),
        "records_per_batch": round(st.get("kafka_acked", 0) / max(1, st.get("kafka_acked_batches") or 1)),
        "sent_live": st.get("sent_live"), "sent_from_spool": st.get("sent_from_spool"),
        "ring_full": final.get("ring_full"), "table_full": final.get("table_full"),
    }
    if in_topic < 2 * args.flows:
        raise Failed(f"{name}: the topic holds {in_topic} records, fewer than "
                     f"2 x {args.flows} flows: {res}")
    return res


def table_text(runs: list[dict], args) -> str:
    head = (f"{'variant':<12} {'create rec/s':>12} {'destroy acked/s':>16} {'steady/s':>9} "
            f"{'daemon s/100k':>14} "
            f"{'daemon CPU':>10} {'broker s/100k':>14} {'other CPU s':>11} {'in topic':>10}")
    lines = [f"ctstream run end to end: {args.flows:,} UDP flows per variant, "
             f"{args.partitions} partitions, acks=all, idempotent", head, "-" * len(head)]
    for r in runs:
        lines.append(f"{r['variant']:<12} {r['create_records_per_s']:>12,} "
                     f"{r['destroy_acked_per_s']:>16,} {r['steady_acked_per_s']:>9,} "
                     f"{r['daemon_cpu_s_per_100k']:>14.3f} "
                     f"{r['daemon_cpu_share']:>10.2f} {r['broker_cpu_s_per_100k']:>14.3f} "
                     f"{r['other_cpu_s']:>11.2f} {r['records_in_topic']:>10,}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--flows", type=int, default=300_000)
    p.add_argument("--partitions", type=int, default=6)
    p.add_argument("--timeout-udp", type=float, default=8.0,
                   help="seconds until the flows expire: longer than the fill phase")
    p.add_argument("--ring-mb", type=int, default=0,
                   help="event ring MiB (default: a power of two that holds every CREATE)")
    p.add_argument("--variants", default="default,no-archive",
                   help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--rounds", type=int, default=1, help="each variant this many times, interleaved")
    p.add_argument("--py-spy", metavar="PREFIX",
                   help="profile the daemon with py-spy (pip install py-spy) into PREFIX.<variant>.txt")
    p.add_argument("--json", default=str(HERE / "results" / "pipeline.json"))
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        log("bench/pipeline.py needs root (BPF, namespaces)")
        return 1
    if not 1000 <= args.flows <= 5_000_000:
        log("--flows must be in 1000..5000000")
        return 2
    need = args.flows * EVENT_REC + (2 << 20)
    if not args.ring_mb:
        args.ring_mb = 1 << max(2, (need - 1).bit_length() - 20)
    if args.ring_mb << 20 < need or args.ring_mb & (args.ring_mb - 1):
        log(f"--ring-mb must be a power of two of at least {need >> 20} MiB for {args.flows} flows")
        return 2
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        log(f"unknown variant(s): {', '.join(unknown)}")
        return 2
    if not shutil.which("java"):
        log("needs java (scripts/setup.sh installs it)")
        return 1

    tmp = Path(tempfile.mkdtemp(prefix="ctstream-bench-pipe-"))
    args.dir = tmp / "broker"
    port = free_port_pair()
    bootstrap = f"127.0.0.1:{port}"
    runs: list[dict] = []
    try:
        log(f"starting a broker on {bootstrap}")
        started = kafka_sh("start", "--dir", str(args.dir), "--port", str(port), timeout=240)
        if started.returncode != 0:
            raise Failed(f"broker start failed: {started.stderr.strip()}")
        pids = broker_pids(args.dir)
        if not pids:
            raise Failed("the broker started but its process is not found")
        with testbed.make_pair(prefix="ctsbp", offloads=False, conntrack=False) as pair:
            for rnd in range(args.rounds):
                for name in names:
                    label = name if args.rounds == 1 else f"{name}#{rnd + 1}"
                    log(f"[{label}] {args.flows:,} flows: fill, then expiry after "
                        f"{args.timeout_udp:g} s")
                    r = run_variant(args, name, VARIANTS[name], pair, bootstrap, pids[0],
                                    tmp / label.replace("#", "-"))
                    r["round"] = rnd + 1
                    log(f"[{label}] create {r['create_records_per_s']:,} rec/s, destroy "
                        f"{r['destroy_acked_per_s']:,} acked/s (steady "
                        f"{r['steady_acked_per_s']:,}), daemon "
                        f"{r['daemon_cpu_s_per_100k']:.3f} CPU s/100k")
                    runs.append(r)
    except Failed as exc:
        log(f"bench/pipeline.py: FAILED: {exc}")
        return 1
    finally:
        kafka_sh("stop", "--dir", str(args.dir), timeout=120)
        shutil.rmtree(tmp, ignore_errors=True)
    print(table_text(runs, args))
    out = {"host": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count(),
           "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "args": {k: (str(v) if isinstance(v, Path) else v)
                                                                    for k, v in vars(args).items()},
           "runs": runs}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))
    log(f"results: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
