"""Deployment files: docker/compose.yaml, systemd/ and the example config.

- docker/compose.yaml validates with Docker Compose (`docker compose config`,
  built by scripts/setup.sh; Debian's docker-compose v1 is the fallback) and
  wires the services as intended: the daemon privileged on the host network
  with bpffs, headers and a spool volume, after the topic exists.
- The systemd units pass `systemd-analyze verify` (against a scratch root, so
  that the executables they name need not be installed) and keep their
  capability set and sandbox; without systemd-analyze the unit files are
  parsed here instead, never skipped. The daemon's unit is Type=notify
  (tests/netns/test_sd_notify.py: READY=1 once attached), names no pin
  directory (the config file does) and no BPF or schema directory (the
  package holds them); the consumer's takes the database password from its
  environment file, never the command line.
- systemd/ctstream.toml is accepted by `ctstream run --config` parsing.
- One root test runs the datapath under exactly the unit's capability bounding
  set (load, attach through --netns, adopt the pins after a restart) and shows
  that CAP_SYS_ADMIN is still needed for the adoption.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from streamer.cli import load_config
from streamer.datapath.loader import STATE_DIR

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker" / "compose.yaml"
UNIT = REPO / "systemd" / "ctstream.service"
ACCOUNT_UNIT = REPO / "systemd" / "ctstream-account.service"
EXAMPLE_TOML = REPO / "systemd" / "ctstream.toml"
COMPOSE_PLUGIN = Path("/usr/local/lib/docker/cli-plugins/docker-compose")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
SERVICES = {"kafka", "kafka-topics", "ctstream", "account", "postgres", "mosquitto"}
TIMEOUT = 60


# --- Docker Compose -----------------------------------------------------------------


def compose_command() -> list[str]:
    """Compose v2 (docker plugin, or the plugin binary run on its own), else
    docker-compose v1; $CTSTREAM_COMPOSE overrides."""
    if os.environ.get("CTSTREAM_COMPOSE"):
        return shlex.split(os.environ["CTSTREAM_COMPOSE"])
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True,
                               timeout=TIMEOUT)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if os.access(COMPOSE_PLUGIN, os.X_OK):
        return [str(COMPOSE_PLUGIN)]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    msg = "no Docker Compose (docker compose / docker-compose): run scripts/setup.sh"
    if IN_CI:
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="module")
def compose() -> list[str]:
    return compose_command()


def compose_config(compose: list[str], path: Path = COMPOSE_FILE, env: dict | None = None,
                   *extra: str) -> subprocess.CompletedProcess:
    # The file's ${VAR:-default}s must not pick up the caller's settings.
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CTSTREAM_")}
    clean.update(env or {})
    return subprocess.run([*compose, "-f", str(path), "config", *extra], capture_output=True,
                          text=True, env=clean, timeout=TIMEOUT)


def resolved(compose: list[str], env: dict | None = None) -> dict:
    """The resolved model: JSON from v2, YAML from v1."""
    r = compose_config(compose, COMPOSE_FILE, env)
    assert r.returncode == 0, r.stderr
    if r.stdout.lstrip().startswith("{"):
        return json.loads(r.stdout)
    import yaml  # docker-compose v1 depends on python3-yaml
    return yaml.safe_load(r.stdout)


def volume_targets(service: dict) -> dict[str, str]:
    """target -> source, from v2's long form or v1's "src:dst[:mode]"."""
    out = {}
    for v in service.get("volumes", []):
        if isinstance(v, dict):
            out[v["target"]] = v.get("source", "")
        else:
            src, dst = v.split(":")[:2]
            out[dst] = src
    return out


def extra_hosts(service: dict) -> dict[str, str]:
    hosts = service.get("extra_hosts", [])
    if isinstance(hosts, dict):
        return dict(hosts)
    return dict(re.split(r"[=:]", h, maxsplit=1) for h in hosts)


def option(argv: list[str], name: str) -> str:
    assert name in argv, argv
    return argv[argv.index(name) + 1]


def test_compose_file_validates(compose):
    r = compose_config(compose, COMPOSE_FILE, None, "-q")
    assert r.returncode == 0, r.stderr


def test_compose_validation_rejects_a_broken_file(compose, tmp_path):
    # The check above is worth something only if Compose checks the schema.
    broken = tmp_path / "compose.yaml"
    text = COMPOSE_FILE.read_text()
    assert "    privileged: true\n" in text
    broken.write_text(text.replace("    privileged: true\n", "    privilegd: true\n"))
    r = compose_config(compose, broken, None, "-q")
    assert r.returncode != 0
    assert "privilegd" in r.stderr


def test_compose_services_and_the_daemon(compose):
    cfg = resolved(compose)
    svc = cfg["services"]
    assert set(svc) == SERVICES

    daemon = svc["ctstream"]
    assert daemon["privileged"] is True
    assert daemon["network_mode"] == "host"
    vols = volume_targets(daemon)
    assert vols["/sys/fs/bpf"] == "/sys/fs/bpf"
    assert vols["/lib/modules"] == "/lib/modules"
    assert "/var/lib/ctstream" in vols and not vols["/var/lib/ctstream"].startswith("/")
    # On the host network "kafka" and "mosquitto" are the published loopback ports.
    assert extra_hosts(daemon) == {"kafka": "127.0.0.1", "mosquitto": "127.0.0.1"}
    for name in ("kafka", "mosquitto"):
        assert any(str(p.get("host_ip", p) if isinstance(p, dict) else p).startswith("127.0.0.1")
                   for p in svc[name]["ports"]), svc[name]["ports"]

    # The daemon's command is a valid `ctstream run` for this CLI.
    argv = daemon["command"]
    a = load_config(argv)
    assert a.command == "run" and a.ifaces == ["eth0"]
    assert a.kafka == "kafka:9092" and a.topic == "ctstream.events"
    assert a.mqtt == "mosquitto:1883"

    # The topic exists before the daemon and the consumer start.
    assert daemon["depends_on"]["kafka-topics"]["condition"] == "service_completed_successfully"
    account = svc["account"]
    assert account["depends_on"]["kafka-topics"]["condition"] == "service_completed_successfully"
    assert account["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert svc["kafka-topics"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    topics = svc["kafka-topics"]["command"]
    assert "--create" in topics and "--if-not-exists" in topics
    assert option(topics, "--topic") == a.topic
    assert option(topics, "--bootstrap-server") == a.kafka

    assert account["command"][0] == "account"
    assert option(account["command"], "--kafka") == a.kafka
    assert option(account["command"], "--topic") == a.topic
    assert option(account["command"], "--db") == "postgresql://ctstream@postgres:5432/ctstream"
    assert account["environment"]["CTSTREAM_DB_PASSWORD"] == "ctstream"
    assert "privileged" not in account and "network_mode" not in account

    for name in ("kafka", "postgres", "mosquitto", "ctstream"):
        assert svc[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"


def test_compose_kafka_is_kraft_without_auto_create_at_the_pinned_version(compose):
    svc = resolved(compose)["services"]
    env = svc["kafka"]["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert str(env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"]).lower() == "false"
    assert env["KAFKA_ADVERTISED_LISTENERS"] == "PLAINTEXT://kafka:9092"
    pom = (REPO / "scripts" / "kafka" / "pom.xml").read_text()
    pinned = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", pom).group(1)
    assert svc["kafka"]["image"] == f"apache/kafka:{pinned}"
    assert svc["kafka-topics"]["image"] == svc["kafka"]["image"]


def test_compose_settings_come_from_the_environment(compose):
    svc = resolved(compose, {"CTSTREAM_IFACE": "ens9", "CTSTREAM_TOPIC": "flows",
                             "CTSTREAM_PARTITIONS": "6", "CTSTREAM_DB_PASSWORD": "s3cret"})["services"]
    a = load_config(svc["ctstream"]["command"])
    assert a.ifaces == ["ens9"] and a.topic == "flows"
    assert option(svc["kafka-topics"]["command"], "--topic") == "flows"
    assert option(svc["kafka-topics"]["command"], "--partitions") == "6"
    assert option(svc["account"]["command"], "--topic") == "flows"
    # The password reaches the consumer by its environment, not its command line.
    assert svc["account"]["environment"]["CTSTREAM_DB_PASSWORD"] == "s3cret"
    assert not any("s3cret" in str(word) for word in svc["account"]["command"])
    assert svc["postgres"]["environment"]["POSTGRES_PASSWORD"] == "s3cret"


def test_dockerfile_installs_what_the_loader_and_wire_need():
    text = (REPO / "docker" / "Dockerfile").read_text()
    assert re.search(r"^FROM debian:bookworm", text, re.M)
    assert "python3-bpfcc" in text
    # bpf/ and schemas/ are package data: copied before the install, and no
    # variable points at them.
    install = re.search(r"^RUN pip install --no-deps \.", text, re.M)
    assert install, "the project is not installed"
    for src in ("bpf", "schemas"):
        copy = re.search(rf"^COPY {src} \./{src}$", text, re.M)
        assert copy and copy.start() < install.start(), f"{src}/ is not copied before the install"
    code = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))
    assert "CTSTREAM_BPF_DIR" not in code and "CTSTREAM_SCHEMA_DIR" not in code
    # One image for the daemon and the consumers: the consumers' extras too.
    assert '["optional-dependencies"]["postgres"]' in text
    assert '["optional-dependencies"]["validate"]' in text
    assert re.search(r'^ENTRYPOINT \["ctstream"\]', text, re.M)


# --- systemd --------------------------------------------------------------------------


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> values (repeated keys accumulate), as systemd reads
    them: comments, blank lines, [Section], Key=Value; nothing else."""
    units: dict[str, dict[str, list[str]]] = {}
    section = None
    for n, line in enumerate(path.read_text().splitlines(), 1):
        s = line.strip()
        if not s or s[0] in "#;":
            continue
        m = re.fullmatch(r"\[([A-Za-z]+)\]", s)
        if m:
            section = units.setdefault(m.group(1), {})
            continue
        m = re.fullmatch(r"([A-Za-z][A-Za-z0-9]*)=(.*)", s)
        assert m and section is not None and not s.endswith("\\"), f"{path.name}:{n}: {line!r}"
        section.setdefault(m.group(1), []).append(m.group(2))
    return units


