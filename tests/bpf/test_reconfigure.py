"""Session.reconfigure on a real loaded datapath: what may change live goes
into the ct_config map in one update and into the sweeper; what needs a new
load (map sizes) is refused, naming it, and changes nothing."""

from __future__ import annotations

import dataclasses
import threading

import pytest

from streamer.daemon import Session
from streamer.datapath import abi, bpfsys
from streamer.datapath.config import DatapathConfig, Timeouts
from streamer.datapath.generation import config_in_force
from streamer.datapath.sweeper import Sweeper
from streamer.errors import ConfigError

pytestmark = pytest.mark.root


def config_map(dp) -> bytes:
    """The ct_config slot in force."""
    return config_in_force(dp.fd("ct_config"), dp.fd("ct_meta"))


def session_on(dp) -> Session:
    s = object.__new__(Session)        # only what reconfigure uses
    s.cfg, s.dp, s.lost_interval = dp.cfg, dp, 10.0
    s.sweeper = Sweeper(dp.progs_fds(), dp.cfg.sweep_budget, global_fd=dp.fd("ct_global"),
                        high_entries=dp.cfg.early_high_entries(),
                        low_entries=dp.cfg.early_low_entries(),
                        horizon_s=dp.cfg.timeouts.longest(), lock=threading.Lock())
    return s


def test_live_settings_reach_the_kernel_and_the_sweeper(datapath_factory):
    dp = datapath_factory(table_limit=4096)
    s = session_on(dp)
    assert config_map(dp) == dp.cfg.map_config_bytes()
    new = dataclasses.replace(dp.cfg, timeouts=Timeouts(udp=3, established=120), grace=5,
                              report_interval=0, early_drop_high=0.5, early_drop_low=0.25,
                              drop_untracked=True)
    changed = s.reconfigure(new, lost_interval=2.0)
    assert config_map(dp) == new.map_config_bytes() != DatapathConfig(table_limit=4096).map_config_bytes()
    assert (s.sweeper.high, s.sweeper.low) == (2048, 1024)
    assert s.lost_interval == 2.0 and s.cfg.grace == 5
    assert any(c.startswith("grace: 15.0 -> 5") for c in changed), changed
    assert any(c.startswith("lost_interval") for c in changed), changed


def test_what_needs_a_reload_is_refused_and_nothing_changes(datapath_factory):
    dp = datapath_factory(table_limit=4096)
    s = session_on(dp)
    before = config_map(dp)
    for change, says in ((dict(table_limit=8192), "table-size: 4096 -> 8192"),
                         (dict(ring_bytes=1 << 20), "ring-size"),
                         (dict(ipv6_limit=1024), "ipv6-limit")):
        new = dataclasses.replace(dp.cfg, grace=5, **change)
        with pytest.raises(ConfigError, match=says):
            s.reconfigure(new)
        assert config_map(dp) == before and s.cfg.grace == 15.0
    with pytest.raises(ConfigError, match="grace"):
        s.reconfigure(dataclasses.replace(dp.cfg, grace=1))    # validated first
    assert config_map(dp) == before
