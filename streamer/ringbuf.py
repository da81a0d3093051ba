"""The asyncio ring-buffer reader: no thread, no busy polling.

libbpf's ring buffer manager exposes an epoll fd that becomes readable when
the kernel has submitted records; the event loop watches it and drains the
ring in one call, which decodes each record and hands it on.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from . import abi, bpfsys
from .errors import AbiError

log = logging.getLogger(__name__)


class RingReader:
    def __init__(self, map_fd: int, on_event: Callable[[abi.RawEvent], None],
                 on_failure: Callable[[BaseException], None] | None = None):
        self._on_event = on_event
        self._on_failure = on_failure
        self._ring = bpfsys.RingBuffer(map_fd, self._record)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.records = 0
        self.rejected = 0
        self.failure: BaseException | None = None

    def _record(self, mv: memoryview) -> None:
        self.records += 1
        try:
            ev = abi.decode_event(mv)
        except AbiError as exc:
            self.rejected += 1
            log.warning("dropping a ring record: %s", exc)
            return
        self._on_event(ev)

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._loop.add_reader(self._ring.epoll_fd, self._readable)

    def _readable(self) -> None:
        try:
            self.drain()
        except Exception as exc:  # a reader that dies must not die silently
            self.failure = exc
            self.stop()
            if self._on_failure is None:
                raise
            self._on_failure(exc)

    def drain(self) -> int:
        """Consume everything in the ring now; returns the number of records."""
        return self._ring.consume()

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._ring.epoll_fd)
            self._loop = None

    def close(self) -> None:
        self.stop()
        self._ring.close()


RECORD_BYTES = 8 + abi.EVENT_SIZE   # a ring record: 8-byte header, then the event


class RingSpace:
    """How full the event ring is, from its consumer and producer positions:
    the first two pages of a BPF ring buffer map, which any process may map
    read-only (what BPF_RB_AVAIL_DATA reports in the kernel; BCC 0.26 cannot
    call that helper). The sweeper is handed the room that is left, so a
    burst of expiries waits for the reader instead of becoming missed events.
    The headroom is left for the packet path."""

    def __init__(self, map_fd: int, ring_bytes: int):
        import mmap

        self.size = ring_bytes
        self.headroom = min(ring_bytes // 4, 64 << 10)
        page = mmap.PAGESIZE
        self._cons = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ, offset=0)
        self._prod = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)

    def used_bytes(self) -> int:
        cons = int.from_bytes(self._cons[:8], "little")
        prod = int.from_bytes(self._prod[:8], "little")
        return max(0, prod - cons)

    def room_records(self) -> int:
        """Events that may still be written, leaving the headroom free."""
        return max(0, (self.size - self.headroom - self.used_bytes()) // RECORD_BYTES)

    def close(self) -> None:
        self._cons.close()
        self._prod.close()
