"""Spool throughput: append+sync in batches, then the drain (read +
mark_delivered), on a real file system. A benchmark, not a test.

    .venv/bin/python bench/spool_bench.py                   # 1M records of ~200 bytes
    .venv/bin/python bench/spool_bench.py --records 200000 --batch 1000 --dir /var/tmp

Each round appends --records records (32-byte key, value sized so that the
record is --record-bytes long, key+value) in batches of --batch, with a sync
after each batch, so every batch costs a write and an fdatasync (and a
directory fsync when a segment rolls). Then it drains them: read(--batch)
followed by mark_delivered of the last offset read (one cursor write, rename
and two fsyncs per batch). The spool lives in a fresh directory under --dir
(default /var/tmp, which is on disk here, unlike a tmpfs /tmp) and is removed
afterwards. Figures are the median of --rounds rounds. The wall-clock rates
depend on the disk's fsync latency and on whatever else runs; the CPU time
per record is the steadier figure, so both are printed, with the load
average at the start.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from streamer.delivery.spool import HEADER_BYTES, Spool  # noqa: E402


def one_round(args) -> dict:
    base = tempfile.mkdtemp(prefix="spool-bench-", dir=args.dir)
    try:
        sp = Spool.open(os.path.join(base, "spool"), max_bytes=4 << 30,
                        segment_bytes=args.segment_mib << 20)
        key = b"k" * 32
        values = [os.urandom(max(args.record_bytes - len(key), 0)) for _ in range(64)]
        now_ms = int(time.time() * 1000)
        syncs = 0
        t0 = time.perf_counter()
        cpu0 = time.process_time()
        append = sp.append
        for start in range(0, args.records, args.batch):
            for i in range(start, min(start + args.batch, args.records)):
                append(key, values[i & 63], now_ms + i)
            sp.sync()
            syncs += 1
        t_append = time.perf_counter() - t0
        cpu_append = time.process_time() - cpu0
        assert sp.depth_records == args.records
        disk = sp.depth_bytes

        t0 = time.perf_counter()
        cpu0 = time.process_time()
        got = 0
        while True:
            batch = sp.read(args.batch)
            if not batch:
                break
            got += len(batch)
            sp.mark_delivered(batch[-1].offset)
        t_drain = time.perf_counter() - t0
        cpu_drain = time.process_time() - cpu0
        assert got == args.records and sp.depth_records == 0, (got, sp.depth_records)
        sp.close()
        return {"append_sync_s": t_append, "append_cpu_s": cpu_append,
                "append_records_per_s": args.records / t_append,
                "append_mb_per_s": disk / t_append / 1e6,
                "drain_s": t_drain, "drain_cpu_s": cpu_drain,
                "drain_records_per_s": args.records / t_drain,
                "syncs": syncs, "spool_bytes": disk}
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--record-bytes", type=int, default=200, help="key + value bytes")
    ap.add_argument("--batch", type=int, default=1000, help="records per sync / per read")
    ap.add_argument("--segment-mib", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    load = os.getloadavg()[0]
    rounds = []
    for k in range(args.rounds):
        r = one_round(args)
        rounds.append(r)
        print(f"round {k + 1}: append+sync {r['append_records_per_s']:,.0f} rec/s, "
              f"drain {r['drain_records_per_s']:,.0f} rec/s", file=sys.stderr)

    def med(name):
        return statistics.median(r[name] for r in rounds)

    if args.json:
        print(json.dumps({"args": vars(args), "rounds": rounds}, indent=1))
        return 0
    frame = HEADER_BYTES + args.record_bytes
    print(f"{args.records:,} records of {args.record_bytes} B ({frame} B on disk with "
          f"the frame header), batches of {args.batch}, {args.segment_mib} MiB segments, "
          f"in {args.dir}; median of {args.rounds} rounds; load average {load:.2f} "
          f"at the start on {os.cpu_count()} CPUs")
    print(f"append + sync per batch: {med('append_records_per_s'):>12,.0f} records/s "
          f"({med('append_mb_per_s'):.0f} MB/s, "
          f"{med('append_cpu_s') / args.records * 1e6:.2f} us CPU per record, "
          f"{med('syncs'):.0f} syncs)")
    print(f"drain (read + mark_delivered per batch): {med('drain_records_per_s'):>12,.0f} "
          f"records/s ({med('drain_cpu_s') / args.records * 1e6:.2f} us CPU per record)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
