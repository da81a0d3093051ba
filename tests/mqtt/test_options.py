"""Bad --mqtt/--metrics settings fail with one line before anything is
touched (no pins, no spool), and scripts/mosquitto.sh itself: start, a port
in use, status, stop --kill, nothing left."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from tests.mqtt.conftest import Mosquitto, mosquitto_pids, mosquitto_sh
from tests.netns.test_cli import CTSTREAM


def run_quick(pin_dir: str, tmp_path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([CTSTREAM, "run", "-i", "ctsnosuch0", "--pin-dir", pin_dir,
                           "--spool", str(tmp_path / "spool"), "--kafka", "127.0.0.1:1",
                           "--topic", "t", *extra], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=30)


@pytest.mark.parametrize("extra, code, mention", [
    (("--metrics", "{busy}"), 1, "cannot listen: Address already in use"),
    (("--metrics", "127.0.0.1"), 2, "--metrics expects ADDR:PORT"),
    (("--mqtt", "a:b:c"), 2, "--mqtt expects HOST[:PORT]"),
    (("--mqtt", "127.0.0.1:1", "--mqtt-username", "u",
      "--mqtt-password-file", "/nonexistent/pw"), 2, "cannot read --mqtt-password-file"),
    (("--mqtt", "127.0.0.1:1", "--node-id", "a/b"), 2, "cannot be an MQTT topic level"),
    (("--mqtt", "127.0.0.1:1", "--mqtt-interval", "0"), 2, "--mqtt-interval must be"),
])
def test_bad_mqtt_or_metrics_options_exit_before_the_datapath(pin_dir, tmp_path, extra, code,
                                                              mention):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        addr = "127.0.0.1:%d" % busy.getsockname()[1]
        res = run_quick(pin_dir, tmp_path, *(x.replace("{busy}", addr) for x in extra))
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == code and len(lines) == 1, res.stderr
    assert lines[0].startswith("ctstream: error: ") and mention in lines[0], lines
    assert not os.path.exists(pin_dir) and not (tmp_path / "spool").exists()


@pytest.mark.mqtt
def test_mosquitto_script_start_status_port_in_use_kill(tmp_path):
    broker = Mosquitto(tmp_path / "one")
    other = tmp_path / "two"
    try:
        broker.start()
        st = mosquitto_sh("status", "--dir", str(broker.directory))
        assert st.returncode == 0 and "listening" in st.stdout, st
        busy = mosquitto_sh("start", "--dir", str(other), "--port", str(broker.port))
        assert busy.returncode == 1 and "already in use" in busy.stderr, busy
        assert not mosquitto_pids(other.resolve())
        # A second start of the same dir and port is a no-op that says so.
        again = mosquitto_sh("start", "--dir", str(broker.directory), "--port", str(broker.port),
                             "--user", "ctstream", "--password-file", str(broker.password_file))
        assert again.returncode == 0 and "already running" in again.stderr, again
        assert len(mosquitto_pids(broker.directory)) == 1
        broker.kill()
        st = mosquitto_sh("status", "--dir", str(broker.directory))
        assert st.returncode == 3 and "not running" in st.stdout, st
    finally:
        broker.close()
        mosquitto_sh("stop", "--dir", str(other))
