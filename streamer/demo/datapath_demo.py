"""`ctstream demo`: two namespaces joined by veth, the datapath attached to
the server side (XDP ingress + tc egress), a short mix of real TCP, UDP and
ICMP traffic over IPv4 and IPv6, the events as they come, and a per-flow
summary next to the kernel's own conntrack figures for the same traffic.
Everything it creates is removed when it ends, also on Ctrl-C or error."""

from __future__ import annotations

import asyncio
import socket
import sys

from ..datapath.config import DatapathConfig, Timeouts
from ..daemon import Session, Target, install_signal_handlers
from ..datapath.events import Event
from ..delivery.records import record_of
from ..delivery.wire import to_json

# Short timeouts so that every flow ends, and shows its DESTROY, within the demo.
DEMO_TIMEOUTS = Timeouts(syn=5, established=5, fin=2, udp=3, icmp=2, other=3)


def _traffic(pair, say) -> None:
    for fam in (4, 6):
        say(f"TCP over IPv{fam}: 20 kB up, 50 kB down")
        pair.tcp_exchange(20_000, 50_000, family=fam)
        say(f"UDP over IPv{fam}: 5 datagrams each way")
        pair.udp_exchange(5, 200, family=fam)
        say(f"ICMP echo over IPv{fam}: 3 pings")
        pair.ping(3, family=fam)
    say("iperf3 over IPv4: 1 s")
    pair.iperf3(1, family=4)


def _key(fam, proto, src, dst, sport, dport):
    return (fam, proto, src, dst, sport, dport)


async def run_demo(pin_dir: str, output: str = "text") -> int:
    from . import testbed

    testbed.require_root()
    stop = asyncio.Event()
    install_signal_handlers(stop)
    destroyed: dict[tuple, Event] = {}
    counts = {"NEW": 0, "UPDATE": 0, "DESTROY": 0}
    node = socket.gethostname()     # -o json: the wire records, as `events -o json` writes them

    def on_event(ev: Event) -> None:
        counts[ev.type] += 1
        if ev.type == "DESTROY":
            destroyed[_key(ev.family, ev.proto, ev.src, ev.dst, ev.sport, ev.dport)] = ev
        print(to_json(record_of(ev, node)) if output == "json" else ev.text(), flush=True)

    def say(msg: str) -> None:
        print(f"--- {msg}", file=sys.stderr, flush=True)

    cfg = DatapathConfig(pin_dir=pin_dir, timeouts=DEMO_TIMEOUTS, report_interval=0,
                         table_limit=4096, sweep_interval=0.2)
    say("creating namespaces (client 198.18.0.1 / 2001:2::1 <-> server 198.18.0.2 / 2001:2::2)")
    with testbed.make_pair(prefix="ctsdemo", offloads=False, conntrack=True) as pair:
        target = Target([pair.server.ifname], netns=pair.server.netns, egress=True)
        async with Session(cfg, target, on_event) as s:
            say(f"attached XDP ingress + tc egress to {pair.server.ifname} in {pair.server.netns}")
            kernel_flows = await _run_traffic(pair, say, stop)
            say("waiting for every flow to time out and send its DESTROY")
            done = await s.wait_until_empty(timeout=30)
        _summary(destroyed, kernel_flows, counts, done)
    say("namespaces removed, programs detached, pins removed")
    return 0 if done else 1


async def run_stoppable(fn, stop: asyncio.Event, *args) -> None:
    """fn(*args) in a worker thread; KeyboardInterrupt if `stop` (a signal)
    comes first (both demos' traffic)."""
    task = asyncio.create_task(asyncio.to_thread(fn, *args))
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if not task.done():
        raise KeyboardInterrupt
    task.result()


async def _run_traffic(pair, say, stop):
    await run_stoppable(_traffic, stop, pair, say)
    return pair.conntrack_flows()


def _summary(destroyed: dict, kernel_flows, counts: dict, done: bool) -> None:
    kernel = {_key(k.family, k.proto, k.src, k.dst, k.sport, k.dport): k for k in kernel_flows}
    print()
    print("Per-flow summary (ctstream DESTROY vs the kernel's nf_conntrack, bytes are L3)")
    hdr = f"{'proto':7}{'flow':52}{'reason':8}{'pkts o/r':>12}{'bytes o/r':>18}  {'kernel bytes o/r':>18}"
    print(hdr)
    print("-" * len(hdr))
    for key, ev in sorted(destroyed.items(), key=lambda kv: kv[1].ct_id):
        flow = f"{ev.src} {ev.sport} -> {ev.dst} {ev.dport}"
        k = kernel.get(key)
        kb = f"{k.bytes_orig}/{k.bytes_reply}" if k else "-"
        print(f"{ev.proto:7}{flow:52}{ev.end_reason or '':8}"
              f"{f'{ev.packets_orig}/{ev.packets_reply}':>12}{f'{ev.bytes_orig}/{ev.bytes_reply}':>18}  {kb:>18}")
    print()
    print(f"events: {counts['NEW']} NEW, {counts['UPDATE']} UPDATE, {counts['DESTROY']} DESTROY; "
          f"{'every flow ended' if done else 'some flows did not end in time'}")
