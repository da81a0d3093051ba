"""`ctstream demo` (the README's main command) end to end: its own broker,
namespaces, traffic, the daemon, the accounting consumer. Its delivery report
must show connections made == DESTROYs in Kafka == accounted flows, and it
must leave nothing behind."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from streamer.demo import testbed
from tests.netns.test_cli import CTSTREAM

pytestmark = [pytest.mark.root, pytest.mark.kafka]

# The demo's traffic plan (streamer/demo/pipeline_demo.py): per family 150 short
# TCP connections, one bulk TCP, one UDP flow, one ping; iperf3 makes two.
PLANNED = 2 * (150 + 1 + 1 + 1) + 2


def demo_brokers() -> set[str]:
    """Broker processes started by a demo (their directory is a ctstream-demo- temp dir)."""
    out = subprocess.run(["pgrep", "-af", "kafka.Kafka"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if "ctstream-demo-" in line}


def test_demo_delivers_every_connection_exactly_once_and_leaves_nothing():
    pin = f"/sys/fs/bpf/ctstream_demo_test{os.getpid()}"
    before = set(testbed._list_netns())
    brokers_before = demo_brokers()
    res = subprocess.run([CTSTREAM, "demo", "-o", "json", "--pin-dir", pin],
                         capture_output=True, text=True, timeout=400, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr[-4000:]
    out = json.loads(res.stdout)
    report = out["report"]
    assert report["connections_made"] == PLANNED, report
    assert report["destroys_in_kafka"] == PLANNED, report
    assert report["accounted_flows"] == PLANNED, report
    assert report["all_equal"] is True
    assert report["records_in_kafka"]["CREATE"] >= PLANNED
    # The top talkers come from the accounting database: the v4 and v6
    # clients, bytes in both directions, the bulk transfers included.
    sources = {row["talker"] for row in out["top_src"]}
    assert {"198.18.0.1", "2001:2::1"} <= sources, out["top_src"]
    assert sum(row["bytes"] for row in out["top_src"]) > 2 * 2_200_000
    assert {ns for ns in set(testbed._list_netns()) - before if ns.startswith("ctsdemo")} == set()
    assert demo_brokers() <= brokers_before
    assert subprocess.run(["ls", pin], capture_output=True).returncode != 0
