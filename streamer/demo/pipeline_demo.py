"""`ctstream demo`: the whole pipeline on one machine, on embedded defaults.

1. A single-node Kafka broker (KRaft) from the project's own jars
   (scripts/kafka.sh) in a temporary directory, on a free loopback port, and
   a topic of three partitions.
2. Two network namespaces joined by a veth pair (198.18.0.0/24 and
   2001:2::/64); the datapath on the server side (XDP ingress + tc egress),
   the daemon's Kafka sink (live sends, spool as the fallback) in this
   process.
3. Real traffic: many short TCP connections, bulk TCP, UDP, ICMP echo and an
   iperf3 run, over IPv4 and IPv6. The kernel's own conntrack in the server
   namespace counts the connections independently.
4. Every flow times out; its DESTROY goes to Kafka and is acked back to the
   kernel's outbox. The demo waits until the table and the outbox are empty.
5. The accounting consumer (`ctstream account`) reads the topic into a SQLite
   database, exactly once; then the top talkers and a delivery report:
   connections made (the kernel's conntrack) vs DESTROY records in Kafka vs
   accounted flows. The three must be equal: the exit code says whether
   they were.

Everything it makes (broker process, namespaces, programs, pins, temporary
files) is removed when it ends, also on Ctrl-C or error.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..datapath.config import RUN_EVENT_MASK, DatapathConfig, Timeouts
from ..errors import EnvironmentProblem, StreamerError
from .local_servers import free_port_pair

ROOT = Path(__file__).resolve().parents[2]
KAFKA_SH = ROOT / "scripts" / "kafka.sh"
TOPIC = "ctstream.demo"
PARTITIONS = 3
NODE = "demo-node"
# Short timeouts, so that every flow ends within the demo.
TIMEOUTS = Timeouts(syn=5, established=5, fin=2, udp=3, icmp=2, other=3)
# The kernel's conntrack (the reference count) keeps ended flows this long.
KERNEL_KEEP_S = 600
KERNEL_TIMEOUTS = ("nf_conntrack_tcp_timeout_time_wait", "nf_conntrack_tcp_timeout_close",
                   "nf_conntrack_udp_timeout", "nf_conntrack_udp_timeout_stream",
                   "nf_conntrack_icmp_timeout", "nf_conntrack_icmpv6_timeout")
SHORT_TCP = 150        # short connections per address family


def say(msg: str) -> None:
    print(f"--- {msg}", file=sys.stderr, flush=True)


# ---- the broker ---------------------------------------------------------------------

class DemoBroker:
    def __init__(self, directory: Path):
        self.directory = directory
        self.port = free_port_pair()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.started = False

    def _sh(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
        return subprocess.run([str(KAFKA_SH), *args], capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def start(self) -> None:
        if not KAFKA_SH.exists():
            raise EnvironmentProblem(f"{KAFKA_SH} is missing: the demo runs from a checkout "
                                     f"of ctstream (make demo)")
        self.started = True   # a failed start may have left a process: stop() looks
        res = self._sh("start", "--dir", str(self.directory), "--port", str(self.port))
        if res.returncode != 0:
            raise EnvironmentProblem("the demo's Kafka broker did not start: "
                                     + (res.stderr.strip().splitlines() or ["?"])[-1])

    def topic_create(self, name: str, partitions: int) -> None:
        res = self._sh("topic", "create", name, "--partitions", str(partitions),
                       "--dir", str(self.directory))
        if res.returncode != 0:
            raise StreamerError(f"cannot create the topic {name}: {res.stderr.strip()}")

    def stop(self) -> None:
        if self.started:
            res = self._sh("stop", "--dir", str(self.directory), timeout=120)
            if res.returncode != 0:
                say(f"kafka.sh stop: {res.stderr.strip()}")


# ---- traffic ----------------------------------------------------------------------------

def _traffic(pair) -> None:
    for fam in (4, 6):
        say(f"IPv{fam}: {SHORT_TCP} short TCP connections")
        pair.tcp_many(SHORT_TCP, family=fam, concurrency=8)
        say(f"IPv{fam}: TCP 200 kB up, 2 MB down; 20 UDP datagrams; 3 pings")
        pair.tcp_exchange(200_000, 2_000_000, family=fam)
        pair.udp_exchange(20, 500, family=fam)
        pair.ping(3, family=fam)
    say("IPv4: iperf3 for 2 s")
    pair.iperf3(2, family=4)


# ---- Kafka's side of the count ------------------------------------------------------------

async def _destroys_in_topic(bootstrap: str, topic: str) -> tuple[set, dict]:
    """(nodeId, ctId) of every DESTROY in the topic, and records by type."""
    from ..delivery import wire
    from .local_servers import read_topic_to_end

    destroys, by_type = set(), {}
    async for m in read_topic_to_end(bootstrap, topic, PARTITIONS):
        rec = wire.decode(m.value)
        wire.validate(rec)
        by_type[rec["eventType"]] = by_type.get(rec["eventType"], 0) + 1
        if rec["eventType"] == "DESTROY":
            destroys.add((rec["nodeId"], rec["ctId"]))
    return destroys, by_type


# ---- accounting -------------------------------------------------------------------------

async def _account(bootstrap: str, topic: str, db_url: str, stop: asyncio.Event) -> dict:
    from ..accounting import consumer, top
    from ..delivery.kafka_settings import KafkaSettings

    stats = await consumer.consume(KafkaSettings(bootstrap=bootstrap, topic=topic), db_url,
                                   group="ctstream-demo", stop=stop, until_idle=3.0)
    return {"stats": stats.as_dict(),
            "flows": top.flow_count(db_url),
            "by_src": top.top_talkers(db_url, by="src", since_s=None, limit=5),
            "by_port": top.top_talkers(db_url, by="port", since_s=None, limit=8)}


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _print_top(title: str, rows: list[dict], label: str) -> None:
    print(title)
    hdr = f"  {label:<34}{'flows':>8}{'packets':>12}{'bytes':>12}"
    print(hdr)
    print("  " + "-" * (len(hdr) - 2))
    for r in rows:
        print(f"  {str(r.get('talker')):<34}{r.get('flows', 0):>8,}{r.get('packets', 0):>12,}"
              f"{_human(r.get('bytes', 0)):>12}")
    print()


# ---- the demo ---------------------------------------------------------------------------------

async def run_pipeline_demo(pin_dir: str, output: str = "text") -> int:
    from . import testbed
    from ..daemon import Session, Target, install_signal_handlers
    from .datapath_demo import run_stoppable
    from ..delivery.kafka_sink import KafkaSink
    from ..delivery.kafka_settings import KafkaSettings

    testbed.require_root()
    if shutil.which("java") is None:
        raise EnvironmentProblem("the demo's Kafka broker needs java (make demo installs it)")
    stop = asyncio.Event()
    install_signal_handlers(stop)
    tmp = Path(tempfile.mkdtemp(prefix="ctstream-demo-"))
    broker = DemoBroker(tmp / "broker")
    t_start = time.monotonic()
    try:
        say(f"starting a single-node Kafka broker (KRaft) on {broker.bootstrap}")
        await asyncio.to_thread(broker.start)
        await asyncio.to_thread(broker.topic_create, TOPIC, PARTITIONS)
        say(f"topic {TOPIC}: {PARTITIONS} partitions")
        cfg = DatapathConfig(pin_dir=pin_dir, timeouts=TIMEOUTS, report_interval=0,
                             table_limit=8192, sweep_interval=0.2, grace=4.0,
                             event_mask=RUN_EVENT_MASK)
        say("creating namespaces (client 198.18.0.1 / 2001:2::1 <-> "
            "server 198.18.0.2 / 2001:2::2)")
        with testbed.make_pair(prefix="ctsdemo", offloads=False, conntrack=True) as pair:
            pair.server.run(["sysctl", "-qw", *(f"net.netfilter.{n}={KERNEL_KEEP_S}"
                                                for n in KERNEL_TIMEOUTS)])
            sink = KafkaSink(KafkaSettings(bootstrap=broker.bootstrap, topic=TOPIC),
                             str(tmp / "spool"), node_id=NODE)
            target = Target([pair.server.ifname], netns=pair.server.netns, egress=True)
            async with Session(cfg, target, sink=sink, lost_interval=0) as s:
                say(f"the daemon: XDP + tc egress on {pair.server.ifname} in "
                    f"{pair.server.netns}, shipping to Kafka as node {NODE}")
                await run_stoppable(_traffic, stop, pair)
                kernel_flows = pair.conntrack_flows()
                say(f"traffic done: the kernel's conntrack saw {len(kernel_flows)} connections; "
                    f"waiting for every flow to time out and its DESTROY to be acknowledged")
                ended = await s.wait_until_empty(timeout=60)
                status = s.status()
            if not ended:
                say("some flows did not end in time")
        say("datapath detached; reading the topic")
        destroys, by_type = await _destroys_in_topic(broker.bootstrap, TOPIC)
        db = tmp / "accounting.sqlite"
        say(f"ctstream account: consumer group into sqlite:{db}")
        acc = await _account(broker.bootstrap, TOPIC, f"sqlite:{db}", stop)
    finally:
        say("stopping the broker")
        await asyncio.to_thread(broker.stop)
        shutil.rmtree(tmp, ignore_errors=True)

    made = len(kernel_flows)
    equal = ended and made == len(destroys) == acc["flows"]
    report = {
        "connections_made": made, "destroys_in_kafka": len(destroys),
        "accounted_flows": acc["flows"], "records_in_kafka": by_type,
        "sent_live": status.get("sent_live"), "sent_from_spool": status.get("sent_from_spool"),
        "all_equal": equal, "seconds": round(time.monotonic() - t_start, 1),
    }
    if output == "json":
        print(json.dumps({"report": report, "top_src": acc["by_src"],
                          "top_port": acc["by_port"]}, default=str))
    else:
        print()
        _print_top("Top talkers by source (accounting database)", acc["by_src"], "source")
        _print_top("Top destination ports", acc["by_port"], "protocol/port")
        print("Delivery report")
        print(f"  connections made (kernel conntrack)   {made:>8,}")
        print(f"  DESTROY records in Kafka (distinct)   {len(destroys):>8,}")
        print(f"  flows accounted (exactly once)        {acc['flows']:>8,}")
        print("  records in Kafka by type              "
              + ", ".join(f"{k} {v:,}" for k, v in sorted(by_type.items())))
        print(f"  {'ALL EQUAL' if equal else 'NOT EQUAL: something was lost'}"
              f" ({report['seconds']:.0f} s)")
    say("broker stopped, namespaces removed, programs detached, pins removed")
    return 0 if equal else 1
