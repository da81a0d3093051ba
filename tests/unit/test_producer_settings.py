"""streamer.delivery.producer without a broker: KafkaSettings.validate says which value
is wrong and why; the partitioner maps keys as the Java client does."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import subprocess

import pytest
from aiokafka import codec as kafka_codec
from aiokafka.partitioner import murmur2 as aiokafka_murmur2

from streamer.errors import ConfigError
from streamer.delivery.kafka_settings import KafkaSettings
from streamer.delivery.producer import Producer, murmur2, partition_of
from streamer.errors import KafkaUnavailable

SYSTEM_CA = "/etc/ssl/certs/ca-certificates.crt"


def settings(**changes) -> KafkaSettings:
    return dataclasses.replace(KafkaSettings(bootstrap="127.0.0.1:9092", topic="ctstream.events"),
                               **changes)


def test_defaults_are_valid():
    s = settings()
    assert s.validate() is s
    assert s.ssl_context() is None
    assert s.bootstrap_hosts() == [("127.0.0.1", 9092)]


@pytest.mark.parametrize("bootstrap, hosts", [
    ("localhost:9092", [("localhost", 9092)]),
    ("10.0.0.1:9092, kafka-2.example:19092", [("10.0.0.1", 9092), ("kafka-2.example", 19092)]),
    ("[::1]:9092", [("::1", 9092)]),
])
def test_bootstrap_lists(bootstrap, hosts):
    assert settings(bootstrap=bootstrap).validate().bootstrap_hosts() == hosts


@pytest.mark.parametrize("bootstrap", [
    "", "127.0.0.1", "127.0.0.1:", ":9092", "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:ab",
    "::1:9092", "host name:9092", "127.0.0.1:9092,", "kafka://127.0.0.1:9092",
])
def test_bad_bootstrap(bootstrap):
    with pytest.raises(ConfigError, match="bootstrap"):
        settings(bootstrap=bootstrap).validate()


@pytest.mark.parametrize("topic", ["", ".", "..", "a b", "x" * 250, "events/v1", None])
def test_bad_topic(topic):
    with pytest.raises(ConfigError, match="topic"):
        settings(topic=topic).validate()


def test_good_topic_names():
    for topic in ("a", "ctstream.events", "ct_stream-1", "x" * 249):
        settings(topic=topic).validate()


@pytest.mark.parametrize("field, value", [
    ("linger_ms", -1), ("max_batch_bytes", 100), ("max_in_flight_records", 0),
    ("request_timeout_ms", 0), ("delivery_timeout_ms", 10), ("max_in_flight_records", 1.5),
    ("max_in_flight_records", True), ("linger_ms", "5"),
])
def test_numbers_out_of_range(field, value):
    with pytest.raises(ConfigError, match=field):
        settings(**{field: value}).validate()


def test_delivery_timeout_covers_a_request():
    with pytest.raises(ConfigError, match="delivery_timeout_ms .* at least request_timeout_ms"):
        settings(request_timeout_ms=20_000, delivery_timeout_ms=10_000).validate()


def test_compression():
    with pytest.raises(ConfigError, match="compression 'brotli' is not one of"):
        settings(compression="brotli").validate()
    settings(compression="gzip").validate()
    settings(compression="none").validate()
    for codec, available in (("lz4", kafka_codec.has_lz4()), ("zstd", kafka_codec.has_zstd()),
                             ("snappy", kafka_codec.has_snappy())):
        if available:
            settings(compression=codec).validate()
        else:
            with pytest.raises(ConfigError, match=f"compression {codec} needs the cramjam package"):
                settings(compression=codec).validate()


def test_unknown_security_protocol():
    with pytest.raises(ConfigError, match="security_protocol 'TLS' is not one of"):
        settings(security_protocol="TLS").validate()


# ---- SASL -------------------------------------------------------------------

@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_sasl_mechanisms(mechanism):
    settings(security_protocol="SASL_PLAINTEXT", sasl_mechanism=mechanism,
             sasl_username="ct", sasl_password="secret").validate()


@pytest.mark.parametrize("changes, fragment", [
    (dict(sasl_mechanism="GSSAPI"), "sasl_mechanism 'GSSAPI' is not one of PLAIN, SCRAM-SHA-256"),
    (dict(sasl_mechanism="scram-sha-256"), "is not one of"),
    (dict(sasl_mechanism=None), "SASL_PLAINTEXT needs a sasl_mechanism"),
    (dict(sasl_username=None), "needs a sasl_username"),
    (dict(sasl_username=""), "needs a sasl_username"),
    (dict(sasl_password=None), "needs a sasl_password"),
])
def test_bad_sasl(changes, fragment):
    base = dict(security_protocol="SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-512",
                sasl_username="ct", sasl_password="secret")
    with pytest.raises(ConfigError, match=fragment):
        settings(**(base | changes)).validate()


def test_sasl_settings_without_sasl_protocol():
    with pytest.raises(ConfigError, match="sasl_mechanism is set but security_protocol is PLAINTEXT"):
        settings(sasl_mechanism="PLAIN", sasl_username="u", sasl_password="p").validate()
    with pytest.raises(ConfigError, match="sasl_username is set but security_protocol is SSL"):
        settings(security_protocol="SSL", sasl_username="u").validate()


# ---- TLS --------------------------------------------------------------------

def test_tls_with_system_cas_and_a_ca_file():
    assert settings(security_protocol="SSL").validate().ssl_context() is not None
    ctx = settings(security_protocol="SASL_SSL", ssl_cafile=SYSTEM_CA, sasl_mechanism="PLAIN",
                   sasl_username="u", sasl_password="p").validate().ssl_context()
    assert ctx.check_hostname and ctx.get_ca_certs() is not None


def test_missing_ca_file_is_named(tmp_path):
    missing = tmp_path / "nope" / "ca.pem"
    with pytest.raises(ConfigError) as info:
        settings(security_protocol="SSL", ssl_cafile=str(missing)).validate()
    assert f"ssl_cafile {missing}: No such file or directory" in str(info.value)
    # The producer validates on construction, before any connection.
    with pytest.raises(ConfigError, match="ssl_cafile"):
        Producer(settings(security_protocol="SSL", ssl_cafile=str(missing)))


def test_ca_file_that_is_a_directory(tmp_path):
    with pytest.raises(ConfigError, match=f"ssl_cafile {tmp_path}: Is a directory"):
        settings(security_protocol="SSL", ssl_cafile=str(tmp_path)).validate()


def test_ca_file_that_is_not_pem(tmp_path):
    bad = tmp_path / "ca.pem"
    bad.write_text("this is not a certificate\n")
    with pytest.raises(ConfigError) as info:
        settings(security_protocol="SSL", ssl_cafile=str(bad)).validate()
    assert f"ssl_cafile {bad}: not a usable CA certificate file" in str(info.value)


@pytest.fixture
def client_cert(tmp_path):
    """A self-signed certificate and an encrypted key made by openssl."""
    cert, key = tmp_path / "client.pem", tmp_path / "client.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-days", "1",
                    "-subj", "/CN=ctstream-test", "-keyout", str(key), "-out", str(cert),
                    "-passout", "pass:s3cret"], check=True, capture_output=True, timeout=60)
    return cert, key


def test_client_certificate_and_key(client_cert):
    cert, key = client_cert
    s = settings(security_protocol="SSL", ssl_cafile=str(cert), ssl_certfile=str(cert),
                 ssl_keyfile=str(key), ssl_password="s3cret")
    assert s.validate().ssl_context() is not None


def test_wrong_key_password_names_both_files(client_cert):
    cert, key = client_cert
    s = settings(security_protocol="SSL", ssl_certfile=str(cert), ssl_keyfile=str(key),
                 ssl_password="wrong")
    with pytest.raises(ConfigError) as info:
        s.validate()
    assert f"ssl_certfile {cert} with ssl_keyfile {key}: cannot load" in str(info.value)


def test_missing_key_file_is_named(client_cert, tmp_path):
    cert, _ = client_cert
    with pytest.raises(ConfigError, match="ssl_keyfile .*gone.key: No such file"):
        settings(security_protocol="SSL", ssl_certfile=str(cert),
                 ssl_keyfile=str(tmp_path / "gone.key")).validate()


def test_key_without_certificate(client_cert):
    _, key = client_cert
    with pytest.raises(ConfigError, match="ssl_keyfile is set without ssl_certfile"):
        settings(security_protocol="SSL", ssl_keyfile=str(key)).validate()


def test_tls_files_without_tls():
    with pytest.raises(ConfigError, match="ssl_cafile is set but security_protocol is PLAINTEXT"):
        settings(ssl_cafile=SYSTEM_CA).validate()


# ---- partitioner ------------------------------------------------------------

# org.apache.kafka.common.utils.UtilsTest#testMurmur2 (signed 32-bit values).
JAVA_MURMUR2 = [
    (b"21", -973932308),
    (b"foobar", -790332482),
    (b"a-little-bit-long-string", -985981536),
    (b"a-little-bit-longer-string", -1486304829),
    (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
    (b"abc", 479470107),
]


@pytest.mark.parametrize("data, java", JAVA_MURMUR2)
def test_murmur2_matches_the_java_client(data, java):
    assert murmur2(data) == java & 0xFFFFFFFF


def test_murmur2_matches_aiokafka_on_random_keys():
    rng = random.Random(4)
    for _ in range(5_000):
        data = rng.randbytes(rng.randrange(0, 64))
        assert murmur2(data) == aiokafka_murmur2(data) & 0xFFFFFFFF


def test_murmur2_matches_aiokafka_on_connection_keys():
    # Sequential ctIds: the remembered head states are used, and filled up.
    for node in ("gw-1", "node-12345", "n"):
        for ct_id in list(range(1, 20_000, 3)) + [2**64 - 1, 10**12, 99_999, 100_000]:
            key = f"{node}/{ct_id}".encode()
            assert murmur2(key) == aiokafka_murmur2(key) & 0xFFFFFFFF, key


def test_partition_of_spreads_connection_keys():
    counts = [0, 0, 0]
    for ct_id in range(1, 3001):
        counts[partition_of(f"gw-1/{ct_id}".encode(), 3)] += 1
    assert all(800 < c < 1200 for c in counts), counts
    assert partition_of(b"gw-1/0", 1) == 0


def test_producer_starts_disconnected():
    p = Producer(settings())
    assert not p.connected and p.in_flight == 0 and p.acked == 0 and p.last_ack_time is None


async def test_send_before_start_says_so():
    p = Producer(settings())
    with pytest.raises(KafkaUnavailable, match="not connected to Kafka at 127.0.0.1:9092: call start"):
        await p.send([(b"k", b"v")])
    await p.send([])           # nothing to send is not an error
    await p.stop()
    await p.stop()
    with pytest.raises(KafkaUnavailable, match="stopped"):
        await p.send([(b"k", b"v")])


def test_a_batch_filled_past_aiokafkas_wrapper_reads_back_whole():
    # _Batch appends to aiokafka's inner record-batch builder and counts the
    # offsets itself: the built batch must hold every record, in order, with
    # offsets 0..n-1, and aiokafka must see the right record count.
    from aiokafka.producer.message_accumulator import BatchBuilder
    from aiokafka.record.default_records import DefaultRecordBatch
    from streamer.delivery.producer import _Batch

    loop = asyncio.new_event_loop()
    try:
        batch = _Batch(BatchBuilder(16 << 10, 0), loop)
        header = [("ctstream-schema", b"1")]
        added = 0
        while batch.add(1_700_000_000_000, b"gw-1/%d" % added, bytes([added % 251]) * 300, header):
            added += 1
        assert 40 < added < 60 and batch.count == added
        assert batch.builder.record_count() == added
        assert batch.builder.append(timestamp=0, key=b"k", value=b"v") is None   # sealed
        read = DefaultRecordBatch(bytearray(batch.builder._build()))
        records = list(read)
        assert [r.offset for r in records] == list(range(added))
        assert [r.key for r in records] == [b"gw-1/%d" % i for i in range(added)]
        assert all(r.value == bytes([i % 251]) * 300 for i, r in enumerate(records))
        assert all(r.headers == header for r in records)
    finally:
        loop.close()
