"""The wire format of ctstream's Kafka records: one msgpack map per event,
described by schemas/ctstream-event.v<N>.json and announced by a record
header (HEADER). See schemas/README.md for the versioning rule.

ctstream writes SCHEMA_VERSION and reads every version in READABLE_VERSIONS
(old topics, archives, consumers that lag behind an upgrade). `ctstream
events -o json` and its jsonl sink write the same maps as JSON (to_json).

This module knows records as plain dicts; turning the datapath's events into
them is streamer/delivery/records.py's business.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import msgpack

from streamer.errors import WireError

if TYPE_CHECKING:
    import jsonschema   # validate() imports it: the daemon node has no [validate]

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
HEADER_NAME = "ctstream-schema"
SCHEMA_DIR_ENV = "CTSTREAM_SCHEMA_DIR"

# The TCP flags of each direction, by version: v1 had names of its own, v2
# has IPFIX's tcpControlBits (IE 6) and RFC 5103's reverse of it.
TCP_FLAG_FIELDS = {1: ("tcpControlBitsInitiator", "tcpControlBitsResponder"),
                   2: ("tcpControlBits", "reverseTcpControlBits")}


def header_of(version: int) -> tuple[str, bytes]:
    """The Kafka record header that announces a schema version."""
    return (HEADER_NAME, str(version).encode())


def schema_file(version: int) -> str:
    return f"ctstream-event.v{version}.json"


HEADER = header_of(SCHEMA_VERSION)
SCHEMA_FILE = schema_file(SCHEMA_VERSION)
# A value's version without decoding it: both encoders (records.py's dicts,
# ring_records.py's layout) write schemaVersion first, a positive fixint.
_VERSION_KEY = msgpack.packb("schemaVersion")


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


def to_json(record: dict) -> str:
    """The record as one line of JSON: the same map as its msgpack value
    (`ctstream events -o json`, the jsonl sink)."""
    return json.dumps(record, separators=(",", ":"))


def version_of(value: bytes) -> int | None:
    """The schemaVersion of an encoded record, or None when it is not a
    readable record. Cheap for what ctstream wrote (it looks at the first
    bytes); anything else is decoded."""
    at = value.find(_VERSION_KEY, 0, 32)
    if at >= 0:
        end = at + len(_VERSION_KEY)
        version = value[end] if end < len(value) else None
        if version in READABLE_VERSIONS:
            return version
    try:
        version = decode(value).get("schemaVersion")
    except WireError:
        return None
    return version if type(version) is int and version in READABLE_VERSIONS else None


def tcp_control_bits(record: dict) -> tuple[int, int]:
    """(initiator's, responder's) TCP flags of a flow record of any readable
    version: v2's tcpControlBits and reverseTcpControlBits, v1's
    tcpControlBitsInitiator and tcpControlBitsResponder. KeyError if absent."""
    orig, reply = TCP_FLAG_FIELDS[record["schemaVersion"]]
    return record[orig], record[reply]


def dedupe_key(record: dict) -> tuple[str, int, int]:
    """(nodeId, ctId, seq): equal keys are the same event delivered again."""
    try:
        return (record["nodeId"], record["ctId"], record["seq"])
    except KeyError as exc:
        raise WireError(f"record has no {exc.args[0]!r}: no dedupe key") from exc


def schema_dir() -> Path:
    """$CTSTREAM_SCHEMA_DIR; else the package data of an installed copy
    (streamer/schemas, which pyproject.toml maps from the top-level
    schemas/); else the schemas/ of this checkout (also pip install -e)."""
    env = os.environ.get(SCHEMA_DIR_ENV)
    if env:
        return Path(env)
    package = Path(__file__).resolve().parents[1]
    installed = package / "schemas"
    return installed if installed.is_dir() else package.parent / "schemas"


def _jsonschema():
    try:
        import jsonschema
    except ImportError as exc:
        raise WireError("checking records against the wire schema needs jsonschema: "
                        "pip install 'ctstream[validate]'") from exc
    return jsonschema


def validate(record: dict) -> dict:
    """Check a record against the schema of its own schemaVersion (one of
    READABLE_VERSIONS; any other value is checked against SCHEMA_VERSION's
    schema, which then names schemaVersion); return it.

    Raises WireError naming the offending field. Formats (ipv4, ipv6) are
    checked too, which plain JSON Schema 2020-12 validation would not do.
    """
    jsonschema = _jsonschema()
    version = record.get("schemaVersion") if isinstance(record, dict) else None
    if type(version) is not int or version not in READABLE_VERSIONS:
        version = SCHEMA_VERSION
    errors = list(_validator(str(schema_dir()), version).iter_errors(record))
    if not errors:
        return record
    # A wrong version or event type explains every other complaint: say it first.
    decisive = [e for e in errors if tuple(e.absolute_path)[:1] in (("schemaVersion",), ("eventType",))]
    worst = jsonschema.exceptions.best_match(decisive or errors)
    where = "/".join(str(p) for p in worst.absolute_path) or "(record)"
    raise WireError(f"record does not match {schema_file(version)} at {where}: {_reason(worst)}")


def _reason(error: jsonschema.exceptions.ValidationError) -> str:
    # Combinators (oneOf, not) would quote the whole record; the schema's
    # description of the rule says more in fewer words.
    if error.validator in ("oneOf", "anyOf", "not") and isinstance(error.schema, dict):
        if "description" in error.schema:
            return error.schema["description"]
    return error.message if len(error.message) <= 200 else error.message[:200] + "..."


@functools.lru_cache(maxsize=8)
def _validator(directory: str, version: int) -> jsonschema.protocols.Validator:
    jsonschema = _jsonschema()
    name = schema_file(version)
    path = Path(directory) / name
    try:
        schema = json.loads(path.read_text())
    except OSError as exc:
        raise WireError(f"cannot read the wire schema {path}: {exc.strerror} "
                        f"(set {SCHEMA_DIR_ENV} to the directory that holds {name})") from exc
    except ValueError as exc:
        raise WireError(f"the wire schema {path} is not valid JSON: {exc}") from exc
    cls = jsonschema.validators.validator_for(schema)
    try:
        cls.check_schema(schema)
    except jsonschema.exceptions.SchemaError as exc:
        raise WireError(f"the wire schema {path} is not a valid JSON Schema: {exc.message}") from exc
    return cls(schema, format_checker=cls.FORMAT_CHECKER)
