"""Daemon lifecycle: load, attach, read the ring, sweep, and undo it all.

Start order: load (compile, pin, configure) -> ring reader -> sweeper task
-> attach. Stop runs in reverse through an AsyncExitStack: detach, a last
sweep and drain of the ring, close, unpin. Signals only set an event. The
sweeper task and the ring reader each report a failure through `fail()`, so
a dead background part stops the daemon loudly instead of silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass, field
from typing import Callable

from . import abi
from .config import DatapathConfig
from .errors import StreamerError
from .events import Clock, Event
from .loader import Datapath, acquire_lock, check_environment, remove_pins
from .ringbuf import RingReader
from .sweeper import Sweeper

log = logging.getLogger(__name__)


@dataclass
class Target:
    """Where to attach: interfaces in one network namespace."""

    ifaces: list[str]
    netns: str | None = None
    egress: bool = False


@dataclass
class Session:
    cfg: DatapathConfig
    target: Target
    on_event: Callable[[Event], None]
    keep_pins: bool = False
    dp: Datapath | None = None
    reader: RingReader | None = None
    failure: BaseException | None = None
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _sweep_task: asyncio.Task | None = None

    def fail(self, exc: BaseException) -> None:
        if self.failure is None:
            self.failure = exc
        self.stopping.set()

    async def __aenter__(self) -> "Session":
        self._stack = contextlib.AsyncExitStack()
        await self._stack.__aenter__()
        try:
            await self._start()
        except BaseException:
            await self._stack.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await self._stack.__aexit__(*exc)

    async def _start(self) -> None:
        clock = Clock()
        check_environment()  # before the lock, which needs root to make /run/ctstream
        self._stack.enter_context(acquire_lock(self.cfg.pin_dir))
        self.dp = Datapath(self.cfg)
        self._stack.callback(self._unpin)
        self.dp.load()
        self._stack.callback(self.dp.close)
        if self.dp.adopted:
            log.info("adopted the datapath pinned at %s", self.cfg.pin_dir)

        def deliver(raw: abi.RawEvent) -> None:
            self.on_event(Event.from_raw(raw, clock))

        self.reader = RingReader(self.dp.fd("ct_events"), deliver, on_failure=self.fail)
        self.reader.start()
        self._stack.callback(self.reader.close)
        self._stack.callback(self._final_drain)

        self.sweeper = Sweeper(self.dp.prog_fd("ct_sweep4"), self.dp.prog_fd("ct_sweep6"),
                               self.cfg.sweep_budget)
        self._sweep_task = asyncio.create_task(self._sweep_loop(), name="ctstream-sweeper")
        self._stack.push_async_callback(self._cancel_sweeper)

        # Netlink work runs in a worker thread: pyroute2's synchronous API
        # refuses a thread with a running event loop, and entering a network
        # namespace (setns) then changes only that worker thread.
        self._stack.push_async_callback(asyncio.to_thread, self._detach)
        await asyncio.to_thread(self._attach)

    def _attach(self) -> None:
        for ifname in self.target.ifaces:
            self.dp.attach_xdp(ifname, self.target.netns)
            if self.target.egress:
                self.dp.attach_tc_egress(ifname, self.target.netns)

    async def _sweep_loop(self) -> None:
        try:
            while True:
                # In a worker thread (ctypes drops the GIL): a tick with a
                # backlog may take a while and the ring must keep draining.
                await asyncio.to_thread(self.sweeper.tick)
                await asyncio.sleep(self.cfg.sweep_interval)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.fail(StreamerError(f"sweeper failed: {exc}"))

    async def _cancel_sweeper(self) -> None:
        if self._sweep_task:
            self._sweep_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweep_task

    def _detach(self) -> None:
        problems = self.dp.detach_all()
        for p in problems:
            log.error("detach: %s", p)

    def _final_drain(self) -> None:
        try:
            self.sweeper.tick()
            self.reader.drain()
        except Exception as exc:
            log.error("final drain of the event ring failed: %s", exc)

    def _unpin(self) -> None:
        if not self.keep_pins:
            remove_pins(self.cfg.pin_dir)

    def entries(self) -> int:
        return self.dp.global_state()["entries"]

    async def wait_until_empty(self, timeout: float) -> bool:
        """Wait until every tracked connection has expired (bounded)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline and not self.stopping.is_set():
            if self.entries() == 0:
                self.reader.drain()
                return True
            await asyncio.sleep(0.2)
        return self.entries() == 0


def install_signal_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
