"""The Kafka connection settings that the daemon's producer, replay and the
accounting consumer share: bootstrap servers and topic, compression,
timeouts, TLS and SASL, validated (TLS files are loaded); how a client
connects (attempts until a deadline) and why it could not, in words. Lives
apart from the producer so that a consumer needs no producer to get it."""

from __future__ import annotations

import asyncio
import os
import re
import ssl
from dataclasses import dataclass
from typing import Awaitable, Callable, TypeVar

from aiokafka import codec as kafka_codec
from aiokafka.errors import KafkaError

from ..errors import ConfigError, KafkaUnavailable

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
# Codec name -> does this aiokafka install have it. All but gzip need the
# cramjam package (aiokafka's extras [lz4], [snappy], [zstd]).
COMPRESSIONS = {
    "none": lambda: True,
    "gzip": kafka_codec.has_gzip,
    "snappy": kafka_codec.has_snappy,
    "lz4": kafka_codec.has_lz4,
    "zstd": kafka_codec.has_zstd,
}
# The settings (streamer/settings.py) that fill each field, for messages.
_SETTING_OF = {
    "bootstrap": "kafka", "topic": "topic", "compression": "kafka-compression",
    "security_protocol": "kafka-security-protocol", "ssl_cafile": "kafka-ssl-cafile",
    "ssl_certfile": "kafka-ssl-certfile", "ssl_keyfile": "kafka-ssl-keyfile",
    "sasl_mechanism": "kafka-sasl-mechanism", "sasl_username": "kafka-sasl-username",
    "sasl_password": "kafka-sasl-password-file", "request_timeout_ms": "kafka-timeout",
    "delivery_timeout_ms": "kafka-timeout",
}
# Between failed attempts to bootstrap a client (connect_until).
CONNECT_BACKOFF_S = 0.5
_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")
_HOST_PORT = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9._-]+)):(?P<port>[0-9]{1,5})")


