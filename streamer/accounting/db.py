"""The accounting database: SQLite (embedded, the default) or PostgreSQL,
one schema for both, and the transactions the consumer writes in.

`--db` URLs: `sqlite:PATH` (`sqlite:///abs/path` also works) or
`postgresql://USER@HOST:PORT/DB` (`postgres://` too; any libpq URL). The
PostgreSQL password comes from `--db-password-file` or $CTSTREAM_DB_PASSWORD
(`db_password`, `with_password`), which win over one the URL carries; a URL
with a password still works, but the command warns (command.py): a command
line is readable by every local user. `parse_url` checks a URL (ConfigError,
exit 2); `open_database` connects
(StreamerError, exit 1, when the server is down or the file cannot be
written) and, for writers, creates the schema.

Tables (the same columns in both engines; SQL below is written once with
`?` placeholders and translated for psycopg):

- `flow_events`: the dedupe set, one row per applied CREATE, UPDATE or
  DESTROY, keyed (node_id, ct_id, seq). Also what the gap report reads.
- `flows`: one row per finished flow, from its DESTROY.
- `rollups`: per minute (of the flow's end) and (node, source, destination,
  protocol, destination port): flows, packets and bytes per direction.
- `open_flows`: the latest state of flows without a DESTROY yet, from
  CREATE, UPDATE and SNAPSHOT records.
- `lost_reports`: LOST records (a node's cumulative loss counters).
- `rejected_records`: Kafka records that are not valid ctstream records
  (kept, with their place in the topic, instead of stopping the consumer).
- `kafka_offsets`: per topic partition, the offset of the next record to
  read. Written in the transaction that applies the records before it, so
  the database, not Kafka's committed offsets, says where to resume.

ct_id is an unsigned 64-bit number and both engines store signed 64-bit
integers: ids from 2^63 up are stored as id - 2^64 (`db_ct_id`/`wire_ct_id`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sqlite3
import time
from dataclasses import dataclass, field, replace

from ..errors import ConfigError, DatabaseError, StreamerError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
# libpq waits this long for a server that does not answer.
CONNECT_TIMEOUT_S = 5
# SQLite: how long a writer waits for another one (two consumers on one file).
SQLITE_BUSY_MS = 30_000
# A transaction that lost a race (deadlock, a zombie consumer's duplicate
# key, a locked SQLite file) is run again from the start, this many times.
TRANSACTION_ATTEMPTS = 5

from ..settings import DB_PASSWORD_ENV, DEFAULT_DB as DEFAULT_URL  # noqa: E402

_U63 = 1 << 63
_U64 = 1 << 64


def db_ct_id(ct_id: int) -> int:
    """A wire ct_id (unsigned 64-bit) as the signed integer the database keeps."""
    return ct_id - _U64 if ct_id >= _U63 else ct_id


def wire_ct_id(stored: int) -> int:
    return stored + _U64 if stored < 0 else stored


@dataclass(frozen=True)
class DbTarget:
    engine: str          # "sqlite" or "postgresql"
    path: str = ""       # sqlite: the file
    conninfo: str = ""   # postgresql: the URL as given
    shown: str = ""      # for messages: the URL without its password
    # postgresql: from the password file or the environment; wins over the URL's
    password: str | None = field(default=None, repr=False, compare=False)

    def __str__(self) -> str:
        return self.shown


def parse_url(url: str | DbTarget) -> DbTarget:
    """The database a --db URL names; ConfigError unless it is one of the
    two forms."""
    if isinstance(url, DbTarget):
        return url
    if not isinstance(url, str) or not url.strip():
        raise ConfigError("--db is empty: give sqlite:PATH or postgresql://USER:PASSWORD@HOST:PORT/DB")
    url = url.strip()
    if url.startswith("sqlite:"):
        path = url[len("sqlite:"):]
        if path.startswith("//"):
            path = path[2:]
        if not path or path == ":memory:" or path.endswith("/"):
            raise ConfigError(f"--db {url!r}: sqlite:PATH needs the path of a database file")
        return DbTarget("sqlite", path=path, shown=f"sqlite:{path}")
    if url.startswith(("postgresql://", "postgres://")):
        from psycopg import ProgrammingError
        from psycopg.conninfo import conninfo_to_dict
        try:
            params = conninfo_to_dict(url)
        except ProgrammingError as exc:
            raise ConfigError(f"--db {_hide_password(url)!r} is not a PostgreSQL URL: "
                              f"{str(exc).splitlines()[0]}") from exc
        port = params.get("port")
        if port is not None and not all(p.isdigit() and 1 <= int(p) <= 65535
                                        for p in str(port).split(",")):
            raise ConfigError(f"--db {_hide_password(url)!r}: port {port!r} is not a port number")
        return DbTarget("postgresql", conninfo=url, shown=_hide_password(url))
    raise ConfigError(f"--db {_hide_password(url)!r}: expected sqlite:PATH or "
                      "postgresql://USER:PASSWORD@HOST:PORT/DB")


def url_has_password(url: str) -> bool:
    """Whether a postgresql:// URL carries a password (USER:PASSWORD@ or
    ?password=)."""
    if not url.strip().startswith(("postgresql://", "postgres://")):
        return False
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict
    try:
        return bool(conninfo_to_dict(url.strip()).get("password"))
    except ProgrammingError:
        return False


def db_password(path: str | None) -> str | None:
    """The PostgreSQL password: the first line of `path` (--db-password-file),
    else $CTSTREAM_DB_PASSWORD, else None (the URL's, or libpq's own
    ~/.pgpass and $PGPASSWORD)."""
    if not path:
        return os.environ.get(DB_PASSWORD_ENV) or None
    try:
        with open(path) as f:
            return f.readline().rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(f"cannot read --db-password-file {path}: {exc.strerror}",
                          setting="db-password-file") from exc


def with_password(target: DbTarget, password: str | None) -> DbTarget:
    """`target` that connects with `password` (PostgreSQL; SQLite has none)."""
    if password is None or target.engine != "postgresql":
        return target
    return replace(target, password=password)


def _hide_password(url: str) -> str:
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


# ---- schema ----------------------------------------------------------------------

# A flow's key and counters, as finished flows and open ones keep them (the
# order of ledger._flow_fields).
_FLOW_FIELDS = """family INTEGER NOT NULL,
        protocol INTEGER NOT NULL,
        src TEXT NOT NULL,
        dst TEXT NOT NULL,
        sport INTEGER NOT NULL,
        dport INTEGER NOT NULL,
        vlan INTEGER NOT NULL,
        packets_orig BIGINT NOT NULL,
        packets_reply BIGINT NOT NULL,
        bytes_orig BIGINT NOT NULL,
        bytes_reply BIGINT NOT NULL,"""

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS ctstream_meta (
        name TEXT PRIMARY KEY,
        value TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS kafka_offsets (
        topic TEXT NOT NULL,
        kpartition INTEGER NOT NULL,
        next_offset BIGINT NOT NULL,
        consumer_group TEXT NOT NULL,
        updated_ms BIGINT NOT NULL,
        PRIMARY KEY (topic, kpartition))""",
    """CREATE TABLE IF NOT EXISTS flow_events (
        node_id TEXT NOT NULL,
        ct_id BIGINT NOT NULL,
        seq BIGINT NOT NULL,
        event_type TEXT NOT NULL,
        missed_events INTEGER NOT NULL,
        observed_ms BIGINT,
        PRIMARY KEY (node_id, ct_id, seq))""",
    f"""CREATE TABLE IF NOT EXISTS flows (
        node_id TEXT NOT NULL,
        ct_id BIGINT NOT NULL,
        seq BIGINT NOT NULL,
        {_FLOW_FIELDS}
        start_ms BIGINT NOT NULL,
        end_ms BIGINT NOT NULL,
        end_reason INTEGER NOT NULL,
        tcp_state TEXT,
        assured INTEGER NOT NULL,
        tcp_flags_orig INTEGER NOT NULL,
        tcp_flags_reply INTEGER NOT NULL,
        retries INTEGER NOT NULL,
        PRIMARY KEY (node_id, ct_id))""",
    "CREATE INDEX IF NOT EXISTS flows_end_ms ON flows (end_ms)",
    """CREATE TABLE IF NOT EXISTS rollups (
        minute_ms BIGINT NOT NULL,
        node_id TEXT NOT NULL,
        src TEXT NOT NULL,
        dst TEXT NOT NULL,
        protocol INTEGER NOT NULL,
        dport INTEGER NOT NULL,
        flows BIGINT NOT NULL,
        packets_orig BIGINT NOT NULL,
        packets_reply BIGINT NOT NULL,
        bytes_orig BIGINT NOT NULL,
        bytes_reply BIGINT NOT NULL,
        PRIMARY KEY (minute_ms, node_id, src, dst, protocol, dport))""",
    f"""CREATE TABLE IF NOT EXISTS open_flows (
        node_id TEXT NOT NULL,
        ct_id BIGINT NOT NULL,
        last_seq BIGINT NOT NULL,
        last_type TEXT NOT NULL,
        snapshot_seq BIGINT,
        {_FLOW_FIELDS}
        start_ms BIGINT NOT NULL,
        last_ms BIGINT NOT NULL,
        observed_ms BIGINT NOT NULL,
        tcp_state TEXT,
        PRIMARY KEY (node_id, ct_id))""",
    """CREATE TABLE IF NOT EXISTS lost_reports (
        node_id TEXT NOT NULL,
        seq BIGINT NOT NULL,
        observed_ms BIGINT,
        counters TEXT NOT NULL,
        PRIMARY KEY (node_id, seq))""",
    """CREATE TABLE IF NOT EXISTS rejected_records (
        topic TEXT NOT NULL,
        kpartition INTEGER NOT NULL,
        koffset BIGINT NOT NULL,
        reason TEXT NOT NULL,
        received_ms BIGINT NOT NULL,
        PRIMARY KEY (topic, kpartition, koffset))""",
]

