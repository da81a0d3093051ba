"""The wire format of ctstream's Kafka records: one msgpack map per event,
described by schemas/ctstream-event.v<N>.json and announced by a record
header (HEADER). See schemas/README.md for the versioning rule.

This module knows records as plain dicts; turning the datapath's events into
them is the producer's business.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import jsonschema
import msgpack

from streamer.errors import WireError

SCHEMA_VERSION = 1
HEADER = ("ctstream-schema", str(SCHEMA_VERSION).encode())
SCHEMA_FILE = f"ctstream-event.v{SCHEMA_VERSION}.json"
SCHEMA_DIR_ENV = "CTSTREAM_SCHEMA_DIR"


def encode(record: dict) -> bytes:
    """The msgpack bytes of a record (str keys, ints, bools, str, None)."""
    try:
        return msgpack.packb(record, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise WireError(f"cannot encode record as msgpack: {exc}") from exc


def decode(data: bytes) -> dict:
    """The record in a Kafka record value; WireError unless it is one msgpack map."""
    try:
        record = msgpack.unpackb(data, raw=False)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError,
            ValueError, TypeError) as exc:
        raise WireError(f"not a msgpack record: {exc}") from exc
    if not isinstance(record, dict):
        raise WireError(f"a record is a msgpack map, got {type(record).__name__}")
    return record


def dedupe_key(record: dict) -> tuple[str, int, int]:
    """(nodeId, ctId, seq): equal keys are the same event delivered again."""
    try:
        return (record["nodeId"], record["ctId"], record["seq"])
    except KeyError as exc:
        raise WireError(f"record has no {exc.args[0]!r}: no dedupe key") from exc


def schema_dir() -> Path:
    """$CTSTREAM_SCHEMA_DIR, else the schemas/ directory of this checkout."""
    env = os.environ.get(SCHEMA_DIR_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "schemas"


def validate(record: dict) -> dict:
    """Check a record against the schema of SCHEMA_VERSION; return it.

    Raises WireError naming the offending field. Formats (ipv4, ipv6) are
    checked too, which plain JSON Schema 2020-12 validation would not do.
    """
    errors = list(_validator(str(schema_dir())).iter_errors(record))
    if not errors:
        return record
    # A wrong version or event type explains every other complaint: say it first.
    decisive = [e for e in errors if tuple(e.absolute_path)[:1] in (("schemaVersion",), ("eventType",))]
    worst = jsonschema.exceptions.best_match(decisive or errors)
    where = "/".join(str(p) for p in worst.absolute_path) or "(record)"
    raise WireError(f"record does not match {SCHEMA_FILE} at {where}: {_reason(worst)}")


def _reason(error: jsonschema.exceptions.ValidationError) -> str:
    # Combinators (oneOf, not) would quote the whole record; the schema's
    # description of the rule says more in fewer words.
    if error.validator in ("oneOf", "anyOf", "not") and isinstance(error.schema, dict):
        if "description" in error.schema:
            return error.schema["description"]
    return error.message if len(error.message) <= 200 else error.message[:200] + "..."


@functools.lru_cache(maxsize=4)
def _validator(directory: str) -> jsonschema.protocols.Validator:
    path = Path(directory) / SCHEMA_FILE
    try:
        schema = json.loads(path.read_text())
    except OSError as exc:
        raise WireError(f"cannot read the wire schema {path}: {exc.strerror} "
                        f"(set {SCHEMA_DIR_ENV} to the directory that holds {SCHEMA_FILE})") from exc
    except ValueError as exc:
        raise WireError(f"the wire schema {path} is not valid JSON: {exc}") from exc
    cls = jsonschema.validators.validator_for(schema)
    try:
        cls.check_schema(schema)
    except jsonschema.exceptions.SchemaError as exc:
        raise WireError(f"the wire schema {path} is not a valid JSON Schema: {exc.message}") from exc
    return cls(schema, format_checker=cls.FORMAT_CHECKER)
