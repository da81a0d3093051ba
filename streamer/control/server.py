"""The daemon's side of a live apply.

`ctstream config apply FILE` and SIGHUP (which re-reads the daemon's own
--config) make a new Config the way the start did (the daemon's command
line over the file over the defaults), refuse it when a setting that cannot
change while running differs (map sizes, the pin dir, Kafka, the
interfaces, ...), and hand the datapath part to Session.reconfigure, which
writes it as the next configuration generation. A refused file changes
nothing. The control socket is a UNIX stream socket under /run/ctstream,
root only, one JSON request and one JSON reply per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from pathlib import Path

from .. import settings
from ..datapath.loader import STATE_DIR
from ..errors import ConfigError, StreamerError

log = logging.getLogger(__name__)

# The settings a live apply may change; the `interfaces` tables too.
LIVE_SETTINGS = frozenset(
    [s.name for s in settings.SETTINGS if s.name.startswith("timeout-")] +
    ["report-interval", "event-mask", "grace", "early-drop", "drop-untracked",
     "track-prefixes", "ignore-prefixes", "lost-interval", "syn-cookies", "syn-cookie-rate",
     "syn-cookie-high"])
_LIVE_KEYS = frozenset([settings.BY_NAME[n].key for n in LIVE_SETTINGS] + ["interfaces"])
MAX_REQUEST = 1 << 16


def control_path(pin_dir: str) -> Path:
    """The control socket of the daemon that owns pin_dir."""
    return STATE_DIR / (pin_dir.strip("/").replace("/", "_") + ".ctl")


def restart_needed(old: settings.Config, new: settings.Config) -> list[str]:
    """The settings that differ between two Configs and cannot change live."""
    out = []
    for s in settings.settings_of(old.command):
        if s.key in _LIVE_KEYS:
            continue
        a, b = old.values.get(s.key), new.values.get(s.key)
        if a != b:
            out.append(s.name)
    return out


class ControlServer:
    """Serves applies for one Session: the control socket and SIGHUP."""

    def __init__(self, session):
        self.session = session
        self.path = control_path(session.cfg.pin_dir)
        self._server: asyncio.AbstractServer | None = None
        self._lock = asyncio.Lock()
        self._hup = False
        self.applies = 0

    async def start(self) -> None:
        STATE_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()          # left by a daemon that died (the pin dir lock is ours)
        self._server = await asyncio.start_unix_server(self._client, path=str(self.path),
                                                       limit=MAX_REQUEST)
        os.chmod(self.path, 0o600)
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._on_hup)
            self._hup = True

    async def aclose(self) -> None:
        if self._hup:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            self._hup = False
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    # ---- applies -------------------------------------------------------------
    async def apply_file(self, path: str) -> dict:
        """Apply a settings file; the reply: ok, generation, changed (or error)."""
        s = self.session
        old = s.config
        if old is None:
            return {"ok": False, "error": "this daemon was not started from settings; "
                    "nothing to apply to"}
        async with self._lock:
            try:
                new = settings.build(old.command, old.options or {}, path)
                blocked = restart_needed(old, new)
                if blocked:
                    raise ConfigError("cannot change while the daemon runs (restart it): "
                                      + ", ".join(blocked))
                changed = await asyncio.to_thread(s.reconfigure, new.datapath,
                                                  new.values["lost_interval"])
            except (ConfigError, StreamerError) as exc:
                return {"ok": False, "error": str(exc),
                        "kind": "config" if isinstance(exc, ConfigError) else "datapath"}
            new.datapath = s.cfg
            s.config = new
            self.applies += 1
            gen = s.dp.generation
        log.warning("configuration from %s applied: generation %d in force%s", path, gen,
                    (" (" + "; ".join(changed) + ")") if changed else " (nothing changed)")
        return {"ok": True, "generation": gen, "changed": changed}

    def _on_hup(self) -> None:
        cfg = self.session.config
        path = cfg.config_file if cfg is not None else None
        if not path:
            log.error("SIGHUP: this daemon was started without --config, there is no file "
                      "to read again (`ctstream config apply FILE` applies one)")
            return
        task = asyncio.ensure_future(self.apply_file(path))
        task.add_done_callback(self._hup_done)

    @staticmethod
    def _hup_done(task: asyncio.Future) -> None:
        if task.cancelled():
            return
        if task.exception() is not None:
            log.error("SIGHUP: the apply failed: %s", task.exception())
            return
        reply = task.result()
        if not reply["ok"]:
            log.error("SIGHUP: nothing changed: %s", reply["error"])

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                line = await asyncio.wait_for(reader.readline(), 10)
                req = json.loads(line)
                if not isinstance(req, dict):
                    raise ValueError("not an object")
            except (ValueError, asyncio.LimitOverrunError, asyncio.TimeoutError) as exc:
                reply = {"ok": False, "error": f"bad request: {exc}"}
            else:
                if req.get("op") == "apply" and isinstance(req.get("path"), str):
                    reply = await self.apply_file(req["path"])
                elif req.get("op") == "generation":
                    reply = {"ok": True, "generation": self.session.dp.generation}
                else:
                    reply = {"ok": False, "error": f"unknown request {req.get('op')!r}"}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        except Exception as exc:        # a client's trouble never stops the daemon
            log.error("control socket: %s", exc)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def request(pin_dir: str, req: dict, timeout: float = 60.0) -> dict:
    """Send one request to the daemon of pin_dir (a blocking client)."""
    import socket

    path = control_path(pin_dir)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise StreamerError(f"no daemon is running with pin dir {pin_dir} (nothing "
                                f"listens at {path}): nothing was changed") from exc
        sock.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
    if not buf:
        raise StreamerError(f"the daemon with pin dir {pin_dir} closed the control socket "
                            "without a reply")
    return json.loads(buf)