TABLES = ("kafka_offsets", "flow_events", "flows", "rollups", "open_flows",
          "lost_reports", "rejected_records")


# ---- connections -----------------------------------------------------------------

class Database:
    """One connection to the accounting database. Not thread-safe: the
    consumer uses it from one worker thread at a time.

    `transaction(fn)` runs fn(cur) inside one transaction and commits, or
    rolls back and runs it again when it lost a race (TRANSACTION_ATTEMPTS
    times in all). Queries use `?` placeholders in both engines."""

    engine = ""

    def __init__(self, target: DbTarget):
        self.target = target

    # Engine specifics: connect, begin, the errors worth another attempt.
    def close(self) -> None:
        raise NotImplementedError

    def transaction(self, fn, *args):
        last: Exception | None = None
        for attempt in range(1, TRANSACTION_ATTEMPTS + 1):
            try:
                return self._run_transaction(fn, *args)
            except Exception as exc:
                if not self._retryable(exc) or attempt == TRANSACTION_ATTEMPTS:
                    raise self._wrap(exc) from exc
                last = exc
                log.info("transaction attempt %d lost a race (%s); again", attempt, exc)
                time.sleep(0.05 * attempt)
        raise self._wrap(last)  # pragma: no cover

    def query(self, sql: str, params=()) -> list[tuple]:
        """Rows of one read-only statement (its own short transaction)."""
        return self.transaction(lambda cur: _fetchall(cur, sql, params))

    def _run_transaction(self, fn, *args):
        raise NotImplementedError

    def _retryable(self, exc: Exception) -> bool:
        return False

    def _wrap(self, exc: Exception | None) -> Exception:
        if isinstance(exc, StreamerError):
            return exc
        return DatabaseError(f"database {self.target}: {_first_line(exc)}")

    # Schema -------------------------------------------------------------------
    def create_schema(self) -> None:
        def create(cur):
            self._schema_lock(cur)
            for ddl in SCHEMA:
                cur.execute(ddl)
            cur.execute("SELECT value FROM ctstream_meta WHERE name = 'schema'")
            row = cur.fetchone()
            if row is None:
                cur.execute("INSERT INTO ctstream_meta (name, value) VALUES ('schema', ?)",
                            (str(SCHEMA_VERSION),))
            elif row[0] != str(SCHEMA_VERSION):
                raise DatabaseError(f"database {self.target} has accounting schema version {row[0]}; "
                                    f"this ctstream knows version {SCHEMA_VERSION}")
        self.transaction(create)

    def check_schema(self) -> None:
        """For readers (top, report): the tables exist and have our version."""
        try:
            rows = self.query("SELECT value FROM ctstream_meta WHERE name = 'schema'")
        except DatabaseError as exc:
            raise DatabaseError(f"database {self.target} holds no flow accounting "
                                f"(run ctstream account first): {exc}") from exc
        if not rows or rows[0][0] != str(SCHEMA_VERSION):
            raise DatabaseError(f"database {self.target} has accounting schema version "
                                f"{rows[0][0] if rows else 'none'}; this ctstream knows {SCHEMA_VERSION}")

    def _schema_lock(self, cur) -> None:
        pass


