"""streamer.delivery.wire: msgpack round trip and the JSON Schemas, table-driven:
v2 (what ctstream writes) in full, v1 (still read) where it differs."""

from __future__ import annotations

import copy
import json

import msgpack
import pytest

from streamer.delivery import wire

U64_MAX = 2**64 - 1


def flow(event_type="DESTROY", family=4, **changes) -> dict:
    record = {
        "schemaVersion": 2,
        "eventType": event_type,
        "nodeId": "gw-1",
        "ctId": 1_700_000_000_000_000_123,
        "seq": 4,
        "observationTimeMilliseconds": 1_763_800_004_300,
        "sourceTransportPort": 40000,
        "destinationTransportPort": 443,
        "protocolIdentifier": 6,
        "vlanId": 0,
        "tcpState": "TIME_WAIT" if event_type == "DESTROY" else "ESTABLISHED",
        "assured": True,
        "initiatorPackets": 12,
        "responderPackets": 10,
        "initiatorOctets": 1_480,
        "responderOctets": 96_000,
        "flowStartMilliseconds": 1_763_800_000_000,
        "flowEndMilliseconds": 1_763_800_004_250,
        "flowEndReason": 3 if event_type == "DESTROY" else None,
        "missedEvents": 0,
        "retries": 0,
        "tcpControlBits": 0x1B,
        "reverseTcpControlBits": 0x1A,
    }
    if family == 4:
        record |= {"sourceIPv4Address": "198.18.0.1", "destinationIPv4Address": "198.18.0.2"}
    else:
        record |= {"sourceIPv6Address": "2001:2::1", "destinationIPv6Address": "2001:2::2"}
    return apply(record, changes)


def lost(**changes) -> dict:
    record = {
        "schemaVersion": 2,
        "eventType": "LOST",
        "nodeId": "gw-1",
        "ctId": 0,
        "seq": 7,
        "observationTimeMilliseconds": 1_763_800_007_000,
        "lost": {
            "ring_full": 3, "table_full": 0, "untracked_packets": 11,
            "untracked_bytes": 7_040, "early_drops": 2, "destroy_retries": 1,
        },
    }
    return apply(record, changes)


def v1(record: dict, **changes) -> dict:
    """The same record in schema version 1: the old names of the TCP flags."""
    record = dict(record, schemaVersion=1)
    if "tcpControlBits" in record:
        record["tcpControlBitsInitiator"] = record.pop("tcpControlBits")
        record["tcpControlBitsResponder"] = record.pop("reverseTcpControlBits")
    return apply(record, changes)


DROP = object()


def apply(record: dict, changes: dict) -> dict:
    for key, value in changes.items():
        if value is DROP:
            del record[key]
        else:
            record[key] = value
    return record


GOOD = [
    pytest.param(flow(t, fam), id=f"{t}-v{fam}")
    for t in ("CREATE", "UPDATE", "DESTROY", "SNAPSHOT")
    for fam in (4, 6)
] + [
    pytest.param(lost(), id="LOST"),
    pytest.param(flow("CREATE", 4, protocolIdentifier=17, tcpState=None, assured=False,
                      tcpControlBits=0, reverseTcpControlBits=0), id="udp-no-tcp-state"),
    pytest.param(flow("DESTROY", 6, flowEndReason=5, retries=255, missedEvents=7,
                      vlanId=4095), id="destroy-edge-values"),
    pytest.param(flow("UPDATE", 4, initiatorOctets=U64_MAX, ctId=U64_MAX, seq=2**32 - 1),
                 id="uint64-and-uint32-max"),
    pytest.param(flow("UPDATE", 4, futureField="additive changes keep v2"), id="unknown-field-allowed"),
    pytest.param(lost(lost={**lost()["lost"], "new_counter": 5}), id="LOST-extra-counter"),
    # Version 1, still read: its own flag names, observationTimeMilliseconds optional.
    pytest.param(v1(flow("DESTROY", 6)), id="v1-DESTROY-v6"),
    pytest.param(v1(flow("UPDATE"), observationTimeMilliseconds=DROP), id="v1-without-time"),
    pytest.param(v1(lost(), observationTimeMilliseconds=DROP), id="v1-LOST-without-time"),
]


