"""A daemon that fails never gives up the kernel's state: it exits 1, says
on stderr that the programs stay attached and the maps pinned, and the
kernel goes on tracking (and holding the DESTROYs nobody acked) for the next
start to adopt, exactly as after a SIGKILL. Here `ctstream events` writes
its jsonl sink on a 64 KB tmpfs of the test's own, which fills under real
traffic: the sink's write fails, and with it the daemon."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pytest

from streamer.demo import testbed
from tests.netns.test_cli import CTSTREAM, ctstream, detach_and_remove
from tests.netns.test_reliability import TCP_PORT, TIMEOUTS, Daemon, stats, xdp_attached

pytestmark = pytest.mark.root

PAIR_INDEX = 34


@contextlib.contextmanager
def small_fs(path: Path, size: str):
    """A tmpfs of `size` at `path`, unmounted afterwards whatever happens."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                   check=True, timeout=10)
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], timeout=30)
        assert str(path) not in Path("/proc/mounts").read_text(), f"{path} still mounted"


def test_a_failing_daemon_leaves_the_datapath_attached_and_says_so(pin_dir, tmp_path):
    with testbed.make_pair(prefix="ctsfail", offloads=False, conntrack=False,
                           index=PAIR_INDEX) as pair, \
            small_fs(tmp_path / "disk", "64k") as disk:
        d = Daemon([CTSTREAM, "events", "-n", pair.server.netns, "-i", pair.server.ifname,
                    "--egress", "--pin-dir", pin_dir, "--sink", f"jsonl:{disk / 'ev.jsonl'}",
                    *TIMEOUTS], tmp_path / "events.log")
        try:
            pair.tcp_many(400, family=4, port=TCP_PORT, concurrency=8, timeout=60)
            rc = d.proc.wait(timeout=60)
            out = d.output()
            assert rc == 1, out
            assert "No space left" in out, out
            assert "stay attached and the maps pinned" in out and "because the daemon failed" in out
            assert "Traceback" not in out, out
            # Nothing was given up: attached, pinned, and the kernel tracks on.
            assert xdp_attached(pair.server) and os.listdir(pin_dir)
            before = stats(pin_dir)
            pair.tcp_many(50, family=4, port=TCP_PORT, concurrency=8, timeout=60)
            after = stats(pin_dir)
            assert after["created"] - before["created"] == 50, (before, after)
            # `ctstream detach` is the explicit way to give it up.
            res = ctstream("detach", "--pin-dir", pin_dir)
            assert res.returncode == 0, res.stderr
            assert not xdp_attached(pair.server) and not os.path.exists(pin_dir)
        finally:
            if d.proc.poll() is None:
                d.proc.kill()
                d.proc.wait(timeout=10)
            detach_and_remove(pin_dir)