def _fetchall(cur, sql: str, params) -> list[tuple]:
    cur.execute(sql, params)
    return cur.fetchall()


def _first_line(exc: BaseException | None) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


class SqliteDatabase(Database):
    engine = "sqlite"

    def __init__(self, target: DbTarget, *, create: bool):
        super().__init__(target)
        path = target.path
        # IMMEDIATE takes the write lock at once, so two writers queue
        # instead of failing at their first write. Readers (top, the
        # report: create=False) only read: a deferred BEGIN takes no write
        # lock, so in WAL mode they neither wait for the consumer's
        # transaction nor hold it up (IMMEDIATE made them do both).
        self._begin = "BEGIN IMMEDIATE" if create else "BEGIN"
        if not create and not os.path.exists(path):
            raise DatabaseError(f"no accounting database at {path} (run ctstream account first)")
        if create:
            parent = os.path.dirname(os.path.abspath(path))
            if target.path == DEFAULT_URL[len("sqlite:"):]:
                os.makedirs(parent, exist_ok=True)
            if not os.path.isdir(parent):
                raise DatabaseError(f"cannot create the database {path}: directory {parent} "
                                    "does not exist")
            if not os.access(parent, os.W_OK | os.X_OK) or \
                    (os.path.exists(path) and not os.access(path, os.R_OK | os.W_OK)):
                raise DatabaseError(f"cannot write the database {path}: permission denied")
        try:
            # isolation_level=None: sqlite3 leaves transactions to us (BEGIN
            # IMMEDIATE below); check_same_thread off: the consumer's worker
            # thread uses the connection, one call at a time.
            self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                        timeout=SQLITE_BUSY_MS / 1000)
            self.conn.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_MS}")
            if create:
                # WAL: `top` and the report read while a consumer writes.
                # synchronous=NORMAL may lose the last commits on power loss,
                # never split one: rows and offsets go back together and the
                # records are read again from Kafka.
                self.conn.execute("PRAGMA journal_mode = WAL")
            self.conn.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.Error as exc:
            raise DatabaseError(f"cannot open the database {path}: {_first_line(exc)}") from exc

    def close(self) -> None:
        self.conn.close()

    def _run_transaction(self, fn, *args):
        cur = self.conn.cursor()
        cur.execute(self._begin)
        try:
            result = fn(cur, *args)
            cur.execute("COMMIT")
            return result
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                cur.execute("ROLLBACK")
            raise
        finally:
            cur.close()

    def _retryable(self, exc: Exception) -> bool:
        return isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)

    def _wrap(self, exc):
        if isinstance(exc, sqlite3.OperationalError) and "readonly" in str(exc):
            return DatabaseError(f"cannot write the database {self.target.path}: {_first_line(exc)}")
        return super()._wrap(exc)


