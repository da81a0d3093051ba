"""ctstream's wire records as the tests read them. A Kafka record's value,
a line of `ctstream events -o json` and a line of its jsonl sink are the
same record (schemas/ctstream-event.v2.json), so one set of names serves
every check: the flow tuple as test_reliability.key() shapes a
testbed.KernelFlow's, the counters beside the kernel's names for them, and
what two copies of one event may differ in.
"""

from __future__ import annotations

import ipaddress
import json

from streamer.delivery import wire

PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6"}
COUNTERS = ("initiatorPackets", "initiatorOctets", "responderPackets", "responderOctets")
# KernelFlow's names of the same counters, in the same order.
KERNEL_COUNTERS = ("packets_orig", "bytes_orig", "packets_reply", "bytes_reply")
# What may differ between two copies of one event (same nodeId, ctId, seq):
# when and how often it was sent, and which earlier losses it carried.
COPY_MAY_DIFFER = {"observationTimeMilliseconds", "retries", "missedEvents"}
END_OF_FLOW = 3         # IPFIX flowEndReason endOfFlowDetected (a FIN, a RST, a reused tuple)
IDLE_TIMEOUT = 1        # IPFIX flowEndReason idleTimeout


def flow_key(record: dict) -> tuple:
    """A flow record's original-direction tuple: (family, protocol name,
    source, destination, source port, destination port)."""
    if "sourceIPv4Address" in record:
        family, src, dst = 4, record["sourceIPv4Address"], record["destinationIPv4Address"]
    else:
        family, src, dst = 6, record["sourceIPv6Address"], record["destinationIPv6Address"]
    proto = PROTO_NAMES.get(record["protocolIdentifier"], str(record["protocolIdentifier"]))
    return (family, proto, str(ipaddress.ip_address(src)), str(ipaddress.ip_address(dst)),
            record["sourceTransportPort"], record["destinationTransportPort"])


def same_event(a: dict, b: dict) -> bool:
    return ({k: v for k, v in a.items() if k not in COPY_MAY_DIFFER}
            == {k: v for k, v in b.items() if k not in COPY_MAY_DIFFER})


def read_json_lines(text: str) -> tuple[list[dict], int]:
    """The records of JSON lines (`events -o json`, a jsonl sink), each
    checked with wire.validate (an AssertionError names the first line that
    fails), and the count of lines that are not JSON at all (torn by a
    kill)."""
    out, torn = [], 0
    for n, line in enumerate(text.splitlines(), 1):
        try:
            record = json.loads(line)
        except ValueError:
            torn += 1
            continue
        try:
            out.append(wire.validate(record))
        except wire.WireError as exc:
            raise AssertionError(f"line {n} is not a wire record: {exc}: {line[:300]}") from None
    return out, torn
