"""Upgrades under traffic: a newer build of the programs takes over the
pinned table without a gap.

`ctstream events --keep` tracks a test-bed pair while short TCP connections
run without pause. Three times the daemon is stopped (the programs stay
attached, the kernel keeps tracking) and a daemon built from changed BPF
code starts (CTSTREAM_BPF_DIR: a copy of bpf/ whose XDP program also adds
its build number to a spare counter): it adopts the maps and replaces the
attached XDP program in one step, against the program it expects there,
and the tc programs with tc's replace. Each time the XDP program on the
interface is a new one with another tag, and the spare counter shows that
the new code runs. In the end every connection has exactly one logical
DESTROY, under one ct_id, with the counters of the kernel's own conntrack:
no packet went uncounted across the three swaps.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from streamer.datapath import abi, bpfsys
from streamer.datapath.loader import BPF_DIR
from streamer.datapath.table import PinnedTable
from tests.netns.test_reliability import Daemon as Daemon_
from tests.netns.test_reliability import (Generator, Record, bed, check_record,  # noqa: F401
                                          check_tcp_connections, kernel_flows,
                                          kill_while_destroys_await_their_ack, report, stats,
                                          wait_drained)

pytestmark = pytest.mark.root

MARK_STAT = abi.STAT_MAX - 1      # a counter no build names: the variants' own
UPGRADES = 3


def variant(tmp_path: Path, n: int) -> Path:
    """bpf/ with one change: the XDP program adds n to MARK_STAT per packet."""
    d = tmp_path / f"bpf{n}"
    shutil.copytree(BPF_DIR, d)
    src = d / "xdp_ingress.c"
    text = src.read_text()
    hook = "\tint v = ct_handle("
    assert hook in text, "xdp_ingress.c changed: update the test's variant"
    src.write_text(text.replace(hook, f"\tct_stat_add({MARK_STAT}, {n});\n{hook}", 1))
    return d


def xdp_prog(host) -> tuple[int, str]:
    """(id, tag) of the XDP program on the host's interface."""
    (link,) = json.loads(host.run(["ip", "-j", "-d", "link", "show", "dev", host.ifname]).stdout)
    xdp = link.get("xdp") or {}
    prog = xdp.get("prog") or next((a["prog"] for a in xdp.get("attached", []) if "prog" in a), {})
    return prog.get("id", 0), prog.get("tag", "")


def mark(pin: str) -> int:
    with PinnedTable(pin) as t:
        per_cpu = bpfsys.percpu_lookup(t.fd("ct_stats"), MARK_STAT.to_bytes(4, "little"), 8)
    return sum(int.from_bytes(v[:8], "little") for v in per_cpu)


def test_three_upgrades_under_traffic_lose_nothing(bed, tmp_path):
    pair = bed.pair
    daemon = bed.start("--keep")
    progs = [xdp_prog(pair.server)]
    gen = Generator(pair)
    gen.start()
    marks = []
    try:
        for n in range(1, UPGRADES + 1):
            time.sleep(3)
            assert gen.ports and gen.is_alive(), f"traffic stopped: {gen.error!r}"
            rc, _ = daemon.terminate()
            assert rc == 0, daemon.output()
            assert "stay attached" in daemon.output(), daemon.output()
            daemon = bed.start("--keep", env={"CTSTREAM_BPF_DIR": str(variant(tmp_path, n))})
            out = daemon.output()
            assert "(adopted the pinned table)" in out, out
            progs.append(xdp_prog(pair.server))
            m0 = mark(bed.pin)
            time.sleep(1)
            marks.append((m0, mark(bed.pin)))
        time.sleep(3)
    finally:
        ports = gen.finish()
    st = wait_drained(bed.pin, timeout=60)
    kernel = kernel_flows(pair)
    rc, _ = daemon.terminate()
    assert rc == 0, daemon.output()
    logs = "".join(d.output() for d in bed.daemons)
    assert "Traceback" not in logs

    ids, tags = [p[0] for p in progs], [p[1] for p in progs]
    assert len(set(ids)) == UPGRADES + 1 and all(ids), progs   # a new program each time
    assert len(set(tags)) == UPGRADES + 1, progs               # built from other code
    for n, (before, after) in enumerate(marks, 1):
        assert after > before and (after - before) % n == 0, marks   # build n's code runs
    rec = Record.read(bed.sink)
    assert rec.torn == 0
    assert len(set(ports)) == len(ports), "the client reused a source port: connections ambiguous"
    figures = check_record(rec)                 # one ct_id per flow, one DESTROY seq per ct_id
    check_tcp_connections(rec, pair, 4, ports, kernel)   # the kernel's counters, every one
    assert figures["destroys"] == len(ports)
    assert st["created"] == st["destroyed"] == len(ports), st
    report("upgrades", {"connections": len(ports), **figures,
                        **{k: st[k] for k in ("events", "ring_full", "untracked_packets")}})


