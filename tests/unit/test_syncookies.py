"""The daemon's side of SYN cookies that needs no kernel: the window scale
the SYN-ACK offers, and the setups cookies are refused in."""

import pytest

from streamer.daemon import Target, prepare_syn_cookies
from streamer.datapath.config import DatapathConfig
from streamer.datapath.syncookies import scale_for
from streamer.errors import ConfigError


@pytest.mark.parametrize("space,scale", [
    (6 << 20, 7),          # tcp_rmem's usual maximum, 6 MiB
    (32 << 20, 10),        # 32 MiB
    (65535, 0),            # fits 16 bits unscaled
    (1 << 16, 1),
    (1 << 40, 14),         # the protocol's limit
])
def test_window_scale_is_the_kernels(space, scale):
    assert scale_for(space) == scale


def test_cookies_need_the_xdp_hook():
    cfg = DatapathConfig(syn_cookies="on")
    with pytest.raises(ConfigError, match="syn-cookies needs the xdp ingress hook"):
        prepare_syn_cookies(cfg, Target(["eth0"], ingress="tc"))


def test_off_touches_nothing():
    cfg = DatapathConfig()
    assert prepare_syn_cookies(cfg, Target(["eth0"], ingress="tc")) is cfg
