"""The APIs of the pinned libraries that ctstream relies on, called the way
the project calls them. They run in the project's venv and, by
tests/unit/test_packaging.py, in a venv of the lowest version of every pin
(pyproject.toml), where a bound set too low fails one of them. Where another
test covers an API already (test_wire: jsonschema, test_metrics:
prometheus_client, test_producer_settings: aiokafka's batch builder), it
runs there too; what is here is what nothing else touches."""

from __future__ import annotations

import ssl
import urllib.request

import pytest

from streamer.delivery.kafka_settings import COMPRESSIONS, KafkaSettings

PAYLOAD = b"ctstream " * 2000 + bytes(range(256)) * 8


@pytest.mark.parametrize("name", [c for c in COMPRESSIONS if c != "none"])
def test_every_kafka_compression_round_trips_through_aiokafkas_codec(name):
    # --kafka-compression NAME: aiokafka compresses with cramjam (lz4 needs
    # cramjam.lz4.Compressor's keyword arguments, new in cramjam 2.8).
    from aiokafka import codec

    assert KafkaSettings(bootstrap="127.0.0.1:9092", topic="t", compression=name).validate()
    encode = getattr(codec, f"{name}_encode")
    decode = getattr(codec, f"{name}_decode")
    packed = encode(PAYLOAD)
    assert len(packed) < len(PAYLOAD) // 4
    assert bytes(decode(packed)) == PAYLOAD


def test_prometheus_start_http_server_returns_the_server_and_its_thread():
    # observe/metrics.py keeps both to shut the server down (0.20 and later).
    from prometheus_client import CollectorRegistry, Gauge
    from prometheus_client.exposition import start_http_server

    registry = CollectorRegistry()
    Gauge("ctstream_test_value", "a value", registry=registry).set(7)
    server, thread = start_http_server(0, "127.0.0.1", registry)
    try:
        port = server.server_address[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            assert b"ctstream_test_value 7.0" in r.read()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert not thread.is_alive()


async def test_aiomqtt_client_takes_the_arguments_the_status_publisher_gives():
    # MqttStatus._new_client: identifier=, will=Will(...), tls_context=,
    # max_queued_outgoing_messages= (a TypeError on an aiomqtt without them).
    from streamer.observe.mqtt_status import MqttSettings, MqttStatus

    status = MqttStatus(MqttSettings("127.0.0.1", 1883, username="u", password="p",
                                     tls=ssl.create_default_context()), "gw-1")
    client = status._new_client()
    assert client._client is not None            # the paho client it wraps


def test_psycopg_parses_the_urls_and_merges_the_password():
    # db.parse_url / url_has_password read libpq URLs with psycopg.conninfo;
    # PostgresDatabase passes the password file's password as a keyword,
    # which wins over the URL's.
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    from streamer.accounting import db

    assert db.url_has_password("postgresql://u:secret@127.0.0.1:5432/x")
    assert db.url_has_password("postgresql://u@127.0.0.1/x?password=secret")
    assert not db.url_has_password("postgresql://u@127.0.0.1:5432/x")
    assert not db.url_has_password("sqlite:/tmp/a.db")
    merged = conninfo_to_dict(make_conninfo("postgresql://u:old@127.0.0.1:5432/x",
                                            password="new"))
    assert merged["password"] == "new" and merged["user"] == "u" and merged["dbname"] == "x"


def test_scapy_builds_the_frames_the_bpf_tests_send():
    from scapy.layers.inet import IP, TCP
    from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
    from scapy.layers.l2 import Dot1Q, Ether

    frame = bytes(Ether() / Dot1Q(vlan=7) / IP(src="198.18.0.1", dst="198.18.0.2")
                  / TCP(sport=40000, dport=443, flags="S"))
    assert len(frame) == 14 + 4 + 20 + 20 and frame[12:14] == b"\x81\x00"
    v6 = bytes(IPv6(src="2001:2::1", dst="2001:2::2") / ICMPv6EchoRequest(id=9, seq=1))
    assert v6[6] == 58 and v6[40] == 128
