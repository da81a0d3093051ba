"""The daemon's half of the dying outbox: acknowledgements.

An ended connection's copy waits in the kernel's outbox (bpf/ct_table.h)
until the daemon acks its DESTROY, which it does only once the sink has made
the DESTROY durable. The kernel re-emits an unacked DESTROY after a jittered
grace time, so an ack that never comes (a crash, a sink that failed) costs a
duplicate, never a loss. An ack names the copy's key and its ct_id; the ack
program removes nothing unless both match, so a late ack is harmless.

Acks and sweeps take the same lock: the sweeper rewrites outbox copies in
place, and a copy freed by an ack under its feet could already hold a new
connection (the IPv4 table is preallocated and reuses elements at once).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Iterable

from . import abi
from . import bpfsys
from ..errors import StreamerError


@dataclass
class AckResult:
    sent: int = 0      # ack records handed to the kernel
    acked: int = 0     # outbox copies removed


class Outbox:
    def __init__(self, ack4_fd: int, ack6_fd: int, lock: threading.Lock | None = None):
        self.progs = {4: ack4_fd, 6: ack6_fd}
        self.lock = lock or threading.Lock()
        self.total = AckResult()

    def ack(self, refs: Iterable[tuple[int, bytes, int]]) -> AckResult:
        """Ack DESTROYs by their (family, outbox key, ct_id)."""
        by_family: dict[int, list[tuple[bytes, int]]] = {4: [], 6: []}
        for family, key, ct_id in refs:
            by_family[family].append((key, ct_id))
        res = AckResult()
        with self.lock:
            for family, acks in by_family.items():
                for i in range(0, len(acks), abi.ACK_BATCH):
                    batch = acks[i:i + abi.ACK_BATCH]
                    retval, _, out = bpfsys.test_run(self.progs[family],
                                                     abi.pack_acks(family, batch))
                    if retval != 0:
                        raise StreamerError(f"ack program refused a request (rc {retval})")
                    res.sent += len(batch)
                    res.acked += abi.unpack_ack_hdr(out)["acked"]
        self.total.sent += res.sent
        self.total.acked += res.acked
        return res