@pytest.mark.parametrize("record", GOOD)
def test_schema_accepts(record):
    assert wire.validate(record) is record


def without_lost_counter(name):
    record = lost()
    del record["lost"][name]
    return record


# (record, a fragment the error message must contain)
BAD = [
    pytest.param(flow(seq=DROP), "'seq' is a required property", id="missing-seq"),
    pytest.param(flow(nodeId=DROP), "'nodeId' is a required property", id="missing-nodeId"),
    pytest.param(flow(responderOctets=DROP), "'responderOctets' is a required property",
                 id="missing-counter"),
    pytest.param(flow(tcpState=DROP), "'tcpState' is a required property", id="missing-tcpState"),
    pytest.param(flow(sourceIPv4Address=DROP), "exactly one address family", id="half-a-tuple"),
    pytest.param(flow(sourceIPv4Address=DROP, sourceIPv6Address="2001:2::1"),
                 "exactly one address family", id="family-mix"),
    pytest.param(flow(sourceIPv6Address="2001:2::1", destinationIPv6Address="2001:2::2"),
                 "exactly one address family", id="both-families"),
    pytest.param(flow(sourceIPv6Address="2001:2::1"), "exactly one address family",
                 id="v4-plus-one-v6-field"),
    pytest.param(flow(sourceIPv4Address=DROP, destinationIPv4Address=DROP),
                 "exactly one address family", id="no-addresses"),
    pytest.param(flow(sourceIPv4Address="2001:2::1"), "is not a 'ipv4'", id="v6-text-in-v4-field"),
    pytest.param(flow(family=6, destinationIPv6Address="198.18.0.2"), "is not a 'ipv6'",
                 id="v4-text-in-v6-field"),
    pytest.param(flow(sourceIPv4Address="198.18.0.256"), "is not a 'ipv4'", id="bad-ipv4"),
    pytest.param(flow(destinationTransportPort=65536), "greater than the maximum of 65535",
                 id="port-too-big"),
    pytest.param(flow(sourceTransportPort=-1), "less than the minimum of 0", id="port-negative"),
    pytest.param(flow(protocolIdentifier=256), "greater than the maximum of 255", id="proto-too-big"),
    pytest.param(flow(vlanId=4096), "greater than the maximum of 4095", id="vlan-too-big"),
    pytest.param(flow(seq=2**32), "greater than the maximum", id="seq-too-big"),
    pytest.param(flow(initiatorOctets=2**64), "greater than the maximum", id="octets-over-uint64"),
    pytest.param(flow(retries=256), "greater than the maximum of 255", id="retries-too-big"),
    pytest.param(flow(missedEvents=8), "greater than the maximum of 7", id="missed-bad-mask"),
    pytest.param(flow(reverseTcpControlBits=0x100), "greater than the maximum of 255",
                 id="tcp-flags-too-big"),
    pytest.param(flow(tcpControlBits=DROP), "'tcpControlBits' is a required property",
                 id="missing-tcpControlBits"),
    pytest.param(v1(flow(), schemaVersion=2), "'tcpControlBits' is a required property",
                 id="v1-names-in-v2"),
    pytest.param(flow(observationTimeMilliseconds=DROP),
                 "'observationTimeMilliseconds' is a required property", id="flow-without-time"),
    pytest.param(lost(observationTimeMilliseconds=DROP),
                 "'observationTimeMilliseconds' is a required property", id="LOST-without-time"),
    pytest.param(flow(observationTimeMilliseconds=-1), "less than the minimum of 0",
                 id="negative-time"),
    pytest.param(flow(assured=1), "is not of type 'boolean'", id="assured-not-bool"),
    pytest.param(flow(initiatorPackets=True), "is not of type 'integer'", id="bool-as-counter"),
    pytest.param(flow(initiatorPackets=1.5), "is not of type 'integer'", id="float-counter"),
    pytest.param(flow(schemaVersion=3), "2 was expected", id="unknown-version"),
    pytest.param(flow(schemaVersion=True), "2 was expected", id="bool-version"),
    pytest.param(flow(eventType="NEW"), "is not one of", id="unknown-event-type"),
    pytest.param(flow(ctId=0), "less than the minimum of 1", id="flow-ctId-0"),
    pytest.param(flow(nodeId=""), "non-empty", id="empty-nodeId"),
    pytest.param(flow(tcpState="established"), "does not match", id="tcpState-lowercase"),
    pytest.param(flow("DESTROY", flowEndReason=None), "is not of type 'integer'",
                 id="destroy-without-reason"),
    pytest.param(flow("DESTROY", flowEndReason=6), "is not one of", id="unknown-end-reason"),
    pytest.param(flow("UPDATE", flowEndReason=1), "is not of type 'null'", id="reason-on-update"),
    pytest.param(flow(lost=lost()["lost"]), "no lost counters", id="flow-with-lost"),
    pytest.param(lost(lost=DROP), "'lost' is a required property", id="LOST-without-counters"),
    pytest.param(without_lost_counter("early_drops"), "'early_drops' is a required property",
                 id="LOST-missing-counter"),
    pytest.param(lost(lost={**lost()["lost"], "ring_full": -1}), "less than the minimum of 0",
                 id="LOST-negative-counter"),
    pytest.param(lost(ctId=5), "0 was expected", id="LOST-with-ctId"),
    pytest.param(lost(sourceIPv4Address="198.18.0.1", destinationIPv4Address="198.18.0.2"),
                 "no addresses", id="LOST-with-tuple"),
]


