"""Fixtures of the accounting tests: the real Kafka broker of tests/kafka
(scripts/kafka.sh), a real PostgreSQL server (scripts/postgres.sh) for the
session, and `db_url`, a fresh database per test in each engine: an SQLite
file, and a new database on that server.

Tests that need the broker are marked `kafka`, those that need PostgreSQL
`postgres`. Outside CI they skip when java or PostgreSQL 15 is missing; in
CI (CI=true) they run or fail, never skip. The server is stopped, also when
a test fails, and teardown fails loudly if a server process outlives its stop.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from streamer.demo.local_servers import free_port, live_pids
from tests.kafka.conftest import kafka_broker  # noqa: F401  (the session's broker)

ROOT = Path(__file__).resolve().parents[2]
POSTGRES_SH = ROOT / "scripts" / "postgres.sh"
PG_BIN = Path(os.environ.get("CTSTREAM_PG_BIN", "/usr/lib/postgresql/15/bin"))
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_configure(config):
    config.addinivalue_line("markers", "postgres: needs PostgreSQL 15; starts a real server "
                                       "with scripts/postgres.sh")


def pytest_collection_modifyitems(config, items):
    if IN_CI:
        return
    here = str(Path(__file__).parent)
    missing = {"kafka": None if shutil.which("java") else "needs java to run the Kafka broker",
               "postgres": None if (PG_BIN / "postgres").exists() else
               f"needs PostgreSQL 15 ({PG_BIN}/postgres)"}
    for item in items:
        if not str(item.fspath).startswith(here):
            continue
        for marker, why in missing.items():
            if why and item.get_closest_marker(marker):
                item.add_marker(pytest.mark.skip(reason=why))


def postgres_sh(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(POSTGRES_SH), *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout)


def postmaster_pids(directory: Path) -> list[int]:
    """Live (not zombie) server processes of the cluster in `directory`."""
    return live_pids(f"-D\0{directory}/data".encode())


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """The URL of a private PostgreSQL server for the session. Its directory
    is under /tmp (the server's user must reach it; pytest's tmp_path is
    root's only)."""
    directory = Path(tempfile.mkdtemp(prefix="ctstream-pg-", dir="/tmp"))
    try:
        result = postgres_sh("start", "--dir", str(directory), "--port", str(free_port()))
        if result.returncode != 0:
            pytest.fail(f"scripts/postgres.sh start failed (exit {result.returncode}):\n"
                        f"{result.stderr}", pytrace=False)
        yield result.stdout.strip()
    finally:
        stopped = postgres_sh("stop", "--dir", str(directory), timeout=60)
        left = postmaster_pids(directory)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(directory, ignore_errors=True)
        assert not left, f"postgres.sh stop left server processes {left}: {stopped.stderr}"
        assert stopped.returncode == 0, stopped.stderr


def _with_dbname(url: str, name: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request, tmp_path) -> str:
    """A new, empty accounting database: an SQLite file, or a database of
    its own on the session's PostgreSQL server (dropped afterwards)."""
    if request.param == "sqlite":
        yield f"sqlite:{tmp_path / 'accounting.db'}"
        return
    import psycopg

    server = request.getfixturevalue("postgres_server")
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield _with_dbname(server, name)
    finally:
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