@dataclass
class KafkaSettings:
    bootstrap: str                        # HOST:PORT[,HOST:PORT...]
    topic: str
    client_id: str = "ctstream"
    # "none", "gzip", "snappy", "lz4" or "zstd". Everything but gzip needs the
    # cramjam package, which this installation may not have; aiokafka's gzip
    # (level 9) costs ~10 us per 500-byte record, a whole core at 100k
    # records/s. See bench/kafka_produce.py.
    compression: str = "none"
    # The caller's batching window: how long the daemon may hold events to
    # fill a send() call. The producer itself sends each call at once.
    linger_ms: int = 5
    max_batch_bytes: int = 1 << 20        # one record batch (one partition, one request)
    max_in_flight_records: int = 200_000  # sent but not yet acknowledged, all calls together
    request_timeout_ms: int = 10_000      # one request to a broker
    delivery_timeout_ms: int = 30_000     # a send() call, from the call to the last ack
    security_protocol: str = "PLAINTEXT"
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_password: str | None = None
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None

    def validate(self) -> "KafkaSettings":
        """Check every value; ConfigError says which one and why (and names
        the setting, as streamer/settings.py spells it). TLS files are
        loaded, so a missing, unreadable or malformed file shows here."""
        try:
            return self._validate()
        except ConfigError as exc:
            m = re.match(r"kafka (\w+)", str(exc))
            if exc.setting is None and m:
                exc.setting = _SETTING_OF.get(m.group(1))
            raise

    def _validate(self) -> "KafkaSettings":
        self.bootstrap_hosts()
        if not isinstance(self.topic, str) or not _TOPIC_NAME.fullmatch(self.topic) \
                or self.topic in (".", ".."):
            raise ConfigError(f"kafka topic {self.topic!r} is not a valid topic name "
                              "(1..249 of A-Z a-z 0-9 . _ -)")
        if not self.client_id:
            raise ConfigError("kafka client_id must not be empty")
        if self.compression not in COMPRESSIONS:
            raise ConfigError(f"kafka compression {self.compression!r} is not one of "
                              f"{', '.join(COMPRESSIONS)}")
        if not COMPRESSIONS[self.compression]():
            have = ", ".join(c for c, ok in COMPRESSIONS.items() if ok())
            raise ConfigError(f"kafka compression {self.compression} needs the cramjam package "
                              f"(pip install 'aiokafka[{self.compression}]'); available here: {have}")
        _check_int("linger_ms", self.linger_ms, 0, 60_000)
        _check_int("max_batch_bytes", self.max_batch_bytes, 1024, 64 << 20)
        _check_int("max_in_flight_records", self.max_in_flight_records, 1, 10_000_000)
        _check_int("request_timeout_ms", self.request_timeout_ms, 100, 3_600_000)
        _check_int("delivery_timeout_ms", self.delivery_timeout_ms, 100, 86_400_000)
        if self.delivery_timeout_ms < self.request_timeout_ms:
            raise ConfigError(f"kafka delivery_timeout_ms ({self.delivery_timeout_ms}) must be at "
                              f"least request_timeout_ms ({self.request_timeout_ms})")
        if self.security_protocol not in SECURITY_PROTOCOLS:
            raise ConfigError(f"kafka security_protocol {self.security_protocol!r} is not one of "
                              f"{', '.join(SECURITY_PROTOCOLS)}")
        self._validate_sasl()
        self.ssl_context()
        return self

    def _validate_sasl(self) -> None:
        sasl = self.security_protocol.startswith("SASL_")
        if self.sasl_mechanism is not None and self.sasl_mechanism not in SASL_MECHANISMS:
            raise ConfigError(f"kafka sasl_mechanism {self.sasl_mechanism!r} is not one of "
                              f"{', '.join(SASL_MECHANISMS)}")
        if not sasl:
            for name in ("sasl_mechanism", "sasl_username", "sasl_password"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"kafka {name} is set but security_protocol is "
                                      f"{self.security_protocol}: use SASL_PLAINTEXT or SASL_SSL")
            return
        if self.sasl_mechanism is None:
            raise ConfigError(f"kafka security_protocol {self.security_protocol} needs a "
                              f"sasl_mechanism ({', '.join(SASL_MECHANISMS)})")
        if not self.sasl_username:
            raise ConfigError(f"kafka sasl_mechanism {self.sasl_mechanism} needs a sasl_username")
        if self.sasl_password is None:
            raise ConfigError(f"kafka sasl_mechanism {self.sasl_mechanism} needs a sasl_password")

    def bootstrap_hosts(self) -> list[tuple[str, int]]:
        """(host, port) of every bootstrap server; ConfigError unless the
        setting is HOST:PORT[,HOST:PORT...] ([v6addr]:PORT for IPv6)."""
        if not isinstance(self.bootstrap, str) or not self.bootstrap.strip():
            raise ConfigError("kafka bootstrap is empty: give HOST:PORT, e.g. 127.0.0.1:9092")
        hosts = []
        for item in self.bootstrap.split(","):
            m = _HOST_PORT.fullmatch(item.strip())
            port = int(m["port"]) if m else 0
            if not m or not 1 <= port <= 65535:
                raise ConfigError(f"kafka bootstrap {item.strip()!r} is not HOST:PORT "
                                  "(e.g. 127.0.0.1:9092, [::1]:9092)")
            hosts.append((m["v6"] or m["host"], port))
        return hosts

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for SSL and SASL_SSL (None otherwise), built from
        the CA, certificate and key files; ConfigError names a file that is
        missing, unreadable or not what it should be."""
        files = {"ssl_cafile": self.ssl_cafile, "ssl_certfile": self.ssl_certfile,
                 "ssl_keyfile": self.ssl_keyfile}
        if not self.security_protocol.endswith("SSL"):
            for name, path in files.items():
                if path is not None:
                    raise ConfigError(f"kafka {name} is set but security_protocol is "
                                      f"{self.security_protocol}: use SSL or SASL_SSL")
            return None
        if self.ssl_keyfile and not self.ssl_certfile:
            raise ConfigError("kafka ssl_keyfile is set without ssl_certfile")
        for name, path in files.items():
            if path is not None:
                _check_readable(name, path)
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        if self.ssl_cafile:
            try:
                ctx.load_verify_locations(cafile=self.ssl_cafile)
            except (ssl.SSLError, OSError, ValueError) as exc:
                raise ConfigError(f"kafka ssl_cafile {self.ssl_cafile}: not a usable CA "
                                  f"certificate file (PEM): {_ssl_reason(exc)}") from exc
        if self.ssl_certfile:
            try:
                ctx.load_cert_chain(self.ssl_certfile, self.ssl_keyfile, self.ssl_password)
            except (ssl.SSLError, OSError, ValueError) as exc:
                which = f"ssl_certfile {self.ssl_certfile}"
                if self.ssl_keyfile:
                    which += f" with ssl_keyfile {self.ssl_keyfile}"
                raise ConfigError(f"kafka {which}: cannot load the client certificate and key "
                                  f"(PEM; wrong ssl_password?): {_ssl_reason(exc)}") from exc
        return ctx


def _check_int(name: str, value, lo: int, hi: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ConfigError(f"kafka {name} must be an integer in {lo}..{hi}, got {value!r}")


def _check_readable(name: str, path: str) -> None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise ConfigError(f"kafka {name} {path}: {exc.strerror or exc}") from exc


def _ssl_reason(exc: Exception) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return getattr(exc, "strerror", None) or str(exc)


async def why_unreachable(settings: KafkaSettings, exc: BaseException) -> str:
    """Why a client could not start, in words: the TCP connect's own error if
    the servers refuse, else aiokafka's, with a hint at TLS/SASL when TCP
    works (shared by the producer and the accounting consumer)."""
    reasons = []
    for host, port in settings.bootstrap_hosts():
        try:
            async with asyncio.timeout(1.0):
                _, writer = await asyncio.open_connection(host, port)
            writer.close()
        except TimeoutError:
            reasons.append(f"{host}:{port}: no answer within 1s")
        except OSError as err:
            # asyncio's own strerror ("Connect call failed ...") hides the reason.
            reasons.append(f"{host}:{port}: {os.strerror(err.errno) if err.errno else err}")
    if reasons:
        return "; ".join(reasons)
    if isinstance(exc, TimeoutError):
        return ("the TCP connection works but Kafka did not complete the handshake "
                f"(security_protocol {settings.security_protocol}: check TLS/SASL settings)")
    return (f"the TCP connection works but Kafka refused the client ({exc!r}); "
            f"check security_protocol {settings.security_protocol} and TLS/SASL settings")


Client = TypeVar("Client")
Started = TypeVar("Started")


async def connect_until(settings: KafkaSettings, timeout_s: float,
                        new_client: Callable[[], Client],
                        start: Callable[[Client, float], Awaitable[Started]],
                        close: Callable[[Client], Awaitable[None]]) -> tuple[Client, Started]:
    """Make a client and start it (`start(client, deadline)`, on the event
    loop's clock) until that works, a fresh client each time, CONNECT_BACKOFF_S
    apart; KafkaUnavailable, with why_unreachable's reason, when `timeout_s`
    has passed. A client that failed is closed (`close`) first, whatever
    the error; errors that are not about reaching Kafka pass at once.
    Returns the client and what `start` returned."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        client = new_client()
        try:
            async with asyncio.timeout_at(deadline):
                started = await start(client, deadline)
            return client, started
        except (KafkaError, OSError, TimeoutError) as exc:
            await close(client)
            if loop.time() + CONNECT_BACKOFF_S >= deadline:
                why = await why_unreachable(settings, exc)
                raise KafkaUnavailable(f"cannot reach Kafka at {settings.bootstrap} "
                                       f"within {timeout_s:g}s: {why}") from exc
            await asyncio.sleep(CONNECT_BACKOFF_S)
        except BaseException:
            await close(client)
            raise