# Every directive the units may use, spelled as systemd spells them: the
# parsing check used where systemd-analyze is missing.
KNOWN = {
    "Unit": {"Description", "Documentation", "Wants", "Requires", "After", "Before",
             "RequiresMountsFor", "ConditionPathExists"},
    "Service": {"Type", "NotifyAccess", "TimeoutStartSec", "Environment", "EnvironmentFile",
                "ExecStartPre", "ExecStart", "ExecReload",
                "KillSignal", "TimeoutStopSec", "Restart", "RestartSec",
                "RestartPreventExitStatus", "RuntimeDirectory", "RuntimeDirectoryMode",
                "RuntimeDirectoryPreserve", "StateDirectory", "StateDirectoryMode",
                "ConfigurationDirectory", "UMask", "LimitMEMLOCK", "CapabilityBoundingSet",
                "AmbientCapabilities", "NoNewPrivileges", "ProtectSystem", "ProtectHome",
                "PrivateTmp", "ReadWritePaths", "ProtectKernelTunables", "ProtectKernelModules",
                "ProtectControlGroups", "ProtectKernelLogs", "ProtectClock", "ProtectHostname",
                "ProtectProc", "PrivateDevices", "RestrictNamespaces", "RestrictAddressFamilies",
                "RestrictRealtime", "RestrictSUIDSGID", "LockPersonality",
                "MemoryDenyWriteExecute", "SystemCallArchitectures", "SystemCallFilter",
                "SystemCallErrorNumber", "DynamicUser"},
    "Install": {"WantedBy"},
}


