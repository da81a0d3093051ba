"""What the IPFIX tests compare: Kafka's DESTROY records, and the flows that
real IPFIX readers found in what `ctstream ipfix` sent.

- `Nfcapd`: Debian's collector on a free loopback UDP port, writing into
  its own directory; `flows()` reads what it stored back with
  `nfdump -o json` (nfdump 1.7.1 prints one JSON array).
- `ipfix_dump`: libfixbuf's ipfixDump over a file of IPFIX messages (a TCP
  session's stream is such a file, RFC 5655), parsed into one dict per data
  record (element name -> text) and the message headers.
- `TcpCollector`: a TCP listener of the test's own that keeps the stream,
  or resets the connection after a number of messages.
- `expected_nfdump`, `nfdump_key`, `expected_fields`: one flow as each
  reader shows it, built from the record on one side and from the reader's
  output on the other, so that equal keys mean the same flow.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
import signal
import socket
import struct
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

START_TIMEOUT = 10
UTC = dict(os.environ, TZ="UTC")
FLAG_LETTERS = "CEUAPRSF"           # nfdump's order, bit 7 first
ICMP_TYPE = {1: 8, 58: 128}         # echo request: the initiator's packets


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nfcapd:
    def __init__(self, directory: Path):
        self.directory = directory
        self.flow_dir = directory / "flows"
        self.flow_dir.mkdir(parents=True)
        self.log = directory / "nfcapd.log"
        self.port = free_udp_port()
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen(
                ["nfcapd", "-b", "127.0.0.1", "-p", str(self.port), "-w", str(self.flow_dir),
                 "-t", "3600"], stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while "Startup" not in self.output():
            if self.proc.poll() is not None:
                pytest.fail(f"nfcapd exited (rc={self.proc.returncode}): {self.output()}")
            if time.monotonic() > deadline:
                pytest.fail(f"nfcapd did not start within {START_TIMEOUT} s: {self.output()}")
            time.sleep(0.05)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        """SIGTERM: nfcapd writes its last block, renames the file, exits."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=20)

    def stats(self) -> dict[str, int]:
        """The counts nfcapd logs when it stops (Flows, Sequence Errors, ...)."""
        m = re.search(r"Flows: (\d+), Packets: \d+, Bytes: \d+, Sequence Errors: (\d+), "
                      r"Bad Packets: (\d+)", self.output())
        assert m, f"no statistics in nfcapd's log: {self.output()}"
        return {"flows": int(m[1]), "sequence_errors": int(m[2]), "bad_packets": int(m[3])}

    def flows(self) -> list[dict]:
        """Every flow in the stored files (call after stop())."""
        files = sorted(p for p in self.flow_dir.iterdir() if re.fullmatch(r"nfcapd\.\d{12}", p.name))
        assert files, f"nfcapd stored nothing: {list(self.flow_dir.iterdir())}; {self.output()}"
        out: list[dict] = []
        for path in files:
            res = subprocess.run(["nfdump", "-r", str(path), "-o", "json"], capture_output=True,
                                 text=True, timeout=60, env=UTC)
            assert res.returncode == 0, res.stderr
            text = res.stdout.strip()
            # nfcapd starts a file at each -t boundary (a whole hour here):
            # a run across one leaves a file that may hold no flow, which
            # nfdump 1.7.1 prints as this instead of [].
            if not text or re.fullmatch(r"\[\s*No matching flows\s*\]", text):
                continue
            out += json.loads(text)
        return out


def _ms(text: str) -> int:
    """nfdump's and ipfixDump's times (TZ=UTC) as milliseconds."""
    t = dt.datetime.fromisoformat(text.replace(" ", "T")).replace(tzinfo=dt.timezone.utc)
    return round(t.timestamp() * 1000)


def flag_text(bits: int) -> str:
    return "".join(c if bits & (0x80 >> i) else "." for i, c in enumerate(FLAG_LETTERS))


def family_of(record: dict) -> int:
    return 4 if "sourceIPv4Address" in record else 6


def addresses(record: dict) -> tuple[str, str]:
    v = "IPv4" if family_of(record) == 4 else "IPv6"
    return (str(ipaddress.ip_address(record[f"source{v}Address"])),
            str(ipaddress.ip_address(record[f"destination{v}Address"])))


def forward_flags(record: dict) -> int:
    return record.get("tcpControlBits", record.get("tcpControlBitsInitiator", 0))


def reverse_flags(record: dict) -> int:
    return record.get("reverseTcpControlBits", record.get("tcpControlBitsResponder", 0))


def expected_nfdump(record: dict) -> tuple:
    """A DESTROY as nfdump must show it: ICMP with type/code, no ports."""
    proto = record["protocolIdentifier"]
    if proto in ICMP_TYPE:
        where = ("icmp", ICMP_TYPE[proto], 0)
    else:
        where = ("ports", record["sourceTransportPort"], record["destinationTransportPort"])
    return (proto, *addresses(record), where, record["initiatorPackets"],
            record["initiatorOctets"], record["responderPackets"], record["responderOctets"],
            flag_text(forward_flags(record)) if proto == 6 else "........",
            record["flowStartMilliseconds"], record["flowEndMilliseconds"], record["vlanId"])


