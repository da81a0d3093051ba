"""The Kafka connection options that `run`, `replay` and `account` share:
bootstrap servers and topic, TLS and SASL, and the KafkaSettings they make.

One place, so that the three commands spell the options alike and read the
SASL password the same way: from --kafka-sasl-password-file, else from the
CTSTREAM_KAFKA_SASL_PASSWORD environment variable (never on the command line,
where `ps` shows it)."""

from __future__ import annotations

import argparse
import os

from ..errors import ConfigError

PASSWORD_ENV = "CTSTREAM_KAFKA_SASL_PASSWORD"
COMPRESSIONS = ("none", "gzip", "snappy", "lz4", "zstd")


def add_security_args(group) -> None:
    """--kafka-security-protocol, the TLS files and the SASL options."""
    group.add_argument("--kafka-security-protocol", default="PLAINTEXT",
                       choices=("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"))
    group.add_argument("--kafka-ssl-cafile", metavar="FILE")
    group.add_argument("--kafka-ssl-certfile", metavar="FILE")
    group.add_argument("--kafka-ssl-keyfile", metavar="FILE")
    group.add_argument("--kafka-sasl-mechanism", choices=("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"))
    group.add_argument("--kafka-sasl-username")
    group.add_argument("--kafka-sasl-password-file", metavar="FILE",
                       help=f"file holding the SASL password (or set {PASSWORD_ENV})")


def sasl_password(a: argparse.Namespace) -> str | None:
    if not a.kafka_sasl_password_file:
        return os.environ.get(PASSWORD_ENV)
    try:
        with open(a.kafka_sasl_password_file) as f:
            return f.read().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read --kafka-sasl-password-file "
                          f"{a.kafka_sasl_password_file}: {exc.strerror}") from exc


def check_timeout(a: argparse.Namespace) -> None:
    if not 0 < a.kafka_timeout <= 3600:
        raise ConfigError(f"--kafka-timeout must be in (0, 3600] seconds, got {a.kafka_timeout}")


def settings_from_args(a: argparse.Namespace, **extra):
    """KafkaSettings from --kafka, --topic and the security options, plus
    `extra` (timeouts, compression, client id), validated."""
    from .kafka_settings import KafkaSettings

    return KafkaSettings(
        bootstrap=a.kafka, topic=a.topic,
        security_protocol=a.kafka_security_protocol, ssl_cafile=a.kafka_ssl_cafile,
        ssl_certfile=a.kafka_ssl_certfile, ssl_keyfile=a.kafka_ssl_keyfile,
        sasl_mechanism=a.kafka_sasl_mechanism, sasl_username=a.kafka_sasl_username,
        sasl_password=sasl_password(a), **extra).validate()