@pytest.mark.parametrize("record, fragment", BAD)
def test_schema_rejects(record, fragment):
    with pytest.raises(wire.WireError, match="ctstream-event.v2.json") as info:
        wire.validate(record)
    assert fragment in str(info.value)


# Version 1 records are checked against the v1 schema, with its names.
BAD_V1 = [
    pytest.param(flow(schemaVersion=1), "'tcpControlBitsInitiator' is a required property",
                 id="v2-names-in-v1"),
    pytest.param(v1(flow(), tcpControlBitsResponder=DROP),
                 "'tcpControlBitsResponder' is a required property", id="v1-missing-flags"),
    pytest.param(v1(flow(), tcpControlBitsInitiator=256), "greater than the maximum of 255",
                 id="v1-flags-too-big"),
    pytest.param(v1(flow(), sourceIPv4Address="2001:2::1"), "is not a 'ipv4'", id="v1-bad-address"),
]


@pytest.mark.parametrize("record, fragment", BAD_V1)
def test_v1_schema_rejects(record, fragment):
    with pytest.raises(wire.WireError, match="ctstream-event.v1.json") as info:
        wire.validate(record)
    assert fragment in str(info.value)


@pytest.mark.parametrize("record", [flow(), v1(flow())], ids=["v2", "v1"])
def test_tcp_control_bits_of_either_version(record):
    assert wire.tcp_control_bits(record) == (0x1B, 0x1A)


@pytest.mark.parametrize("record, version", [
    (flow(), 2), (v1(flow()), 1), (lost(), 2),
    # Key order is not fixed: found wherever the key is.
    ({"nodeId": "schemaVersion", "schemaVersion": 1}, 1),
    ({"schemaVersion": 3}, None), ({"schemaVersion": "2"}, None), ({"nodeId": "gw-1"}, None),
])
def test_version_of_an_encoded_record(record, version):
    assert wire.version_of(wire.encode(record)) == version


def test_version_of_what_is_not_a_record():
    assert wire.version_of(b"\xc1") is None
    assert wire.version_of(msgpack.packb([1, 2])) is None
    assert wire.version_of(b"") is None


def test_json_is_the_same_map():
    for record in (flow(), flow(family=6), lost()):
        text = wire.to_json(record)
        assert "\n" not in text and json.loads(text) == record


def test_error_names_the_field():
    with pytest.raises(wire.WireError) as info:
        wire.validate(flow(family=6, destinationTransportPort=70_000))
    assert "at destinationTransportPort:" in str(info.value)


