"""A real single-node Kafka broker (scripts/kafka.sh) for the tests marked
`kafka`. Outside CI they skip when there is no java; in CI (CI=true) they run
or fail, never skip. Every broker started here is stopped, also when a test
fails, and teardown fails loudly if a broker process outlives its stop."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from streamer.demo.local_servers import free_port_pair, live_pids

ROOT = Path(__file__).resolve().parents[2]
KAFKA_SH = ROOT / "scripts" / "kafka.sh"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_collection_modifyitems(config, items):
    if IN_CI or shutil.which("java"):
        return
    skip = pytest.mark.skip(reason="needs java (default-jdk-headless) to run the Kafka broker")
    for item in items:
        if item.get_closest_marker("kafka"):
            item.add_marker(skip)


def kafka_sh(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([str(KAFKA_SH), *args], capture_output=True, text=True, timeout=timeout)


def broker_pids(directory: Path) -> list[int]:
    """Live kafka.Kafka processes whose config is in `directory`."""
    return live_pids(b"kafka.Kafka", f"{directory}/server.properties".encode())


def stop_and_check(directory: Path) -> None:
    """Stop the broker in `directory`; kill and complain if one is left."""
    result = kafka_sh("stop", "--dir", str(directory), timeout=90)
    left = broker_pids(directory)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"kafka.sh stop left broker processes {left}: {result.stderr}"
    assert result.returncode == 0, result.stderr


@dataclass(frozen=True)
class Broker:
    bootstrap: str
    directory: Path
    port: int

    def topic_create(self, name: str, partitions: int = 1) -> None:
        result = kafka_sh("topic", "create", name, "--partitions", str(partitions),
                          "--dir", str(self.directory), timeout=120)
        assert result.returncode == 0, f"topic create {name} failed:\n{result.stderr}"


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory) -> Broker:
    directory = tmp_path_factory.mktemp("kafka").resolve()
    port = free_port_pair()
    try:
        result = kafka_sh("start", "--dir", str(directory), "--port", str(port))
        if result.returncode != 0:
            pytest.fail(f"scripts/kafka.sh start failed (exit {result.returncode}):\n{result.stderr}",
                        pytrace=False)
        yield Broker(bootstrap=result.stdout.strip(), directory=directory, port=port)
    finally:
        stop_and_check(directory)
