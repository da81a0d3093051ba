"""A real Mosquitto (scripts/mosquitto.sh) for the tests marked `mqtt`, and a
subscriber that records what arrives. Outside CI they skip when mosquitto is
not installed; in CI (CI=true) they run or fail, never skip. Every broker
started here is stopped, also when a test fails, and teardown fails loudly
if a broker process outlives its stop.

`kafka` marks skip as tests/kafka/conftest.py says."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from streamer.demo.local_servers import free_port, live_pids
from tests.kafka.conftest import pytest_collection_modifyitems as _kafka_skips

ROOT = Path(__file__).resolve().parents[2]
MOSQUITTO_SH = ROOT / "scripts" / "mosquitto.sh"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
USER, PASSWORD = "ctstream", "not-a-real-secret"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "mqtt: needs mosquitto; starts a real broker with scripts/mosquitto.sh")


def pytest_collection_modifyitems(config, items):
    _kafka_skips(config, items)
    if IN_CI or shutil.which("mosquitto"):
        return
    skip = pytest.mark.skip(reason="needs mosquitto (Debian: apt-get install mosquitto)")
    for item in items:
        if item.get_closest_marker("mqtt"):
            item.add_marker(skip)


def mosquitto_sh(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(MOSQUITTO_SH), *args], capture_output=True, text=True,
                          timeout=timeout)


def mosquitto_pids(directory: Path) -> list[int]:
    """Live mosquitto processes whose config is in `directory`."""
    return live_pids(f"{directory}/mosquitto.conf".encode(), argv0=b"mosquitto\0")


@dataclass
class Mosquitto:
    """A broker of one test's own, with a user and password; it may be
    killed and started again on the same port."""

    directory: Path
    port: int = field(default_factory=free_port)

    def __post_init__(self):
        self.directory = self.directory.resolve()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.password_file = self.directory.parent / "mqtt-password"
        self.password_file.write_text(PASSWORD + "\n")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        res = mosquitto_sh("start", "--dir", str(self.directory), "--port", str(self.port),
                           "--user", USER, "--password-file", str(self.password_file))
        assert res.returncode == 0, f"mosquitto.sh start failed:\n{res.stderr}"
        assert res.stdout.strip() == self.address, res.stdout

    def kill(self) -> None:
        res = mosquitto_sh("stop", "--dir", str(self.directory), "--kill")
        assert res.returncode == 0, res.stderr
        assert not mosquitto_pids(self.directory), "mosquitto.sh stop --kill left a process"

    def close(self) -> None:
        res = mosquitto_sh("stop", "--dir", str(self.directory))
        left = mosquitto_pids(self.directory)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert not left, f"mosquitto.sh stop left {left}: {res.stderr}"
        assert res.returncode == 0, res.stderr


@pytest.fixture
def mosquitto(tmp_path):
    broker = Mosquitto(tmp_path / "mosquitto")
    try:
        broker.start()
        yield broker
    finally:
        broker.close()


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    retain: bool
    at: float          # time.time() when it arrived
    generation: int    # the subscriber's connection it arrived on (1, 2, ...)

    def json(self):
        return json.loads(self.payload)


class Subscriber:
    """paho-mqtt in its own thread, subscribed to `pattern` on every
    (re)connect; keeps every message."""

    def __init__(self, broker: Mosquitto, pattern: str):
        self.pattern = pattern
        self.messages: list[Message] = []
        self.generation = 0
        self._cv = threading.Condition()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2,
                                  client_id=f"ctstest-sub-{os.getpid()}")
        self.client.username_pw_set(USER, PASSWORD)
        self.client.reconnect_delay_set(0.2, 1)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.connect_async("127.0.0.1", broker.port, keepalive=5)
        self.client.loop_start()

    def _on_connect(self, client, userdata, flags, reason, props):
        if reason.is_failure:
            return
        with self._cv:
            self.generation += 1
        client.subscribe(self.pattern, qos=1)

    def _on_message(self, client, userdata, msg):
        with self._cv:
            self.messages.append(Message(msg.topic, bytes(msg.payload), bool(msg.retain),
                                         time.time(), self.generation))
            self._cv.notify_all()

    def wait_for(self, what: str, predicate, timeout: float, since: int = 0) -> Message:
        """The first message from index `since` on that satisfies predicate."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                for m in self.messages[since:]:
                    if predicate(m):
                        return m
                left = deadline - time.monotonic()
                if left <= 0:
                    recent = [(m.topic, m.payload[:200]) for m in self.messages[-8:]]
                    pytest.fail(f"MQTT: {what}: nothing within {timeout} s; last messages: {recent}")
                self._cv.wait(min(left, 0.5))

    def mark(self) -> int:
        with self._cv:
            return len(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def subscriber_factory():
    made: list[Subscriber] = []

    def make(broker: Mosquitto, pattern: str) -> Subscriber:
        s = Subscriber(broker, pattern)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()
