"""Daemon lifecycle: load (or adopt), attach, read the ring, sweep, commit
and ack, and undo it all.

Start order: load (compile, pin, configure; pins already there are adopted)
-> ring reader -> committer -> sweeper task -> attach. Stop runs in reverse
through an AsyncExitStack: detach, a last sweep and drain of the ring, a last
commit and ack, close, unpin. The kernel's state outlives any stop that was
not both requested and asked to remove it: with `keep`, and whenever the
session fails (a dead part, an exception, a start that fails after adopting
pins or attaching), the programs stay attached and the maps pinned, so the
kernel keeps tracking (and keeps the outbox) for the next start to adopt, as
after a SIGKILL. Only a requested stop without `keep`, or a start that fails
before anything was attached to fresh maps, removes them.

Events flow: ring -> sink.ring_writer (the Kafka sink makes its record from
the ring record's bytes; other sinks get an events.Event). The committer makes what was
written durable (sink.commit_async: a file's fsync, Kafka's acknowledgement
or the spool's fsync) and only then acks the DESTROYs among it, which
removes them from the kernel's outbox; a DESTROY the sink could not make
durable is not acked, so the kernel emits it again later. While the sink's
backlog is above MAX_BACKLOG the ring reader pauses: the ring fills, and the
kernel keeps what it cannot emit (missed-event bits, the outbox).
A status file (status_path) is rewritten every second for `ctstream status`;
`observers` are handed a snapshot (status, counters, table bounds) at the
same pace. `parts` (metrics, MQTT) start after the attach and stop first;
they must not fail the daemon for their own troubles.
Signals only set an event. Background parts report failures through
`fail()`, so a dead part stops the daemon loudly instead of silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

from .datapath.config import DatapathConfig
from .errors import ConfigError, StreamerError
from .datapath.events import Clock, Event, LostReport
from .datapath.loader import STATE_DIR, Datapath, acquire_lock, check_environment, ifindex, remove_pins
from .datapath.outbox import Outbox
from .datapath.ringbuf import RingReader, RingSpace
from .delivery.sink import CallbackSink, Sink
from .datapath.sweeper import Sweeper
from .datapath import syncookies
from .datapath.table import read_counters
from .control.server import ControlServer
from .observe import sd_notify

log = logging.getLogger(__name__)

# Counters whose growth the LOST report shows: what the datapath could not
# track or could not deliver.
LOST_COUNTERS = ("ring_full", "table_full", "untracked_packets", "untracked_bytes",
                 "early_drops", "outbox_full")
PRESSURE_INTERVAL = 0.005  # seconds between ticks while above the high watermark
MAX_BACKLOG = 100_000      # events written, not yet committed: the reader pauses above
STATUS_INTERVAL = 1.0


def status_path(pin_dir: str) -> Path:
    """Where the daemon that owns pin_dir writes its status."""
    return STATE_DIR / (pin_dir.strip("/").replace("/", "_") + ".status.json")


@dataclass
class Target:
    """Where to attach: interfaces in one network namespace."""

    ifaces: list[str]
    netns: str | None = None
    egress: bool = False
    ingress: str = "xdp"          # the ingress hook: "xdp" or "tc" (clsact ingress)


@dataclass
class Session:
    cfg: DatapathConfig
    target: Target
    on_event: Callable[[Event], None] | None = None
    sink: Sink | None = None
    keep: bool = False            # leave attached and pinned on stop
    keep_pins: bool = False       # leave the maps pinned (programs detached) on stop
    lost_interval: float = 10.0   # seconds between LOST checks; 0 = off
    dp: Datapath | None = None
    reader: RingReader | None = None
    failure: BaseException | None = None
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    delivered: int = 0
    reader_paused: bool = False
    # Events read from the ring, by abi.EV_* type; those that carried a
    # missed-event mask; DESTROYs that were re-emissions (retries > 0).
    events_by_type: list[int] = field(default_factory=lambda: [0] * 4)
    missed_redelivered: int = 0
    destroy_retries: int = 0
    # Extras with `async start(session)` and `async aclose()`, started last
    # and stopped first; observers get snapshot() every STATUS_INTERVAL.
    parts: list = field(default_factory=list)
    observers: list[Callable[[dict], None]] = field(default_factory=list)
    config: object = None         # the settings.Config the session was made from, if any
    _tasks: list = field(default_factory=list)
    # Set by stop: the programs were left attached and the maps pinned.
    left_state: bool = False
    _crashed: bool = False        # left by an exception, not by stop()
    _attached: bool = False
    status_errors: int = 0        # status file writes that failed
    syn_cookie_seconds: float = 0.0   # time with SYN cookies being sent (snapshot())
    _status_error: str | None = None

    def fail(self, exc: BaseException) -> None:
        if self.failure is None:
            self.failure = exc
        self.stopping.set()

    async def __aenter__(self) -> "Session":
        if self.sink is None:
            self.sink = CallbackSink(self.on_event or (lambda ev: None))
        self._stack = contextlib.AsyncExitStack()
        await self._stack.__aenter__()
        try:
            await self._start()
        except BaseException:
            # Adopted pins hold live entries and unacked DESTROYs, and once
            # attached the programs track: neither is undone by a failed start.
            self._crashed = self._attached or (self.dp is not None and self.dp.adopted)
            await self._stack.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, exc_type, *rest) -> None:
        if exc_type is not None:
            self._crashed = True
        sd_notify.stopping(f"stopping: draining the ring into {self.sink.name}")
        await self._stack.__aexit__(exc_type, *rest)

    def keeps_state(self) -> bool:
        """Whether stopping now leaves the programs attached and the maps pinned."""
        return self.keep or self.failure is not None or self._crashed

    async def _start(self) -> None:
        clock = Clock()
        check_environment()  # before the lock, which needs root to make /run/ctstream
        # A misspelt interface fails here, before anything is loaded, pinned,
        # connected or created on disk.
        ifindexes = await asyncio.to_thread(self._check_target)
        check_selection_interfaces(self.cfg, self.target)
        self._stack.enter_context(acquire_lock(self.cfg.pin_dir))
        self.cfg = await asyncio.to_thread(prepare_syn_cookies, self.cfg, self.target)
        self.dp = Datapath(self.cfg)
        self.dp.ifindexes = ifindexes
        self._stack.callback(self._unpin)
        self.dp.load()
        self._stack.callback(self.dp.close)
        if self.dp.adopted:
            g = self.dp.global_state()
            log.info("adopted the datapath pinned at %s: %d entries, %d in the outbox",
                     self.cfg.pin_dir, g["entries"], g["dying"])

        lock = threading.Lock()
        self.outbox = Outbox(self.dp.prog_fd("ct_ack4"), self.dp.prog_fd("ct_ack6"), lock)
        self._acks: list[tuple[int, bytes, int]] = []
        self._acking: asyncio.Future | None = None   # the ack call in progress
        self._written = asyncio.Event()
        self._last_commit = 0.0
        await self.sink.start()
        self._stack.push_async_callback(self.sink.aclose)

        write, by_type = self.sink.ring_writer(clock), self.events_by_type

        def deliver(view) -> None:   # per record: keep it short
            ack_ref, etype, missed, retries = write(view)
            by_type[etype] += 1
            if missed:
                self.missed_redelivered += 1
            if ack_ref is not None:
                self._acks.append(ack_ref)
                if retries:
                    self.destroy_retries += 1

        def delivered(count: int) -> None:        # after each read of the ring
            self.delivered += count
            self._written.set()
            if not self.reader_paused and self.sink.backlog() > MAX_BACKLOG:
                self.reader_paused = True
                self.reader.stop()

        space = RingSpace(self.dp.fd("ct_events"), self.cfg.ring_bytes)
        self._stack.callback(space.close)
        self.reader = RingReader(self.dp.fd("ct_events"), deliver, on_failure=self.fail,
                                 on_batch=delivered)
        self.reader.start()
        self._stack.callback(self.reader.close)
        self._stack.push_async_callback(self._final_drain)

        self._spawn(self._commit_loop(), "ctstream-committer")
        t = self.cfg.timeouts
        self.sweeper = Sweeper(self.dp.progs_fds(), self.cfg.sweep_budget,
                               global_fd=self.dp.fd("ct_global"),
                               high_entries=self.cfg.early_high_entries(),
                               low_entries=self.cfg.early_low_entries(),
                               horizon_s=t.longest(), lock=lock, room=space.room_records)
        self._spawn(self._sweep_loop(), "ctstream-sweeper")
        if self.lost_interval > 0:
            self._spawn(self._lost_loop(clock), "ctstream-lost")
        self._status_file = status_path(self.cfg.pin_dir)
        self._stack.callback(self._remove_status)
        self._spawn(self._status_loop(), "ctstream-status")
        self._stack.push_async_callback(self._cancel_tasks)

        # Netlink work runs in a worker thread: pyroute2's synchronous API
        # refuses a thread with a running event loop, and entering a network
        # namespace (setns) then changes only that worker thread.
        self._stack.push_async_callback(asyncio.to_thread, self._detach)
        await asyncio.to_thread(self._attach)
        self._attached = True
        for part in self.parts:
            await part.start(self)
            self._stack.push_async_callback(part.aclose)
        # Live applies: `ctstream config apply` and SIGHUP. Without the
        # socket the daemon still tracks; only applies are refused.
        self.control = ControlServer(self)
        try:
            await self.control.start()
        except OSError as exc:
            log.error("control socket %s: %s; `ctstream config apply` cannot reach this daemon",
                      self.control.path, exc)
        self._stack.push_async_callback(self.control.aclose)
        # Type=notify: systemd counts the service as started only now, with
        # every program attached (a failed start never says READY).
        sd_notify.ready(f"tracking on {', '.join(self.target.ifaces)}"
                        f"{' (+egress)' if self.target.egress else ''}, sink {self.sink.name}")

    def _spawn(self, coro, name: str) -> None:
        self._tasks.append(asyncio.create_task(coro, name=name))

    def _check_target(self) -> dict[str, int]:
        return {ifname: ifindex(ifname, self.target.netns) for ifname in self.target.ifaces}

    def _attach(self) -> None:
        if self.dp.adopted:
            self._attached = True   # the previous owner's programs are attached already
        previous = self.dp.previous_attachments() if self.dp.adopted else []
        for ifname in self.target.ifaces:
            if self.target.ingress == "tc":
                self.dp.attach_tc_ingress(ifname, self.target.netns)
            else:
                self.dp.attach_xdp(ifname, self.target.netns)
            if self.target.egress:
                self.dp.attach_tc_egress(ifname, self.target.netns)
        if self.dp.replaced:
            log.warning("replaced %d XDP program(s) of the previous owner in one step: the "
                        "table, the outbox and the counters carry on", self.dp.replaced)
        # What the previous owner attached and this one does not want goes.
        wanted = {(a.ifname, a.kind, a.netns) for a in self.dp.attachments}
        stale = [a for a in previous if (a.ifname, a.kind, a.netns) not in wanted]
        for p in self.dp.detach_list(stale):
            log.error("detach of a previous attachment: %s", p)

    # ---- background parts ---------------------------------------------------
    async def _commit_loop(self) -> None:
        try:
            while True:
                await self._written.wait()
                if self.sink.batch_s:
                    await asyncio.sleep(self.sink.batch_s)
                await self._commit()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.fail(StreamerError(f"sink {self.sink.name}: {exc}"))

    async def _commit(self, final: bool = False) -> None:
        self._written.clear()
        acks, self._acks = self._acks, []
        commit = asyncio.ensure_future(self.sink.commit_async())
        # The commit takes the sink's backlog before its first await: let it
        # start, then let the reader go on while Kafka acknowledges (reading
        # and the round trip overlap).
        await asyncio.sleep(0)
        self._resume_reader()
        refused = await commit
        self._last_commit = time.monotonic()
        if refused:
            acks = [a for a in acks if a not in refused]
        # One ack call at a time, and it overlaps the next commit: Kafka
        # works on the next batch while the kernel's outbox lets go of this
        # one (about 1 us per DESTROY, under the sweeper's lock).
        await self._acks_done()
        if acks:
            self._acking = asyncio.ensure_future(asyncio.to_thread(self.outbox.ack, acks))
            self._acking.add_done_callback(self._acked)
            if final:
                await self._acks_done()
        self._resume_reader()

    async def _acks_done(self) -> None:
        """Wait for the ack call in progress, if any. Shielded: a cancelled
        committer leaves it running, and the final drain waits for it."""
        acking = self._acking
        if acking is not None:
            await asyncio.shield(acking)
            if self._acking is acking:
                self._acking = None

    def _acked(self, fut: asyncio.Future) -> None:
        if not fut.cancelled() and fut.exception() is not None:
            self.fail(StreamerError(f"acking DESTROYs to the kernel's outbox: {fut.exception()}"))

    def _resume_reader(self) -> None:
        if self.reader_paused and self.sink.backlog() <= MAX_BACKLOG // 2:
            self.reader_paused = False
            self.reader.start()

    async def _sweep_loop(self) -> None:
        try:
            while True:
                # In a worker thread (ctypes drops the GIL): a tick with a
                # backlog may take a while and the ring must keep draining.
                res = await asyncio.to_thread(self.sweeper.tick)
                await asyncio.sleep(PRESSURE_INTERVAL if res.pressure else self.cfg.sweep_interval)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.fail(StreamerError(f"sweeper failed: {exc}"))

    async def _lost_loop(self, clock: Clock) -> None:
        prev = self.counters()
        try:
            while True:
                await asyncio.sleep(self.lost_interval)
                cur = self.counters()
                lost = {k: cur[k] - prev[k] for k in LOST_COUNTERS if cur[k] > prev[k]}
                prev = cur
                if lost:
                    totals = {k: cur[k] for k in LOST_COUNTERS}
                    self.sink.write(LostReport(time.time_ns() // 1_000_000, self.lost_interval,
                                               lost, totals=totals))
                    self._written.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.fail(StreamerError(f"loss accounting failed: {exc}"))

    async def _status_loop(self) -> None:
        try:
            while True:
                self.write_status()
                if self.observers:
                    self._observe(self.snapshot())
                elif self.cfg.syn_cookies != "off":   # the time in cookie mode counts on
                    self._syn_state(self.counters())
                await asyncio.sleep(STATUS_INTERVAL)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.fail(StreamerError(f"status file {self._status_file}: {exc}"))

    def status(self) -> dict:
        g = self.dp.global_state()
        return {"pid": os.getpid(), "pin_dir": self.cfg.pin_dir, "time": time.time(),
                "generation": self.dp.generation, "syn_cookie_mode": self.cfg.syn_cookies,
                "syn_cookie_seconds": round(self.syn_cookie_seconds, 1),
                "events_delivered": self.delivered, "reader_paused": self.reader_paused,
                "sink": self.sink.name, "entries": g["entries"], "outbox": g["dying"],
                "last_commit_age_s": (time.monotonic() - self._last_commit
                                      if self._last_commit else None),
                **self.sink.status()}

    def snapshot(self) -> dict:
        """status() with the datapath counters and the table's bounds."""
        counters = self.counters()
        return {**self.status(), "counters": counters, "syn_cookies": self._syn_state(counters),
                "table_limit": self.cfg.table_limit,
                "table_high": self.cfg.early_high_entries(),
                "table_low": self.cfg.early_low_entries(), "monotonic": time.monotonic()}

    def _syn_state(self, counters: dict) -> dict:
        """SYN-cookie mode: the setting, whether cookies are being sent
        (on: always; auto: some were since the last snapshot) and the
        seconds spent so (one snapshot interval at a time)."""
        now = time.monotonic()
        sent = counters.get("syn_cookies_sent", 0) + counters.get("syn_cookie_kernel_syns", 0)
        prev, at = getattr(self, "_syn_prev", (sent, now))
        mode = self.cfg.syn_cookies
        active = mode == "on" or (mode == "auto" and sent > prev)
        if active:
            self.syn_cookie_seconds += now - at
        self._syn_prev = (sent, now)
        return {"mode": mode, "active": active, "seconds": self.syn_cookie_seconds}

    def _observe(self, snap: dict) -> None:
        for fn in self.observers:
            try:
                fn(snap)
            except Exception as exc:  # an observer's trouble is its own
                log.error("status observer %s failed: %s", getattr(fn, "__qualname__", fn), exc)

    def write_status(self) -> None:
        """Rewrite the status file. A disk that refuses it (full, read-only)
        is said once and counted; it never stops the daemon."""
        tmp = self._status_file.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(self.status()))
            os.replace(tmp, self._status_file)
        except OSError as exc:
            self.status_errors += 1
            why = f"{exc.strerror} ({exc.filename or self._status_file})"
            if why != self._status_error:
                log.error("status file %s cannot be written: %s; `ctstream status` shows "
                          "older figures until it can", self._status_file, why)
            self._status_error = why
            with contextlib.suppress(OSError):
                tmp.unlink()
            return
        if self._status_error is not None:
            log.warning("status file %s: written again", self._status_file)
        self._status_error = None

    def _remove_status(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._status_file.unlink()

    async def _cancel_tasks(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    # ---- stop ------------------------------------------------------------------
    def _detach(self) -> None:
        if self.keeps_state():
            self.left_state = True
            why = "as asked" if self.keep and not (self.failure or self._crashed) else \
                "because the daemon failed"
            log.warning("the programs stay attached and the maps pinned at %s (%s): the "
                        "kernel keeps tracking and keeps unacked DESTROYs; the next start "
                        "with this pin dir adopts them, `ctstream detach --pin-dir %s` "
                        "removes them", self.cfg.pin_dir, why, self.cfg.pin_dir)
            return
        problems = self.dp.detach_all()
        for p in problems:
            log.error("detach: %s", p)
        _restore_sysctls(self.cfg.pin_dir)

    async def _final_drain(self) -> None:
        try:
            await asyncio.to_thread(self.sweeper.tick)
            await self._acks_done()
            self.reader.drain()
            await self._commit(final=True)
        except Exception as exc:
            log.error("final drain of the event ring failed: %s", exc)

    def _unpin(self) -> None:
        if not (self.keeps_state() or self.keep_pins):
            remove_pins(self.cfg.pin_dir)

    # ---- live configuration ------------------------------------------------------
    def reconfigure(self, new: DatapathConfig, lost_interval: float | None = None) -> list[str]:
        """Apply what can change while the datapath runs: the timeouts, the
        report interval, the event mask, the grace, the early-drop
        watermarks, the full-table policy and the traffic selection become
        the next configuration generation (the programs see the whole old
        or the whole new one, never a mix: streamer/datapath/generation.py)
        and reach the sweeper; the LOST interval takes effect at its next
        report. The sizes of the maps, the pin dir and the XDP mode need a
        new load: ConfigError names them and nothing changes. Returns what
        changed, as 'setting: old -> new'; dp.generation is the one now in
        force."""
        from .settings import reload_needed

        new = replace(new).validate()
        blocked = reload_needed(self.cfg, new)
        if blocked:
            raise ConfigError("cannot change while the datapath runs (restart the daemon): "
                              + ", ".join(blocked))
        if getattr(self, "target", None) is not None:
            check_selection_interfaces(new, self.target)
            new = prepare_syn_cookies(new, self.target)
        changed = [_change(f.name, getattr(self.cfg, f.name), getattr(new, f.name))
                   for f in fields(DatapathConfig) if getattr(self.cfg, f.name) != getattr(new, f.name)]
        old = self.cfg
        with self.sweeper.lock:
            self.dp.cfg = new
            try:
                self.dp.configure()
            except BaseException:
                self.dp.cfg = old       # the generation in force is still the old one
                raise
            self.cfg = new
            if new.syn_cookies == "off" and old.syn_cookies != "off":
                _restore_sysctls(new.pin_dir)
            self.sweeper.set_watermarks(new.early_high_entries(), new.early_low_entries(),
                                        new.timeouts.longest())
        if lost_interval is not None and lost_interval != self.lost_interval:
            changed.append(f"lost_interval: {self.lost_interval} -> {lost_interval}")
            self.lost_interval = lost_interval
        return changed

    # ---- state -----------------------------------------------------------------
    def counters(self) -> dict:
        return read_counters(self.dp.fd("ct_stats"), self.dp.fd("ct_global"),
                             self.dp.fd("ct_syn_stats"))

    def entries(self) -> int:
        return self.dp.global_state()["entries"]

    async def wait_until_empty(self, timeout: float) -> bool:
        """Wait until every tracked connection has expired and its DESTROY
        was acked (bounded)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline and not self.stopping.is_set():
            if self.entries() == 0:
                self.reader.drain()
                return True
            await asyncio.sleep(0.2)
        return self.entries() == 0


def _change(name: str, old, new) -> str:
    if name == "selection":
        return f"selection: {_selection_summary(old)} -> {_selection_summary(new)}"
    return f"{name}: {old} -> {new}"


def _selection_summary(sel) -> str:
    """A short form: a file of 10,000 prefixes makes no 400 KiB log line."""
    if not sel.active():
        return "every flow"
    def one(s) -> str:
        if len(s.track) + len(s.ignore) <= 4:
            return (f"track {','.join(map(str, s.track)) or '-'} "
                    f"ignore {','.join(map(str, s.ignore)) or '-'}")
        return f"{len(s.track)} track and {len(s.ignore)} ignore prefixes"
    out = one(sel.top)
    for name, s in sel.interfaces:
        if s:
            out += f"; {name}: {one(s)}"
    return out


def prepare_syn_cookies(cfg: DatapathConfig, target: Target) -> DatapathConfig:
    """With syn-cookies on or auto: refuse a setup cookies cannot work in,
    set the kernel's sysctls (streamer/datapath/syncookies.py) and give the
    programs the window scale the kernel will use. Returns the config to load."""
    if cfg.syn_cookies == "off":
        return cfg
    if target.ingress != "xdp":
        raise ConfigError("syn-cookies needs the xdp ingress hook (cookies are answered with "
                          "XDP_TX), not --ingress-hook tc", setting="syn-cookies")
    syncookies.check(target.netns)
    cfg = replace(cfg, syn_wscale=syncookies.window_scale(target.netns))
    changed = syncookies.enable(cfg.pin_dir, target.netns)
    if changed:
        log.info("syn-cookies %s: set %s (restored when cookies go off or the programs are "
                 "detached)", cfg.syn_cookies,
                 ", ".join(f"{n.replace('/', '.')}={v}" for n, v in changed.items()))
    return cfg


def _restore_sysctls(pin_dir: str) -> None:
    back = syncookies.restore(pin_dir)
    if back:
        log.info("syn-cookies off: restored %s",
                 ", ".join(f"{n.replace('/', '.')}={v}" for n, v in back.items()))


def check_selection_interfaces(cfg: DatapathConfig, target: Target) -> None:
    """Per-interface prefixes may only name interfaces the daemon tracks."""
    for name, sel in cfg.selection.interfaces:
        if sel and name not in target.ifaces:
            raise ConfigError(f"interfaces.{name}: prefixes for an interface this daemon does "
                              f"not track (it tracks {', '.join(target.ifaces)})",
                              setting="interfaces")


def install_signal_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