def test_a_program_ctstream_did_not_attach_is_never_replaced(pin_dir, tmp_path):
    """An XDP program someone else attached stays: at a first start, and in
    place of the one a kept daemon left (the upgrade expects its own)."""
    from bcc import BPF

    from streamer.datapath import netns
    from streamer.demo import testbed
    from tests.netns.test_cli import CTSTREAM, ctstream, detach_and_remove

    b = BPF(text=b"int other_xdp(struct xdp_md *ctx) { return XDP_PASS; }")
    other = b.load_func("other_xdp", BPF.XDP)
    with testbed.make_pair(prefix="ctsupg", offloads=False, conntrack=False, index=44) as pair:
        s = pair.server
        events = [CTSTREAM, "events", "-n", s.netns, "-i", s.ifname, "--pin-dir", pin_dir,
                  "--xdp-mode", "native"]
        try:
            with netns.entered(s.netns):
                bpfsys.xdp_attach(s.ifindex, other.fd, bpfsys.XDP_FLAGS_DRV_MODE)
            theirs = xdp_prog(s)
            cp = ctstream(*events[1:], timeout=60)
            assert cp.returncode == 1 and "another XDP program" in cp.stderr, cp.stderr
            assert xdp_prog(s) == theirs

            with netns.entered(s.netns):
                bpfsys.xdp_attach(s.ifindex, -1, bpfsys.XDP_FLAGS_DRV_MODE)
            d = Daemon_(events + ["--keep"], tmp_path / "kept.log")
            rc, _ = d.terminate()
            assert rc == 0 and xdp_prog(s)[0] not in (0, theirs[0]), d.output()
            with netns.entered(s.netns):      # someone swaps ours for theirs
                bpfsys.xdp_attach(s.ifindex, other.fd, bpfsys.XDP_FLAGS_DRV_MODE)
            cp = ctstream(*events[1:], timeout=60)
            assert cp.returncode == 1 and "not one this pin dir's ctstream attached" in cp.stderr \
                or "not the one ctstream attached" in cp.stderr, cp.stderr
            assert xdp_prog(s) == theirs
        finally:
            with netns.entered(s.netns):
                bpfsys.xdp_attach(s.ifindex, -1, bpfsys.XDP_FLAGS_DRV_MODE)
            detach_and_remove(pin_dir)
            b.cleanup()


def test_migration_to_a_changed_layout_under_traffic_loses_nothing(bed, tmp_path):
    """Layout 2 -> 3 (struct ct_entry gains a field, the tables move to
    other maps) while connections run: the layout-2 daemon is SIGKILLed
    while DESTROYs await their ack; a layout-3 daemon refuses the old table
    and says what to do; `ctstream migrate` moves it, live entries and
    outbox, while the frozen old programs hold the packets; the layout-3
    daemon adopts it and delivers the DESTROYs that moved unacked. Every
    connection: one logical DESTROY, the kernel's counters."""
    from tests.netns.test_cli import CTSTREAM, ctstream

    pair = bed.pair
    next_layout = {"CTSTREAM_LAYOUT": str(abi.LAYOUT_NEXT)}
    daemon = bed.start("--keep")
    # Batches 50 ms apart: packets arrive throughout the freeze (100-200 ms).
    gen = Generator(pair, batch=100, period=0.05)
    gen.start()
    try:
        time.sleep(2)
        # Killed while DESTROYs await their ack: the outbox moves too.
        kill_while_destroys_await_their_ack(daemon, bed.pin)
        refused = subprocess.run(
            [CTSTREAM, "events", "-n", pair.server.netns, "-i", pair.server.ifname, "--pin-dir",
             bed.pin, "--sink", f"jsonl:{tmp_path / 'never.jsonl'}"], capture_output=True,
            text=True, timeout=60, env={**os.environ, **next_layout})
        assert refused.returncode == 1 and "have layout 2" in refused.stderr \
            and "ctstream migrate" in refused.stderr, refused.stderr
        before = stats(bed.pin)
        mig = subprocess.run([CTSTREAM, "migrate", "--pin-dir", bed.pin], capture_output=True,
                             text=True, timeout=120, env={**os.environ, **next_layout})
        assert mig.returncode == 0, mig.stderr
        assert "layout 2 -> 3" in mig.stdout, mig.stdout
        outbox_moved = int(mig.stdout.split(" live entries and ")[1].split()[0])
        assert outbox_moved > 0, mig.stdout
        moved = stats(bed.pin)
        assert moved["entries"] >= before["entries"] > 0, (before, moved)
        daemon = bed.start("--keep", env=next_layout)
        out = daemon.output()
        assert "(adopted the pinned table)" in out, out
        time.sleep(2)
    finally:
        ports = gen.finish()
    st = wait_drained(bed.pin, timeout=60)
    listing = ctstream("config", "show", "--pin-dir", bed.pin, "-o", "json")
    assert json.loads(listing.stdout)["layout"] == abi.LAYOUT_NEXT, listing.stdout
    assert sorted(n for n in os.listdir(bed.pin) if n.startswith("ct4")) == ["ct4_l3"]
    kernel = kernel_flows(pair)
    rc, _ = daemon.terminate(timeout=30)
    assert rc == 0, daemon.output()
    logs = "".join(d.output() for d in bed.daemons)
    assert "Traceback" not in logs + mig.stderr

    rec = Record.read(bed.sink)
    assert rec.torn <= 1, f"{rec.torn} unparseable lines after one kill"
    assert len(set(ports)) == len(ports), "the client reused a source port: connections ambiguous"
    figures = check_record(rec)
    check_tcp_connections(rec, pair, 4, ports, kernel)
    assert figures["destroys"] == len(ports)
    assert st["created"] == st["destroyed"] == len(ports), st
    assert st["held"] > 0, "no packet came during the freeze: the hold was not exercised"
    report("migrate", {"connections": len(ports), "migrate": mig.stdout.strip(), **figures,
                       "held": st["held"]})