class PostgresDatabase(Database):
    engine = "postgresql"

    def __init__(self, target: DbTarget):
        super().__init__(target)
        import psycopg
        try:
            extra = {} if target.password is None else {"password": target.password}
            self.conn = psycopg.connect(target.conninfo, connect_timeout=CONNECT_TIMEOUT_S,
                                        application_name="ctstream-account", **extra)
        except psycopg.Error as exc:
            raise DatabaseError(f"cannot connect to PostgreSQL at {target}: "
                                f"{_pg_reason(exc)}") from exc

    def close(self) -> None:
        self.conn.close()

    def _run_transaction(self, fn, *args):
        with self.conn.transaction():
            with self.conn.cursor() as cur:
                return fn(_PgCursor(cur), *args)

    def _retryable(self, exc: Exception) -> bool:
        from psycopg import errors
        return isinstance(exc, (errors.DeadlockDetected, errors.SerializationFailure,
                                errors.UniqueViolation))

    def _wrap(self, exc):
        import psycopg
        if isinstance(exc, psycopg.OperationalError):
            return DatabaseError(f"lost the connection to PostgreSQL at {self.target}: "
                                 f"{_pg_reason(exc)} (the offsets are in the database: "
                                 "start again to resume)")
        return super()._wrap(exc)

    def _schema_lock(self, cur) -> None:
        # Two consumers starting at once would race on CREATE TABLE.
        cur.execute("SELECT pg_advisory_xact_lock(?)", (0x63747374,))


class _PgCursor:
    """A psycopg cursor that takes the `?` placeholders of this module's SQL."""

    def __init__(self, cur):
        self._cur = cur

    def execute(self, sql, params=()):
        return self._cur.execute(sql.replace("?", "%s"), params or None)

    def executemany(self, sql, rows):
        return self._cur.executemany(sql.replace("?", "%s"), rows)

    def fetchone(self):
        return self._cur.fetchone()

    def fetchall(self):
        return self._cur.fetchall()


def _pg_reason(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # libpq repeats "connection to server at ... failed:" per address.
    for ln in lines:
        if "failed: " in ln:
            return ln.rsplit("failed: ", 1)[1]
    return lines[0] if lines else type(exc).__name__


def open_database(url: str | DbTarget, *, create: bool = True) -> Database:
    """Connect. `create`: make the schema if missing (the consumer);
    otherwise check that it exists (top, report)."""
    target = parse_url(url)
    db: Database
    if target.engine == "sqlite":
        db = SqliteDatabase(target, create=create)
    else:
        db = PostgresDatabase(target)
    try:
        if create:
            db.create_schema()
        else:
            db.check_schema()
    except BaseException:
        db.close()
        raise
    return db
