"""The kernel's half of XDP SYN cookies (bpf/syn_cookie.h): its sysctls.

XDP answers a SYN with a cookie the kernel's own TCP would have chosen; the
client's ACK then goes to the kernel, which opens the connection through its
syncookie path. For that path to take the ACK:

- net.ipv4.tcp_syncookies must be 2: the kernel takes a cookie only for a
  listener that sent cookies itself in the last two minutes, and with 2 it
  cookies every SYN it sees, among them the one per listener and 30 s that
  XDP passes to it for that reason;
- net.ipv4.tcp_timestamps must be 2 (timestamps, without the per-connection
  random offset): the options travel in our TSval's low bits, and with 1 the
  kernel would subtract a secret offset from the echo before reading them;
- tcp_sack and tcp_window_scaling must be on: a cookie that carries an option
  the kernel has off is refused.

While cookies are on (or auto) the daemon sets the first two and puts the
values it found back when they go off or the programs are detached. The
values found are kept beside the pin dir's status, so that a later daemon or
`ctstream detach` restores them too. All of these are per network namespace.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import ConfigError
from . import netns as netns_mod

from .loader import STATE_DIR
WANT = {"net/ipv4/tcp_syncookies": "2", "net/ipv4/tcp_timestamps": "2"}
NEEDED_ON = ("net/ipv4/tcp_sack", "net/ipv4/tcp_window_scaling")
TCP_MAX_WSCALE = 14


def saved_path(pin_dir: str) -> Path:
    return STATE_DIR / (pin_dir.strip("/").replace("/", "_") + ".sysctl.json")


def _read(name: str) -> str:
    with open(f"/proc/sys/{name}") as f:
        return f.read().strip()


def _write(name: str, value: str) -> None:
    with open(f"/proc/sys/{name}", "w") as f:
        f.write(value)


def window_scale(netns: str | None = None) -> int:
    """The receive window scale the kernel gives a connection opened by a
    cookie: from the largest receive buffer a socket may have (tcp_rmem's
    maximum, rmem_max), as tcp_select_initial_window computes it."""
    with netns_mod.entered(netns):
        tcp_rmem = int(_read("net/ipv4/tcp_rmem").split()[2])
        rmem_max = int(_read("net/core/rmem_max"))
    return scale_for(max(tcp_rmem, rmem_max))


def scale_for(space: int) -> int:
    """The window scale for a receive space of `space` bytes: the shift that
    makes it fit the 16-bit window field (ilog2(space) - 15, in [0, 14])."""
    return max(0, min(TCP_MAX_WSCALE, space.bit_length() - 1 - 15))


def check(netns: str | None = None) -> None:
    """Refuse what would make the kernel turn every cookie ACK away."""
    with netns_mod.entered(netns):
        off = [n for n in NEEDED_ON if _read(n) == "0"]
        ts = _read("net/ipv4/tcp_timestamps")
    if off:
        raise ConfigError(f"syn-cookies: {', '.join(n.replace('/', '.') for n in off)} is 0; "
                          f"the kernel refuses a cookie that carries an option it has off",
                          setting="syn-cookies")
    if ts == "0":
        raise ConfigError("syn-cookies: net.ipv4.tcp_timestamps is 0; cookies carry window "
                          "scale and SACK in the timestamp (set it to 2)", setting="syn-cookies")


def enable(pin_dir: str, netns: str | None = None) -> dict[str, str]:
    """Set the sysctls cookies need; the values found are saved (once: a
    second enable keeps the first values found). Returns what changed."""
    path = saved_path(pin_dir)
    saved = _load(path)
    changed = {}
    with netns_mod.entered(netns):
        for name, value in WANT.items():
            cur = _read(name)
            if cur != value:
                saved.setdefault(name, cur)
                _write(name, value)
                changed[name] = value
    if changed:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"netns": netns, "values": saved}))
        os.replace(tmp, path)
    return changed


def restore(pin_dir: str) -> dict[str, str]:
    """Put back the sysctls enable() changed, in the namespace it changed
    them in; nothing to do if it changed none."""
    path = saved_path(pin_dir)
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    values = d.get("values", {})
    try:
        with netns_mod.entered(d.get("netns")):
            for name, value in values.items():
                _write(name, value)
    except (OSError, Exception):     # the namespace may be gone: nothing left to restore
        pass
    path.unlink(missing_ok=True)
    return values


def _load(path: Path) -> dict[str, str]:
    try:
        return dict(json.loads(path.read_text()).get("values", {}))
    except (OSError, ValueError):
        return {}
