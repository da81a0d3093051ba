"""streamer.observe.sd_notify: systemd's notification datagrams, received on
real AF_UNIX sockets of the test's own (a path and an abstract name).
tests/netns/test_sd_notify.py runs it in a real daemon."""

from __future__ import annotations

import logging
import socket
import uuid

import pytest

from streamer.observe import sd_notify


def receiver(abstract: bool, tmp_path) -> tuple[socket.socket, str]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"ctstest-notify-{uuid.uuid4().hex}"
        s.bind(b"\0" + name.encode())
        return s, "@" + name
    path = str(tmp_path / "notify.sock")
    s.bind(path)
    return s, path


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_ready_and_stopping_arrive_as_one_datagram_each(abstract, tmp_path, monkeypatch):
    s, address = receiver(abstract, tmp_path)
    s.settimeout(10)
    with s:
        monkeypatch.setenv("NOTIFY_SOCKET", address)
        assert sd_notify.ready("tracking on eth0\nand more")
        assert s.recv(4096) == b"READY=1\nSTATUS=tracking on eth0 and more"
        assert sd_notify.stopping("stopping")
        assert s.recv(4096) == b"STOPPING=1\nSTATUS=stopping"


def test_socket_addresses():
    assert sd_notify.socket_address("@sd/notify") == b"\0sd/notify"
    assert sd_notify.socket_address("/run/systemd/notify") == "/run/systemd/notify"
    for value in (None, "", "vsock:2:1234", "relative/path"):
        assert sd_notify.socket_address(value) is None


def test_without_notify_socket_nothing_is_sent(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sd_notify.notify("READY=1") is False


def test_a_dead_socket_is_logged_not_raised(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    with caplog.at_level(logging.WARNING, logger=sd_notify.__name__):
        assert sd_notify.ready("tracking") is False
    assert "READY=1" in caplog.text and "nobody-listens" in caplog.text