def nfdump_key(flow: dict) -> tuple:
    src = flow.get("src4_addr") or flow.get("src6_addr")
    dst = flow.get("dst4_addr") or flow.get("dst6_addr")
    if "icmp_type" in flow:
        where = ("icmp", flow["icmp_type"], flow["icmp_code"])
    else:
        where = ("ports", flow["src_port"], flow["dst_port"])
    return (flow["proto"], str(ipaddress.ip_address(src)), str(ipaddress.ip_address(dst)), where,
            flow["in_packets"], flow["in_bytes"], flow["out_packets"], flow["out_bytes"],
            flow.get("tcp_flags", "........"), _ms(flow["first"]), _ms(flow["last"]),
            flow["src_vlan"])


def compare_multisets(expected: Counter, got: Counter, what: str) -> None:
    missing, extra = expected - got, got - expected
    assert not missing and not extra, (
        f"{what}: {sum(missing.values())} expected flows missing, e.g. {list(missing)[:3]}; "
        f"{sum(extra.values())} unexpected, e.g. {list(extra)[:3]}")


# --- ipfixDump ---------------------------------------------------------------------------

_FIELD = re.compile(r"^\t\((?:\d+/)?\d+\)\s+(\w+) : (.*)$")


def ipfix_dump(path: Path) -> tuple[list[dict], list[dict], str]:
    """(data records, message headers, ipfixDump's stderr) of a file of IPFIX
    messages, read by libfixbuf."""
    res = subprocess.run(["ipfixDump", "-i", str(path)], capture_output=True, text=True,
                         timeout=60, env=UTC)
    assert res.returncode == 0, res.stderr
    records: list[dict] = []
    headers: list[dict] = []
    current: dict | None = None
    for line in res.stdout.splitlines():
        if line.startswith("--- data record"):
            current = {}
            records.append(current)
        elif line.startswith("--- "):
            current = None
        elif m := re.match(r"export time: .*observation domain id: (\d+)", line):
            headers.append({"domain": int(m[1])})
        elif m := re.match(r"message length: (\d+)\s+sequence number: (\d+)", line):
            headers[-1].update(length=int(m[1]), sequence=int(m[2]))
        elif current is not None and (m := _FIELD.match(line)):
            current[m[1]] = m[2].strip()
    return records, headers, res.stderr


def expected_fields(record: dict) -> tuple:
    """A DESTROY as ipfixDump must show every element of the template."""
    family, proto = family_of(record), record["protocolIdentifier"]
    icmp = ICMP_TYPE.get(proto, 0) << 8
    ports = (0, 0) if icmp else (record["sourceTransportPort"], record["destinationTransportPort"])
    return (family, *addresses(record), *ports, proto, icmp, record["vlanId"],
            record["flowStartMilliseconds"], record["flowEndMilliseconds"],
            record["flowEndReason"], 1, reverse_flags(record), forward_flags(record),
            record["initiatorOctets"], record["initiatorPackets"],
            record["responderOctets"], record["responderPackets"])


def dumped_fields(rec: dict) -> tuple:
    v = "IPv4" if "sourceIPv4Address" in rec else "IPv6"
    n = lambda name: int(rec[name])   # noqa: E731
    return (4 if v == "IPv4" else 6, str(ipaddress.ip_address(rec[f"source{v}Address"])),
            str(ipaddress.ip_address(rec[f"destination{v}Address"])),
            n("sourceTransportPort"), n("destinationTransportPort"), n("protocolIdentifier"),
            n(f"icmpTypeCode{v}"), n("vlanId"), _ms(rec["flowStartMilliseconds"]),
            _ms(rec["flowEndMilliseconds"]), n("flowEndReason"), n("biflowDirection"),
            n("reverseTcpControlBits"), n("tcpControlBits"), n("octetDeltaCount"),
            n("packetDeltaCount"), n("reverseOctetDeltaCount"), n("reversePacketDeltaCount"))


# --- a TCP collector of the test's own ---------------------------------------------------

class TcpCollector(threading.Thread):
    """Accepts one connection and keeps every whole IPFIX message it reads.
    With `reset_after`, closes with a reset (SO_LINGER 0) once it has read
    that many messages; `rcvbuf` caps its receive window, so that the
    exporter cannot have more than that acknowledged while it is not read."""

    def __init__(self, reset_after: int | None = None, rcvbuf: int | None = None):
        super().__init__(name="ipfix-tcp-collector", daemon=True)
        self.listener = socket.socket()
        if rcvbuf:
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.listener.settimeout(60)
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.reset_after = reset_after
        self.messages: list[bytes] = []
        self.error: BaseException | None = None
        self.done = threading.Event()

    def run(self) -> None:
        try:
            conn, _ = self.listener.accept()
            with conn:
                conn.settimeout(60)
                self._read(conn)
        except BaseException as exc:       # the test looks at it
            self.error = exc
        finally:
            self.done.set()

    def _read(self, conn: socket.socket) -> None:
        buf = b""
        while self.reset_after is None or len(self.messages) < self.reset_after:
            length = struct.unpack("!H", buf[2:4])[0] if len(buf) >= 4 else 0
            if len(buf) >= 4 and length < 16:
                raise AssertionError(f"an IPFIX message of length {length}")
            if length and len(buf) >= length:
                self.messages.append(buf[:length])
                buf = buf[length:]
                continue
            chunk = conn.recv(4096)
            if not chunk:
                return
            buf += chunk
        # Unread data remains: the close that follows sends a reset.
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def stream(self) -> bytes:
        return b"".join(self.messages)

    def close(self) -> None:
        self.listener.close()
        self.join(timeout=70)
        assert not self.is_alive(), "the test's TCP collector did not end"
