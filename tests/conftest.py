"""Shared fixtures. Tests that need root, the kernel's BPF or namespaces are
marked `root`: outside CI they skip when that is missing; in CI (CI=true) they
run or fail, never skip."""

from __future__ import annotations

import os
import shutil
import uuid

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_collection_modifyitems(config, items):
    if os.geteuid() == 0 or IN_CI:
        return
    skip = pytest.mark.skip(reason="needs root (BPF, network namespaces)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def pin_dir():
    """A private bpffs pin directory, removed afterwards whatever happens."""
    path = f"/sys/fs/bpf/ctstest_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    yield path
    shutil.rmtree(path, ignore_errors=True)
    # the control socket a SIGKILLed daemon of this pin dir left behind
    from streamer.control.server import control_path
    control_path(path).unlink(missing_ok=True)


@pytest.fixture
def datapath_factory(pin_dir):
    """Load the real datapath (BCC, real kernel) with a given configuration;
    everything loaded is detached, closed and unpinned afterwards."""
    from streamer.datapath.config import DatapathConfig
    from streamer.datapath.loader import Datapath

    made = []

    def make(**kw) -> Datapath:
        kw.setdefault("pin_dir", pin_dir)
        dp = Datapath(DatapathConfig(**kw)).load()
        made.append(dp)
        return dp

    yield make
    for dp in made:
        dp.detach_all()
        dp.close()
    shutil.rmtree(pin_dir, ignore_errors=True)