@pytest.mark.parametrize("unit", [UNIT, ACCOUNT_UNIT], ids=lambda p: p.name)
def test_unit_files_parse(unit):
    units = parse_unit(unit)
    assert set(units) == {"Unit", "Service", "Install"}
    for section, keys in units.items():
        unknown = set(keys) - KNOWN[section]
        assert not unknown, f"{unit.name}: unknown keys in [{section}]: {unknown}"
        for key, values in keys.items():
            if key.startswith("Exec"):
                for v in values:
                    assert v.split()[0].startswith("/"), f"{key} needs an absolute path: {v}"


def test_daemon_unit_capabilities_and_sandbox():
    svc = parse_unit(UNIT)["Service"]
    (caps,) = svc["CapabilityBoundingSet"]
    assert set(caps.split()) == {"CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON", "CAP_SYS_ADMIN"}
    assert svc["AmbientCapabilities"] == [""]
    one = {k: v[-1] for k, v in svc.items()}
    assert one["NoNewPrivileges"] == "yes"
    assert one["ProtectSystem"] == "strict" and one["ProtectHome"] == "yes"
    assert one["PrivateTmp"] == "yes"
    assert one["Restart"] == "on-failure"
    assert set(one["ReadWritePaths"].split()) == {"/sys/fs/bpf", "/run/ctstream", "/var/lib/ctstream"}
    assert one["RuntimeDirectory"] == "ctstream" and one["StateDirectory"] == "ctstream"
    assert one["RuntimeDirectoryMode"] == one["StateDirectoryMode"] == "0700"
    # BCC reads the kernel headers under /lib/modules: that protection must stay off.
    assert "ProtectKernelModules" not in svc
    assert one["ExecStart"].split()[1:] == ["run", "--config", "/etc/ctstream/ctstream.toml"]
    # systemctl reload: SIGHUP, which re-reads --config
    assert svc["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    # READY=1 comes from the daemon itself once attached (streamer/observe/sd_notify.py).
    assert one["Type"] == "notify" and one["NotifyAccess"] == "main"
    # The pin dir is the config file's alone (the daemon makes it 0700), and
    # the installed package holds the BPF sources and schemas.
    assert "ExecStartPre" not in svc
    assert not any("CTSTREAM_" in e for e in svc.get("Environment", []))


def test_account_unit_has_no_privileges():
    svc = parse_unit(ACCOUNT_UNIT)["Service"]
    assert svc["CapabilityBoundingSet"] == [""] and svc["DynamicUser"] == ["yes"]
    argv = svc["ExecStart"][0].split()
    assert argv[1] == "account"
    assert {"--kafka", "--topic", "--db"} <= set(argv)


def account_env() -> dict[str, str]:
    """systemd/account.env's settings, and its commented-out ones."""
    out = {}
    for line in (REPO / "systemd" / "account.env").read_text().splitlines():
        m = re.fullmatch(r"#?(CTSTREAM_[A-Z_]+)=(.*)", line.strip())
        if m:
            out.setdefault(m.group(1), []).append(m.group(2))
    return out


def test_account_unit_takes_the_password_from_its_environment_file():
    from streamer.accounting.db import url_has_password
    from streamer.settings import DB_PASSWORD_ENV

    svc = parse_unit(ACCOUNT_UNIT)["Service"]
    assert svc["EnvironmentFile"] == ["/etc/ctstream/account.env"]
    assert not any("SCHEMA_DIR" in e for e in svc["Environment"])
    env = account_env()
    assert DB_PASSWORD_ENV in env                      # documented where it is set
    dbs = env["CTSTREAM_DB"]
    assert any(d.startswith("postgresql://") for d in dbs) and any(d.startswith("sqlite:") for d in dbs)
    assert not any(url_has_password(d) for d in dbs), dbs
    # The command line, with the file's settings filled in, is a valid
    # account command with no password on it.
    values = {k: v[-1] for k, v in env.items()}
    argv = svc["ExecStart"][0].split()[1:]
    argv = [re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], w) for w in argv]
    for db in dbs:
        a = load_config([*argv[:-1], db])
        assert a.command == "account" and a.db == db and a.db_password_file is None


