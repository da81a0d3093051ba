"""Entering a named network namespace for attach and detach.

`ip netns exec` also gives the command a new mount namespace with a fresh
/sys, which hides the bpffs mounted at /sys/fs/bpf and so our pinned maps.
ctstream therefore switches only its network namespace itself (setns), and
only for the netlink work that needs it: maps and pins are not per-netns.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading

from ..errors import InterfaceError

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise InterfaceError(f"cannot enter network namespace: {os.strerror(e)}")


@contextlib.contextmanager
def entered(name: str | None):
    """Run the body inside network namespace `name` (None: stay where we are)."""
    if not name:
        yield
        return
    path = name if name.startswith("/") else f"/run/netns/{name}"
    try:
        target = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise InterfaceError(f"no network namespace {name!r} ({path}: {exc.strerror})") from exc
    home = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)
