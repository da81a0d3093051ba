"""systemd's readiness protocol with a real daemon: `ctstream events` in a
network namespace of the test's own, started with a NOTIFY_SOCKET the test
listens on, as systemd starts ctstream.service (Type=notify). READY=1 comes
from the main process once the programs are attached: the daemon is frozen
(SIGSTOP) the moment it arrives, and the XDP and tc programs are on the
interface already. SIGTERM brings STOPPING=1; a start that fails sends
nothing. The socket is a path or an abstract name, as systemd may give."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import stat
import struct
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from streamer.demo import testbed
from tests.netns.test_cli import CTSTREAM, detach_and_remove

pytestmark = pytest.mark.root

PAIR_INDEX = 41
WAIT_S = 60          # bound on each wait for a message (compiling takes seconds)


def notify_socket(kind: str, tmp_path: Path) -> tuple[socket.socket, str]:
    """A datagram socket that receives the sender's credentials, and its
    NOTIFY_SOCKET value."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    if kind == "abstract":
        name = f"ctstest-notify-{uuid.uuid4().hex}"
        s.bind(b"\0" + name.encode())
        return s, "@" + name
    path = tmp_path / "notify.sock"
    s.bind(str(path))
    return s, str(path)


def receive(s: socket.socket, proc: subprocess.Popen, log: Path) -> tuple[dict, int]:
    """The next message's VAR=VALUE fields and the sender's pid."""
    deadline = time.monotonic() + WAIT_S
    while True:
        ready, _, _ = select.select([s], [], [], 0.2)
        if ready:
            break
        if proc.poll() is not None and not select.select([s], [], [], 0)[0]:
            pytest.fail(f"ctstream exited (rc={proc.returncode}) without a message: "
                        f"{log.read_text(errors='replace')}")
        assert time.monotonic() < deadline, \
            f"no message within {WAIT_S} s: {log.read_text(errors='replace')}"
    msg, ancillary, _, _ = s.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("iII")))
    pid = None
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            pid, _, _ = struct.unpack("iII", data[:struct.calcsize("iII")])
    fields = dict(line.split("=", 1) for line in msg.decode().splitlines())
    return fields, pid


def xdp_program(host: testbed.Host) -> str | None:
    """The name of the XDP program on the host's interface, if any."""
    out = host.run(["ip", "-j", "-d", "link", "show", "dev", host.ifname]).stdout
    (link,) = json.loads(out)
    prog = (link.get("xdp") or {}).get("prog") or {}
    if not prog:   # several modes attached: a list of attachments
        for att in (link.get("xdp") or {}).get("attached", []):
            prog = att.get("prog") or prog
    return prog.get("name")


def tc_egress_filters(host: testbed.Host) -> str:
    return host.run(["tc", "filter", "show", "dev", host.ifname, "egress"]).stdout


def start(argv: list[str], address: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "NOTIFY_SOCKET": address}
    with open(log, "wb") as f:
        return subprocess.Popen([CTSTREAM, *argv], env=env, stdin=subprocess.DEVNULL,
                                stdout=f, stderr=subprocess.STDOUT)


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_ready_comes_from_the_main_process_once_the_programs_are_attached(kind, pin_dir,
                                                                          tmp_path):
    # A pin dir made before by other means, too open: the daemon makes it 0700.
    os.makedirs(pin_dir)
    os.chmod(pin_dir, 0o755)
    log = tmp_path / "events.log"
    s, address = notify_socket(kind, tmp_path)
    with s, testbed.make_pair(prefix="ctsnfy", offloads=False, conntrack=False,
                              index=PAIR_INDEX) as pair:
        server = pair.server
        assert xdp_program(server) is None
        proc = start(["events", "-n", server.netns, "-i", server.ifname, "--egress",
                      "--pin-dir", pin_dir], address, log)
        try:
            fields, pid = receive(s, proc, log)
            os.kill(proc.pid, signal.SIGSTOP)     # as it was when it said READY
            try:
                assert pid == proc.pid            # the main process: NotifyAccess=main
                assert fields["READY"] == "1", fields
                assert fields["STATUS"].startswith(f"tracking on {server.ifname} (+egress)"), fields
                assert xdp_program(server) == "ct_xdp_ingress"
                assert "ct_tc_egress" in tc_egress_filters(server)
                assert stat.S_IMODE(os.stat(pin_dir).st_mode) == 0o700
                assert "ct4" in os.listdir(pin_dir)
            finally:
                os.kill(proc.pid, signal.SIGCONT)
            proc.send_signal(signal.SIGTERM)
            fields, pid = receive(s, proc, log)
            assert pid == proc.pid and fields["STOPPING"] == "1", fields
            assert fields["STATUS"].startswith("stopping"), fields
            assert proc.wait(timeout=WAIT_S) == 0, log.read_text(errors="replace")
            # events without --keep detaches on a requested stop: after STOPPING.
            assert xdp_program(server) is None
            with pytest.raises(BlockingIOError):
                s.recv(4096, socket.MSG_DONTWAIT)   # nothing more: one READY, one STOPPING
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
                proc.wait(timeout=10)
            detach_and_remove(pin_dir)


def test_a_start_that_fails_says_nothing(pin_dir, tmp_path):
    log = tmp_path / "events.log"
    s, address = notify_socket("abstract", tmp_path)
    with s:
        proc = start(["events", "-i", "nosuchif0", "--pin-dir", pin_dir], address, log)
        try:
            assert proc.wait(timeout=WAIT_S) == 1
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
            detach_and_remove(pin_dir)
        assert "no such interface: nosuchif0" in log.read_text(errors="replace")
        with pytest.raises(BlockingIOError):
            s.recv(4096, socket.MSG_DONTWAIT)