def scratch_root(tmp_path: Path, units: list[Path]) -> Path:
    """A root for `systemd-analyze verify --root`: the host's unit files (the
    targets ours refer to), ours, and stand-ins for the executables they name
    (/opt/ctstream is not installed on a test machine)."""
    root = tmp_path / "root"
    sysdir = root / "usr/lib/systemd/system"
    sysdir.mkdir(parents=True)
    for d in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")):
        if d.is_dir():
            for f in d.iterdir():
                if f.is_file() and not f.is_symlink() and not (sysdir / f.name).exists():
                    shutil.copyfile(f, sysdir / f.name)
    etc = root / "etc/systemd/system"
    etc.mkdir(parents=True)
    for unit in units:
        shutil.copyfile(unit, etc / unit.name)
        for key, values in parse_unit(unit)["Service"].items():
            if key.startswith("Exec"):
                for v in values:
                    exe = root / v.split()[0].lstrip("/")
                    exe.parent.mkdir(parents=True, exist_ok=True)
                    exe.write_text("#!/bin/sh\n")
                    exe.chmod(0o755)
    return root


def systemd_analyze() -> str | None:
    return shutil.which("systemd-analyze")


def verify(root: Path, names: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([systemd_analyze(), "verify", f"--root={root}", *names],
                          capture_output=True, text=True, timeout=TIMEOUT)


def test_units_pass_systemd_analyze_verify(tmp_path):
    if systemd_analyze() is None:
        # No systemd here: test_unit_files_parse is the check that runs.
        test_unit_files_parse(UNIT)
        test_unit_files_parse(ACCOUNT_UNIT)
        return
    root = scratch_root(tmp_path, [UNIT, ACCOUNT_UNIT])
    r = verify(root, [UNIT.name, ACCOUNT_UNIT.name])
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    # verify only warns (exit 0) on unknown keys or bad values: any line
    # about our units is a finding.
    ours = [ln for ln in out.splitlines() if UNIT.stem in ln]
    assert not ours, "\n".join(ours)

    # ... and the same run does find a misspelt directive.
    bad = root / "etc/systemd/system" / UNIT.name
    bad.write_text(bad.read_text().replace("ProtectClock=yes", "ProtectClok=yes"))
    r = verify(root, [UNIT.name])
    assert "ProtectClok" in r.stdout + r.stderr


def test_units_security_exposure(tmp_path):
    if systemd_analyze() is None:
        test_daemon_unit_capabilities_and_sandbox()
        return
    for unit, at_most in ((UNIT, 5.0), (ACCOUNT_UNIT, 2.5)):
        r = subprocess.run([systemd_analyze(), "security", "--offline=yes", "--no-pager", str(unit)],
                           capture_output=True, text=True, timeout=TIMEOUT)
        m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", r.stdout + r.stderr)
        assert m, r.stdout + r.stderr
        assert float(m.group(1)) <= at_most, f"{unit.name}: exposure {m.group(1)}"


# --- the example configuration -----------------------------------------------------------


def test_example_toml_is_a_valid_run_config():
    a = load_config(["run", "--config", str(EXAMPLE_TOML)])
    assert a.command == "run" and a.ifaces == ["eth0"] and a.egress
    assert a.kafka == "127.0.0.1:9092" and a.topic == "ctstream.events"
    cfg = a.datapath  # validated: sizes, timeouts and the pin dir
    assert cfg.ring_bytes == 4 << 20
    # The daemon makes this pin dir 0700; the unit names it nowhere (one
    # place), lets the daemon write under /sys/fs/bpf and only its state dir.
    unit_text = "\n".join(ln for ln in UNIT.read_text().splitlines() if not ln.startswith("#"))
    assert a.pin_dir.startswith("/sys/fs/bpf/") and a.pin_dir not in unit_text
    assert "/sys/fs/bpf" in parse_unit(UNIT)["Service"]["ReadWritePaths"][-1].split()
    assert a.spool.startswith("/var/lib/ctstream/")


def test_example_toml_commented_settings_are_valid_too(tmp_path):
    # The commented-out lines document optional settings: they must still be
    # options of `ctstream run`.
    text = EXAMPLE_TOML.read_text()
    extra = re.findall(r"^# ?([a-z][a-z0-9-]*) = (\"[^\"]*\"|[0-9.]+|true|false)", text, re.M)
    assert len(extra) >= 5
    f = tmp_path / "all.toml"
    f.write_text(text + "\n" + "\n".join(f"{k} = {v}" for k, v in extra) + "\n")
    a = load_config(["run", "--config", str(f)], typed=False)   # files they name need not exist
    for key, _ in extra:
        assert getattr(a, key.replace("-", "_")) is not None, key


# --- the unit's capability set, on the real kernel -------------------------------------------

ATTACH_TIMEOUT = 30


def _bounding(caps: list[str]) -> list[str]:
    spec = ",".join(["-all"] + ["+" + c.removeprefix("CAP_").lower() for c in caps])
    return ["setpriv", "--no-new-privs", "--inh-caps=-all", f"--bounding-set={spec}"]


def _events(prefix: list[str], args: list[str]) -> subprocess.Popen:
    ct = str(Path(sys.executable).with_name("ctstream"))
    return subprocess.Popen([*prefix, ct, "events", "-o", "json", "--egress", "--keep", *args],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, bufsize=0)


def _wait_attached(p: subprocess.Popen) -> tuple[bool, str]:
    """(attached, stderr so far): True once it says so, False if it exited."""
    fd, buf = p.stderr.fileno(), b""
    deadline = time.monotonic() + ATTACH_TIMEOUT
    while b"tracking on" not in buf:
        left = deadline - time.monotonic()
        assert left > 0, f"not attached after {ATTACH_TIMEOUT} s: {buf.decode()}"
        r, _, _ = select.select([fd], [], [], left)
        chunk = os.read(fd, 65536) if r else b""
        if r and not chunk:
            p.wait(timeout=10)
            return False, buf.decode(errors="replace")
        buf += chunk
    return True, buf.decode(errors="replace")


def _stop(p: subprocess.Popen) -> tuple[int, list[dict], str]:
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=20)
    return p.returncode, [json.loads(ln) for ln in out.decode().splitlines()], err.decode()


