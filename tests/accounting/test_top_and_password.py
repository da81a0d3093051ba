"""`ctstream top --by port` with ICMP, and the database password of
`account` and `top`, against real databases (an SQLite file and the
PostgreSQL server of scripts/postgres.sh), records applied without Kafka.

ICMP flows are echo exchanges keyed by the echo id, which the records carry
in both port fields: top shows them as one `icmp/echo` row per protocol with
the request's type and code, never the id as a port. The PostgreSQL password
comes from --db-password-file or CTSTREAM_DB_PASSWORD and wins over the
URL's; a URL that carries one on the command line works but is warned
about, without the password in the warning."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

import pytest

from streamer.accounting.top import top_talkers
from tests.accounting.support import CTSTREAM, Flow
from tests.accounting.test_ledger import Feed
from streamer.accounting import db as dbm

NOW_MS = int(time.time() * 1000)


def flows() -> list[Flow]:
    out = []
    for i, echo_id in enumerate((33052, 4711, 9)):       # three pings, three ids
        out.append(Flow(node="gw-t", ct_id=5_000 + i, family=4, proto="icmp",
                        src="198.18.3.1", dst="198.18.3.2", sport=echo_id, dport=echo_id,
                        end_ms=NOW_MS - 1000 * i, events=2))
    for i, echo_id in enumerate((1, 2)):
        out.append(Flow(node="gw-t", ct_id=6_000 + i, family=6, proto="icmpv6",
                        src="2001:2::1", dst="2001:2::2", sport=echo_id, dport=echo_id,
                        end_ms=NOW_MS, events=2))
    for i in range(2):
        out.append(Flow(node="gw-t", ct_id=7_000 + i, family=4, proto="tcp", src="198.18.3.1",
                        dst="198.18.3.2", sport=40_000 + i, dport=443, end_ms=NOW_MS, events=3))
    return out


@pytest.fixture
def filled(db_url):
    db = dbm.open_database(db_url)
    try:
        Feed(db).apply([r for f in flows() for r in f.all_events()])
    finally:
        db.close()
    return db_url


def clean_env(**extra: str) -> dict:
    """The environment without any password libpq or ctstream would take."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("CTSTREAM_DB_PASSWORD", "PGPASSWORD", "PGPASSFILE")}
    env.update(PGPASSFILE="/nonexistent/pgpass", **extra)
    return env


def top(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([CTSTREAM, "top", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=60, env=env or clean_env())


def test_icmp_is_one_echo_row_per_protocol_not_a_port_per_echo_id(filled):
    rows = top_talkers(filled, "port")
    by_talker = {r["talker"]: r for r in rows}
    assert set(by_talker) == {"tcp/443", "icmp/echo", "icmpv6/echo"}, rows
    icmp, icmp6, tcp = by_talker["icmp/echo"], by_talker["icmpv6/echo"], by_talker["tcp/443"]
    assert (icmp["flows"], icmp6["flows"], tcp["flows"]) == (3, 2, 2)
    assert (icmp["protocol"], icmp["port"], icmp["icmp_type"], icmp["icmp_code"]) == (1, None, 8, 0)
    assert (icmp6["protocol"], icmp6["port"], icmp6["icmp_type"]) == (58, None, 128)
    assert tcp["port"] == 443 and "icmp_type" not in tcp
    want = {f.proto: 0 for f in flows()}
    for f in flows():
        po, pr, bo, br = f.counters(f.events - 1)
        want[f.proto] += bo + br
    assert (icmp["bytes"], icmp6["bytes"], tcp["bytes"]) == (want["icmp"], want["icmpv6"],
                                                             want["tcp"])

    text = top("--db", filled, "--by", "port")
    assert text.returncode == 0, text.stderr
    talkers = [ln.split()[0] for ln in text.stdout.splitlines()[1:]]
    assert sorted(talkers) == ["icmp/echo", "icmpv6/echo", "tcp/443"]
    assert not re.search(r"icmp(v6)?/\d", text.stdout), text.stdout
    as_json = top("--db", filled, "--by", "port", "-o", "json")
    assert json.loads(as_json.stdout) == rows


def without_password(url: str) -> tuple[str, str]:
    m = re.fullmatch(r"(postgresql://[^:/@]+):([^@]+)(@.*)", url)
    assert m, url
    return m.group(1) + m.group(3), m.group(2)


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_the_password_comes_from_a_file_or_the_environment(filled, tmp_path):
    url, password = without_password(filled)
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_text(password + "\n")
    bad.write_text("not-" + password + "\n")
    good.chmod(0o600)

    refused = top("--db", url)                          # no password anywhere
    assert refused.returncode == 1, refused.stderr
    assert "cannot connect to PostgreSQL" in refused.stderr

    for args, env in ((["--db-password-file", str(good)], None),
                      ([], clean_env(CTSTREAM_DB_PASSWORD=password))):
        r = top("--db", url, *args, env=env)
        assert r.returncode == 0, (args, r.stderr)
        assert "warning" not in r.stderr and "SOURCE" in r.stdout

    # The file wins over the URL's own password.
    r = top("--db", filled, "--db-password-file", str(bad))
    assert r.returncode == 1 and "cannot connect to PostgreSQL" in r.stderr, r.stderr

    # A password on the command line works, and is warned about, unshown.
    r = top("--db", filled)
    assert r.returncode == 0, r.stderr
    assert "warning: --db" in r.stderr and "carries a password" in r.stderr
    assert password not in r.stderr + r.stdout

    # account: the same options; a URL from the config file is not on the
    # command line, so no warning.
    conf = tmp_path / "account.toml"
    conf.write_text(f'db = "{filled}"\n')
    r = subprocess.run([CTSTREAM, "account", "--report", "--config", str(conf)],
                       capture_output=True, text=True, timeout=60, env=clean_env())
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    r = subprocess.run([CTSTREAM, "account", "--report", "--db", url, "--db-password-file",
                        str(good)], capture_output=True, text=True, timeout=60, env=clean_env())
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr

    missing = top("--db", url, "--db-password-file", str(tmp_path / "nope"))
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1].startswith(
        "ctstream: error: cannot read --db-password-file")
