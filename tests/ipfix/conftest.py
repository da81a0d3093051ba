"""Fixtures of the IPFIX export tests: a real collector from Debian, nfcapd
(package nfdump 1.7.1, UDP only: its -h has no TCP listener), started on a
free loopback port in the test's own directory and always stopped, and the
session's Kafka broker of tests/kafka (scripts/kafka.sh).

Tests that need nfcapd/nfdump or libfixbuf's ipfixDump are marked
`collector`. Outside CI they skip when those are missing; in CI (CI=true)
they run or fail, never skip (scripts/setup.sh installs them).
"""

from __future__ import annotations

import os
import shutil
import signal

import pytest

from tests.ipfix.support import Nfcapd
from tests.kafka.conftest import kafka_broker  # noqa: F401  (the session's broker)

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
TOOLS = ("nfcapd", "nfdump", "ipfixDump")


def pytest_configure(config):
    config.addinivalue_line("markers", "collector: needs nfcapd and nfdump (Debian nfdump) and "
                                       "ipfixDump (libfixbuf-tools)")


def pytest_collection_modifyitems(config, items):
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if IN_CI or not missing:
        return
    skip = pytest.mark.skip(reason=f"needs {', '.join(missing)} (scripts/setup.sh installs them)")
    for item in items:
        if item.get_closest_marker("collector"):
            item.add_marker(skip)


@pytest.fixture
def nfcapd(tmp_path) -> Nfcapd:
    """A running nfcapd on 127.0.0.1; stopped (and checked gone) afterwards."""
    collector = Nfcapd(tmp_path / "nfcapd")
    try:
        collector.start()
        yield collector
    finally:
        collector.stop()
        alive = collector.proc is not None and collector.proc.poll() is None
        if alive:
            os.kill(collector.proc.pid, signal.SIGKILL)
            collector.proc.wait(timeout=10)
        assert not alive, "nfcapd outlived its SIGTERM"