@pytest.mark.root
def test_daemon_runs_with_exactly_the_units_capabilities(pin_dir):
    """Each capability of the unit is needed, and together they are enough:
    CAP_BPF + CAP_NET_ADMIN + CAP_PERFMON load and attach on fresh pins,
    without CAP_PERFMON the verifier refuses the datapath, without
    CAP_SYS_ADMIN pinned maps cannot be adopted, and the unit's set adopts
    them after a restart and enters the namespace of --netns. (The kernel
    also accepts CAP_SYS_ADMIN for CAP_BPF and CAP_PERFMON, which is why the
    fine-grained ones are checked without it.)"""
    from streamer.demo import testbed

    (caps,) = parse_unit(UNIT)["Service"]["CapabilityBoundingSet"]
    unit_caps = caps.split()
    fine = [c for c in unit_caps if c != "CAP_SYS_ADMIN"]
    assert sorted(fine) == ["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"]
    other_pins = pin_dir + "_noperfmon"
    procs: list[subprocess.Popen] = []

    def start(caps: list[str], pins: str, netns: bool) -> subprocess.Popen:
        server = pair.server
        if netns:
            prefix, where = _bounding(caps), ["-n", server.netns]
        else:  # started inside the namespace: no setns() needed
            prefix, where = ["nsenter", f"--net=/run/netns/{server.netns}", *_bounding(caps)], []
        p = _events(prefix, [*where, "-i", server.ifname, "--pin-dir", pins])
        procs.append(p)
        return p

    def tracks(p: subprocess.Popen) -> str:
        ok, err = _wait_attached(p)
        assert ok, err
        port = pair.udp_exchange(1, 50, family=4)
        rc, objs, more = _stop(p)
        assert rc == 0, err + more
        # -o json lines are wire records: CREATE, sourceTransportPort
        assert any(o["eventType"] == "CREATE" and o["sourceTransportPort"] == port
                   for o in objs), objs
        return err

    def refused(p: subprocess.Popen) -> str:
        ok, err = _wait_attached(p)
        assert not ok and p.returncode != 0, err
        return err

    with testbed.make_pair(prefix="ctsdep", offloads=False, conntrack=False, index=7) as pair:
        try:
            tracks(start(fine, pin_dir, netns=False))
            err = refused(start(fine, pin_dir, netns=False))
            assert "Operation not permitted" in err, err
            err = tracks(start(unit_caps, pin_dir, netns=True))
            assert "adopted" in err, err
            err = refused(start(["CAP_BPF", "CAP_NET_ADMIN"], other_pins, netns=False))
            assert "loading the BPF datapath failed" in err, err
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.communicate(timeout=10)
            ct = str(Path(sys.executable).with_name("ctstream"))
            for pins in (pin_dir, other_pins):
                subprocess.run([ct, "detach", "--pin-dir", pins], capture_output=True, timeout=60)
                shutil.rmtree(pins, ignore_errors=True)
                for suffix in (".json", ".lock", ".status.json"):
                    (STATE_DIR / (pins.strip("/").replace("/", "_") + suffix)).unlink(missing_ok=True)