@pytest.mark.parametrize("record", GOOD)
def test_round_trip(record):
    data = wire.encode(record)
    assert isinstance(data, bytes)
    back = wire.decode(data)
    assert back == record
    assert [type(v) for v in back.values()] == [type(v) for v in record.values()]


def test_encoding_is_msgpack_with_str_keys():
    data = wire.encode(flow())
    raw = msgpack.unpackb(data, raw=True)
    assert b"sourceIPv4Address" in raw
    assert raw[b"nodeId"] == b"gw-1"


def test_encode_rejects_what_msgpack_cannot_carry():
    with pytest.raises(wire.WireError, match="msgpack"):
        wire.encode(flow(ctId=2**64))
    with pytest.raises(wire.WireError, match="msgpack"):
        wire.encode(flow(nodeId=object()))


@pytest.mark.parametrize("data, fragment", [
    (msgpack.packb([1, 2, 3]), "got list"),
    (msgpack.packb("a string"), "got str"),
    (wire.encode(flow()) + b"\x00", "not a msgpack record"),
    (b"\xc1", "not a msgpack record"),
    (b"", "not a msgpack record"),
])
def test_decode_rejects(data, fragment):
    with pytest.raises(wire.WireError) as info:
        wire.decode(data)
    assert fragment in str(info.value)


def test_dedupe_key():
    a = flow("UPDATE", seq=9)
    assert wire.dedupe_key(a) == ("gw-1", 1_700_000_000_000_000_123, 9)
    retry = flow("UPDATE", seq=9, initiatorOctets=1)
    assert wire.dedupe_key(retry) == wire.dedupe_key(a)
    assert wire.dedupe_key(flow("UPDATE", seq=10)) != wire.dedupe_key(a)
    assert wire.dedupe_key(flow("UPDATE", seq=9, nodeId="gw-2")) != wire.dedupe_key(a)
    assert wire.dedupe_key(lost()) == ("gw-1", 0, 7)
    with pytest.raises(wire.WireError, match="'ctId'"):
        wire.dedupe_key(flow(ctId=DROP))


def test_version_constants_agree_with_the_schemas():
    assert wire.HEADER == ("ctstream-schema", b"2")
    assert wire.SCHEMA_VERSION == 2 and wire.READABLE_VERSIONS == (1, 2)
    assert wire.SCHEMA_FILE == "ctstream-event.v2.json"
    for version in wire.READABLE_VERSIONS:
        schema = json.loads((wire.schema_dir() / wire.schema_file(version)).read_text())
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert schema["properties"]["schemaVersion"]["const"] == version
        assert schema["$id"].endswith(f":{version}")
        orig, reply = wire.TCP_FLAG_FIELDS[version]
        assert {orig, reply} <= set(schema["properties"])
        assert {orig, reply} <= set(schema["$defs"]["flowRecord"]["required"])
        assert ("observationTimeMilliseconds" in schema["required"]) == (version >= 2)


def test_schema_dir_override(tmp_path, monkeypatch):
    schema = json.loads((wire.schema_dir() / wire.SCHEMA_FILE).read_text())
    strict = copy.deepcopy(schema)
    strict["properties"]["nodeId"]["maxLength"] = 3
    (tmp_path / wire.SCHEMA_FILE).write_text(json.dumps(strict))
    record = flow()
    wire.validate(record)  # the repo's schema: "gw-1" is fine
    monkeypatch.setenv("CTSTREAM_SCHEMA_DIR", str(tmp_path))
    assert wire.schema_dir() == tmp_path
    with pytest.raises(wire.WireError, match="nodeId"):
        wire.validate(record)


def test_schema_dir_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("CTSTREAM_SCHEMA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(wire.WireError, match="CTSTREAM_SCHEMA_DIR"):
        wire.validate(flow())


def test_invalid_schema_file(tmp_path, monkeypatch):
    (tmp_path / wire.SCHEMA_FILE).write_text(json.dumps(
        {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": 5}))
    monkeypatch.setenv("CTSTREAM_SCHEMA_DIR", str(tmp_path))
    with pytest.raises(wire.WireError, match="not a valid JSON Schema"):
        wire.validate(flow())
