"""Hot path micro-benchmark: ring record bytes to a Kafka record
(RingEncoder.encode) and to an abi.RawEvent (abi.decode_event), this tree's
code beside another version of the same modules. A benchmark, not a test.

    .venv/bin/python bench/encoder_bench.py --old /tmp/ring_records_old.py
    .venv/bin/python bench/encoder_bench.py --old OLD_RING_RECORDS.py --old-abi OLD_ABI.py \
        --records 200000 --rounds 9

--old and --old-abi are copies of streamer/delivery/ring_records.py and
streamer/datapath/abi.py from another commit (e.g. `git show HEAD~1:PATH >
FILE`); they are loaded as modules of the streamer package, so their
relative imports find this tree's other modules. Without them only this
tree's code is measured.

Each round times one pass of every variant over the same --records random
ring records (every type, family and protocol; addresses drawn from --hosts
addresses per family, so the encoder's address cache works as it does on a
real host; 0 draws every address at random), each with a fresh encoder, the
garbage collector off. The passes are interleaved block by block (--block
records, the order rotated per block and per round), so that old and new
meet the same machine, which matters when other jobs share it.

Figures are ns per record, by this thread's CPU time (the steadier figure
when other jobs share the machine) and by wall time: the median over the
rounds, the min and the max, and the spread ((max - min) / median). "vs
first" divides each round's figure by the first variant's of the same kind
in that round (old, if given): the median and the range of those ratios.
Before timing, the outputs of all variants of a kind are compared record by
record (encode: key, value bytes, ack reference; decode: every field): exit
status 1 if any differ.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import random
import statistics
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from streamer.datapath import abi  # noqa: E402
from streamer.datapath.events import Clock  # noqa: E402
from streamer.delivery import ring_records  # noqa: E402

NODE = "bench-node-01"


class FixedClock(Clock):
    """A clock that is never re-read, so every encoder uses the same offset."""

    def __init__(self):
        super().__init__()
        self._fixed = self._offset

    def wall_ns(self, mono_ns: int) -> int:
        return mono_ns + self._fixed


def load_copy(path: str, package: str, name: str):
    """A copy of a streamer module, as a module of `package`."""
    full = f"{package}.{name}"
    spec = importlib.util.spec_from_file_location(full, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[full] = mod     # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def ring_records_of(count: int, hosts: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    pool4 = [rng.randbytes(4) for _ in range(hosts)]
    pool6 = [rng.randbytes(16) for _ in range(hosts)]
    pack = struct.Struct(abi.EVENT.fmt).pack
    out = []
    for _ in range(count):
        family = rng.choice((4, 6))
        if family == 4:
            s, d = (rng.choice(pool4) if hosts else rng.randbytes(4) for _ in range(2))
            s, d = s + bytes(12), d + bytes(12)
        else:
            s, d = (rng.choice(pool6) if hosts else rng.randbytes(16) for _ in range(2))
        f = dict(type=rng.choice((abi.EV_CREATE, abi.EV_UPDATE, abi.EV_DESTROY)),
                 version=abi.ABI_VERSION, len=abi.EVENT_SIZE, family=family,
                 proto=rng.choice((6, 6, 6, 17, 17, 1, 58)), state=rng.randrange(9),
                 flags=rng.randrange(16), ct_id=rng.randrange(1, 2**64),
                 seq=rng.randrange(2**16), end_reason=rng.randrange(6), missed=0,
                 tcp_flags_orig=rng.randrange(256), tcp_flags_reply=rng.randrange(256),
                 ts_ns=rng.randrange(2**50), first_ns=rng.randrange(2**50),
                 last_ns=rng.randrange(2**50), pkts_orig=rng.randrange(2**20),
                 pkts_reply=rng.randrange(2**20), bytes_orig=rng.randrange(2**32),
                 bytes_reply=rng.randrange(2**32), saddr=s, daddr=d,
                 sport=rng.randrange(2**16), dport=rng.randrange(2**16),
                 vlan=rng.choice((0, 0, 0, rng.randrange(4096))), dying=0,
                 retries=rng.choice((0, 0, 0, 1)))
        out.append(pack(*(f[name] for name, _ in abi.EVENT.fields)))
    return out


def one_round(fns: list, views, block: int) -> list[tuple[float, float]]:
    """ns per record of one pass of each function over all the records, by
    this thread's CPU time and by wall time. The passes are interleaved
    block by block (each block timed for every function, the order rotated
    from block to block), so that all of them meet the same machine."""
    cpu = [0] * len(fns)
    wall = [0] * len(fns)
    gc.collect()
    gc.disable()
    try:
        for b, start in enumerate(range(0, len(views), block)):
            part = views[start:start + block]
            for j in range(len(fns)):
                i = (b + j) % len(fns)
                fn = fns[i]
                w0, c0 = time.perf_counter_ns(), time.thread_time_ns()
                for v in part:
                    fn(v)
                c1, w1 = time.thread_time_ns(), time.perf_counter_ns()
                cpu[i] += c1 - c0
                wall[i] += w1 - w0
    finally:
        gc.enable()
    return [(c / len(views), w / len(views)) for c, w in zip(cpu, wall)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", help="another ring_records.py to compare with")
    ap.add_argument("--old-abi", help="another abi.py (its decode_event) to compare with")
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--hosts", type=int, default=4096)
    ap.add_argument("--block", type=int, default=10_000,
                    help="records per block of the interleaved passes")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--cpu", type=int, default=None,
                    help="pin to this CPU (default: the last one allowed; -1: no pinning)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    cpus = sorted(os.sched_getaffinity(0))
    cpu = cpus[-1] if args.cpu is None else args.cpu
    if cpu >= 0:
        os.sched_setaffinity(0, {cpu})

    clock = FixedClock()
    encoders = {"new": ring_records}
    decoders = {"new": abi}
    if args.old:
        encoders["old"] = load_copy(args.old, "streamer.delivery", "_bench_old_ring_records")
    if args.old_abi:
        decoders["old"] = load_copy(args.old_abi, "streamer.datapath", "_bench_old_abi")
    # (kind, variant) -> a maker of the function timed (fresh state per round)
    variants = {}
    for name, mod in encoders.items():
        variants[("encode", name)] = lambda mod=mod: mod.RingEncoder(NODE, clock).encode
    for name, mod in decoders.items():
        variants[("decode", name)] = lambda mod=mod: mod.decode_event
    # The old first, so that "vs first" reads new / old.
    order = sorted(variants, key=lambda kv: (kv[0], kv[1] != "old"))

    bufs = ring_records_of(args.records, args.hosts, args.seed)
    views = [memoryview(b) for b in bufs]

    failed = False
    for kind in ("encode", "decode"):
        fns = {v: variants[(k, v)]() for k, v in order if k == kind}
        if kind == "decode":
            def out(fn, v):
                r = fn(v)
                return [getattr(r, f) for f in r.__slots__]
        else:
            def out(fn, v):
                return fn(v)
        names = list(fns)
        for v in views:
            first = out(fns[names[0]], v)
            if any(out(fns[n], v) != first for n in names[1:]):
                print(f"{kind}: the variants differ on a record: {bytes(v).hex()}",
                      file=sys.stderr)
                failed = True
                break

    cpu_ns = {kv: [] for kv in order}
    wall_ns = {kv: [] for kv in order}
    load = os.getloadavg()
    for r in range(args.rounds):
        k = r % len(order)
        rotated = order[k:] + order[:k]
        figures = one_round([variants[kv]() for kv in rotated], views, args.block)
        for kv, (c, w) in zip(rotated, figures):
            cpu_ns[kv].append(c)
            wall_ns[kv].append(w)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

    result = {"records": args.records, "rounds": args.rounds, "hosts": args.hosts,
              "cpu": cpu, "loadavg_start": load, "loadavg_end": os.getloadavg(),
              "python": sys.version.split()[0], "figures": []}
    for clock_name, samples in (("cpu", cpu_ns), ("wall", wall_ns)):
        for kind, name in order:
            xs = samples[(kind, name)]
            first = next(kv for kv in order if kv[0] == kind)
            ratios = [a / b for a, b in zip(xs, samples[first])]
            med = statistics.median(xs)
            result["figures"].append({
                "clock": clock_name, "kind": kind, "variant": name, "median_ns": med,
                "min_ns": min(xs), "max_ns": max(xs), "spread": (max(xs) - min(xs)) / med,
                "vs_first": statistics.median(ratios), "vs_first_min": min(ratios),
                "vs_first_max": max(ratios), "samples_ns": xs})
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        pool = f"{args.hosts} addresses per family" if args.hosts else "every address random"
        print(f"{args.records:,} ring records ({pool}), "
              f"{args.rounds} rounds rotated, CPU {cpu}, load average {load[0]:.2f} at the "
              f"start, {result['loadavg_end'][0]:.2f} at the end, Python {result['python']}")
        print(f"  {'clock':5} {'path':12} {'median':>8} {'min':>8} {'max':>8} {'spread':>7}"
              f" {'vs first':>9} {'(min-max)':>13}")
        for f in result["figures"]:
            label = f"{f['kind']} {f['variant']}"
            print(f"  {f['clock']:5} {label:12} {f['median_ns']:8.0f} {f['min_ns']:8.0f} "
                  f"{f['max_ns']:8.0f} {f['spread']:7.1%} {f['vs_first']:9.3f} "
                  f"({f['vs_first_min']:.3f}-{f['vs_first_max']:.3f})")
        print("  ns per record. cpu: this thread's CPU time (steadier with other jobs on the\n"
              "  machine), wall: perf_counter. spread: (max - min) / median over the rounds.\n"
              "  vs first: this / the first variant of its kind, round by round: median (range)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
